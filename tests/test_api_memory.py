# -*- test-case-name: tests.test_api_memory -*-
"""
Tests for MemoryTaskService, the in-memory backend of the HTTP API, on a
fake clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from quebert.api import ITaskService, MemoryTaskService
from quebert.errors import (
    ConfigurationError,
    QueueNotFound,
    TaskAlreadyExists,
    TaskNotFound,
    TaskStateConflict,
    UnknownTask,
)
from quebert.state import MemoryStateManager
from quebert.state.interface import CANCELED, FAILED, SUCCEEDED

T0 = 1767225600.0


class MemoryTaskServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.service = MemoryTaskService(clock=self.clock, queues=("default", "mail"),
                                         tasks=("app.add",))

    def add(self, **options: Any) -> dict:
        return self.successResultOf(self.service.add_task("app.add", [1], {}, **options))

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(ITaskService, self.service))

    def test_add_and_get(self) -> None:
        record = self.add(queue="mail")
        self.assertEqual((record["state"], record["queue"], record["task"], record["kind"],
                          record["created_at"]), ("queued", "mail", "app.add", "call", T0))
        self.assertEqual(self.successResultOf(self.service.get(record["id"])), record)
        self.assertIsNone(self.successResultOf(self.service.get("nope")))

    def test_delayed(self) -> None:
        self.assertEqual(self.add(countdown=10)["eta"], T0 + 10)
        self.assertEqual(self.add(countdown=10)["state"], "scheduled")
        self.assertEqual(self.add(eta=T0 - 5)["state"], "queued")
        self.failureResultOf(self.service.add_task("app.add", [], {}, countdown=1, eta=T0),
                             ConfigurationError)

    def test_unknown_task(self) -> None:
        self.failureResultOf(self.service.add_task("app.nope", [], {}), UnknownTask)
        anything = MemoryTaskService(clock=self.clock)
        self.successResultOf(anything.add_task("app.nope", [], {}))

    def test_bad_retry(self) -> None:
        failure = self.failureResultOf(
            self.service.add_task("app.add", [], {}, retry={"max_backoff": 0.1}),
            ConfigurationError)
        self.assertEqual(failure.value.field, "retry")

    def test_url_task(self) -> None:
        record = self.successResultOf(self.service.add_url_task(
            "https://example.com/", method="PUT", body=b"x", name="u1"))
        self.assertEqual((record["kind"], record["url"], record["method"], record["task"]),
                         ("url", "https://example.com/", "PUT", None))
        listed = self.successResultOf(self.service.list(None, None, 10, 0))
        self.assertEqual(listed[0]["url"], "https://example.com/")
        self.assertEqual(self.service.published[record["id"]]["body"], b"x")

    def test_unique_names(self) -> None:
        """A name is taken while its record exists, and free once it expired."""
        first = self.add(name="n")
        failure = self.failureResultOf(self.service.add_task("app.add", [], {}, name="n"),
                                       TaskAlreadyExists)
        self.assertEqual(failure.value.task_id, first["id"])
        self.successResultOf(self.service.cancel(first["id"]))
        self.failureResultOf(self.service.add_task("app.add", [], {}, name="n"),
                             TaskAlreadyExists)
        self.clock.advance(self.service.state.finished_ttl + 1)
        self.assertEqual(self.add(name="n")["name"], "n")

    def test_list(self) -> None:
        ids = []
        for queue in ("default", "mail", "default"):
            ids.append(self.add(queue=queue)["id"])
            self.clock.advance(1)
        records = self.successResultOf(self.service.list(None, None, 10, 0))
        self.assertEqual([r["id"] for r in records], ids[::-1])
        mail = self.successResultOf(self.service.list("queued", "mail", 10, 0))
        self.assertEqual([r["id"] for r in mail], [ids[1]])
        page = self.successResultOf(self.service.list(None, None, 1, 1))
        self.assertEqual([r["id"] for r in page], [ids[1]])

    def test_cancel(self) -> None:
        """
        Waiting tasks are canceled, running ones marked (their worker ends
        them); finished ones are a conflict.
        """
        queued = self.add()
        scheduled = self.add(countdown=60)
        running = self.add()
        state = self.service.state
        self.successResultOf(state.started(running["id"], 1, "w:1", {}, T0))
        for record in (queued, scheduled):
            canceled = self.successResultOf(self.service.cancel(record["id"]))
            self.assertEqual((canceled["state"], canceled["finished_at"]), (CANCELED, T0))
        marked = self.successResultOf(self.service.cancel(running["id"]))
        self.assertEqual((marked["state"], marked["cancel_requested"]), ("running", T0))
        done = self.add()
        self.successResultOf(state.finished(done["id"], SUCCEEDED, 1, {}, T0, result=1))
        for task_id, was in ((done["id"], SUCCEEDED), (queued["id"], CANCELED)):
            failure = self.failureResultOf(self.service.cancel(task_id), TaskStateConflict)
            self.assertEqual((failure.value.state, failure.value.task_id), (was, task_id))
        self.failureResultOf(self.service.cancel("nope"), TaskNotFound)

    def test_requeue(self) -> None:
        record = self.add()
        self.failureResultOf(self.service.requeue(record["id"]), TaskStateConflict)
        self.successResultOf(self.service.state.finished(
            record["id"], FAILED, 5, {}, T0, error={"type": "E", "message": "m"},
            reason="attempts spent"))
        self.clock.advance(3)
        requeued = self.successResultOf(self.service.requeue(record["id"]))
        self.assertEqual((requeued["state"], requeued["attempts"], requeued["finished_at"],
                          requeued["reason"], requeued["updated_at"]),
                         ("queued", 5, None, None, T0 + 3))
        self.assertIsNone(requeued["error"])
        queued = self.successResultOf(self.service.list("queued", None, 10, 0))
        self.assertEqual([r["id"] for r in queued], [record["id"]])
        self.assertEqual(self.successResultOf(self.service.list(FAILED, None, 10, 0)), [])
        self.failureResultOf(self.service.requeue("nope"), TaskNotFound)

    def test_queues(self) -> None:
        self.add(queue="mail")
        self.add(queue="mail", countdown=5)
        running = self.add(queue="mail")
        failed = self.add(queue="mail")
        state = self.service.state
        self.successResultOf(state.started(running["id"], 1, "w:1", {}, T0))
        self.successResultOf(state.finished(failed["id"], FAILED, 1, {}, T0))
        self.add(queue="other")
        queues = {q["name"]: q for q in self.successResultOf(self.service.queues())}
        self.assertEqual(set(queues), {"default", "mail", "other"})
        mail = queues["mail"]
        self.assertEqual((mail["ready"], mail["delayed"], mail["unacked"], mail["errored"],
                          mail["paused"]), (1, 1, 1, 1, False))
        self.assertEqual(queues["default"]["ready"], 0)
        self.assertIn("retry", mail["settings"])

    def test_queue_name_ending_in_a_newline(self) -> None:
        for queue in ("mail\n", "mail\r\n"):
            self.failureResultOf(self.service.add_task("app.add", [1], {}, queue=queue),
                                 ConfigurationError)
        self.assertEqual(self.successResultOf(self.service.list(None, None, 10, 0)), [])

    def test_pause_resume(self) -> None:
        self.assertTrue(self.successResultOf(self.service.pause("mail"))["paused"])
        self.assertFalse(self.successResultOf(self.service.resume("mail"))["paused"])
        self.failureResultOf(self.service.pause("nope"), QueueNotFound)
        self.failureResultOf(self.service.resume("nope"), QueueNotFound)

    def test_health(self) -> None:
        self.assertEqual(self.successResultOf(self.service.health()),
                         {"live": True, "ready": True, "amqp": True, "redis": True})
        self.service.redis = False
        health = self.successResultOf(self.service.health())
        self.assertEqual((health["ready"], health["redis"]), (False, False))

    def test_shared_state(self) -> None:
        """A state manager given is the one written to."""
        state = MemoryStateManager(clock=self.clock)
        service = MemoryTaskService(state, clock=self.clock)
        record = self.successResultOf(service.add_task("x", [], {}))
        self.assertEqual(self.successResultOf(state.get(record["id"]))["id"], record["id"])
