# -*- test-case-name: tests.test_state -*-
"""
A state store in process memory, for tests and single-process setups.

It keeps the same records as the Redis store (both build them with
:mod:`quebert.state._records`) and passes the same contract tests.  Every
method returns an already-fired ``Deferred``.  Records handed out are deep
copies, so callers can never change what is stored.

Finished records expire their outcome's retention (``finished_ttl``
unless ``retention`` says otherwise) after they were written,
measured on the clock given (a ``twisted.internet.task.Clock`` in tests);
expired records are dropped lazily, on the next call, in deadline order,
so the cost does not grow with the number of live records.
"""

from __future__ import annotations

import copy
import heapq
import json
import math
from itertools import islice
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from quebert.errors import ConfigurationError, TaskAlreadyExists
from quebert.state import _records
from quebert.state.interface import (
    CANCELED,
    DUPLICATE,
    FAILED,
    FINISHED_STATES,
    QUEUED,
    RUNNING,
    SCHEDULED,
    STATES,
    ISettledFeed,
    IStateManager,
)


def _fired(f: Any, *args: Any) -> Deferred:
    """``f(*args)`` as an already-fired Deferred (``maybeDeferred``, for a plain function)."""
    try:
        result = f(*args)
    except BaseException:
        return fail()
    return succeed(result)


#: Finished records a memory store keeps at most, by default.
MAX_FINISHED = 100_000


class _Index:
    """
    Task ids ordered by ``(updated_at, id)``, walked newest first.

    Writes come in time order nearly always, so the index is a dict in
    insertion order: adding, moving (a re-add goes to the end) and dropping
    an id are O(1), and expiring the oldest records costs no more than
    recording new ones.  An id added out of order (an earlier time than the
    newest's) marks the index, which is sorted again at its next read.
    """

    __slots__ = ("_scores", "_newest", "_ordered")

    def __init__(self) -> None:
        self._scores: Dict[str, float] = {}
        self._newest: Optional[Tuple[float, str]] = None  # greatest key added since sorted
        self._ordered = True

    def __len__(self) -> int:
        return len(self._scores)

    def add(self, task_id: str, score: float) -> None:
        scores = self._scores
        scores.pop(task_id, None)  # (a re-add goes to the end)
        scores[task_id] = score
        key = (score, task_id)
        newest = self._newest
        if newest is None or key >= newest:
            self._newest = key
        else:
            self._ordered = False

    def discard(self, task_id: str) -> None:
        self._scores.pop(task_id, None)

    def newest(self, start: int = 0) -> Iterator[str]:
        """Ids from the ``start``-th newest on (same order as Redis ``ZREVRANGE``)."""
        for _, task_id in self.newest_items(start):
            yield task_id

    def newest_items(self, start: int = 0) -> Iterator[Tuple[float, str]]:
        """``(score, id)`` from the ``start``-th newest on."""
        if not self._ordered:
            ordered = sorted(self._scores.items(), key=lambda item: (item[1], item[0]))
            self._scores = dict(ordered)
            self._newest = (ordered[-1][1], ordered[-1][0]) if ordered else None
            self._ordered = True
        items = ((score, task_id) for task_id, score in reversed(self._scores.items()))
        return islice(items, start, None)


