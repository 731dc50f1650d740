"""
Scenario: a poison task that SIGKILLs its worker on every run, amid 1,000
good ones, with the test acting as the process supervisor (restarting the
worker whenever it dies).

The poison must end in the errored queue after its attempt budget
(``max_attempts=3``: three runs, three deaths), and every good task must
succeed; each death may make the tasks then in flight run twice, so
duplicates are bounded by deaths * prefetch.
"""

from __future__ import annotations

from twisted.internet import defer

from tests.faults._harness import FaultCase, Supervisor

GOOD = 1000
PREFETCH = 10
SECONDS = 0.01
MAX_ATTEMPTS = 3  # faults.poison's budget
RESTART_BOUND = 20.0


class PoisonTests(FaultCase):
    scenario = "poison"
    fault = f"a task that kill -9s its worker, {MAX_ATTEMPTS} attempts; test restarts the worker"

    def test_poison_task_ends_in_errored_queue_and_the_rest_succeed(self):
        return defer.ensureDeferred(self._test())

    async def _test(self):
        first = await self.publish(GOOD // 3, options=lambda i: {"seconds": SECONDS})
        poison = await self.client.add_task("faults.poison", self.runs.path)
        rest = await self.publish(GOOD - GOOD // 3, start=GOOD // 3,
                                  options=lambda i: {"seconds": SECONDS})
        ids = {**first, **rest}
        worker = self.worker(queues=(f"default:{PREFETCH}",)).start()
        await worker.ready()
        supervise = Supervisor([worker])
        records = await self.wait_done(ids, supervise=supervise, timeout=180)
        await self.until_failed(supervise, "the poison task to fail")
        poisoned = await self.state.get(poison.id)
        self.assertEqual(poisoned["state"], "failed")
        self.assertEqual(poisoned["attempts"], MAX_ATTEMPTS)
        self.assertEqual(poisoned["error"]["type"], "quebert.errors.WorkerLost")
        self.assertEqual(self.runs.counts()[-1], MAX_ATTEMPTS, "the poison ran once per attempt")
        self.assertEqual(len(supervise.deaths), MAX_ATTEMPTS, f"deaths: {supervise.deaths}")
        self.assertEqual({code for _, code in supervise.deaths}, {-9})

        tally = self.tally(records, {i: 1 for i in ids})
        self.check(tally, duplicate_bound=len(supervise.deaths) * PREFETCH, records=records)
        await self.assert_queues({"default.errored": (1, 0)})
        self.recovered(supervise.slowest_recovery(self.runs), RESTART_BOUND,
                       "slowest restart to the restarted worker's first task")
        await self.stop_workers(worker)
        self.passed(f"{len(supervise.deaths)} deaths, {worker.starts} starts; poison failed with "
                    f"{poisoned['attempts']} attempts; {tally.extra_attempts} lost attempt(s) "
                    "of good tasks recorded")
