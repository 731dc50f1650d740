"""
Waiting for results: :class:`quebert.results.ResultWaiter`, ``Client.result``
and ``TaskInfo.result``, on the memory store (a Clock), on the real Redis
(one subscription for thousands of waits, a lost subscription), through a
Sentinel failover, and end to end with a real worker.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from quebert.errors import (
    ConfigurationError,
    InvalidResult,
    ResultTimeout,
    TaskCanceled,
    TaskFailed,
    TaskNotFound,
)
from quebert.results import ResultWaiter, check_result, outcome
from quebert.state.memory import MemoryStateManager
from quebert.state.redis import RedisStateManager, connect_redis
from tests._redis import REDIS_URL, isolated_redis
from tests._worker import wait_for

T0 = 1767225600.0
INFO = {"queue": "default", "kind": "call", "task": "app.add", "name": None, "eta": None,
        "created_at": T0}


def _error() -> dict:
    return {"type": "builtins.ValueError", "message": "boom", "traceback": "Traceback...\n"}


class OutcomeTests(SynchronousTestCase):
    """What a finished record means to the waiter."""

    def test_succeeded_is_the_result(self) -> None:
        self.assertEqual(outcome({"id": "a", "state": "succeeded", "result": [1, 2]}), [1, 2])

    def test_failed_raises_the_remote_error(self) -> None:
        record = {"id": "a", "state": "failed", "attempts": 3, "error": _error(),
                  "reason": "the retry budget is spent"}
        with self.assertRaises(TaskFailed) as caught:
            outcome(record)
        e = caught.exception
        self.assertEqual((e.task_id, e.type, e.message, e.traceback, e.attempts, e.reason),
                         ("a", "builtins.ValueError", "boom", "Traceback...\n", 3,
                          "the retry budget is spent"))
        self.assertIn("failed after 3 attempt(s): builtins.ValueError: boom", str(e))

    def test_failed_without_error_says_the_reason(self) -> None:
        with self.assertRaises(TaskFailed) as caught:
            outcome({"id": "a", "state": "failed", "reason": "refused", "error": None})
        self.assertIn("refused", str(caught.exception))

    def test_canceled_raises_task_canceled(self) -> None:
        with self.assertRaises(TaskCanceled) as caught:
            outcome({"id": "a", "state": "canceled", "reason": "by the operator"})
        self.assertEqual(caught.exception.reason, "by the operator")

    def test_unfinished_is_a_bug(self) -> None:
        self.assertRaises(ValueError, outcome, {"id": "a", "state": "running"})


class CheckResultTests(SynchronousTestCase):
    """Which return values can be kept."""

    def test_json_values_pass(self) -> None:
        for value in (None, 1, 1.5, "é", True, [1, {"a": None}], (1, 2), {"k": [1]}):
            check_result(value, 1000, "t")

    def test_not_json_is_refused_naming_the_type(self) -> None:
        for value, kind in ((object(), "object"), ({1, 2}, "set"), (float("inf"), "float"),
                            (b"x", "bytes")):
            with self.assertRaises(InvalidResult) as caught:
                check_result(value, 1000, "app.t")
            self.assertIn(f"task 'app.t' returned a {kind}, which is not JSON",
                          str(caught.exception))

    def test_the_fast_path_agrees_with_the_encoder(self) -> None:
        check_result(2 ** 63 - 1, 10, "t")
        self.assertRaises(InvalidResult, check_result, 10 ** 40, 10, "t")  # 41 bytes
        check_result("\u2028" * 10, 62, "t")
        self.assertRaises(InvalidResult, check_result, "x" * 20, 10, "t")
        check_result(True, 1, "t")

    def test_size_limit_counts_json_bytes(self) -> None:
        check_result("é" * 10, 62, "t")  # "\\u00e9" is 6 bytes each, plus quotes
        self.assertRaises(InvalidResult, check_result, "é" * 10, 61, "t")
        check_result("x" * 10_000, 0, "t")


class MemoryWaiterTests(SynchronousTestCase):
    """The waiter on the memory store: no I/O, a Clock for timeouts."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.state = MemoryStateManager(clock=self.clock)
        self.waiter = ResultWaiter(self.state, self.clock)

    def run_task(self, task_id: str, state: str = "succeeded", **outcome: Any) -> None:
        self.state.enqueued(task_id, "queued", INFO, T0)
        self.state.started(task_id, 1, "w", INFO, T0 + 1)
        if state:
            self.state.finished(task_id, state, 1, INFO, T0 + 2, **outcome)

    def test_wait_fires_when_the_task_settles(self) -> None:
        self.run_task("a", state="")
        d = self.waiter.result("a")
        self.assertNoResult(d)
        self.state.finished("a", "succeeded", 1, INFO, T0 + 2, result={"sum": 5})
        self.assertEqual(self.successResultOf(d), {"sum": 5})
        self.assertEqual(self.waiter.waiting, 0)

    def test_a_task_that_settled_before_answers_at_once(self) -> None:
        self.run_task("a", result=7)
        self.assertEqual(self.successResultOf(self.waiter.result("a")), 7)

    def test_retry_is_not_an_outcome(self) -> None:
        self.run_task("a", state="")
        d = self.waiter.result("a")
        self.state.finished("a", "scheduled", 1, INFO, T0 + 2, error=_error(), retry_at=T0 + 5)
        self.assertNoResult(d)
        self.state.started("a", 2, "w", INFO, T0 + 5)
        self.state.finished("a", "succeeded", 2, INFO, T0 + 6, result="second")
        self.assertEqual(self.successResultOf(d), "second")

    def test_failure_reaches_the_waiter(self) -> None:
        self.run_task("a", state="")
        d = self.waiter.result("a")
        self.state.finished("a", "failed", 1, INFO, T0 + 2, error=_error(), reason="spent")
        failure = self.failureResultOf(d, TaskFailed)
        self.assertEqual((failure.value.type, failure.value.attempts),
                         ("builtins.ValueError", 1))

    def test_cancellation_reaches_the_waiter(self) -> None:
        self.state.enqueued("a", "queued", INFO, T0)
        d = self.waiter.result("a")
        self.state.cancel("a", T0 + 1, "no longer needed")
        self.assertEqual(self.failureResultOf(d, TaskCanceled).value.reason, "no longer needed")

    def test_wait_returns_the_record_whatever_the_outcome(self) -> None:
        self.run_task("a", "failed", error=_error(), reason="spent")
        record = self.successResultOf(self.waiter.wait("a"))
        self.assertEqual((record["state"], record["reason"]), ("failed", "spent"))

    def test_unknown_task(self) -> None:
        self.failureResultOf(self.waiter.result("nope"), TaskNotFound)
        self.assertEqual(self.waiter.waiting, 0)

    def test_timeout_says_the_last_state_and_the_task_goes_on(self) -> None:
        self.run_task("a", state="")
        d = self.waiter.result("a", timeout=2)
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        error = self.failureResultOf(d, ResultTimeout).value
        self.assertEqual((error.state, error.timeout), ("running", 2))
        self.assertIn("did not finish within 2 s (it is running)", str(error))
        self.assertEqual(self.waiter.waiting, 0)
        later = self.waiter.result("a", timeout=5)
        self.state.finished("a", "succeeded", 1, INFO, T0 + 3, result=1)
        self.assertEqual(self.successResultOf(later), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [], "its timer is gone")

    def test_zero_timeout_answers_a_finished_task(self) -> None:
        self.run_task("a", result=3)
        self.assertEqual(self.successResultOf(self.waiter.result("a", timeout=0)), 3)

    def test_bad_timeout(self) -> None:
        self.assertRaises(ConfigurationError, self.waiter.wait, "a", timeout=-1)

    def test_cancelled_wait_is_forgotten(self) -> None:
        self.run_task("a", state="")
        d = self.waiter.result("a", timeout=10)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual((self.waiter.waiting, self.clock.getDelayedCalls()), (0, []))
        self.state.finished("a", "succeeded", 1, INFO, T0 + 2, result=1)  # nothing to fire

    def test_many_waits_one_feed(self) -> None:
        for i in range(100):
            self.run_task(f"t{i}", state="")
        waits = [self.waiter.result(f"t{i}") for i in range(100) for _ in range(3)]
        self.assertEqual(len(self.state._watches), 1)
        for i in range(100):
            self.state.finished(f"t{i}", "succeeded", 1, INFO, T0 + 2, result=i)
        self.assertEqual([self.successResultOf(d) for d in waits],
                         [i for i in range(100) for _ in range(3)])

    def test_close_cancels_pending_waits_and_stops_the_feed(self) -> None:
        self.run_task("a", state="")
        d = self.waiter.result("a")
        self.successResultOf(self.waiter.close())
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.state._watches, [])

    def test_a_store_without_a_feed_is_refused(self) -> None:
        self.assertRaises(ConfigurationError, ResultWaiter, object(), self.clock)

    def test_redis_store_on_a_foreign_connection_is_refused(self) -> None:
        import txredisapi

        handle = txredisapi.lazyConnection("127.0.0.1", 6379)
        self.addCleanup(handle.disconnect)
        waiter = ResultWaiter(RedisStateManager(handle, prefix="x:"), self.clock)
        self.assertRaises(ConfigurationError, waiter.wait, "a")


