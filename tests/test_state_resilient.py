# -*- test-case-name: tests.test_state_resilient -*-
"""
Tests for ResilientStateManager: state writes survive a store outage, in
order, with bounded memory and bounded waiting, on a fake clock.
"""

from __future__ import annotations

import json
from typing import Any, Callable, List, Optional, Tuple

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from quebert.errors import ConfigurationError, StateError
from quebert.state import (
    FAILED,
    QUEUED,
    RUNNING,
    SCHEDULED,
    SUCCEEDED,
    IStateManager,
    MemoryStateManager,
    RedisStateManager,
    ResilientStateManager,
)
from quebert.state.redis import SETTLE_LINGER
from tests import test_state

T0 = 1767225590.0
INFO = {"queue": "default", "kind": "call", "task": "app.add", "created_at": T0}

Write = Tuple[str, str, Any]


class FlakyStore:
    """
    A state store the test can switch off (``down``), slow down (``hold``:
    writes wait until ``release()``), or make refuse writes (``reject``).
    ``writes`` lists the writes that became durable, in order.
    """

    finished_ttl = 86400

    def __init__(self) -> None:
        self.memory = MemoryStateManager(clock=Clock())
        self.down: Optional[Exception] = None
        self.hold = False
        self.reject = False
        self.held: List[Tuple[Deferred, Write, Callable[[], Deferred]]] = []
        self.writes: List[Write] = []
        self.attempts = 0

    def _write(self, write: Write, apply: Callable[[], Deferred]) -> Deferred:
        self.attempts += 1
        if self.down is not None:
            return fail(self.down)
        if self.reject:
            return fail(ValueError("refused"))
        if self.hold:
            d: Deferred = Deferred()
            self.held.append((d, write, apply))
            return d
        apply()
        self.writes.append(write)
        return succeed(None)

    def release(self, index: int = 0, error: Optional[Exception] = None) -> None:
        """Complete a held write (or fail it with ``error``)."""
        d, write, apply = self.held.pop(index)
        if error is not None:
            d.errback(error)
        else:
            apply()
            self.writes.append(write)
            d.callback(None)

    def enqueued(self, task_id: str, state: str, info: Any, at: float) -> Deferred:
        return self._write(
            ("enqueued", task_id, state), lambda: self.memory.enqueued(task_id, state, info, at)
        )

    def started(self, task_id: str, attempt: int, worker: str, info: Any, at: float) -> Deferred:
        return self._write(
            ("started", task_id, attempt),
            lambda: self.memory.started(task_id, attempt, worker, info, at),
        )

    def finished(
        self,
        task_id: str,
        state: str,
        attempt: int,
        info: Any,
        at: float,
        result: Any = None,
        error: Any = None,
        reason: Any = None,
        retry_at: Any = None,
    ) -> Deferred:
        return self._write(
            ("finished", task_id, state),
            lambda: self.memory.finished(
                task_id, state, attempt, info, at, result, error, reason, retry_at
            ),
        )

    def get(self, task_id: str) -> Deferred:
        if self.down is not None:
            raise self.down
        return self.memory.get(task_id)

    def list(
        self, state: Any = None, queue: Any = None, limit: int = 100, offset: int = 0
    ) -> Deferred:
        if self.down is not None:
            return fail(self.down)
        return self.memory.list(state=state, queue=queue, limit=limit, offset=offset)


def events(logged: List[dict], level: LogLevel) -> List[dict]:
    """The events of the resilient manager at ``level``."""
    return [
        e
        for e in logged
        if e.get("log_namespace") == "quebert.state.resilient" and e.get("log_level") == level
    ]


