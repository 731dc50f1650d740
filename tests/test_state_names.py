"""
Unique names and cancellation in the state stores (memory and real Redis):
the contract the client, the HTTP API and the mediator rely on.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from quebert.errors import StateError, TaskAlreadyExists
from quebert.state import MemoryStateManager, RedisStateManager, ResilientStateManager
from quebert.state.interface import (
    CANCELED,
    FAILED,
    QUEUED,
    RUNNING,
    SCHEDULED,
    SUCCEEDED,
)
from tests._redis import isolated_redis
from tests.test_state import T0, info


class NamesAndCancelContract:
    """A subclass provides ``manager`` and ``name_expired(name)``."""

    manager: Any

    async def pass_tombstone(self, name: str) -> None:
        """Make the tombstone period of ``name`` pass."""
        raise NotImplementedError

    # -- unique names ---------------------------------------------------------

    async def test_claim_creates_the_record(self) -> None:
        """claim() records the task queued, like enqueued()."""
        self.assertIsNone(await self.manager.claim("a", QUEUED, info(name="n1"), T0))
        record = await self.manager.get("a")
        self.assertEqual((record["state"], record["name"]), (QUEUED, "n1"))

    async def test_live_name_is_refused(self) -> None:
        """A second task with a name that is live fails with TaskAlreadyExists naming the holder."""
        await self.manager.claim("a", QUEUED, info(name="n1"), T0)
        with self.assertRaises(TaskAlreadyExists) as caught:
            await self.manager.claim("b", QUEUED, info(name="n1"), T0 + 1)
        self.assertEqual((caught.exception.name, caught.exception.task_id), ("n1", "a"))
        self.assertIsNone(await self.manager.get("b"))

    async def test_same_task_may_claim_again(self) -> None:
        """A producer retrying its own publish is not refused its own name."""
        await self.manager.claim("a", QUEUED, info(name="n1"), T0)
        self.assertIsNone(await self.manager.claim("a", QUEUED, info(name="n1"), T0 + 1))

    async def test_racing_claims_one_wins(self) -> None:
        """Many producers claiming one name at once: exactly one wins."""
        results = await gatherResults([
            self.manager.claim(f"t{n}", QUEUED, info(name="race"), T0).addCallbacks(
                lambda _: "won", lambda f: f.trap(TaskAlreadyExists) and "lost")
            for n in range(20)
        ])
        self.assertEqual(sorted(results).count("won"), 1)

    async def test_finished_name_is_held_for_the_tombstone(self) -> None:
        """A finished task keeps its name for the tombstone period, then frees it."""
        await self.manager.claim("a", QUEUED, info(name="n1"), T0)
        await self.manager.started("a", 1, "w", info(name="n1"), T0 + 1)
        await self.manager.finished("a", SUCCEEDED, 1, info(name="n1"), T0 + 2)
        with self.assertRaises(TaskAlreadyExists):
            await self.manager.claim("b", QUEUED, info(name="n1"), T0 + 3)
        await self.pass_tombstone("n1")
        self.assertIsNone(await self.manager.claim("b", QUEUED, info(name="n1"), T0 + 4))

    async def test_retrying_task_keeps_its_name_live(self) -> None:
        """A scheduled retry is not finished: its name stays held with no expiry."""
        await self.manager.claim("a", QUEUED, info(name="n1"), T0)
        await self.manager.finished("a", SCHEDULED, 1, info(name="n1"), T0 + 2,
                                    retry_at=T0 + 100)
        await self.pass_tombstone("n1")
        with self.assertRaises(TaskAlreadyExists):
            await self.manager.claim("b", QUEUED, info(name="n1"), T0 + 3)

    async def test_released_name_is_free(self) -> None:
        """release_name frees a name only for the task that holds it."""
        await self.manager.claim("a", QUEUED, info(name="n1"), T0)
        await self.manager.release_name("b", "n1", T0)
        with self.assertRaises(TaskAlreadyExists):
            await self.manager.claim("b", QUEUED, info(name="n1"), T0 + 1)
        await self.manager.release_name("a", "n1", T0)
        self.assertIsNone(await self.manager.claim("b", QUEUED, info(name="n1"), T0 + 1))

    # -- cancel ---------------------------------------------------------------

    async def test_cancel_unknown_task(self) -> None:
        """cancel() of a task without a record fires with None and writes nothing."""
        self.assertIsNone(await self.manager.cancel("ghost", T0))
        self.assertIsNone(await self.manager.get("ghost"))

    async def test_cancel_queued_task(self) -> None:
        """A queued task becomes canceled at once, with the reason, and is listed so."""
        await self.manager.enqueued("a", QUEUED, info(), T0)
        self.assertEqual(await self.manager.cancel("a", T0 + 1, "by the API"), QUEUED)
        record = await self.manager.get("a")
        self.assertEqual((record["state"], record["reason"], record["finished_at"]),
                         (CANCELED, "by the API", T0 + 1))
        self.assertEqual([r["id"] for r in await self.manager.list(state=CANCELED)], ["a"])
        self.assertEqual(await self.manager.list(state=QUEUED), [])

    async def test_canceled_task_never_starts(self) -> None:
        """started() of a canceled task fires with 'canceled' and changes nothing."""
        await self.manager.enqueued("a", QUEUED, info(), T0)
        await self.manager.cancel("a", T0 + 1)
        self.assertEqual(await self.manager.started("a", 1, "w", info(), T0 + 2), CANCELED)
        record = await self.manager.get("a")
        self.assertEqual((record["state"], record["attempts"]), (CANCELED, 0))

    async def test_cancel_scheduled_task(self) -> None:
        """A task waiting for its retry is canceled; its next attempt never starts."""
        await self.manager.started("a", 1, "w", info(), T0)
        await self.manager.finished("a", SCHEDULED, 1, info(), T0 + 1, retry_at=T0 + 60)
        self.assertEqual(await self.manager.cancel("a", T0 + 2), SCHEDULED)
        self.assertEqual(await self.manager.started("a", 2, "w", info(), T0 + 60), CANCELED)
        self.assertEqual((await self.manager.get("a"))["state"], CANCELED)

    async def test_cancel_running_task_marks_it(self) -> None:
        """A running task stays running, marked; its retry outcome becomes canceled."""
        await self.manager.started("a", 1, "w", info(), T0)
        self.assertEqual(await self.manager.cancel("a", T0 + 1), RUNNING)
        record = await self.manager.get("a")
        self.assertEqual((record["state"], record["cancel_requested"]), (RUNNING, T0 + 1))
        await self.manager.finished("a", SCHEDULED, 1, info(), T0 + 2, retry_at=T0 + 60)
        record = await self.manager.get("a")
        self.assertEqual(record["state"], CANCELED)
        self.assertIn("canceled", record["reason"])
        self.assertEqual(record["history"][-1]["state"], CANCELED)

    async def test_running_task_marked_then_redelivered_ends_canceled(self) -> None:
        """The worker died after the cancel was asked: the redelivery ends it canceled."""
        await self.manager.started("a", 1, "w", info(), T0)
        await self.manager.cancel("a", T0 + 1)
        self.assertEqual(await self.manager.started("a", 2, "w2", info(), T0 + 5), CANCELED)
        record = await self.manager.get("a")
        self.assertEqual((record["state"], record["attempts"]), (CANCELED, 1))
        self.assertEqual(await self.manager.list(state=RUNNING), [])

    async def test_running_task_that_succeeds_anyway_is_succeeded(self) -> None:
        """A cancel that comes too late does not rewrite a real success."""
        await self.manager.started("a", 1, "w", info(), T0)
        await self.manager.cancel("a", T0 + 1)
        await self.manager.finished("a", SUCCEEDED, 1, info(), T0 + 2, result=3)
        record = await self.manager.get("a")
        self.assertEqual((record["state"], record["result"]), (SUCCEEDED, 3))

    async def test_cancel_finished_task_changes_nothing(self) -> None:
        """cancel() of a finished task fires with its state and leaves it alone."""
        await self.manager.started("a", 1, "w", info(), T0)
        await self.manager.finished("a", FAILED, 1, info(), T0 + 1, reason="boom")
        self.assertEqual(await self.manager.cancel("a", T0 + 2), FAILED)
        record = await self.manager.get("a")
        self.assertEqual((record["state"], record["reason"]), (FAILED, "boom"))

    async def test_canceled_name_gets_a_tombstone(self) -> None:
        """Canceling a named task starts its name's tombstone period."""
        await self.manager.claim("a", QUEUED, info(name="n1"), T0)
        await self.manager.cancel("a", T0 + 1)
        with self.assertRaises(TaskAlreadyExists):
            await self.manager.claim("b", QUEUED, info(name="n1"), T0 + 2)
        await self.pass_tombstone("n1")
        self.assertIsNone(await self.manager.claim("b", QUEUED, info(name="n1"), T0 + 3))


