"""
Upgrading a deployment in place: a vhost declared by quebert 0.1 (classic
work, errored and delay queues) with tasks waiting everywhere, then
today's worker on its default settings (quorum queues); and the
``quebert migrate-queue`` / ``drop-old-delays`` tools on the real broker.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pika
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from quebert import Client
from quebert.amqp.migrate import MigrationRefused, QueueMigration
from quebert.amqp.topology import Topology
from tests import _release_0_1 as release
from tests._rabbit import queue_counts, read_all, wait_counts
from tests._worker import ROOT
from tests.test_integration import IntegrationTestCase


def _blocking(url: str, work) -> defer.Deferred:
    """Run ``work(channel)`` on a blocking pika connection in a thread."""

    def run():
        connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            return work(channel)
        finally:
            connection.close()

    return deferToThread(run)


def _arguments_are(url: str, queue: str, arguments: dict) -> defer.Deferred:
    """Whether ``queue`` exists with exactly ``arguments`` (a declaration with them passes)."""

    def check(channel):
        try:
            channel.queue_declare(queue, durable=True, arguments=arguments)
            return True
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code == 406:
                return False
            raise

    return _blocking(url, check)


class UpgradeTests(IntegrationTestCase):
    """A deployment made by quebert 0.1, upgraded in place."""

    timeout = 300

    async def test_every_task_waiting_in_an_old_deployment_runs(self):
        """
        Tasks waiting in 0.1's classic work queue, in its classic delay
        levels (1 to 3 s left) and a failed one in its errored queue: the
        new worker neither dies on 406 PRECONDITION_FAILED nor loses one;
        new tasks, retries and countdowns go through the new quorum levels.
        """
        ready = [release.body("it.add", n, 1) for n in range(50)]
        delayed = [release.body("it.add", n, 2, delay=delay)
                   for n, delay in enumerate([1.0, 1.5, 2.0, 2.5, 3.0] * 10)]

        def populate(channel):
            release.declare(channel, ["default"])
            for task_id, payload in ready:
                release.publish(channel, "default", task_id, payload)
            for (task_id, payload), delay in zip(delayed, [1.0, 1.5, 2.0, 2.5, 3.0] * 10,
                                                 strict=True):
                release.publish(channel, "default", task_id, payload,
                                delay_ms=int(delay * 1000))
            failed_id, failed = release.body("it.add", 0, 0)
            channel.basic_publish("", "default.errored", failed, pika.BasicProperties(
                message_id=failed_id, delivery_mode=2, content_type="application/json"))

        await _blocking(self.url, populate)
        worker = self.worker().start()
        await worker.ready()
        # new work on the upgraded deployment: a retry and a countdown
        flaky_path = os.path.abspath(self.mktemp())
        flaky = await self.client.add_task("it.flaky", flaky_path, 1)
        later = await self.client.add_task("it.add", 40, 2, _countdown=1)
        ids = [i for i, _ in ready + delayed] + [flaky.id, later.id]
        records = await self.wait_states(ids, timeout=90, worker=worker)
        self.assertEqual({r["state"] for r in records}, {"succeeded"},
                         [r for r in records if r["state"] != "succeeded"][:3])
        by_id = {r["id"]: r for r in records}
        self.assertEqual([by_id[i]["result"] for i, _ in ready], [n + 1 for n in range(50)])
        self.assertEqual(by_id[flaky.id]["attempts"], 2)

        log = worker.log()
        self.assertIn("queue default exists with other arguments", log)
        self.assertIn("queue default.errored exists with other arguments", log)
        self.assertNotIn("exit code 3", log)
        # the old levels are left alone and empty; the new ones carried the retry
        counts = await queue_counts(self.url)
        self.assertIn("quebert.delay.00", counts)
        self.assertIn("quebert.qdelay.00", counts)
        # the failed task of 0.1 is still in its errored queue
        await wait_counts(self.url, "default.errored", (1, 0))
        self.assertEqual(await worker.stop(), 0)

        # once drained, the old levels can go
        result = await self.drop_other_delays()
        self.assertEqual(result, {})
        counts = await queue_counts(self.url)
        self.assertFalse([q for q in counts if q.startswith("quebert.delay.")], counts)
        self.assertIn("quebert.qdelay.31", counts)

    async def drop_other_delays(self) -> dict:
        client = Client(self.url)
        self.addCleanup(client.close)
        await client.whenConnected()
        migration = QueueMigration(client.broker.publishing, client.topology,
                                   client.broker.publisher.publish)
        return await migration.drop_other_delays()

    async def test_old_delay_levels_are_kept_while_they_hold_a_task(self):
        def populate(channel):
            release.declare(channel, ["default"])
            task_id, payload = release.body("it.add", 1, 1, delay=600)
            release.publish(channel, "default", task_id, payload, delay_ms=600_000)

        await _blocking(self.url, populate)
        await wait_counts(self.url, "quebert.delay.19", (1, 0))
        result = await self.drop_other_delays()
        self.assertEqual(result, {"quebert.delay.19": 1})
        counts = await queue_counts(self.url)
        self.assertEqual(len([q for q in counts if q.startswith("quebert.delay.")]), 32)


class MigrateQueueTests(IntegrationTestCase):
    """``quebert migrate-queue``: a classic work queue becomes a quorum one, in place."""

    timeout = 300

    def migration(self, client: Client) -> QueueMigration:
        return QueueMigration(client.broker.publishing, client.topology,
                              client.broker.publisher.publish)

    async def populate(self, count: int) -> list[str]:
        items = [release.body("it.add", n, 1) for n in range(count)]

        def work(channel):
            release.declare(channel, ["default"])
            for task_id, payload in items:
                release.publish(channel, "default", task_id, payload)
            channel.basic_publish("", "default.errored", b'{"version": 1}',
                                  pika.BasicProperties(message_id="errored-1", delivery_mode=2))

        await _blocking(self.url, work)
        return [task_id for task_id, _ in items]

    async def test_migrating_keeps_every_message_while_producers_publish(self):
        ids = await self.populate(500)
        await self.client.whenConnected()
        reports: list = []
        migrating = defer.ensureDeferred(self.migration(self.client).migrate("default"))
        migrating.addCallback(reports.extend)
        published = []
        while not migrating.called:
            published.append((await self.client.add_task("it.noop", len(published))).id)
        await migrating
        self.assertEqual([(r.queue, r.outcome) for r in reports],
                         [("default", "migrated"), ("default.errored", "migrated")])
        # the 500, and what was published before the old queue was unbound
        self.assertGreaterEqual(reports[0].moved, 500)
        self.assertTrue(published)
        topology = Topology()
        self.assertTrue(await _arguments_are(self.url, "default",
                                             topology.work_queue_arguments("default")))
        self.assertTrue(await _arguments_are(self.url, "default.errored",
                                             topology.errored_queue_arguments()))
        messages = await deferToThread(read_all, self.url, "default")
        got = [p.message_id for p, _ in messages]
        # every message; a task published while both queues were bound is there twice
        self.assertEqual(set(got), set(ids) | set(published))
        twice = {i for i in got if got.count(i) > 1}
        self.assertLessEqual(twice, set(published))
        self.assertLessEqual(len(got) - len(set(got)), 20)
        waiting = set(ids)
        self.assertEqual([i for i in got if i in waiting], ids, "their order is kept")
        for properties, _ in messages:
            # moved copies are new messages: no redelivery counted
            self.assertEqual((properties.headers or {}).get("x-delivery-count", 0), 0)
        errored = await deferToThread(read_all, self.url, "default.errored")
        self.assertEqual([p.message_id for p, _ in errored], ["errored-1"])
        counts = await queue_counts(self.url)
        self.assertNotIn("default.migrating", counts)
        self.assertNotIn("default.errored.migrating", counts)

        # a second run finds nothing to do
        again = await self.migration(self.client).migrate("default")
        self.assertEqual([r.outcome for r in again], ["already", "already"])

    async def test_a_migrated_queue_is_consumed_by_a_worker(self):
        ids = await self.populate(20)
        await self.client.whenConnected()
        await self.migration(self.client).migrate("default")
        worker = self.worker().start()
        await worker.ready()
        records = await self.wait_states(ids, worker=worker)
        self.assertEqual({r["state"] for r in records}, {"succeeded"})
        self.assertNotIn("exists with other arguments", worker.log())
        self.assertEqual(await worker.stop(), 0)

    async def test_a_queue_with_consumers_is_refused(self):
        await self.populate(3)
        worker = self.worker("--queue-type", "classic").start()
        await worker.ready()
        await self.client.whenConnected()
        with self.assertRaises(MigrationRefused) as raised:
            await self.migration(self.client).migrate("default")
        self.assertIn("stop the workers", str(raised.exception))
        self.assertEqual(await worker.stop(), 0)

    async def test_an_interrupted_migration_is_finished_by_running_it_again(self):
        """Killed after the move into the temporary queue: nothing is lost, a rerun ends it."""
        ids = await self.populate(30)
        await self.client.whenConnected()
        migration = self.migration(self.client)
        original_delete = migration._delete

        async def crash(name, quorum):
            raise RuntimeError("killed")

        migration._delete = crash
        with self.assertRaises(RuntimeError):
            await migration.migrate("default")
        await wait_counts(self.url, "default.migrating", (30, 0))
        migration._delete = original_delete
        reports = await migration.migrate("default")
        self.assertEqual(reports[0].outcome, "migrated")
        messages = await deferToThread(read_all, self.url, "default")
        self.assertEqual(sorted(p.message_id for p, _ in messages), sorted(ids))

    async def test_the_command_line(self):
        await self.populate(5)
        out = await deferToThread(
            subprocess.run,
            [sys.executable, "-m", "quebert.cli", "--amqp-url", self.url, "migrate-queue",
             "default"], capture_output=True, text=True, cwd=ROOT, timeout=120)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("default: now a quorum queue; 5 message(s) moved into it", out.stdout)
        out = await deferToThread(
            subprocess.run,
            [sys.executable, "-m", "quebert.cli", "--amqp-url", self.url, "drop-old-delays"],
            capture_output=True, text=True, cwd=ROOT, timeout=120)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("quebert.delay.31: deleted", out.stdout)
