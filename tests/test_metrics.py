"""
quebert.metrics: what a worker's ``GET /metrics`` says, read from its parts
at scrape time; served by the HTTP API with a read token.  (A real worker's
``/metrics`` is checked in ``test_url_integration``.)
"""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from quebert.metrics import OUTCOMES, WorkerMetrics
from quebert.registry import REACTOR, Registry
from quebert.testing import StubWorker
from tests._api import RO, RW, LiveAPI


def samples(exposition: bytes) -> dict:
    """``{(name, labels as a sorted tuple): value}`` of an exposition."""
    found = {}
    for family in text_string_to_metric_families(exposition.decode("utf-8")):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class Boom(Exception):
    pass


class WorkerMetricsTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.registry = Registry()

    def test_outcomes_and_what_the_mediator_holds(self):
        from twisted.internet import defer

        pending = []

        def slow():
            d = defer.Deferred()
            pending.append(d)
            return d

        def bad():
            raise Boom()

        self.registry.register(lambda: 1, "app.ok")
        self.registry.register(bad, "app.bad", max_attempts=2, min_backoff=1)
        self.registry.register(slow, "app.slow", executor=REACTOR)
        worker = StubWorker(self.clock, registry=self.registry, max_running_tasks=7)
        state = SimpleNamespace(healthy=False, pending=12)
        connections = [SimpleNamespace(connection_name="quebert-consumer", connected_count=3,
                                       current=SimpleNamespace(is_open=True)),
                       SimpleNamespace(connection_name="quebert-publisher", connected_count=1,
                                       current=None)]
        metrics = WorkerMetrics(worker.mediator, state, lambda: connections)
        for _ in range(3):
            worker.enqueue("app.ok")
        worker.enqueue("app.bad")
        for _ in range(10):
            self.clock.advance(1)
        worker.enqueue("app.slow")

        found = samples(metrics.exposition())
        outcome = {name: found[("quebert_deliveries_total", (("outcome", name),))]
                   for name in OUTCOMES}
        self.assertEqual(outcome, dict(dict.fromkeys(OUTCOMES, 0.0), succeeded=3.0,
                                       retried=1.0, failed=1.0))
        self.assertEqual(found[("quebert_tasks_running", ())], 1.0)
        self.assertEqual(found[("quebert_deliveries_in_progress", ())], 1.0)
        self.assertEqual(found[("quebert_deliveries_waiting", ())], 0.0)
        self.assertEqual(found[("quebert_max_running_tasks", ())], 7.0)
        self.assertEqual(found[("quebert_state_store_healthy", ())], 0.0)
        self.assertEqual(found[("quebert_state_writes_pending", ())], 12.0)
        self.assertEqual(found[("quebert_amqp_connection_ready",
                                (("connection", "quebert-consumer"),))], 1.0)
        self.assertEqual(found[("quebert_amqp_connection_ready",
                                (("connection", "quebert-publisher"),))], 0.0)
        self.assertEqual(found[("quebert_amqp_connections_total",
                                (("connection", "quebert-consumer"),))], 3.0)
        self.assertIn(("process_resident_memory_bytes", ()), found)

        # read again at the next scrape, nothing cached
        pending[0].errback(Failure(Boom()))
        found = samples(metrics.exposition())
        self.assertEqual(found[("quebert_deliveries_total", (("outcome", "retried"),))], 2.0)
        self.assertEqual(found[("quebert_tasks_running", ())], 0.0)

    def test_a_store_without_health_adds_no_state_metrics(self):
        worker = StubWorker(self.clock, registry=self.registry)
        found = samples(WorkerMetrics(worker.mediator, worker.state).exposition())
        self.assertNotIn(("quebert_state_store_healthy", ()), found)
        self.assertEqual(found[("quebert_deliveries_total", (("outcome", "succeeded"),))], 0.0)

    def test_two_workers_in_one_process_do_not_collide(self):
        one = StubWorker(self.clock, registry=self.registry)
        two = StubWorker(self.clock, registry=self.registry)
        self.registry.register(lambda: 1, "app.ok")
        one.enqueue("app.ok")
        first, second = WorkerMetrics(one.mediator), WorkerMetrics(two.mediator)
        self.assertEqual(samples(first.exposition())[
            ("quebert_deliveries_total", (("outcome", "succeeded"),))], 1.0)
        self.assertEqual(samples(second.exposition())[
            ("quebert_deliveries_total", (("outcome", "succeeded"),))], 0.0)


class MetricsRouteTests(LiveAPI, TestCase):
    """``GET /metrics`` on the HTTP API: a read token, Prometheus's text format."""

    async def test_served_with_a_read_token_in_text_format(self) -> None:
        await self.start_api(metrics=lambda: b"# HELP x y\n# TYPE x gauge\nx 1.0\n")
        for token in (RO, RW):
            response = await self.request("GET", "/metrics", token=token)
            self.assertEqual(response.code, 200)
            self.assertTrue(response.header("content-type").startswith("text/plain"))
            self.assertEqual(samples(response.raw), {("x", ()): 1.0})
        self.assertError(await self.request("GET", "/metrics", token=None), 401,
                         "unauthorized")
        self.assertError(await self.request("POST", "/metrics"), 405, "method_not_allowed")

    async def test_an_api_without_a_worker_has_none(self) -> None:
        await self.start_api()
        self.assertError(await self.request("GET", "/metrics"), 404, "not_found")
