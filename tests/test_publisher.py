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
from tests._rabbit import make_vhost, queue_counts


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
        self.assertEqual(await queue_counts(url, "burst"), (2000, 0))
