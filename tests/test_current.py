"""
Tests for quebert.current_task(): the real mediator and the real
:class:`~quebert.executor.Executor` (its thread pool included) on the
reactor, with quebert.testing's in-memory broker and the memory state
store; every kind of task asks which task it is.
"""

from __future__ import annotations

import json
import threading

import attrs
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

import quebert
from quebert import protocol
from quebert.current import CurrentTask, current_task
from quebert.executor import Executor
from quebert.mediator import DelayOnErrorMediator, Hook, QueueSettings
from quebert.registry import REACTOR, Registry
from quebert.state.memory import MemoryStateManager
from quebert.testing import StubBroker
from tests._worker import wait_for

CONTEXT = {"db_id": "db", "container_id": "site", "user_id": "alice"}


def seen() -> dict:
    """What the running task learns about itself, as a JSON result."""
    info = attrs.asdict(current_task(), recurse=False)
    info["context"] = dict(info["context"])
    return info


class OutsideTests(SynchronousTestCase):
    def test_outside_a_task_raises(self):
        e = self.assertRaises(RuntimeError, current_task)
        self.assertIn("outside a running task", str(e))

    def test_public(self):
        self.assertIs(quebert.current_task, current_task)
        self.assertIs(quebert.CurrentTask, CurrentTask)
        self.assertIn("current_task", quebert.__all__)
        self.assertIn("CurrentTask", quebert.__all__)


class CurrentTaskTests(TestCase):
    """Each executor: ``async def``, Deferred/reactor, thread (with and without timeout)."""

    timeout = 20

    def setUp(self):
        self.registry = Registry()
        self.broker = StubBroker(reactor)
        self.state = MemoryStateManager(clock=reactor)
        self.executor = Executor(reactor, max_threads=4)
        self.executor.start()
        self.addCleanup(self.executor.stop)
        self.hooks = []
        self.mediator = DelayOnErrorMediator(
            broker=self.broker, state=self.state, executor=self.executor, clock=reactor,
            queues=[QueueSettings("default", concurrency=10)], registry=self.registry,
            worker_id="test-worker", hooks=self.hooks)
        self.mediator.start()

    def enqueue(self, name: str, *args, context=CONTEXT, **options) -> str:
        message, body = protocol.build(name, args, queue="default", context=context,
                                       **options)
        self.broker.publish("default", body, {protocol.H_ATTEMPTS: 0}, message_id=message.id)
        return message.id

    async def result_of(self, task_id: str):
        async def finished():
            record = await self.state.get(task_id)
            return record if record and record["state"] in ("succeeded", "failed") else None

        record = await wait_for(finished, 10, interval=0.01, what="the task to finish")
        self.assertEqual(record["state"], "succeeded", record.get("error"))
        return record["result"]

    def expected(self, task_id: str, name: str, **changes) -> dict:
        return dict({"id": task_id, "name": name, "queue": "default", "attempt": 1,
                     "context": CONTEXT, "unique_name": None, "origin": "quebert"}, **changes)

    async def test_async_task(self):
        async def job():
            before = seen()
            await deferLater(reactor, 0.01, lambda: None)
            self.assertEqual(seen(), before)  # still after an await
            return before

        self.registry.register(job, "app.async_job")
        task_id = self.enqueue("app.async_job")
        self.assertEqual(await self.result_of(task_id), self.expected(task_id, "app.async_job"))
        self.assertRaises(RuntimeError, current_task)  # nothing leaks out

    async def test_deferred_returning_task(self):
        def job():
            info = seen()  # in the part that runs before it returns
            return deferLater(reactor, 0.01, lambda: info)

        self.registry.register(job, "app.deferred_job", executor=REACTOR)
        task_id = self.enqueue("app.deferred_job")
        self.assertEqual(await self.result_of(task_id),
                         self.expected(task_id, "app.deferred_job"))

    async def test_inline_callbacks_task(self):
        @defer.inlineCallbacks
        def job():
            yield deferLater(reactor, 0.01, lambda: None)
            return seen()

        self.registry.register(job, "app.icb_job")
        task_id = self.enqueue("app.icb_job")
        self.assertEqual(await self.result_of(task_id), self.expected(task_id, "app.icb_job"))

    async def test_thread_task(self):
        main = threading.get_ident()

        def job():
            self.assertNotEqual(threading.get_ident(), main)
            return seen()

        self.registry.register(job, "app.thread_job")
        task_id = self.enqueue("app.thread_job")
        self.assertEqual(await self.result_of(task_id),
                         self.expected(task_id, "app.thread_job"))

    async def test_thread_task_with_timeout(self):
        def job():
            return seen()

        self.registry.register(job, "app.thread_timeout_job", timeout=5)
        task_id = self.enqueue("app.thread_timeout_job")
        self.assertEqual(await self.result_of(task_id),
                         self.expected(task_id, "app.thread_timeout_job"))

    async def test_concurrent_tasks_each_see_their_own(self):
        release = defer.Deferred()

        async def job(i):
            await release
            return [i, seen()["id"], seen()["context"]]

        def slow_thread(i):
            threading.Event().wait(0.05)
            return [i, seen()["id"], seen()["context"]]

        self.registry.register(job, "app.waiting")
        self.registry.register(slow_thread, "app.slow_thread")
        ids = [self.enqueue("app.waiting" if i % 2 else "app.slow_thread", i,
                            context={"n": i}) for i in range(6)]
        reactor.callLater(0.02, release.callback, None)
        for i, task_id in enumerate(ids):
            self.assertEqual(await self.result_of(task_id), [i, task_id, {"n": i}])

    async def test_retry_attempt_and_unique_name(self):
        attempts = []

        def flaky():
            attempts.append(current_task().attempt)
            if len(attempts) == 1:
                raise ValueError("first attempt fails")
            return seen()

        self.registry.register(flaky, "app.flaky", min_backoff=0.01, max_backoff=0.01)
        message, body = protocol.build("app.flaky", (), queue="default", name="only-one",
                                       context=CONTEXT)
        self.broker.publish("default", body, {protocol.H_ATTEMPTS: 0}, message_id=message.id)
        self.assertEqual(await self.result_of(message.id),
                         self.expected(message.id, "app.flaky", attempt=2,
                                       unique_name="only-one"))
        self.assertEqual(attempts, [1, 2])

    async def test_context_is_read_only(self):
        def job():
            context = current_task().context
            for change in (lambda: context.__setitem__("db_id", "other"),
                           lambda: context.pop("db_id")):
                try:
                    change()
                except (TypeError, AttributeError):
                    pass
                else:
                    raise AssertionError("the context could be changed")
            try:
                current_task().id = "other"
            except attrs.exceptions.FrozenInstanceError:
                pass
            else:
                raise AssertionError("a CurrentTask could be changed")
            return dict(current_task().context)

        self.registry.register(job, "app.read_only")
        task_id = self.enqueue("app.read_only")
        self.assertEqual(await self.result_of(task_id), CONTEXT)

    async def test_no_context_is_an_empty_mapping(self):
        self.registry.register(seen, "app.seen")
        task_id = self.enqueue("app.seen", context=None)
        self.assertEqual((await self.result_of(task_id))["context"], {})

    async def test_hooks_around_the_task_see_it(self):
        class Recording(Hook):
            def __init__(self):
                self.seen = []

            def before(self, task):
                self.seen.append(("before", current_task().id))

            def after(self, task, result):
                self.seen.append(("after", current_task().id))

        hook = Recording()
        self.mediator.hooks.append(hook)
        self.mediator._before_hooks, self.mediator._after_hooks, _ = \
            self.mediator._hook_chains()
        self.registry.register(seen, "app.seen")
        task_id = self.enqueue("app.seen")
        await self.result_of(task_id)
        self.assertEqual(hook.seen, [("before", task_id), ("after", task_id)])

    async def test_guillotina_task_sees_its_plain_context(self):
        self.registry.register(seen, "app.seen", aliases=("guillotina_app.tasks.seen",))
        body = json.dumps({
            "func": "guillotina_app.tasks.seen", "args": [], "kwargs": {}, "task_id": "g-1",
            "db_id": "db", "container_id": "site",
            "req_data": {"url": "http://h/db/site/doc?x=1", "user": {"id": "alice"},
                         "headers": {"Authorization": "Bearer secret"}},
        }).encode()
        self.broker.publish_raw("default", body, content_type=None)
        self.assertEqual(await self.result_of("g-1"), self.expected(
            "g-1", "app.seen", origin="guillotina",
            context=dict(CONTEXT, path="/db/site/doc")))


