"""
An unmodified guillotina_amqp producer feeding a real ``twistd
amqp-worker``: the real RabbitMQ (a fresh vhost) and Redis (a fresh key
prefix), legacy bodies published with a plain pika ``BlockingConnection``
exactly as guillotina_amqp does (a direct durable exchange, routing key =
queue, no content type, no headers).

What is proven: legacy tasks run through the registry (an ``@task`` alias
and the ``legacy_tasks`` config block), see their plain context through
``quebert.current_task()``, end ``succeeded`` in quebert's state; and the
credentials a legacy body carries (``Authorization`` header, user token,
password and token in the URL) reach no message on the broker, no key of
the state store and no line of the worker's log.
"""

from __future__ import annotations

import json
import os
import uuid

import pika
from twisted.internet.threads import deferToThread

from quebert import Client, protocol
from tests import test_integration as integration
from tests._rabbit import queue_counts, read_all
from tests._redis import dump_prefixed
from tests._worker import WorkerProcess

EXCHANGE = "guillotina"
QUEUE = "legacy"
LEGACY_TASKS = {
    "legacy_app.jobs.whoami_thread": "it.whoami_thread",
    "legacy_app.jobs.fail_slowly": "it.fail_slowly",
    "legacy_app.jobs.always_fails": "it.always_fails",
}


