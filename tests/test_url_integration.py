"""
URL tasks, the HTTP task API, named tasks, cancellation, requeue and
pausing, end to end: a real ``twistd amqp-worker --http-port`` process,
the real RabbitMQ (fresh vhost) and Redis (fresh prefix), a real
``twisted.web`` target server in the test, and treq as the HTTP client.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from typing import Any, Optional

import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool

from tests._rabbit import make_vhost, wait_counts
from tests._worker import WorkerProcess, wait_for

REDIS_URL = "redis://127.0.0.1:6379/9"
TOKEN = "it-token-" + uuid.uuid4().hex
AUTH = {"Authorization": [f"Bearer {TOKEN}"], "Content-Type": ["application/json"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Target(resource.Resource):
    """
    The endpoint URL tasks call.  ``/ok`` answers 200, ``/flaky/N`` fails
    N times with 503 then answers 200, ``/gone`` 404 until ``fixed``,
    ``/slow`` never answers (until the connection drops).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list = []
        self.counts: dict = {}
        self.fixed = False
        self.dropped: list = []

    def render(self, request):
        path = request.path.decode()
        body = request.content.read()
        self.requests.append({
            "path": path, "method": request.method.decode(), "body": body,
            "headers": {k.decode().lower(): v[0].decode()
                        for k, v in request.requestHeaders.getAllRawHeaders()},
            "at": time.time(),
        })
        self.counts[path] = self.counts.get(path, 0) + 1
        if path.startswith("/flaky/"):
            failures = int(path.rsplit("/", 1)[1])
            if self.counts[path] <= failures:
                request.setResponseCode(503)
                return b"not yet"
            return b"finally"
        if path == "/gone":
            if not self.fixed:
                request.setResponseCode(404)
                return b"no such thing"
            return b"back"
        if path == "/busy":
            if self.counts[path] == 1:
                request.setResponseCode(429)
                request.setHeader(b"Retry-After", b"2")
                return b"slow down"
            return b"ok"
        if path == "/slow":
            request.notifyFinish().addErrback(lambda f: self.dropped.append(time.time()))
            return server.NOT_DONE_YET
        return b"ok"

    def seen(self, path: str) -> list:
        return [r for r in self.requests if r["path"] == path]


