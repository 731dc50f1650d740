"""
What the console reads from the state stores, on the memory store and the
real Redis alike: workers' descriptions, counts per state, ``find`` by
task name, and the arguments a producer records.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from quebert.client import Client
from quebert.state import _records
from quebert.state.memory import MemoryStateManager
from quebert.state.redis import RedisStateManager
from tests._redis import isolated_redis

T0 = 1767225600.0


def info(task: str = "app.add", queue: str = "default", **extra: Any) -> dict:
    return {"queue": queue, "kind": "call", "task": task, "name": None, "eta": None,
            "created_at": T0, **extra}


class _Contract:
    """Runs on both stores: ``self.store`` is set by the subclass."""

    store: Any

    async def test_workers_are_described_until_their_beat_ends(self) -> None:
        await self.store.worker_beat("h:1", 30, {"host": "h", "pid": 1, "queues": ["a"]})
        await self.store.worker_beat("h:2", 30)
        workers = await self.store.workers()
        self.assertEqual(set(workers), {"h:1", "h:2"})
        self.assertEqual((workers["h:1"]["host"], workers["h:1"]["queues"]), ("h", ["a"]))
        self.assertGreater(workers["h:1"]["expires_in"], 25)
        self.assertEqual(set(workers["h:2"]), {"expires_in"})
        self.assertTrue(await self.store.worker_alive("h:1"))
        await self.store.worker_beat("h:1", 0)
        self.assertEqual(set(await self.store.workers()), {"h:2"})

    async def test_counts_per_state(self) -> None:
        for i in range(3):
            await self.store.enqueued(f"q{i}", "queued", info(), T0)
        await self.store.started("q0", 1, "w", info(), T0 + 1)
        await self.store.finished("q1", "failed", 0, info(), T0 + 1, reason="x")
        counts = await self.store.counts()
        self.assertEqual((counts["queued"], counts["running"], counts["failed"],
                          counts["succeeded"]), (1, 1, 1, 0))

    async def test_find_by_task_name_pages_by_position(self) -> None:
        for i in range(30):
            await self.store.enqueued(f"t{i:02}", "queued",
                                      info("app.rare" if i % 10 == 0 else "app.common",
                                           queue="a" if i < 15 else "b"), T0 + i)
        records, position = await self.store.find("app.rare", limit=2)
        self.assertEqual([r["id"] for r in records], ["t20", "t10"])
        records, position = await self.store.find("app.rare", limit=2, position=position)
        self.assertEqual(([r["id"] for r in records], position), (["t00"], None))
        records, _ = await self.store.find("app.rare", queue="b")
        self.assertEqual([r["id"] for r in records], ["t20"])
        records, _ = await self.store.find("app.rare", state="running")
        self.assertEqual(records, [])
        self.assertEqual((await self.store.find("app.none"))[0], [])

    async def test_find_examines_a_bounded_number_of_entries(self) -> None:
        for i in range(30):
            await self.store.enqueued(f"t{i:02}", "queued",
                                      info("app.rare" if i == 0 else "app.common"), T0 + i)
        records, position = await self.store.find("app.rare", limit=10, budget=12)
        self.assertEqual((records, position), ([], 12), "a short page, and where to go on")
        records, position = await self.store.find("app.rare", limit=10, position=position,
                                                  budget=100)
        self.assertEqual(([r["id"] for r in records], position), (["t00"], None))

    async def test_arguments_are_kept_when_given(self) -> None:
        text = _records.arguments_text([1, "<script>"], {"k": None}, {"db": "x"})
        await self.store.enqueued("a", "queued", info(arguments=text), T0)
        record = await self.store.get("a")
        self.assertEqual(record["arguments"],
                         {"args": [1, "<script>"], "kwargs": {"k": None}, "context": {"db": "x"}})
        await self.store.started("a", 1, "w", info(), T0 + 1)
        await self.store.finished("a", "succeeded", 1, info(), T0 + 2, result=1)
        self.assertIn("arguments", await self.store.get("a"))
        await self.store.enqueued("b", "queued", info(), T0)
        self.assertNotIn("arguments", await self.store.get("b"))

    async def test_arguments_arriving_after_the_worker_started_are_kept(self) -> None:
        # the producer records a task after the broker confirmed it: a fast
        # worker may have started (or finished) it already
        await self.store.started("c", 1, "w", info(), T0 + 1)
        await self.store.finished("c", "succeeded", 1, info(), T0 + 2, result=7)
        text = _records.arguments_text([7], {}, {})
        await self.store.enqueued("c", "queued", info(arguments=text), T0)
        record = await self.store.get("c")
        self.assertEqual((record["state"], record["result"], record["arguments"]),
                         ("succeeded", 7, {"args": [7], "kwargs": {}}))
        other = _records.arguments_text([8], {}, {})
        await self.store.enqueued("c", "queued", info(arguments=other), T0)
        self.assertEqual((await self.store.get("c"))["arguments"]["args"], [7],
                         "the first one stays")


class MemoryConsoleTests(_Contract, TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = MemoryStateManager(clock=self.clock)


class RedisConsoleTests(_Contract, TestCase):
    async def setUp(self) -> None:
        self.redis, self.prefix = await isolated_redis(self)
        self.store = RedisStateManager(self.redis, prefix=self.prefix)


class ArgumentsTextTests(TestCase):
    def test_small_arguments_are_kept_whole(self) -> None:
        self.assertEqual(_records.arguments_text([1], {}, {}), '{"args":[1],"kwargs":{}}')

    def test_large_arguments_become_a_preview(self) -> None:
        kept = json.loads(_records.arguments_text(["x" * 5000], {}, {}, limit=100))
        self.assertEqual((kept["truncated"], kept["size"], len(kept["preview"])),
                         (True, len('{"args":["') + 5000 + len('"],"kwargs":{}}'), 100))

    def test_zero_keeps_nothing(self) -> None:
        self.assertIsNone(_records.arguments_text([1], {}, {}, limit=0))

    def test_client_records_arguments_through_its_state(self) -> None:
        state = MemoryStateManager()
        client = Client(state=state)
        self.addCleanup(client.close)
        from quebert import protocol

        message, _ = protocol.build("app.add", (2, 3), {"x": 1}, queue="default",
                                    context={"user": "ann"})
        self.assertEqual(json.loads(client._info(message)["arguments"]),
                         {"args": [2, 3], "kwargs": {"x": 1}, "context": {"user": "ann"}})
        client.record_arguments = 0
        self.assertNotIn("arguments", client._info(message))

