"""
``GET /tasks/{id}?wait=SECONDS``: the HTTP API answers when the task settles
or when the time is up, over a live server with the memory backend.
"""

from __future__ import annotations

import time

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from quebert.api.memory import MemoryTaskService
from quebert.api.openapi import document
from tests._api import RO, LiveAPI
from tests._worker import wait_for

T0 = 1767225600.0


class WaitTests(LiveAPI, TestCase):
    """Long-polling a task's record."""

    timeout = 60

    async def setUp(self) -> None:
        self.service = MemoryTaskService(tasks=("app.add",))
        await self.start_api(self.service, max_wait=5)
        created = (await self.post_task(args=[1, 2])).json
        self.task_id = created["id"]
        self.state = self.service.state
        info = {"queue": "default", "kind": "call", "task": "app.add", "name": None,
                "eta": None, "created_at": T0}
        self.info = info
        await self.state.started(self.task_id, 1, "w", info, T0)

    async def test_answers_when_the_task_settles(self) -> None:
        started = time.monotonic()
        pending = defer.ensureDeferred(self.request("GET", f"/tasks/{self.task_id}?wait=5"))
        await deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(pending.called, "it waits")
        await self.state.finished(self.task_id, "succeeded", 1, self.info, T0 + 1, result=3)
        response = await pending
        self.assertEqual(response.code, 200)
        self.assertEqual((response.json["state"], response.json["result"]), ("succeeded", 3))
        self.assertLess(time.monotonic() - started, 4, "answered when it settled")

    async def test_finished_task_answers_at_once(self) -> None:
        await self.state.finished(self.task_id, "failed", 1, self.info, T0 + 1,
                                  error={"type": "E", "message": "m", "traceback": None},
                                  reason="spent")
        response = await self.request("GET", f"/tasks/{self.task_id}?wait=5")
        self.assertEqual((response.code, response.json["state"], response.json["reason"]),
                         (200, "failed", "spent"))

    async def test_time_up_answers_the_record_as_it_is(self) -> None:
        started = time.monotonic()
        response = await self.request("GET", f"/tasks/{self.task_id}?wait=0.3", token=RO)
        self.assertGreaterEqual(time.monotonic() - started, 0.25)
        self.assertEqual((response.code, response.json["state"]), (200, "running"))
        self.assertEqual(self.service._waiter.waiting, 0)

    async def test_zero_is_a_plain_read(self) -> None:
        response = await self.request("GET", f"/tasks/{self.task_id}?wait=0")
        self.assertEqual((response.code, response.json["state"]), (200, "running"))

    async def test_unknown_task_is_404(self) -> None:
        self.assertError(await self.request("GET", "/tasks/nope?wait=1"), 404,
                         "task_not_found")

    async def test_bad_waits_are_refused(self) -> None:
        for query, field in (("wait=61", "wait"), ("wait=5.1", "wait"), ("wait=-1", "wait"),
                             ("wait=abc", "wait"), ("wait=nan", "wait"),
                             ("wait=inf", "wait"), ("wait=1&wait=2", "wait"),
                             ("wait=", "wait"), ("other=1", "other"),
                             ("wait=%ff", None)):
            response = await self.request("GET", f"/tasks/{self.task_id}?{query}")
            self.assertError(response, 400, "invalid_field", field)

    async def test_a_client_that_hangs_up_stops_its_wait(self) -> None:
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        from twisted.internet.protocol import Protocol

        port = int(self.base.rsplit(":", 1)[1])
        protocol = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                                         Protocol())
        protocol.transport.write(
            f"GET /tasks/{self.task_id}?wait=5 HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {RO}\r\n\r\n".encode())
        await wait_for(lambda: self.service._waiter is not None
                       and self.service._waiter.waiting == 1, 5, what="the wait")
        protocol.transport.loseConnection()
        await wait_for(lambda: self.service._waiter.waiting == 0, 5,
                       what="the wait to be dropped")

    def test_document_names_the_bound(self) -> None:
        from quebert.api.config import ApiConfig

        get = document(ApiConfig(read_only_tokens=("t" * 20,), max_wait=7))[
            "paths"]["/tasks/{task_id}"]["get"]
        self.assertEqual(get["parameters"][0]["schema"]["maximum"], 7)
        self.assertEqual(
            document()["paths"]["/tasks/{task_id}"]["get"]["parameters"][0]["schema"][
                "maximum"], 60)
