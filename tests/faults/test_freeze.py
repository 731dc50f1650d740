"""
Scenario: the TCP path between a worker and RabbitMQ freezes mid-batch
without closing (a loopback proxy that stops forwarding bytes both ways),
with 2,000 tasks and AMQP heartbeats off, so that only the liveness
beacon (``--beacon-interval 1``) can notice.

The worker must drop the frozen connections within 3 x interval plus a
margin; once the path thaws, it reconnects and every task succeeds.
Tasks that were unacked on the frozen connection are redelivered (and may
run twice: at-least-once).
"""

from __future__ import annotations

import time

from twisted.internet import defer

from tests._proxy import FreezableProxy
from tests._rabbit import vhost_of
from tests.faults._harness import FaultCase, until

TASKS = 2000
PREFETCH = 20
INTERVAL = 1.0
DETECT_BOUND = 3 * INTERVAL + 3.0
RECOVERY_BOUND = 30.0


class FreezeTests(FaultCase):
    scenario = "freeze"
    fault = "the TCP path to RabbitMQ frozen (not closed) mid-batch; beacon every 1 s"

    def test_frozen_connection_detected_and_recovered(self):
        return defer.ensureDeferred(self._test())

    async def _test(self):
        ids = await self.publish(TASKS, options=lambda i: {"seconds": 0.002})
        proxy = FreezableProxy()
        port = proxy.start(self)
        url = f"amqp://guest:guest@127.0.0.1:{port}/{vhost_of(self.url)}?heartbeat=0"
        worker = self.worker(queues=(f"default:{PREFETCH}",), amqp_url=url,
                             extra=("--beacon-interval", str(INTERVAL))).start()
        await worker.ready()
        await until(lambda: len(self.runs) >= TASKS // 4, 60, "a quarter of the tasks")
        frozen_at = proxy.freeze()
        await until(lambda: proxy.closed_by_client(frozen_at), DETECT_BOUND + 10,
                    "the worker to drop the frozen connection")
        detected = proxy.closed_by_client(frozen_at)[0] - frozen_at
        self.assertLessEqual(detected, DETECT_BOUND,
                             f"frozen connection dropped after {detected:.2f}s")
        thawed_at = time.time()
        proxy.thaw()
        records = await self.wait_done(ids, timeout=180)
        self.assertTrue(worker.alive, "the worker recovered without a restart")
        tally = self.tally(records, {i: 1 for i in ids})
        self.check(tally, duplicate_bound=2 * PREFETCH, records=records)
        await self.assert_queues()
        after = self.runs.first_after(thawed_at)
        self.recovered(after - thawed_at if after is not None else None, RECOVERY_BOUND,
                       "thaw to the first task run again")
        await self.stop_workers(worker)
        self.passed(f"frozen connection dropped {detected:.2f}s after the freeze "
                    f"(bound {DETECT_BOUND:.0f}s)")
