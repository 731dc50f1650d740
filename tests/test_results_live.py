"""
Results end to end: a real ``twistd amqp-worker`` on RabbitMQ and Redis,
waited on with ``Client.result``/``TaskInfo.result``, over its HTTP API
(``GET /tasks/{id}?wait=``) and with ``quebert wait``.
"""

from __future__ import annotations

import json
import time
import uuid

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from quebert.client import Client
from quebert.errors import ResultTimeout, TaskCanceled, TaskFailed
from quebert.state.redis import RedisStateManager, connect_redis
from tests._example import free_port
from tests._rabbit import make_vhost
from tests._redis import REDIS_URL, delete_prefixed
from tests._worker import WorkerProcess, wait_for
from tests.test_cli import run_cli

TOKEN = "results-token-0123456789"


class LiveResultsTests(TestCase):
    """One worker per test; the client is this test process."""

    timeout = 180

    async def setUp(self) -> None:
        self.amqp_url = make_vhost(self)
        self.prefix = f"quebert-test-res-{uuid.uuid4().hex[:12]}:"
        self.redis = connect_redis(REDIS_URL)
        self.addCleanup(self.redis.disconnect)
        self.addCleanup(lambda: delete_prefixed(self.redis, self.prefix))
        self.state = RedisStateManager(self.redis, prefix=self.prefix)
        self.client = Client(self.amqp_url, state=self.state)
        self.addCleanup(self.client.close)
        self.api_port = free_port()
        self.worker = WorkerProcess(
            self, self.amqp_url, REDIS_URL, self.prefix, tasks=("tests.tasks_results",),
            queues=("default:50",),
            extra=["--http-port", str(self.api_port), "--api-token", TOKEN,
                   "--shutdown-timeout", "5"]).start()
        await self.worker.ready()

    async def test_results_failures_and_cancellations_reach_the_waiter(self) -> None:
        info = await self.client.add_task("res.square", 7)
        self.assertEqual(await info.result(timeout=30), {"x": 7, "square": 49})
        # after it finished: answers at once
        started = time.monotonic()
        self.assertEqual((await self.client.result(info.id, timeout=30))["square"], 49)
        self.assertLess(time.monotonic() - started, 1)

        refused = await self.client.add_task("res.refuse", "not today")
        with self.assertRaises(TaskFailed) as caught:
            await refused.result(timeout=30)
        self.assertEqual((caught.exception.type, caught.exception.message,
                          caught.exception.attempts),
                         ("quebert.errors.Reject", "not today", 1))

        bad = await self.client.add_task("res.returns_set")
        with self.assertRaises(TaskFailed) as caught:
            await bad.result(timeout=30)
        self.assertEqual(caught.exception.type, "quebert.errors.InvalidResult")
        self.assertIn("returned a set, which is not JSON", caught.exception.reason)

        slow = await self.client.add_task("res.sleep", 60)
        with self.assertRaises(ResultTimeout) as caught:
            await slow.result(timeout=0.5)
        self.assertIn(caught.exception.state, ("queued", "running"))
        waiting = slow.result(timeout=30)
        await wait_for(lambda: self._running(slow.id), 10, what="the task to run")
        await self.client.cancel(slow.id)
        with self.assertRaises(TaskCanceled):
            await waiting

    async def _running(self, task_id: str) -> bool:
        record = await self.state.get(task_id)
        return record is not None and record["state"] == "running"

    async def test_thousands_of_waits_on_one_subscription(self) -> None:
        count = 2000
        infos = await defer.gatherResults(
            [self.client.add_task("res.square", i) for i in range(count)])
        waits = [info.result(timeout=120) for info in infos]
        results = await defer.gatherResults(waits)
        self.assertEqual([r["square"] for r in results], [i * i for i in range(count)])
        reply = await self.redis.execute_command("PUBSUB", "NUMSUB",
                                                 self.state.settled_channel)
        self.assertEqual(int(reply[1]), 1, "one subscription for every wait")

    async def test_http_wait(self) -> None:
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        base = f"http://127.0.0.1:{self.api_port}"
        auth = {"Authorization": f"Bearer {TOKEN}"}

        async def healthy() -> bool:
            try:
                response = await treq.get(f"{base}/health", agent=agent)
                await treq.content(response)
                return response.code == 200
            except Exception:
                return False

        await wait_for(healthy, 30, what="the API")
        response = await treq.post(f"{base}/tasks", json={"kind": "call", "task": "res.sleep",
                                                           "args": [0.5]},
                                   headers=auth, agent=agent)
        task_id = (await response.json())["id"]
        started = time.monotonic()
        response = await treq.get(f"{base}/tasks/{task_id}?wait=30", headers=auth,
                                  agent=agent)
        record = await response.json()
        self.assertEqual((response.code, record["state"], record["result"]),
                         (200, "succeeded", 0.5))
        self.assertLess(time.monotonic() - started, 10)

    async def test_quebert_wait_exit_codes(self) -> None:
        env = {"QUEBERT_AMQP_URL": self.amqp_url, "QUEBERT_REDIS_URL": REDIS_URL}

        def wait(*args: str):
            return run_cli("wait", *args, "--prefix", self.prefix, env=env)

        ok = await self.client.add_task("res.square", 3)
        result = await wait(ok.id, "--timeout", "30")
        self.assertEqual((result.code, json.loads(result.out)), (0, {"square": 9, "x": 3}),
                         result)
        result = await wait(ok.id, "--record")
        self.assertEqual((result.code, json.loads(result.out)["state"]), (0, "succeeded"))

        failed = await self.client.add_task("res.refuse", "no")
        result = await wait(failed.id, "--timeout", "30")
        self.assertEqual((result.code, result.out), (4, ""), result)
        self.assertIn("failed after 1 attempt(s): quebert.errors.Reject: no", result.err)

        slow = await self.client.add_task("res.sleep", 60)
        result = await wait(slow.id, "--timeout", "0.5")
        self.assertEqual(result.code, 6, result)
        self.assertIn(f"task {slow.id} did not finish within 0.5 s", result.err)
        await wait_for(lambda: self._running(slow.id), 10, what="the task to run")
        await self.client.cancel(slow.id)
        result = await wait(slow.id)
        self.assertEqual(result.code, 5, result)
        self.assertIn("was canceled", result.err)

        result = await wait("no-such-task")
        self.assertEqual((result.code, result.err.strip()),
                         (1, "quebert: error: no such task: no-such-task"))
