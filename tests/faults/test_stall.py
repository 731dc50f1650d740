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

import time

from twisted.internet import defer

from quebert.worker import EXIT_REACTOR_STALLED
from tests.faults._harness import FaultCase, until

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
        deaths: list = []
        restarts: list = []

        async def supervise():
            for worker in workers:
                if not worker.alive:
                    deaths.append((time.time(), worker.process.returncode))
                    worker.start()
                    restarts.append((time.time(), worker.process.pid))
                    await worker.ready()

        records = await self.wait_done(ids, supervise=supervise, timeout=180)
        async def blocker_failed() -> bool:
            await supervise()  # the blocking task may still be stalling workers
            return bool(await self.count_in("failed"))

        await until(blocker_failed, 60, "the blocking task to fail")
        blocked = await self.state.get(blocker.id)
        self.assertEqual(blocked["state"], "failed")
        self.assertEqual(blocked["attempts"], MAX_ATTEMPTS)
        self.assertEqual(blocked["error"]["type"], "quebert.errors.ReactorStalled")
        self.assertIn("stalled the reactor", blocked["reason"])
        self.assertEqual(len(deaths), MAX_ATTEMPTS, f"deaths: {deaths}")
        self.assertEqual({code for _, code in deaths}, {EXIT_REACTOR_STALLED})
        tally = self.tally(records, {i: 1 for i in ids})
        self.check(tally, duplicate_bound=len(deaths) * PREFETCH, records=records)
        recovery = []
        for at, pid in restarts:
            after = self.runs.first_after(at, pid=pid)
            if after is not None:
                recovery.append(after - at)
        await self.assert_queues({"default.errored": (1, 0)})
        self.recovered(max(recovery) if recovery else None, RESTART_BOUND,
                       "slowest restart to the restarted worker's first task")
        await self.stop_workers(*workers)
        self.passed(f"{len(deaths)} watchdog kills (exit {EXIT_REACTOR_STALLED}); the "
                    f"blocking task failed after {blocked['attempts']} attempts")