class StubWorkerTests(SynchronousTestCase):
    """Users' unit tests get the same through quebert.testing.StubWorker."""

    def test_enqueue_with_context(self):
        from twisted.internet.task import Clock

        from quebert.testing import StubWorker

        registry = Registry()
        registry.register(seen, "app.seen")
        worker = StubWorker(Clock(), registry=registry)
        task_id = worker.enqueue("app.seen", _context={"db_id": "db"})
        record = worker.state_of(task_id)
        self.assertEqual(record["result"]["context"], {"db_id": "db"})
        self.assertEqual(record["result"]["id"], task_id)


class URLTaskTests(SynchronousTestCase):
    """A URL task runs no task function: it is not made the current task."""

    def test_dispatcher_is_not_inside_a_task(self):
        from twisted.internet.task import Clock

        from quebert.testing import StubWorker
        from tests.test_mediator_url import FakeDispatcher, Result

        outcomes = []

        class Asking(FakeDispatcher):
            def dispatch(self, request, **kwargs):
                try:
                    current_task()
                except RuntimeError:
                    outcomes.append("outside")
                else:
                    outcomes.append("inside")
                return super().dispatch(request, **kwargs)

        clock = Clock()
        registry = Registry()
        registry.register(lambda: None, "app.call")
        worker = StubWorker(clock, registry=registry,
                            dispatcher=Asking(Result(status=204), Result(status=204)))
        worker.enqueue_url("https://example.com/a")
        worker.enqueue("app.call")  # a call task in between leaves nothing behind
        worker.enqueue_url("https://example.com/b")
        self.assertEqual(outcomes, ["outside", "outside"])
        self.assertEqual(worker.mediator.counts["succeeded"], 3)