def publish_like_guillotina(url: str, bodies: list) -> None:
    """What guillotina_amqp does, blocking: declare its exchange, publish bare bodies."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.exchange_declare(exchange=EXCHANGE, exchange_type="direct", durable=True)
        for body in bodies:
            channel.basic_publish(exchange=EXCHANGE, routing_key=QUEUE, body=body,
                                  mandatory=True)
    finally:
        connection.close()


class GuillotinaWorkerTests(integration.IntegrationTestCase):
    timeout = 180

    def setUp(self):
        super().setUp()
        tag = uuid.uuid4().hex[:12]
        #: Every credential a legacy body carries; none may leave the worker.
        self.secrets = [f"tok-{tag}", f"pw-{tag}", f"qs-{tag}", f"ck-{tag}", f"usr-{tag}"]

    def legacy_body(self, func: str, **changes) -> tuple[str, bytes]:
        """``(task_id, body)`` as guillotina_amqp publishes for a logged-in user."""
        token, password, query, cookie, user_token = self.secrets
        task_id = f"task:db-site-{uuid.uuid4()}"
        data = {
            "func": func, "args": [], "kwargs": {}, "task_id": task_id,
            "db_id": "db", "container_id": "site",
            "req_data": {
                "url": f"https://admin:{password}@cms.example.com/db/site/folder/doc"
                       f"?access_token={query}",
                "method": "POST",
                "headers": {"Authorization": f"Bearer {token}", "Cookie": f"auth={cookie}",
                            "Accept": "application/json"},
                "user": {"id": "alice", "roles": {"guillotina.Owner": 1},
                         "groups": ["Editors"], "Authorization": f"Bearer {token}"},
            },
            "user": {"id": "alice", "token": user_token},
            "annotations": {"jwt": token},
        }
        data.update(changes)
        return task_id, json.dumps(data).encode()

    def legacy_worker(self) -> WorkerProcess:
        config = os.path.abspath(self.mktemp())
        with open(config, "w", encoding="utf-8") as f:
            json.dump({"legacy_tasks": LEGACY_TASKS}, f)
        return self.worker("--exchange", EXCHANGE, "--config", config,
                           queues=(f"{QUEUE}:10",), name="legacy")

    def assert_no_secret(self, text: str, where: str) -> None:
        for secret in self.secrets:
            self.assertNotIn(secret, text, f"a credential reached {where}")

    async def test_legacy_tasks_run_with_their_plain_context(self):
        worker = self.legacy_worker().start()
        await worker.ready()
        by_alias, body1 = self.legacy_body("guillotina_app.tasks.whoami")
        by_config, body2 = self.legacy_body("legacy_app.jobs.whoami_thread")
        await deferToThread(publish_like_guillotina, self.url, [body1, body2])
        # a quebert producer sending a context reaches the same task the same way
        client = Client(self.url, state=self.state, exchange=EXCHANGE)
        self.addCleanup(client.close)
        sent = await client.add_task("it.whoami", _queue=QUEUE,
                                     _context={"db_id": "db2", "user_id": "bob"})

        records = await self.wait_states([by_alias, by_config, sent.id], worker=worker)
        self.assertEqual([r["state"] for r in records], ["succeeded"] * 3,
                         [r.get("error") for r in records])
        plain = {"db_id": "db", "container_id": "site", "user_id": "alice",
                 "path": "/db/site/folder/doc"}
        self.assertEqual(records[0]["result"], {
            "id": by_alias, "name": "it.whoami", "queue": QUEUE, "origin": "guillotina",
            "context": plain})
        self.assertEqual(records[0]["task"], "it.whoami")
        self.assertEqual(records[1]["result"], {
            "id": by_config, "name": "it.whoami_thread", "queue": QUEUE,
            "origin": "guillotina", "context": plain})
        self.assertEqual(records[2]["result"], {
            "id": sent.id, "name": "it.whoami", "queue": QUEUE, "origin": "quebert",
            "context": {"db_id": "db2", "user_id": "bob"}})

    async def test_credentials_never_leave_the_worker(self):
        worker = self.legacy_worker().start()
        await worker.ready()
        delayed, body1 = self.legacy_body("legacy_app.jobs.fail_slowly")
        failed, body2 = self.legacy_body("legacy_app.jobs.always_fails")
        unknown, body3 = self.legacy_body("guillotina_app.tasks.nobody_registered_this")
        invalid, body4 = self.legacy_body("guillotina_app.tasks.whoami", args="not a list")
        await deferToThread(publish_like_guillotina, self.url, [body1, body2, body3, body4])

        await self.wait_states([delayed], states=("scheduled",), worker=worker)
        records = await self.wait_states([failed, unknown, invalid], worker=worker)
        self.assertEqual([r["state"] for r in records], ["failed"] * 3)
        self.assertEqual(records[0]["attempts"], 3)  # retried twice through the delay queues
        self.assertEqual(records[1]["error"]["type"], "quebert.errors.UnknownTask")
        self.assertIn("'guillotina_app.tasks.nobody_registered_this' is not registered",
                      records[1]["reason"])
        self.assertEqual(records[2]["error"]["field"], "args")
        self.assertEqual(await worker.stop(), 0)  # (its exclusive queues go with it)

        # Every message left on the broker, delay queues and errored queue included.
        messages = {}
        for queue in sorted(await queue_counts(self.url)):
            messages[queue] = await deferToThread(read_all, self.url, queue)
        for queue, items in messages.items():
            for properties, body in items:
                self.assert_no_secret(body.decode("utf-8", "replace"), f"a body in {queue}")
                self.assert_no_secret(repr(properties), f"the properties of a copy in {queue}")
        by_id = {p.message_id: (queue, p, body) for queue, items in messages.items()
                 for p, body in items}
        queue, properties, body = by_id[delayed]
        self.assertTrue(queue.startswith((f"{EXCHANGE}.delay.", f"{EXCHANGE}.qdelay.")), queue)
        copy = protocol.decode(body, properties.content_type)
        self.assertEqual((copy.origin, copy.task, copy.context["user_id"]),
                         ("quebert", "it.fail_slowly", "alice"))
        for task_id in (failed, unknown, invalid):
            self.assertEqual(by_id[task_id][0], f"{QUEUE}.errored")
            self.assertEqual(by_id[task_id][1].content_type, protocol.CONTENT_TYPE)
        self.assertEqual(protocol.decode(by_id[unknown][2]).task,
                         "guillotina_app.tasks.nobody_registered_this")

        # Every key of this test's state, and the worker's log.
        keys = await dump_prefixed(self.redis, self.prefix)
        self.assertIn(delayed, keys)
        self.assert_no_secret(keys, "the state store")
        log = worker.log()
        self.assertIn(unknown, log)
        self.assert_no_secret(log, "the worker's log")

    def declare_like_guillotina_amqp(self) -> None:
        """The work queue as guillotina_amqp's worker declared it: with its own dead-lettering."""
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            channel = connection.channel()
            channel.exchange_declare(exchange=EXCHANGE, exchange_type="direct", durable=True)
            channel.queue_declare(QUEUE, durable=True, arguments={
                "x-dead-letter-exchange": EXCHANGE,
                "x-dead-letter-routing-key": f"{QUEUE}-error"})
            channel.queue_bind(QUEUE, EXCHANGE, routing_key=QUEUE)
        finally:
            connection.close()

    async def test_queue_declared_by_guillotina_amqp_is_used_as_it_is(self):
        """
        ``"existing": true``: the worker consumes the queue guillotina_amqp
        declared (with arguments quebert would not give it) instead of
        refusing it, and retries come back to it through the delay queues.
        """
        await deferToThread(self.declare_like_guillotina_amqp)
        config = os.path.abspath(self.mktemp())
        with open(config, "w", encoding="utf-8") as f:
            json.dump({"queues": {QUEUE: {"existing": True, "concurrency": 5}}}, f)
        worker = self.worker("--exchange", EXCHANGE, "--config", config, queues=(),
                             name="existing").start()
        await worker.ready()
        marks = os.path.abspath(self.mktemp())
        task_id, body = self.legacy_body("it.flaky", kwargs={"path": marks, "failures": 1})
        await deferToThread(publish_like_guillotina, self.url, [body])
        [record] = await self.wait_states([task_id], worker=worker)
        self.assertEqual((record["state"], record["attempts"]), ("succeeded", 2),
                         record.get("error"))
        self.assertEqual(await worker.stop(), 0)

    async def test_queue_declared_by_guillotina_amqp_is_used_without_existing_too(self):
        """
        Without ``"existing"`` the worker meets ``406 PRECONDITION_FAILED``
        declaring the queue, uses it as it is all the same and says so.
        """
        await deferToThread(self.declare_like_guillotina_amqp)
        worker = self.worker("--exchange", EXCHANGE, queues=(QUEUE,), name="mismatch").start()
        await worker.ready()
        task_id, body = self.legacy_body("it.add", args=[2, 3])
        await deferToThread(publish_like_guillotina, self.url, [body])
        [record] = await self.wait_states([task_id], worker=worker)
        self.assertEqual(record["state"], "succeeded", record.get("error"))
        log = worker.log()
        self.assertIn(f"queue {QUEUE} exists with other arguments", log)
        self.assertIn("PRECONDITION_FAILED", log)
        self.assertEqual(await worker.stop(), 0)
