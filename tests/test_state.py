# -*- test-case-name: tests.test_state -*-
"""
Tests for the state stores: one contract, run against the memory store and
against the Redis store on a real server, plus tests of what only one of
them has (Redis scripts, connection, expiry bookkeeping).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import txredisapi
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from quebert.errors import ConfigurationError, StateError
from quebert.state import (
    CANCELED,
    DUPLICATE,
    FAILED,
    HISTORY_LIMIT,
    QUEUED,
    RUNNING,
    SCHEDULED,
    SUCCEEDED,
    IStateManager,
    MemoryStateManager,
    RedisStateManager,
    _records,
    connect_redis,
)
from quebert.state.redis import PRUNE_BATCH, SETTLE_LINGER, parse_redis_url
from tests._redis import REDIS_URL, isolated_redis

#: A realistic epoch with microseconds, to check that nothing rounds it.
T0 = 1767225590.123456

ERROR = {"type": "builtins.ValueError", "message": "bad input", "traceback": "Traceback...\n"}


def info(queue: Optional[str] = "default", **extra: Any) -> Dict[str, Any]:
    """Task metadata as producers and workers pass it."""
    base = {
        "queue": queue,
        "kind": "call",
        "task": "app.tasks.add",
        "name": None,
        "eta": None,
        "created_at": T0,
    }
    base.update(extra)
    return base


def ids(records: List[Dict[str, Any]]) -> List[str]:
    return [record["id"] for record in records]


class Unprintable:
    """A result that is not JSON and whose repr is long."""

    def __repr__(self) -> str:
        return "u" * 5000


class StateContractMixin:
    """
    The :class:`IStateManager` contract.  A subclass provides the store
    (``make_manager``) and four hooks about expiry and raw indexes.
    """

    manager: Any

    def make_manager(self, finished_ttl: float = 86400) -> Any:
        raise NotImplementedError

    async def assert_expire(self, manager: Any, task_ids: List[str], ttl: float) -> None:
        """Check the finished records ``task_ids`` go away after ``ttl`` seconds."""
        raise NotImplementedError

    async def assert_kept(self, manager: Any, task_id: str) -> None:
        """Check the record ``task_id`` is not going to expire."""
        raise NotImplementedError

    async def forget(self, manager: Any, task_id: str, ttl: float) -> None:
        """Make the store lose ``task_id`` as its expiry would."""
        raise NotImplementedError

    async def index_ids(self, manager: Any, index: str) -> List[str]:
        """Ids in a raw index: ``state:<state>``, a record's only index."""
        raise NotImplementedError

    async def run_task(
        self, task_id: str, queue: str = "default", at: float = T0, outcome: str = SUCCEEDED
    ) -> None:
        """Enqueue, start and finish ``task_id`` at ``at``, ``at+1``, ``at+2``."""
        await self.manager.enqueued(task_id, QUEUED, info(queue), at)
        await self.manager.started(task_id, 1, "host:1", info(queue), at + 1)
        await self.manager.finished(task_id, outcome, 1, info(queue), at + 2)

    # -- basics -------------------------------------------------------------

    def test_provides_interface(self) -> None:
        """The store provides IStateManager and says how long finished records live."""
        self.assertTrue(verifyObject(IStateManager, self.manager))
        self.assertEqual(self.manager.finished_ttl, 86400)

    async def test_unknown_task_is_none(self) -> None:
        """get() of a task never written fires with None."""
        self.assertIsNone(await self.manager.get("nope"))

    async def test_writers_fire_with_none(self) -> None:
        """Every writer fires with None once the write is stored."""
        self.assertIsNone(await self.manager.enqueued("a", QUEUED, info(), T0))
        self.assertIsNone(await self.manager.started("a", 1, "w", info(), T0 + 1))
        self.assertIsNone(await self.manager.finished("a", SUCCEEDED, 1, info(), T0 + 2))

    # -- enqueued -------------------------------------------------------------

    async def test_enqueued_creates_queued_record(self) -> None:
        """enqueued creates the whole record from the task metadata."""
        await self.manager.enqueued("a", QUEUED, info("mail", name="dedup-1"), T0 + 5)
        self.assertEqual(
            await self.manager.get("a"),
            {
                "id": "a",
                "state": QUEUED,
                "queue": "mail",
                "kind": "call",
                "task": "app.tasks.add",
                "name": "dedup-1",
                "attempts": 0,
                "created_at": T0,
                "updated_at": T0 + 5,
                "eta": None,
                "started_at": None,
                "finished_at": None,
                "worker": None,
                "result": None,
                "error": None,
                "reason": None,
                "history": [],
                "cancel_requested": None,
            },
        )

    async def test_enqueued_scheduled_keeps_eta(self) -> None:
        """A task published with an ETA is recorded scheduled, with that ETA."""
        await self.manager.enqueued("a", SCHEDULED, info(eta=T0 + 3600), T0)
        record = await self.manager.get("a")
        self.assertEqual((record["state"], record["eta"]), (SCHEDULED, T0 + 3600))

    async def test_enqueued_without_created_at_uses_write_time(self) -> None:
        """Without created_at in info, the record is created at the write time."""
        await self.manager.enqueued("a", QUEUED, {"queue": "q"}, T0 + 7)
        self.assertEqual((await self.manager.get("a"))["created_at"], T0 + 7)

    async def test_enqueued_does_not_modify_existing_record(self) -> None:
        """A second or late enqueued leaves the record exactly as it was."""
        await self.manager.enqueued("a", QUEUED, info("q1"), T0)
        await self.manager.enqueued("a", SCHEDULED, info("q2", eta=T0 + 9), T0 + 1)
        record = await self.manager.get("a")
        self.assertEqual((record["state"], record["queue"], record["eta"]), (QUEUED, "q1", None))

        await self.manager.started("b", 1, "w", info(), T0 + 2)
        before = await self.manager.get("b")
        await self.manager.enqueued("b", QUEUED, info("other"), T0 + 3)
        self.assertEqual(await self.manager.get("b"), before)
        self.assertEqual(ids(await self.manager.list(state=QUEUED)), ["a"])

    async def test_writers_reject_malformed_calls(self) -> None:
        """States a writer may not record, and bad attempts, fail with ValueError."""
        with self.assertRaises(ValueError):
            await self.manager.enqueued("a", RUNNING, info(), T0)
        with self.assertRaises(ValueError):
            await self.manager.started("a", 0, "w", info(), T0)
        with self.assertRaises(ValueError):
            await self.manager.finished("a", RUNNING, 1, info(), T0)
        with self.assertRaises(TypeError):
            await self.manager.finished("a", FAILED, 1, info(), T0, error="boom")
        with self.assertRaises(ValueError):
            await self.manager.list(state="lost")
        self.assertIsNone(await self.manager.get("a"))

    # -- started / finished ---------------------------------------------------

    async def test_started_records_running_attempt(self) -> None:
        """started: running, attempts, worker, start time and a history entry."""
        await self.manager.enqueued("a", QUEUED, info(), T0)
        await self.manager.started("a", 1, "host:42", info(), T0 + 1)
        record = await self.manager.get("a")
        self.assertEqual(
            {k: record[k] for k in ("state", "attempts", "worker", "started_at", "updated_at")},
            {
                "state": RUNNING,
                "attempts": 1,
                "worker": "host:42",
                "started_at": T0 + 1,
                "updated_at": T0 + 1,
            },
        )
        self.assertEqual(
            record["history"],
            [
                {
                    "attempt": 1,
                    "state": RUNNING,
                    "worker": "host:42",
                    "started_at": T0 + 1,
                    "finished_at": None,
                    "error": None,
                    "retry_at": None,
                }
            ],
        )

    async def test_started_creates_missing_record(self) -> None:
        """A task nobody enqueued (foreign producer) gets its record on start."""
        await self.manager.started("a", 1, "w", info("q", created_at=None), T0 + 3)
        record = await self.manager.get("a")
        self.assertEqual(
            (record["state"], record["queue"], record["created_at"]), (RUNNING, "q", T0 + 3)
        )

    async def test_succeeded_stores_result_and_finish_time(self) -> None:
        """finished(succeeded): result, finished_at and the history outcome."""
        await self.manager.started("a", 1, "w", info(), T0)
        await self.manager.finished("a", SUCCEEDED, 1, info(), T0 + 2, result={"sum": 3})
        record = await self.manager.get("a")
        self.assertEqual(
            (record["state"], record["result"], record["finished_at"], record["attempts"]),
            (SUCCEEDED, {"sum": 3}, T0 + 2, 1),
        )
        self.assertEqual(
            record["history"][0],
            {
                "attempt": 1,
                "state": SUCCEEDED,
                "worker": "w",
                "started_at": T0,
                "finished_at": T0 + 2,
                "error": None,
                "retry_at": None,
            },
        )

    async def test_scheduled_retry_stores_error_and_eta(self) -> None:
        """finished(scheduled): error, eta = retry_at, not finished."""
        await self.manager.started("a", 1, "w", info(), T0)
        await self.manager.finished(
            "a", SCHEDULED, 1, info(), T0 + 1, error=ERROR, retry_at=T0 + 11.5
        )
        record = await self.manager.get("a")
        self.assertEqual(
            (record["state"], record["eta"], record["finished_at"], record["error"]),
            (SCHEDULED, T0 + 11.5, None, ERROR),
        )
        self.assertEqual(record["history"][0]["retry_at"], T0 + 11.5)
        self.assertEqual(record["history"][0]["error"], ERROR)
        self.assertEqual(ids(await self.manager.list(state=SCHEDULED)), ["a"])

    async def test_first_attempt_history_survives_later_writes(self) -> None:
        """
        The history entry of a task's only attempt is kept as it was written
        when a later write changes the fields it resembles: a cancel of the
        scheduled retry, a requeue of the failure, a failure's retry time,
        a new attempt (the stores spare that entry while the record says the
        same; these writes must write it out first).
        """
        scheduled = {"attempt": 1, "state": SCHEDULED, "worker": "w", "started_at": T0,
                     "finished_at": T0 + 1, "error": ERROR, "retry_at": T0 + 30}
        await self.manager.started("sched", 1, "w", info(), T0)
        await self.manager.finished("sched", SCHEDULED, 1, info(), T0 + 1, error=ERROR,
                                    retry_at=T0 + 30)
        self.assertEqual(await self.manager.cancel("sched", T0 + 2, "operator"), SCHEDULED)
        record = await self.manager.get("sched")
        self.assertEqual((record["state"], record["finished_at"], record["reason"]),
                         (CANCELED, T0 + 2, "operator"))
        self.assertEqual(record["history"], [scheduled])

        await self.manager.started("failed", 1, "w", info(), T0)
        await self.manager.finished("failed", FAILED, 1, info(), T0 + 1, error=ERROR,
                                    retry_at=T0 + 30)
        failed = await self.manager.get("failed")
        self.assertEqual(failed["history"][0]["retry_at"], T0 + 30)
        self.assertEqual(await self.manager.requeued("failed", T0 + 5), FAILED)
        record = await self.manager.get("failed")
        self.assertEqual(record["state"], QUEUED)
        self.assertEqual(record["history"], failed["history"])

        await self.manager.started("again", 1, "w1", info(), T0)
        await self.manager.finished("again", SUCCEEDED, 1, info(), T0 + 1)
        done = (await self.manager.get("again"))["history"]
        await self.manager.started("again", 2, "w2", info(), T0 + 2)
        record = await self.manager.get("again")
        self.assertEqual(record["history"][0], done[0])
        self.assertEqual([(e["attempt"], e["state"]) for e in record["history"]],
                         [(1, SUCCEEDED), (2, RUNNING)])

    async def test_next_attempt_clears_previous_outcome(self) -> None:
        """A new attempt clears result/error/reason; the history keeps them."""
        await self.manager.started("a", 1, "w1", info(), T0)
        await self.manager.finished("a", SCHEDULED, 1, info(), T0 + 1, error=ERROR, retry_at=T0 + 5)
        await self.manager.started("a", 2, "w2", info(), T0 + 5)
        record = await self.manager.get("a")
        self.assertEqual(
            (record["state"], record["attempts"], record["worker"], record["error"]),
            (RUNNING, 2, "w2", None),
        )
        self.assertEqual([e["attempt"] for e in record["history"]], [1, 2])
        self.assertEqual(record["history"][0]["error"], ERROR)
        self.assertEqual(record["history"][1]["worker"], "w2")

    async def test_failed_and_canceled_store_reason(self) -> None:
        """Terminal failures keep the reason sentence and the error."""
        await self.manager.started("a", 3, "w", info(), T0)
        await self.manager.finished(
            "a", FAILED, 3, info(), T0 + 1, error=ERROR, reason="attempts spent"
        )
        await self.manager.finished("b", CANCELED, 0, info(), T0 + 2, reason="skipped")
        a, b = await self.manager.get("a"), await self.manager.get("b")
        self.assertEqual(
            (a["state"], a["reason"], a["error"], a["finished_at"]),
            (FAILED, "attempts spent", ERROR, T0 + 1),
        )
        self.assertEqual((b["state"], b["reason"], b["attempts"]), (CANCELED, "skipped", 0))

    async def test_finished_without_start_adds_history_entry(self) -> None:
        """An attempt refused before it ran still gets a history entry."""
        await self.manager.finished("a", FAILED, 2, info(), T0, error=ERROR, reason="refused")
        record = await self.manager.get("a")
        self.assertEqual(record["attempts"], 2)
        self.assertEqual(
            record["history"],
            [
                {
                    "attempt": 2,
                    "state": FAILED,
                    "worker": None,
                    "started_at": None,
                    "finished_at": T0,
                    "error": ERROR,
                    "retry_at": None,
                }
            ],
        )

    async def test_finished_keeps_highest_attempt_count(self) -> None:
        """attempts becomes max(attempts, attempt): a late outcome never lowers it."""
        await self.manager.started("a", 3, "w", info(), T0)
        await self.manager.finished("a", SCHEDULED, 1, info(), T0 + 1, retry_at=T0 + 2)
        record = await self.manager.get("a")
        self.assertEqual(record["attempts"], 3)
        self.assertEqual([e["attempt"] for e in record["history"]], [1, 3])

    async def test_late_started_never_rewinds_a_settled_attempt(self) -> None:
        # A 'started' replayed after its attempt's outcome (or a later
        # attempt) was recorded is ignored: the record stays settled.
        await self.manager.started("a", 1, "w", info(), T0)
        await self.manager.finished("a", SUCCEEDED, 1, info(), T0 + 1, result=7)
        self.assertEqual(await self.manager.started("a", 1, "w", info(), T0 + 2), DUPLICATE)
        record = await self.manager.get("a")
        self.assertEqual((record["state"], record["attempts"], record["result"]),
                         (SUCCEEDED, 1, 7))
        await self.manager.started("b", 2, "w", info(), T0)
        await self.manager.started("b", 1, "w", info(), T0 + 1)
        record = await self.manager.get("b")
        self.assertEqual((record["attempts"], record["started_at"]), (2, T0))
        self.assertEqual([h["attempt"] for h in record["history"]], [2])

    async def test_history_keeps_latest_attempts_oldest_first(self) -> None:
        """The history is capped at HISTORY_LIMIT entries, the newest kept."""
        for attempt in range(1, HISTORY_LIMIT + 6):
            at = T0 + attempt * 10
            await self.manager.started("a", attempt, "w", info(), at)
            await self.manager.finished(
                "a", SCHEDULED, attempt, info(), at + 1, error=ERROR, retry_at=at + 5
            )
        record = await self.manager.get("a")
        self.assertEqual(record["attempts"], HISTORY_LIMIT + 5)
        self.assertEqual(
            [e["attempt"] for e in record["history"]], list(range(6, HISTORY_LIMIT + 6))
        )
        self.assertTrue(all(e["state"] == SCHEDULED for e in record["history"]))

    async def test_second_start_of_a_running_attempt_is_a_duplicate(self) -> None:
        """
        A second copy of the task starting the attempt that already runs
        (on another worker) is told so and changes nothing: running it
        would fork the task.
        """
        self.assertIsNone(await self.manager.started("a", 1, "w1", info(), T0))
        self.assertEqual(await self.manager.started("a", 1, "w2", info(), T0 + 1), DUPLICATE)
        record = await self.manager.get("a")
        self.assertEqual((record["state"], record["attempts"], record["worker"],
                          record["started_at"]), (RUNNING, 1, "w1", T0))
        self.assertEqual([(e["attempt"], e["worker"]) for e in record["history"]], [(1, "w1")])

    async def test_start_of_an_attempt_already_settled_or_passed_is_a_duplicate(self) -> None:
        await self.manager.started("a", 1, "w", info(), T0)
        await self.manager.finished("a", SCHEDULED, 1, info(), T0 + 1, error=ERROR,
                                    retry_at=T0 + 2)
        self.assertEqual(await self.manager.started("a", 1, "w", info(), T0 + 3), DUPLICATE)
        self.assertIsNone(await self.manager.started("a", 2, "w", info(), T0 + 4))
        self.assertEqual(await self.manager.started("a", 1, "w", info(), T0 + 5), DUPLICATE)
        record = await self.manager.get("a")
        self.assertEqual((record["state"], record["attempts"], record["started_at"]),
                         (RUNNING, 2, T0 + 4))

    async def test_info_updates_task_fields_but_not_creation_or_eta(self) -> None:
        """Later writes fill in queue/kind/task/name, never created_at or eta."""
        await self.manager.enqueued("a", SCHEDULED, {"queue": "q", "eta": T0 + 9}, T0)
        await self.manager.started(
            "a", 1, "w", info("q", name="n", eta=T0 + 99, created_at=T0 - 50), T0 + 10
        )
        record = await self.manager.get("a")
        self.assertEqual(
            (record["task"], record["name"], record["eta"], record["created_at"]),
            ("app.tasks.add", "n", T0 + 9, T0),
        )

    async def test_error_is_normalised(self) -> None:
        """Errors keep type/message/traceback (None when missing), extras as text."""
        long_tb = "x" * 30000 + "END"
        await self.manager.finished(
            "a",
            FAILED,
            1,
            info(),
            T0,
            error={"type": "E", "message": "m", "field": "args", "traceback": long_tb},
        )
        await self.manager.finished("b", FAILED, 1, info(), T0, error={"message": 42})
        a, b = await self.manager.get("a"), await self.manager.get("b")
        self.assertEqual(a["error"]["field"], "args")
        self.assertEqual(len(a["error"]["traceback"]), _records.TRACEBACK_LIMIT)
        self.assertTrue(a["error"]["traceback"].endswith("END"))
        self.assertEqual(b["error"], {"type": None, "message": "42", "traceback": None})
        self.assertEqual(b["history"][0]["error"], b["error"])

    # -- results --------------------------------------------------------------

    async def test_json_results_round_trip(self) -> None:
        """JSON results come back as JSON values (tuples as lists), exactly."""
        result = {
            "n": 2**53 + 1,
            "f": 0.1,
            "t": (1, "two"),
            "u": "héllo ☃",
            "nested": [{"a": None, "b": True}],
            "s": "123",
        }
        await self.manager.finished("a", SUCCEEDED, 1, info(), T0, result=result)
        self.assertEqual(
            (await self.manager.get("a"))["result"],
            {
                "n": 2**53 + 1,
                "f": 0.1,
                "t": [1, "two"],
                "u": "héllo ☃",
                "nested": [{"a": None, "b": True}],
                "s": "123",
            },
        )

    async def test_scalar_results_round_trip(self) -> None:
        """Scalar results (numbers, strings that look like numbers) keep their type."""
        for n, result in enumerate([0, 1.5, "42", "", False, [], {}]):
            await self.manager.finished(f"t{n}", SUCCEEDED, 1, info(), T0, result=result)
            self.assertEqual((await self.manager.get(f"t{n}"))["result"], result)

    async def test_non_json_results_stored_as_repr(self) -> None:
        """Results JSON cannot hold are stored as {"repr": repr(value)[:1000]}."""
        cases = {
            "nan": float("nan"),
            "obj": Unprintable(),
            "set": {1},
            "keys": {(1, 2): "tuple key"},
        }
        for task_id, result in cases.items():
            await self.manager.finished(task_id, SUCCEEDED, 1, info(), T0, result=result)
        self.assertEqual((await self.manager.get("nan"))["result"], {"repr": "nan"})
        self.assertEqual((await self.manager.get("obj"))["result"], {"repr": "u" * 1000})
        self.assertEqual((await self.manager.get("set"))["result"], {"repr": "{1}"})
        self.assertEqual(
            (await self.manager.get("keys"))["result"], {"repr": "{(1, 2): 'tuple key'}"}
        )

    async def test_timestamps_and_strings_keep_exact_values(self) -> None:
        """Timestamps keep microseconds; strings that look like numbers stay strings."""
        at, task_info = 1767225590.987654, info("007", name="1.50", task="1e3")
        await self.manager.started("a", 1, "0042", task_info, at)
        await self.manager.finished("a", SCHEDULED, 1, task_info, at + 0.000001, retry_at=at + 1)
        record = await self.manager.get("a")
        self.assertEqual(
            (record["queue"], record["name"], record["task"], record["worker"]),
            ("007", "1.50", "1e3", "0042"),
        )
        self.assertEqual(record["started_at"], at)
        self.assertEqual(record["updated_at"], at + 0.000001)
        self.assertEqual(record["history"][0]["finished_at"], at + 0.000001)
        self.assertEqual(record["history"][0]["retry_at"], at + 1)
        self.assertIsInstance(record["attempts"], int)
        self.assertIsInstance(record["created_at"], float)

    async def test_unicode_task_ids_and_queues(self) -> None:
        """Ids and queue names may hold any text."""
        await self.manager.enqueued("tâche:1/☃ x", QUEUED, info("file d'attente"), T0)
        self.assertEqual(ids(await self.manager.list(queue="file d'attente")), ["tâche:1/☃ x"])
        self.assertEqual((await self.manager.get("tâche:1/☃ x"))["queue"], "file d'attente")

    async def test_returned_records_are_copies(self) -> None:
        """Changing a returned record changes nothing in the store."""
        await self.manager.finished("a", SUCCEEDED, 1, info(), T0, result={"x": [1]})
        record = await self.manager.get("a")
        record["state"] = FAILED
        record["result"]["x"].append(2)
        record["history"].clear()
        listed = (await self.manager.list())[0]
        listed["history"].append({})
        again = await self.manager.get("a")
        self.assertEqual(
            (again["state"], again["result"], len(again["history"])), (SUCCEEDED, {"x": [1]}, 1)
        )

    # -- listing --------------------------------------------------------------

    async def test_list_newest_first(self) -> None:
        """list() orders by updated_at, most recent first, whatever the write order."""
        await self.manager.enqueued("b", QUEUED, info(), T0 + 2)
        await self.manager.enqueued("a", QUEUED, info(), T0 + 1)
        await self.manager.enqueued("c", QUEUED, info(), T0 + 3)
        self.assertEqual(ids(await self.manager.list()), ["c", "b", "a"])
        await self.manager.started("a", 1, "w", info(), T0 + 4)
        self.assertEqual(ids(await self.manager.list()), ["a", "c", "b"])

    async def test_list_pages_with_limit_and_offset(self) -> None:
        """Pages of list() put together give every record once, in order."""
        for n in range(25):
            await self.manager.enqueued(f"t{n:02}", QUEUED, info(), T0 + n)
        expected = [f"t{n:02}" for n in reversed(range(25))]
        pages = [ids(await self.manager.list(limit=10, offset=o)) for o in (0, 10, 20, 30)]
        self.assertEqual([len(p) for p in pages], [10, 10, 5, 0])
        self.assertEqual(sum(pages, []), expected)
        self.assertEqual(await self.manager.list(limit=0), [])

    async def test_list_by_state(self) -> None:
        """list(state=...) returns only records in that state."""
        await self.run_task("done", at=T0)
        await self.manager.started("busy", 1, "w", info(), T0 + 10)
        await self.manager.enqueued("waiting", QUEUED, info(), T0 + 11)
        await self.run_task("broken", at=T0 + 20, outcome=FAILED)
        self.assertEqual(ids(await self.manager.list(state=SUCCEEDED)), ["done"])
        self.assertEqual(ids(await self.manager.list(state=RUNNING)), ["busy"])
        self.assertEqual(ids(await self.manager.list(state=QUEUED)), ["waiting"])
        self.assertEqual(ids(await self.manager.list(state=FAILED)), ["broken"])
        self.assertEqual(await self.manager.list(state=CANCELED), [])

    async def test_list_by_queue(self) -> None:
        """list(queue=...) returns only records of that queue."""
        for n in range(6):
            await self.manager.enqueued(f"t{n}", QUEUED, info(f"q{n % 2}"), T0 + n)
        self.assertEqual(ids(await self.manager.list(queue="q0")), ["t4", "t2", "t0"])
        self.assertEqual(ids(await self.manager.list(queue="q1", limit=2)), ["t5", "t3"])
        self.assertEqual(await self.manager.list(queue="nope"), [])

    async def test_list_by_state_and_queue_pages_correctly(self) -> None:
        """Both filters together page over exactly the matching records."""
        expected = []
        for n in range(40):
            task_id, queue, at = f"t{n:02}", f"q{n % 2}", T0 + n
            if n % 3 == 0:
                await self.manager.started(task_id, 1, "w", info(queue), at)
            else:
                await self.manager.enqueued(task_id, QUEUED, info(queue), at)
                if queue == "q1":
                    expected.insert(0, task_id)
        pages = [
            ids(await self.manager.list(state=QUEUED, queue="q1", limit=4, offset=o))
            for o in range(0, 20, 4)
        ]
        self.assertEqual(sum(pages, []), expected)
        running_q0 = await self.manager.list(state=RUNNING, queue="q0", limit=3)
        self.assertEqual(ids(running_q0), ["t36", "t30", "t24"])

    async def test_transition_moves_record_between_state_lists(self) -> None:
        """A record is listed under its current state only."""
        await self.manager.enqueued("a", QUEUED, info(), T0)
        await self.manager.started("a", 1, "w", info(), T0 + 1)
        self.assertEqual(await self.manager.list(state=QUEUED), [])
        await self.manager.finished("a", SCHEDULED, 1, info(), T0 + 2, retry_at=T0 + 9)
        self.assertEqual(await self.manager.list(state=RUNNING), [])
        self.assertEqual(ids(await self.manager.list(state=SCHEDULED)), ["a"])

    async def test_queue_change_moves_record_between_queue_lists(self) -> None:
        """A task whose queue changes is listed under the new queue only."""
        await self.manager.enqueued("a", QUEUED, info("old"), T0)
        await self.manager.started("a", 1, "w", info("new"), T0 + 1)
        self.assertEqual(await self.manager.list(queue="old"), [])
        self.assertEqual(ids(await self.manager.list(queue="new")), ["a"])

    # -- expiry ---------------------------------------------------------------

    async def test_finished_records_expire_after_ttl(self) -> None:
        """Succeeded, failed and canceled records expire after finished_ttl."""
        self.manager = self.make_manager(finished_ttl=600)
        for task_id, outcome in (("s", SUCCEEDED), ("f", FAILED), ("c", CANCELED)):
            await self.run_task(task_id, outcome=outcome)
        await self.assert_expire(self.manager, ["s", "f", "c"], 600)

    async def test_unfinished_records_do_not_expire(self) -> None:
        """Queued, running and scheduled records stay, however old."""
        self.manager = self.make_manager(finished_ttl=600)
        await self.manager.enqueued("q", QUEUED, info(), T0)
        await self.manager.started("r", 1, "w", info(), T0)
        await self.manager.finished("s", SCHEDULED, 1, info(), T0, retry_at=T0 + 5)
        for task_id in ("q", "r", "s"):
            await self.assert_kept(self.manager, task_id)

    async def test_restarted_finished_record_no_longer_expires(self) -> None:
        """A finished task that starts again (redelivery) loses its expiry."""
        self.manager = self.make_manager(finished_ttl=600)
        await self.run_task("a")
        await self.manager.started("a", 2, "w", info(), T0 + 10)
        await self.assert_kept(self.manager, "a")

    async def test_zero_ttl_keeps_finished_records(self) -> None:
        """finished_ttl = 0 keeps finished records forever."""
        self.manager = self.make_manager(finished_ttl=0)
        await self.run_task("a")
        await self.assert_kept(self.manager, "a")

    async def test_expired_records_leave_lists_and_indexes(self) -> None:
        """Records gone by expiry are not listed and are removed from the indexes."""
        self.manager = self.make_manager(finished_ttl=600)
        await self.run_task("old", queue="q", at=T0)
        await self.manager.started("alive", 1, "w", info("q"), T0 + 10)
        await self.forget(self.manager, "old", 600)
        self.assertIsNone(await self.manager.get("old"))
        self.assertEqual(ids(await self.manager.list()), ["alive"])
        self.assertEqual(ids(await self.manager.list(queue="q")), ["alive"])
        self.assertEqual(await self.manager.list(state=SUCCEEDED), [])
        self.assertEqual(await self.index_ids(self.manager, f"state:{SUCCEEDED}"), [])
        self.assertEqual(await self.index_ids(self.manager, f"state:{RUNNING}"), ["alive"])

    # -- atomicity ------------------------------------------------------------

    async def test_concurrent_writes_keep_indexes_consistent(self) -> None:
        """Hundreds of writes fired at once leave every index matching the records."""
        writes = []
        for n in range(100):
            writes.append(self.manager.started(f"t{n:03}", 1, "w", info(f"q{n % 3}"), T0 + n))
        for n in range(0, 100, 2):
            writes.append(
                self.manager.finished(
                    f"t{n:03}", SUCCEEDED, 1, info(f"q{n % 3}"), T0 + 200 + n, result=n
                )
            )
        for attempt in range(1, 31):
            writes.append(self.manager.started("hot", attempt, "w", info(), T0 + 400 + attempt))
        await gatherResults(writes, consumeErrors=True)

        running = ids(await self.manager.list(state=RUNNING, limit=1000))
        done = ids(await self.manager.list(state=SUCCEEDED, limit=1000))
        self.assertEqual(sorted(running), sorted([f"t{n:03}" for n in range(1, 100, 2)] + ["hot"]))
        self.assertEqual(sorted(done), [f"t{n:03}" for n in range(0, 100, 2)])
        self.assertEqual(len(await self.manager.list(limit=1000)), 101)
        for queue in ("q0", "q1", "q2"):
            for record in await self.manager.list(queue=queue, limit=1000):
                self.assertEqual(record["queue"], queue)
        self.assertEqual(len(await self.manager.list(queue="q0", limit=1000)), 34)
        hot = await self.manager.get("hot")
        self.assertEqual(hot["attempts"], 30)
        self.assertEqual([e["attempt"] for e in hot["history"]], list(range(11, 31)))


