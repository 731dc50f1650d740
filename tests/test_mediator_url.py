"""
URL tasks and cancellation in the mediator, on quebert.testing's stubs:
a fake dispatcher stands in for treq (the real one is tested against a
real HTTP server in tests.test_dispatch and tests.test_url_integration).
"""

from __future__ import annotations

import attrs
from twisted.internet import defer
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase

from quebert import protocol
from quebert.errors import DispatchError, URLRefused
from quebert.mediator import QueueSettings
from quebert.registry import Registry
from quebert.retry import RetryPolicy
from quebert.state.interface import CANCELED, FAILED, QUEUED, RUNNING, SCHEDULED, SUCCEEDED
from quebert.testing import StubWorker

T0 = 1_700_000_000.0


@attrs.define
class Result:
    status: int = 200
    elapsed: float = 0.1
    body: str = "ok"

    def to_record(self) -> dict:
        return {"status": self.status, "elapsed": self.elapsed, "body": self.body}


class FakeDispatcher:
    """Records requests; each answer is the next of ``answers`` (a Deferred if None)."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list = []
        self.pending: list = []

    def dispatch(self, request, *, queue, deadline, extra_headers):
        self.requests.append((request, queue, deadline, dict(extra_headers)))
        answer = self.answers.pop(0) if self.answers else None
        if answer is None:
            d = defer.Deferred()
            self.pending.append(d)
            return d
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)


def http_error(status, retry_after=None):
    return DispatchError(f"HTTP {status}", status=status, retry_after=retry_after,
                         response={"status": status, "elapsed": 0.05, "body": "nope"})


class URLTaskTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)

    def worker(self, dispatcher, **retry):
        queue = QueueSettings(name="default", retry=RetryPolicy(**retry), dispatch_deadline=30)
        return StubWorker(self.clock, registry=Registry(), queues=[queue], dispatcher=dispatcher)

    def test_2xx_succeeds_with_the_response_recorded(self):
        dispatcher = FakeDispatcher(Result(status=204, body=""))
        worker = self.worker(dispatcher)
        task_id = worker.enqueue_url("http://127.0.0.1:9/hook", body={"a": 1},
                                     headers={"X-Mine": "1"})
        record = worker.state_of(task_id)
        self.assertEqual(record["state"], SUCCEEDED)
        self.assertEqual(record["result"], {"status": 204, "elapsed": 0.1, "body": ""})
        self.assertEqual(record["kind"], "url")
        self.assertEqual(record["task"], "POST http://127.0.0.1:9/hook")
        [(request, queue, deadline, extra)] = dispatcher.requests
        self.assertEqual((request.url, request.method, request.body),
                         ("http://127.0.0.1:9/hook", "POST", b'{"a":1}'))
        self.assertEqual(request.headers["X-Mine"], "1")
        self.assertEqual((queue, deadline), ("default", 30))
        self.assertEqual(extra["X-Quebert-QueueName"], "default")
        self.assertEqual(extra["X-Quebert-TaskName"], task_id)
        self.assertEqual(extra["X-Quebert-TaskRetryCount"], "0")
        self.assertEqual(extra["X-Quebert-TaskExecutionCount"], "0")
        self.assertNotIn("X-Quebert-TaskPreviousResponse", extra)
        self.assertTrue(worker.broker.idle())

    def test_failures_retry_with_backoff_and_headers(self):
        """5xx then a connection error then 200: retries carry counts and the previous status."""
        dispatcher = FakeDispatcher(http_error(500), DispatchError("connection refused"),
                                    Result())
        worker = self.worker(dispatcher, min_backoff=1, max_backoff=10)
        task_id = worker.enqueue_url("http://127.0.0.1:9/flaky", _name="flaky-1")
        self.assertEqual(worker.state_of(task_id)["state"], SCHEDULED)
        worker.run_until_idle()
        record = worker.state_of(task_id)
        self.assertEqual((record["state"], record["attempts"]), (SUCCEEDED, 3))
        first = record["history"][0]
        self.assertEqual(first["state"], SCHEDULED)
        self.assertEqual((first["error"]["status"], first["error"]["response_body"]),
                         ("500", "nope"))
        extras = [r[3] for r in dispatcher.requests]
        self.assertEqual([e["X-Quebert-TaskRetryCount"] for e in extras], ["0", "1", "2"])
        self.assertEqual([e["X-Quebert-TaskExecutionCount"] for e in extras], ["0", "1", "1"])
        self.assertEqual([e.get("X-Quebert-TaskPreviousResponse") for e in extras],
                         [None, "500", None])
        self.assertEqual({e["X-Quebert-TaskName"] for e in extras}, {"flaky-1"})

    def test_retry_after_longer_than_backoff_is_honoured(self):
        dispatcher = FakeDispatcher(http_error(429, retry_after=120), Result())
        worker = self.worker(dispatcher, min_backoff=1, max_backoff=10)
        task_id = worker.enqueue_url("http://127.0.0.1:9/busy")
        record = worker.state_of(task_id)
        self.assertEqual(record["eta"], T0 + 120)
        worker.run_until_idle()
        self.assertEqual(worker.state_of(task_id)["state"], SUCCEEDED)

    def test_retry_after_shorter_than_backoff_is_ignored(self):
        dispatcher = FakeDispatcher(http_error(503, retry_after=0.5), Result())
        worker = self.worker(dispatcher, min_backoff=5, max_backoff=10)
        task_id = worker.enqueue_url("http://127.0.0.1:9/busy")
        self.assertEqual(worker.state_of(task_id)["eta"], T0 + 5)

    def test_refused_url_fails_at_once(self):
        dispatcher = FakeDispatcher(URLRefused("169.254.169.254 is a cloud metadata address"))
        worker = self.worker(dispatcher, max_attempts=5)
        task_id = worker.enqueue_url("http://169.254.169.254/latest/meta-data")
        record = worker.state_of(task_id)
        self.assertEqual((record["state"], record["attempts"]), (FAILED, 1))
        self.assertIn("metadata", record["reason"])
        self.assertEqual(len(worker.broker.errored["default"]), 1)

    def test_attempts_spent_goes_to_errored_queue(self):
        dispatcher = FakeDispatcher(*[http_error(404)] * 3)
        worker = self.worker(dispatcher, max_attempts=3, min_backoff=1)
        task_id = worker.enqueue_url("http://127.0.0.1:9/gone")
        worker.run_until_idle()
        record = worker.state_of(task_id)
        self.assertEqual((record["state"], record["attempts"]), (FAILED, 3))
        [errored] = worker.broker.errored["default"]
        self.assertEqual(errored.message_id, task_id)
        # the errored copy describes the last attempt's answer too
        self.assertEqual(errored.headers[protocol.H_PREVIOUS_RESPONSE], 404)
        self.assertEqual(errored.headers[protocol.H_EXECUTIONS], 3)

    def test_worker_without_dispatcher_refuses_url_tasks(self):
        worker = StubWorker(self.clock, registry=Registry())
        task_id = worker.enqueue_url("http://127.0.0.1:9/x")
        record = worker.state_of(task_id)
        self.assertEqual(record["state"], FAILED)
        self.assertIn("URL tasks", record["reason"])


class CancelTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.registry = Registry()
        self.calls = []

    def worker(self, **kwargs):
        return StubWorker(self.clock, registry=self.registry, **kwargs)

    def test_queued_task_canceled_never_runs(self):
        self.registry.register(self.calls.append, "app.record")
        worker = self.worker()
        worker.broker.pause("default")
        task_id = worker.enqueue("app.record", 1)
        worker.state.enqueued(task_id, QUEUED, {"queue": "default", "task": "app.record"}, T0)
        self.assertEqual(worker.cancel(task_id), QUEUED)
        worker.broker.resume("default")
        self.assertEqual(self.calls, [])
        record = worker.state_of(task_id)
        self.assertEqual((record["state"], record["attempts"]), (CANCELED, 0))
        self.assertTrue(worker.broker.idle())

    def test_scheduled_task_canceled_never_runs(self):
        self.registry.register(self.calls.append, "app.record")
        worker = self.worker()
        task_id = worker.enqueue("app.record", 1, _countdown=60)
        worker.state.enqueued(task_id, SCHEDULED, {"queue": "default"}, T0)
        worker.cancel(task_id)
        worker.run_until_idle()
        self.assertEqual(self.calls, [])
        self.assertEqual(worker.state_of(task_id)["state"], CANCELED)
        self.assertEqual(worker.mediator.counts["canceled"], 1)

    def test_running_async_task_is_cancelled(self):
        seen = []

        async def slow():
            try:
                await deferLater(self.clock, 100, lambda: None)
            except defer.CancelledError:
                seen.append("cancelled")
                raise
            return "done"

        self.registry.register(slow, "app.slow")
        worker = self.worker()
        task_id = worker.enqueue("app.slow")
        self.assertEqual(worker.state_of(task_id)["state"], RUNNING)
        self.assertEqual(worker.cancel(task_id), RUNNING)
        self.assertEqual(seen, ["cancelled"])
        record = worker.state_of(task_id)
        self.assertEqual(record["state"], CANCELED)
        self.assertIn("canceled while attempt 1 ran", record["reason"])
        self.assertTrue(worker.broker.idle())
        self.assertEqual(worker.mediator.running, {})

    def test_running_url_task_request_is_aborted(self):
        dispatcher = FakeDispatcher()
        worker = self.worker(dispatcher=dispatcher)
        task_id = worker.enqueue_url("http://127.0.0.1:9/slow")
        [pending] = dispatcher.pending
        worker.cancel(task_id)
        self.assertTrue(pending.called)  # cancelled: the request is aborted
        self.assertEqual(worker.state_of(task_id)["state"], CANCELED)
        self.assertTrue(worker.broker.idle())

    def test_cancel_known_only_from_control_channel_is_honoured(self):
        """The store lost the cancel (outage): the broadcast alone stops the task."""
        self.registry.register(self.calls.append, "app.record")
        worker = self.worker()
        worker.broker.pause("default")
        task_id = worker.enqueue("app.record", 1)
        worker.broker.publish_control("cancel", id=task_id)
        worker.broker.resume("default")
        self.assertEqual(self.calls, [])
        self.assertEqual(worker.state_of(task_id)["state"], CANCELED)

    def test_task_finished_before_cancel_keeps_its_outcome(self):
        self.registry.register(lambda: 7, "app.seven")
        worker = self.worker()
        task_id = worker.enqueue("app.seven")
        self.assertEqual(worker.cancel(task_id), SUCCEEDED)
        self.assertEqual(worker.state_of(task_id)["result"], 7)

    def test_pause_and_resume_by_control_message(self):
        self.registry.register(self.calls.append, "app.record")
        worker = self.worker()
        worker.broker.publish_control("pause", queue="default")
        worker.enqueue("app.record", 1)
        self.assertEqual(self.calls, [])
        worker.broker.publish_control("pause", queue="not-here")
        worker.broker.publish_control("resume", queue="default")
        self.assertEqual(self.calls, [1])


class ProtocolURLTests(SynchronousTestCase):
    def test_url_message_round_trip(self):
        message, body = protocol.build_url("https://example.com/a?secret=1", method="put",
                                           body=b"\x00\x01", queue="q", name="n",
                                           dispatch_deadline=5)
        decoded = protocol.decode(body)
        self.assertEqual((decoded.kind, decoded.url, decoded.method, decoded.body),
                         ("url", "https://example.com/a?secret=1", "PUT", b"\x00\x01"))
        self.assertEqual(decoded.task, "PUT https://example.com/a")
        self.assertEqual(decoded.dispatch_deadline, 5)


class LiveWorkerRedeliveryTests(SynchronousTestCase):
    """
    A redelivered task whose record says it runs on another worker that
    still beats (only its broker connection dropped) is put aside, not
    counted lost: counting it would fork the task into two messages.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.registry = Registry()
        self.calls = []
        self.registry.register(self.calls.append, "app.record")

    def redelivered_running_elsewhere(self, worker):
        worker.broker.pause("default")
        task_id = worker.enqueue("app.record", 1)
        worker.broker.queues["default"][0].redelivered = True
        worker.state.started(task_id, 1, "other:1", {"queue": "default"}, T0)
        worker.state.worker_beat("other:1", 4)
        worker.broker.resume("default")
        return task_id

    def test_put_aside_then_acked_once_the_other_worker_recorded_the_outcome(self):
        worker = StubWorker(self.clock, registry=self.registry)
        task_id = self.redelivered_running_elsewhere(worker)
        self.assertEqual(self.calls, [])
        self.assertEqual(worker.mediator.counts["parked"], 1)
        [(_, parked, delay)] = [p for p in worker.broker.published if p[2] > 0]
        self.assertEqual(parked.headers[protocol.H_PARKED], 1)
        self.assertEqual(delay, 4.5)  # the beat's 4 s, and a margin
        # the other worker finishes its attempt (and its ack is lost)
        worker.state.finished(task_id, SUCCEEDED, 1, {"queue": "default"}, T0 + 0.5)
        worker.run_until_idle()
        self.assertEqual(self.calls, [])
        record = worker.state_of(task_id)
        self.assertEqual((record["state"], record["attempts"]), (SUCCEEDED, 1))
        self.assertEqual(worker.mediator.counts["redelivered_settled"], 1)

    def test_counted_lost_once_the_other_worker_stops_beating(self):
        worker = StubWorker(self.clock, registry=self.registry)
        task_id = self.redelivered_running_elsewhere(worker)
        worker.run_until_idle()  # the beat expires (4 s) while the copy is put aside
        record = worker.state_of(task_id)
        self.assertEqual((record["state"], record["attempts"]), (SUCCEEDED, 2))
        self.assertEqual(record["history"][0]["error"]["type"], "quebert.errors.WorkerLost")
        self.assertEqual(self.calls, [1])
        self.assertEqual(worker.mediator.counts["parked"], 1)

    def test_dead_worker_is_counted_lost_at_once(self):
        worker = StubWorker(self.clock, registry=self.registry)
        worker.broker.pause("default")
        task_id = worker.enqueue("app.record", 1)
        worker.broker.queues["default"][0].redelivered = True
        worker.state.started(task_id, 1, "gone:1", {"queue": "default"}, T0)
        worker.broker.resume("default")
        worker.run_until_idle()
        self.assertEqual(worker.mediator.counts["parked"], 0)
        self.assertEqual(worker.state_of(task_id)["attempts"], 2)
