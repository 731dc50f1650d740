"""
Scenario: every task arrives twice, neither copy flagged redelivered.

That is what a broker duplicate looks like: a retry that quorum delay
queues dead-lettered twice across a node stop (at-least-once
dead-lettering; seen in the ``broker-restart`` scenario, where both copies
ran the same attempt), or a publish retried after a lost confirm although
the broker had taken the first try.  Each task is published twice with the
same id, the copies one after the other so that they often reach the two
workers at the same moment; one task in ten fails its first run.

Each task must run exactly as often as it would have once (1 run, 2 with
the planned failure), its record must count those runs, and no copy may
be left in a queue: the second copy is settled by the running attempt
when it reaches the same worker, put aside (parked) while the other
worker runs the attempt, or acked from the record once the attempt ended.
"""

from __future__ import annotations

import re
import uuid

from twisted.internet import defer

from tests.faults._harness import FaultCase

TASKS = 1000
PREFETCH = 20
WORKERS = 2
SECONDS = 0.02
PUBLISH_CONCURRENCY = 32
#: Seconds a parked copy may take to come back (a beat's lifetime, 3 s,
#: plus the park margin), and the seconds quorum queues' counts lag.
PARK_WINDOW = 3.5 + 5.0

SETTLED_WAYS = {
    "with the running attempt here": re.compile(r"another copy arrived while its attempt"),
    "parked while another worker ran it": re.compile(r"still runs it; checking again"),
    "acked from the record": re.compile(r"already ended \w+; acking the copy"),
}


class DuplicateTests(FaultCase):
    scenario = "duplicates"
    fault = (f"every task published twice with one id, copies back to back, "
             f"{WORKERS} workers (prefetch {PREFETCH})")

    def test_every_task_published_twice_runs_once(self):
        return defer.ensureDeferred(self._test())

    async def _publish_twice(self, i: int, task_id: str) -> None:
        options = {"seconds": SECONDS, "fail_first": i % 10 == 0}
        for _ in range(2):
            await self.client.add_task("faults.mark", self.runs.path, i, _task_id=task_id,
                                       **options)

    async def _test(self):
        ids = {i: uuid.uuid4().hex for i in range(TASKS)}
        sem = defer.DeferredSemaphore(PUBLISH_CONCURRENCY)
        await defer.gatherResults([sem.run(self._publish_twice, i, task_id)
                                   for i, task_id in ids.items()], consumeErrors=True)
        workers = [self.worker(f"w{n}", queues=(f"default:{PREFETCH}",)).start()
                   for n in range(WORKERS)]
        for w in workers:
            await w.ready()
        records = await self.wait_done(ids, workers=workers, timeout=180)
        tally = self.tally(records, {i: 2 if i % 10 == 0 else 1 for i in ids})
        # No fault takes a worker or a connection away: not one extra run.
        self.check(tally, duplicate_bound=0, records=records)
        # A copy parked while the other worker ran its attempt comes back
        # from a delay queue up to PARK_WINDOW later (and quorum queues show
        # it late): the workers settle it only if they are still running.
        await self.assert_queues(steady=PARK_WINDOW)
        await self.stop_workers(*workers)
        await self.assert_queues()
        logs = "".join(w.log() for w in workers)
        ways = {what: len(pattern.findall(logs)) for what, pattern in SETTLED_WAYS.items()}
        # Every second copy was settled one way or another (a parked copy may
        # be looked at more than once, so these may add up to more).
        self.assertGreaterEqual(ways["with the running attempt here"]
                                + ways["acked from the record"], 1)
        self.passed("second copies settled: " + ", ".join(f"{n} {what}"
                                                         for what, n in ways.items()))