class MemoryStateTests(StateContractMixin, TestCase):
    """The contract, in memory, on a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.manager = self.make_manager()

    def make_manager(self, finished_ttl: float = 86400) -> MemoryStateManager:
        return MemoryStateManager(finished_ttl=finished_ttl, clock=self.clock)

    async def assert_expire(self, manager: Any, task_ids: List[str], ttl: float) -> None:
        self.clock.advance(ttl - 0.5)
        for task_id in task_ids:
            self.assertIsNotNone(await manager.get(task_id))
        self.clock.advance(0.5)
        for task_id in task_ids:
            self.assertIsNone(await manager.get(task_id))

    async def assert_kept(self, manager: Any, task_id: str) -> None:
        self.clock.advance(10 * (manager.finished_ttl or 86400))
        self.assertIsNotNone(await manager.get(task_id))

    async def forget(self, manager: Any, task_id: str, ttl: float) -> None:
        self.clock.advance(ttl)

    async def index_ids(self, manager: Any, index: str) -> List[str]:
        kind, _, name = index.partition(":")
        self.assertEqual(kind, "state")
        return list(manager._states[name].newest())

    def test_retention_differs_by_outcome(self) -> None:
        """Each outcome expires after its own retention; 0 keeps it forever."""
        manager = MemoryStateManager(clock=self.clock, finished_ttl=600,
                                     retention={"succeeded": 60, "canceled": 0})
        for task_id, outcome in (("s", SUCCEEDED), ("f", FAILED), ("c", CANCELED)):
            self.successResultOf(manager.finished(task_id, outcome, 1, info(), T0))
        self.clock.advance(60)
        self.assertIsNone(self.successResultOf(manager.get("s")))
        self.assertIsNotNone(self.successResultOf(manager.get("f")))
        self.clock.advance(540)
        self.assertIsNone(self.successResultOf(manager.get("f")))
        self.clock.advance(10**7)
        self.assertIsNotNone(self.successResultOf(manager.get("c")))

    def test_finished_records_are_capped_those_expiring_first_dropped_first(self) -> None:
        """max_finished bounds memory whatever the rate: the soonest to expire go first."""
        manager = MemoryStateManager(clock=self.clock, max_finished=3)
        self.successResultOf(manager.finished("f", FAILED, 1, info(), T0))  # kept a week
        for n in range(4):
            self.successResultOf(manager.finished(f"s{n}", SUCCEEDED, 1, info(), T0 + n))
            self.clock.advance(1)
        self.successResultOf(manager.started("r", 1, "w", info(), T0))  # not finished: not counted
        kept = {record["id"] for record in self.successResultOf(manager.list())}
        self.assertEqual(kept, {"f", "s2", "s3", "r"})
        self.assertEqual(manager.evicted, 2)

    def test_max_finished_must_be_a_positive_int(self) -> None:
        for bad in (0, -1, 1.5, "10"):
            self.assertRaises(ConfigurationError, MemoryStateManager, max_finished=bad)

    def test_default_retention_by_outcome(self) -> None:
        """Without finished_ttl: an hour for succeeded records, a week for the others."""
        manager = MemoryStateManager(clock=self.clock)
        self.assertEqual(manager.retention,
                         {"succeeded": 3600.0, "failed": 604800.0, "canceled": 604800.0})
        self.assertEqual(manager.finished_ttl, 604800.0)

    def test_expiry_follows_the_clock_not_write_times(self) -> None:
        """Memory expiry counts from when the record was written, on the clock."""
        manager = self.make_manager(finished_ttl=60)
        self.successResultOf(manager.finished("a", SUCCEEDED, 1, info(), T0 - 10**6))
        self.clock.advance(59)
        self.assertIsNotNone(self.successResultOf(manager.get("a")))
        self.clock.advance(1)
        self.assertIsNone(self.successResultOf(manager.get("a")))

    def test_expired_records_are_purged_without_reads(self) -> None:
        """Expired records are dropped by later writes too, so memory stays bounded."""
        manager = self.make_manager(finished_ttl=60)
        for n in range(50):
            manager.finished(f"t{n}", SUCCEEDED, 1, info(), T0)
        self.clock.advance(61)
        manager.enqueued("new", QUEUED, info(), T0)
        self.assertEqual(list(manager._records), ["new"])
        self.assertEqual([len(index) for index in manager._states.values()], [1, 0, 0, 0, 0, 0])

    def test_results_are_fired_already(self) -> None:
        """Every method returns an already-fired Deferred."""
        manager = self.make_manager()
        for d in (
            manager.enqueued("a", QUEUED, info(), T0),
            manager.started("a", 1, "w", info(), T0),
            manager.finished("a", SUCCEEDED, 1, info(), T0),
            manager.get("a"),
            manager.list(),
        ):
            self.assertTrue(d.called)
            self.successResultOf(d)

    def test_default_clock_is_the_reactor(self) -> None:
        """Without a clock the global reactor's time is used, resolved on first need."""
        from twisted.internet import reactor

        manager = MemoryStateManager(finished_ttl=60)
        self.successResultOf(manager.finished("a", SUCCEEDED, 1, info(), T0))
        self.assertIs(manager._clock, reactor)

    def test_negative_ttl_is_a_configuration_error(self) -> None:
        """A negative finished_ttl is refused when the store is built."""
        self.assertRaises(ConfigurationError, MemoryStateManager, finished_ttl=-1)

    @given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 5) | st.none(),
                              st.booleans()), max_size=60), st.integers(0, 10))
    def test_an_index_orders_ids_as_a_sorted_list_of_scores_would(self, steps, start) -> None:
        """
        Adds, moves and drops in any order, read between any of them: newest
        first, ties by id (Redis's order).
        """
        from quebert.state.memory import _Index

        index, model = _Index(), {}
        for task_id, score, read in steps:
            if score is None:
                index.discard(task_id)
                model.pop(task_id, None)
            else:
                index.add(task_id, float(score))
                model[task_id] = float(score)
            if read:
                self.assertEqual(list(index.newest()), [
                    t for _, t in sorted(((s, t) for t, s in model.items()), reverse=True)])
        expected = [t for _, t in sorted(((s, t) for t, s in model.items()), reverse=True)]
        self.assertEqual(len(index), len(model))
        self.assertEqual(list(index.newest()), expected)
        self.assertEqual(list(index.newest(start)), expected[start:])

    def test_expiring_the_oldest_of_many_records_moves_no_list(self) -> None:
        """
        Expiry drops the oldest ids of every index, at the front: with a
        plain sorted list each drop moved every other id (a day of records
        made each write cost milliseconds); the index is a dict in time
        order, whose drops are O(1).
        """
        manager = self.make_manager(finished_ttl=60)
        for n in range(3000):
            manager.finished(f"t{n}", SUCCEEDED, 1, info(queue="q"), T0 + n)
        self.clock.advance(61)
        manager.enqueued("new", QUEUED, info(queue="q"), T0 + 5000)
        self.assertEqual(list(manager._states[SUCCEEDED].newest()), [])
        self.assertEqual(ids(self.successResultOf(manager.list(queue="q"))), ["new"])