class MemorySetup:
    def setUp(self) -> None:
        self.clock = Clock()
        self.manager = MemoryStateManager(clock=self.clock, name_tombstone=60)

    async def pass_tombstone(self, name: str) -> None:
        self.clock.advance(61)


class RedisSetup:
    async def setUp(self) -> None:
        self.redis, self.prefix = await isolated_redis(self)
        self.manager = RedisStateManager(self.redis, prefix=self.prefix, name_tombstone=60)

    async def pass_tombstone(self, name: str) -> None:
        key = f"{self.prefix}name:{name}"
        ttl = await self.redis.execute_command("PTTL", key)
        if ttl > 0:
            self.assertLessEqual(ttl, 60000)
            await self.redis.delete(key)  # what the expiry does, without waiting a minute


class ResilientSetup(RedisSetup):
    """Through ResilientStateManager, as the worker and the API use the store."""

    async def setUp(self) -> None:
        await super().setUp()
        self.manager = ResilientStateManager(self.manager)
        self.addCleanup(self.manager.stop)


class MemoryNamesTests(MemorySetup, NamesAndCancelContract, TestCase):
    pass


class RedisNamesTests(RedisSetup, NamesAndCancelContract, TestCase):
    pass


class ResilientNamesTests(ResilientSetup, NamesAndCancelContract, TestCase):

    async def test_unreachable_store_is_a_state_error(self) -> None:
        """Claims and cancels are answered, never queued: an outage is a StateError."""
        class Down:
            def claim(self, *a: Any) -> Any:
                raise ConnectionError("down")

            cancel = release_name = claim
        manager = ResilientStateManager(Down())
        self.addCleanup(manager.stop)
        for call in (manager.claim("a", QUEUED, info(name="n"), T0),
                     manager.cancel("a", T0)):
            with self.assertRaises(StateError):
                await call


