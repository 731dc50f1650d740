"""
Scenario: RabbitMQ stopped and started again mid-batch
(``rabbitmqctl stop_app`` / ``start_app``).

The whole node goes away, not one connection: durable queues and
persistent messages (the work queue, the retries waiting in the
``quebert.qdelay.NN`` queues) must survive it, and the workers must
reconnect on their own (``ClientService``), re-declare, re-consume and
finish the batch.  One task in ten fails its first run, so the delay
queues hold messages when the node stops.

The workers and the client run on the default configuration, no flag:
quorum queues, the configuration in which quebert promises that no task
is lost when the broker node stops.  With classic queues, RabbitMQ dead-letters an expired
message *at most once* (``topology.rst``), so a retry moving between two
delay levels at the moment the node stops can be dropped by the broker:
CI saw two of 200 first-run failures lost that way (their retries,
published with confirms 0.4 s before ``stop_app``, never came back).
Quorum delay queues dead-letter *at least once*.

Stopping the node breaks every other client of this RabbitMQ, so the
test first waits for the broker to be quiet (no connection to another
vhost, i.e. no other test or benchmark running); if it does not get quiet
within ``QUEBERT_FAULTS_QUIET_WAIT`` seconds (default 120) the test is
skipped, saying why.  Whatever happens, cleanup starts the node again and
waits for it (``rabbitmqctl await_startup``).
"""

from __future__ import annotations

import os
import time

from twisted.internet import defer

from tests._rabbit import rabbitmqctl, vhost_of
from tests._worker import sleep, wait_for
from tests.faults._harness import FaultCase, until

TASKS = 2000
PREFETCH = 20
WORKERS = 2
#: Long enough that most of the batch is still to run when the node stops
#: (stop_app itself takes a few seconds).
SECONDS = 0.2
#: Seconds the node stays stopped.
DOWN = 5.0
RECOVERY_BOUND = 45.0


async def others_connected(own_vhost: str) -> list:
    """Connections of this RabbitMQ to vhosts other than ``own_vhost``."""
    out = await rabbitmqctl("list_connections", "vhost", "name")
    others = []
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[0] != own_vhost:
            others.append(line)
    return others


async def broker_up() -> None:
    """Start the node (a no-op when it runs) and wait until it serves."""
    await rabbitmqctl("start_app")
    await rabbitmqctl("await_startup")


class BrokerRestartTests(FaultCase):
    scenario = "broker-restart"
    fault = (f"rabbitmqctl stop_app for {DOWN:.0f} s mid-batch, then start_app (default "
             "configuration: quorum queues)")
    timeout = 420

    def test_broker_stopped_and_started_mid_batch(self):
        return defer.ensureDeferred(self._test())

    async def _wait_quiet(self) -> None:
        wait = float(os.environ.get("QUEBERT_FAULTS_QUIET_WAIT", "120"))
        seen: list = []

        async def quiet() -> bool:
            seen[:] = await others_connected(vhost_of(self.url))
            return not seen

        try:
            await wait_for(quiet, wait, interval=1.0, what="RabbitMQ to be quiet")
        except AssertionError:
            self.row["status"] = "skipped"
            self.row["notes"] = "RabbitMQ had other clients"
            raise self.skipTest(f"other clients use this RabbitMQ ({len(seen)} connection(s), "
                                f"e.g. {seen[:3]}); stopping it would break them")

    async def _test(self):
        await self._wait_quiet()
        ids = await self.publish(TASKS, options=lambda i: {"seconds": SECONDS,
                                                            "fail_first": i % 10 == 0})
        workers = [self.worker(f"w{n}", queues=(f"default:{PREFETCH}",)).start()
                   for n in range(WORKERS)]
        for w in workers:
            await w.ready()
        await until(lambda: len(self.runs) >= TASKS // 4, 60, "a quarter of the batch")

        self.addCleanup(lambda: defer.ensureDeferred(broker_up()))
        stop_began = time.time()
        await rabbitmqctl("stop_app")
        stopped_at = time.time()
        ran_at_stop = len(self.runs)
        await sleep(DOWN)
        for w in workers:
            self.assertTrue(w.alive, "a worker exited while the broker was down:\n"
                            + w.log()[-3000:])
        await broker_up()
        up_at = time.time()

        records = await self.wait_done(ids, workers=workers, timeout=180)
        first = self.runs.first_after(up_at)
        expected = {i: 2 if i % 10 == 0 else 1 for i in ids}
        tally = self.tally(records, expected)
        # In flight at the fault: each worker's prefetch.  Their outcomes
        # may have been recorded without the ack reaching the broker.
        # No fork: a task whose worker only lost its connection is put
        # aside, not counted lost beside its running attempt (test_fork.py).
        self.check(tally, duplicate_bound=WORKERS * PREFETCH, records=records)
        await self.assert_queues()
        self.recovered(None if first is None else first - up_at, RECOVERY_BOUND,
                       "first task after start_app")
        for w in workers:
            self.assertGreaterEqual(w.log().count("consuming default"), 2,
                                    "every worker consumes again after the restart")
        await self.stop_workers(*workers)
        await self.assert_queues()
        self.passed(f"stop_app took {stopped_at - stop_began:.1f}s, {ran_at_stop} ran "
                    f"before it; {tally.extra_attempts} extra attempt(s) recorded; "
                    f"{len(tally.undercounted)} task(s) forked")