class RedisStateTests(StateContractMixin, TestCase):
    """The contract, on the real Redis (database 9, a key prefix per test)."""

    async def setUp(self) -> None:
        self.redis, self.prefix = await isolated_redis(self)
        self.manager = self.make_manager()

    def make_manager(self, finished_ttl: float = 86400) -> RedisStateManager:
        return RedisStateManager(self.redis, prefix=self.prefix, finished_ttl=finished_ttl)

    def key(self, suffix: str) -> str:
        return self.prefix + suffix

    async def score(self, index: str, member: str) -> float:
        # txredisapi's zscore() wants integers when numbers are not converted
        return float(await self.redis.execute_command("ZSCORE", self.key(index), member))

    async def assert_expire(self, manager: Any, task_ids: List[str], ttl: float) -> None:
        for task_id in task_ids:
            left = await self.redis.execute_command("PTTL", self.key("task:" + task_id))
            self.assertTrue(ttl * 1000 - 10000 < left <= ttl * 1000, (task_id, left))

    async def assert_kept(self, manager: Any, task_id: str) -> None:
        self.assertEqual(await self.redis.execute_command("TTL", self.key("task:" + task_id)), -1)

    async def forget(self, manager: Any, task_id: str, ttl: float) -> None:
        # what EXPIRE does when the time comes
        await self.redis.delete(self.key("task:" + task_id))

    async def index_ids(self, manager: Any, index: str) -> List[str]:
        return await self.redis.zrevrange(self.key("idx:" + index), 0, -1)

    async def test_finished_record_has_redis_ttl(self) -> None:
        """The TTL of a finished record's hash is finished_ttl (TTL command)."""
        self.manager = self.make_manager(finished_ttl=3600)
        await self.run_task("a")
        ttl = await self.redis.execute_command("TTL", self.key("task:a"))
        self.assertTrue(3590 <= ttl <= 3600, ttl)

    async def test_record_layout(self) -> None:
        """A record is a hash of strings in one index: its state's, scored by updated_at."""
        await self.manager.started("a", 1, "w", info("q"), T0)
        fields = await self.redis.hgetall(self.key("task:a"))
        self.assertEqual(fields["attempts"], "1")
        self.assertEqual(float(fields["started_at"]), T0)
        # one attempt: its history entry is what the record's fields say
        self.assertEqual(fields["history"], "{}")
        self.assertEqual(await self.score("idx:state:running", "a"), T0)
        await self.manager.finished("a", SUCCEEDED, 1, info("q"), T0 + 1)
        self.assertEqual(await self.score("idx:state:succeeded", "a"), T0 + 1)
        keys = sorted(await self.redis.keys(self.prefix + "*"))
        self.assertEqual(keys, [self.key("idx:state:succeeded"), self.key("task:a")])

    async def test_a_finished_record_stores_neither_its_id_nor_finished_at(self) -> None:
        """The id is in the key and finished_at is updated_at: reads still give both."""
        await self.manager.started("a", 1, "w", info("q"), T0)
        await self.manager.finished("a", FAILED, 1, info("q"), T0 + 1, error=ERROR)
        fields = await self.redis.hgetall(self.key("task:a"))
        self.assertNotIn("id", fields)
        self.assertNotIn("finished_at", fields)
        for record in (await self.manager.get("a"), (await self.manager.list())[0],
                       (await self.manager.find("app.tasks.add"))[0][0]):
            self.assertEqual((record["id"], record["finished_at"]), ("a", T0 + 1))
            self.assertEqual(record["history"][0]["finished_at"], T0 + 1)

    async def test_retention_differs_by_outcome(self) -> None:
        """Each outcome's hash gets its own expiry; 0 keeps that outcome forever."""
        self.manager = RedisStateManager(self.redis, prefix=self.prefix, finished_ttl=600,
                                         retention={"succeeded": 60, "canceled": 0})
        for task_id, outcome in (("s", SUCCEEDED), ("f", FAILED), ("c", CANCELED)):
            await self.run_task(task_id, outcome=outcome)
        await self.assert_expire(self.manager, ["s"], 60)
        await self.assert_expire(self.manager, ["f"], 600)
        await self.assert_kept(self.manager, "c")

    async def test_pruning_follows_each_outcomes_retention(self) -> None:
        """A later write drops records whose own outcome's retention has passed."""
        self.manager = RedisStateManager(self.redis, prefix=self.prefix, finished_ttl=1000,
                                         retention={"succeeded": 100})
        await self.run_task("s", at=T0)
        await self.run_task("f", at=T0, outcome=FAILED)
        await self.manager.enqueued("later", QUEUED, info(), T0 + 500)
        self.assertIsNone(await self.manager.get("s"))
        self.assertIsNotNone(await self.manager.get("f"))
        self.assertEqual(await self.index_ids(self.manager, "state:succeeded"), [])
        self.assertEqual(await self.index_ids(self.manager, "state:failed"), ["f"])

    async def test_records_of_the_earlier_layout_leave_its_indexes(self) -> None:
        """
        A record written with idx:all, idx:queue and idx:expiry entries (and an
        id field) leaves them when it is next written, or once it has expired.
        """
        for task_id, state in (("old-running", RUNNING), ("old-done", SUCCEEDED)):
            await self.redis.hmset(self.key("task:" + task_id), {
                "id": task_id, "state": state, "attempts": "1", "queue": "q",
                "worker": "w", "started_at": repr(T0), "updated_at": repr(T0),
                "history": "{}"})
            for index in ("idx:all", "idx:queue:q", f"idx:state:{state}"):
                await self.redis.zadd(self.key(index), T0, task_id)
        await self.redis.zadd(self.key("idx:expiry"), T0, '["old-done","q"]')
        self.manager = self.make_manager(finished_ttl=100)
        await self.manager.finished("old-running", SUCCEEDED, 1, info("q"), T0 + 1)
        self.assertNotIn("id", await self.redis.hgetall(self.key("task:old-running")))
        await self.redis.delete(self.key("task:old-done"))
        await self.manager.enqueued("new", QUEUED, info("q"), T0 + 500)
        for index in ("idx:all", "idx:queue:q", "idx:expiry"):
            self.assertEqual(await self.redis.zcard(self.key(index)), 0, index)
        self.assertEqual(ids(await self.manager.list()), ["new"])

    async def test_a_one_attempt_record_stays_compact(self) -> None:
        """A task run once is stored as a listpack hash, with no history text."""
        await self.manager.started("a", 1, "host:1234:abcdef", info("q"), T0)
        await self.manager.finished("a", SUCCEEDED, 1, info("q"), T0 + 1, result={"n": 1})
        key = self.key("task:a")
        fields = await self.redis.hgetall(key)
        self.assertEqual(fields["history"], "{}")
        self.assertEqual(await self.redis.execute_command("OBJECT", "ENCODING", key), "listpack")
        record = await self.manager.get("a")
        self.assertEqual(record["history"], [{
            "attempt": 1, "state": SUCCEEDED, "worker": "host:1234:abcdef", "started_at": T0,
            "finished_at": T0 + 1, "error": None, "retry_at": None}])

    async def test_a_second_attempt_writes_the_first_out(self) -> None:
        """The entry the fields described becomes JSON before they change."""
        await self.manager.started("a", 1, "w1", info("q"), T0)
        await self.manager.finished("a", SCHEDULED, 1, info("q"), T0 + 1, error=ERROR,
                                    retry_at=T0 + 11)
        self.assertEqual(await self.redis.hget(self.key("task:a"), "history"), "{}")
        await self.manager.started("a", 2, "w2", info("q"), T0 + 11)
        history = json.loads(await self.redis.hget(self.key("task:a"), "history"))
        self.assertEqual([(e["attempt"], e["state"], e["worker"]) for e in history],
                         [(1, SCHEDULED, "w1"), (2, RUNNING, "w2")])
        self.assertEqual(history[0]["finished_at"], T0 + 1)
        self.assertEqual(history[0]["retry_at"], T0 + 11)
        self.assertEqual(history[0]["error"]["message"], ERROR["message"])

    def test_the_derived_history_mark_reads_as_empty_json(self) -> None:
        """Earlier versions parse the mark as JSON and read a falsy value as no history."""
        self.assertEqual(json.loads(_records.DERIVED_HISTORY), {})

    async def test_records_with_a_written_out_history_still_work(self) -> None:
        """A record stored with its one entry as JSON (earlier versions) is updated as such."""
        entry = {"attempt": 1, "state": "running", "worker": "w", "started_at": T0,
                 "finished_at": None, "error": None, "retry_at": None}
        await self.redis.hmset(self.key("task:a"), {
            "id": "a", "state": RUNNING, "attempts": "1", "queue": "q", "worker": "w",
            "started_at": repr(T0), "updated_at": repr(T0), "history": json.dumps([entry])})
        await self.manager.finished("a", SUCCEEDED, 1, info("q"), T0 + 1)
        history = json.loads(await self.redis.hget(self.key("task:a"), "history"))
        self.assertEqual(history, [{**entry, "state": SUCCEEDED, "finished_at": T0 + 1}])
        self.assertEqual((await self.manager.get("a"))["history"], history)

    async def test_cancel_and_requeue_keep_the_entry_of_the_attempt(self) -> None:
        """A cancel or a requeue changes the state, not the attempt's history entry."""
        await self.manager.started("a", 1, "w", info("q"), T0)
        await self.manager.finished("a", SCHEDULED, 1, info("q"), T0 + 1, error=ERROR,
                                    retry_at=T0 + 30)
        await self.manager.cancel("a", T0 + 2, "stop")
        record = await self.manager.get("a")
        self.assertEqual(record["state"], CANCELED)
        self.assertEqual([(e["attempt"], e["state"], e["finished_at"], e["retry_at"])
                          for e in record["history"]], [(1, SCHEDULED, T0 + 1, T0 + 30)])
        await self.manager.started("b", 1, "w", info("q"), T0)
        await self.manager.finished("b", FAILED, 1, info("q"), T0 + 1, error=ERROR)
        await self.manager.requeued("b", T0 + 5)
        record = await self.manager.get("b")
        self.assertEqual(record["state"], QUEUED)
        self.assertEqual([(e["attempt"], e["state"], e["finished_at"])
                          for e in record["history"]], [(1, FAILED, T0 + 1)])

    async def test_later_writes_prune_expired_records(self) -> None:
        """Writes drop records past their retention and their index entries (bounded work)."""
        self.manager = self.make_manager(finished_ttl=100)
        await self.run_task("gone", queue="qa", at=T0)
        await self.manager.started("alive", 1, "w", info("qa"), T0 + 3)
        await self.run_task("recent", queue="qa", at=T0 + 450)
        await self.manager.enqueued("other", QUEUED, info("qb"), T0 + 500)
        self.assertEqual(await self.index_ids(self.manager, "state:succeeded"), ["recent"])
        self.assertEqual(await self.redis.exists(self.key("task:gone")), 0)
        self.assertEqual(ids(await self.manager.list(queue="qa")), ["recent", "alive"])
        self.assertEqual(ids(await self.manager.list()), ["other", "recent", "alive"])

    async def test_pruning_catches_up_with_a_backlog(self) -> None:
        """More expired records than one step prunes: the next batches go on pruning."""
        self.manager = self.make_manager(finished_ttl=100)
        count = 2 * PRUNE_BATCH + 20
        await gatherResults([
            self.manager.finished(f"old{n}", SUCCEEDED, 1, info("qa"), T0 + n * 0.001)
            for n in range(count)
        ])
        for step in range(3):
            await self.manager.enqueued(f"new{step}", QUEUED, info("qa"), T0 + 500 + step * 0.01)
        self.assertEqual(await self.redis.zcard(self.key("idx:state:succeeded")), 0)
        self.assertEqual(ids(await self.manager.list()), ["new2", "new1", "new0"])

    async def test_redis_with_number_conversion_keeps_strings(self) -> None:
        """A connection converting numbers (txredisapi default) reads records unchanged."""
        host, port = parse_redis_url(REDIS_URL)["host"], parse_redis_url(REDIS_URL)["port"]
        converting = txredisapi.lazyConnection(
            host, port, dbid=parse_redis_url(REDIS_URL)["db"], convertNumbers=True
        )
        self.addCleanup(converting.disconnect)
        manager = RedisStateManager(converting, prefix=self.prefix)
        await manager.started("a", 1, "12", info("007", name="1.0"), T0)
        record = await manager.get("a")
        self.assertEqual((record["worker"], record["queue"], record["name"]), ("12", "007", "1.0"))
        self.assertEqual(ids(await manager.list(queue="007")), ["a"])

    async def test_server_errors_become_state_errors(self) -> None:
        """An error reply from Redis is raised as StateError, caused by the original."""
        await self.redis.set(self.key("idx:state:queued"), "not a sorted set")
        with self.assertRaises(StateError) as caught:
            await self.manager.enqueued("a", QUEUED, info(), T0)
        self.assertIsInstance(caught.exception.__cause__, txredisapi.ResponseError)
        with self.assertRaises(StateError):
            await self.manager.list()

    async def test_unreachable_redis_raises_state_error(self) -> None:
        """With nothing listening, calls fail with StateError once the timeout passes."""
        clock = Clock()
        dead = connect_redis("redis://127.0.0.1:1/0")
        self.addCleanup(dead.disconnect)
        manager = RedisStateManager(dead, prefix=self.prefix, timeout=3, clock=clock)
        calls = [
            manager.get("a"),
            manager.list(),
            manager.started("a", 1, "w", info(), T0),
            manager.finished("a", SUCCEEDED, 1, info(), T0),
        ]
        clock.advance(0)
        for d in calls:
            self.assertFalse(d.called)
        clock.advance(3)
        for d in calls:
            failure = self.failureResultOf(d, StateError)
            self.assertIn("did not answer", failure.getErrorMessage())


