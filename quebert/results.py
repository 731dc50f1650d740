# -*- test-case-name: tests.test_results -*-
"""
Waiting for tasks to finish: :class:`ResultWaiter`, and :func:`outcome`.

A worker records every outcome in the state store; the store tells who
listens which tasks settled (:class:`~quebert.state.interface.ISettledFeed`:
Redis pub/sub, published by the script that writes the outcome, or the
memory store in process).  A waiter holds one subscription however many
tasks it waits for, and no polling loop: it reads a record when it starts
waiting (a task that settled before answers at once), when the feed names
the task, and each time the feed is re-established (anything settled
while it was down is read again).  So a wait is race-free: whatever order
the subscription, the read and the outcome come in, the outcome is seen.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from twisted.internet import defer
from twisted.logger import Logger

from quebert.errors import (
    ConfigurationError,
    InvalidResult,
    ResultTimeout,
    StateError,
    TaskCanceled,
    TaskFailed,
    TaskNotFound,
)
from quebert.state.interface import CANCELED, FAILED, FINISHED_STATES, SUCCEEDED

log = Logger(namespace="quebert.results")

#: Seconds before a record that could not be read is read again.
REREAD_DELAY = 1.0


def check_result(value: Any, limit: int, task_name: str) -> None:
    """
    Raise :class:`InvalidResult` when ``value``, a task's return value,
    cannot be kept as its result: not JSON, or more than ``limit`` bytes of
    JSON (0: no limit).  Tuples are kept as lists, like arguments.
    """
    kind = type(value)
    # the common results, without encoding them (this runs for every task)
    if kind is int and value.bit_length() < 64 or kind is bool:
        return
    if kind is str and (not limit or len(value) * 6 + 2 <= limit):
        return  # at most 6 bytes of JSON per character, and its quotes
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, OverflowError, RecursionError) as e:
        raise InvalidResult(
            f"task {task_name!r} returned a {type(value).__name__}, which is not JSON ({e}); "
            "a result must be made of dict, list, str, int, float (finite), bool and None"
        ) from None
    if limit and len(text) > limit:  # json.dumps writes ASCII: characters are bytes
        raise InvalidResult(
            f"task {task_name!r} returned {len(text)} bytes of JSON, more than the "
            f"worker's max_result_size ({limit} bytes); keep large data elsewhere and "
            "return a reference to it")


def outcome(record: dict) -> Any:
    """
    The result of a finished task's ``record``: its return value when it
    succeeded; raises :class:`TaskFailed` (the remote error, reason and
    attempts) or :class:`TaskCanceled` otherwise.
    """
    state = record.get("state")
    task_id = record.get("id", "?")
    if state == SUCCEEDED:
        return record.get("result")
    if state == FAILED:
        raise TaskFailed(task_id, record)
    if state == CANCELED:
        raise TaskCanceled(task_id, record)
    raise ValueError(f"task {task_id} has not finished (it is {state})")


def record_when_settled(d: defer.Deferred, read: Any, task_id: str) -> defer.Deferred:
    """
    ``d``, a :meth:`ResultWaiter.wait`, as the HTTP API answers: the
    finished record, or when the time is up the record as ``read(task_id)``
    gives it then, or ``None`` for an unknown task.  Cancelling the result
    cancels ``d``.
    """
    def ended(failure: Any) -> Any:
        if failure.check(ResultTimeout):
            return read(task_id)
        if failure.check(TaskNotFound):
            return None
        return failure

    outer: defer.Deferred = defer.Deferred(lambda _: d.cancel())
    d.addErrback(ended)
    d.chainDeferred(outer)
    return outer


class _Wait:
    """One caller's wait for one task."""

    __slots__ = ("task_id", "deferred", "timer", "read", "last_state", "timeout", "expired")

    def __init__(self, task_id: str, deferred: defer.Deferred) -> None:
        self.task_id = task_id
        self.deferred = deferred
        self.timer: Any = None
        self.read = False  # its first read answered
        self.last_state: Optional[str] = None
        self.timeout = 0.0
        # its time was up before its first read answered: that read decides
        self.expired = False


