"""
Scenario: Redis unreachable for 10 s mid-batch, then back.

How Redis "goes down": the workers reach Redis through a TCP proxy in the
test process (:class:`tests.faults._proxy.CuttableProxy`), and the test
cuts it: every open connection is aborted and new ones are refused, for
10 s.  That is what a crashed or partitioned Redis looks like from the
worker, and it leaves the shared Redis alone.  The alternatives were
worse: this Redis runs without persistence (``--save "" --appendonly
no``), so stopping it would wipe every key, this test's records and
every other user's data with them; ``CLIENT PAUSE`` would freeze every
client of the server (other tests, other engineers' benchmarks) and
only looks like a *slow* Redis, with connections left open.

Tasks must keep running during the outage (DESIGN: losing Redis does
not stop task execution), the workers' state writes are queued and
replayed (``ResilientStateManager``), and in the end every record says
``succeeded`` with exactly one attempt: the broker saw no fault, so no
task may run twice.
"""

from __future__ import annotations

import time

from twisted.internet import defer, reactor

from tests._worker import sleep
from tests.faults._harness import REDIS_URL, FaultCase, until
from tests.faults._proxy import CuttableProxy

TASKS = 3000
WORKERS = 2
PREFETCH = 10
#: 2 workers * 10 / 0.1 s: at most 200 tasks a second, so the batch spans the outage.
SECONDS = 0.1
DOWN = 10.0
RECOVERY_BOUND = 45.0
#: Longest stretch without a task run during the outage, at most.
PAUSE_BOUND = 8.0


class RedisOutageTests(FaultCase):
    scenario = "redis-outage"
    fault = f"Redis unreachable for {DOWN:.0f} s mid-batch (TCP proxy cut: reset + refused)"
    #: new connections refused (False: accepted and closed at once, see
    #: tests.faults.test_redis_front_down)
    refuse = True

    def test_redis_unreachable_for_ten_seconds_mid_batch(self):
        return defer.ensureDeferred(self._test())

    async def _test(self):
        host_port = REDIS_URL.split("//", 1)[1].split("/", 1)[0]
        host, port = host_port.rsplit(":", 1)
        proxy = CuttableProxy(reactor, host, int(port))
        proxied = f"redis://127.0.0.1:{proxy.start()}/{REDIS_URL.rsplit('/', 1)[1]}"
        self.addCleanup(proxy.stop)

        ids = await self.publish(TASKS, options=lambda i: {"seconds": SECONDS})
        workers = [self.worker(f"w{n}", queues=(f"default:{PREFETCH}",),
                               redis_url=proxied).start() for n in range(WORKERS)]
        for w in workers:
            await w.ready()
        await until(lambda: len(self.runs) >= TASKS // 6, 60, "a sixth of the batch")

        cut_at = time.time()
        aborted = await proxy.cut(refuse=self.refuse)
        succeeded_at_cut = await self.count_in("succeeded")
        await sleep(DOWN)
        restored_at = time.time()
        during = [r for r in self.runs.read() if cut_at < r.at <= restored_at]
        gap = self.runs.largest_gap(cut_at, restored_at)
        succeeded_in_outage = await self.count_in("succeeded") - succeeded_at_cut
        for w in workers:
            self.assertTrue(w.alive, "a worker exited while Redis was down:\n" + w.log()[-3000:])
            self.assertIn("state store unavailable", w.log())
        self.assertGreater(len(during), 0, "tasks stopped running while Redis was down")
        # Execution pauses while the workers find out that Redis is gone
        # (pending writes wait for the state store's 5 s reply timeout),
        # then goes on with the writes queued.
        self.assertLessEqual(gap, PAUSE_BOUND, "task execution stalled during the outage")
        self.assertEqual(succeeded_in_outage, 0, "the proxy did not cut Redis off")
        await proxy.restore()

        # Recovery: until every worker replayed its queued writes.
        await until(lambda: all("state store available again" in w.log() for w in workers),
                    RECOVERY_BOUND + 30, "the workers to replay their state writes",
                    interval=0.1)
        replayed_in = time.time() - restored_at
        records = await self.wait_done(ids, workers=workers)
        tally = self.tally(records, {i: 1 for i in ids})
        # The broker saw nothing: no redelivery, so no duplicate and exactly
        # one attempt per task.
        self.check(tally, duplicate_bound=0, attempt_bound=0, records=records)
        for i, record in records.items():
            self.assertEqual(record["attempts"], 1, f"task {i}: {record}")
        dropped = sum(w.log().count("dropped the") for w in workers)
        self.assertEqual(dropped, 0, "state writes were dropped")
        await self.assert_queues()
        self.recovered(replayed_in, RECOVERY_BOUND, "every worker's queued state writes replayed")
        await self.stop_workers(*workers)
        await self.assert_queues()
        self.passed(f"{len(during)} tasks ran during the outage (longest pause {gap:.1f}s, "
                    f"bound {PAUSE_BOUND:g}s); "
                    f"{aborted} connection(s) cut; {proxy.accepted} accepted in all")