class FakeRedis:
    """Stands in for a txredisapi connection: script calls answered from a list."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls: List[tuple] = []

    def _answer(self, call: tuple) -> Deferred:
        self.calls.append(call)
        answer = self.answers.pop(0)
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)

    def evalsha(self, sha: str, keys: list, args: list) -> Deferred:
        return self._answer(("evalsha", sha, tuple(args)))

    def eval(self, source: str, keys: list, args: list) -> Deferred:
        return self._answer(("eval", source, tuple(args)))


class RedisScriptTests(SynchronousTestCase):
    """How RedisStateManager runs its scripts, without a server."""

    def test_unknown_script_falls_back_to_eval(self) -> None:
        """NOSCRIPT from EVALSHA sends the script's source with EVAL."""
        redis = FakeRedis(txredisapi.ScriptDoesNotExist("NOSCRIPT"), 0)
        clock = Clock()
        manager = RedisStateManager(redis, clock=clock)
        d = manager.enqueued("a", QUEUED, info(), T0)
        clock.advance(0)
        self.assertIsNone(self.successResultOf(d))
        (first, _, args1), (second, source, args2) = redis.calls
        self.assertEqual((first, second, args1), ("evalsha", "eval", args2))
        self.assertIn("EXISTS", source)
        self.assertEqual(args1[0], "quebert:")
        self.assertEqual(json.loads(args1[3])[0][:2], ["e", "a"])

    def test_writes_of_one_reactor_turn_go_in_one_script_call(self) -> None:
        """Batching: three writes made together cost one round trip, in order."""
        redis = FakeRedis(0)
        clock = Clock()
        manager = RedisStateManager(redis, clock=clock)
        writes = [manager.enqueued("a", QUEUED, info(), T0),
                  manager.started("a", 1, "w", info(), T0 + 1),
                  manager.finished("a", SUCCEEDED, 1, info(), T0 + 2)]
        self.assertEqual(redis.calls, [])
        clock.advance(0)
        [(kind, _, args)] = redis.calls
        self.assertEqual(kind, "evalsha")
        self.assertEqual([op[0] for op in json.loads(args[3])], ["e", "s", "f"])
        for d in writes:
            self.assertIsNone(self.successResultOf(d))

    def test_writes_wait_for_the_batch_on_its_way(self) -> None:
        """Writes made while a batch is unanswered go together once it is answered."""
        first = Deferred()
        redis = FakeRedis(first, 0)
        clock = Clock()
        manager = RedisStateManager(redis, clock=clock)
        a = manager.finished("a", SUCCEEDED, 1, info(), T0)
        clock.advance(SETTLE_LINGER)
        b = manager.finished("b", FAILED, 1, info(), T0 + 1)
        c = manager.finished("c", SUCCEEDED, 1, info(), T0 + 2)
        clock.advance(0)
        self.assertEqual(len(redis.calls), 1)
        first.callback(0)
        self.assertIsNone(self.successResultOf(a))
        self.assertEqual(len(redis.calls), 2)
        self.assertEqual([op[:2] for op in json.loads(redis.calls[1][2][3])],
                         [["f", "b"], ["f", "c"]])
        for d in (b, c):
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_started_write_does_not_wait_behind_one_batch(self) -> None:
        """
        The task waits for its ``started`` write: with one batch on its way it
        goes at once (with the writes held so far), behind two it waits.
        """
        first, second = Deferred(), Deferred()
        redis = FakeRedis(first, second, 0)
        clock = Clock()
        manager = RedisStateManager(redis, clock=clock)
        manager.finished("a", SUCCEEDED, 1, info(), T0)
        clock.advance(SETTLE_LINGER)
        manager.finished("b", SUCCEEDED, 1, info(), T0 + 1)
        started = manager.started("c", 1, "w", info(), T0 + 2)
        clock.advance(0)
        self.assertEqual(len(redis.calls), 2)
        self.assertEqual([op[:2] for op in json.loads(redis.calls[1][2][3])],
                         [["f", "b"], ["s", "c"]])
        held = manager.started("d", 1, "w", info(), T0 + 3)
        clock.advance(0)
        self.assertEqual(len(redis.calls), 2)
        second.callback(0)
        self.assertIsNone(self.successResultOf(started))
        self.assertEqual([op[:2] for op in json.loads(redis.calls[2][2][3])], [["s", "d"]])
        self.assertIsNone(self.successResultOf(held))

    def test_outcomes_alone_wait_for_company(self) -> None:
        """
        A batch of nothing but outcomes waits SETTLE_LINGER for other writes
        (at paced rates, the next task's ``started``) before it goes.
        """
        redis = FakeRedis(0)
        clock = Clock()
        manager = RedisStateManager(redis, clock=clock)
        d = manager.finished("a", SUCCEEDED, 1, info(), T0)
        clock.advance(0)
        self.assertEqual(redis.calls, [])
        clock.advance(SETTLE_LINGER)
        self.assertEqual(len(redis.calls), 1)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_started_write_takes_waiting_outcomes_along_at_once(self) -> None:
        """A ``started`` write does not linger: it goes at the end of its turn, with them."""
        redis = FakeRedis(0)
        clock = Clock()
        manager = RedisStateManager(redis, clock=clock)
        outcome = manager.finished("a", SUCCEEDED, 1, info(), T0)
        clock.advance(0)
        started = manager.started("b", 1, "w", info(), T0 + 1)
        self.assertEqual(redis.calls, [])
        clock.advance(0)
        [(_, _, args)] = redis.calls
        self.assertEqual([op[:2] for op in json.loads(args[3])], [["f", "a"], ["s", "b"]])
        for d in (outcome, started):
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_only_outcomes_linger(self) -> None:
        """Other writes (here a cancel, which an API caller waits for) go at the end of the turn."""
        for first in ("finished", "cancel"):
            redis = FakeRedis(0)
            clock = Clock()
            manager = RedisStateManager(redis, clock=clock)
            if first == "finished":
                manager.finished("a", SUCCEEDED, 1, info(), T0)
                clock.advance(0)
            canceled = manager.cancel("b", T0 + 1)
            clock.advance(0)
            self.assertEqual(len(redis.calls), 1, first)
            self.successResultOf(canceled)

    def test_held_writes_time_out_from_when_they_were_made(self) -> None:
        """A write held behind an unanswered batch fails timeout seconds after it was made."""
        clock = Clock()
        redis = FakeRedis(Deferred(), Deferred())
        manager = RedisStateManager(redis, timeout=2, clock=clock)
        first = manager.finished("a", SUCCEEDED, 1, info(), T0)
        clock.advance(SETTLE_LINGER)
        clock.advance(1)
        held = manager.finished("b", SUCCEEDED, 1, info(), T0)
        clock.advance(1)  # the first batch times out: the held one is sent
        self.failureResultOf(first, StateError)
        self.assertEqual(len(redis.calls), 2)
        self.assertNoResult(held)
        clock.advance(1)
        self.assertIn("did not answer", self.failureResultOf(held, StateError).getErrorMessage())

    def test_writes_held_past_the_timeout_are_not_sent(self) -> None:
        """Writes that waited the whole timeout for a batch fail without being sent."""
        clock = Clock()
        redis = FakeRedis(Deferred())
        manager = RedisStateManager(redis, timeout=2, clock=clock)
        first = manager.cancel("a", T0)  # (goes at once: outcomes would linger first)
        clock.advance(0)
        held = manager.finished("b", SUCCEEDED, 1, info(), T0)
        clock.advance(2)
        self.failureResultOf(first, StateError)
        self.failureResultOf(held, StateError)
        self.assertEqual(len(redis.calls), 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_pruning_at_most_once_a_second_of_write_time(self) -> None:
        """Batches prune when their write time moved a second, or after a full step."""
        redis = FakeRedis(0, 0, PRUNE_BATCH, 3, 0, 0)
        clock = Clock()
        manager = RedisStateManager(redis, clock=clock)
        for at in (T0, T0 + 0.5, T0 + 1.2, T0 + 1.3, T0 + 1.4, T0 - 5):
            manager.enqueued("a", QUEUED, info(), at)
            clock.advance(0)
        self.assertEqual([args[4] for _, _, args in redis.calls], ["1", "0", "1", "1", "0", "1"])

    def test_scripts_are_not_sent_when_known(self) -> None:
        """A script Redis knows is run by its SHA1 only."""
        redis = FakeRedis(None)
        manager = RedisStateManager(redis, clock=Clock())
        self.assertIsNone(self.successResultOf(manager.get("a")))
        self.assertEqual([call[0] for call in redis.calls], ["evalsha"])

    def test_timeout_leaves_the_command_alone(self) -> None:
        """A timed-out command is not cancelled; its late answer is ignored."""
        clock, late = Clock(), Deferred(lambda d: self.fail("cancelled"))
        manager = RedisStateManager(FakeRedis(late), timeout=2, clock=clock)
        d = manager.get("a")
        clock.advance(2)
        self.failureResultOf(d, StateError)
        late.callback('{"id": "a", "state": "queued"}')
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_answer_before_timeout_cancels_timer(self) -> None:
        """An answer in time is returned and leaves no timer behind."""
        clock, answer = Clock(), Deferred()
        manager = RedisStateManager(FakeRedis(answer), timeout=2, clock=clock)
        d = manager.get("a")
        answer.callback(None)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancelling_a_call_stops_its_timer(self) -> None:
        """A caller giving up on a call leaves no timer and ignores the answer."""
        clock, answer = Clock(), Deferred()
        manager = RedisStateManager(FakeRedis(answer), timeout=2, clock=clock)
        d = manager.get("a")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])
        answer.errback(txredisapi.ConnectionError("late"))

    def test_connection_errors_become_state_errors(self) -> None:
        """txredisapi connection errors are raised as StateError from the original."""
        redis = FakeRedis(txredisapi.ConnectionError("Not connected"))
        manager = RedisStateManager(redis, clock=Clock())
        failure = self.failureResultOf(manager.get("a"), StateError)
        self.assertIsInstance(failure.value.__cause__, txredisapi.ConnectionError)

    def test_bad_settings_are_configuration_errors(self) -> None:
        """Negative TTLs and non-positive timeouts are refused."""
        self.assertRaises(ConfigurationError, RedisStateManager, FakeRedis(), finished_ttl=-5)
        self.assertRaises(ConfigurationError, RedisStateManager, FakeRedis(), timeout=0)


