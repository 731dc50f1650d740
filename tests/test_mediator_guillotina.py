"""
guillotina_amqp messages in the mediator, on quebert.testing's stubs: the
legacy body, which may carry the caller's ``Authorization`` header in its
``req_data``, is never copied; every copy the worker publishes (retry,
errored, refused, re-delayed, put aside) is the version-1 body with the
plain context only.  The real broker and worker are in
tests.test_guillotina_integration.
"""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from quebert import protocol
from quebert.registry import Registry
from quebert.state.interface import FAILED, SUCCEEDED
from quebert.testing import StubWorker

T0 = 1_700_000_000.0
SECRET = "tok-5f2e9c"
PLAIN = {"db_id": "db", "container_id": "site", "user_id": "alice", "path": "/db/site/doc"}


def legacy_body(func: str, task_id: str = "g-1", **changes) -> bytes:
    """A body exactly as guillotina_amqp publishes it for a logged-in user."""
    data = {
        "func": func, "args": [1], "kwargs": {"full": True}, "task_id": task_id,
        "db_id": "db", "container_id": "site",
        "req_data": {
            "url": f"https://admin:{SECRET}@cms.example.com/db/site/doc?access_token={SECRET}",
            "method": "POST",
            "headers": {"Authorization": f"Bearer {SECRET}", "Accept": "*/*"},
            "user": {"id": "alice", "roles": {"guillotina.Owner": 1}, "groups": [],
                     "Authorization": f"Bearer {SECRET}"},
        },
        "user": {"id": "alice", "token": SECRET},
        "annotations": {"jwt": SECRET},
    }
    data.update(changes)
    return json.dumps(data).encode()


class GuillotinaCopyTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.registry = Registry()
        self.calls = []

    def worker(self) -> StubWorker:
        return StubWorker(self.clock, registry=self.registry)

    def register(self, name: str, fail_times: int = 0, **options) -> None:
        def job(*args, **kwargs):
            self.calls.append((args, kwargs))
            if len(self.calls) <= fail_times:
                raise RuntimeError(f"planned failure {len(self.calls)}")
            return "done"

        self.registry.register(job, name, **options)

    def assert_converted(self, message, task: str = "app.reindex", task_id: str = "g-1"):
        """``message`` (a StubMessage) is the version-1 body of the legacy task."""
        self.assertNotIn(SECRET.encode(), message.body)
        self.assertNotIn(SECRET, repr(message.headers))
        self.assertEqual(message.content_type, protocol.CONTENT_TYPE)
        self.assertEqual(message.message_id, task_id)
        data = json.loads(message.body)
        self.assertEqual(data["version"], 1)
        decoded = protocol.decode(message.body, message.content_type)
        self.assertEqual((decoded.id, decoded.task, decoded.args, decoded.kwargs,
                          decoded.queue, decoded.context),
                         (task_id, task, (1,), {"full": True}, "default", PLAIN))

    def assert_no_secret_in_state(self, worker: StubWorker, task_id: str = "g-1") -> None:
        self.assertNotIn(SECRET, json.dumps(worker.state_of(task_id)))

    def test_retry_copies_are_converted(self):
        self.register("app.reindex", fail_times=1, min_backoff=1, max_backoff=1)
        worker = self.worker()
        worker.broker.publish_raw("default", legacy_body("app.reindex"), content_type=None)
        [(queue, copy, delay)] = [p for p in worker.broker.published if p[2] > 0]
        self.assertEqual((queue, delay), ("default", 1))
        self.assert_converted(copy)
        worker.run_until_idle()
        record = worker.state_of("g-1")
        self.assertEqual((record["state"], record["attempts"], record["task"]),
                         (SUCCEEDED, 2, "app.reindex"))
        self.assertEqual(self.calls, [((1,), {"full": True})] * 2)
        self.assert_no_secret_in_state(worker)

    def test_errored_copy_is_converted(self):
        self.register("app.reindex", fail_times=5, max_attempts=2, min_backoff=1)
        worker = self.worker()
        worker.broker.publish_raw("default", legacy_body("app.reindex"), content_type=None)
        worker.run_until_idle()
        [copy] = worker.broker.errored["default"]
        self.assert_converted(copy)
        self.assertEqual(copy.headers[protocol.H_ERROR_TYPE], "builtins.RuntimeError")
        self.assertEqual(worker.state_of("g-1")["state"], FAILED)
        self.assert_no_secret_in_state(worker)

    def test_unknown_func_is_refused_and_loses_nothing(self):
        """Errored with the UnknownTask reason; once the name is known, the copy runs."""
        worker = self.worker()
        worker.broker.publish_raw("default", legacy_body("guillotina_app.tasks.reindex"),
                                  content_type=None)
        [copy] = worker.broker.errored["default"]
        self.assert_converted(copy, task="guillotina_app.tasks.reindex")
        self.assertEqual(copy.headers[protocol.H_ERROR_TYPE], "quebert.errors.UnknownTask")
        self.assertIn("'guillotina_app.tasks.reindex' is not registered",
                      copy.headers[protocol.H_REASON])
        record = worker.state_of("g-1")
        self.assertEqual((record["state"], record["error"]["field"]), (FAILED, "task"))
        self.assert_no_secret_in_state(worker)
        # requeued (as an operator would) after the alias was declared: it runs
        self.register("app.reindex")
        self.registry.alias("guillotina_app.tasks.reindex", "app.reindex")
        worker.broker.publish_raw("default", copy.body, content_type=copy.content_type)
        self.assertEqual(self.calls, [((1,), {"full": True})])

    def test_undecodable_body_keeps_only_safe_keys(self):
        worker = self.worker()
        worker.broker.publish_raw("default", legacy_body("app.reindex", args="not a list"),
                                  content_type=None)
        [copy] = worker.broker.errored["default"]
        self.assertNotIn(SECRET.encode(), copy.body)
        self.assertEqual(json.loads(copy.body), {
            "task_id": "g-1", "func": "app.reindex", "args": "not a list",
            "kwargs": {"full": True}, "db_id": "db", "container_id": "site"})
        self.assertEqual(copy.headers[protocol.H_ERROR_TYPE], "quebert.errors.InvalidMessage")
        self.assert_no_secret_in_state(worker)

    def test_alias_runs_under_the_registered_name(self):
        self.register("app.reindex", aliases=("guillotina_app.tasks.reindex",))
        worker = self.worker()
        worker.broker.publish_raw("default", legacy_body("guillotina_app.tasks.reindex"),
                                  content_type=None)
        record = worker.state_of("g-1")
        self.assertEqual((record["state"], record["task"]), (SUCCEEDED, "app.reindex"))

    def test_early_copy_is_re_delayed_converted(self):
        self.register("app.reindex")
        worker = self.worker()
        not_before = protocol.to_ms(T0 + 30)
        worker.broker.publish_raw("default", legacy_body("app.reindex"), content_type=None,
                                  headers={protocol.H_NOT_BEFORE: not_before})
        [(_, copy, delay)] = worker.broker.published
        self.assertEqual(delay, 30)
        self.assert_converted(copy)
        self.assertEqual(copy.headers[protocol.H_NOT_BEFORE], not_before)
        worker.run_until_idle()
        self.assertEqual(worker.state_of("g-1")["state"], SUCCEEDED)

    def test_copy_put_aside_is_converted(self):
        """Redelivered while a live worker still runs it: the parked copy."""
        self.register("app.reindex")
        worker = self.worker()
        worker.broker.pause("default")
        worker.broker.publish_raw("default", legacy_body("app.reindex"), content_type=None)
        worker.broker.queues["default"][0].redelivered = True
        worker.state.started("g-1", 1, "other:1", {"queue": "default"}, T0)
        worker.state.worker_beat("other:1", 4)
        worker.broker.resume("default")
        [(_, parked, delay)] = worker.broker.published
        self.assertEqual(parked.headers[protocol.H_PARKED], 1)
        self.assert_converted(parked)
        worker.state.finished("g-1", SUCCEEDED, 1, {"queue": "default"}, T0 + 1)
        worker.run_until_idle()
        self.assertEqual(self.calls, [])
        self.assertEqual(worker.mediator.counts["redelivered_settled"], 1)

    def test_version_1_copies_are_unchanged(self):
        """Only guillotina bodies are rewritten: a version-1 body travels as sent."""
        self.register("app.reindex", fail_times=1, min_backoff=1)
        worker = self.worker()
        _, body = protocol.build("app.reindex", (1,), {"full": True}, queue="default",
                                 context={"k": "v"})
        worker.broker.publish_raw("default", body, content_type="application/json; x=1")
        [(_, copy, _)] = worker.broker.published
        self.assertEqual((copy.body, copy.content_type), (body, "application/json; x=1"))
