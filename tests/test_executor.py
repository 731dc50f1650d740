"""
Tests for quebert.executor: thread-pool and reactor tasks, timeouts.

Thread tests use the real reactor and a real (small) pool with short
tasks; nothing sleeps — blocked threads wait on Events the test sets.
Reactor tests use a Clock.
"""

from __future__ import annotations

import threading

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from quebert.errors import TaskTimeout
from quebert.executor import Executor
from quebert.registry import REACTOR, THREAD, TaskDefinition


def definition(fn, executor=THREAD, name="app.task"):
    return TaskDefinition(name=name, fn=fn, executor=executor)


class Boom(Exception):
    pass


class ThreadTaskTests(TestCase):
    """Plain callables run in the pool, off the reactor thread."""

    timeout = 10

    def setUp(self):
        self.executor = Executor(reactor, max_threads=2)
        self.executor.start()
        self.addCleanup(self.executor.stop)

    @defer.inlineCallbacks
    def test_result_from_a_thread(self):
        main = threading.get_ident()

        def work(x, y=0):
            return (x + y, threading.get_ident())

        value, ident = yield self.executor.run(definition(work), (2,), {"y": 3})
        self.assertEqual(value, 5)
        self.assertNotEqual(ident, main)

    @defer.inlineCallbacks
    def test_error_propagates(self):
        def work():
            raise Boom("in thread")

        error = yield self.assertFailure(self.executor.run(definition(work), (), {}), Boom)
        self.assertEqual(str(error), "in thread")

    @defer.inlineCallbacks
    def test_in_time_with_timeout(self):
        result = yield self.executor.run(definition(lambda: "quick"), (), {}, timeout=5)
        self.assertEqual(result, "quick")
        # the timeout call was cancelled
        pending = [c for c in reactor.getDelayedCalls()
                   if getattr(c.func, "__name__", "") == "expire"]
        self.assertEqual(pending, [])

    @defer.inlineCallbacks
    def test_error_with_timeout(self):
        def work():
            raise Boom()

        yield self.assertFailure(self.executor.run(definition(work), (), {}, timeout=5), Boom)

    @defer.inlineCallbacks
    def test_timeout_fires_while_thread_still_runs(self):
        release = threading.Event()
        finished = threading.Event()
        self.addCleanup(release.set)

        def stuck():
            release.wait(10)
            finished.set()
            return "too late"

        started = reactor.seconds()
        d = self.executor.run(definition(stuck, name="app.stuck"), (), {}, timeout=0.05)
        error = yield self.assertFailure(d, TaskTimeout)
        self.assertLess(reactor.seconds() - started, 5)
        self.assertIn("app.stuck", str(error))
        self.assertIn("0.05", str(error))
        self.assertFalse(finished.is_set())
        # once released, the late result is dropped quietly
        release.set()
        yield deferWhen(finished.is_set)

    @defer.inlineCallbacks
    def test_sync_task_returning_coroutine(self):
        async def coro():
            return 1

        def work():
            return coro()

        error = yield self.assertFailure(
            self.executor.run(definition(work, name="app.wrong"), (), {}), TypeError)
        self.assertIn("app.wrong", str(error))
        self.assertIn("coroutine", str(error))
        self.assertIn("async def", str(error))

    @defer.inlineCallbacks
    def test_sync_task_returning_deferred(self):
        error = yield self.assertFailure(
            self.executor.run(definition(lambda: defer.succeed(1), name="app.d"), (), {}),
            TypeError)
        self.assertIn("executor='reactor'", str(error))

    @defer.inlineCallbacks
    def test_pool_is_bounded(self):
        self.assertEqual(self.executor.pool.max, 2)
        release = threading.Event()
        self.addCleanup(release.set)
        running = []
        lock = threading.Lock()

        def work(i):
            with lock:
                running.append(i)
            release.wait(10)
            return i

        ds = [self.executor.run(definition(work), (i,), {}) for i in range(4)]
        yield deferWhen(lambda: len(running) >= 2)
        self.assertEqual(len(running), 2)
        release.set()
        results = yield defer.gatherResults(ds)
        self.assertEqual(sorted(results), [0, 1, 2, 3])

    @defer.inlineCallbacks
    def test_timeout_clock_starts_when_a_thread_picks_the_task_up(self):
        # A task waiting for a free thread is not timing out: with one busy
        # thread, a queued task with a tiny timeout still succeeds once it runs.
        executor = Executor(reactor, max_threads=1)
        executor.start()
        self.addCleanup(executor.stop)
        release, started = threading.Event(), threading.Event()

        def hog():
            started.set()
            release.wait(5)
            return "hog"

        first = executor.run(definition(hog), (), {})
        yield deferWhen(started.is_set)
        queued = executor.run(definition(lambda: "quick"), (), {}, timeout=0.05)
        waited = defer.Deferred()
        reactor.callLater(0.3, waited.callback, None)
        yield waited
        self.assertFalse(queued.called, "timed out while waiting for a thread")
        release.set()
        self.assertEqual((yield first), "hog")
        self.assertEqual((yield queued), "quick")

    def test_stop_without_join(self):
        executor = Executor(reactor, max_threads=1)
        executor.start()
        executor.stop(join=False)
        self.assertFalse(executor.pool.started)
        executor.stop()  # harmless when stopped