class UniqueNameTests(SynchronousTestCase):
    """The checks of unique task names both stores share."""

    def test_name_ending_in_a_newline(self) -> None:
        _records.check_name("nightly-report")
        for name in ("nightly-report\n", "nightly-report\r\n", "a b", ""):
            self.assertRaises(ValueError, _records.check_name, name)

    def test_memory_store_refuses_it(self) -> None:
        manager = MemoryStateManager(clock=Clock())
        failure = self.failureResultOf(
            manager.claim("a", QUEUED, info(name="n\n"), T0), ValueError)
        self.assertIn("unique name", str(failure.value))


class RedisURLTests(SynchronousTestCase):
    """parse_redis_url / connect_redis read redis:// URLs and refuse others clearly."""

    def test_full_url(self) -> None:
        """Host, port, database and an escaped password are read."""
        self.assertEqual(
            parse_redis_url("redis://:s%40cret@redis.example:6380/3"),
            {
                "host": "redis.example",
                "port": 6380,
                "db": 3,
                "username": None,
                "password": "s@cret",
                "tls": False,
            },
        )

    def test_defaults(self) -> None:
        """Port 6379 and database 0 unless given; rediss means TLS; users are kept."""
        parsed = parse_redis_url("rediss://user:pw@localhost")
        self.assertEqual(
            (parsed["port"], parsed["db"], parsed["tls"], parsed["username"]),
            (6379, 0, True, "user"),
        )
        self.assertEqual(parse_redis_url("redis://[::1]:7000/")["host"], "::1")

    def test_reconnects_to_redis_every_few_seconds_at_most(self) -> None:
        """
        Not txredisapi's 10 s: a worker's state writes wait in its queue
        until the connection is back, so a Redis back after an outage must
        be found soon.  (tests.faults.test_redis_outage measured 12.9 s
        from the end of a 10 s cut to the replay with the 10 s cap.)
        """
        from quebert.state.redis import RECONNECT_MAX_DELAY

        handler = connect_redis("redis://127.0.0.1:1/0", connect_timeout=1)
        self.addCleanup(handler.disconnect)
        factory = handler._factory
        self.assertEqual(factory.maxDelay, RECONNECT_MAX_DELAY)
        self.assertLessEqual(RECONNECT_MAX_DELAY, 2.0)
        delays = [factory.retryDelay(attempt) for attempt in range(1, 60)]
        self.assertLess(max(delays), RECONNECT_MAX_DELAY * (1 + 8 * factory.jitter))

    def test_bad_urls_are_configuration_errors(self) -> None:
        """Wrong scheme, no host, bad port or database: a sentence saying so."""
        for url in (
            "http://localhost:6379/0",
            "redis://",
            "redis://localhost:port/0",
            "redis://localhost/zero",
            "redis://localhost/0?ssl=yes",
            "localhost:6379",
            None,
        ):
            with self.assertRaises(ConfigurationError, msg=url) as caught:
                connect_redis(url)  # type: ignore[arg-type]
            self.assertIn("redis://", str(caught.exception))
