"""
Scenario: the Redis primary killed (``kill -9``) mid-batch; Sentinel
promotes its replica.

The workers, the client and the test's own reads use a Redis behind
Sentinel (``redis+sentinel://``): the set of :mod:`tests._sentinel`
(``scripts/redis-sentinel.sh`` on the tests' own ports; the main Redis is
not touched).  One task in ten fails its first run, so that retries go
through the broker's delay queues while Redis fails over.

The workers must keep running tasks, queue their state writes while no
primary answers, follow the promoted replica and replay the writes there,
and every record must end ``succeeded`` with its true attempt count: the
final states answered before the kill were acknowledged by the replica
(``WAIT``), and those written during the failover are replayed.  The
broker saw no fault: no task may run twice.
"""

from __future__ import annotations

import time

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

from quebert._defer import bounded
from quebert.state.redis import RedisStateManager, connect_redis
from tests import _sentinel
from tests.faults._harness import FaultCase, until

TASKS = 2000
WORKERS = 2
PREFETCH = 20
#: 2 workers * 20 / 0.2 s: at most 200 tasks a second, so the batch spans the failover.
SECONDS = 0.2
RECOVERY_BOUND = 30.0


class RedisFailoverTests(FaultCase):
    scenario = "redis-failover"
    fault = "kill -9 of the Redis primary mid-batch; Sentinel promotes the replica"

    def setUp(self) -> None:
        super().setUp()
        try:
            self.sentinel_url = _sentinel.sentinel_set()
        except SkipTest:
            self.row.update(status="skipped", notes="redis-server is not installed")
            raise
        # the harness's client and reads go to the plain test Redis: replace them
        plain_redis, plain_client = self.redis, self.client
        self.addCleanup(plain_redis.disconnect)
        self.addCleanup(plain_client.close)
        self.redis = connect_redis(self.sentinel_url)
        self.state = RedisStateManager(self.redis, prefix=self.prefix)
        self.client = self.make_client(self.state)

    def test_primary_killed_mid_batch(self):
        return defer.ensureDeferred(self._test())

    async def _succeeded_now(self):
        """Records listed ``succeeded``, or ``None`` while no primary answers."""
        try:
            return await bounded(defer.ensureDeferred(self.count_in("succeeded")), 1.0,
                                 reactor, lambda: TimeoutError("no answer"))
        except Exception:
            return None

    async def _test(self):
        ids = await self.publish(TASKS, options=lambda i: {"seconds": SECONDS,
                                                            "fail_first": i % 10 == 0})
        workers = [self.worker(f"w{n}", queues=(f"default:{PREFETCH}",),
                               redis_url=self.sentinel_url).start()
                   for n in range(WORKERS)]
        for w in workers:
            await w.ready()
        await until(lambda: len(self.runs) >= TASKS // 4, 60, "a quarter of the batch")

        self.addCleanup(deferToThread, _sentinel.restore)
        before = await self.count_in("succeeded")
        old = await deferToThread(_sentinel.kill_primary)
        killed_at = time.time()

        async def promoted() -> bool:
            return (await deferToThread(_sentinel.primary)) != old

        await until(promoted, 30, "the sentinels to promote the replica", interval=0.1)
        failover_s = time.time() - killed_at

        async def written() -> bool:
            now = await self._succeeded_now()
            return now is not None and now > before

        await until(written, RECOVERY_BOUND + 30,
                    "a final state written to the promoted replica", interval=0.1)
        follow_s = time.time() - killed_at
        ran_during = len([r for r in self.runs.read() if killed_at < r.at <= killed_at + follow_s])
        for w in workers:
            self.assertTrue(w.alive, "a worker exited during the failover:\n" + w.log()[-3000:])

        records = await self.wait_done(ids, workers=workers, timeout=180)
        expected = {i: 2 if i % 10 == 0 else 1 for i in ids}
        tally = self.tally(records, expected)
        # The broker saw nothing: no redelivery, so no duplicate, and each
        # record counts its task's attempts exactly (none lost with the old
        # primary: WAIT before the kill, replay after it).
        self.check(tally, duplicate_bound=0, attempt_bound=0, records=records)
        dropped = sum(w.log().count("dropped the") for w in workers)
        self.assertEqual(dropped, 0, "state writes were dropped")
        await self.assert_queues()
        self.recovered(follow_s, RECOVERY_BOUND,
                       "first final state written to the promoted replica after the kill")
        unavailable = sum(w.log().count("state store unavailable") for w in workers)
        waits = sum(w.log().count("Redis WAIT:") for w in workers)
        await self.stop_workers(*workers)
        await self.assert_queues()
        self.passed(f"failover {failover_s:.1f}s; {ran_during} tasks ran meanwhile; "
                    f"{unavailable} outage warning(s), {waits} WAIT warning(s) "
                    "(no replica after the promotion)")
