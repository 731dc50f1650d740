"""
Tests for quebert.worker.WorkerService start-up: what it says about itself
when it starts (a worker without registered tasks), and that a worker
without tasks still runs URL tasks.
"""

from __future__ import annotations

import uuid
from typing import List

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server

from quebert.config import WorkerConfig
from quebert.dispatch import DispatchSettings
from quebert.protocol import H_REASON
from quebert.registry import Registry
from quebert.worker import WorkerService
from tests._rabbit import make_vhost, read_all, wait_counts
from tests._worker import WorkerProcess, wait_for

REDIS_URL = "redis://127.0.0.1:6379/9"


def add(x: int, y: int) -> int:
    return x + y


class LoggedTestCase(SynchronousTestCase):
    """Keeps the text of every event logged while the test runs."""

    def setUp(self) -> None:
        self.logged: List[str] = []
        observer = lambda event: self.logged.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def service(self, registry: Registry, **config) -> WorkerService:
        clock = Clock()
        clock.callFromThread = lambda f, *a, **kw: f(*a, **kw)
        service = WorkerService(WorkerConfig(state="memory", **config), reactor=clock,
                                registry=registry)
        self.addCleanup(service.executor.stop)
        return service

    def warnings_about(self, words: str) -> List[str]:
        return [text for text in self.logged if words in text]


class WithoutTasksTests(LoggedTestCase):
    """A worker started with no registered task says what it will do."""

    def test_says_url_tasks_run_and_named_tasks_are_refused(self) -> None:
        self.service(Registry(), queues=[{"name": "default"}, {"name": "emails"}])
        [text] = self.warnings_about("no tasks are registered")
        self.assertNotIn("every message will be refused", text)
        self.assertIn("pass --tasks MODULE", text)
        self.assertIn("runs URL tasks only", text)
        self.assertIn("is refused as 'not registered in this worker'", text)
        self.assertIn("not retried", text)
        self.assertIn("errored queue (default.errored, emails.errored)", text)
        self.assertIn("recorded 'failed'", text)

    def test_silent_with_a_registered_task(self) -> None:
        registry = Registry()
        registry.register(add, "jobs.add")
        self.service(registry)
        self.assertEqual(self.warnings_about("no tasks are registered"), [])


class DispatchLimitsTests(LoggedTestCase):
    """
    The URL dispatcher's connection limits follow the worker's concurrency
    unless configured; a configured one below it is said at start-up.
    """

    def test_default_limits_follow_max_running_tasks(self):
        service = self.service(Registry(), max_running_tasks=500,
                               queues=[{"name": "default", "concurrency": 500}])
        self.assertEqual((service.dispatcher.max_connections,
                          service.dispatcher.max_connections_per_host), (500, 500))
        self.assertEqual(self.warnings_about("URL tasks: at most"), [])

    def test_a_per_host_limit_below_is_said(self):
        service = self.service(
            Registry(), max_running_tasks=500, queues=[{"name": "default", "concurrency": 500}],
            dispatch=DispatchSettings.from_config({"max_connections_per_host": 10}))
        self.assertEqual(service.dispatcher.max_connections_per_host, 10)
        [text] = self.warnings_about("URL tasks: at most")
        self.assertIn("at most 10 requests are sent at once to one host "
                      "(dispatch.max_connections_per_host), fewer than the 500 tasks this "
                      "worker runs at once (--max-running-tasks 500)", text)
        self.assertIn('Raise "max_connections_per_host"', text)

    def test_queues_prefetching_fewer_than_max_running_tasks_is_said(self):
        service = self.service(Registry(), max_running_tasks=500)
        self.assertEqual(service.dispatcher.max_connections_per_host, 100)
        [text] = self.warnings_about("is never reached")
        self.assertIn("--max-running-tasks 500 is never reached: the queues prefetch 100",
                      text)


class Target(resource.Resource):
    """Answers 200 to every request, and keeps their paths."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.paths: List[str] = []

    def render(self, request) -> bytes:
        self.paths.append(request.path.decode())
        return b"ok"


class URLOnlyWorkerTests(TestCase):
    """A real ``twistd amqp-worker`` without ``--tasks``: what its warning says holds."""

    timeout = 120

    async def test_runs_url_tasks_and_refuses_named_ones(self) -> None:
        from quebert.client import Client

        amqp_url = make_vhost(self)
        target = Target()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            server.Site(target))
        self.addCleanup(port.stopListening)
        worker = WorkerProcess(self, amqp_url, REDIS_URL, f"quebert-test:{uuid.uuid4().hex}:",
                               tasks=(), queues=["default"])
        worker.start()
        await worker.ready()
        self.assertIn("this worker runs URL tasks only", worker.log())

        client = Client(amqp_url, reactor=reactor)
        self.addCleanup(client.close)
        await client.add_url_task(f"http://127.0.0.1:{port.getHost().port}/hook", body="x")
        named = await client.add_task("jobs.add", 1, 2)
        await wait_for(lambda: target.paths == ["/hook"], 30, what="the URL task's request")
        await wait_counts(amqp_url, "default.errored", (1, 0), timeout=30)
        [(properties, _)] = read_all(amqp_url, "default.errored")
        self.assertEqual(properties.message_id, named.id)
        self.assertIn("'jobs.add' is not registered in this worker",
                      properties.headers[H_REASON])
        self.assertEqual(await worker.stop(), 0)