def deferWhen(condition, interval=0.005, limit=5.0):
    """Fire once ``condition()`` is true, polling on the reactor (no sleeping)."""
    d = defer.Deferred()
    deadline = reactor.seconds() + limit

    def check():
        if condition():
            d.callback(None)
        elif reactor.seconds() > deadline:
            d.errback(AssertionError("condition never became true"))
        else:
            reactor.callLater(interval, check)

    check()
    return d


class ReactorTaskTests(SynchronousTestCase):
    """async def / inlineCallbacks / Deferred tasks run on the reactor."""

    def setUp(self):
        self.clock = Clock()
        self.executor = Executor(self.clock)

    def test_async_def(self):
        async def work(x):
            return x * 2

        d = self.executor.run(definition(work, REACTOR), (21,), {})
        self.assertEqual(self.successResultOf(d), 42)

    def test_inline_callbacks(self):
        @defer.inlineCallbacks
        def work(x):
            value = yield defer.succeed(x)
            return value + 1

        d = self.executor.run(definition(work, REACTOR), (1,), {})
        self.assertEqual(self.successResultOf(d), 2)

    def test_plain_value_from_reactor_task(self):
        d = self.executor.run(definition(lambda: "v", REACTOR), (), {})
        self.assertEqual(self.successResultOf(d), "v")

    def test_synchronous_error(self):
        def work():
            raise Boom()

        self.failureResultOf(self.executor.run(definition(work, REACTOR), (), {}), Boom)

    def test_async_error(self):
        async def work():
            raise Boom()

        self.failureResultOf(self.executor.run(definition(work, REACTOR), (), {}), Boom)

    def test_timeout_cancels_the_deferred(self):
        cancelled = []
        inner = defer.Deferred(lambda d: cancelled.append(True))
        d = self.executor.run(definition(lambda: inner, REACTOR, "app.slow"), (), {},
                              timeout=5)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, TaskTimeout)
        self.assertEqual(cancelled, [True])
        self.assertIn("app.slow", str(failure.value))
        self.assertIn("5s", str(failure.value))

    def test_timeout_cancels_a_coroutine(self):
        events = []

        async def work():
            try:
                await defer.Deferred()
            except defer.CancelledError:
                events.append("cancelled")
                raise

        d = self.executor.run(definition(work, REACTOR), (), {}, timeout=2)
        self.clock.advance(2)
        self.failureResultOf(d, TaskTimeout)
        self.assertEqual(events, ["cancelled"])

    def test_in_time_with_timeout(self):
        inner = defer.Deferred()
        d = self.executor.run(definition(lambda: inner, REACTOR), (), {}, timeout=5)
        self.clock.advance(1)
        inner.callback("done")
        self.assertEqual(self.successResultOf(d), "done")
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], [])

    def test_other_errors_are_not_timeouts(self):
        inner = defer.Deferred()
        d = self.executor.run(definition(lambda: inner, REACTOR), (), {}, timeout=5)
        inner.errback(Boom())
        self.failureResultOf(d, Boom)

    def test_no_timeout(self):
        inner = defer.Deferred()
        d = self.executor.run(definition(lambda: inner, REACTOR), (), {})
        self.clock.advance(10**6)
        self.assertNoResult(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        inner.callback(1)
        self.assertEqual(self.successResultOf(d), 1)

    def test_coroutine_that_waits_several_times(self):
        # driven by hand until it first waits, then by Twisted's trampoline
        first, second = defer.Deferred(), defer.Deferred()

        async def work():
            a = await first
            try:
                await second
            except Boom:
                return a + 1
            return -1

        d = self.executor.run(definition(work, REACTOR), (), {})
        self.assertNoResult(d)
        first.callback(1)
        self.assertNoResult(d)
        second.errback(Boom())
        self.assertEqual(self.successResultOf(d), 2)

    def test_coroutine_keeps_one_context_of_its_own(self):
        import contextvars

        var = contextvars.ContextVar("var", default="outside")
        wait = defer.Deferred()
        seen = []

        async def work():
            var.set("inside")
            await wait
            seen.append(var.get())

        d = self.executor.run(definition(work, REACTOR), (), {})
        self.assertEqual(var.get(), "outside")
        wait.callback(None)
        self.successResultOf(d)
        self.assertEqual(seen, ["inside"])
        self.assertEqual(var.get(), "outside")

    def test_cancelling_a_suspended_coroutine(self):
        events = []

        async def work():
            try:
                await defer.Deferred()
            except defer.CancelledError:
                events.append("cancelled")
                raise

        d = self.executor.run(definition(work, REACTOR), (), {})
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(events, ["cancelled"])

    def test_finished_coroutine_arms_no_timer(self):
        async def work():
            return 1

        d = self.executor.run(definition(work, REACTOR), (), {}, timeout=5)
        self.assertEqual(self.successResultOf(d), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
