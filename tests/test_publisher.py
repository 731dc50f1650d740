"""
The publisher under a burst: many publishes waiting for one queue
declaration (or one new channel) on the real RabbitMQ.
"""

from __future__ import annotations

import sys

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from quebert import Client
from quebert._defer import Shared
from tests._rabbit import make_vhost, wait_counts


class SharedTests(SynchronousTestCase):
    def test_waiters_fire_in_a_loop_not_a_recursion(self):
        """Thousands of waiters on one operation do not grow the stack."""
        d = defer.Deferred()
        shared = Shared(d)
        depths = []

        def record(_):
            frame, depth = sys._getframe(), 0
            while frame is not None:
                frame, depth = frame.f_back, depth + 1
            depths.append(depth)

        for _ in range(5000):
            shared.wait().addCallback(record)
        d.callback("ok")
        self.assertEqual(len(depths), 5000)
        self.assertEqual(max(depths), min(depths))

    def test_failure_reaches_every_waiter_and_no_further(self):
        d = defer.Deferred()
        shared = Shared(d)
        waiters = [shared.wait() for _ in range(3)]
        d.errback(ValueError("boom"))
        for waiter in waiters:
            self.failureResultOf(waiter, ValueError)
        self.failureResultOf(shared.wait(), ValueError)  # late waiters too
        self.assertIsNone(self.successResultOf(d))  # consumed: no unhandled error


class BurstTests(TestCase):
    timeout = 120

    async def test_a_burst_to_an_undeclared_queue_is_published(self):
        """
        2000 publishes at once to a queue the client has not declared yet:
        every one is confirmed (a DeferredLock chain used to overflow the
        stack in the middle of a frame, and the broker closed the connection).
        """
        url = make_vhost(self)
        client = Client(url)
        self.addCleanup(client.close)
        await client.whenConnected()
        sent = [client.add_task("app.noop", n, _queue="burst") for n in range(2000)]
        infos = await defer.gatherResults(sent, consumeErrors=True)
        self.assertEqual(len({info.id for info in infos}), 2000)
        await wait_counts(url, "burst", (2000, 0))


class _FakeChannel:
    """Answers every declaration; publishes fail with the scripted errors first."""

    def __init__(self, failures: list) -> None:
        self.failures = failures
        self.is_open = True
        self.published: list = []

    def basic_publish(self, exchange, routing_key, body, properties, mandatory=True):
        if self.failures:
            self.is_open = False
            return defer.fail(self.failures.pop(0))
        self.published.append((exchange, routing_key, body))
        return defer.succeed(None)

    def close(self) -> None:
        self.is_open = False

    def __getattr__(self, name):
        return lambda *args, **kwargs: defer.succeed(None)


class _FakeProtocol:
    def __init__(self, failures: list) -> None:
        self.failures = failures
        self.channels: list = []
        self.is_open = True

    def channel(self):
        channel = _FakeChannel(self.failures)
        self.channels.append(channel)
        return defer.succeed(channel)


class _FakeConnection:
    blocked = False

    def __init__(self, clock, protocol) -> None:
        self.reactor = clock
        self.protocol = protocol

    def add_preparer(self, preparer) -> None:
        self.preparer = preparer

    def whenReady(self, fail_after_failures=None):
        return defer.succeed(self.protocol)


class TransientPublishFailureTests(SynchronousTestCase):
    def test_connection_lost_mid_publish_is_retried(self):
        """
        pika's Twisted adapter fails a pending publish with Twisted's
        ConnectionLost, which is no builtin ConnectionError: it is retried
        on the next channel all the same, never handed to the caller.
        """
        from twisted.internet.error import ConnectionDone, ConnectionLost
        from twisted.internet.task import Clock

        from quebert.amqp.publisher import Publisher, properties
        from quebert.amqp.topology import Topology

        clock = Clock()
        protocol = _FakeProtocol([ConnectionLost("gone"), ConnectionDone("closed")])
        connection = _FakeConnection(clock, protocol)
        publisher = Publisher(connection, Topology(), clock=clock)
        self.successResultOf(connection.preparer(protocol))
        d = publisher.publish("quebert", "q", b"{}", properties("t1", {}))
        for _ in range(10):
            clock.advance(1)
        self.successResultOf(d)
        published = [p for channel in protocol.channels for p in channel.published]
        self.assertEqual(published, [("quebert", "q", b"{}")])

    def test_channel_that_never_opens_does_not_hold_publishes_forever(self):
        """
        pika never answers a channel opened on a connection that dies
        meanwhile: the publisher gives that opening up after a while (it
        is not cancelled) and opens another, so the publish goes through.
        """
        from twisted.internet.error import ConnectionLost
        from twisted.internet.task import Clock

        from quebert.amqp.publisher import ANSWER_TIMEOUT, Publisher, properties
        from quebert.amqp.topology import Topology

        class HangingOnce(_FakeProtocol):
            hung = 0

            def channel(self):
                if len(self.channels) == 2 and not self.hung:
                    self.hung += 1
                    return defer.Deferred()  # never answered
                return super().channel()

        clock = Clock()
        protocol = HangingOnce([ConnectionLost("gone")])
        connection = _FakeConnection(clock, protocol)
        publisher = Publisher(connection, Topology(), clock=clock)
        self.successResultOf(connection.preparer(protocol))
        d = publisher.publish("quebert", "q", b"{}", properties("t1", {}))
        clock.advance(1)
        self.assertNoResult(d)  # waiting for the channel that never opens
        for _ in range(int(ANSWER_TIMEOUT) + 5):
            clock.advance(1)
        self.successResultOf(d)
        self.assertEqual(protocol.hung, 1)
