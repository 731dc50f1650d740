# -*- test-case-name: tests.test_state_parity -*-
"""
The Redis store and the memory store keep the same records: random write
sequences (writes out of order, replays, retries, queue changes, missing
fields) are applied to both, and every record and listing must match.

The Redis scripts build records in Lua, with shortcuts the memory store
does not take; this catches any difference between the two.
"""

from __future__ import annotations

import random
from typing import Any, Dict, List

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from quebert.state import (
    CANCELED,
    FAILED,
    HISTORY_LIMIT,
    QUEUED,
    SCHEDULED,
    STATES,
    SUCCEEDED,
    MemoryStateManager,
    RedisStateManager,
)
from tests._redis import isolated_redis

T0 = 1767225590.123456
OUTCOMES = (SCHEDULED, SUCCEEDED, FAILED, CANCELED)


def random_info(rng: random.Random) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "queue": rng.choice(["q1", "q2", "q\u00e9", None]),
        "kind": rng.choice(["call", None]),
        "task": rng.choice(["app.add", "app.mul", None]),
        "name": rng.choice([None, "nightly", ""]),
        "eta": rng.choice([None, T0 + 60.5]),
        "created_at": rng.choice([None, T0 - 1.25, T0]),
    }
    if rng.random() < 0.1:
        return {}
    return info


def random_write(rng: random.Random, task_ids: List[str], at: float) -> tuple:
    task_id = rng.choice(task_ids)
    info = random_info(rng)
    kind = rng.random()
    if kind < 0.06:
        return ("cancel", task_id, at, rng.choice([None, "stop"]))
    if kind < 0.1:
        return ("requeued", task_id, at)
    if kind < 0.2:
        return ("enqueued", task_id, rng.choice([QUEUED, SCHEDULED]), info, at)
    if kind < 0.55:
        worker = rng.choice(["host:1", "h\u00f4te:2", None])
        return ("started", task_id, rng.randint(1, 4), worker, info, at)
    state = rng.choice(OUTCOMES)
    kwargs = {
        "result": rng.choice([None, 0, "ok", [1, {"a": None}], {"x": 1.5}, float("nan")]),
        "error": rng.choice(
            [None, {"type": "E", "message": "m\u00e9", "traceback": None, "field": 3}]
        ),
        "reason": rng.choice([None, "because", ""]),
        "retry_at": rng.choice([None, at + 30.0]) if state == SCHEDULED else None,
    }
    return ("finished", task_id, state, rng.randint(0, 4), info, at, kwargs)


class ParityTests(TestCase):
    """Redis and memory stores agree on every record after random writes."""

    async def setUp(self) -> None:
        self.redis, self.prefix = await isolated_redis(self)

    async def apply(self, store: Any, write: tuple) -> Any:
        if write[0] == "finished":
            _, task_id, state, attempt, info, at, kwargs = write
            return await store.finished(task_id, state, attempt, info, at, **kwargs)
        return await getattr(store, write[0])(*write[1:])

    async def check_same(self, redis: Any, memory: Any, task_ids: List[str], note: str) -> None:
        for task_id in task_ids:
            self.assertEqual(await redis.get(task_id), await memory.get(task_id), note)
        for state in (None, *STATES):
            for queue in (None, "q1", "q\u00e9"):
                got = [r["id"] for r in await redis.list(state=state, queue=queue)]
                want = [r["id"] for r in await memory.list(state=state, queue=queue)]
                self.assertEqual(got, want, (note, state, queue))

    async def run_sequence(self, seed: int, batched: bool) -> None:
        rng = random.Random(seed)
        prefix = f"{self.prefix}{seed}:{int(batched)}:"
        redis = RedisStateManager(self.redis, prefix=prefix)
        memory = MemoryStateManager(clock=Clock())
        task_ids = ["a", "b", "t\u00e2che"]
        at = T0
        writes: List[tuple] = []
        for step in range(60):
            at += rng.choice([0.001, 1.0, 7.25])
            write = random_write(rng, task_ids, at)
            writes.append(write)
            answer = await self.apply(memory, write)
            if batched:
                continue
            self.assertEqual(await self.apply(redis, write), answer, (seed, step, write))
            await self.check_same(redis, memory, task_ids, f"seed {seed} step {step}: {write}")
        if batched:
            # every write in one script call
            from twisted.internet.defer import gatherResults

            ds = []
            for write in writes:
                if write[0] == "finished":
                    _, task_id, state, attempt, info, wat, kwargs = write
                    ds.append(redis.finished(task_id, state, attempt, info, wat, **kwargs))
                else:
                    ds.append(getattr(redis, write[0])(*write[1:]))
            await gatherResults(ds)
            await self.check_same(redis, memory, task_ids, f"seed {seed} batched")

    async def test_random_writes_one_by_one(self) -> None:
        """Records and lists match after every single write."""
        for seed in range(12):
            await self.run_sequence(seed, batched=False)

    async def test_random_writes_in_one_batch(self) -> None:
        """Records and lists match when all writes go in one script call."""
        for seed in range(12):
            await self.run_sequence(seed, batched=True)

    async def test_long_histories_match(self) -> None:
        """Many attempts, out of order: the kept history entries are the same."""
        redis = RedisStateManager(self.redis, prefix=self.prefix + "long:")
        memory = MemoryStateManager(clock=Clock())
        rng = random.Random(7)
        at = T0
        for _ in range(4 * HISTORY_LIMIT):
            at += 1.0
            attempt = rng.randint(0, HISTORY_LIMIT + 10)
            if rng.random() < 0.5:
                write: tuple = ("started", "x", max(attempt, 1), "w", {"queue": "q1"}, at)
            else:
                write = ("finished", "x", rng.choice(OUTCOMES), attempt, {}, at,
                         {"error": {"message": "x/y"}, "retry_at": None})
            await self.apply(memory, write)
            await self.apply(redis, write)
            self.assertEqual(await redis.get("x"), await memory.get("x"), write)
