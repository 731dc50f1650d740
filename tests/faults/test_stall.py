"""
Scenario: a task that blocks the reactor for longer than the watchdog's
timeout (``--auto-kill-timeout``), amid 1,000 good tasks, with two workers
and the test as their supervisor.

Each worker that meets the blocking task is killed by its watchdog (exit
code 4) and restarted; the task's attempts are counted (written before it
starts), so after its budget (2) it ends ``failed`` in the errored queue
with a reason saying it stalled the reactor, and every good task succeeds.
Tasks in flight on a killed worker may run twice (at-least-once).
"""

from __future__ import annotations

from twisted.internet import defer

from quebert.worker import EXIT_REACTOR_STALLED
from tests.faults._harness import FaultCase, Supervisor

GOOD = 1000
PREFETCH = 10
TIMEOUT = 2
MAX_ATTEMPTS = 2  # faults.block_reactor's budget
RESTART_BOUND = 20.0


class StallTests(FaultCase):
    scenario = "stall"
    fault = (f"a task blocking the reactor > --auto-kill-timeout {TIMEOUT}, two workers; "
             "test restarts them")

    def test_reactor_blocking_task_ends_in_errored_queue(self):
        return defer.ensureDeferred(self._test())

    async def _test(self):
        first = await self.publish(GOOD // 2, options=lambda i: {"seconds": 0.005})
        blocker = await self.client.add_task("faults.block_reactor", self.runs.path)
        rest = await self.publish(GOOD - GOOD // 2, start=GOOD // 2,
                                  options=lambda i: {"seconds": 0.005})
        ids = {**first, **rest}
        workers = [self.worker(f"w{n}", queues=(f"default:{PREFETCH}",),
                               extra=("--auto-kill-timeout", str(TIMEOUT))).start()
                   for n in range(2)]
        for worker in workers:
            await worker.ready()
        supervise = Supervisor(workers)
        records = await self.wait_done(ids, supervise=supervise, timeout=180)
        await self.until_failed(supervise, "the blocking task to fail")
        blocked = await self.state.get(blocker.id)
        self.assertEqual(blocked["state"], "failed")
        self.assertEqual(blocked["attempts"], MAX_ATTEMPTS)
        self.assertEqual(blocked["error"]["type"], "quebert.errors.ReactorStalled")
        self.assertIn("stalled the reactor", blocked["reason"])
        self.assertEqual(len(supervise.deaths), MAX_ATTEMPTS, f"deaths: {supervise.deaths}")
        self.assertEqual({code for _, code in supervise.deaths}, {EXIT_REACTOR_STALLED})
        tally = self.tally(records, {i: 1 for i in ids})
        self.check(tally, duplicate_bound=len(supervise.deaths) * PREFETCH, records=records)
        await self.assert_queues({"default.errored": (1, 0)})
        self.recovered(supervise.slowest_recovery(self.runs), RESTART_BOUND,
                       "slowest restart to the restarted worker's first task")
        await self.stop_workers(*workers)
        self.passed(f"{len(supervise.deaths)} watchdog kills (exit {EXIT_REACTOR_STALLED}); the "
                    f"blocking task failed after {blocked['attempts']} attempts")