class RequeueAndPauseContract:
    manager: Any

    async def test_requeue_failed_task(self) -> None:
        """A failed task becomes queued again, attempts and history kept."""
        await self.manager.claim("a", QUEUED, info(name="n1"), T0)
        await self.manager.started("a", 1, "w", info(name="n1"), T0 + 1)
        await self.manager.finished("a", FAILED, 1, info(name="n1"), T0 + 2, reason="boom",
                                    error={"type": "E", "message": "m", "traceback": None})
        self.assertEqual(await self.manager.requeued("a", T0 + 3), FAILED)
        record = await self.manager.get("a")
        self.assertEqual((record["state"], record["attempts"], record["reason"],
                          record["finished_at"], len(record["history"])),
                         (QUEUED, 1, None, None, 1))
        self.assertEqual([r["id"] for r in await self.manager.list(state=QUEUED)], ["a"])
        self.assertEqual(await self.manager.list(state=FAILED), [])
        # its name is live again
        await self.pass_tombstone("n1")
        with self.assertRaises(TaskAlreadyExists):
            await self.manager.claim("b", QUEUED, info(name="n1"), T0 + 4)
        # and the next attempt starts normally
        self.assertIsNone(await self.manager.started("a", 2, "w", info(name="n1"), T0 + 5))

    async def test_requeue_other_states_changes_nothing(self) -> None:
        self.assertIsNone(await self.manager.requeued("ghost", T0))
        await self.manager.enqueued("a", QUEUED, info(), T0)
        self.assertEqual(await self.manager.requeued("a", T0 + 1), QUEUED)
        await self.manager.finished("a", SUCCEEDED, 1, info(), T0 + 2)
        self.assertEqual(await self.manager.requeued("a", T0 + 3), SUCCEEDED)
        self.assertEqual((await self.manager.get("a"))["state"], SUCCEEDED)

    async def test_worker_beats(self) -> None:
        """A worker is alive while its beat lasts; a beat of 0 says it stopped."""
        self.assertFalse(await self.manager.worker_alive("host:1"))
        await self.manager.worker_beat("host:1", 30)
        left = await self.manager.worker_alive("host:1")
        self.assertTrue(29 < left <= 30, left)
        self.assertFalse(await self.manager.worker_alive("host:2"))
        await self.manager.worker_beat("host:1", 0)
        self.assertFalse(await self.manager.worker_alive("host:1"))

    async def test_paused_queues_are_remembered(self) -> None:
        self.assertEqual(await self.manager.paused_queues(), set())
        await self.manager.set_paused("mail", True)
        await self.manager.set_paused("sms", True)
        await self.manager.set_paused("sms", False)
        self.assertEqual(await self.manager.paused_queues(), {"mail"})


class MemoryRequeueTests(MemorySetup, RequeueAndPauseContract, TestCase):
    pass


class RedisRequeueTests(RedisSetup, RequeueAndPauseContract, TestCase):
    pass


class ResilientRequeueTests(ResilientSetup, RequeueAndPauseContract, TestCase):
    pass
