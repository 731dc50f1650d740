"""
Waiting for results from Guillotina (``get_result``,
:class:`quebert.bridge.guillotina.results.ResultWaiter`) on the real Redis.

No Guillotina, no Twisted reactor: each test runs in an asyncio loop of
its own (``asyncio.run``) with a key prefix only it uses, in database 9 of
the test Redis.  Outcomes are written as a worker writes them: the state
store's ``apply`` script, fed with :mod:`quebert.state._redis_ops`'s
operations, publishing on the settled channel.  The last test fails the
primary of the Sentinel test set (``tests/_sentinel.py``) under the waits.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from typing import Any

import redis
from twisted.trial.unittest import SynchronousTestCase

from quebert import protocol
from quebert.bridge.guillotina import get_result
from quebert.bridge.guillotina.bridge import Bridge, set_bridge
from quebert.bridge.guillotina.results import ResultWaiter
from quebert.bridge.guillotina.settings import BridgeSettings
from quebert.bridge.guillotina.state import BridgeState, settled_channel_name
from quebert.errors import (
    ConfigurationError,
    ResultTimeout,
    TaskCanceled,
    TaskFailed,
    TaskNotFound,
)
from quebert.state import _redis_ops
from tests._redis import REDIS_URL

T0 = 1767225600.0
INFO = {"queue": "default", "kind": "call", "task": "app.add", "name": None, "eta": None,
        "created_at": T0}
#: Seconds a test's loop may run: a wait that hangs fails the test.
STEP_TIMEOUT = 120.0
ERROR = {"type": "builtins.ValueError", "message": "boom",
         "traceback": "Traceback (most recent call last):\n  ...\nValueError: boom\n"}


async def started(state: BridgeState, *task_ids: str, attempt: int = 1) -> None:
    """Record attempt ``attempt`` of each task running, in one write."""
    await state._write([_redis_ops.op_started(t, attempt, "w", INFO, T0) for t in task_ids],
                       "started")


async def finished(state: BridgeState, task_id: str, outcome: str = "succeeded",
                   attempt: int = 1, **fields: Any) -> None:
    """Record ``task_id``'s outcome as its worker does."""
    await state._write([_redis_ops.op_finished(task_id, outcome, attempt, INFO, T0 + 1,
                                               **fields)], "finished")


class _FakePublisher:
    """What ``Bridge.cancel`` and ``Bridge.close`` need of a publisher: a record of controls."""

    def __init__(self) -> None:
        self.controls: list = []

    async def publish_control(self, command: str, **fields: Any) -> None:
        self.controls.append((command, fields))

    async def close(self) -> None:
        pass