@implementer(IStateManager, ISettledFeed)
class MemoryStateManager:
    """
    :class:`IStateManager` in memory.

    :param finished_ttl: seconds a finished record is kept (0: forever),
        whatever its outcome; ``None``: ``DEFAULT_RETENTION``.
    :param retention: seconds by outcome that differ from that.
    :param clock: ``IReactorTime`` used only to expire finished records;
        the global reactor when ``None``.
    :param max_finished: finished records kept at most (``None``: no
        limit), so that the store's memory is bounded whatever the task
        rate: beyond it, those due to expire first are dropped first
        (counted in :attr:`evicted`).  A record takes about 1 KB, so the
        default, 100,000, bounds the records at some 100 MB.
    """

    def __init__(self, finished_ttl: Optional[float] = None,
                 clock: Optional[IReactorTime] = None,
                 name_tombstone: float = 3600,
                 retention: Optional[Mapping[str, float]] = None,
                 max_finished: Optional[int] = MAX_FINISHED) -> None:
        try:
            kept = _records.retention(finished_ttl, retention)
        except ValueError as e:
            raise ConfigurationError(str(e)) from None
        if name_tombstone < 0:
            raise ConfigurationError(
                f"name_tombstone must be >= 0 seconds, not {name_tombstone!r}")
        if max_finished is not None and (type(max_finished) is not int or max_finished < 1):
            raise ConfigurationError(
                f"max_finished must be an int >= 1 or None, not {max_finished!r}")
        self.max_finished = max_finished
        #: Finished records dropped before their time to keep ``max_finished``.
        self.evicted = 0
        #: The longest retention (0: some outcome is kept forever).
        self.finished_ttl = _records.longest(kept)
        #: Seconds a finished record is kept, by outcome (0: forever).
        self.retention: Dict[str, float] = kept
        self.name_tombstone = name_tombstone
        self._paused: set = set()
        self._workers: Dict[str, float] = {}
        self._descriptions: Dict[str, Dict[str, Any]] = {}
        #: unique name -> (holding task id, expiry time or None while it is live)
        self._names: Dict[str, Tuple[str, Optional[float]]] = {}
        self._clock = clock
        self._records: Dict[str, Dict[str, Any]] = {}
        self._deadline: Dict[str, float] = {}
        self._deadlines: List[Tuple[float, str]] = []  # heap; stale entries skipped
        # as in Redis, a record is in its state's index only
        self._states = {state: _Index() for state in STATES}
        self._watches: List[_MemoryWatch] = []

    # -- ISettledFeed ---------------------------------------------------

    def watch_settled(self, on_settled: Any, on_subscribed: Any) -> _MemoryWatch:
        """Tell ``on_settled([id])`` of every task that settles from now on, in process."""
        watch = _MemoryWatch(self._watches, on_settled)
        self._watches.append(watch)
        return watch

    # -- IStateManager --------------------------------------------------

    def enqueued(self, task_id: str, state: str, info: Mapping[str, Any], at: float) -> Deferred:
        """Create the record of a task just published, unless it exists."""
        return _fired(self._enqueued, task_id, state, info, at)

    def started(
        self, task_id: str, attempt: int, worker: str, info: Mapping[str, Any], at: float
    ) -> Deferred:
        """Record that attempt ``attempt`` of the task starts on ``worker``."""
        return _fired(self._started, task_id, attempt, worker, info, at)

    def claim(self, task_id: str, state: str, info: Mapping[str, Any], at: float) -> Deferred:
        """``enqueued`` for a task with a unique name; fails if the name is held."""
        return _fired(self._claim, task_id, state, info, at)

    def release_name(self, task_id: str, name: str, at: float) -> Deferred:
        """Free ``name`` if ``task_id`` holds it."""
        return _fired(self._release_name, task_id, name)

    def cancel(self, task_id: str, at: float, reason: Optional[str] = None) -> Deferred:
        """Cancel a task; fires with the state it was in (``None``: no record)."""
        return _fired(self._cancel, task_id, at, reason)

    def requeued(self, task_id: str, at: float) -> Deferred:
        """A failed task is queued again; fires with the state it was in."""
        return _fired(self._requeued, task_id, at)

    def set_paused(self, queue: str, paused: bool) -> Deferred:
        """Remember that ``queue`` is paused (or not)."""
        (self._paused.add if paused else self._paused.discard)(queue)
        return succeed(None)

    def worker_beat(self, worker: str, ttl: float,
                    description: Optional[Mapping[str, Any]] = None) -> Deferred:
        """``worker`` is alive for ``ttl`` more seconds (0: it is gone)."""
        if ttl > 0:
            self._workers[worker] = self._now() + ttl
            self._descriptions[worker] = copy.deepcopy(dict(description or {}))
        else:
            self._workers.pop(worker, None)
            self._descriptions.pop(worker, None)
        return succeed(None)

    def workers(self) -> Deferred:
        """Fire with the live workers' descriptions by id, with ``expires_in``."""
        now = self._now()
        found = {}
        for worker, until in list(self._workers.items()):
            if until <= now:
                del self._workers[worker]
                self._descriptions.pop(worker, None)
                continue
            found[worker] = dict(copy.deepcopy(self._descriptions.get(worker, {})),
                                 expires_in=until - now)
        return succeed(found)

    def find(self, task: str, state: Optional[str] = None, queue: Optional[str] = None,
             limit: int = 100, position: int = 0, budget: int = 10_000) -> Deferred:
        """The Redis store's ``find``: ``(records, next_position)`` of one task name."""
        return _fired(self._find, task, state, queue, limit, position, budget)

    def _find(self, task: str, state: Optional[str], queue: Optional[str], limit: int,
              position: int, budget: int) -> Tuple[List[Dict[str, Any]], Optional[int]]:
        _records.check_list(state, queue, limit, position)
        if not isinstance(task, str) or not task:
            raise ValueError(f"task must be a non-empty str, not {task!r}")
        self._expire()
        found: List[Dict[str, Any]] = []
        examined = 0
        for task_id in self._walk(state, position):
            if len(found) >= limit or examined >= max(1, budget):
                return found, position + examined
            examined += 1
            record = self._records[task_id]
            if record["task"] == task and (queue is None or record["queue"] == queue):
                found.append(_copy_out(record))
        return found, None

    def counts(self) -> Deferred:
        """Fire with ``{state: number of records}``."""
        self._expire()
        return succeed({state: len(index) for state, index in self._states.items()})

    def worker_alive(self, worker: str) -> Deferred:
        """Fire with the seconds ``worker``'s last beat still lasts (0: it is gone)."""
        return succeed(max(self._workers.get(worker, 0.0) - self._now(), 0.0))

    def paused_queues(self) -> Deferred:
        """Fire with the set of paused queue names."""
        return succeed(set(self._paused))

    def finished(
        self,
        task_id: str,
        state: str,
        attempt: int,
        info: Mapping[str, Any],
        at: float,
        result: Any = None,
        error: Optional[Mapping[str, Any]] = None,
        reason: Optional[str] = None,
        retry_at: Optional[float] = None,
    ) -> Deferred:
        """Record the outcome of attempt ``attempt``."""
        return _fired(
            self._finished, task_id, state, attempt, info, at, result, error, reason, retry_at
        )

    def get(self, task_id: str) -> Deferred:
        """Fire with a copy of the record, or ``None``."""
        return _fired(self._get, task_id)

    def list(
        self,
        state: Optional[str] = None,
        queue: Optional[str] = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Deferred:
        """Fire with copies of up to ``limit`` records, most recently updated first."""
        return _fired(self._list, state, queue, limit, offset)

    # -- implementation -------------------------------------------------

    def _now(self) -> float:
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor  # type: ignore[assignment]
        return self._clock.seconds()  # type: ignore[union-attr]

    def _expire(self) -> None:
        """Drop the finished records whose deadline has passed."""
        if not self._deadlines:
            return
        now = self._now()
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, task_id = heapq.heappop(self._deadlines)
            if self._deadline.get(task_id) == deadline:
                self._remove(task_id)

    def _remove(self, task_id: str) -> None:
        record = self._records.pop(task_id)
        self._deadline.pop(task_id, None)
        self._states[record["state"]].discard(task_id)

    def _walk(self, state: Optional[str], start: int = 0) -> Iterator[str]:
        """
        Ids newest first, from the ``start``-th: of the state's index, or
        of all six merged (the order of the Redis store's walk).
        """
        if state is not None:
            return self._states[state].newest(start)
        merged = heapq.merge(*(index.newest_items() for index in self._states.values()),
                             reverse=True)
        return (task_id for _, task_id in islice(merged, start, None))

    def _load(self, task_id: str, info: Any, at: float) -> Tuple[Dict[str, Any], Any]:
        """The stored record (or a new one) and its state before the write."""
        self._expire()
        record = self._records.get(task_id)
        if record is None:
            return _records.new_record(task_id, info, at), None
        # a copy, so that a write failing half-way changes nothing
        return _explicit(record), record["state"]

    def _store(self, record: Dict[str, Any], old_state: Any) -> None:
        """Keep ``record`` and move it in the indexes and the expiry schedule."""
        task_id, score, state = record["id"], record["updated_at"], record["state"]
        self._records[task_id] = record
        if old_state is not None and old_state != state:
            self._states[old_state].discard(task_id)
        self._states[state].add(task_id, score)
        if state in FINISHED_STATES and old_state != state and self._watches:
            for watch in list(self._watches):
                watch.tell(task_id)
        if state in FINISHED_STATES:
            kept = self.retention[state]
            deadline = self._now() + kept if kept > 0 else math.inf  # (inf: evicted last)
            self._deadline[task_id] = deadline
            heapq.heappush(self._deadlines, (deadline, task_id))
            if self.max_finished is not None and len(self._deadline) > self.max_finished:
                self._evict()
        else:
            self._deadline.pop(task_id, None)

    def _evict(self) -> None:
        """Drop the finished records due to expire first, down to ``max_finished``."""
        deadlines, current = self._deadlines, self._deadline
        while len(current) > self.max_finished and deadlines:  # type: ignore[operator]
            deadline, task_id = heapq.heappop(deadlines)
            if current.get(task_id) == deadline:
                self._remove(task_id)
                self.evicted += 1

    def _enqueued(self, task_id: str, state: str, info: Mapping[str, Any], at: float) -> None:
        _records.check_enqueued(task_id, state, info, at)
        record, old_state = self._load(task_id, info, at)
        if old_state is not None:
            # started before its producer's write arrived: only the arguments are added
            if info.get("arguments") is not None and "arguments" not in record:
                record["arguments"] = json.loads(info["arguments"])
                self._records[task_id] = record
            return
        record.update(_records.enqueued_changes(state, at))
        if info.get("arguments") is not None:
            record["arguments"] = json.loads(info["arguments"])
        self._store(record, None)

    def _holder(self, name: str) -> Optional[str]:
        held = self._names.get(name)
        if held is None:
            return None
        holder, expires = held
        if expires is not None and expires <= self._now():
            del self._names[name]
            return None
        return holder

    def _tombstone(self, task_id: str, name: Optional[str]) -> None:
        if name is not None and self._holder(name) == task_id:
            self._names[name] = (task_id, self._now() + self.name_tombstone)

    def _claim(self, task_id: str, state: str, info: Mapping[str, Any], at: float) -> None:
        _records.check_enqueued(task_id, state, info, at)
        name = info.get("name")
        _records.check_name(name)
        holder = self._holder(name)
        if holder is not None and holder != task_id:
            raise TaskAlreadyExists(name, holder)
        self._names[name] = (task_id, None)
        self._enqueued(task_id, state, info, at)

    def _requeued(self, task_id: str, at: float) -> Optional[str]:
        _records.check_task_id(task_id)
        self._expire()
        stored = self._records.get(task_id)
        if stored is None:
            return None
        old_state = stored["state"]
        if old_state != FAILED:
            return old_state
        record = _explicit(stored)
        record.update(state=QUEUED, updated_at=float(at), finished_at=None, result=None,
                      error=None, reason=None, cancel_requested=None, eta=None)
        self._store(record, old_state)
        name = record["name"]
        if name is not None and self._holder(name) in (None, task_id):
            self._names[name] = (task_id, None)
        return old_state

    def _release_name(self, task_id: str, name: str) -> None:
        _records.check_task_id(task_id)
        _records.check_name(name)
        if self._holder(name) == task_id:
            del self._names[name]

    def _cancel_record(self, record: Dict[str, Any], old_state: str, at: float,
                       reason: str) -> None:
        record.update(state=CANCELED, updated_at=float(at), finished_at=float(at),
                      reason=reason)
        self._store(record, old_state)
        self._tombstone(record["id"], record["name"])

    def _cancel(self, task_id: str, at: float, reason: Optional[str]) -> Optional[str]:
        _records.check_task_id(task_id)
        self._expire()
        stored = self._records.get(task_id)
        if stored is None:
            return None
        old_state = stored["state"]
        if old_state in FINISHED_STATES:
            return old_state
        record = _explicit(stored)
        record["cancel_requested"] = float(at)
        if old_state == RUNNING:
            self._records[task_id] = record
        else:
            self._cancel_record(record, old_state, at, _records.text(
                reason, _records.MESSAGE_LIMIT) or "canceled")
        return old_state

    def _started(
        self, task_id: str, attempt: int, worker: str, info: Mapping[str, Any], at: float
    ) -> Optional[str]:
        _records.check_started(task_id, attempt, worker, info, at)
        if task_id not in self._records:  # (an expired one is dropped by _load)
            plain = _records.plain_info(info)
            if plain is not None:
                # the common case, a task never seen: its one history entry is
                # what its own fields say (see _explicit)
                self._store(self._first_start(task_id, plain, attempt, worker, float(at)), None)
                return None
        record, old_state = self._load(task_id, info, at)
        if old_state == CANCELED or (record["cancel_requested"] is not None
                                     and old_state not in FINISHED_STATES):
            if old_state != CANCELED:
                self._cancel_record(record, old_state, at,
                                    f"canceled before attempt {attempt} started")
            return CANCELED
        if _records.started_is_stale(record, attempt):
            return DUPLICATE
        record.update(_records.info_updates(info))
        record.update(_records.started_changes(attempt, worker, at))
        record["history"] = _records.upsert_history(
            record["history"], attempt, _records.started_entry(attempt, worker, at), replace=True
        )
        self._store(record, old_state)

    @staticmethod
    def _first_start(task_id: str, plain: tuple, attempt: int, worker: Optional[str],
                     at: float) -> Dict[str, Any]:
        """The record of a task never seen before whose attempt ``attempt`` starts."""
        queue, kind, task, name, eta, created_at = plain
        return {
            "id": task_id,
            "state": RUNNING,
            "queue": queue,
            "kind": kind,
            "task": task,
            "name": name,
            "attempts": attempt,
            "created_at": at if created_at is None else created_at,
            "updated_at": at,
            "eta": eta,
            "started_at": at,
            "finished_at": None,
            "worker": _records.text(worker, _records.MESSAGE_LIMIT),
            "result": None,
            "error": None,
            "reason": None,
            "history": None,
            "cancel_requested": None,
        }

    def _finished(
        self,
        task_id: str,
        state: str,
        attempt: int,
        info: Mapping[str, Any],
        at: float,
        result: Any,
        error: Optional[Mapping[str, Any]],
        reason: Optional[str],
        retry_at: Optional[float],
    ) -> None:
        _records.check_finished(task_id, state, attempt, info, at, error, reason, retry_at)
        self._expire()
        stored = self._records.get(task_id)
        if (stored is not None and stored["history"] is None and stored["state"] == RUNNING
                and stored["attempts"] == attempt and stored["cancel_requested"] is None
                and (retry_at is None or state == SCHEDULED)):
            plain = _records.plain_info(info)
            if plain is not None:
                self._first_outcome(stored, plain, state, at, result, error, reason, retry_at)
                return
        record, old_state = self._load(task_id, info, at)
        if record["cancel_requested"] is not None and state == SCHEDULED:
            state = CANCELED
            if reason is None:
                reason = f"canceled while attempt {attempt} ran"
        record.update(_records.info_updates(info))
        record.update(_records.finished_changes(state, at, result, error, reason, retry_at))
        record["attempts"] = max(record["attempts"], attempt)
        record["history"] = _records.upsert_history(
            record["history"],
            attempt,
            _records.outcome_entry(attempt, state, at, error, retry_at),
            replace=False,
        )
        self._store(record, old_state)
        if state in FINISHED_STATES:
            self._tombstone(task_id, record["name"])

    def _first_outcome(self, record: Dict[str, Any], plain: tuple, state: str, at: float,
                       result: Any, error: Optional[Mapping[str, Any]],
                       reason: Optional[str], retry_at: Optional[float]) -> None:
        """
        ``finished`` for the attempt that a record holding that one attempt
        runs (the common case): its history entry stays what its fields
        say, so the record is changed in place, once everything that could
        fail has been computed.
        """
        changes = _records.finished_changes(state, at, result, error, reason, retry_at)
        queue, kind, task, name = plain[:4]
        record["queue"], record["kind"], record["task"] = queue, kind, task
        if name is not None:
            record["name"] = name
        record.update(changes)
        self._store(record, RUNNING)
        if state in FINISHED_STATES:
            self._tombstone(record["id"], record["name"])

    def _get(self, task_id: str) -> Optional[Dict[str, Any]]:
        _records.check_task_id(task_id)
        self._expire()
        record = self._records.get(task_id)
        return _copy_out(record) if record is not None else None

    def _list(
        self, state: Optional[str], queue: Optional[str], limit: int, offset: int
    ) -> List[Dict[str, Any]]:
        _records.check_list(state, queue, limit, offset)
        self._expire()
        if queue is not None:
            # each record's queue checked, as in the Redis store
            records = self._records
            ids: Iterator[str] = (task_id for task_id in self._walk(state)
                                  if records[task_id]["queue"] == queue)
            skip = offset
        else:
            ids = self._walk(state, offset)
            skip = 0
        found: List[Dict[str, Any]] = []
        for task_id in ids:
            if len(found) >= limit:
                break
            if skip:
                skip -= 1
                continue
            found.append(_copy_out(self._records[task_id]))
        return found


def _explicit(record: Dict[str, Any]) -> Dict[str, Any]:
    """
    A copy of a stored record with its ``history`` written out.

    A record created by ``started`` keeps ``history`` as ``None`` while
    that attempt is its only one: the attempt's entry is what the record's
    own fields say (as the Redis store's ``DERIVED_HISTORY``), which spares
    the common task a list and a dict.  Every write but that ``started``
    and its attempt's outcome works on the written-out form.
    """
    record = dict(record)
    if record["history"] is None:
        record["history"] = [_records.derived_entry(record)]
    return record


def _copy_out(record: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of a stored record that its reader may change: nothing is shared."""
    return copy.deepcopy(_explicit(record) if record["history"] is None else record)


class _MemoryWatch:
    """A memory store's settled-task feed: live at once, never lost."""

    def __init__(self, watches: List[_MemoryWatch], on_settled: Any) -> None:
        self._watches = watches
        self._on_settled = on_settled

    def tell(self, task_id: str) -> None:
        try:
            self._on_settled([task_id])
        except Exception:
            from twisted.logger import Logger

            Logger(namespace="quebert.state.memory").failure(
                "handling settled task {task_id} failed", task_id=task_id)

    def when_ready(self) -> Deferred:
        return succeed(None)

    def stop(self) -> Deferred:
        if self in self._watches:
            self._watches.remove(self)
        return succeed(None)