class RedisWaiterTests(TestCase):
    """The waiter on the real Redis: pub/sub from the store's script."""

    timeout = 120

    async def setUp(self) -> None:
        self.redis, self.prefix = await isolated_redis(self)
        self.store = RedisStateManager(self.redis, prefix=self.prefix)
        self.waiter = ResultWaiter(self.store)
        self.addCleanup(self.waiter.close)

    async def subscribers(self) -> int:
        reply = await self.redis.execute_command("PUBSUB", "NUMSUB", self.store.settled_channel)
        return int(reply[1])

    async def test_settled_before_and_after_the_wait(self) -> None:
        await self.store.finished("early", "succeeded", 1, INFO, T0, result="e")
        self.assertEqual(await self.waiter.result("early", timeout=10), "e")
        await self.store.started("late", 1, "w", INFO, T0)
        d = self.waiter.result("late", timeout=10)
        await self.store.finished("late", "failed", 1, INFO, T0 + 1, error=_error(),
                                  reason="spent")
        with self.assertRaises(TaskFailed) as caught:
            await d
        self.assertEqual(caught.exception.message, "boom")
        await self.store.enqueued("c", "queued", INFO, T0)
        d = self.waiter.result("c", timeout=10)
        await self.store.cancel("c", T0 + 1, "stop")
        with self.assertRaises(TaskCanceled):
            await d

    async def test_ten_thousand_waits_cost_one_subscription(self) -> None:
        count = 10_000
        ids = [f"t{i}" for i in range(count)]
        await defer.gatherResults([self.store.started(i, 1, "w", INFO, T0) for i in ids])
        waits = [self.waiter.result(i, timeout=60) for i in ids]
        await self.waiter._watch.when_ready()
        self.assertEqual(await self.subscribers(), 1)
        started = time.monotonic()
        await defer.gatherResults([
            self.store.finished(task_id, "succeeded", 1, INFO, T0 + 1, result=n)
            for n, task_id in enumerate(ids)])
        results = await defer.gatherResults(waits)
        took = time.monotonic() - started
        self.assertEqual(results, list(range(count)))
        self.assertEqual(await self.subscribers(), 1)
        print(f"\n{count} waits answered {took:.2f} s after their tasks began to settle")

    async def test_a_lost_subscription_reads_again_what_it_missed(self) -> None:
        await self.store.started("a", 1, "w", INFO, T0)
        d = self.waiter.result("a", timeout=30)
        watch = self.waiter._watch
        await watch.when_ready()
        watch._protocol.transport.abortConnection()
        # settles while nobody listens: the PUBLISH reaches no one
        await self.store.finished("a", "succeeded", 1, INFO, T0 + 1, result="missed")
        self.assertEqual(await d, "missed")
        await wait_for(lambda: watch.subscribed, 10, what="the subscription back")

        await self.store.started("b", 1, "w", INFO, T0)
        d = self.waiter.result("b", timeout=30)
        await self.store.finished("b", "succeeded", 1, INFO, T0 + 1, result="after")
        self.assertEqual(await d, "after")

    async def test_another_database_is_another_channel(self) -> None:
        other = connect_redis(REDIS_URL.rsplit("/", 1)[0] + "/8")
        self.addCleanup(other.disconnect)
        store8 = RedisStateManager(other, prefix=self.prefix)
        self.assertNotEqual(store8.settled_channel, self.store.settled_channel)
        self.assertTrue(self.store.settled_channel.startswith(self.prefix + "settled:"))