class _FreezableProxy:
    """
    A loopback TCP proxy (asyncio) in front of the test Redis that can stop
    forwarding bytes while keeping its sockets open: a server gone silent.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.thawed = asyncio.Event()
        self.thawed.set()
        self.connections = 0
        self.server: Any = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.server.close()
        self.thawed.set()

    async def _serve(self, reader: Any, writer: Any) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)

        async def pump(source: Any, sink: Any) -> None:
            try:
                while data := await source.read(65536):
                    await self.thawed.wait()
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


class BridgeResultsTests(SynchronousTestCase):
    """``get_result`` and the bridge's waiter against the real Redis."""

    def setUp(self) -> None:
        self.prefix = f"quebert-test-{uuid.uuid4().hex}:"
        self.sync = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        try:
            self.sync.ping()
        except redis.RedisError as e:
            self.fail(f"the test Redis at {REDIS_URL} is not reachable: {e}")
        self.addCleanup(self.sync.close)
        self.addCleanup(self._delete_keys)

    def _delete_keys(self) -> None:
        keys = list(self.sync.scan_iter(match=self.prefix + "*", count=500))
        if keys:
            self.sync.delete(*keys)

    def run_bridge(self, step, url: str = REDIS_URL, **options: Any) -> Any:
        """
        ``await step(bridge)`` on a fresh bridge (a fake publisher, a real
        Redis client) made current for ``get_result``, closed afterwards.
        """
        async def main() -> Any:
            state = BridgeState.from_url(url, prefix=self.prefix)
            bridge = Bridge(BridgeSettings.from_mapping({"state_prefix": self.prefix}),
                            publisher=_FakePublisher(), state=state)
            if options:
                bridge._waiter = ResultWaiter(state, **options)
            set_bridge(bridge)
            try:
                return await step(bridge)
            finally:
                set_bridge(None)
                await bridge.close()

        return asyncio.run(asyncio.wait_for(main(), STEP_TIMEOUT))

    def subscribers(self, channel: str) -> int:
        return dict(self.sync.pubsub_numsub(channel))[channel]

    # -- outcomes --------------------------------------------------------------

    def test_channel_is_the_workers(self) -> None:
        """The bridge listens where the Twisted store publishes: prefix and database."""
        from quebert.state.redis import settled_channel_name as workers_name

        async def step(bridge: Bridge) -> str:
            return bridge.state.settled_channel

        self.assertEqual(self.run_bridge(step), workers_name(self.prefix, 9))
        self.assertEqual(settled_channel_name("p:", None), workers_name("p:", None))

    def test_settled_before_and_after_the_wait(self) -> None:
        async def step(bridge: Bridge) -> tuple:
            await started(bridge.state, "early")
            await finished(bridge.state, "early", result={"v": 1})
            early = await get_result("early", timeout=10)
            await started(bridge.state, "late")
            waiting = asyncio.ensure_future(get_result("late", timeout=10))
            await bridge.results.when_subscribed()
            await asyncio.sleep(0.1)
            self.assertFalse(waiting.done())
            await finished(bridge.state, "late", result=[1, 2])
            return early, await waiting

        self.assertEqual(self.run_bridge(step), ({"v": 1}, [1, 2]))

    def test_failed_raises_the_remote_error(self) -> None:
        async def step(bridge: Bridge) -> Any:
            for attempt in (1, 2, 3):
                await started(bridge.state, "f", attempt=attempt)
            waiting = asyncio.ensure_future(get_result("f", timeout=10))
            await bridge.results.when_subscribed()
            await finished(bridge.state, "f", "failed", attempt=3, error=ERROR,
                           reason="the retry budget is spent")
            with self.assertRaises(TaskFailed) as caught:
                await waiting
            return caught.exception

        e = self.run_bridge(step)
        self.assertEqual((e.task_id, e.type, e.message, e.traceback, e.attempts, e.reason),
                         ("f", ERROR["type"], "boom", ERROR["traceback"], 3,
                          "the retry budget is spent"))
        self.assertEqual(e.record["state"], "failed")

    def test_cancel_through_the_bridge_wakes_the_wait(self) -> None:
        """The bridge's own cancel publishes too (ARGV[7] of its writes)."""
        message, _ = protocol.build("app.t", queue="q")

        async def step(bridge: Bridge) -> Any:
            await bridge.state.enqueued(message, "queued", time.time())
            waiting = asyncio.ensure_future(get_result(message.id, timeout=10))
            await bridge.results.when_subscribed()
            await asyncio.sleep(0.1)
            self.assertEqual(await bridge.cancel(message.id, "not needed"), "queued")
            with self.assertRaises(TaskCanceled) as caught:
                await waiting
            return caught.exception, bridge.publisher.controls

        e, controls = self.run_bridge(step)
        self.assertEqual((e.task_id, e.reason), (message.id, "not needed"))
        self.assertEqual(controls, [("cancel", {"id": message.id})])

    def test_unknown_task(self) -> None:
        async def step(bridge: Bridge) -> Any:
            with self.assertRaises(TaskNotFound) as caught:
                await get_result("nobody", timeout=10)
            return caught.exception.task_id, bridge.results.waiting

        self.assertEqual(self.run_bridge(step), ("nobody", 0))

    def test_timeout_says_the_last_state_and_forgets_the_wait(self) -> None:
        async def step(bridge: Bridge) -> Any:
            await started(bridge.state, "slow")
            before = time.monotonic()
            with self.assertRaises(ResultTimeout) as caught:
                await get_result("slow", timeout=0.5)
            took = time.monotonic() - before
            record = await bridge.state.get("slow")
            return caught.exception, took, bridge.results.waiting, record["state"]

        e, took, waiting, state = self.run_bridge(step)
        self.assertEqual((e.task_id, e.timeout, e.state, waiting, state),
                         ("slow", 0.5, "running", 0, "running"))
        self.assertTrue(0.5 <= took < 5, took)

    def test_bad_arguments(self) -> None:
        async def step(bridge: Bridge) -> None:
            for timeout in (-1, float("nan"), True):
                with self.assertRaises(ConfigurationError):
                    await get_result("x", timeout=timeout)
            with self.assertRaises(TypeError):
                await get_result("", timeout=1)

        self.run_bridge(step)

    def test_cancelled_wait_is_forgotten(self) -> None:
        async def step(bridge: Bridge) -> Any:
            await started(bridge.state, "c")
            waiting = asyncio.ensure_future(get_result("c"))
            await bridge.results.when_subscribed()
            await asyncio.sleep(0.1)
            self.assertEqual(bridge.results.waiting, 1)
            waiting.cancel()
            with self.assertRaises(asyncio.CancelledError):
                await waiting
            return bridge.results.waiting, bridge.results._waits

        self.assertEqual(self.run_bridge(step), (0, {}))

    # -- one subscription --------------------------------------------------------

    def test_many_waits_cost_one_subscription(self) -> None:
        count = 10_000
        ids = [f"t{i}" for i in range(count)]
        channel = settled_channel_name(self.prefix, 9)

        async def step(bridge: Bridge) -> Any:
            for n in range(0, count, 500):
                await started(bridge.state, *ids[n:n + 500])
            waits = [asyncio.ensure_future(get_result(t, timeout=60)) for t in ids]
            await bridge.results.when_subscribed()
            await asyncio.sleep(0.5)  # every wait has read its task: running
            self.assertEqual(bridge.results.waiting, count)
            self.assertEqual(self.subscribers(channel), 1)
            began = time.monotonic()
            for n in range(0, count, 20):  # 20 outcomes a batch, one PUBLISH each
                await bridge.state._write([
                    _redis_ops.op_finished(t, "succeeded", 1, INFO, T0 + 1, result=i)
                    for i, t in enumerate(ids[n:n + 20], n)], "finished")
            results = await asyncio.gather(*waits)
            took = time.monotonic() - began
            pool = bridge.state.redis.connection_pool
            connections = len(pool._available_connections) + len(pool._in_use_connections)
            return results, took, connections, self.subscribers(channel)

        results, took, connections, subscribers = self.run_bridge(step)
        self.assertEqual(results, list(range(count)))
        self.assertEqual(subscribers, 1)
        # the subscription, the reads, the writes of this test: not one per wait
        self.assertLessEqual(connections, 4)
        print(f"\n{count} waits answered {took:.2f} s after their tasks began to settle")

    def test_close_ends_the_subscription_and_the_waits(self) -> None:
        channel = settled_channel_name(self.prefix, 9)

        async def step(bridge: Bridge) -> Any:
            await started(bridge.state, "a")
            waiting = asyncio.ensure_future(get_result("a"))
            waiter = bridge.results
            await waiter.when_subscribed()
            self.assertEqual(self.subscribers(channel), 1)
            await bridge.close()
            with self.assertRaises(asyncio.CancelledError):
                await waiting
            with self.assertRaises(ConfigurationError):
                await get_result("a")
            with self.assertRaises(ConfigurationError):
                await waiter.wait("a")
            return self.subscribers(channel)

        self.assertEqual(self.run_bridge(step), 0)

    # -- a lost subscription -------------------------------------------------------

    def _subscription_id(self, waiter: ResultWaiter) -> str:
        """The Redis client id of the waiter's subscription, by its local address."""
        sock = waiter._pubsub.connection._writer.get_extra_info("sockname")
        address = f"{sock[0]}:{sock[1]}"
        [client] = [c for c in self.sync.client_list() if c["addr"] == address]
        return client["id"]

    def test_a_lost_subscription_reads_again_what_it_missed(self) -> None:
        channel = settled_channel_name(self.prefix, 9)

        async def step(bridge: Bridge) -> Any:
            waiter = bridge.results
            await started(bridge.state, "a", "b")
            waiting = asyncio.ensure_future(get_result("a", timeout=30))
            await waiter.when_subscribed()
            await asyncio.sleep(0.1)
            self.assertEqual(waiter.subscriptions, 1)
            self.assertTrue(self.sync.client_kill_filter(_id=self._subscription_id(waiter)))
            # settles while nobody listens: the PUBLISH reaches no one
            self.assertEqual(self.subscribers(channel), 0)
            await finished(bridge.state, "a", result="missed")
            self.assertEqual(await waiting, "missed")
            self.assertEqual(waiter.subscriptions, 2)
            self.assertEqual(self.subscribers(channel), 1)
            # and the new subscription hears what comes next
            waiting = asyncio.ensure_future(get_result("b", timeout=30))
            await asyncio.sleep(0.1)
            await finished(bridge.state, "b", result="after")
            return await waiting

        self.assertEqual(self.run_bridge(step), "after")

    def test_a_silent_server_is_dropped_and_read_again(self) -> None:
        """
        The server stops answering without closing the connection: the
        keepalive PING goes unanswered, the subscription is made again,
        and what settled meanwhile is read.
        """
        host, port = "127.0.0.1", int(REDIS_URL.split(":")[2].split("/")[0])
        prefix = self.prefix

        async def main() -> Any:
            proxy = _FreezableProxy(host, port)
            proxy_port = await proxy.start()
            # the waiter's connections through the proxy, the writes direct
            through = BridgeState.from_url(f"redis://127.0.0.1:{proxy_port}/9", prefix=prefix)
            direct = BridgeState.from_url(REDIS_URL, prefix=prefix)
            waiter = ResultWaiter(through, keepalive=0.3, keepalive_timeout=0.3)
            try:
                await started(direct, "s")
                waiting = asyncio.ensure_future(waiter.result("s", timeout=30))
                await waiter.when_subscribed()
                await asyncio.sleep(0.1)
                proxy.thawed.clear()
                await finished(direct, "s", result="while silent")
                await asyncio.sleep(1.5)
                self.assertFalse(waiting.done())
                self.assertFalse(waiter.subscribed)
                proxy.thawed.set()
                return await waiting, waiter.subscriptions, proxy.connections
            finally:
                await waiter.close()
                await through.close()
                await direct.close()
                await proxy.close()

        result, subscriptions, connections = asyncio.run(
            asyncio.wait_for(main(), STEP_TIMEOUT))
        self.assertEqual(result, "while silent")
        self.assertGreaterEqual(subscriptions, 2)
        self.assertGreaterEqual(connections, 3)  # reads, the first subscription, another

    def test_unreachable_redis_times_out(self) -> None:
        """No Redis at all: the wait ends at its timeout, the state unknown."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]

        async def step(bridge: Bridge) -> Any:
            with self.assertRaises(ResultTimeout) as caught:
                await get_result("a", timeout=1)
            return caught.exception.state, bridge.results.subscribed

        self.assertEqual(self.run_bridge(step, url=f"redis://127.0.0.1:{port}/0"),
                         (None, False))


class BridgeResultsSentinelTests(SynchronousTestCase):
    """Waits through a Sentinel failover (the test set of ``tests/_sentinel.py``)."""

    def setUp(self) -> None:
        from tests import _sentinel

        self.sentinel = _sentinel
        self.url = _sentinel.sentinel_set()
        self.prefix = f"quebert-test-{uuid.uuid4().hex}:"

    def test_waits_survive_a_failover(self) -> None:
        ids = [f"t{i}" for i in range(50)]
        prefix = self.prefix

        async def write(state: BridgeState, task_id: str, n: int) -> None:
            """Record the outcome, trying again while Redis fails over."""
            deadline = time.monotonic() + 60
            while True:
                try:
                    return await finished(state, task_id, result=n)
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)

        async def main() -> Any:
            waiting_store = BridgeState.from_url(self.url, prefix=prefix)
            writer = BridgeState.from_url(self.url, prefix=prefix)
            waiter = ResultWaiter(waiting_store)
            try:
                await started(writer, *ids)
                waits = [asyncio.ensure_future(waiter.result(t, timeout=90)) for t in ids]
                await waiter.when_subscribed()
                await asyncio.sleep(0.2)
                await write(writer, "t0", 0)
                self.assertEqual(await waits[0], 0)
                old = await asyncio.to_thread(self.sentinel.kill_primary)
                # these settle while Redis fails over
                for n, task_id in enumerate(ids[1:25], 1):
                    await write(writer, task_id, n)
                deadline = time.monotonic() + 60
                while await asyncio.to_thread(self.sentinel.primary) == old:
                    self.assertLess(time.monotonic(), deadline, "no new primary")
                    await asyncio.sleep(0.5)
                for n, task_id in enumerate(ids[25:], 25):
                    await write(writer, task_id, n)
                return await asyncio.gather(*waits), waiter.subscriptions
            finally:
                await waiter.close()
                for key in [k async for k in writer.redis.scan_iter(match=prefix + "*")]:
                    await writer.redis.delete(key)
                await waiting_store.close()
                await writer.close()

        self.addCleanup(self.sentinel.restore)
        results, subscriptions = asyncio.run(asyncio.wait_for(main(), 150))
        self.assertEqual(results, list(range(50)))
        self.assertGreaterEqual(subscriptions, 2)
