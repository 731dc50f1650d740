"""
A connection drop must not fork a running task.

Found by the ``broker-restart`` scenario: when a *live* worker lost its
AMQP connection while it ran a task, the broker redelivered the message to
another worker, which found the record ``running`` and, taking the first
worker for dead, counted a lost attempt (``WorkerLost``) and published a
retry copy.  The first worker then finished its attempt and published its
own outcome (a retry copy, if the attempt failed), its ack being lost
with its channel: the task forked into two messages.  Workers now beat in
the state store; a redelivered task still running on a live worker is put
aside (a delayed copy) until that worker's outcome is recorded, and only
counted as lost if the worker stops beating.

This test makes it happen on purpose: worker A reaches RabbitMQ through a
TCP proxy that the test cuts while A runs a failing task (2 s per
attempt, ``max_attempts=3``); worker B, connected directly, gets the
redelivery.  Correct behaviour, asserted here: one errored copy, a
record whose attempts match the runs, and at most one duplicate run (the
attempt in flight at the cut).
"""

from __future__ import annotations

from twisted.internet import defer, reactor

from tests._rabbit import RABBIT_HOST, RABBIT_PORT, queue_counts
from tests._worker import sleep
from tests.faults._harness import FaultCase, until
from tests.faults._proxy import CuttableProxy

MAX_ATTEMPTS = 3  # faults.fail's budget
SECONDS = 2.0


class ForkTests(FaultCase):
    scenario = "fork"
    fault = "a live worker's AMQP connection drops while it runs a failing task"

    def test_connection_drop_does_not_fork_a_running_task(self):
        return defer.ensureDeferred(self._test())

    async def _test(self):
        proxy = CuttableProxy(reactor, RABBIT_HOST, RABBIT_PORT)
        proxied = self.url.replace(f":{RABBIT_PORT}/", f":{proxy.start()}/")
        self.addCleanup(proxy.stop)
        ids = await self.publish(1, task="faults.fail", options=lambda i: {"seconds": SECONDS})
        a = self.worker("a", queues=("default:1",), amqp_url=proxied).start()
        await a.ready()
        await until(lambda: self.count_in("running"), 15, "worker A to start the task")
        b = self.worker("b", queues=("default:1",)).start()
        await b.ready()

        await proxy.cut()
        await until(lambda: "redelivered" in b.log(), 15, "worker B to get the redelivery")
        await proxy.restore()
        await until(lambda: self.count_in("failed"), 60, "the task to fail for good")
        await sleep(2 * SECONDS + 3)  # room for a second copy's remaining attempts
        counts = await queue_counts(self.url)
        runs = self.runs.counts()[0]
        record = (await self.records(ids))[0]
        errored = counts.get("default.errored", (0, 0))[0]
        forked = errored > 1 or record["attempts"] < runs
        self.row.update(tasks=1, succeeded=0, lost=0, duplicates=max(0, runs - MAX_ATTEMPTS),
                        duplicate_bound=1, forks=int(forked),
                        recovery="n/a (a correctness check)",
                        status="forked" if forked else "passed",
                        notes=f"{runs} runs for a budget of {MAX_ATTEMPTS}; record "
                              f"{record['state']} with {record['attempts']} attempts; "
                              f"{errored} errored copies; B logged WorkerLost: "
                              f"{'was lost with its worker' in b.log()}")
        self.assertEqual(record["state"], "failed")
        self.assertEqual(errored, 1, f"one task must give one errored copy ({runs} runs)")
        self.assertEqual(record["attempts"], runs, "the record must count every run")
        self.assertLessEqual(runs, MAX_ATTEMPTS + 1)
        await self.stop_workers(a, b)
        self.passed(self.row["notes"])