class ResilientTestsMixin:
    """A resilient manager around a FlakyStore, on a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.inner = FlakyStore()
        self.manager = self.make()

    def make(self, **kwargs: Any) -> ResilientStateManager:
        kwargs.setdefault("retry_policy", lambda attempt: 2.0**attempt)  # 1, 2, 4, 8...
        return ResilientStateManager(self.inner, clock=self.clock, **kwargs)

    def outage(self) -> None:
        self.inner.down = StateError("Redis is down")

    def recover(self) -> None:
        self.inner.down = None

    def run_task(self, task_id: str) -> List[Deferred]:
        return [
            self.manager.enqueued(task_id, QUEUED, INFO, T0),
            self.manager.started(task_id, 1, "w", INFO, T0 + 1),
            self.manager.finished(task_id, SUCCEEDED, 1, INFO, T0 + 2, result=1),
        ]


class HealthyTests(ResilientTestsMixin, SynchronousTestCase):
    """While the store answers, writes go straight through."""

    def test_provides_interface(self) -> None:
        """The wrapper is an IStateManager with its inner store's TTL."""
        self.assertTrue(verifyObject(IStateManager, self.manager))
        self.assertEqual(self.manager.finished_ttl, 86400)

    def test_writes_go_straight_to_the_store(self) -> None:
        """Healthy writes reach the store at once and fire with None when durable."""
        for d in self.run_task("a"):
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(
            self.inner.writes,
            [("enqueued", "a", QUEUED), ("started", "a", 1), ("finished", "a", SUCCEEDED)],
        )
        self.assertEqual((self.manager.healthy, self.manager.pending), (True, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_finished_waits_until_durable(self) -> None:
        """A healthy finished fires only once the store has it."""
        self.inner.hold = True
        d = self.manager.finished("a", SUCCEEDED, 1, INFO, T0)
        self.clock.advance(60)
        self.assertNoResult(d)
        self.inner.release()
        self.assertIsNone(self.successResultOf(d))

    def test_started_waits_for_the_store(self) -> None:
        """A healthy started fires when the store has it, if that is quick."""
        self.inner.hold = True
        d = self.manager.started("a", 1, "w", INFO, T0)
        self.clock.advance(1)
        self.assertNoResult(d)
        self.inner.release()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_started_waits_at_most_start_wait(self) -> None:
        """A slow started releases its caller after start_wait; the write goes on."""
        self.inner.hold = True
        d = self.manager.started("a", 1, "w", INFO, T0)
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(d))
        self.inner.release()
        self.assertEqual(self.inner.writes, [("started", "a", 1)])
        self.assertTrue(self.manager.healthy)

    def test_zero_start_wait_does_not_wait(self) -> None:
        """start_wait = 0: started never delays its caller."""
        self.manager = self.make(start_wait=0)
        self.inner.hold = True
        self.assertIsNone(self.successResultOf(self.manager.started("a", 1, "w", INFO, T0)))

    def test_writes_of_one_task_wait_for_each_other(self) -> None:
        """A task's next write is sent once its previous one is durable; tasks overlap."""
        self.inner.hold = True
        self.manager.started("a", 1, "w", INFO, T0)
        finished = self.manager.finished("a", SUCCEEDED, 1, INFO, T0 + 1)
        self.manager.started("b", 1, "w", INFO, T0)
        self.assertEqual(
            [w for _, w, _ in self.inner.held], [("started", "a", 1), ("started", "b", 1)]
        )
        self.inner.release(0)
        self.assertEqual(
            [w for _, w, _ in self.inner.held], [("started", "b", 1), ("finished", "a", SUCCEEDED)]
        )
        self.inner.release(1)
        self.assertIsNone(self.successResultOf(finished))
        self.assertEqual(self.inner.writes, [("started", "a", 1), ("finished", "a", SUCCEEDED)])

    def test_malformed_writes_fail_without_an_outage(self) -> None:
        """A write that could never be stored fails its caller; nothing is queued."""
        self.failureResultOf(self.manager.started("a", 0, "w", INFO, T0), ValueError)
        self.failureResultOf(self.manager.enqueued("a", RUNNING, INFO, T0), ValueError)
        self.failureResultOf(self.manager.finished("", FAILED, 1, INFO, T0), TypeError)
        self.assertEqual(
            (self.manager.healthy, self.manager.pending, self.inner.attempts), (True, 0, 0)
        )

    def test_store_refusing_a_write_is_not_an_outage(self) -> None:
        """A ValueError from the store reaches the caller; the store stays healthy."""
        self.inner.reject = True
        with capturedLogs() as logged:
            self.failureResultOf(self.manager.finished("a", SUCCEEDED, 1, INFO, T0), ValueError)
        self.assertTrue(self.manager.healthy)
        self.assertEqual(self.manager.pending, 0)
        self.assertEqual(len(events(logged, LogLevel.error)), 1)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_reads_pass_through(self) -> None:
        """get and list read the inner store."""
        for d in self.run_task("a"):
            self.successResultOf(d)
        self.assertEqual(self.successResultOf(self.manager.get("a"))["state"], SUCCEEDED)
        self.assertEqual(
            [r["id"] for r in self.successResultOf(self.manager.list(state=SUCCEEDED))], ["a"]
        )

    def test_bad_settings_are_configuration_errors(self) -> None:
        """max_pending < 1 and a negative start_wait are refused."""
        self.assertRaises(ConfigurationError, self.make, max_pending=0)
        self.assertRaises(ConfigurationError, self.make, start_wait=-1)


class OutageTests(ResilientTestsMixin, SynchronousTestCase):
    """When the store fails, writes queue up and are replayed in order."""

    def test_failed_write_queues_and_releases_caller(self) -> None:
        """The first failure makes the manager unhealthy; its caller gets None."""
        self.outage()
        d = self.manager.started("a", 1, "w", INFO, T0)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual((self.manager.healthy, self.manager.pending), (False, 1))

    def test_writes_while_unhealthy_fire_at_once_and_queue(self) -> None:
        """While unhealthy, writes are not tried: queued, caller released at once."""
        self.outage()
        self.manager.started("a", 1, "w", INFO, T0)
        for d in self.run_task("b"):
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual((self.manager.pending, self.inner.attempts), (4, 1))

    def test_any_exception_counts_as_an_outage(self) -> None:
        """Untranslated connection errors from the store also mean it is down."""
        self.inner.down = ConnectionRefusedError()
        self.successResultOf(self.manager.enqueued("a", QUEUED, INFO, T0))
        self.assertFalse(self.manager.healthy)

    def test_one_warning_per_outage(self) -> None:
        """One structured warning, with the error and the pending count, per outage."""
        with capturedLogs() as logged:
            self.outage()
            for n in range(5):
                self.manager.enqueued(f"t{n}", QUEUED, INFO, T0)
            self.clock.advance(1 + 2 + 4)  # three failed retries
            self.recover()
            self.clock.advance(8)
            self.outage()
            self.manager.enqueued("again", QUEUED, INFO, T0)
        warnings = events(logged, LogLevel.warn)
        self.assertEqual(len(warnings), 2)
        self.assertEqual(warnings[0]["pending"], 1)
        self.assertIn("Redis is down", warnings[0]["error"])
        self.assertIn("StateError", warnings[0]["error"])

    def test_retries_back_off_on_the_clock(self) -> None:
        """The oldest write is retried after the policy's delays, 1, 2, 4... seconds."""
        self.outage()
        self.manager.started("a", 1, "w", INFO, T0)
        seen = []
        for step in (0.9, 0.1, 1.9, 0.1, 3.9, 0.1):
            self.clock.advance(step)
            seen.append(self.inner.attempts)
        self.assertEqual(seen, [1, 2, 2, 3, 3, 4])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_default_policy_backs_off_exponentially_to_5s(self) -> None:
        """
        Without a policy: 1 s, doubling, at most 5 s, no jitter, so that a
        Redis back after a long outage is found within seconds (it was 30).
        """
        manager = ResilientStateManager(self.inner, clock=self.clock)
        self.outage()
        manager.enqueued("a", QUEUED, INFO, T0)
        delays = []
        for _ in range(7):
            (call,) = self.clock.getDelayedCalls()
            delays.append(call.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
        self.assertEqual(delays, [1, 2, 4, 5, 5, 5, 5])

    def test_recovery_replays_in_order_and_logs_count(self) -> None:
        """Once the store is back, every queued write lands in the original order."""
        self.outage()
        with capturedLogs() as logged:
            self.run_task("a")
            self.run_task("b")
            self.manager.finished("a", FAILED, 2, INFO, T0 + 9, reason="late")
            self.recover()
            self.clock.advance(1)
        self.assertEqual(
            self.inner.writes,
            [
                ("enqueued", "a", QUEUED),
                ("started", "a", 1),
                ("finished", "a", SUCCEEDED),
                ("enqueued", "b", QUEUED),
                ("started", "b", 1),
                ("finished", "b", SUCCEEDED),
                ("finished", "a", FAILED),
            ],
        )
        self.assertEqual((self.manager.healthy, self.manager.pending), (True, 0))
        (recovered,) = events(logged, LogLevel.info)
        self.assertEqual((recovered["replayed"], recovered["dropped"]), (7, 0))
        self.assertEqual(self.successResultOf(self.manager.get("a"))["state"], FAILED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_writes_after_recovery_go_straight_through(self) -> None:
        """After the replay, writes are direct again."""
        self.outage()
        self.manager.enqueued("a", QUEUED, INFO, T0)
        self.recover()
        self.clock.advance(1)
        self.inner.hold = True
        d = self.manager.finished("a", SUCCEEDED, 1, INFO, T0)
        self.assertNoResult(d)
        self.inner.release()
        self.successResultOf(d)

    def test_writes_in_flight_when_the_outage_starts_keep_their_order(self) -> None:
        """A retried started never lands after a later finished, whichever fails first."""
        self.inner.hold = True
        self.manager.started("a", 1, "w", INFO, T0)  # in flight
        self.manager.started("b", 1, "w", INFO, T0)  # in flight
        finished_a = self.manager.finished("a", SUCCEEDED, 1, INFO, T0 + 1)  # waits for a
        self.inner.release(1, StateError("lost b"))  # b fails first
        self.assertIsNone(self.successResultOf(finished_a))
        self.clock.advance(1)  # the retry waits for a's write to settle
        self.assertEqual(self.inner.attempts, 2)
        self.inner.hold = False
        self.inner.release(0, StateError("lost a"))  # the retry that was due runs now
        self.assertEqual(
            self.inner.writes,
            [("started", "a", 1), ("started", "b", 1), ("finished", "a", SUCCEEDED)],
        )
        self.assertTrue(self.manager.healthy)

    def test_in_flight_write_that_succeeds_during_outage_is_not_replayed(self) -> None:
        """A write that was already on its way and succeeded is not written again."""
        self.inner.hold = True
        self.manager.started("a", 1, "w", INFO, T0)
        self.manager.started("b", 1, "w", INFO, T0)
        self.inner.release(1, StateError("lost b"))
        self.inner.release(0)
        self.inner.hold = False
        self.clock.advance(1)
        self.assertEqual(self.inner.writes, [("started", "a", 1), ("started", "b", 1)])

    def test_slow_started_that_fails_is_queued(self) -> None:
        """A started that outlived start_wait and then failed is replayed later."""
        self.inner.hold = True
        d = self.manager.started("a", 1, "w", INFO, T0)
        self.clock.advance(2)
        self.successResultOf(d)
        self.inner.release(0, StateError("timeout"))
        self.assertEqual(self.manager.pending, 1)
        self.inner.hold = False
        self.clock.advance(1)
        self.assertEqual(self.inner.writes, [("started", "a", 1)])

    def test_replay_is_one_write_at_a_time(self) -> None:
        """During the replay each write waits for the previous one."""
        self.outage()
        self.run_task("a")
        self.recover()
        self.inner.hold = True
        self.clock.advance(1)
        self.assertEqual(len(self.inner.held), 1)
        self.inner.release()
        self.assertEqual(len(self.inner.held), 1)
        self.inner.release()
        self.inner.release()
        self.assertEqual(len(self.inner.writes), 3)
        self.assertTrue(self.manager.healthy)

    def test_replay_failure_resumes_backoff(self) -> None:
        """If the store fails again mid-replay, the rest waits for the next retry."""
        self.outage()
        self.run_task("a")
        self.recover()
        self.inner.hold = True
        self.clock.advance(1)
        self.inner.release()  # enqueued lands
        self.inner.release(0, StateError("down again"))  # started fails
        self.assertEqual((self.manager.healthy, self.manager.pending), (False, 2))
        self.inner.hold = False
        self.clock.advance(1)
        self.assertEqual([w[0] for w in self.inner.writes], ["enqueued", "started", "finished"])

    def test_queued_writes_are_snapshots(self) -> None:
        """Changing info or the result after the call does not change the queued write."""
        self.outage()
        info, result = dict(INFO), {"items": [1]}
        self.manager.finished("a", SUCCEEDED, 1, info, T0, result=result)
        info["queue"] = "changed"
        result["items"].append(2)
        self.recover()
        self.clock.advance(1)
        record = self.successResultOf(self.manager.get("a"))
        self.assertEqual((record["queue"], record["result"]), ("default", {"items": [1]}))

    def test_replayed_write_refused_by_store_is_dropped(self) -> None:
        """A queued write the store refuses as invalid is logged and skipped."""
        self.outage()
        self.manager.enqueued("a", QUEUED, INFO, T0)
        self.manager.enqueued("b", QUEUED, INFO, T0)
        self.recover()
        self.inner.reject = True
        with capturedLogs() as logged:
            self.clock.advance(1)
        self.assertEqual((self.manager.healthy, self.manager.dropped), (True, 2))
        self.assertEqual(len(events(logged, LogLevel.error)), 2)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)

    def test_reads_fail_with_state_error_when_store_is_down(self) -> None:
        """Reads are not queued: they fail with StateError caused by the store's error."""
        self.inner.down = ConnectionRefusedError()
        failure = self.failureResultOf(self.manager.get("a"), StateError)
        self.assertIsInstance(failure.value.__cause__, ConnectionRefusedError)
        self.failureResultOf(self.manager.list(), StateError)
        self.outage()
        self.failureResultOf(self.manager.list(queue="q"), StateError)


class BoundedMemoryTests(ResilientTestsMixin, SynchronousTestCase):
    """Past max_pending queued writes, the oldest are dropped."""

    def test_oldest_writes_dropped_with_error(self) -> None:
        """The queue never exceeds max_pending; the oldest go and an error says so."""
        self.manager = self.make(max_pending=3)
        self.outage()
        with capturedLogs() as logged:
            for n in range(5):
                self.manager.enqueued(f"t{n}", QUEUED, INFO, T0)
            self.assertEqual((self.manager.pending, self.manager.dropped), (3, 2))
            self.recover()
            self.clock.advance(1)
        self.assertEqual([w[1] for w in self.inner.writes], ["t2", "t3", "t4"])
        (error,) = events(logged, LogLevel.error)
        self.assertEqual((error["dropped"], error["max_pending"]), (1, 3))
        (recovered,) = events(logged, LogLevel.info)
        self.assertEqual((recovered["replayed"], recovered["dropped"]), (3, 2))

    def test_drop_errors_are_rate_limited(self) -> None:
        """A long outage logs one error per max_pending writes dropped, not one per write."""
        self.manager = self.make(max_pending=10)
        self.outage()
        with capturedLogs() as logged:
            for n in range(45):
                self.manager.enqueued(f"t{n}", QUEUED, INFO, T0)
        self.assertEqual([e["dropped"] for e in events(logged, LogLevel.error)], [1, 10, 20, 30])
        self.assertEqual(self.manager.dropped, 35)

    def test_write_being_replayed_is_never_dropped(self) -> None:
        """The write on its way to the store stays; the next oldest is dropped instead."""
        self.manager = self.make(max_pending=2)
        self.outage()
        self.manager.enqueued("t1", QUEUED, INFO, T0)
        self.manager.enqueued("t2", QUEUED, INFO, T0)
        self.recover()
        self.inner.hold = True
        self.clock.advance(1)  # t1 is being replayed
        self.manager.enqueued("t3", QUEUED, INFO, T0)
        self.inner.release()
        self.inner.release()
        self.assertEqual([w[1] for w in self.inner.writes], ["t1", "t3"])
        self.assertEqual(self.manager.dropped, 1)


class LifecycleTests(ResilientTestsMixin, SynchronousTestCase):
    """flush() for shutdown, stop() for timers."""

    def test_flush_when_idle_fires_at_once(self) -> None:
        """Nothing pending: flush() has fired already."""
        self.assertIsNone(self.successResultOf(self.manager.flush()))

    def test_flush_waits_for_the_queue(self) -> None:
        """flush() fires once every queued write has been replayed."""
        self.outage()
        self.run_task("a")
        d = self.manager.flush()
        self.clock.advance(1)
        self.assertNoResult(d)
        self.recover()
        self.clock.advance(2)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(self.inner.writes), 3)

    def test_flush_waits_for_writes_in_flight(self) -> None:
        """flush() also waits for healthy writes still on their way."""
        self.inner.hold = True
        self.manager.started("a", 1, "w", INFO, T0)
        self.manager.finished("a", SUCCEEDED, 1, INFO, T0)
        d = self.manager.flush()
        self.inner.release()
        self.assertNoResult(d)
        self.inner.release()
        self.successResultOf(d)

    def test_flush_can_be_cancelled(self) -> None:
        """Cancelling flush() (a shutdown timeout) forgets it."""
        self.outage()
        self.manager.enqueued("a", QUEUED, INFO, T0)
        d = self.manager.flush()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.recover()
        self.clock.advance(1)
        self.assertTrue(self.manager.healthy)

    def test_stop_cancels_timers(self) -> None:
        """stop() cancels the retry and start_wait timers and fails waiting flushes."""
        self.outage()
        self.manager.enqueued("a", QUEUED, INFO, T0)
        flushed = self.manager.flush()
        self.manager.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.failureResultOf(flushed, StateError)
        self.assertEqual(self.manager.pending, 1)

    def test_stop_releases_started_callers(self) -> None:
        """A started waiting for its start_wait timer is released by stop()."""
        self.inner.hold = True
        d = self.manager.started("a", 1, "w", INFO, T0)
        self.manager.stop()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_default_clock_is_the_reactor(self) -> None:
        """Without a clock, the global reactor schedules retries."""
        from twisted.internet import reactor

        manager = ResilientStateManager(self.inner, retry_policy=lambda n: 3600.0)
        self.outage()
        manager.enqueued("a", QUEUED, INFO, T0)
        self.assertIs(manager._clock, reactor)
        manager.stop()

    def test_scheduled_outcome_replayed(self) -> None:
        """Retries recorded during an outage keep their ETA once replayed."""
        self.outage()
        self.manager.finished("a", SCHEDULED, 1, INFO, T0, retry_at=T0 + 30)
        self.recover()
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(self.manager.get("a"))["eta"], T0 + 30)


