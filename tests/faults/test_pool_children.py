"""
Scenario: ``kill -9`` of a worker's pool processes, again and again, while
they run ``executor="process"`` tasks.
"""

from __future__ import annotations

import os
import random
import signal
import time

from twisted.internet import defer

from tests._procfs import alive, children_of
from tests._worker import sleep
from tests.faults._harness import TASKS_MODULE, FaultCase, until

TASKS = 1000
PROCESSES = 2
#: The module registering faults.pmark (a process task: a pool in the worker).
POOL_TASKS = "tests.faults.tasks_pool"
#: CPU seconds of each task's pure-Python loop: the batch (TASKS tasks on
#: PROCESSES processes, some 15 s) must outlast the kills (about 10 s).
TASK_SECONDS = 0.03
#: Pool processes killed during the batch, one every KILL_EVERY seconds.
KILLS = 25
KILL_EVERY = 0.4
#: Seconds from the last kill to the pool being full again, at most.
RECOVERY_BOUND = 10.0


def spin_for(seconds: float) -> int:
    """
    Steps of :func:`tests.faults.tasks_pool.pmark`'s loop that take about
    ``seconds`` of CPU here.  A fixed count made the batch as short as the
    machine is fast: on a faster one it ended before half the kills.
    """
    steps = 200_000
    total = 0
    began = time.process_time()
    for step in range(steps):
        total += step % 7
    took = max(time.process_time() - began, 1e-6)
    return max(1, int(steps * seconds / took))


class PoolChildrenTests(FaultCase):
    scenario = "pool-children"
    fault = (f"kill -9 of a busy pool process (of {PROCESSES}) {KILLS} times, every "
             f"{KILL_EVERY} s, during {TASKS} process tasks")

    def test_pool_processes_killed_while_they_run_tasks(self):
        return defer.ensureDeferred(self._test())

    async def _test(self):
        worker = self.worker(queues=("default:20",), tasks=(TASKS_MODULE, POOL_TASKS),
                             extra=("--processes", str(PROCESSES))).start()
        await worker.ready()
        pid = worker.process.pid
        self.assertEqual(len(children_of(pid)), PROCESSES)
        spin = spin_for(TASK_SECONDS)
        ids = await self.publish(TASKS, "faults.pmark", options=lambda i: {"spin": spin})

        # Kill a pool process that has run tasks already (so it is not one
        # still starting): with a backlog, it is running one now.
        killed = []
        pick = random.Random(14)
        while len(killed) < KILLS:
            await sleep(KILL_EVERY)
            if len(self.runs) >= TASKS:
                break
            ran = self.runs.pids()
            victims = [c for c in children_of(pid) if ran[c] > 0 and c not in killed]
            if victims:
                victim = pick.choice(victims)
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
        last_kill = time.time()
        self.assertGreaterEqual(len(killed), KILLS // 2, "the batch ended before the kills")

        def full() -> bool:
            children = children_of(pid)
            return len(children) == PROCESSES and not set(children) & set(killed)

        # The pool is full again, of processes that were not killed.
        full_at = await until(full, RECOVERY_BOUND, "the pool back to full size")
        self.recovered(full_at - last_kill, RECOVERY_BOUND,
                       "pool back to full size after the last kill")
        records = await self.wait_done(ids, workers=(worker,))
        self.assertTrue(full(), "the pool is full when the batch is done")
        self.assertFalse(any(alive(k) for k in killed))
        tally = self.tally(records, {i: 1 for i in ids})
        # Each kill costs at most the one task its process ran: run again
        # (a duplicate, if it had recorded its run) as a new attempt.
        self.check(tally, duplicate_bound=len(killed), records=records)
        lost = [r for r in records.values()
                if any((h.get("error") or {}).get("type") == "quebert.errors.ProcessLost"
                       for h in r.get("history") or [])]
        self.assertLessEqual(len(lost), len(killed))
        await self.assert_queues()
        await self.stop_workers(worker)
        self.passed(f"{len(killed)} pool processes killed; {len(lost)} task(s) had an "
                    f"attempt fail with ProcessLost; pool back to {PROCESSES} processes")