class ResultWaiter:
    """
    Waits for tasks to settle, for any number of callers, through one
    subscription to ``state``'s feed (started on the first wait).

    :param state: a state store providing ``get`` and ``watch_settled``
        (the Redis and memory stores, or a resilient store around one).
    :param clock: ``IReactorTime`` for timeouts (the global reactor when
        ``None``).
    """

    def __init__(self, state: Any, clock: Any = None) -> None:
        if not callable(getattr(state, "watch_settled", None)):
            raise ConfigurationError(
                f"{type(state).__name__} cannot tell when tasks settle: waiting for results "
                "needs the Redis or memory state store")
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[no-redef]
        self.state = state
        self.clock = clock
        self._waits: Dict[str, List[_Wait]] = {}
        self._watch: Any = None
        self._live = False
        self._rereads: Dict[str, Any] = {}

    @property
    def waiting(self) -> int:
        """How many waits are pending."""
        return sum(len(waits) for waits in self._waits.values())

    def wait(self, task_id: str, timeout: Optional[float] = None) -> defer.Deferred:
        """
        Fire with ``task_id``'s record once it is ``succeeded``, ``failed``
        or ``canceled`` (at once if it is already).  Fails with
        :class:`TaskNotFound` when the store has no record of the task, or
        :class:`ResultTimeout` when ``timeout`` seconds pass first (the
        task goes on).  Cancelling the Deferred stops waiting.
        """
        if timeout is not None and not timeout >= 0:
            raise ConfigurationError(f"timeout must be seconds >= 0 or None, not {timeout!r}")
        wait = _Wait(task_id, defer.Deferred(lambda d: self._forget(wait)))
        self._waits.setdefault(task_id, []).append(wait)
        if timeout is not None:
            wait.timer = self.clock.callLater(timeout, self._expire, wait, timeout)
        if self._watch is None:
            self._watch = self.state.watch_settled(self._settled, self._resubscribed)
            self._watch.when_ready().addCallback(self._became_live)
        elif self._live:
            self._read(task_id)
        return wait.deferred

    def result(self, task_id: str, timeout: Optional[float] = None) -> defer.Deferred:
        """:meth:`wait`, then :func:`outcome`: the task's return value, or its failure."""
        return self.wait(task_id, timeout).addCallback(outcome)

    def close(self) -> defer.Deferred:
        """Stop the subscription; pending waits fail with ``CancelledError``."""
        for waits in list(self._waits.values()):
            for wait in list(waits):
                wait.deferred.cancel()
        for call in self._rereads.values():
            if call.active():
                call.cancel()
        self._rereads.clear()
        watch, self._watch, self._live = self._watch, None, False
        if watch is None:
            return defer.succeed(None)
        return defer.maybeDeferred(watch.stop)

    # -- the feed --------------------------------------------------------

    def _became_live(self, _: Any) -> None:
        # _resubscribed has read everything (the memory store has no such call)
        if not self._live:
            self._live = True
            for task_id in list(self._waits):
                self._read(task_id)

    def _resubscribed(self) -> None:
        self._live = True
        for task_id in list(self._waits):
            self._read(task_id)

    def _settled(self, ids: List[str]) -> None:
        waits = self._waits
        for task_id in ids:
            if task_id in waits:
                self._read(task_id)

    # -- reading records ---------------------------------------------------

    def _read(self, task_id: str) -> None:
        try:
            d = self.state.get(task_id)
        except Exception:
            d = defer.fail()
        d.addCallbacks(self._got, self._read_failed, callbackArgs=(task_id,),
                       errbackArgs=(task_id,))

    def _got(self, record: Optional[dict], task_id: str) -> None:
        waits = self._waits.get(task_id)
        if not waits:
            return
        if record is not None and record.get("state") in FINISHED_STATES:
            del self._waits[task_id]
            for wait in waits:
                self._cancel_timer(wait)
                wait.deferred.callback(record)
            return
        keep, ended = [], []
        for wait in waits:
            if record is None and not wait.read:
                self._cancel_timer(wait)
                ended.append((wait, TaskNotFound(task_id)))
                continue
            wait.read = True
            if record is not None:
                wait.last_state = record.get("state")
            if wait.expired:
                ended.append((wait, ResultTimeout(task_id, wait.timeout, wait.last_state)))
                continue
            keep.append(wait)
        if keep:
            self._waits[task_id] = keep
        else:
            del self._waits[task_id]
        for wait, error in ended:  # once the waits are in order: a callback may wait again
            wait.deferred.errback(error)

    def _read_failed(self, failure: Any, task_id: str) -> None:
        if task_id not in self._waits:
            return
        log.warn("could not read task {task_id} for those waiting on it: {error}; "
                 "reading it again in {delay} s", task_id=task_id,
                 error=failure.getErrorMessage(), delay=REREAD_DELAY)
        if not failure.check(StateError):
            log.failure("reading a waited-for task failed", failure)
        if task_id not in self._rereads:
            self._rereads[task_id] = self.clock.callLater(REREAD_DELAY, self._reread, task_id)

    def _reread(self, task_id: str) -> None:
        self._rereads.pop(task_id, None)
        if task_id in self._waits and self._live:
            self._read(task_id)

    # -- ending waits --------------------------------------------------------

    def _expire(self, wait: _Wait, timeout: float) -> None:
        wait.timer = None
        wait.timeout = timeout
        if not wait.read:
            # a short timeout must not beat the read of a task that has
            # finished already: the first read answers either way
            wait.expired = True
            return
        if self._remove(wait):
            wait.deferred.errback(ResultTimeout(wait.task_id, timeout, wait.last_state))

    def _forget(self, wait: _Wait) -> None:
        self._cancel_timer(wait)
        self._remove(wait)

    def _remove(self, wait: _Wait) -> bool:
        waits = self._waits.get(wait.task_id)
        if not waits or wait not in waits:
            return False
        waits.remove(wait)
        if not waits:
            del self._waits[wait.task_id]
            call = self._rereads.pop(wait.task_id, None)
            if call is not None and call.active():
                call.cancel()
        return True

    @staticmethod
    def _cancel_timer(wait: _Wait) -> None:
        if wait.timer is not None and wait.timer.active():
            wait.timer.cancel()
        wait.timer = None
