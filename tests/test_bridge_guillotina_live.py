"""
The Guillotina bridge for real: a Guillotina 7 application (uvicorn, in a
subprocess, DUMMY_FILE database) with ``quebert.bridge.guillotina`` and
``tests.guillotina_bridge_app``, the real RabbitMQ (a fresh vhost) and
Redis (a fresh prefix), treq as the HTTP client; the last test adds a real
``twistd amqp-worker`` that runs a task published from Guillotina.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import uuid
from typing import Any

import pika
import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from quebert import protocol
from tests._guillotina import ROOT_USER, GuillotinaProcess, settings_for
from tests._rabbit import (
    _rabbitmqctl_sync,
    make_vhost,
    queue_counts,
    rabbitmqctl,
    read_all,
    vhost_of,
)
from tests._redis import REDIS_URL, dump_prefixed, isolated_redis
from tests._worker import WorkerProcess, wait_for
from tests.guillotina_bridge_app import OPERATOR_TOKEN

SERVICE_TOKEN = "service-" + uuid.uuid4().hex
QUEUE = "bridge-test"
ROOT_AUTH = "Basic " + base64.b64encode(":".join(ROOT_USER).encode()).decode()
#: What would betray the caller's credentials if it were copied anywhere.
SECRETS = (ROOT_AUTH, ROOT_AUTH.split()[1], "Basic ", "Authorization", "authorization",
           ROOT_USER[1] + "\"")


class _BridgeTestCase(TestCase):
    """
    One application per test, with containers ``c1`` and ``c2``;
    ``app_redis_url`` and ``quebert_settings`` change what it is given.
    """

    timeout = 120
    #: More keys of the application's ``app_settings["quebert"]``.
    quebert_settings: dict = {}

    def app_redis_url(self) -> str:
        return REDIS_URL

    async def setUp(self) -> None:
        self.amqp_url = make_vhost(self, "quebert-bridge")
        self.vhost = vhost_of(self.amqp_url)
        self.redis, self.prefix = await isolated_redis(self)
        self.app = GuillotinaProcess(self, settings_for(
            self, self.amqp_url, self.app_redis_url(), self.prefix,
            service_token=SERVICE_TOKEN, **self.quebert_settings))
        await self.app.start()
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=pool)
        for container in ("c1", "c2"):
            status, _ = await self.call("POST", "/db", {"@type": "Container", "id": container})
            self.assertIn(status, (200, 201))

    async def call(self, method: str, path: str, body: Any = None,
                   auth: Any = ROOT_AUTH) -> tuple:
        """``(status, JSON answer)`` of a request to the application."""
        headers = {"Content-Type": ["application/json"]}
        if auth is not None:
            headers["Authorization"] = [auth]
        data = None if body is None else json.dumps(body).encode()
        response = await treq.request(method, self.app.base_url + path, data=data,
                                      headers=headers, agent=self.agent)
        content = await treq.content(response)
        try:
            answer = json.loads(content)
        except ValueError:
            answer = content.decode(errors="replace")
        return response.code, answer

    async def enqueue(self, container: str = "c1", **body: Any) -> str:
        status, answer = await self.call("POST", f"/db/{container}/@bridge-test-enqueue", body)
        self.assertEqual(status, 200, answer)
        self.assertTrue(answer["has_task_id"])
        return answer["task_id"]


class GuillotinaBridgeTests(_BridgeTestCase):
    """The bridge with a working RabbitMQ and Redis."""

    # -- publishing --------------------------------------------------------------

    async def test_message_is_a_v1_body_with_context_and_no_credentials(self) -> None:
        task_id = await self.enqueue(kind="decorated", args=["/a"], kwargs={"times": 2})
        self.assertTrue(task_id.startswith("task:db-c1-"), task_id)
        status, record = await self.call("GET", f"/db/c1/@amqp-tasks/{task_id}")
        self.assertEqual((status, record["state"], record["queue"], record["task"]),
                         (200, "queued", QUEUE, "bridge_test.touch"))
        stored = await dump_prefixed(self.redis, self.prefix)
        self.assertIn(task_id, stored)
        for secret in SECRETS:
            self.assertNotIn(secret, stored)

        [(properties, body)] = read_all(self.amqp_url, QUEUE)
        message = protocol.decode(body, properties.content_type)
        self.assertEqual((message.id, message.task, message.args, dict(message.kwargs)),
                         (task_id, "bridge_test.touch", ("/a",), {"times": 2}))
        self.assertEqual((properties.content_type, properties.delivery_mode,
                          properties.message_id), ("application/json", 2, task_id))
        self.assertEqual(json.loads(body)["context"],
                         {"db_id": "db", "container_id": "c1", "user_id": "root", "path": "/"})
        raw = body.decode() + repr(properties.headers)
        for secret in SECRETS:
            self.assertNotIn(secret, raw)

    async def test_add_task_by_name_checks_arguments(self) -> None:
        task_id = await self.enqueue(kind="add_task", task="bridge_test.plain", args=[7])
        [(_, body)] = read_all(self.amqp_url, QUEUE)
        self.assertEqual(protocol.decode(body).args, (7,))
        self.assertEqual(json.loads(body)["id"], task_id)
        status, answer = await self.call("POST", "/db/c1/@bridge-test-enqueue",
                                         {"kind": "add_task", "task": "bridge_test.plain",
                                          "args": [1, 2]})
        self.assertEqual((status, answer["type"]), (412, "InvalidMessage"))
        status, answer = await self.call("POST", "/db/c1/@bridge-test-enqueue",
                                         {"kind": "add_task", "args": [1],
                                          "kwargs": {"_retries": 3}})
        self.assertEqual((status, answer["type"]), (412, "ConfigurationError"))
        self.assertIn("_retries", answer["reason"])

    async def test_url_task_calls_back_without_credentials(self) -> None:
        task_id = await self.enqueue(kind="url", path="@bridge-test-callback", body={"a": 1})
        [(properties, body)] = read_all(self.amqp_url, "default")
        message = protocol.decode(body, properties.content_type)
        self.assertEqual((message.id, message.kind, message.method, message.url),
                         (task_id, "url", "POST",
                          self.app.base_url + "/db/c1/@bridge-test-callback"))
        self.assertEqual(dict(message.headers), {"Content-Type": "application/json"})
        self.assertEqual(json.loads(body)["context"]["container_id"], "c1")
        for secret in SECRETS:
            self.assertNotIn(secret, body.decode())

        status, answer = await self.call("POST", "/db/c1/@bridge-test-enqueue", {
            "kind": "url", "path": "/db/c1/@bridge-test-callback",
            "headers": {"authorization": "Bearer stolen"}})
        self.assertEqual((status, answer["type"]), (412, "ConfigurationError"))
        self.assertIn("credentials never travel", answer["reason"])
        self.assertEqual(read_all(self.amqp_url, "default"), [])

    # -- the service token ---------------------------------------------------------

    async def test_service_token_authenticates_the_callback(self) -> None:
        path = "/db/c1/@bridge-test-callback"
        status, answer = await self.call("POST", path, {"x": 1}, auth=f"Bearer {SERVICE_TOKEN}")
        self.assertEqual((status, answer.get("user"), answer.get("body")),
                         (200, "quebert-service", {"x": 1}), answer)
        for auth in (f"Bearer {SERVICE_TOKEN[:-1]}x", f"Bearer {SERVICE_TOKEN}x", None,
                     f"Basic {base64.b64encode(SERVICE_TOKEN.encode()).decode()}"):
            status, answer = await self.call("POST", path, {"x": 1}, auth=auth)
            self.assertIn(status, (401, 403), (auth, answer))
        # The service principal may call back, not manage tasks.
        status, _ = await self.call("GET", "/db/c1/@amqp-tasks", auth=f"Bearer {SERVICE_TOKEN}")
        self.assertIn(status, (401, 403))

    # -- the endpoints ---------------------------------------------------------------

    async def test_list_and_read_tasks_of_a_container(self) -> None:
        first = await self.enqueue(kind="add_task", args=[1])
        second = await self.enqueue(kind="decorated", args=["/b"])
        other = await self.enqueue("c2", kind="add_task", args=[2])
        status, ids = await self.call("GET", "/db/c1/@amqp-tasks")
        self.assertEqual((status, ids), (200, [second, first]))
        status, ids = await self.call("GET", "/db/c2/@amqp-tasks")
        self.assertEqual((status, ids), (200, [other]))

        status, record = await self.call("GET", f"/db/c1/@amqp-tasks/{second}")
        self.assertEqual((status, record["id"], record["state"]), (200, second, "queued"))
        self.assertEqual(record["job_data"]["args"], ["/b"])
        self.assertEqual(record["job_data"]["context"]["user_id"], "root")

        operator = f"Bearer {OPERATOR_TOKEN}"
        status, record = await self.call("GET", f"/db/c1/@amqp-tasks/{second}", auth=operator)
        self.assertEqual((status, record["state"]), (200, "queued"))
        self.assertNotIn("job_data", record)
        status, ids = await self.call("GET", "/db/c1/@amqp-tasks", auth=operator)
        self.assertEqual((status, ids), (200, [second, first]))

        for auth in (None, f"Bearer {SERVICE_TOKEN}"):
            for method, path in (("GET", "/db/c1/@amqp-tasks"),
                                 ("GET", f"/db/c1/@amqp-tasks/{second}"),
                                 ("DELETE", f"/db/c1/@amqp-tasks/{second}")):
                status, _ = await self.call(method, path, auth=auth)
                self.assertIn(status, (401, 403), (method, path, auth))
        status, _ = await self.call("POST", "/db/c1/@bridge-test-enqueue",
                                    {"kind": "add_task", "args": [1]}, auth=None)
        self.assertIn(status, (401, 403))

    async def test_unknown_and_foreign_ids_are_not_found(self) -> None:
        theirs = await self.enqueue("c2", kind="add_task", args=[2])
        for task_id in ("nope", theirs, "task:db-c1-" + uuid.uuid4().hex):
            for method in ("GET", "DELETE"):
                status, answer = await self.call(method, f"/db/c1/@amqp-tasks/{task_id}")
                self.assertEqual((status, answer), (404, {"reason": "Task not found"}),
                                 (method, task_id))
        status, record = await self.call("GET", f"/db/c2/@amqp-tasks/{theirs}")
        self.assertEqual((status, record["state"]), (200, "queued"))

    async def test_delete_cancels_and_tells_the_workers(self) -> None:
        task_id = await self.enqueue(kind="decorated", args=["/c"])
        # A queue on the control exchange, as a worker binds one.
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        self.addCleanup(connection.close)
        channel = connection.channel()
        control = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(control, "quebert.control")

        status, record = await self.call("DELETE", f"/db/c1/@amqp-tasks/{task_id}")
        self.assertEqual((status, record["id"], record["state"]), (200, task_id, "canceled"))
        status, record = await self.call("GET", f"/db/c1/@amqp-tasks/{task_id}")
        self.assertEqual((status, record["state"]), (200, "canceled"))
        status, record = await self.call("DELETE", f"/db/c1/@amqp-tasks/{task_id}")
        self.assertEqual((status, record["state"]), (200, "canceled"))

        _, properties, body = channel.basic_get(control, auto_ack=True)
        self.assertEqual(json.loads(body)["type"], "cancel")
        self.assertEqual(json.loads(body)["id"], task_id)
        self.assertEqual((properties.content_type, properties.delivery_mode),
                         ("application/json", 1))
        self.assertEqual(channel.basic_get(control, auto_ack=True)[0], None)

    async def test_no_twisted_reactor_in_the_application(self) -> None:
        """Publishing, listing, reading and cancelling never import a Twisted reactor."""
        first = await self.enqueue(kind="add_task", args=[1])
        await self.enqueue(kind="decorated", args=["/e"])
        await self.enqueue(kind="url", path="@bridge-test-callback", body={"a": 1})
        status, ids = await self.call("GET", "/db/c1/@amqp-tasks")
        self.assertEqual((status, len(ids)), (200, 3))
        status, record = await self.call("GET", f"/db/c1/@amqp-tasks/{first}")
        self.assertEqual(status, 200)
        status, record = await self.call("DELETE", f"/db/c1/@amqp-tasks/{first}")
        self.assertEqual((status, record["state"]), (200, "canceled"))
        status, answer = await self.call("GET", "/db/c1/@bridge-test-modules")
        self.assertEqual((status, answer), (200, {"twisted.internet.reactor": False}))

    # -- a worker runs it -------------------------------------------------------------

    async def test_worker_runs_a_task_published_from_guillotina(self) -> None:
        worker = WorkerProcess(self, self.amqp_url, REDIS_URL, self.prefix,
                               tasks=("tests.guillotina_bridge_tasks",), queues=(QUEUE,))
        worker.start()
        await worker.ready()
        task_id = await self.enqueue(kind="decorated", args=["/d"], kwargs={"times": 3})

        async def done() -> Any:
            status, record = await self.call("GET", f"/db/c1/@amqp-tasks/{task_id}")
            return record if record.get("state") == "succeeded" else None

        record = await wait_for(done, 30, what="the task to succeed")
        self.assertEqual(record["result"], {"path": "/d", "times": 3})
        self.assertEqual(record["attempts"], 1)

    async def test_get_result_of_tasks_run_by_a_worker(self) -> None:
        """
        ``get_result`` in the application: the value of a task a worker ran
        (a wait begun before it finished, and one after), ``TaskCanceled``
        for a task cancelled with ``DELETE @amqp-tasks/{id}`` while a wait
        is pending, ``TaskNotFound`` for an unknown id; and still no
        Twisted reactor in the application.
        """
        worker = WorkerProcess(self, self.amqp_url, REDIS_URL, self.prefix,
                               tasks=("tests.guillotina_bridge_tasks",), queues=(QUEUE,))
        worker.start()
        await worker.ready()

        async def result(task_id: str, timeout: float = 30) -> tuple:
            return await self.call("POST", "/db/c1/@bridge-test-result",
                                   {"task_id": task_id, "timeout": timeout})

        slow = await self.enqueue(kind="add_task", task="bridge_test.slow", args=[1])
        status, answer = await result(slow)
        self.assertEqual((status, answer), (200, {"result": {
            "db_id": "db", "container_id": "c1", "user_id": "root", "path": "/"}}))
        touched = await self.enqueue(kind="decorated", args=["/r"], kwargs={"times": 2})
        status, answer = await result(touched)
        self.assertEqual((status, answer), (200, {"result": {"path": "/r", "times": 2}}))
        status, answer = await result(touched)  # settled before: at once
        self.assertEqual(answer, {"result": {"path": "/r", "times": 2}})

        stopped = await self.enqueue(kind="add_task", task="bridge_test.slow", args=[30])
        waiting = defer.ensureDeferred(result(stopped))

        async def running() -> bool:
            status, record = await self.call("GET", f"/db/c1/@amqp-tasks/{stopped}")
            return record.get("state") == "running"

        await wait_for(running, 30, what="the slow task to run")
        status, _ = await self.call("DELETE", f"/db/c1/@amqp-tasks/{stopped}")
        self.assertEqual(status, 200)
        status, answer = await waiting
        self.assertEqual((status, answer["type"]), (412, "TaskCanceled"), answer)

        status, answer = await result("task:db-c1-" + uuid.uuid4().hex)
        self.assertEqual((status, answer["type"]), (412, "TaskNotFound"), answer)
        status, answer = await self.call("GET", "/db/c1/@bridge-test-modules")
        self.assertEqual((status, answer), (200, {"twisted.internet.reactor": False}))
        self.assertEqual(await worker.stop(), 0)

    async def test_url_callback_and_cancel_through_a_worker(self) -> None:
        """
        A worker holding the service token (``dispatch.credentials``) runs
        a URL task that calls back into the application, which sees the
        service principal; a running task cancelled with ``DELETE
        @amqp-tasks/{id}`` ends ``canceled``; and no credential of the
        caller or of the service is left in RabbitMQ or Redis.
        """
        config = os.path.abspath(self.mktemp())
        with open(config, "w", encoding="utf-8") as f:
            json.dump({"dispatch": {"credentials": [{
                "url_prefix": self.app.base_url + "/db/",
                "token_env": "BRIDGE_TEST_SERVICE_TOKEN"}]}}, f)
        worker = WorkerProcess(self, self.amqp_url, REDIS_URL, self.prefix,
                               tasks=("tests.guillotina_bridge_tasks",),
                               queues=(QUEUE, "default"), extra=("--config", config),
                               env={"BRIDGE_TEST_SERVICE_TOKEN": SERVICE_TOKEN})
        worker.start()
        await worker.ready()

        callback = await self.enqueue(kind="url", path="@bridge-test-callback",
                                      body={"order": 17})
        slow = await self.enqueue(kind="add_task", task="bridge_test.slow", args=[30])

        async def state_of(task_id: str, *states: str) -> Any:
            status, record = await self.call("GET", f"/db/c1/@amqp-tasks/{task_id}")
            return record if record.get("state") in states else None

        record = await wait_for(lambda: state_of(callback, "succeeded", "failed"), 30,
                                what="the callback task to end")
        self.assertEqual(record["state"], "succeeded", record.get("error"))
        self.assertEqual(json.loads(record["result"]["body"]),
                         {"user": "quebert-service", "body": {"order": 17}})

        await wait_for(lambda: state_of(slow, "running"), 30, what="the slow task to run")
        status, record = await self.call("DELETE", f"/db/c1/@amqp-tasks/{slow}")
        self.assertEqual(status, 200, record)
        record = await wait_for(lambda: state_of(slow, "canceled"), 10,
                                what="the running task to be canceled")
        self.assertEqual(record["attempts"], 1)
        self.assertIn("canceled while attempt 1 ran", record["reason"])
        status, ids = await self.call("GET", "/db/c1/@amqp-tasks")
        self.assertEqual(ids, [slow, callback])
        self.assertEqual(await worker.stop(), 0)

        secrets = SECRETS + (SERVICE_TOKEN,)
        stored = await dump_prefixed(self.redis, self.prefix)
        self.assertIn(slow, stored)
        left = [(queue, properties, body) for queue in await queue_counts(self.amqp_url)
                for properties, body in read_all(self.amqp_url, queue)]
        for secret in secrets:
            self.assertNotIn(secret, stored)
            self.assertNotIn(secret, repr(left))
            self.assertNotIn(secret, worker.log())

    # -- unique names -------------------------------------------------------------------

    async def test_a_live_name_is_refused(self) -> None:
        named = {"kind": "add_task", "args": [1], "kwargs": {"_name": "nightly"}}
        first = await self.enqueue(**named)
        status, answer = await self.call("POST", "/db/c1/@bridge-test-enqueue", named)
        self.assertEqual((status, answer["type"]), (412, "TaskAlreadyExists"), answer)
        self.assertIn(first, answer["reason"])
        status, ids = await self.call("GET", "/db/c1/@amqp-tasks")
        self.assertEqual((status, ids), (200, [first]))
        self.assertEqual(len(read_all(self.amqp_url, QUEUE)), 1)
        # Another container publishing the same name meets the same task.
        status, answer = await self.call("POST", "/db/c2/@bridge-test-enqueue", named)
        self.assertEqual((status, answer["type"]), (412, "TaskAlreadyExists"), answer)

    async def test_concurrent_enqueues_of_one_name_publish_once(self) -> None:
        named = {"kind": "add_task", "args": [1], "kwargs": {"_name": "once"}}
        answers = await defer.gatherResults([
            defer.ensureDeferred(self.call("POST", f"/db/{container}/@bridge-test-enqueue",
                                           named))
            for container in ("c1", "c2") * 4])
        won = [answer["task_id"] for status, answer in answers if status == 200]
        refused = [answer for status, answer in answers
                   if status == 412 and answer["type"] == "TaskAlreadyExists"]
        self.assertEqual((len(won), len(refused)), (1, 7), answers)
        [(_, body)] = read_all(self.amqp_url, QUEUE)
        self.assertEqual(json.loads(body)["id"], won[0])
        self.assertEqual(await self.redis.get(f"{self.prefix}name:once"), won[0])

    async def test_a_refused_publish_frees_the_name(self) -> None:
        """
        RabbitMQ refuses the message (the work queue was declared by
        someone else, full at once and rejecting publishes; the bridge uses
        a queue that exists with other arguments as it is): the name is
        released and the task recorded ``failed`` with the reason; once the
        queue is fixed, the same call takes the name.
        """
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        channel = connection.channel()
        channel.queue_declare(QUEUE, durable=True, arguments={
            "x-max-length": 0, "x-overflow": "reject-publish"})
        named = {"kind": "add_task", "args": [1], "kwargs": {"_name": "refused"}}
        status, answer = await self.call("POST", "/db/c1/@bridge-test-enqueue", named)
        self.assertEqual((status, answer["type"]), (412, "PublishError"), answer)
        self.assertIn("refused the message", answer["reason"])
        self.assertIsNone(await self.redis.get(f"{self.prefix}name:refused"))
        status, [failed] = await self.call("GET", "/db/c1/@amqp-tasks")
        status, record = await self.call("GET", f"/db/c1/@amqp-tasks/{failed}")
        self.assertEqual((status, record["state"]), (200, "failed"), record)
        self.assertIn("publishing the task failed", record["reason"])

        channel.queue_delete(QUEUE)
        connection.close()
        task_id = await self.enqueue(**named)
        self.assertEqual(await self.redis.get(f"{self.prefix}name:refused"), task_id)
        status, ids = await self.call("GET", "/db/c1/@amqp-tasks")
        self.assertEqual(ids, [task_id, failed])
        [(_, body)] = read_all(self.amqp_url, QUEUE)
        self.assertEqual(json.loads(body)["id"], task_id)

    # -- a finished task ------------------------------------------------------------------

    async def test_delete_of_a_succeeded_task_is_a_conflict(self) -> None:
        worker = WorkerProcess(self, self.amqp_url, REDIS_URL, self.prefix,
                               tasks=("tests.guillotina_bridge_tasks",), queues=(QUEUE,))
        worker.start()
        await worker.ready()
        task_id = await self.enqueue(kind="decorated", args=["/e"])

        async def done() -> Any:
            status, record = await self.call("GET", f"/db/c1/@amqp-tasks/{task_id}")
            return record if record.get("state") == "succeeded" else None

        before = await wait_for(done, 30, what="the task to succeed")
        self.assertEqual(await worker.stop(), 0)
        status, answer = await self.call("DELETE", f"/db/c1/@amqp-tasks/{task_id}")
        self.assertEqual(status, 409, answer)
        self.assertEqual((answer["reason"], answer["state"]),
                         ("Task already succeeded", "succeeded"))
        self.assertEqual(answer["task"]["id"], task_id)
        status, after = await self.call("GET", f"/db/c1/@amqp-tasks/{task_id}")
        self.assertEqual(status, 200)
        self.assertEqual(after, before)
        self.assertNotIn("cancel_requested", await self.redis.hgetall(
            f"{self.prefix}task:{task_id}"))


async def close_connections(vhost: str) -> list:
    """Have RabbitMQ close every connection to ``vhost`` (and only those); their pids."""
    out = await rabbitmqctl("list_connections", "vhost", "pid")
    pids = [line.split("\t", 1)[1] for line in out.splitlines()
            if line.split("\t", 1)[0] == vhost]
    for pid in pids:
        await rabbitmqctl("close_connection", pid, "closed by quebert's tests")
    return pids


class BrokerOutageTests(_BridgeTestCase):
    """The publisher when RabbitMQ closes its connection or refuses it."""

    #: Low, so that a refused publish fails fast; the reconnection must fit in it.
    quebert_settings = {"publish_timeout": 3.0}

    async def enqueue_timed(self, body: dict) -> tuple:
        started = time.monotonic()
        status, answer = await self.call("POST", "/db/c1/@bridge-test-enqueue", body)
        return status, answer, time.monotonic() - started

    async def test_next_publish_reconnects(self) -> None:
        first = await self.enqueue(kind="add_task", args=[1])
        self.assertTrue(await close_connections(self.vhost))
        status, answer, took = await self.enqueue_timed({"kind": "add_task", "args": [2]})
        self.assertEqual(status, 200, answer)
        self.assertLess(took, 3.0 + 1.0)
        # And again at once: a second close soon after the reconnection.
        self.assertTrue(await close_connections(self.vhost))
        status, third, took = await self.enqueue_timed({"kind": "add_task", "args": [3]})
        self.assertEqual(status, 200, third)
        self.assertLess(took, 3.0 + 1.0)
        bodies = [json.loads(body) for _, body in read_all(self.amqp_url, QUEUE)]
        self.assertEqual([b["args"] for b in bodies], [[1], [2], [3]])
        status, ids = await self.call("GET", "/db/c1/@amqp-tasks")
        self.assertEqual(ids, [third["task_id"], answer["task_id"], first])

    async def test_refused_broker_fails_within_publish_timeout(self) -> None:
        """
        While the vhost refuses the application, a publish fails with a
        ``BrokerError`` within ``publish_timeout`` and leaves no task to
        list: an unnamed task keeps only its (unlisted) index entry, a named
        one is recorded ``failed`` and its name freed.  Once the broker
        accepts it again, the next publish goes through.
        """
        first = await self.enqueue(kind="add_task", args=[1])
        await rabbitmqctl("clear_permissions", "-p", self.vhost, "guest")
        self.addCleanup(_rabbitmqctl_sync, "set_permissions", "-p", self.vhost, "guest",
                        ".*", ".*", ".*")
        self.assertTrue(await close_connections(self.vhost))

        status, answer, took = await self.enqueue_timed({"kind": "add_task", "args": [2]})
        self.assertEqual((status, answer.get("type")), (412, "BrokerError"), answer)
        self.assertIn("failed within 3s", answer["reason"])
        self.assertLess(took, 3.0 + 1.0)
        status, ids = await self.call("GET", "/db/c1/@amqp-tasks")
        self.assertEqual((status, ids), (200, [first]))
        index = await self.redis.zrange(f"{self.prefix}guillotina:container:db/c1", 0, -1)
        [unpublished] = [task_id for task_id in index if task_id != first]
        status, _ = await self.call("GET", f"/db/c1/@amqp-tasks/{unpublished}")
        self.assertEqual(status, 404)

        named = {"kind": "add_task", "args": [3], "kwargs": {"_name": "during-outage"}}
        status, answer, took = await self.enqueue_timed(named)
        self.assertEqual((status, answer.get("type")), (412, "BrokerError"), answer)
        self.assertLess(took, 3.0 + 1.0)
        self.assertIsNone(await self.redis.get(f"{self.prefix}name:during-outage"))

        await rabbitmqctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
        status, answer, took = await self.enqueue_timed(named)
        self.assertEqual(status, 200, answer)
        self.assertLess(took, 3.0 + 1.0)
        bodies = [json.loads(body) for _, body in read_all(self.amqp_url, QUEUE)]
        self.assertEqual([b["args"] for b in bodies], [[1], [3]])
        status, ids = await self.call("GET", "/db/c1/@amqp-tasks")
        self.assertEqual(ids[0], answer["task_id"])


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisDownTests(_BridgeTestCase):
    """The application's Redis is a closed port: the endpoints say so."""

    def app_redis_url(self) -> str:
        return f"redis://127.0.0.1:{closed_port()}/0"

    async def test_endpoints_answer_503(self) -> None:
        for method, path in (("GET", "/db/c1/@amqp-tasks"),
                             ("GET", "/db/c1/@amqp-tasks/task:db-c1-x"),
                             ("DELETE", "/db/c1/@amqp-tasks/task:db-c1-x")):
            started = time.monotonic()
            status, answer = await self.call(method, path)
            self.assertEqual(status, 503, (method, path, answer))
            self.assertIsInstance(answer, dict, answer)
            self.assertIn("quebert is not reachable", answer["reason"])
            self.assertNotIn("Traceback", json.dumps(answer))
            self.assertLess(time.monotonic() - started, 10)
        # Publishing from a container needs the index: refused, not half-done.
        status, answer = await self.call("POST", "/db/c1/@bridge-test-enqueue",
                                         {"kind": "add_task", "args": [1]})
        self.assertEqual((status, answer.get("type")), (412, "StateError"), answer)
        self.assertEqual(await queue_counts(self.amqp_url, QUEUE), (0, 0))
