"""
Tests for quebert.mediator, through quebert.testing.StubWorker: the real
mediator on an in-memory broker, an inline executor and the memory state
store, all driven by a twisted Clock.
"""

from __future__ import annotations

import json

from twisted.internet import defer, task
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from quebert import protocol
from quebert.errors import TaskTimeout
from quebert.mediator import DelayOnErrorMediator, Hook, Mediator, QueueSettings
from quebert.protocol import (
    H_ATTEMPTS,
    H_ERROR_MESSAGE,
    H_ERROR_TYPE,
    H_NOT_BEFORE,
    H_PARKED,
    H_QUEUE,
    H_REASON,
)
from quebert.registry import REACTOR, Registry
from quebert.retry import RetryPolicy
from quebert.state.memory import MemoryStateManager
from quebert.testing import InlineExecutor, StubMessage, StubWorker

#: A realistic epoch, so that no timestamp is ever 0.
T0 = 1_700_000_000.0


class Boom(Exception):
    pass


class MediatorTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.registry = Registry()

    def worker(self, **kwargs) -> StubWorker:
        kwargs.setdefault("registry", self.registry)
        return StubWorker(self.clock, **kwargs)

    def register(self, fn, name, **options):
        self.registry.register(fn, name, **options)
        return name

    def queue(self, name="default", **retry):
        return QueueSettings(name=name, retry=RetryPolicy(**retry))

    def register_controlled(self, name, **options):
        """
        A reactor task whose runs wait on Deferreds the test fires; returns
        the list those Deferreds are appended to.
        """
        pending = []

        def controlled():
            d = defer.Deferred()
            pending.append(d)
            return d

        self.register(controlled, name, executor=REACTOR, **options)
        return pending

    @staticmethod
    def end_attempt(d, outcome):
        """Fire a controlled run's Deferred; return the state it leads to."""
        if outcome == "ok":
            d.callback("done")
            return "succeeded"
        d.errback(Failure(Boom()))
        return "scheduled"

    def advance_by(self, seconds, step=0.5):
        """Advance the clock in steps (bounded, even if something loops)."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            self.clock.advance(min(step, end - self.clock.seconds()))

    def restart(self, worker, max_running_tasks=100, mediator_class=DelayOnErrorMediator):
        """
        A new mediator (a restarted worker process) consuming the same
        broker and state; the old one never hears from the broker again.
        """
        settings = list(worker.mediator.queues.values())
        mediator = mediator_class(
            broker=worker.broker, state=worker.state, executor=InlineExecutor(self.clock),
            clock=self.clock, queues=settings, registry=self.registry,
            max_running_tasks=max_running_tasks, worker_id="stub-worker-2",
        )
        mediator.start()
        worker.mediator = mediator
        return mediator


class SuccessTests(MediatorTestCase):
    """The happy path."""

    def test_success_records_result_and_acks(self):
        calls = []

        def add(x, y):
            calls.append((x, y, self.clock.seconds()))
            return {"sum": x + y}

        name = self.register(add, "app.add")
        worker = self.worker()
        task_id = worker.enqueue(name, 2, y=3)
        self.assertEqual(calls, [(2, 3, T0)])
        record = worker.state_of(task_id)
        self.assertEqual(record["state"], "succeeded")
        self.assertEqual(record["result"], {"sum": 5})
        self.assertEqual(record["attempts"], 1)
        self.assertEqual(record["task"], "app.add")
        self.assertEqual(record["queue"], "default")
        self.assertEqual(record["worker"], "stub-worker")
        self.assertEqual(record["finished_at"], T0)
        self.assertIsNone(record["error"])
        self.assertTrue(worker.broker.idle())
        self.assertEqual(dict(worker.broker.errored), {})
        self.assertEqual(worker.mediator.counts["succeeded"], 1)
        self.assertEqual(worker.mediator.running, {})

    def test_reactor_task_result(self):
        async def fetch(value):
            await task.deferLater(self.clock, 2, lambda: None)
            return value * 2

        name = self.register(fetch, "app.fetch")
        worker = self.worker()
        task_id = worker.enqueue(name, 21)
        self.assertEqual(worker.state_of(task_id)["state"], "running")
        self.assertFalse(worker.broker.idle())
        self.clock.advance(2)
        record = worker.state_of(task_id)
        self.assertEqual((record["state"], record["result"]), ("succeeded", 42))
        self.assertEqual(record["finished_at"], T0 + 2)
        self.assertTrue(worker.broker.idle())

    def test_non_json_result_fails_the_task_for_good_saying_why(self):
        calls = []
        name = self.register(lambda: calls.append(1) or {1, 2}, "app.set")
        worker = self.worker()
        record = worker.state_of(worker.enqueue(name))
        self.assertEqual(record["state"], "failed")
        self.assertEqual(len(calls), 1)  # not retried: it would return a set again
        self.assertIsNone(record["result"])
        self.assertEqual(record["error"]["type"], "quebert.errors.InvalidResult")
        self.assertIn("returned a set, which is not JSON", record["reason"])

    def test_nan_result_is_not_json(self):
        name = self.register(lambda: float("nan"), "app.nan")
        worker = self.worker()
        record = worker.state_of(worker.enqueue(name))
        self.assertEqual(record["state"], "failed")
        self.assertIn("returned a float, which is not JSON", record["reason"])

    def test_result_over_the_size_limit_fails_saying_so(self):
        name = self.register(lambda n: "x" * n, "app.big")
        worker = self.worker()
        worker.mediator.max_result_size = 100
        small = worker.state_of(worker.enqueue(name, 98))  # 100 bytes with its quotes
        self.assertEqual((small["state"], small["result"]), ("succeeded", "x" * 98))
        big = worker.state_of(worker.enqueue(name, 99))
        self.assertEqual(big["state"], "failed")
        self.assertIn("returned 101 bytes of JSON, more than the worker's max_result_size "
                      "(100 bytes)", big["reason"])

    def test_no_size_limit_with_zero(self):
        name = self.register(lambda n: "x" * n, "app.big0")
        worker = self.worker()
        worker.mediator.max_result_size = 0
        self.assertEqual(worker.state_of(worker.enqueue(name, 5000))["state"], "succeeded")

    def test_guillotina_body_runs(self):
        calls = []
        name = self.register(lambda *args, **kwargs: calls.append((args, kwargs)), "g.func")
        worker = self.worker()
        body = json.dumps({"func": name, "args": [1], "kwargs": {"a": 2}, "db_id": "db",
                           "container_id": "c", "req_data": {}, "task_id": "g-1"}).encode()
        worker.broker.publish_raw("default", body, content_type=None)
        self.assertEqual(calls, [((1,), {"a": 2})])
        self.assertEqual(worker.state_of("g-1")["state"], "succeeded")


class HookTests(MediatorTestCase):
    """Before/after/error hooks: order, Deferreds, skipping, errors."""

    def make(self, events, hooks=(), fail=False):
        class Recording(DelayOnErrorMediator):
            def before_task(self, task):
                events.append("mediator.before")

            def after_task(self, task, result):
                events.append("mediator.after")

            def task_failed(self, task, failure):
                events.append("mediator.error")

        def fn():
            events.append("task")
            if fail:
                raise Boom("no")
            return "ok"

        name = self.register(fn, "app.fn", max_attempts=1)
        return self.worker(mediator_class=Recording, hooks=hooks), name

    def recording_hook(self, label, events):
        class Recording(Hook):
            def before(self, task):
                events.append(f"{label}.before")

            def after(self, task, result):
                events.append(f"{label}.after")

            def error(self, task, failure):
                events.append(f"{label}.error:{failure.type.__name__}")

        return Recording()

    def test_order_on_success(self):
        events = []
        hooks = [self.recording_hook("h1", events), self.recording_hook("h2", events)]
        worker, name = self.make(events, hooks)
        worker.enqueue(name)
        self.assertEqual(events, ["mediator.before", "h1.before", "h2.before", "task",
                                  "h2.after", "h1.after", "mediator.after"])

    def test_order_on_failure(self):
        events = []
        hooks = [self.recording_hook("h1", events), self.recording_hook("h2", events)]
        worker, name = self.make(events, hooks, fail=True)
        worker.enqueue(name)
        self.assertEqual(events, ["mediator.before", "h1.before", "h2.before", "task",
                                  "h2.error:Boom", "h1.error:Boom", "mediator.error"])

    def test_base_hook_is_a_no_op(self):
        events = []
        worker, name = self.make(events, [Hook()])
        task_id = worker.enqueue(name)
        self.assertEqual(worker.state_of(task_id)["state"], "succeeded")

    def test_hooks_see_the_task(self):
        seen = []

        class Looking(Hook):
            def before(self, task):
                seen.append((task.id, task.name, task.queue, task.args, task.kwargs,
                             task.attempt, task.started_at))
                task.scratch["mark"] = 1

            def after(self, task, result):
                seen.append((result, task.scratch["mark"]))

        name = self.register(lambda x, y=0: x + y, "app.sum")
        worker = self.worker(hooks=[Looking()])
        task_id = worker.enqueue(name, 1, y=2)
        self.assertEqual(seen, [(task_id, "app.sum", "default", (1,), {"y": 2}, 1, T0),
                                (3, 1)])

    def test_scratch_is_shared_by_the_hooks_and_methods_of_one_attempt(self):
        """
        ``Task.scratch`` is one dict per attempt, for the hooks and mediator
        methods around it; the producer's context is not in it.
        """
        seen = []

        class Timing(Hook):
            def before(self, task):
                task.scratch["began"] = task.attempt

            def error(self, task, failure):
                seen.append(("error", dict(task.scratch)))

        class Recording(DelayOnErrorMediator):
            def after_task(self, task, result):
                seen.append(("after", dict(task.scratch), dict(task.message.context)))

        attempts = []

        def flaky():
            attempts.append(1)
            if len(attempts) == 1:
                raise Boom()

        name = self.register(flaky, "app.flaky", max_attempts=2, min_backoff=1)
        worker = self.worker(hooks=[Timing()], mediator_class=Recording)
        worker.enqueue(name, _context={"user_id": "bob"})
        self.advance_by(2)
        self.assertEqual(seen, [("error", {"began": 1}),
                                ("after", {"began": 2}, {"user_id": "bob"})])

    def test_context_is_a_deprecated_alias_of_scratch(self):
        """
        Hooks written for ``task.context`` (the scratch dict's name in
        0.1.0) keep working on the same dict, each use warned of as a
        ``DeprecationWarning`` pointing at the hook's line.
        """
        seen, tasks = [], []

        class OldStyle(Hook):
            def before(self, task):
                task.context["mark"] = 1

            def after(self, task, result):
                seen.append((task.context["mark"], dict(task.scratch)))
                tasks.append(task)

        name = self.register(lambda: None, "app.t")
        worker = self.worker(hooks=[OldStyle()])
        task_id = worker.enqueue(name)
        self.assertEqual(worker.state_of(task_id)["state"], "succeeded")
        self.assertEqual(seen, [(1, {"mark": 1})])
        warned = self.flushWarnings([OldStyle.before, OldStyle.after])
        self.assertEqual([w["category"] for w in warned], [DeprecationWarning] * 2)
        self.assertIn("use Task.scratch", warned[0]["message"])

        task = tasks[0]
        message = warned[0]["message"]
        self.assertIs(self.assertWarns(DeprecationWarning, message, __file__,
                                       lambda: task.context), task.scratch)
        replaced = {"new": True}

        def assign():
            task.context = replaced

        self.assertWarns(DeprecationWarning, message, __file__, assign)
        self.assertIs(task.scratch, replaced)

    def test_hooks_returning_deferreds_are_waited_for(self):
        events = []
        clock = self.clock

        class Slow(Hook):
            def before(self, t):
                return task.deferLater(clock, 5, events.append, "before done")

            def after(self, t, result):
                return task.deferLater(clock, 3, events.append, "after done")
        name = self.register(lambda: events.append(("task", clock.seconds())), "app.t")
        worker = self.worker(hooks=[Slow()])
        task_id = worker.enqueue(name)
        self.assertEqual(events, [])
        self.clock.advance(4.9)
        self.assertEqual(events, [])
        self.clock.advance(0.1)
        self.assertEqual(events, ["before done", ("task", T0 + 5)])
        self.assertEqual(worker.state_of(task_id)["state"], "running")
        self.assertFalse(worker.broker.idle())
        self.clock.advance(3)
        self.assertEqual(events[-1], "after done")
        self.assertEqual(worker.state_of(task_id)["state"], "succeeded")
        self.assertTrue(worker.broker.idle())

    def test_error_hook_deferred_delays_the_outcome(self):
        clock = self.clock

        class SlowError(Hook):
            def error(self, t, failure):
                return task.deferLater(clock, 7, lambda: None)

        def fails():
            raise Boom()

        name = self.register(fails, "app.fails", max_attempts=1)
        worker = self.worker(hooks=[SlowError()])
        worker.enqueue(name)
        self.assertEqual(worker.broker.errored["default"], [])
        self.clock.advance(7)
        self.assertEqual(len(worker.broker.errored["default"]), 1)

    def test_before_hook_false_skips(self):
        calls = []

        class Veto(Hook):
            def before(self, task):
                return defer.succeed(False)

        name = self.register(lambda: calls.append(1), "app.t")
        worker = self.worker(hooks=[Veto()])
        task_id = worker.enqueue(name)
        self.assertEqual(calls, [])
        record = worker.state_of(task_id)
        self.assertEqual(record["state"], "canceled")
        self.assertEqual(record["attempts"], 0)
        self.assertIn("before-hook", record["reason"])
        self.assertTrue(worker.broker.idle())
        self.assertEqual(dict(worker.broker.errored), {})
        self.assertEqual(worker.mediator.counts["skipped"], 1)

    def test_mediator_before_task_false_skips_later_hooks(self):
        events = []

        class Veto(DelayOnErrorMediator):
            def before_task(self, task):
                return False

        name = self.register(lambda: events.append("task"), "app.t")
        worker = self.worker(mediator_class=Veto, hooks=[self.recording_hook("h", events)])
        task_id = worker.enqueue(name)
        self.assertEqual(events, [])
        self.assertEqual(worker.state_of(task_id)["state"], "canceled")

    def test_falsy_but_not_false_does_not_skip(self):
        class Nothing(Hook):
            def before(self, task):
                return 0

        name = self.register(lambda: "ran", "app.t")
        worker = self.worker(hooks=[Nothing()])
        self.assertEqual(worker.state_of(worker.enqueue(name))["result"], "ran")

    def test_raising_hooks_are_logged_and_ignored(self):
        class Broken(Hook):
            def before(self, task):
                raise Boom("before")

            def after(self, task, result):
                return defer.fail(Boom("after"))

        name = self.register(lambda: "ok", "app.t")
        worker = self.worker(hooks=[Broken()])
        first = worker.enqueue(name)
        second = worker.enqueue(name)
        self.assertEqual(worker.state_of(first)["state"], "succeeded")
        self.assertEqual(worker.state_of(second)["state"], "succeeded")
        self.assertTrue(worker.broker.idle())
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 4)

    def test_raising_error_hook_still_retries(self):
        class Broken(Hook):
            def error(self, task, failure):
                raise Boom("error hook")

        def fails():
            raise ValueError("task")

        name = self.register(fails, "app.t", max_attempts=2, min_backoff=1)
        worker = self.worker(hooks=[Broken()])
        task_id = worker.enqueue(name)
        self.assertEqual(worker.state_of(task_id)["state"], "scheduled")
        self.clock.advance(1)
        self.assertEqual(worker.state_of(task_id)["state"], "failed")
        self.assertEqual(len(worker.broker.errored["default"]), 1)
        self.assertEqual(len(self.flushLoggedErrors(Boom)), 2)


class RetryTests(MediatorTestCase):
    """Failed attempts are retried through broker delays with the Cloud Tasks backoff."""

    def flaky(self, failures, times):
        def fn():
            times.append(self.clock.seconds())
            if len(times) <= failures:
                raise Boom(f"failure {len(times)}")
            return "done"

        return fn

    def test_retry_then_success_with_exact_delays(self):
        times = []
        name = self.register(self.flaky(3, times), "app.flaky")
        worker = self.worker(queues=[self.queue(max_attempts=10, min_backoff=1,
                                                max_backoff=100)])
        task_id = worker.enqueue(name)
        record = worker.state_of(task_id)
        self.assertEqual(record["state"], "scheduled")
        self.assertEqual(record["eta"], T0 + 1)
        self.assertEqual(record["error"]["type"], "tests.test_mediator.Boom")
        worker.run_until_idle()
        self.assertEqual(times, [T0, T0 + 1, T0 + 3, T0 + 7])
        record = worker.state_of(task_id)
        self.assertEqual(record["state"], "succeeded")
        self.assertEqual(record["result"], "done")
        self.assertEqual(record["attempts"], 4)
        history = record["history"]
        self.assertEqual([h["attempt"] for h in history], [1, 2, 3, 4])
        self.assertEqual([h["state"] for h in history],
                         ["scheduled", "scheduled", "scheduled", "succeeded"])
        self.assertEqual([h["started_at"] for h in history], times)
        self.assertEqual([h["retry_at"] for h in history[:3]], [T0 + 1, T0 + 3, T0 + 7])
        self.assertEqual(history[0]["error"]["message"], "failure 1")
        self.assertEqual(worker.mediator.counts["retried"], 3)
        self.assertEqual(dict(worker.broker.errored), {})

    def test_delays_follow_doublings_and_cap(self):
        times = []
        name = self.register(self.flaky(100, times), "app.flaky")
        worker = self.worker(queues=[self.queue(max_attempts=8, min_backoff=10,
                                                max_backoff=300, max_doublings=3)])
        worker.enqueue(name)
        worker.run_until_idle()
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.assertEqual(gaps, [10, 20, 40, 80, 160, 240, 300])

    def test_retry_headers(self):
        times = []
        name = self.register(self.flaky(1, times), "app.flaky")
        worker = self.worker(queues=[self.queue(min_backoff=1)])
        task_id = worker.enqueue(name)
        queue, message, delay = worker.broker.published[-1]
        self.assertEqual((queue, delay), ("default", 1.0))
        self.assertEqual(message.message_id, task_id)
        self.assertEqual(message.headers[H_ATTEMPTS], 1)
        self.assertEqual(message.headers[protocol.H_FIRST_ATTEMPT], protocol.to_ms(T0))
        self.assertEqual(message.headers[H_ERROR_TYPE], "tests.test_mediator.Boom")
        self.assertEqual(message.headers[H_ERROR_MESSAGE], "failure 1")
        self.assertEqual(message.headers[H_QUEUE], "default")

    def test_attempts_spent_goes_to_errored(self):
        times = []
        name = self.register(self.flaky(100, times), "app.flaky")
        worker = self.worker(queues=[self.queue(max_attempts=3, min_backoff=1)])
        task_id = worker.enqueue(name)
        worker.run_until_idle()
        self.assertEqual(len(times), 3)
        errored = worker.broker.errored["default"]
        self.assertEqual(len(errored), 1)
        headers = errored[0].headers
        self.assertEqual(headers[H_ERROR_TYPE], "tests.test_mediator.Boom")
        self.assertEqual(headers[H_ERROR_MESSAGE], "failure 3")
        self.assertEqual(headers[H_ATTEMPTS], 3)
        self.assertIn("3 attempts", headers[H_REASON])
        self.assertEqual(errored[0].message_id, task_id)
        self.assertEqual(json.loads(errored[0].body)["id"], task_id)
        record = worker.state_of(task_id)
        self.assertEqual(record["state"], "failed")
        self.assertEqual(record["attempts"], 3)
        self.assertEqual(record["error"]["type"], "tests.test_mediator.Boom")
        self.assertEqual(record["error"]["message"], "failure 3")
        self.assertIn("Boom", record["error"]["traceback"])
        self.assertIn("failure 3", record["error"]["traceback"])
        self.assertTrue(record["reason"])
        self.assertTrue(worker.broker.idle())
        self.assertEqual(worker.mediator.counts["failed"], 1)

    def test_base_mediator_errors_at_first_failure(self):
        times = []
        name = self.register(self.flaky(100, times), "app.flaky")
        worker = self.worker(mediator_class=Mediator,
                             queues=[self.queue(max_attempts=10)])
        task_id = worker.enqueue(name)
        self.assertEqual(times, [T0])
        self.assertEqual(len(worker.broker.errored["default"]), 1)
        self.assertEqual(worker.state_of(task_id)["state"], "failed")
        self.assertTrue(worker.broker.idle())

    def test_task_options_beat_queue_defaults(self):
        times = []
        name = self.register(self.flaky(100, times), "app.flaky", max_attempts=2,
                             min_backoff=5)
        worker = self.worker(queues=[self.queue(max_attempts=10, min_backoff=1)])
        worker.enqueue(name)
        worker.run_until_idle()
        self.assertEqual(times, [T0, T0 + 5])

    def test_message_options_beat_task_options(self):
        times = []
        name = self.register(self.flaky(100, times), "app.flaky", max_attempts=2,
                             min_backoff=5)
        worker = self.worker(queues=[self.queue(max_attempts=10, min_backoff=1)])
        worker.enqueue(name, _retry={"max_attempts": 3, "min_backoff": 2})
        worker.run_until_idle()
        self.assertEqual(times, [T0, T0 + 2, T0 + 6])

    def test_bad_message_retry_options_fall_back_to_queue_defaults(self):
        """A message override no RetryPolicy accepts does not stop the task."""
        times = []
        name = self.register(self.flaky(100, times), "app.flaky")
        worker = self.worker(queues=[self.queue(max_attempts=2, min_backoff=1,
                                                max_backoff=10)])
        worker.enqueue(name, _retry={"min_backoff": 50})  # > max_backoff
        worker.run_until_idle()
        self.assertEqual(times, [T0, T0 + 1])

    def test_unlimited_attempts_with_duration_limit(self):
        """-1 attempts never run out: retries go on after the duration."""
        times = []
        name = self.register(self.flaky(6, times), "app.flaky")
        worker = self.worker(queues=[self.queue(max_attempts=-1, max_retry_duration=2,
                                                min_backoff=1, max_backoff=1)])
        task_id = worker.enqueue(name)
        worker.run_until_idle()
        self.assertEqual(len(times), 7)
        self.assertEqual(worker.state_of(task_id)["state"], "succeeded")

    def test_duration_keeps_retrying_after_attempts_are_spent(self):
        times = []
        name = self.register(self.flaky(100, times), "app.flaky")
        worker = self.worker(queues=[self.queue(max_attempts=1, max_retry_duration=5,
                                                min_backoff=2, max_backoff=2)])
        task_id = worker.enqueue(name)
        worker.run_until_idle()
        # failures at +0, +2 and +4 are within 5 s of the first attempt; +6 is not
        self.assertEqual(times, [T0, T0 + 2, T0 + 4, T0 + 6])
        self.assertEqual(worker.state_of(task_id)["state"], "failed")

    def test_attempts_keep_retrying_after_duration_is_spent(self):
        times = []
        name = self.register(self.flaky(100, times), "app.flaky")
        worker = self.worker(queues=[self.queue(max_attempts=4, max_retry_duration=1,
                                                min_backoff=3, max_backoff=3)])
        worker.enqueue(name)
        worker.run_until_idle()
        self.assertEqual(times, [T0, T0 + 3, T0 + 6, T0 + 9])

    def test_first_attempt_time_survives_retries(self):
        times = []
        name = self.register(self.flaky(100, times), "app.flaky")
        worker = self.worker(queues=[self.queue(min_backoff=1, max_attempts=3)])
        worker.enqueue(name)
        worker.run_until_idle()
        firsts = [m.headers.get(protocol.H_FIRST_ATTEMPT)
                  for _, m, _ in worker.broker.published[1:]]
        self.assertEqual(firsts, [protocol.to_ms(T0)] * 2)

    def test_jitter_shortens_delays(self):
        times = []
        name = self.register(self.flaky(1, times), "app.flaky")
        worker = self.worker(queues=[self.queue(min_backoff=10, max_backoff=10,
                                                jitter=0.5)])
        worker.enqueue(name)
        delay = worker.broker.published[-1][2]
        self.assertGreater(delay, 5)
        self.assertLessEqual(delay, 10)


class CountdownTests(MediatorTestCase):
    """Countdown/ETA and early arrivals."""

    def test_countdown_not_run_before_its_time(self):
        times = []
        name = self.register(lambda: times.append(self.clock.seconds()), "app.t")
        worker = self.worker()
        task_id = worker.enqueue(name, _countdown=30)
        self.clock.advance(29.9)
        self.assertEqual(times, [])
        self.clock.advance(0.1)
        self.assertEqual(times, [T0 + 30])
        self.assertEqual(worker.state_of(task_id)["state"], "succeeded")

    def test_early_message_is_delayed_again(self):
        """A message arriving more than 1 s early goes back to the broker."""
        times = []
        name = self.register(lambda: times.append(self.clock.seconds()), "app.t")
        worker = self.worker()
        message, body = protocol.build(name, queue="default", task_id="early-1")
        worker.broker.publish_raw(
            "default", body, message_id="early-1",
            headers={H_ATTEMPTS: 0, H_NOT_BEFORE: protocol.to_ms(T0 + 10), "x-death": [1]})
        self.assertEqual(times, [])
        queue, republished, delay = worker.broker.published[-1]
        self.assertEqual((queue, delay), ("default", 10.0))
        self.assertEqual(republished.headers[H_NOT_BEFORE], protocol.to_ms(T0 + 10))
        self.assertNotIn("x-death", republished.headers)
        self.assertEqual(worker.broker.unacked["default"], [])
        worker.run_until_idle()
        self.assertEqual(times, [T0 + 10])

    def test_eta_in_body_is_respected(self):
        times = []
        name = self.register(lambda: times.append(self.clock.seconds()), "app.t")
        worker = self.worker()
        _, body = protocol.build(name, queue="default", eta=T0 + 100)
        worker.broker.publish_raw("default", body)
        self.assertEqual(times, [])
        worker.run_until_idle()
        self.assertEqual(times, [T0 + 100])

    def test_slightly_early_message_runs_at_once(self):
        times = []
        name = self.register(lambda: times.append(self.clock.seconds()), "app.t")
        worker = self.worker()
        _, body = protocol.build(name, queue="default")
        worker.broker.publish_raw("default", body,
                                  headers={H_NOT_BEFORE: protocol.to_ms(T0 + 0.5)})
        self.assertEqual(times, [T0])

    def test_late_message_runs_at_once(self):
        times = []
        name = self.register(lambda: times.append(self.clock.seconds()), "app.t")
        worker = self.worker()
        _, body = protocol.build(name, queue="default", eta=T0 - 3600)
        worker.broker.publish_raw("default", body)
        self.assertEqual(times, [T0])


class TimeoutTests(MediatorTestCase):
    """Per-attempt timeouts."""

    def test_reactor_task_timeout_is_retried(self):
        started = []
        cancelled = []

        def hangs():
            started.append(self.clock.seconds())
            return defer.Deferred(lambda d: cancelled.append(self.clock.seconds()))

        name = self.register(hangs, "app.hangs", executor=REACTOR, timeout=5,
                             max_attempts=2, min_backoff=1)
        worker = self.worker()
        task_id = worker.enqueue(name)
        self.clock.advance(4.9)
        self.assertEqual(worker.state_of(task_id)["state"], "running")
        self.clock.advance(0.1)
        self.assertEqual(cancelled, [T0 + 5])
        record = worker.state_of(task_id)
        self.assertEqual(record["state"], "scheduled")
        self.assertEqual(record["error"]["type"], "quebert.errors.TaskTimeout")
        self.clock.advance(1)
        self.assertEqual(started, [T0, T0 + 6])
        self.clock.advance(5)
        self.assertEqual(cancelled, [T0 + 5, T0 + 11])
        record = worker.state_of(task_id)
        self.assertEqual(record["state"], "failed")
        self.assertEqual(record["error"]["type"], "quebert.errors.TaskTimeout")
        errored = worker.broker.errored["default"]
        self.assertEqual(errored[0].headers[H_ERROR_TYPE], "quebert.errors.TaskTimeout")
        self.assertTrue(worker.broker.idle())

    def test_message_timeout_beats_task_and_queue(self):
        cancelled = []

        def hangs():
            return defer.Deferred(lambda d: cancelled.append(self.clock.seconds()))

        name = self.register(hangs, "app.hangs", executor=REACTOR, timeout=50,
                             max_attempts=1)
        worker = self.worker(queues=[QueueSettings(name="default", timeout=100)])
        worker.enqueue(name, _timeout=3)
        self.clock.advance(3)
        self.assertEqual(cancelled, [T0 + 3])

    def test_queue_timeout_applies(self):
        cancelled = []

        def hangs():
            return defer.Deferred(lambda d: cancelled.append(self.clock.seconds()))

        name = self.register(hangs, "app.hangs", executor=REACTOR, max_attempts=1)
        worker = self.worker(queues=[QueueSettings(name="default", timeout=8)])
        worker.enqueue(name)
        self.clock.advance(8)
        self.assertEqual(cancelled, [T0 + 8])

    def test_task_timeout_is_transient(self):
        self.assertTrue(TaskTimeout.transient)


class RejectTests(MediatorTestCase):
    """Messages that can never run go to the errored queue; the worker goes on."""

    def setUp(self):
        super().setUp()
        self.calls = []
        self.good = self.register(lambda x, y: self.calls.append((x, y)), "app.good")
        self.w = self.worker()

    def assertRejected(self, field_text, task_id=None):
        errored = self.w.broker.errored["default"]
        self.assertEqual(len(errored), 1)
        headers = errored[0].headers
        self.assertIn(field_text, headers[H_REASON])
        self.assertTrue(headers[H_ERROR_TYPE].startswith("quebert.errors."))
        self.assertEqual(headers[H_QUEUE], "default")
        if task_id is not None:
            record = self.w.state_of(task_id)
            self.assertEqual(record["state"], "failed")
            self.assertIn(field_text, record["reason"])
            self.assertEqual(record["error"]["type"], headers[H_ERROR_TYPE])
        # the worker keeps going
        self.w.enqueue(self.good, 1, 2)
        self.assertEqual(self.calls, [(1, 2)])
        self.assertTrue(self.w.broker.idle())
        self.assertEqual(self.w.mediator.counts["rejected"], 1)
        return errored[0]

    def test_unknown_task(self):
        task_id = self.w.enqueue("app.unknown", 1)
        message = self.assertRejected("app.unknown", task_id)
        self.assertEqual(message.headers[H_ERROR_TYPE], "quebert.errors.UnknownTask")

    def test_bad_arguments(self):
        task_id = self.w.enqueue(self.good, 1, 2, 3)
        self.assertRejected("app.good", task_id)
        self.assertEqual(self.calls, [(1, 2)])

    def test_malformed_json(self):
        self.w.broker.publish_raw("default", b"{not json", message_id="m-1")
        message = self.assertRejected("JSON")
        self.assertEqual(message.body, b"{not json")
        self.assertEqual(message.message_id, "m-1")

    def test_wrong_version(self):
        body = json.dumps({"version": 2, "id": "v2-task", "task": "app.good"}).encode()
        self.w.broker.publish_raw("default", body)
        self.assertRejected("version", "v2-task")

    def test_wrong_content_type(self):
        _, body = protocol.build(self.good, (1, 2), queue="default", task_id="ct-1")
        self.w.broker.publish_raw("default", body, content_type="application/x-pickle")
        self.assertRejected("content type")

    def test_oversized_message(self):
        self.w = self.worker(max_message_size=400)
        self.w.broker.publish_raw("default", b"[" + b"1," * 300 + b"1]")
        self.assertRejected("byte limit")

    def test_unreadable_version_type(self):
        """A JSON list as version is refused like any bad version, not retried forever."""
        body = json.dumps({"version": [1], "id": "list-version", "task": "app.good"}).encode()
        self.w.broker.publish_raw("default", body)
        self.advance_by(10)
        self.assertRejected("version", "list-version")

    def test_deeply_nested_body(self):
        """A body too deeply nested for the JSON parser is refused, not retried forever."""
        self.w.broker.publish_raw("default", b"[" * 50_000)
        self.advance_by(10)
        self.assertRejected("JSON")


class CrashTests(MediatorTestCase):
    """A worker dying mid-task: attempts are counted, poison ends in errored."""

    def test_lost_attempt_is_counted(self):
        pending = []

        def controlled():
            d = defer.Deferred()
            pending.append(d)
            return d

        name = self.register(controlled, "app.c", executor=REACTOR, max_attempts=5,
                             min_backoff=1)
        worker = self.worker()
        task_id = worker.enqueue(name)
        self.assertEqual(worker.state_of(task_id)["attempts"], 1)
        self.restart(worker)
        worker.broker.crash()
        record = worker.state_of(task_id)
        self.assertEqual(record["state"], "scheduled")
        self.assertEqual(record["error"]["type"], "quebert.errors.WorkerLost")
        self.assertEqual(len(pending), 1)
        self.clock.advance(1)
        self.assertEqual(len(pending), 2)
        record = worker.state_of(task_id)
        self.assertEqual((record["state"], record["attempts"]), ("running", 2))
        pending[-1].callback("finally")
        record = worker.state_of(task_id)
        self.assertEqual((record["state"], record["result"]), ("succeeded", "finally"))
        self.assertEqual([h["attempt"] for h in record["history"]], [1, 2])
        self.assertEqual(record["history"][0]["error"]["type"], "quebert.errors.WorkerLost")
        self.assertTrue(worker.broker.idle())

    def test_poison_task_ends_in_errored(self):
        calls = []

        def kills_worker():
            calls.append(self.clock.seconds())
            return defer.Deferred()

        name = self.register(kills_worker, "app.poison", executor=REACTOR, max_attempts=3,
                             min_backoff=1)
        worker = self.worker()
        task_id = worker.enqueue(name)
        attempts = []
        for _ in range(10):
            record = worker.state_of(task_id)
            if record["state"] == "failed":
                break
            if record["state"] == "running":
                attempts.append(record["attempts"])
                self.restart(worker)
                worker.broker.crash()
            else:
                self.clock.advance(1)
        self.assertEqual(attempts, [1, 2, 3])
        self.assertEqual(len(calls), 3)
        record = worker.state_of(task_id)
        self.assertEqual(record["state"], "failed")
        self.assertEqual(record["attempts"], 3)
        self.assertEqual(record["error"]["type"], "quebert.errors.WorkerLost")
        errored = worker.broker.errored["default"]
        self.assertEqual(len(errored), 1)
        self.assertEqual(errored[0].headers[H_ERROR_TYPE], "quebert.errors.WorkerLost")
        self.assertEqual(errored[0].headers[H_ATTEMPTS], 3)
        self.assertTrue(worker.broker.idle())

    def test_redelivery_of_running_task_is_adopted(self):
        """
        Redelivery to the same worker while the attempt still runs there (its
        channel closed): the running attempt settles the new copy, nothing is
        counted twice and nothing runs twice.
        """
        pending = []

        def controlled():
            d = defer.Deferred()
            pending.append(d)
            return d

        name = self.register(controlled, "app.c", executor=REACTOR, max_attempts=5,
                             min_backoff=1)
        worker = self.worker()
        task_id = worker.enqueue(name)
        worker.broker.crash()
        self.assertEqual(len(pending), 1)
        record = worker.state_of(task_id)
        self.assertEqual((record["state"], record["attempts"]), ("running", 1))
        self.assertEqual(len(worker.broker.unacked["default"]), 1)
        pending[0].callback("ok")
        record = worker.state_of(task_id)
        self.assertEqual((record["state"], record["attempts"]), ("succeeded", 1))
        self.assertTrue(worker.broker.idle())

    def test_second_live_copy_of_running_task_is_settled_with_it(self):
        """
        A second copy arrives on a live channel while the attempt runs here
        (a copy another worker parked while this one ran the attempt): when
        the attempt ends, both the delivery it started from and the copy
        are acked.  Regression: the copy replaced the original delivery,
        which then stayed unacked on its live channel for ever.
        """
        for outcome in ("ok", "fail"):
            name = f"app.copy_{outcome}"
            pending = self.register_controlled(name, max_attempts=5, min_backoff=1)
            worker = self.worker()
            task_id = worker.enqueue(name)
            self.assertEqual(len(pending), 1)
            original = worker.broker.unacked["default"][0]
            worker.broker.queues["default"].append(StubMessage(
                body=original.message.body, headers={H_ATTEMPTS: 0, H_PARKED: 1},
                message_id=task_id))
            worker.broker.resume_consuming()
            self.assertEqual(len(pending), 1, "the copy must not run the task again")
            self.assertEqual(len(worker.broker.unacked["default"]), 2)
            expected = self.end_attempt(pending[0], outcome)
            self.assertEqual(worker.state_of(task_id)["state"], expected, outcome)
            self.assertEqual(worker.broker.unacked["default"], [], outcome)

    def test_redelivery_after_settled_outcome_is_acked(self):
        """The retry copy was published and recorded, only the ack was lost."""
        runs = []

        def fails():
            runs.append(self.clock.seconds())
            raise Boom()

        name = self.register(fails, "app.f", max_attempts=5, min_backoff=10)
        worker = self.worker()
        message, body = protocol.build(name, queue="default", task_id="settled-1")
        # attempt 1 ran and its retry was made durable, then the worker died
        # before acking: the original comes back, redelivered.
        self.successResultOf(worker.state.started("settled-1", 1, "w", message.info(), T0))
        self.successResultOf(worker.state.finished("settled-1", "scheduled", 1,
                                                   message.info(), T0, retry_at=T0 + 10))
        worker.broker.queues["default"].append(StubMessage(
            body=body, headers={H_ATTEMPTS: 0}, message_id="settled-1", redelivered=True))
        worker.broker.resume_consuming()
        self.assertEqual(runs, [])
        self.assertEqual(worker.state_of("settled-1")["state"], "scheduled")
        self.assertTrue(worker.broker.idle())
        self.assertEqual(worker.mediator.counts["redelivered_settled"], 1)

    def test_never_started_message_is_not_counted(self):
        pending = []
        runs = []

        def controlled(label):
            runs.append(label)
            if label == "A":
                d = defer.Deferred()
                pending.append(d)
                return d
            return label

        name = self.register(controlled, "app.c", executor=REACTOR, max_attempts=5,
                             min_backoff=1)
        worker = self.worker(max_running_tasks=1)
        a = worker.enqueue(name, "A")
        b = worker.enqueue(name, "B")
        self.assertEqual(runs, ["A"])
        self.assertIsNone(worker.state_of(b))
        self.restart(worker, max_running_tasks=1)
        worker.broker.crash()
        self.assertEqual(runs, ["A", "B"])
        record = worker.state_of(b)
        self.assertEqual(record["state"], "succeeded")
        self.assertEqual(record["attempts"], 1)
        self.assertEqual([h["attempt"] for h in record["history"]], [1])
        self.assertIsNone(record["history"][0]["error"])
        record = worker.state_of(a)
        self.assertEqual((record["state"], record["attempts"]), ("scheduled", 1))

    def test_redelivered_message_without_state_is_not_counted(self):
        """A redelivery of a message no worker ever recorded is a first attempt."""
        runs = []
        name = self.register(lambda: runs.append(1), "app.t")
        worker = self.worker()
        _, body = protocol.build(name, queue="default", task_id="fresh-1")
        worker.broker.queues["default"].append(StubMessage(
            body=body, headers={H_ATTEMPTS: 0}, message_id="fresh-1", redelivered=True))
        worker.broker.resume_consuming()
        self.assertEqual(runs, [1])
        self.assertEqual(worker.state_of("fresh-1")["attempts"], 1)


class _LateStarts:
    """
    A memory state store whose ``started`` answers one reactor turn late,
    as Redis does (its writes go out in a batch at the end of the turn).
    """

    def __init__(self, clock):
        self.inner = MemoryStateManager(clock=clock)
        self.clock = clock

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def started(self, *args):
        d = defer.Deferred()
        answer = self.inner.started(*args)
        self.clock.callLater(0, answer.chainDeferred, d)
        return d


class DuplicateTests(MediatorTestCase):
    """
    Two copies of one task, neither flagged redelivered: a retry that the
    broker dead-lettered twice across a node stop (quorum delay queues
    dead-letter at least once), or a message published twice.  The attempt
    runs once; the other copy is settled with it or from the record.
    """

    def copy(self, worker, body, task_id, attempts=1):
        worker.broker.queues["default"].append(StubMessage(
            body=body, headers={H_ATTEMPTS: attempts}, message_id=task_id))

    def test_two_copies_arriving_together_run_the_attempt_once(self):
        """
        Regression (broker-restart fault scenario): both copies reached one
        worker 2 ms apart and both ran attempt 2, since the second passed the
        "already running here?" check while the first waited for its
        ``started`` write.
        """
        for outcome in ("ok", "fail"):
            name = f"app.twice_{outcome}"
            pending = self.register_controlled(name, max_attempts=5, min_backoff=1)
            worker = self.worker(state=_LateStarts(self.clock))
            _, body = protocol.build(name, queue="default", task_id=f"twice-{outcome}")
            self.copy(worker, body, f"twice-{outcome}")
            self.copy(worker, body, f"twice-{outcome}")
            worker.broker.resume_consuming()
            self.clock.advance(0)
            self.assertEqual(len(pending), 1, "the second copy must not run the task again")
            self.assertEqual(len(worker.broker.unacked["default"]), 2)
            expected = self.end_attempt(pending[0], outcome)
            self.clock.advance(0)
            record = worker.state_of(f"twice-{outcome}")
            self.assertEqual((record["state"], record["attempts"]), (expected, 2), outcome)
            self.assertEqual(worker.broker.unacked["default"], [], outcome)
            self.assertEqual(len(pending), 1, outcome)

    def test_copies_behind_a_copy_that_does_not_run_are_looked_at_again(self):
        """
        The first copy is settled without running (its attempt had already
        ended): the copies that waited behind it are settled the same way,
        not left waiting.
        """
        runs = []
        name = self.register(lambda: runs.append(1), "app.t")
        state = _LateStarts(self.clock)
        worker = self.worker(state=state)
        message, body = protocol.build(name, queue="default", task_id="ended-1")
        self.successResultOf(state.inner.started("ended-1", 2, "other:1", message.info(), T0))
        self.successResultOf(state.inner.finished("ended-1", "succeeded", 2, message.info(),
                                                  T0 + 1, result=None))
        for _ in range(3):
            self.copy(worker, body, "ended-1")
        worker.broker.resume_consuming()
        for _ in range(5):
            self.clock.advance(0)
        self.assertEqual(runs, [])
        self.assertTrue(worker.broker.idle())
        self.assertEqual(worker.mediator.counts["duplicates"], 3)
        self.assertEqual(worker.mediator.counts["redelivered_settled"], 3)
        self.assertEqual(worker.mediator._redelivery.preparing, {})

    def test_a_waiting_copy_whose_handling_is_cancelled_is_returned(self):
        """
        A copy waiting behind another whose handling is cancelled goes back
        to its queue; the one it waited for still runs and settles.
        """
        runs = []
        name = self.register(lambda: runs.append(1), "app.t")
        worker = self.worker(state=_LateStarts(self.clock))
        _, body = protocol.build(name, queue="default", task_id="cancel-1")
        self.copy(worker, body, "cancel-1")
        self.copy(worker, body, "cancel-1")
        worker.broker.resume_consuming()
        first, second = list(worker.mediator._inflight)
        worker.mediator._inflight[second].cancel()
        self.clock.advance(0)
        self.assertEqual(runs, [1])
        self.assertEqual(worker.state_of("cancel-1")["state"], "succeeded")
        self.advance_by(worker.mediator.unexpected_error_delay + 1)
        # the cancelled copy came back, and was settled from the record
        self.assertEqual(runs, [1])
        self.assertTrue(worker.broker.idle())
        self.assertEqual(worker.mediator._redelivery.preparing, {})
        self.flushLoggedErrors(defer.CancelledError)

    def test_copy_of_an_attempt_another_worker_runs_is_put_aside(self):
        """
        The copy reached another worker than the one running the attempt:
        the state store says the attempt started, the holder beats, so the
        copy is parked until the attempt's outcome, then acked.
        """
        runs = []
        name = self.register(lambda: runs.append(1), "app.t")
        worker = self.worker()
        message, body = protocol.build(name, queue="default", task_id="elsewhere-1")
        self.successResultOf(worker.state.worker_beat("other:1", 10))
        self.successResultOf(worker.state.started("elsewhere-1", 2, "other:1",
                                                  message.info(), T0))
        self.copy(worker, body, "elsewhere-1")
        worker.broker.resume_consuming()
        self.assertEqual(runs, [])
        self.assertEqual(worker.mediator.counts["duplicates"], 1)
        self.assertEqual(worker.broker.unacked["default"], [])
        # the other worker's attempt ends: the parked copy comes back and is acked
        self.successResultOf(worker.state.finished("elsewhere-1", "succeeded", 2,
                                                   message.info(), self.clock.seconds()))
        self.advance_by(60)
        self.assertEqual(runs, [])
        self.assertTrue(worker.broker.idle())
        record = worker.state_of("elsewhere-1")
        self.assertEqual((record["state"], record["attempts"]), ("succeeded", 2))

    def test_copy_of_an_attempt_whose_worker_is_gone_counts_it_lost(self):
        """The holder stopped beating: its attempt is lost, the copy carries on."""
        runs = []
        name = self.register(lambda: runs.append(1), "app.t", max_attempts=5, min_backoff=1)
        worker = self.worker()
        message, body = protocol.build(name, queue="default", task_id="gone-1")
        self.successResultOf(worker.state.started("gone-1", 2, "dead:1", message.info(), T0))
        self.copy(worker, body, "gone-1")
        worker.broker.resume_consuming()
        self.advance_by(30)
        self.assertEqual(runs, [1])
        record = worker.state_of("gone-1")
        self.assertEqual((record["state"], record["attempts"]), ("succeeded", 3))
        self.assertTrue(worker.broker.idle())


class ConcurrencyTests(MediatorTestCase):
    """max_running_tasks bounds what runs at once, across queues."""

    def test_bound_across_queues(self):
        pending = []

        def controlled(label):
            d = defer.Deferred()
            pending.append((label, d))
            return d

        name = self.register(controlled, "app.c", executor=REACTOR)
        worker = self.worker(queues=["q1", "q2"], max_running_tasks=2)
        for i in range(3):
            worker.enqueue(name, f"q1-{i}", _queue="q1")
            worker.enqueue(name, f"q2-{i}", _queue="q2")
        self.assertEqual([label for label, _ in pending], ["q1-0", "q2-0"])
        self.assertEqual(len(worker.mediator.running), 2)
        done = 0
        while done < len(pending):
            self.assertLessEqual(len(worker.mediator.running), 2)
            pending[done][1].callback(None)
            done += 1
        self.assertEqual(len(pending), 6)
        self.assertEqual(sorted(label for label, _ in pending),
                         ["q1-0", "q1-1", "q1-2", "q2-0", "q2-1", "q2-2"])
        self.assertTrue(worker.broker.idle())
        self.assertEqual(worker.mediator.counts["succeeded"], 6)

    def test_prefetch_per_queue(self):
        pending = []
        name = self.register(lambda: pending.append(defer.Deferred()) or pending[-1],
                             "app.c", executor=REACTOR)
        worker = self.worker(queues=[QueueSettings(name="default", concurrency=2)],
                             max_running_tasks=10)
        for _ in range(5):
            worker.enqueue(name)
        self.assertEqual(len(pending), 2)
        self.assertEqual(len(worker.broker.queues["default"]), 3)


class DrainTests(MediatorTestCase):
    """drain(): stop intake, wait for running tasks up to a timeout."""

    def setUp(self):
        super().setUp()
        self.pending = []

        def controlled():
            d = defer.Deferred()
            self.pending.append(d)
            return d

        self.name = self.register(controlled, "app.c", executor=REACTOR)

    def test_nothing_running(self):
        worker = self.worker()
        self.assertEqual(self.successResultOf(defer.ensureDeferred(
            worker.mediator.drain(10))), 0)
        self.assertTrue(worker.broker.paused)
        self.assertTrue(worker.mediator.stopping)

    def test_waits_for_running_tasks(self):
        worker = self.worker(max_running_tasks=2)
        ids = [worker.enqueue(self.name) for _ in range(3)]
        self.assertEqual(len(self.pending), 2)
        d = defer.ensureDeferred(worker.mediator.drain(30))
        self.assertNoResult(d)
        # the waiting message went back to the queue, unstarted
        self.assertEqual(len(worker.broker.queues["default"]), 1)
        self.assertIsNone(worker.state_of(ids[2]))
        self.clock.advance(10)
        self.pending[0].callback(1)
        self.assertNoResult(d)
        self.pending[1].callback(2)
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(len(self.pending), 2)
        self.assertEqual(worker.state_of(ids[0])["state"], "succeeded")
        # the timeout timer is gone
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], [])

    def test_timeout_leaves_tasks_unacked(self):
        worker = self.worker()
        for _ in range(3):
            worker.enqueue(self.name)
        d = defer.ensureDeferred(worker.mediator.drain(30))
        self.pending[0].callback(None)
        self.clock.advance(29.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(d), 2)
        self.assertEqual(len(worker.broker.unacked["default"]), 2)

    def test_no_intake_after_drain(self):
        worker = self.worker()
        self.successResultOf(defer.ensureDeferred(worker.mediator.drain(1)))
        worker.enqueue(self.name)
        self.assertEqual(self.pending, [])
        self.assertEqual(len(worker.broker.queues["default"]), 1)

    def test_delivery_during_drain_is_returned(self):
        worker = self.worker()
        self.successResultOf(defer.ensureDeferred(worker.mediator.drain(1)))
        nacks = []

        class Delivery:
            def nack(self, requeue=True):
                nacks.append(requeue)

        worker.mediator.on_delivery(Delivery())
        self.assertEqual(nacks, [True])

    def test_failing_task_during_drain(self):
        worker = self.worker()
        worker.enqueue(self.name)
        d = defer.ensureDeferred(worker.mediator.drain(30))
        self.pending[0].errback(Boom())
        self.assertEqual(self.successResultOf(d), 0)


class QueueOfOriginTests(MediatorTestCase):
    def test_the_queue_a_message_came_from_rules_over_its_body(self):
        # A foreign producer put a body naming queue "elsewhere" into
        # "default": the retry policy, retries and errored copy all follow
        # "default", the queue the worker actually consumes.
        def fail():
            raise Boom("no")

        name = self.register(fail, "app.fail")
        worker = self.worker(queues=[self.queue("default", max_attempts=2, min_backoff=3)])
        _, body = protocol.build(name, queue="elsewhere", task_id="t1")
        worker.broker.publish_raw("default", body, message_id="t1")
        worker.run_until_idle()
        record = worker.state_of("t1")
        self.assertEqual((record["state"], record["attempts"], record["queue"]),
                         ("failed", 2, "default"))
        [(queue, _, delay)] = [p for p in worker.broker.published if p[2]]
        self.assertEqual((queue, delay), ("default", 3))
        self.assertEqual(len(worker.broker.errored["default"]), 1)
        self.assertNotIn("elsewhere", worker.broker.errored)


class RedeliveryClaimTests(SynchronousTestCase):
    """
    quebert._redelivery.Redelivery.claim/release: one copy of a task at a
    time goes on towards starting in a worker.
    """

    class Running:
        def __init__(self, delivery):
            self.delivery, self.attempt, self.copies = delivery, 1, None

    def redelivery(self):
        from quebert._redelivery import Redelivery

        class Mediator:
            running = {}

        return Redelivery(Mediator())

    def test_the_only_copy_is_claimed_at_once(self):
        """The common case costs no coroutine: claim() answers None."""
        redelivery = self.redelivery()
        self.assertIsNone(redelivery.claim(object(), "t1"))
        redelivery.release("t1")
        self.assertEqual(redelivery.preparing, {})

    def test_a_second_copy_waits_for_the_first_to_be_released(self):
        redelivery = self.redelivery()
        self.assertIsNone(redelivery.claim(object(), "t1"))
        second = defer.ensureDeferred(redelivery.claim(object(), "t1"))
        self.assertNoResult(second)
        redelivery.release("t1")
        self.assertIs(self.successResultOf(second), True)
        redelivery.release("t1")
        self.assertEqual(redelivery.preparing, {})

    def test_a_copy_of_the_attempt_running_here_joins_it(self):
        redelivery = self.redelivery()
        first, copy = object(), object()
        running = redelivery.mediator.running["t1"] = self.Running(first)
        self.assertIs(self.successResultOf(defer.ensureDeferred(
            redelivery.claim(copy, "t1"))), False)
        self.assertEqual(running.copies, [copy])
        self.assertEqual(redelivery.preparing, {})


class DrivenTests(SynchronousTestCase):
    """quebert._driven.Driven runs a coroutine as ensureDeferred would."""

    def test_results_failures_and_context(self):
        import contextvars

        from quebert._driven import Driven

        var = contextvars.ContextVar("v", default="outside")
        first, second = defer.Deferred(), defer.Deferred()
        seen = []

        async def work():
            var.set("inside")
            seen.append(await first)
            seen.append(await defer.succeed(2))  # fired already: no suspension
            try:
                await second
            except ValueError as e:
                seen.append(str(e))
            seen.append(var.get())
            return "done"

        d = Driven(work()).deferred
        self.assertNoResult(d)
        self.assertEqual(var.get(), "outside")
        first.callback(1)
        second.errback(ValueError("boom"))
        self.assertEqual(self.successResultOf(d), "done")
        self.assertEqual(seen, [1, 2, "boom", "inside"])
        self.assertIsNone(self.successResultOf(second))  # the failure was consumed

    def test_error_and_cancel(self):
        from quebert._driven import Driven

        async def broken():
            raise KeyError("x")

        self.failureResultOf(Driven(broken()).deferred, KeyError)

        async def waits():
            await defer.Deferred()

        d = Driven(waits()).deferred
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