class SentinelWaiterTests(TestCase):
    """Waits through a Sentinel failover (the test set of tests/_sentinel.py)."""

    timeout = 180

    async def setUp(self) -> None:
        from tests import _sentinel
        from tests._redis import delete_prefixed

        self.sentinel = _sentinel
        self.url = _sentinel.sentinel_set()
        self.prefix = f"quebert-test-{uuid.uuid4().hex}:"
        self.redis = connect_redis(self.url)
        self.addCleanup(self.redis.disconnect)
        self.addCleanup(lambda: delete_prefixed(self.redis, self.prefix))
        await self.redis.ping()
        from quebert.state.resilient import ResilientStateManager

        self.store = ResilientStateManager(RedisStateManager(self.redis, prefix=self.prefix))
        self.addCleanup(self.store.stop)
        self.waiter = ResultWaiter(self.store)
        self.addCleanup(self.waiter.close)

    async def test_waits_survive_a_failover(self) -> None:
        ids = [f"t{i}" for i in range(50)]
        for task_id in ids:
            await self.store.started(task_id, 1, "w", INFO, T0)
        waits = [self.waiter.result(task_id, timeout=90) for task_id in ids]
        await self.waiter._watch.when_ready()
        await self.store.finished("t0", "succeeded", 1, INFO, T0 + 1, result=0)
        self.assertEqual(await waits[0], 0)
        self.addCleanup(deferToThread, self.sentinel.restore)
        old = self.sentinel.kill_primary()
        # these settle while Redis fails over: the resilient store replays them
        for n, task_id in enumerate(ids[1:25], 1):
            self.store.finished(task_id, "succeeded", 1, INFO, T0 + 2, result=n)
        await wait_for(lambda: self.sentinel.primary() != old, 60, what="a new primary")
        for n, task_id in enumerate(ids[25:], 25):
            self.store.finished(task_id, "succeeded", 1, INFO, T0 + 3, result=n)
        self.assertEqual(await defer.gatherResults(waits), list(range(50)))


class ZeroTimeoutOnRedisTests(TestCase):
    """A timeout shorter than Redis's answer still sees a task that finished."""

    async def setUp(self) -> None:
        self.redis, self.prefix = await isolated_redis(self)
        self.store = RedisStateManager(self.redis, prefix=self.prefix)
        self.waiter = ResultWaiter(self.store)
        self.addCleanup(self.waiter.close)

    async def test_zero_timeout(self) -> None:
        await self.store.finished("done", "succeeded", 1, INFO, T0, result="r")
        await self.store.started("busy", 1, "w", INFO, T0)
        self.assertEqual(await self.waiter.result("done", timeout=0), "r")
        self.assertEqual(await self.waiter.result("done", timeout=0), "r")
        with self.assertRaises(ResultTimeout) as caught:
            await self.waiter.result("busy", timeout=0)
        self.assertEqual(caught.exception.state, "running")
        self.assertEqual(self.waiter.waiting, 0)
