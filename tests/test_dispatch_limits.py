"""
Tests for quebert.dispatch.limits (QueueLimits, the token bucket) and for
the dispatcher's rate limit, all on a twisted Clock: no real time.
"""

from __future__ import annotations

from treq.testing import RequestTraversalAgent
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from quebert.dispatch import QueueLimits, URLDispatcher, URLRequest
from quebert.dispatch.limits import TokenBucket
from quebert.errors import ConfigurationError


class QueueLimitsTests(SynchronousTestCase):
    def test_defaults_are_unlimited(self):
        limits = QueueLimits()
        self.assertIsNone(limits.max_concurrent_dispatches)
        self.assertIsNone(limits.max_dispatches_per_second)
        self.assertEqual(limits.burst, 1)

    def test_burst_defaults_to_ceil_rate(self):
        self.assertEqual(QueueLimits(max_dispatches_per_second=2.5).burst, 3)
        self.assertEqual(QueueLimits(max_dispatches_per_second=0.1).burst, 1)
        self.assertEqual(QueueLimits(max_dispatches_per_second=5, max_burst_size=20).burst, 20)

    def test_bad_values(self):
        for kwargs in ({"max_concurrent_dispatches": 0},
                       {"max_concurrent_dispatches": 1.5},
                       {"max_concurrent_dispatches": True},
                       {"max_dispatches_per_second": -1},
                       {"max_dispatches_per_second": float("inf")},
                       {"max_dispatches_per_second": "5"},
                       {"max_burst_size": 0}):
            with self.assertRaises(ConfigurationError, msg=kwargs) as caught:
                QueueLimits(**kwargs)
            self.assertIn(next(iter(kwargs)), str(caught.exception))

    def test_from_config(self):
        base = QueueLimits.from_config({"max_dispatches_per_second": 10, "other": 1})
        self.assertEqual(base, QueueLimits(max_dispatches_per_second=10))
        queue = QueueLimits.from_config({"max_concurrent_dispatches": 2.0}, base)
        self.assertEqual(queue, QueueLimits(max_concurrent_dispatches=2,
                                            max_dispatches_per_second=10))


class TokenBucketTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)

    def test_burst_then_rate(self):
        bucket = TokenBucket(self.clock, rate=2, burst=3)
        taken = [bucket.take() for _ in range(5)]
        self.assertEqual([d.called for d in taken], [True] * 3 + [False] * 2)
        self.clock.advance(0.4)
        self.assertFalse(taken[3].called)
        self.clock.advance(0.1)
        self.assertTrue(taken[3].called)
        self.assertFalse(taken[4].called)
        self.clock.advance(0.5)
        self.assertTrue(taken[4].called)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refills_to_burst_only(self):
        bucket = TokenBucket(self.clock, rate=1, burst=2)
        bucket.take()
        bucket.take()
        self.clock.advance(3600)
        self.assertEqual(bucket.tokens, 2)
        taken = [bucket.take() for _ in range(3)]
        self.assertEqual([d.called for d in taken], [True, True, False])

    def test_waiters_served_in_order(self):
        bucket = TokenBucket(self.clock, rate=10, burst=1)
        bucket.take()
        order = []
        for i in range(4):
            bucket.take().addCallback(lambda _, i=i: order.append(i))
        self.clock.pump([0.1] * 4)
        self.assertEqual(order, [0, 1, 2, 3])

    def test_no_timer_while_nobody_waits(self):
        bucket = TokenBucket(self.clock, rate=1, burst=1)
        bucket.take()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_removes_the_waiter(self):
        bucket = TokenBucket(self.clock, rate=1, burst=1)
        bucket.take()
        first, second = bucket.take(), bucket.take()
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.assertEqual(bucket.waiting, 1)
        self.clock.advance(1)
        self.assertTrue(second.called)
        third = bucket.take()
        third.cancel()
        self.failureResultOf(third, defer.CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_take_from_a_callback(self):
        bucket = TokenBucket(self.clock, rate=1, burst=1)
        bucket.take()
        seen = []

        def again(_):
            seen.append("first")
            bucket.take().addCallback(lambda _: seen.append("second"))

        bucket.take().addCallback(again)
        self.clock.advance(1)
        self.assertEqual(seen, ["first"])
        self.clock.advance(1)
        self.assertEqual(seen, ["first", "second"])


class _Answer(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen = 0

    def render(self, request):
        self.seen += 1
        return b"ok"


class DispatcherRateLimitTests(SynchronousTestCase):
    """The dispatcher's token bucket, with treq's in-memory agent and a Clock."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.resource = _Answer()
        self.agent = RequestTraversalAgent(self.resource)
        self.dispatcher = URLDispatcher(
            self.clock, agent=self.agent,
            limits={"slow": QueueLimits(max_dispatches_per_second=2, max_burst_size=1)})

    def dispatch(self, queue="slow"):
        d = self.dispatcher.dispatch(URLRequest("http://target.test/"), queue=queue, deadline=30)
        self.agent.flush()
        return d

    def test_rate(self):
        ds = [self.dispatch() for _ in range(3)]
        self.assertEqual(self.resource.seen, 1)
        self.assertEqual(self.dispatcher.stats()["slow"]["waiting"], 2)
        self.clock.advance(0.5)
        self.agent.flush()
        self.assertEqual(self.resource.seen, 2)
        self.clock.advance(0.5)
        self.agent.flush()
        self.assertEqual(self.resource.seen, 3)
        for d in ds:
            self.assertEqual(self.successResultOf(d).status, 200)
        stats = self.dispatcher.stats()["slow"]
        self.assertEqual((stats["in_flight"], stats["waiting"], stats["tokens"]), (0, 0, 0))
        self.clock.advance(10)
        self.assertEqual(self.dispatcher.stats()["slow"]["tokens"], 1)

    def test_other_queue_has_default_limits(self):
        for _ in range(3):
            self.assertEqual(self.successResultOf(self.dispatch("fast")).status, 200)
        self.assertIsNone(self.dispatcher.stats()["fast"]["tokens"])

    def test_cancel_while_waiting_for_a_token(self):
        first, second, third = self.dispatch(), self.dispatch(), self.dispatch()
        second.cancel()
        self.failureResultOf(second, defer.CancelledError)
        self.assertEqual(self.dispatcher.stats()["slow"]["waiting"], 1)
        self.clock.advance(0.5)
        self.agent.flush()
        self.successResultOf(third)
        self.assertEqual(self.resource.seen, 2)
        self.successResultOf(first)

    def test_waiting_does_not_use_the_deadline(self):
        self.dispatch()
        waiting = self.dispatcher.dispatch(URLRequest("http://target.test/"), queue="slow",
                                           deadline=0.1)
        self.clock.advance(0.5)
        self.agent.flush()
        self.assertEqual(self.successResultOf(waiting).status, 200)

    def test_close_stops_the_timer(self):
        self.dispatch()
        waiting = self.dispatch()
        self.successResultOf(self.dispatcher.close())
        self.failureResultOf(waiting, defer.CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
