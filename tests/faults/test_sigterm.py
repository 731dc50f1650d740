"""
Scenario: graceful shutdown (SIGTERM) with tasks in flight, then restart.

Tasks take 0.2 to 1 s (half in the thread pool, half on the reactor) and
the worker gets ``--shutdown-timeout 0.5``: on SIGTERM some running tasks
finish in time and the others are left unacked.  No task that had
finished (``succeeded`` in the state store when the worker exited) may
run again; the unfinished ones must all be back in the queue (none
unacked, none lost) and complete after the restart.
"""

from __future__ import annotations

import signal
import time

from twisted.internet import defer

from tests._rabbit import queue_counts
from tests._worker import wait_for
from tests.faults._harness import FaultCase, until

TASKS = 400
PREFETCH = 25
SHUTDOWN_TIMEOUT = 0.5
EXIT_BOUND = SHUTDOWN_TIMEOUT + 10.0
RECOVERY_BOUND = 20.0


def duration(i: int) -> float:
    """0.2 to 1.0 s, spread evenly over the batch."""
    return round(0.2 + 0.8 * ((i * 37) % 100) / 100, 3)


class SigtermTests(FaultCase):
    scenario = "sigterm"
    fault = (f"SIGTERM with {PREFETCH} tasks of 0.2-1 s in flight, --shutdown-timeout "
             f"{SHUTDOWN_TIMEOUT}, restart")

    def test_sigterm_with_tasks_in_flight_then_restart(self):
        return defer.ensureDeferred(self._test())

    async def _test(self):
        threads = await self.publish(TASKS // 2, options=lambda i: {"seconds": duration(i)})
        reactor_side = await self.publish(TASKS - TASKS // 2, task="faults.amark",
                                          start=TASKS // 2,
                                          options=lambda i: {"seconds": duration(i)})
        ids = {**threads, **reactor_side}
        worker = self.worker(queues=(f"default:{PREFETCH}",),
                             extra=("--shutdown-timeout", str(SHUTDOWN_TIMEOUT))).start()
        await worker.ready()
        await until(lambda: len(self.runs) >= TASKS // 4, 60, "a quarter of the batch")

        running = await self.count_in("running")
        term_at = time.time()
        self.assertEqual(await worker.stop(signal.SIGTERM, timeout=EXIT_BOUND + 5), 0,
                         worker.log()[-3000:])
        exit_after = time.time() - term_at
        self.assertLessEqual(exit_after, EXIT_BOUND, "the worker took too long to stop")

        at_exit = await self.records(ids)
        finished = {i for i, r in at_exit.items() if r is not None and r["state"] == "succeeded"}
        runs_at_exit = self.runs.counts()
        # (a quorum queue's counts reach list_queues every few seconds)
        unfinished = TASKS - len(finished)
        await wait_for(lambda: queue_counts(self.url, "default").addCallback(
            lambda c: c[0] >= unfinished and c[1] == 0), 15, what="the counts to settle")
        ready, unacked = await queue_counts(self.url, "default")
        self.assertEqual(unacked, 0, "deliveries left unacked after the worker exited")
        # Every unfinished task is back in the queue; a task that finished
        # after the connection closed may be there too (its copy is acked
        # without a rerun).
        self.assertGreaterEqual(ready, TASKS - len(finished), "tasks lost at shutdown")
        self.assertLessEqual(ready, TASKS - len(finished) + PREFETCH)
        left_running = sum(1 for r in at_exit.values() if r is not None
                           and r["state"] == "running")

        restarted_at = time.time()
        worker.start()
        await worker.ready()
        records = await self.wait_done(ids, workers=(worker,))
        first = self.runs.first_after(restarted_at, pid=worker.process.pid)
        counts = self.runs.counts()
        rerun = sorted(i for i in finished if counts[i] != 1)
        self.assertEqual(rerun, [], "tasks that had finished before the shutdown ran again")
        tally = self.tally(records, {i: 1 for i in ids})
        # Only tasks still running at the shutdown deadline may run twice.
        self.check(tally, duplicate_bound=PREFETCH, records=records)
        await self.assert_queues()
        self.recovered(None if first is None else first - restarted_at, RECOVERY_BOUND,
                       "restarted worker's first task")
        await self.stop_workers(worker)
        await self.assert_queues()
        interrupted = sum(1 for i in ids if i not in finished and runs_at_exit[i])
        self.passed(f"{running} running at SIGTERM; exit after {exit_after:.1f}s; "
                    f"{len(finished)} finished before exit (none ran again); "
                    f"{left_running} left running, {interrupted} of them had already run; "
                    f"{ready} back in the queue")