class StartWaitTimerTests(ResilientTestsMixin, SynchronousTestCase):
    """One timer serves every started write waiting for the store."""

    def test_one_timer_for_many_waiting_starts(self) -> None:
        """Starts made together share a timer; each is released start_wait after it began."""
        self.inner.hold = True
        first = [self.manager.started(f"a{n}", 1, "w", INFO, T0) for n in range(3)]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(1)
        later = self.manager.started("b", 1, "w", INFO, T0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(1)
        for d in first:
            self.assertIsNone(self.successResultOf(d))
        self.assertNoResult(later)
        self.clock.advance(0.9)
        self.assertNoResult(later)
        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(later))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timer_goes_when_no_start_waits(self) -> None:
        """Once every waiting start is durable, no timer is left."""
        self.inner.hold = True
        a = self.manager.started("a", 1, "w", INFO, T0)
        b = self.manager.started("b", 1, "w", INFO, T0)
        self.inner.release(1)
        self.assertIsNone(self.successResultOf(b))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.inner.release(0)
        self.assertIsNone(self.successResultOf(a))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_quick_store_needs_no_timer(self) -> None:
        """A start the store takes at once never arms a timer."""
        self.assertIsNone(self.successResultOf(self.manager.started("a", 1, "w", INFO, T0)))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ScriptedRedis:
    """A txredisapi stand-in for RedisStateManager: records batches, or fails when down."""

    def __init__(self) -> None:
        self.down = False
        self.batches: List[List[list]] = []

    def evalsha(self, sha: str, keys: list, args: list) -> Deferred:
        if self.down:
            return fail(ConnectionRefusedError())
        ops = json.loads(args[3])
        self.batches.append(ops)
        return succeed(0)


