"""
The state store's prepared script call (``quebert.state._redis_wire``):
the bytes it writes are txredisapi's, it is taken on a live connection
with the txredisapi installed, and what Redis answers is handled as on
txredisapi's own path.
"""

from __future__ import annotations

import time
from typing import Any, List

import txredisapi
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import DeferredQueue
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from quebert.errors import StateError
from quebert.state import _redis_wire
from quebert.state.redis import RedisStateManager, connect_redis
from tests._redis import isolated_redis, through_freezable_proxy

T0 = 1_700_000_000.0


def info() -> dict:
    return {"task": "tests.noop", "queue": "default"}


class PreparedCallTests(SynchronousTestCase):
    """The prepared call encodes exactly as txredisapi's ``execute_command`` would."""

    head = ["EVALSHA", "a" * 40, "0", "quebert:", "3600000,604800000,604800000", "10"]
    tail = ["3600000", "quebert:settled:0"]

    @given(variable=st.text(), flag=st.booleans())
    def test_same_bytes_as_txredisapi(self, variable: str, flag: bool) -> None:
        call = _redis_wire.PreparedCall(self.head, self.tail)
        protocol = txredisapi.RedisProtocol(charset="utf-8", errors="strict")
        expected = protocol._build_command(*self.head, variable, "1" if flag else "0",
                                           *self.tail)
        self.assertEqual(call.command(variable, flag), expected)


class ConnectedTests(SynchronousTestCase):
    """Only a connected, plain connection of one is written to directly."""

    def test_not_a_txredisapi_handler(self) -> None:
        self.assertIsNone(_redis_wire.connected(object()))

    def test_busy_or_pooled_connections_are_left_to_txredisapi(self) -> None:
        class Protocol:
            connected = 1
            inTransaction = False
            inMulti = False
            pipelining = False
            transport = object()

        class Queue:
            pending: List[Any] = []

        class Factory:
            connectionQueue = Queue()

        class Handler:
            _factory = Factory()

        plain = Protocol()
        Queue.pending = [plain]
        self.assertIs(_redis_wire.connected(Handler()), plain)
        for attribute, value in (("connected", 0), ("inTransaction", True), ("inMulti", True),
                                 ("pipelining", True), ("transport", None)):
            busy = Protocol()
            setattr(busy, attribute, value)
            Queue.pending = [busy]
            self.assertIsNone(_redis_wire.connected(Handler()), attribute)
        Queue.pending = [plain, Protocol()]
        self.assertIsNone(_redis_wire.connected(Handler()), "a pool of two")
        Queue.pending = []
        self.assertIsNone(_redis_wire.connected(Handler()), "not connected yet")


class _Transport:
    def __init__(self) -> None:
        self.written: List[bytes] = []
        self.aborted = 0

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abortConnection(self) -> None:
        self.aborted += 1


class _Protocol:
    def __init__(self, reply_timeout: Any = 30) -> None:
        self.transport = _Transport()
        self.replyQueue = DeferredQueue()
        self.replyTimeout = reply_timeout


