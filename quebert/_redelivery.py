# -*- test-case-name: tests.test_mediator.CrashTests,tests.test_mediator.DuplicateTests -*-
"""
Which copy of a task runs, and what becomes of the others.

Delivery is at-least-once, so a task may reach the workers more than
once: redelivered after a worker or its connection died, parked by another
worker, duplicated by the broker (a retry dead-lettered twice across a
node stop) or published twice.  Running every copy would fork the task;
dropping one would lose it.  The rules, applied by one :class:`Redelivery`
per mediator:

- **Here**, one copy of a task at a time goes on towards starting
  (:meth:`~Redelivery.claim`, :meth:`~Redelivery.release`): two copies
  arriving together cannot both start.  A copy met while the attempt runs
  here joins it (``Task.copies``) and is acked with its outcome.
- **Elsewhere**, the task's record decides, for a copy that may not be the
  only one (:meth:`~Redelivery.settle`: redelivered or parked;
  :meth:`~Redelivery.settle_duplicate`: the state store found its attempt
  started already).  The mediator writes ``attempts`` before an attempt
  starts and its outcome before the ack, so the record says whether the
  attempt ended (ack the copy), still runs on a live worker (park the
  copy: a delayed copy, confirmed, then the ack, looked at again once
  that worker's beat would expire), or was lost with its worker (the
  mediator counts it a failed attempt: ``on_failure`` with
  :class:`~quebert.errors.WorkerLost`).

The mediator calls these four methods at fixed points of a task's path and
nothing else; they call back only ``Mediator._worker_lost`` for a lost
attempt.  Their log lines keep the mediator's namespace.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Optional

from twisted.internet import defer
from twisted.logger import Logger

from quebert._republish import parked_copy
from quebert.protocol import TaskMessage
from quebert.registry import TaskDefinition
from quebert.retry import RetryPolicy
from quebert.state.interface import CANCELED, FAILED, RUNNING, SCHEDULED, SUCCEEDED

if TYPE_CHECKING:
    from quebert.mediator import Mediator

__all__ = ["Redelivery", "PARK_MARGIN", "MAX_PARK_DELAY"]

# The lines are about the task's path: an operator filters them with the rest.
log = Logger(namespace="quebert.mediator")

#: Outcomes recorded only after they were made durable on the broker.
_SETTLED = frozenset({SCHEDULED, SUCCEEDED, FAILED, CANCELED})

#: A redelivered task still running on a live worker is looked at again
#: this long after that worker's current beat would expire (at most
#: MAX_PARK_DELAY seconds later).
PARK_MARGIN = 0.5
MAX_PARK_DELAY = 30.0

_NOTHING = object()


class Redelivery:
    """
    The copy rules of one mediator (see the module's docstring).

    The mediator's path calls, in order: :meth:`claim` once a delivery is
    decoded; :meth:`settle` if the delivery may not be the only copy;
    :meth:`settle_duplicate` if recording its attempt says it started
    already; :meth:`release` once the attempt runs (or the copy was
    settled without running).
    """

    def __init__(self, mediator: Mediator) -> None:
        self.mediator = mediator
        # The mediator's dict itself: claim() runs for every delivery.
        self._running = mediator.running
        #: Tasks on their way to starting here, with the copies waiting
        #: behind (``None`` when none waits).
        self.preparing: dict[str, Optional[list[defer.Deferred]]] = {}

    # -- here: one copy at a time -------------------------------------------

    def claim(self, delivery: Any, task_id: str) -> Optional[Awaitable[bool]]:
        """
        Make ``delivery`` the copy of ``task_id`` that goes on here.

        ``None`` when it is, at once (the common case); otherwise an
        awaitable that fires ``True`` once it is, or ``False`` when the
        attempt running here took it as one of its copies (nothing is left
        to do with it).  Once claimed, :meth:`release` must follow.
        """
        if self._running.get(task_id) is None and task_id not in self.preparing:
            self.preparing[task_id] = None
            return None
        return self._claim_later(delivery, task_id)

    async def _claim_later(self, delivery: Any, task_id: str) -> bool:
        while True:
            running = self._running.get(task_id)
            if running is not None and running.delivery is not delivery:
                # Another copy while the attempt runs here: a redelivery after
                # the connection dropped (the first delivery died with its
                # channel), a copy another worker parked meanwhile (both are
                # live), or a duplicate the broker made.  The running
                # attempt's outcome settles every copy.
                log.info("task {task_id}: another copy arrived while its attempt {attempt} "
                         "runs here; that attempt will settle it", task_id=task_id,
                         attempt=running.attempt)
                if running.copies is None:
                    running.copies = [delivery]
                else:
                    running.copies.append(delivery)
                return False
            behind = self.preparing.get(task_id, _NOTHING)
            if behind is _NOTHING:
                break
            # Another copy of this task is on its way to starting here (its
            # state store round trips): look again once it runs or gave up,
            # so that two copies arriving together cannot both start.
            waiter: defer.Deferred = defer.Deferred()
            if behind is None:
                self.preparing[task_id] = [waiter]
            else:
                behind.append(waiter)
            await waiter
        self.preparing[task_id] = None
        return True

    def release(self, task_id: str) -> None:
        """Let the copies waiting behind ``task_id``'s claim look again."""
        behind = self.preparing.pop(task_id, None)
        if behind:
            for waiter in behind:
                waiter.callback(None)

    # -- elsewhere: the record decides ----------------------------------------

    async def settle(self, delivery: Any, message: TaskMessage, definition: TaskDefinition,
                     policy: RetryPolicy, previous: int, first_attempt_at: Optional[float],
                     parks: int, now: float) -> bool:
        """
        For a copy that may not be the only one (redelivered, parked, or
        met as a duplicate by the state store): settle it from the task's
        record when its attempt already ran elsewhere.  ``False`` when this
        copy is the one to run.
        """
        mediator = self.mediator
        lost, settled, first_started, stalled, holder = await self._lost_attempts(
            message, delivery, previous)
        if settled is not None:
            # The attempt's outcome was made durable before its worker
            # died, only the ack was lost (or this is a duplicate of a copy
            # that ran): do not run it again.
            log.info("task {task_id} redelivered after its attempt {attempt} already "
                     "ended {state}; acking the copy", task_id=message.id,
                     attempt=lost, state=settled)
            delivery.ack()
            mediator.counts["redelivered_settled"] += 1
            return True
        if lost > previous:
            alive = await self._still_running(holder) if holder is not None else 0.0
            if alive:
                # Its worker is alive and still runs the attempt: only
                # its broker connection dropped (or the broker made a
                # duplicate).  Counting the attempt lost would fork the
                # task; wait for its outcome.
                await self._park(delivery, message, holder, parks, alive)
                return True
            await mediator._worker_lost(delivery, message, definition, policy, lost,
                                        first_attempt_at or first_started or now,
                                        stalled=stalled)
            return True
        return False

    async def settle_duplicate(self, delivery: Any, message: TaskMessage,
                               definition: TaskDefinition, policy: RetryPolicy, previous: int,
                               first_attempt_at: Optional[float], parks: int,
                               now: float) -> None:
        """
        The state store says attempt ``previous + 1`` already started: this
        delivery is a second copy of the task, not flagged redelivered (a
        retry the broker dead-lettered twice across a node stop, a message
        published twice).  It is settled like a redelivery, from the
        record; running it would make the task two (a fork).
        """
        mediator = self.mediator
        mediator.counts["duplicates"] += 1
        log.info("task {task_id}: a copy of attempt {attempt}, which already started; "
                 "settling it from the state store", task_id=message.id, attempt=previous + 1)
        if await self.settle(delivery, message, definition, policy, previous,
                             first_attempt_at, parks, now):
            return
        # The record moved back meanwhile (expired or deleted): neither copy
        # can be told apart, so this one goes back to its queue for later.
        log.warn("task {task_id}: attempt {attempt} was reported started but its record "
                 "no longer says so; returning the copy in {delay}s", task_id=message.id,
                 attempt=previous + 1, delay=mediator.unexpected_error_delay)
        mediator.clock.callLater(mediator.unexpected_error_delay, delivery.nack, True)

    async def _lost_attempts(self, message: TaskMessage, delivery: Any, previous: int
                             ) -> tuple[int, Optional[str], Optional[float], Optional[dict],
                                        Optional[str]]:
        """
        For a redelivered message: how many attempts were really started,
        the outcome state if the latest one had already ended, when the
        first attempt started (if the store still knows), the watchdog's
        stall mark if the latest attempt's worker was killed for stalling
        its reactor, and the other worker recorded running it (if any).

        The state store knows (``attempts`` is written before an attempt
        starts and its outcome before the ack); when it cannot be reached,
        the redelivery itself is counted, so a task that kills its worker
        still runs out of attempts.
        """
        try:
            record = await self.mediator.state.get(message.id)
        except Exception as e:
            log.warn("task {task_id} redelivered and the state store is unavailable "
                     "({error}); counting the redelivery as a lost attempt",
                     task_id=message.id, error=e)
            return previous + max(1, delivery.delivery_count or 1), None, None, None, None
        if record is None:
            return previous, None, None, None, None
        history = record.get("history") or []
        first = history[0].get("started_at") if history and history[0].get("attempt") == 1 \
            else None
        started = int(record.get("attempts") or 0)
        if started > previous and record.get("state") in _SETTLED:
            return started, record["state"], first, None, None
        stalled = record.get("stalled")
        if not stalled or stalled.get("attempt") != started:
            stalled = None  # a mark left by an earlier attempt
        holder = record.get("worker")
        if record.get("state") != RUNNING or holder == self.mediator.worker_id or stalled:
            holder = None
        return max(previous, started), None, first, stalled, holder

    async def _still_running(self, worker: str) -> float:
        """
        Seconds ``worker``'s last beat in the state store still lasts: more
        than 0 while it is alive; 0 when it is gone or cannot be told.
        """
        alive = getattr(self.mediator.state, "worker_alive", None)
        if alive is None:
            return 0.0
        try:
            return float(await alive(worker))
        except Exception as e:
            log.warn("cannot tell whether worker {worker} is alive ({error}); taking its "
                     "attempt for lost", worker=worker, error=e)
            return 0.0

    async def _park(self, delivery: Any, message: TaskMessage, holder: str,
                    parks: int, beat_left: float) -> None:
        """
        Put a redelivered message aside (a delayed copy, confirmed, then
        the ack) while the live worker ``holder`` finishes the attempt: the
        copy is checked again just after ``holder``'s current beat would
        expire, and acked if the attempt ended, counted as lost if
        ``holder`` stopped beating, put aside again otherwise.
        """
        delay = min(beat_left + PARK_MARGIN, MAX_PARK_DELAY)
        body, headers, content_type = parked_copy(delivery, message, parks)
        await self.mediator.broker.publish(delivery.queue, body, headers, message_id=message.id,
                                           content_type=content_type, delay=delay)
        delivery.ack()
        self.mediator.counts["parked"] += 1
        log.info("task {task_id} redelivered while worker {worker} (alive) still runs it; "
                 "checking again in {delay:g}s", task_id=message.id, worker=holder,
                 delay=delay)
