"""
The Guillotina bridge's Redis keys, against the real Redis: the
per-container index (``_INDEX_ADD``'s pruning, ``_INDEX_LIST``) and the
unique-name claim of :class:`~quebert.bridge.guillotina.state.BridgeState`.

No Guillotina: ``BridgeState`` runs on ``redis.asyncio`` in a loop of its
own (``asyncio.run`` per step), with a key prefix only this test uses;
index scores (publish times) are set in the past to age entries instead of
waiting.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import redis
from twisted.trial.unittest import SynchronousTestCase

from quebert import protocol
from quebert.bridge.guillotina.bridge import Bridge
from quebert.bridge.guillotina.settings import BridgeSettings
from quebert.bridge.guillotina.state import PRUNE_BATCH, BridgeState
from quebert.errors import TaskAlreadyExists
from tests._redis import REDIS_URL

CONTAINER = "db/c1"
#: Seconds finished records are kept in these tests: every score below is
#: far older than that, or within it.
TTL = 60.0


class _RedisCase(SynchronousTestCase):
    """A key prefix of the test Redis for this test only, deleted in cleanup."""

    def setUp(self) -> None:
        self.prefix = f"quebert-test-{uuid.uuid4().hex}:"
        self.sync = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        try:
            self.sync.ping()
        except redis.RedisError as e:
            self.fail(f"the test Redis at {REDIS_URL} is not reachable: {e}")
        self.addCleanup(self.sync.close)
        self.addCleanup(self._delete_keys)
        self.index_key = f"{self.prefix}guillotina:container:{CONTAINER}"

    def _delete_keys(self) -> None:
        keys = list(self.sync.scan_iter(match=self.prefix + "*", count=500))
        if keys:
            self.sync.delete(*keys)

    def run_state(self, step, **options):
        """``await step(state)`` on a fresh ``BridgeState`` (and client) in a loop of its own."""
        async def main():
            state = BridgeState.from_url(REDIS_URL, prefix=self.prefix,
                                         finished_ttl=options.get("ttl", TTL),
                                         name_tombstone=options.get("tombstone", 3600))
            try:
                return await step(state)
            finally:
                await state.close()

        return asyncio.run(main())

    def index(self, task_id: str, at: float, ttl: float = TTL) -> None:
        self.run_state(lambda state: state.index(CONTAINER, task_id, at, {"id": task_id}),
                       ttl=ttl)

    def record(self, task_id: str) -> None:
        """Give ``task_id`` a ``queued`` record (no expiry: not finished)."""
        message, _ = protocol.build("app.t", queue="q", task_id=task_id)
        self.run_state(lambda state: state.enqueued(message, "queued", time.time()))

    def indexed(self) -> set:
        return set(self.sync.zrange(self.index_key, 0, -1))


class BridgeStateArgumentsTests(_RedisCase):
    def test_the_bridge_records_the_arguments_as_the_client_does(self) -> None:
        message, _ = protocol.build("app.t", (1, "<b>"), {"k": 2}, queue="q", task_id="a1",
                                    context={"db": "db1"})
        self.run_state(lambda state: state.enqueued(message, "queued", time.time()))
        kept = json.loads(self.sync.hget(f"{self.prefix}task:a1", "arguments"))
        self.assertEqual(kept, {"args": [1, "<b>"], "kwargs": {"k": 2},
                                "context": {"db": "db1"}})


class BridgeStateIndexTests(_RedisCase):
    # -- pruning ---------------------------------------------------------------------

    def test_adding_drops_old_entries_whose_record_is_gone(self) -> None:
        now = time.time()
        # Entries as earlier publishes left them (adding one prunes).
        self.sync.zadd(self.index_key, {"old-gone": now - 10 * TTL, "old-live": now - 10 * TTL,
                                        "recent-gone": now - TTL / 2})
        self.record("old-live")  # "recent-gone": its record may still be on its way
        self.assertEqual(self.indexed(), {"old-gone", "old-live", "recent-gone"})
        self.index("new", now)
        self.assertEqual(self.indexed(), {"old-live", "recent-gone", "new"})
        # The debug copy of the message expires with the state TTL.
        job_ttl = self.sync.pttl(f"{self.prefix}guillotina:job:new")
        self.assertTrue(0 < job_ttl <= TTL * 1000, job_ttl)

    def test_no_ttl_never_prunes(self) -> None:
        now = time.time()
        self.index("ancient", now - 10 ** 6, ttl=0)
        self.index("new", now, ttl=0)
        self.assertEqual(self.indexed(), {"ancient", "new"})
        self.assertEqual(self.sync.pttl(f"{self.prefix}guillotina:job:new"), -1)

    def test_listing_skips_ids_without_a_record(self) -> None:
        now = time.time()
        for n in range(5):
            self.index(f"t{n}", now - 5 + n)
        for n in (0, 2, 4):
            self.record(f"t{n}")
        ids = self.run_state(lambda state: state.list(CONTAINER))
        self.assertEqual(ids, ["t4", "t2", "t0"])
        ids = self.run_state(lambda state: state.list(CONTAINER, limit=2))
        self.assertEqual(ids, ["t4", "t2"])
        # Listing removes nothing: a record may be written after its entry.
        self.assertEqual(len(self.indexed()), 5)
        self.assertTrue(self.run_state(lambda state: state.belongs(CONTAINER, "t1")))
        self.assertFalse(self.run_state(lambda state: state.belongs("db/c2", "t1")))

    def test_steady_traffic_keeps_the_index_bounded(self) -> None:
        """
        Tasks whose records expired are pruned as fast as new ones come:
        after many publishes the index holds the ones within the TTL only.
        """
        now = time.time()
        pipe = self.sync.pipeline()
        for n in range(3 * PRUNE_BATCH):
            pipe.zadd(self.index_key, {f"dead-{n}": now - 10 * TTL + n})
        pipe.execute()
        for n in range(5):
            self.index(f"new-{n}", now + n)
        self.assertEqual(self.indexed(), {f"new-{n}" for n in range(5)})

    def test_old_live_entries_do_not_stop_pruning(self) -> None:
        """
        More than a batch of old entries that still have records (tasks
        queued for a queue no worker reads, long countdowns) must not hide
        the dead entries behind them from pruning forever: the index would
        grow without bound.
        """
        now = time.time()
        pipe = self.sync.pipeline()
        live = [f"live-{n}" for n in range(2 * PRUNE_BATCH)]
        for n, task_id in enumerate(live):
            pipe.zadd(self.index_key, {task_id: now - 100 * TTL + n})
        dead = [f"dead-{n}" for n in range(2 * PRUNE_BATCH)]
        for n, task_id in enumerate(dead):
            pipe.zadd(self.index_key, {task_id: now - 50 * TTL + n})
        pipe.execute()
        for task_id in live:
            self.record(task_id)
        for n in range(20):
            self.index(f"new-{n}", now + n)
        self.assertEqual(self.indexed(), set(live) | {f"new-{n}" for n in range(20)})
        # Listing still shows every live task, newest first.
        ids = self.run_state(lambda state: state.list(CONTAINER))
        self.assertEqual(ids, [f"live-{n}" for n in reversed(range(2 * PRUNE_BATCH))])

    # -- unique names ----------------------------------------------------------------

    def test_concurrent_claims_one_wins(self) -> None:
        messages = [protocol.build("app.t", queue="q", name="only-once")[0] for _ in range(10)]

        async def claim_all(state):
            return await asyncio.gather(
                *(state.claim(m, "queued", time.time()) for m in messages),
                return_exceptions=True)

        results = self.run_state(claim_all)
        winners = [m.id for m, r in zip(messages, results) if r is None]
        refused = [r for r in results if isinstance(r, TaskAlreadyExists)]
        self.assertEqual((len(winners), len(refused)), (1, 9), results)
        self.assertEqual(self.sync.get(f"{self.prefix}name:only-once"), winners[0])

    def test_unclaim_frees_the_name_and_records_the_failure(self) -> None:
        first = protocol.build("app.t", queue="q", name="retry-me")[0]
        second = protocol.build("app.t", queue="q", name="retry-me")[0]

        async def steps(state):
            await state.claim(first, "queued", time.time())
            with self.assertRaises(TaskAlreadyExists):
                await state.claim(second, "queued", time.time())
            await state.unclaim(first, time.time(), "publishing the task failed: boom")
            await state.claim(second, "queued", time.time())
            return await state.get(first.id), await state.get(second.id)

        failed, queued = self.run_state(steps)
        self.assertEqual((failed["state"], failed["reason"]),
                         ("failed", "publishing the task failed: boom"))
        self.assertEqual(queued["state"], "queued")
        self.assertEqual(self.sync.get(f"{self.prefix}name:retry-me"), second.id)


class _StuckPublisher:
    """A publisher whose publish never gets its confirm (until cancelled)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def publish(self, *args, **kwargs) -> None:
        self.started.set()
        await asyncio.Event().wait()


class BridgeSendTests(_RedisCase):
    """``Bridge.send`` of a named task whose publish is cancelled (the real Redis)."""

    def test_cancelled_publish_frees_the_name(self) -> None:
        """
        The request publishing a named task is cancelled while it waits for
        the broker: the name must not stay held, with a ``queued`` record
        of a task nobody may ever run, until someone deletes the key.
        """
        message = protocol.build("app.t", queue="q", name="cancelled")[0]

        async def steps(state):
            publisher = _StuckPublisher()
            bridge = Bridge(BridgeSettings.from_mapping({"state_prefix": self.prefix}),
                            publisher=publisher, state=state)
            sending = asyncio.ensure_future(bridge.send(message, CONTAINER))
            await publisher.started.wait()
            sending.cancel()
            with self.assertRaises(asyncio.CancelledError):
                await sending
            return await state.get(message.id)

        record = self.run_state(steps)
        self.assertIsNone(self.sync.get(f"{self.prefix}name:cancelled"))
        self.assertEqual(record["state"], "failed")
        self.assertIn("cancelled", record["reason"])
