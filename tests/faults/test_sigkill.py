"""
Scenario: ``kill -9`` of one of two workers mid-batch, restarted by the test.
"""

from __future__ import annotations

import signal
import time

from twisted.internet import defer

from tests._worker import sleep
from tests.faults._harness import FaultCase, until

TASKS = 3000
PREFETCH = 20
#: Seconds each task sleeps: 2 workers run at most 2 * PREFETCH / SECONDS tasks a
#: second, so the batch outlasts the restart.
SECONDS = 0.1
#: Seconds the killed worker stays dead while the other one carries on.
DOWN = 2.0
#: Seconds from the restart to the restarted worker's first task, at most.
RECOVERY_BOUND = 20.0


class SigkillTests(FaultCase):
    scenario = "sigkill"
    fault = (f"kill -9 one of 2 workers (prefetch {PREFETCH}) mid-batch, "
             f"restart it {DOWN:.0f} s later")

    def test_sigkill_one_of_two_workers_mid_batch(self):
        return defer.ensureDeferred(self._test())

    async def _test(self):
        ids = await self.publish(TASKS, options=lambda i: {"seconds": SECONDS})
        victim = self.worker("victim", queues=(f"default:{PREFETCH}",)).start()
        survivor = self.worker("survivor", queues=(f"default:{PREFETCH}",)).start()
        await victim.ready()
        await survivor.ready()
        victim_pid = victim.process.pid

        # Kill once the victim itself is busy and a quarter of the batch ran.
        await until(lambda: len(self.runs) >= TASKS // 4
                    and self.runs.pids()[victim_pid] >= 50, 60, "a quarter of the batch")
        self.assertEqual(await victim.kill(), -signal.SIGKILL)
        killed_at = time.time()
        ran_at_kill = len(self.runs)
        self.assertLess(ran_at_kill, TASKS, "the kill must happen mid-batch")

        # The survivor keeps going on its own.
        await sleep(DOWN)
        survivor_pid = survivor.process.pid
        ran_alone = sum(1 for r in self.runs.read() if r.at > killed_at + 0.2
                        and r.pid == survivor_pid)
        self.assertGreater(ran_alone, 0, "the other worker stopped too")

        restarted_at = time.time()
        victim.start()
        await victim.ready()
        records = await self.wait_done(ids, workers=(victim, survivor))
        new_pid = victim.process.pid
        first = self.runs.first_after(restarted_at, pid=new_pid)
        tally = self.tally(records, {i: 1 for i in ids})
        # At-least-once: only the victim's deliveries in flight at the kill
        # (its prefetch) may run twice, or be counted as a lost attempt.
        self.check(tally, duplicate_bound=PREFETCH, records=records)
        await self.assert_queues()
        self.recovered(None if first is None else first - restarted_at, RECOVERY_BOUND,
                       "restarted worker's first task")
        await self.stop_workers(victim, survivor)
        await self.assert_queues()
        self.passed(f"{ran_at_kill} ran before the kill; the survivor ran {ran_alone} "
                    f"while the victim was down; {tally.extra_attempts} lost attempt(s) "
                    f"recorded")