class URLAndAPITests(TestCase):
    timeout = 180

    async def setUp(self) -> None:
        self.amqp_url = make_vhost(self)
        self.prefix = f"quebert-test:{uuid.uuid4().hex[:12]}:"
        self.target = Target()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            server.Site(self.target))
        self.addCleanup(port.stopListening)
        self.target_base = f"http://127.0.0.1:{port.getHost().port}"
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        self.api_port = free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        config = os.path.abspath(self.mktemp() + ".json")
        with open(config, "w") as f:
            json.dump({"dispatch": {"max_concurrent_dispatches": 50}}, f)
        self.worker = WorkerProcess(
            self, self.amqp_url, REDIS_URL, self.prefix,
            queues=["default:20", "other:5"],
            extra=["--config", config, "--http-port", str(self.api_port),
                   "--api-token", TOKEN, "--shutdown-timeout", "5"])
        self.worker.start()
        await self.worker.ready(queues=2)
        await wait_for(self._healthy, 30, what="API to answer /health")

    async def _healthy(self) -> bool:
        try:
            response = await treq.get(f"{self.api}/health", agent=self.agent)
            await treq.content(response)
            return response.code == 200
        except Exception:
            return False

    async def call(self, method: str, path: str, body: Any = None,
                   headers: Optional[dict] = None) -> tuple:
        data = json.dumps(body).encode() if body is not None else None
        response = await treq.request(method, self.api + path, data=data,
                                      headers=headers if headers is not None else AUTH,
                                      agent=self.agent)
        content = await treq.content(response)
        try:
            return response.code, json.loads(content)
        except ValueError:
            return response.code, content

    async def record(self, task_id: str) -> dict:
        code, record = await self.call("GET", f"/tasks/{task_id}")
        self.assertEqual(code, 200, record)
        return record

    async def until_state(self, task_id: str, *states: str, timeout: float = 30) -> dict:
        box: dict = {}

        async def reached() -> bool:
            box["record"] = await self.record(task_id)
            return box["record"]["state"] in states

        await wait_for(reached, timeout, what=f"task {task_id} to be {states}")
        return box["record"]

    # -- URL tasks ------------------------------------------------------------

    async def test_url_task_pushed_over_http_runs(self) -> None:
        code, created = await self.call("POST", "/tasks", {
            "kind": "url", "url": f"{self.target_base}/ok", "method": "PUT",
            "headers": {"X-Mine": "yes"}, "body": "hello", "name": "push-1"})
        self.assertEqual(code, 201, created)
        record = await self.until_state(created["id"], "succeeded")
        self.assertEqual(record["result"]["status"], 200)
        self.assertEqual(record["result"]["body"], "ok")
        [seen] = self.target.seen("/ok")
        self.assertEqual((seen["method"], seen["body"]), ("PUT", b"hello"))
        headers = seen["headers"]
        self.assertEqual(headers["x-mine"], "yes")
        self.assertEqual(headers["x-quebert-queuename"], "default")
        self.assertEqual(headers["x-quebert-taskname"], "push-1")
        self.assertEqual(headers["x-quebert-taskretrycount"], "0")
        self.assertEqual(headers["x-quebert-taskexecutioncount"], "0")
        self.assertIn("x-quebert-tasketa", headers)

    async def test_flaky_endpoint_is_retried_with_backoff(self) -> None:
        code, created = await self.call("POST", "/tasks", {
            "kind": "url", "url": f"{self.target_base}/flaky/2",
            "retry": {"min_backoff": 0.5, "max_backoff": 5}})
        self.assertEqual(code, 201, created)
        record = await self.until_state(created["id"], "succeeded")
        self.assertEqual(record["attempts"], 3)
        self.assertEqual([h["state"] for h in record["history"]],
                         ["scheduled", "scheduled", "succeeded"])
        self.assertEqual(record["history"][0]["error"]["status"], "503")
        seen = self.target.seen("/flaky/2")
        gaps = [b["at"] - a["at"] for a, b in zip(seen, seen[1:])]
        self.assertGreaterEqual(gaps[0], 0.45)
        self.assertGreaterEqual(gaps[1], 0.95)  # doubled
        self.assertEqual([s["headers"].get("x-quebert-taskpreviousresponse") for s in seen],
                         [None, "503", "503"])
        self.assertEqual([s["headers"]["x-quebert-taskretrycount"] for s in seen],
                         ["0", "1", "2"])

    async def test_failed_url_task_requeued_after_the_fix(self) -> None:
        code, created = await self.call("POST", "/tasks", {
            "kind": "url", "url": f"{self.target_base}/gone",
            "retry": {"max_attempts": 2, "min_backoff": 0.2}})
        record = await self.until_state(created["id"], "failed")
        self.assertEqual(record["attempts"], 2)
        await wait_counts(self.amqp_url, "default.errored", (1, 0))
        self.target.fixed = True
        code, requeued = await self.call("POST", f"/tasks/{created['id']}/requeue")
        self.assertEqual(code, 200, requeued)
        record = await self.until_state(created["id"], "succeeded")
        self.assertEqual(record["attempts"], 3)
        await wait_counts(self.amqp_url, "default.errored", (0, 0))
        # a second requeue of a succeeded task is a conflict
        code, error = await self.call("POST", f"/tasks/{created['id']}/requeue")
        self.assertEqual((code, error["error"]["code"]), (409, "task_state_conflict"))

    async def test_retry_after_is_honoured(self) -> None:
        code, created = await self.call("POST", "/tasks", {
            "kind": "url", "url": f"{self.target_base}/busy",
            "retry": {"min_backoff": 0.1, "max_backoff": 0.2}})
        record = await self.until_state(created["id"], "succeeded")
        self.assertEqual(record["attempts"], 2)
        first, second = self.target.seen("/busy")
        self.assertGreaterEqual(second["at"] - first["at"], 1.9)
        self.assertEqual(record["history"][0]["error"]["status"], "429")

    async def test_deadline_and_connection_refused_are_failed_attempts(self) -> None:
        code, slow = await self.call("POST", "/tasks", {
            "kind": "url", "url": f"{self.target_base}/slow", "dispatch_deadline": 0.5,
            "retry": {"max_attempts": 1}})
        code, refused = await self.call("POST", "/tasks", {
            "kind": "url", "url": f"http://127.0.0.1:{free_port()}/x",
            "retry": {"max_attempts": 1}})
        record = await self.until_state(slow["id"], "failed")
        self.assertEqual(record["error"]["type"], "quebert.dispatch.dispatcher.DispatchTimeout")
        record = await self.until_state(refused["id"], "failed")
        self.assertIn("refused", record["error"]["message"].lower())

    async def test_refused_url_is_refused_at_the_api(self) -> None:
        code, error = await self.call("POST", "/tasks", {
            "kind": "url", "url": "http://169.254.169.254/latest/meta-data/"})
        self.assertEqual(code, 422, error)
        self.assertEqual(error["error"]["code"], "url_refused")

    # -- cancellation -----------------------------------------------------------

    async def test_running_url_task_canceled_promptly(self) -> None:
        code, created = await self.call("POST", "/tasks", {
            "kind": "url", "url": f"{self.target_base}/slow"})
        await wait_for(lambda: self.target.seen("/slow"), 20, what="the request")
        asked = time.time()
        code, record = await self.call("DELETE", f"/tasks/{created['id']}")
        self.assertEqual(code, 200, record)
        record = await self.until_state(created["id"], "canceled", timeout=5)
        self.assertLess(record["finished_at"] - asked, 1.0)
        await wait_for(lambda: self.target.dropped, 5, what="the request to be aborted")

    async def test_running_async_task_canceled_promptly(self) -> None:
        code, created = await self.call("POST", "/tasks", {
            "kind": "call", "task": "it.sleep", "args": [60]})
        self.assertEqual(code, 201, created)
        await self.until_state(created["id"], "running")
        asked = time.time()
        await self.call("DELETE", f"/tasks/{created['id']}")
        record = await self.until_state(created["id"], "canceled", timeout=5)
        self.assertLess(record["finished_at"] - asked, 1.0)
        await wait_counts(self.amqp_url, "default", (0, 0))

    async def test_running_thread_task_canceled_and_its_result_discarded(self) -> None:
        path = os.path.abspath(self.mktemp())
        code, created = await self.call("POST", "/tasks", {
            "kind": "call", "task": "it.slow_record", "args": [path, 1, 2.0]})
        self.assertEqual(code, 201, created)
        await self.until_state(created["id"], "running")
        asked = time.time()
        await self.call("DELETE", f"/tasks/{created['id']}")
        record = await self.until_state(created["id"], "canceled", timeout=5)
        self.assertLess(record["finished_at"] - asked, 1.0)
        # the thread finishes its work (Python threads cannot be stopped)...
        await wait_for(lambda: os.path.exists(path), 10, what="the thread to finish")
        await deferLater(reactor, 0.5, lambda: None)
        # ...and its result is thrown away
        record = await self.record(created["id"])
        self.assertEqual((record["state"], record["result"]), ("canceled", None))
        await wait_counts(self.amqp_url, "default", (0, 0))

    async def test_scheduled_task_canceled_never_runs(self) -> None:
        code, created = await self.call("POST", "/tasks", {
            "kind": "url", "url": f"{self.target_base}/ok", "countdown": 1.5})
        self.assertEqual(created["state"], "scheduled")
        code, record = await self.call("DELETE", f"/tasks/{created['id']}")
        self.assertEqual((code, record["state"]), (200, "canceled"))
        await deferLater(reactor, 3, lambda: None)
        self.assertEqual(self.target.seen("/ok"), [])
        self.assertEqual((await self.record(created["id"]))["state"], "canceled")
        code, error = await self.call("DELETE", f"/tasks/{created['id']}")
        self.assertEqual(code, 409)

    # -- named tasks -----------------------------------------------------------

    async def test_racing_named_tasks_one_wins(self) -> None:
        body = {"kind": "url", "url": f"{self.target_base}/ok", "name": "only-once",
                "countdown": 30}
        results = await defer.gatherResults([
            defer.ensureDeferred(self.call("POST", "/tasks", body)) for _ in range(8)])
        codes = sorted(code for code, _ in results)
        self.assertEqual(codes, [201] + [409] * 7)
        conflict = next(r for c, r in results if c == 409)
        self.assertEqual(conflict["error"]["code"], "task_already_exists")

    # -- queues ------------------------------------------------------------------

    async def test_pause_and_resume_a_queue(self) -> None:
        code, queue = await self.call("POST", "/queues/other/pause")
        self.assertEqual((code, queue["paused"]), (200, True))
        code, created = await self.call("POST", "/tasks", {
            "kind": "url", "url": f"{self.target_base}/ok", "queue": "other"})
        self.assertEqual(code, 201, created)
        await deferLater(reactor, 1.5, lambda: None)
        self.assertEqual((await self.record(created["id"]))["state"], "queued")
        code, listing = await self.call("GET", "/queues")
        other = next(q for q in listing["queues"] if q["name"] == "other")
        self.assertEqual((other["ready"], other["paused"], other["consumers"]), (1, True, 0))
        await self.call("POST", "/queues/other/resume")
        await self.until_state(created["id"], "succeeded")

    async def test_paused_queue_stays_paused_for_a_restarted_worker(self) -> None:
        await self.call("POST", "/queues/other/pause")
        self.assertEqual(await self.worker.stop(), 0)
        self.worker.start()
        await self.worker.ready(queues=1)
        await wait_for(self._healthy, 30, what="API")
        code, created = await self.call("POST", "/tasks", {
            "kind": "url", "url": f"{self.target_base}/ok", "queue": "other"})
        await deferLater(reactor, 1.5, lambda: None)
        self.assertEqual((await self.record(created["id"]))["state"], "queued")
        await self.call("POST", "/queues/other/resume")
        await self.until_state(created["id"], "succeeded")

    # -- the API itself --------------------------------------------------------

    async def test_metrics_say_what_the_worker_did(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        code, created = await self.call("POST", "/tasks", {
            "kind": "url", "url": f"{self.target_base}/ok"})
        self.assertEqual(code, 201, created)
        await self.until_state(created["id"], "succeeded")
        code, text = await self.call("GET", "/metrics")
        self.assertEqual(code, 200)
        found = {(s.name, tuple(sorted(s.labels.items()))): s.value
                 for family in text_string_to_metric_families(text.decode("utf-8"))
                 for s in family.samples}
        self.assertGreaterEqual(found[("quebert_deliveries_total",
                                       (("outcome", "succeeded"),))], 1)
        self.assertEqual(found[("quebert_state_store_healthy", ())], 1)
        ready = {labels: value for (name, labels), value in found.items()
                 if name == "quebert_amqp_connection_ready"}
        self.assertEqual(len(ready), 2, found)
        self.assertEqual(set(ready.values()), {1.0})
        node = f"127.0.0.1:5672/{self.amqp_url.rsplit('/', 1)[1]}"
        nodes = {labels: value for (name, labels), value in found.items()
                 if name == "quebert_amqp_connection_node"}
        self.assertEqual(nodes, {(("connection", "quebert-consumer"), ("node", node)): 1.0,
                                 (("connection", "quebert-publisher"), ("node", node)): 1.0})
        self.assertGreater(found[("process_resident_memory_bytes", ())], 0)
        code, _ = await self.call("GET", "/metrics", headers={})
        self.assertEqual(code, 401)

    async def test_health_and_auth(self) -> None:
        code, health = await self.call("GET", "/health", headers={})
        self.assertEqual((code, health["ready"], health["amqp"], health["redis"]),
                         (200, True, True, True))
        # the node each AMQP connection is on: the worker's two and the API's own
        node = f"127.0.0.1:5672/{self.amqp_url.rsplit('/', 1)[1]}"
        self.assertEqual(health["nodes"], {"quebert-consumer": node,
                                           "quebert-publisher": node,
                                           "client-publisher": node})
        code, error = await self.call("GET", "/tasks", headers={})
        self.assertEqual(code, 401)
        code, error = await self.call("GET", "/tasks",
                                      headers={"Authorization": ["Bearer wrong"]})
        self.assertEqual(code, 401)

    async def test_call_task_listing_and_unknown_task(self) -> None:
        code, created = await self.call("POST", "/tasks", {
            "kind": "call", "task": "it.add", "args": [2, 3]})
        self.assertEqual(code, 201, created)
        record = await self.until_state(created["id"], "succeeded")
        self.assertEqual(record["result"], 5)
        code, listing = await self.call("GET", "/tasks?state=succeeded")
        self.assertIn(created["id"], [t["id"] for t in listing["tasks"]])
        code, error = await self.call("POST", "/tasks", {"kind": "call", "task": "it.nope"})
        self.assertEqual((code, error["error"]["code"]), (422, "unknown_task"))
        code, error = await self.call("POST", "/tasks", {
            "kind": "call", "task": "it.add", "args": [1, 2, 3]})
        self.assertEqual(code, 400, error)

    async def test_schemathesis_against_the_worker_finds_no_server_errors(self) -> None:
        """The fuzzer against the real backend (RabbitMQ, Redis): no 5xx, no schema breach."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        arguments = [
            "-m", "schemathesis.cli", "run", f"{self.api}/openapi.json",
            "--header", f"Authorization: Bearer {TOKEN}",
            "--checks", "not_a_server_error,status_code_conformance,"
            "content_type_conformance,response_schema_conformance",
            "--max-examples", "15", "--seed", "20261125", "--request-timeout", "20",
            "--no-color",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEMATHESIS")}
        env["NO_COLOR"] = "1"
        out, err, code = await getProcessOutputAndValue(sys.executable, arguments, env=env,
                                                        path=workdir, reactor=reactor)
        report = (out + err).decode("utf-8", "replace")
        self.assertEqual(code, 0, f"schemathesis found problems:\n{report[-15000:]}")
        self.assertNotIn("Traceback", self.worker.log())


class StandaloneAPITests(TestCase):
    """``twistd quebert-api`` in front of a worker that has no API of its own."""

    timeout = 120

    async def test_push_through_the_standalone_api(self) -> None:
        amqp_url = make_vhost(self)
        prefix = f"quebert-test:{uuid.uuid4().hex[:12]}:"
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        api_port = free_port()
        api = WorkerProcess(self, amqp_url, REDIS_URL, prefix, queues=["default"],
                            extra=["--http-port", str(api_port), "--api-token", TOKEN],
                            name="api")
        api.args[api.args.index("amqp-worker")] = "quebert-api"
        api.start()
        worker = WorkerProcess(self, amqp_url, REDIS_URL, prefix).start()
        await worker.ready()
        base = f"http://127.0.0.1:{api_port}"

        async def healthy() -> bool:
            if not api.alive:
                raise AssertionError(api.log()[-3000:])
            try:
                response = await treq.get(f"{base}/health", agent=agent)
                await treq.content(response)
                return response.code == 200
            except Exception:
                return False

        await wait_for(healthy, 30, what="quebert-api to be ready")
        response = await treq.post(f"{base}/tasks", agent=agent, headers=AUTH,
                                   data=json.dumps({"kind": "call", "task": "it.add",
                                                    "args": [20, 22]}).encode())
        created = json.loads(await treq.content(response))
        self.assertEqual(response.code, 201, created)

        async def done() -> Any:
            response = await treq.get(f"{base}/tasks/{created['id']}", agent=agent,
                                      headers=AUTH)
            record = json.loads(await treq.content(response))
            return record if record["state"] == "succeeded" else None

        record = await wait_for(done, 30, what="the task to run")
        self.assertEqual(record["result"], 42)
        self.assertEqual(await api.stop(), 0)
        self.assertEqual(await worker.stop(), 0)

    async def test_standalone_api_needs_a_port(self) -> None:
        from tests._worker import ROOT, TWISTD

        out, err, code = await getProcessOutputAndValue(
            TWISTD, ["--pidfile=", "-n", "quebert-api"], path=ROOT, env=dict(os.environ),
            reactor=reactor)
        self.assertNotEqual(code, 0)
        self.assertIn(b"--http-port is required", out + err)

    async def test_port_in_use_is_one_clear_error(self) -> None:
        amqp_url = make_vhost(self)
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        api = WorkerProcess(self, amqp_url, REDIS_URL, "quebert-test:port:", queues=["default"],
                            extra=["--http-port", str(taken.getsockname()[1]),
                                   "--api-token", TOKEN], name="api")
        api.args[api.args.index("amqp-worker")] = "quebert-api"
        api.start()
        await wait_for(lambda: not api.alive, 30, what="quebert-api to exit")
        self.assertEqual(api.process.returncode, 1)
        self.assertIn("cannot serve the HTTP task API", api.log())
        self.assertNotIn("Traceback", api.log())

    async def test_bad_ports_are_usage_errors(self) -> None:
        from tests._worker import ROOT, TWISTD

        for port in ("70000", "-1", "http"):
            out, err, code = await getProcessOutputAndValue(
                TWISTD, ["--pidfile=", "-n", "quebert-api", "--http-port", port,
                         "--api-token", TOKEN], path=ROOT, env=dict(os.environ),
                reactor=reactor)
            self.assertNotEqual(code, 0)
            self.assertIn(b"port must be 0-65535", out + err)
            self.assertNotIn(b"Traceback", out + err)