class PreparedWriteTests(SynchronousTestCase):
    """Around a RedisStateManager, writes are checked and encoded once, up front."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = ScriptedRedis()
        self.inner = RedisStateManager(self.redis, clock=self.clock)
        self.manager = ResilientStateManager(
            self.inner, clock=self.clock, retry_policy=lambda attempt: 1.0
        )

    def ops(self) -> List[Tuple[str, str]]:
        return [(op[0], op[1]) for batch in self.redis.batches for op in batch]

    def test_writes_reach_redis_in_order(self) -> None:
        """Healthy writes go in one batch per turn and fire once it is applied."""
        ds = [
            self.manager.enqueued("a", QUEUED, INFO, T0),
            self.manager.started("b", 1, "w", INFO, T0),
            self.manager.finished("c", SUCCEEDED, 1, INFO, T0, result=[1]),
        ]
        for d in ds:
            self.assertNoResult(d)
        self.clock.advance(0)
        for d in ds:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.ops(), [("e", "a"), ("s", "b"), ("f", "c")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_writes_of_one_task_still_wait_for_each_other(self) -> None:
        """A task's finished is sent only once its started is applied."""
        self.manager.started("a", 1, "w", INFO, T0)
        self.manager.finished("a", SUCCEEDED, 1, INFO, T0 + 1)
        self.manager.started("b", 1, "w", INFO, T0)
        self.clock.advance(0)
        self.assertEqual(
            [[(op[0], op[1]) for op in batch] for batch in self.redis.batches],
            [[("s", "a"), ("s", "b")], [("f", "a")]],
        )

    def test_malformed_writes_fail_at_once(self) -> None:
        """Bad arguments fail the caller; nothing is sent or queued."""
        self.failureResultOf(self.manager.started("a", 0, "w", INFO, T0), ValueError)
        self.failureResultOf(self.manager.enqueued("a", RUNNING, INFO, T0), ValueError)
        self.failureResultOf(self.manager.finished("", FAILED, 1, INFO, T0), TypeError)
        self.failureResultOf(
            self.manager.finished("a", FAILED, 1, INFO, T0, error="boom"), TypeError
        )
        self.clock.advance(0)
        self.assertEqual((self.redis.batches, self.manager.pending), ([], 0))

    def test_replayed_outcomes_do_not_linger(self) -> None:
        """
        Replayed one at a time, an outcome does not wait SETTLE_LINGER for
        company that cannot come (10,000 queued outcomes would take 20 s more).
        """
        self.redis.down = True
        for task_id in ("a", "b", "c"):
            self.manager.finished(task_id, SUCCEEDED, 1, INFO, T0)
        self.clock.advance(SETTLE_LINGER)
        self.assertFalse(self.manager.healthy)
        self.redis.down = False
        self.clock.advance(1)  # the retry: every queued write replayed at once
        self.assertTrue(self.manager.healthy)
        self.assertEqual(self.ops()[-3:], [("f", "a"), ("f", "b"), ("f", "c")])

    def test_outage_queues_and_replays_snapshots_in_order(self) -> None:
        """Failed writes are queued as they were made and replayed in order."""
        self.redis.down = True
        info, result = dict(INFO), {"items": [1]}
        d = self.manager.started("a", 1, "w", info, T0)
        self.clock.advance(0)
        self.assertIsNone(self.successResultOf(d))
        self.assertFalse(self.manager.healthy)
        self.manager.finished("a", SUCCEEDED, 1, info, T0 + 1, result=result)
        info["queue"] = "changed"
        result["items"].append(2)
        self.assertEqual(self.manager.pending, 2)
        self.redis.down = False
        for _ in range(4):
            self.clock.advance(1)
        self.assertTrue(self.manager.healthy)
        self.assertEqual(self.ops(), [("s", "a"), ("f", "a")])
        finished = self.redis.batches[-1][0]
        self.assertEqual(finished[3], "default")
        self.assertEqual(json.loads(finished[11]), {"items": [1]})
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ResilientRedisTests(test_state.RedisStateTests):
    """The contract and the Redis layout, through a ResilientStateManager."""

    def make_manager(self, finished_ttl: float = 86400) -> ResilientStateManager:
        inner = RedisStateManager(self.redis, prefix=self.prefix, finished_ttl=finished_ttl)
        manager = ResilientStateManager(inner)
        self.addCleanup(manager.stop)
        return manager

    async def test_server_errors_become_state_errors(self) -> None:
        """A write Redis refuses is queued (an outage); reads fail with StateError."""
        await self.redis.set(self.key("idx:state:queued"), "not a sorted set")
        self.assertIsNone(await self.manager.enqueued("a", QUEUED, test_state.info(), T0))
        self.assertEqual((self.manager.healthy, self.manager.pending), (False, 1))
        with self.assertRaises(StateError):
            await self.manager.list()
