"""
End-to-end tests: real ``twistd amqp-worker`` processes, the real RabbitMQ
(a fresh vhost per test) and the real Redis (database 9, a fresh key
prefix per test).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import pika
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from quebert import Client
from quebert.amqp.topology import Topology
from quebert.state import RedisStateManager, connect_redis
from tests._rabbit import (
    make_vhost,
    publish_raw,
    queue_counts,
    rabbitmqctl,
    read_all,
    vhost_of,
    wait_empty,
)
from tests._worker import ROOT, TWISTD, WorkerProcess, wait_for

REDIS_URL = "redis://127.0.0.1:6379/9"
TERMINAL = ("succeeded", "failed", "canceled")


def _read_lines(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


class IntegrationTestCase(TestCase):
    timeout = 240

    def setUp(self):
        self.url = make_vhost(self)
        self.prefix = f"quebert-test-{uuid.uuid4().hex[:12]}:"
        self.redis = connect_redis(REDIS_URL)
        self.state = RedisStateManager(self.redis, prefix=self.prefix)
        self.client = Client(self.url, state=self.state,
                             **({"queue_type": self.queue_type} if self.queue_type else {}))
        self.addCleanup(self._cleanup)

    async def _cleanup_async(self):
        await self.client.close()
        cursor = 0
        while True:
            cursor, keys = await self.redis.scan(cursor, self.prefix + "*", 500)
            if keys:
                await self.redis.delete(*keys)
            if int(cursor) == 0:
                break
        await self.redis.disconnect()

    def _cleanup(self):
        return defer.ensureDeferred(self._cleanup_async())

    #: ``--queue-type`` of the workers and the client; ``None``: the default.
    queue_type = None

    def worker(self, *extra, queues=("default:50",), name="worker") -> WorkerProcess:
        if self.queue_type:
            extra = ("--queue-type", self.queue_type, *extra)
        return WorkerProcess(self, self.url, REDIS_URL, self.prefix, queues=queues,
                             extra=extra, name=name)

    async def wait_states(self, ids, states=TERMINAL, timeout=60.0, worker=None):
        """Wait until every task in ``ids`` is in one of ``states``; return records."""
        records = {}

        async def done():
            for task_id in ids:
                if task_id in records and records[task_id]["state"] in states:
                    continue
                record = await self.state.get(task_id)
                if record is None or record["state"] not in states:
                    if worker is not None and not worker.alive:
                        raise AssertionError("worker died:\n" + worker.log()[-3000:])
                    return False
                records[task_id] = record
            return True

        await wait_for(done, timeout, interval=0.2, what=f"tasks to reach {states}")
        return [records[i] for i in ids]


class TaskLifecycleTests(IntegrationTestCase):
    async def _test_success_retry_failure_countdown(self):
        worker = self.worker().start()
        await worker.ready()
        flaky_path = os.path.abspath(self.mktemp())
        add = await self.client.add_task("it.add", 2, 3)
        noops = [await self.client.add_task("it.noop", i) for i in range(20)]
        flaky = await self.client.add_task("it.flaky", flaky_path, 2)
        doomed = await self.client.add_task("it.always_fails")
        enqueued_at = self.client.reactor.seconds()
        later = await self.client.add_task("it.add", 40, 2, _countdown=2)
        self.assertEqual((await self.state.get(later.id))["state"], "scheduled")

        records = await self.wait_states([add.id, flaky.id, doomed.id, later.id]
                                         + [n.id for n in noops], worker=worker)
        by_id = {r["id"]: r for r in records}

        # Success records the result.
        self.assertEqual(by_id[add.id]["state"], "succeeded")
        self.assertEqual(by_id[add.id]["result"], 5)
        self.assertEqual([by_id[n.id]["result"] for n in noops], list(range(20)))

        # Two planned failures, retried after 0.5 s and 1 s, then success.
        flaky_record = by_id[flaky.id]
        self.assertEqual(flaky_record["state"], "succeeded")
        self.assertEqual(flaky_record["attempts"], 3)
        starts = [h["started_at"] for h in flaky_record["history"]]
        self.assertEqual(len(starts), 3)
        gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        self.assertGreaterEqual(gaps[0], 0.5 - 0.05)
        self.assertGreaterEqual(gaps[1], 1.0 - 0.05)
        self.assertLess(gaps[0], 0.5 + 3.0)
        self.assertEqual([h["state"] for h in flaky_record["history"]],
                         ["scheduled", "scheduled", "succeeded"])
        self.assertIn("planned failure 1", flaky_record["history"][0]["error"]["message"])

        # Attempts spent: errored queue, with the reason in headers and state.
        doomed_record = by_id[doomed.id]
        self.assertEqual(doomed_record["state"], "failed")
        self.assertEqual(doomed_record["attempts"], 3)
        self.assertEqual(doomed_record["error"]["type"], "builtins.ValueError")
        self.assertIn("this task always fails", doomed_record["error"]["traceback"])
        errored = await deferToThread(read_all, self.url, "default.errored")
        self.assertEqual([p.message_id for p, _ in errored], [doomed.id])
        headers = errored[0][0].headers
        self.assertEqual(headers["x-quebert-attempts"], 3)
        self.assertEqual(headers["x-quebert-error-type"], "builtins.ValueError")
        self.assertIn("retry budget", headers["x-quebert-reason"])

        # Countdown: not run before its time.
        self.assertEqual(by_id[later.id]["result"], 42)
        self.assertGreaterEqual(by_id[later.id]["started_at"], enqueued_at + 2 - 0.05)

        # Nothing left behind in any queue of the vhost (but the worker's
        # own exclusive server-named queues: a beacon is always in flight).
        await wait_empty(self.url)
        self.assertEqual(await worker.stop(), 0)

    def test_success_retry_failure_and_countdown(self):
        return defer.ensureDeferred(self._test_success_retry_failure_countdown())

    def test_success_retry_failure_and_countdown_on_classic_queues(self):
        self.queue_type = "classic"
        self.client = Client(self.url, state=self.state, queue_type="classic")
        return defer.ensureDeferred(self._test_success_retry_failure_countdown())

    async def _test_bad_messages(self):
        worker = self.worker("--max-message-size", "4096").start()
        await worker.ready()
        json_props = pika.BasicProperties(content_type="application/json", delivery_mode=2)

        def body(**fields):
            base = {"version": 1, "id": uuid.uuid4().hex, "task": "it.add", "args": [1, 2]}
            base.update(fields)
            return base

        unknown = body(task="it.does_not_exist")
        wrong_args = body(args=[1, 2, 3])
        bad_version = body(version=99)
        missing_task = body()
        del missing_task["task"]
        wrong_types = body(args={"x": 1})
        dotted = body(task="os.system", args=["echo pwned > /tmp/quebert-pwned"])
        oversized = body(args=["x" * 5000, 1])
        bad = [
            (b"\xff\xfe not json", json_props),
            (b"[1, 2, 3]", json_props),
            (b"{\"version\": 1", json_props),
            (json.dumps(unknown).encode(), json_props),
            (json.dumps(wrong_args).encode(), json_props),
            (json.dumps(bad_version).encode(), json_props),
            (json.dumps(missing_task).encode(), json_props),
            (json.dumps(wrong_types).encode(), json_props),
            (json.dumps(dotted).encode(), json_props),
            (json.dumps(oversized).encode(), json_props),
            (b"<xml/>", pika.BasicProperties(content_type="text/xml", delivery_mode=2)),
        ]
        await deferToThread(publish_raw, self.url, "default", bad)
        good = await self.client.add_task("it.add", 20, 22)
        [record] = await self.wait_states([good.id], worker=worker)
        self.assertEqual(record["result"], 42)

        async def all_errored():
            ready, _ = await queue_counts(self.url, "default.errored")
            return ready == len(bad)

        await wait_for(all_errored, 30, what="bad messages in the errored queue")
        errored = await deferToThread(read_all, self.url, "default.errored")
        reasons = [p.headers["x-quebert-reason"] for p, _ in errored]
        self.assertEqual(len(reasons), len(bad))
        for reason in reasons:
            self.assertTrue(reason, "every refused message carries a reason")
        joined = "\n".join(reasons)
        for fragment in ("not UTF-8", "must be a JSON object", "not JSON",
                         "'it.does_not_exist' is not registered", "do not fit",
                         "version 99", "missing field 'task'", "'args' must be a JSON array",
                         "'os.system' is not registered", "larger than the 4096 byte limit",
                         "content type 'text/xml'"):
            self.assertIn(fragment, joined)
        self.assertFalse(os.path.exists("/tmp/quebert-pwned"))

        # Refused messages with a readable id have a failed record with the reason.
        for message in (unknown, wrong_args, bad_version, dotted):
            record = await self.state.get(message["id"])
            self.assertEqual(record["state"], "failed", message)
            self.assertTrue(record["reason"])

        # The worker never restarted and is still consuming.
        self.assertTrue(worker.alive)
        self.assertEqual(worker.log().count("consuming default"), 1)
        again = await self.client.add_task("it.add", 1, 1)
        [record] = await self.wait_states([again.id], worker=worker)
        self.assertEqual(record["result"], 2)
        self.assertEqual(await worker.stop(), 0)

    def test_bad_messages_go_to_errored_queue_and_worker_keeps_going(self):
        return defer.ensureDeferred(self._test_bad_messages())


class FaultTests(IntegrationTestCase):
    async def _test_sigkill_mid_batch(self):
        path = os.path.abspath(self.mktemp())
        worker = self.worker(queues=("default:20",)).start()
        await worker.ready()
        infos = [await self.client.add_task("it.slow_record", path, i, 0.1)
                 for i in range(500)]
        await wait_for(lambda: len(_read_lines(path)) >= 100, 60, what="100 tasks to run")
        self.assertEqual(await worker.kill(), -signal.SIGKILL)
        ran_before_kill = len(_read_lines(path))
        self.assertLess(ran_before_kill, 500, "the kill must happen mid-batch")

        worker.start()
        await worker.ready()
        records = await self.wait_states([i.id for i in infos], timeout=120, worker=worker)
        self.assertEqual({r["state"] for r in records}, {"succeeded"})
        runs = [line["i"] for line in _read_lines(path)]
        self.assertEqual(set(runs), set(range(500)), "no task lost")
        duplicates = len(runs) - len(set(runs))
        # At-least-once: only tasks in flight at the kill (at most the
        # prefetch of 20) may run twice.
        self.assertLessEqual(duplicates, 20)
        print(f"\nSIGKILL mid-batch: {ran_before_kill} ran before the kill, "
              f"{duplicates} duplicate run(s) after restart")
        # (copies parked while the killed worker's beat lasted come back and are acked)
        await wait_empty(self.url, timeout=60)
        self.assertEqual(await worker.stop(), 0)

    def test_sigkill_mid_batch_loses_no_task(self):
        return defer.ensureDeferred(self._test_sigkill_mid_batch())

    async def _test_poison(self):
        path = os.path.abspath(self.mktemp())
        worker = self.worker(queues=("default:5",)).start()
        await worker.ready()
        poison = await self.client.add_task("it.kill_worker", path)
        others = [await self.client.add_task("it.noop", i) for i in range(20)]

        async def restart_until_failed():
            record = await self.state.get(poison.id)
            if record is not None and record["state"] == "failed":
                return True
            if not worker.alive:
                worker.start()
                await worker.ready()
            return False

        await wait_for(restart_until_failed, 120, interval=0.3, what="poison task to fail")
        record = await self.state.get(poison.id)
        self.assertEqual(record["attempts"], 3)
        self.assertEqual(record["error"]["type"], "quebert.errors.WorkerLost")
        self.assertEqual(len(_read_lines(path)), 3, "ran exactly max_attempts times")
        records = await self.wait_states([o.id for o in others], worker=worker)
        self.assertEqual({r["state"] for r in records}, {"succeeded"})
        errored = await deferToThread(read_all, self.url, "default.errored")
        self.assertEqual([p.message_id for p, _ in errored], [poison.id])
        self.assertEqual(await worker.stop(), 0)

    def test_task_that_kills_its_worker_ends_in_errored_queue(self):
        return defer.ensureDeferred(self._test_poison())

    async def _test_graceful(self):
        worker = self.worker("--shutdown-timeout", "10").start()
        await worker.ready()
        infos = [await self.client.add_task("it.sleep", 1.5) for _ in range(3)]
        await self.wait_states([i.id for i in infos], states=("running",), worker=worker)
        self.assertEqual(await worker.stop(signal.SIGTERM), 0)
        records = await self.wait_states([i.id for i in infos], timeout=5)
        self.assertEqual({r["state"] for r in records}, {"succeeded"})
        self.assertIn("stopped", worker.log())

    def test_sigterm_lets_running_tasks_finish_and_exits_zero(self):
        return defer.ensureDeferred(self._test_graceful())

    async def _test_graceful_timeout(self):
        worker = self.worker("--shutdown-timeout", "0.5").start()
        await worker.ready()
        info = await self.client.add_task("it.sleep", 3.0)
        await self.wait_states([info.id], states=("running",), worker=worker)
        self.assertEqual(await worker.stop(signal.SIGTERM, timeout=15), 0)
        self.assertEqual((await self.state.get(info.id))["state"], "running")
        _, unacked = await queue_counts(self.url, "default")
        self.assertEqual(unacked, 0, "the connection closed: the task is back in the queue")

        worker.start()
        await worker.ready()
        [record] = await self.wait_states([info.id], timeout=60, worker=worker)
        self.assertEqual(record["state"], "succeeded")
        # The interrupted run counts as an attempt.
        self.assertEqual(record["attempts"], 2)
        self.assertEqual(record["history"][0]["error"]["type"], "quebert.errors.WorkerLost")
        self.assertEqual(await worker.stop(), 0)

    def test_tasks_still_running_at_shutdown_timeout_are_redelivered(self):
        return defer.ensureDeferred(self._test_graceful_timeout())

    async def _ready_twice(self, worker):
        await wait_for(lambda: worker.log().count("consuming default") >= 2, 60,
                       what="worker to re-consume after reconnect")

    def test_worker_reconnects_and_consumes_again_after_connection_loss(self):
        async def run():
            path = os.path.abspath(self.mktemp())
            worker = self.worker().start()
            await worker.ready()
            first = await self.client.add_task("it.record", path, 1)
            await self.wait_states([first.id], worker=worker)
            await rabbitmqctl("close_all_connections", "-p", vhost_of(self.url),
                              "test reconnect")
            await self._ready_twice(worker)
            second = await self.client.add_task("it.record", path, 2)
            records = await self.wait_states([second.id], worker=worker, timeout=60)
            self.assertEqual(records[0]["state"], "succeeded")
            self.assertTrue(worker.alive)
            self.assertEqual(await worker.stop(), 0)

        return defer.ensureDeferred(run())

    def test_tasks_keep_running_when_redis_is_unreachable(self):
        async def run():
            path = os.path.abspath(self.mktemp())
            worker = WorkerProcess(self, self.url, "redis://127.0.0.1:1/0", self.prefix)
            worker.start()
            await worker.ready()
            client = Client(self.url)
            try:
                for i in range(10):
                    await client.add_task("it.record", path, i)
            finally:
                await client.close()
            await wait_for(lambda: len(_read_lines(path)) == 10, 60,
                           what="tasks to run without Redis")
            self.assertTrue(worker.alive)
            await wait_for(lambda: "state store unavailable" in worker.log(), 30,
                           what="the worker to warn that the state store is unavailable")
            self.assertEqual(await worker.stop(), 0)

        return defer.ensureDeferred(run())


class PluginTests(TestCase):
    def test_twistd_lists_amqp_worker_plugin(self):
        out = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, cwd="/",
                             timeout=60)
        self.assertEqual(out.returncode, 0)
        self.assertIn("amqp-worker", out.stdout)

    def test_bad_configuration_exits_non_zero_with_a_readable_message(self):
        for args, fragment in [
            (["--tasks", "no.such.module"], "cannot import tasks module 'no.such.module'"),
            (["--queue", "bad queue!"], "not a valid queue name"),
            (["--max-running-tasks", "zero"], "--max-running-tasks must be an integer"),
            (["--mediator", "quebert.client.Client"], "is not a subclass of quebert.Mediator"),
            (["--amqp-url", "http://nope"], "AMQP URL must look like"),
            (["--log-level", "loud"], "unknown log level 'loud'"),
            (["--config", self._config_file({"state": {"backend": "sqlite"}})],
             "state backend must be 'redis' or 'memory', not 'sqlite'"),
            (["--config", self._config_file({"log_level": "loud"})], "unknown log level"),
        ]:
            out = subprocess.run([TWISTD, "--pidfile=", "-n", "amqp-worker", *args],
                                 capture_output=True, text=True, cwd=ROOT, timeout=60,
                                 env=dict(os.environ, PYTHONPATH=ROOT))
            self.assertNotEqual(out.returncode, 0, args)
            self.assertIn(fragment, out.stdout + out.stderr, args)
            # a usage message, not a traceback
            self.assertNotIn("Traceback", out.stdout + out.stderr, args)

    def _config_file(self, data: dict) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
        return path

    def test_plugin_is_found_from_a_plain_install_outside_the_source_tree(self):
        # The plugin must ship in the wheel (twisted.plugins namespace
        # package), not only work from the source tree.
        out = subprocess.run(
            [sys.executable, "-c",
             "import twisted.plugins.quebert_plugin as p; print(p.amqp_worker.tapname)"],
            capture_output=True, text=True, cwd="/", timeout=60,
        )
        self.assertEqual(out.stdout.strip(), "amqp-worker", out.stderr)


class BrokerRefusalTests(IntegrationTestCase):
    def declare(self, queue: str, arguments: dict) -> defer.Deferred:
        def declare_conflicting():
            connection = pika.BlockingConnection(pika.URLParameters(self.url))
            try:
                connection.channel().queue_declare(queue, durable=True, arguments=arguments)
            finally:
                connection.close()

        return deferToThread(declare_conflicting)

    async def test_access_refused_stops_the_worker_with_exit_code_3(self):
        await rabbitmqctl("set_permissions", "-p", vhost_of(self.url), "guest",
                          "^(?!default$).*", ".*", ".*")
        worker = self.worker().start()
        await wait_for(lambda: not worker.alive, 60, what="worker to give up")
        self.assertEqual(worker.process.returncode, 3)
        self.assertIn("ACCESS_REFUSED", worker.log())
        self.assertIn("exit code 3", worker.log())

    async def test_a_queue_declared_with_other_arguments_is_used_as_it_is(self):
        """
        ``406 PRECONDITION_FAILED`` (a queue declared by an earlier release,
        with another type, or by hand) is not fatal: the worker consumes the
        queue as it is and says so once.
        """
        await self.declare("default", {"x-max-length": 500})
        worker = self.worker().start()
        await worker.ready()
        info = await self.client.add_task("it.add", 2, 3)
        [record] = await self.wait_states([info.id], worker=worker)
        self.assertEqual(record["result"], 5)
        log = worker.log()
        self.assertEqual(log.count("queue default exists with other arguments"), 1, log)
        self.assertIn("PRECONDITION_FAILED", log)
        self.assertEqual(await worker.stop(), 0)

    async def test_client_publishes_to_a_queue_of_the_other_type(self):
        """A classic client and a quorum queue (or the other way round) work together."""
        await self.declare("default", {"x-queue-type": "quorum"})
        info = await self.client.add_task("it.noop", 1)
        messages = await deferToThread(read_all, self.url, "default")
        self.assertEqual([p.message_id for p, _ in messages], [info.id])
        self.assertIn("default", self.client.topology.mismatched)


class DeliveryLimitTests(IntegrationTestCase):
    """The broker-side backstop of quorum work queues (``--delivery-limit``)."""

    async def test_a_message_handed_out_too_often_ends_in_the_errored_queue(self):
        """
        Delivered and given back three times (as a message that kills every
        worker before its attempt is recorded would be): RabbitMQ itself
        moves it to ``default.errored``, saying why, instead of looping.
        """
        client = Client(self.url, delivery_limit=2)
        self.addCleanup(client.close)
        info = await client.add_task("it.noop", 1)

        def hand_out_and_give_back():
            connection = pika.BlockingConnection(pika.URLParameters(self.url))
            try:
                channel = connection.channel()
                # as a worker declares it (producers leave errored queues to workers)
                channel.queue_declare("default.errored", durable=True,
                                      arguments=Topology().errored_queue_arguments())
                counts = []
                for _ in range(5):
                    method, properties, _ = channel.basic_get("default")
                    if method is None:
                        break
                    counts.append(properties.headers.get("x-delivery-count"))
                    channel.basic_nack(method.delivery_tag, requeue=True)
                return counts
            finally:
                connection.close()

        counts = await deferToThread(hand_out_and_give_back)
        self.assertEqual(counts, [0, 1, 2])
        await wait_for(lambda: queue_counts(self.url, "default.errored").addCallback(
            lambda c: c[0] == 1), 20, what="the message in the errored queue")
        [(properties, _)] = await deferToThread(read_all, self.url, "default.errored")
        self.assertEqual(properties.message_id, info.id)
        self.assertEqual(properties.headers["x-first-death-reason"], "delivery_limit")
