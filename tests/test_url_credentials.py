"""
Service credentials end to end: a real ``twistd amqp-worker`` whose config
holds a credential rule reading its token from an environment variable,
the real RabbitMQ (fresh vhost) and Redis (fresh prefix), and a real
``twisted.web`` target that wants the token and echoes what it got.

The worker must add the token under the prefix, and only there; and the
token must then be found nowhere it could leak from: the worker's log,
any Redis key of the test's prefix, any message left in RabbitMQ.
"""

from __future__ import annotations

import json
import os
import uuid

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from quebert import Client
from quebert.dispatch.credentials import REDACTED
from quebert.state import RedisStateManager
from tests._rabbit import make_vhost, queue_counts, read_all
from tests._redis import REDIS_URL, dump_prefixed, isolated_redis
from tests._worker import ROOT, TWISTD, WorkerProcess, wait_for

TOKEN = "svc-it-" + uuid.uuid4().hex
ENV_NAME = "QUEBERT_IT_SERVICE_TOKEN_" + uuid.uuid4().hex[:8].upper()


class Guarded(resource.Resource):
    """
    An application that wants ``Authorization: Bearer TOKEN`` on every path
    (401 otherwise), and echoes the Authorization it got: ``/db/ok`` and
    ``/dbx/ok`` answer 200 with it, ``/db/deny`` 401 with it, and
    ``/db/redirect`` 302 to a Location holding it.  The echoes stand for a
    careless or hostile target; the worker must scrub them.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list = []

    def render(self, request):
        path = request.path.decode()
        headers = {k.decode().lower(): [v.decode() for v in vs]
                   for k, vs in request.requestHeaders.getAllRawHeaders()}
        self.requests.append({"path": path, "headers": headers})
        auth = (headers.get("authorization") or [""])[0]
        if path == "/db/deny":
            request.setResponseCode(401)
            return f"rejected: {auth}".encode()
        if path == "/db/redirect":
            request.setResponseCode(302)
            request.setHeader(b"Location", f"/landing?auth={auth}".encode())
            return b""
        if auth != f"Bearer {TOKEN}":
            request.setResponseCode(401)
            return b"token required"
        return f"hello {auth}".encode()

    def seen(self, path: str) -> list:
        return [r["headers"] for r in self.requests if r["path"] == path]


class ServiceTokenTests(TestCase):
    timeout = 180

    async def setUp(self) -> None:
        self.amqp_url = make_vhost(self)
        self.redis, self.prefix = await isolated_redis(self)
        self.target = Guarded()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            server.Site(self.target))
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        self.config = os.path.abspath(self.mktemp() + ".json")
        with open(self.config, "w") as f:
            json.dump({"dispatch": {"credentials": [
                {"url_prefix": f"{self.base}/db/", "token_env": ENV_NAME}]}}, f)
        self.state = RedisStateManager(self.redis, prefix=self.prefix)
        self.client = Client(self.amqp_url, state=self.state)
        self.addCleanup(self.client.close)

    async def wait_finished(self, task_id: str, worker: WorkerProcess) -> dict:
        async def finished():
            if not worker.alive:
                raise AssertionError("worker died:\n" + worker.log()[-3000:])
            record = await self.state.get(task_id)
            return record if record and record["state"] in ("succeeded", "failed") else None

        return await wait_for(finished, 60, interval=0.2, what=f"task {task_id} to finish")

    async def rabbit_dump(self) -> str:
        """Every message left in every queue of the test's vhost (read and acked)."""
        counts = await queue_counts(self.amqp_url)
        texts = []
        for queue, (_ready, unacked) in sorted(counts.items()):
            self.assertEqual(unacked, 0, queue)
            for properties, body in read_all(self.amqp_url, queue):
                texts.append(f"{queue} {properties!r} {body.decode('utf-8', 'replace')}")
        return "\n".join(texts)

    async def test_token_added_under_the_prefix_only_and_never_kept(self) -> None:
        worker = WorkerProcess(self, self.amqp_url, REDIS_URL, self.prefix,
                               queues=["default:10"],
                               extra=["--config", self.config, "--log-level", "debug"],
                               env={ENV_NAME: TOKEN})
        worker.start()
        await worker.ready()

        ok = await self.client.add_url_task(
            f"{self.base}/db/ok", method="POST", body=b"{}",
            headers={"Authorization": "Bearer forged-by-the-task", "X-Mine": "1"})
        outside = await self.client.add_url_task(
            f"{self.base}/dbx/ok", retry={"max_attempts": 2, "min_backoff": 0.2})
        deny = await self.client.add_url_task(f"{self.base}/db/deny",
                                              retry={"max_attempts": 1})
        redirect = await self.client.add_url_task(f"{self.base}/db/redirect",
                                                  retry={"max_attempts": 1})

        # Under the prefix: the worker's token, not the task's forged one.
        record = await self.wait_finished(ok.id, worker)
        self.assertEqual(record["state"], "succeeded", record)
        [seen] = self.target.seen("/db/ok")
        self.assertEqual(seen["authorization"], [f"Bearer {TOKEN}"])
        self.assertEqual(seen["x-mine"], ["1"])
        self.assertEqual(record["result"]["body"], f"hello Bearer {REDACTED}")

        # Outside it (/dbx is not under /db/): no token, 401, retried, failed.
        record = await self.wait_finished(outside.id, worker)
        self.assertEqual((record["state"], record["attempts"]), ("failed", 2), record)
        self.assertEqual(record["history"][0]["error"]["status"], "401")
        seen = self.target.seen("/dbx/ok")
        self.assertEqual(len(seen), 2)
        self.assertEqual([h.get("authorization") for h in seen], [None, None])
        self.assertEqual(seen[1]["x-quebert-taskpreviousresponse"], ["401"])

        # A target echoing the token in an error body or a Location: scrubbed.
        record = await self.wait_finished(deny.id, worker)
        self.assertEqual(record["state"], "failed")
        self.assertEqual(record["error"]["response_body"], f"rejected: Bearer {REDACTED}")
        record = await self.wait_finished(redirect.id, worker)
        self.assertEqual(record["state"], "failed")
        self.assertIn(f"auth=Bearer {REDACTED}", record["error"]["message"])
        self.assertEqual(self.target.seen("/landing"), [])  # never followed

        self.assertEqual(await worker.stop(), 0)
        log = worker.log()
        self.assertIn("header(s) dropped", log)
        redis_text = await dump_prefixed(self.redis, self.prefix)
        self.assertIn(ok.id, redis_text)
        rabbit_text = await self.rabbit_dump()
        self.assertIn(deny.id, rabbit_text)  # the errored copies are there...
        for where, text in (("worker log", log), ("Redis", redis_text),
                            ("RabbitMQ", rabbit_text)):
            self.assertEqual(text.count(TOKEN), 0, f"the token leaked into the {where}")
            self.assertNotIn(TOKEN[:12], text, where)

    async def test_missing_token_stops_the_worker_at_start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != ENV_NAME}
        env["PYTHONPATH"] = ROOT
        out, err, code = await getProcessOutputAndValue(
            TWISTD, ["--pidfile=", "-n", "amqp-worker", "--config", self.config,
                     "--amqp-url", self.amqp_url, "--state", "memory"],
            path=ROOT, env=env, reactor=reactor)
        text = (out + err).decode("utf-8", "replace")
        self.assertNotEqual(code, 0, text)
        self.assertIn(f"the environment variable {ENV_NAME}, which is not set or empty", text)
        self.assertNotIn("Traceback", text)