class SenderTests(SynchronousTestCase):
    """The prepared calls keep txredisapi's reply timeout, with one timer."""

    def test_answered_calls_leave_no_timer(self) -> None:
        clock, protocol = Clock(), _Protocol()
        sender = _redis_wire.Sender(clock)
        first = sender.send(protocol, b"one")
        second = sender.send(protocol, b"two")
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        protocol.replyQueue.put(1)
        protocol.replyQueue.put(2)
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (1, 2))
        self.assertEqual(protocol.transport.written, [b"one", b"two"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_call_unanswered_for_the_reply_timeout_drops_the_connection(self) -> None:
        clock, protocol = Clock(), _Protocol(reply_timeout=30)
        sender = _redis_wire.Sender(clock)
        first = sender.send(protocol, b"one")
        clock.advance(20)
        sender.send(protocol, b"two")
        protocol.replyQueue.put("answered")
        self.assertEqual(self.successResultOf(first), "answered")
        clock.advance(10)  # the first was answered: the second is not due yet
        self.assertEqual(protocol.transport.aborted, 0)
        clock.advance(20)
        self.assertEqual(protocol.transport.aborted, 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_no_reply_timeout_no_timer(self) -> None:
        clock, protocol = Clock(), _Protocol(reply_timeout=None)
        _redis_wire.Sender(clock).send(protocol, b"one")
        self.assertEqual(clock.getDelayedCalls(), [])


class LiveTests(TestCase):
    """On the real Redis (database 9, a key prefix of the test's own)."""

    async def setUp(self) -> None:
        self.redis, self.prefix = await isolated_redis(self)

    def test_a_live_connection_is_taken(self) -> None:
        """
        With the txredisapi installed, a connection from ``connect_redis`` is
        written to directly: an upgrade that changed what this relies on
        fails here, not silently in production (where it would only be
        slower).
        """
        self.assertIsNotNone(_redis_wire.connected(self.redis))

    def test_no_connection_before_it_is_made(self) -> None:
        handler = connect_redis("redis://127.0.0.1:1/0", connect_timeout=1)
        self.addCleanup(handler.disconnect)
        self.assertIsNone(_redis_wire.connected(handler))

    async def test_batches_take_the_prepared_call(self) -> None:
        """The store's batches are not sent through txredisapi's command path."""
        manager = RedisStateManager(self.redis, prefix=self.prefix)
        scripts: List[str] = []
        run = manager._run
        manager._run = lambda name, *a, **k: (scripts.append(name), run(name, *a, **k))[1]
        await manager.started("a", 1, "w", info(), T0)
        await manager.finished("a", "succeeded", 1, info(), T0 + 1)
        self.assertEqual((await manager.get("a"))["state"], "succeeded")
        self.assertEqual(scripts, ["get"])

    async def test_unknown_script_is_sent_whole(self) -> None:
        """NOSCRIPT (a new or restarted Redis) is answered by EVAL of the source."""
        manager = RedisStateManager(self.redis, prefix=self.prefix)
        manager._apply_call = _redis_wire.PreparedCall(
            ["EVALSHA", "0" * 40, "0", self.prefix, manager._ttl_ms, "10"],
            [manager._tombstone_ms, manager.settled_channel])
        await manager.started("a", 1, "w", info(), T0)
        record = await manager.get("a")
        self.assertEqual((record["state"], record["attempts"]), ("running", 1))

    async def test_error_answers_become_state_errors(self) -> None:
        """An error reply is raised as StateError caused by txredisapi's ResponseError."""
        manager = RedisStateManager(self.redis, prefix=self.prefix)
        await self.redis.set(self.prefix + "idx:state:running", "not a sorted set")
        with self.assertRaises(StateError) as caught:
            await manager.started("a", 1, "w", info(), T0)
        self.assertIsInstance(caught.exception.__cause__, txredisapi.ResponseError)

    async def test_replies_stay_matched_beside_other_commands(self) -> None:
        """Batches and ordinary commands interleaved on the connection each get their own reply."""
        manager = RedisStateManager(self.redis, prefix=self.prefix)
        writes = [manager.enqueued(f"t{i}", "queued", info(), T0 + i) for i in range(3)]
        await deferLater(reactor, 0, lambda: None)  # their batch is written
        echo = self.redis.execute_command("ECHO", "between")
        more = manager.enqueued("t3", "queued", info(), T0 + 3)
        self.assertEqual(await echo, "between")
        for d in writes + [more]:
            await d
        listed = [r["id"] for r in await manager.list()]
        self.assertEqual(sorted(listed), ["t0", "t1", "t2", "t3"])

    async def test_a_hung_server_is_dropped_after_the_reply_timeout(self) -> None:
        """
        Redis stops answering with its socket open (a partition, a frozen
        server): the connection is dropped after txredisapi's reply timeout,
        the write fails with StateError, and once Redis answers again the
        next write goes through a new connection.
        """
        proxy, redis = through_freezable_proxy(self, reply_timeout=1.0)
        manager = RedisStateManager(redis, prefix=self.prefix, timeout=10)
        await manager.enqueued("warm", "queued", info(), T0)
        frozen_at = proxy.freeze()
        with self.assertRaises(StateError):
            await manager.started("a", 1, "w", info(), T0 + 1)
        failed_at = time.time()
        for _ in range(50):  # the proxy sees the close a moment later
            if proxy.closed_by_client(since=frozen_at):
                break
            await deferLater(reactor, 0.1, lambda: None)
        # txredisapi's reconnection, frozen too, may be dropped in its turn
        # by the time this looks: the first close is the one in question.
        closes = proxy.closed_by_client(since=frozen_at)
        self.assertTrue(closes, "the frozen connection was never dropped")
        closed = closes[0]
        self.assertLess(failed_at - frozen_at, 5, "failed with the drop, not the 10 s timeout")
        self.assertLess(closed - frozen_at, 5, "dropped after the reply timeout (1 s)")
        proxy.thaw()
        # not connected yet, or the dropped connection still queued in
        # txredisapi: this write takes txredisapi's path, which waits for
        # the new connection and discards the dead one
        await manager.started("a", 1, "w", info(), T0 + 2)
        self.assertEqual((await manager.get("a"))["state"], "running")
        self.assertIsNotNone(_redis_wire.connected(redis),
                             "later batches take the prepared call again")
