# -*- test-case-name: tests.test_state_resilient -*-
"""
A state manager that keeps tasks running while the state store is down.

Losing Redis must not stop task execution (DESIGN, "State").  This wrapper
writes through to another :class:`IStateManager` while it is healthy.  When
a write fails it turns *unhealthy*, logs one warning, and from then on
queues every write in a single FIFO; a drain loop retries the oldest write
with exponential backoff on the given clock and, once the store takes it,
replays the rest in order and turns healthy again.  One global order (not
one per task) means a retried ``started`` can never land after the
``finished`` of the same attempt.

While healthy, writes of different tasks go out concurrently, but a write
waits for the previous write of the *same* task to settle, so that the
order of a task's writes never depends on the transport; if that previous
write fails, the waiting ones are queued behind it.

Callers wait for a write only while it can succeed quickly:

* healthy: the Deferred fires once the write is durable; ``started`` waits
  at most ``start_wait`` seconds, then fires and the write carries on (and
  is queued if it fails), so a slow store delays a task by a bounded time;
* unhealthy: the write is queued and the Deferred fires at once.

Memory is bounded: past ``max_pending`` queued writes the oldest ones are
dropped (and counted in ``dropped``), with an error in the log.  Reads are
passed through; they fail with :class:`StateError` while the store is down.

Arguments are checked before anything is queued, so a malformed write fails
its caller at once instead of blocking the queue forever.  An inner store
that prepares writes (:class:`~quebert.state.redis.RedisStateManager`) checks
and encodes each one once, up front; the prepared form is what is sent,
queued and replayed.  A write the store
rejects with ``ValueError`` or ``TypeError`` is a bug, not an outage: its
caller gets the error (or, when replaying, it is logged and dropped).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Tuple

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from quebert.errors import ConfigurationError, StateError, TaskAlreadyExists
from quebert.state import _records
from quebert.state.interface import IStateManager

log = Logger(namespace="quebert.state.resilient")

#: Seconds between two retries of the oldest queued write, at most: once
#: Redis is back, the replay starts within this long (with 30 s, a worker
#: could wait up to 30 s after a long outage to bring its records up to date).
RETRY_MAX_DELAY = 5.0

#: Failures that mean "this write is wrong", not "the store is down".
_BUGS = (ValueError, TypeError)


def _no_jitter() -> float:
    return 0.0


class _Write:
    """
    One state write, from the moment it is asked for until it is durable:
    either a call of the inner store's ``method`` or, when the inner store
    prepares writes (:class:`RedisStateManager`), its prepared ``op``.
    """

    __slots__ = ("seq", "task_id", "method", "args", "kwargs", "op", "waiter", "deadline",
                 "owner")

    def __init__(
        self,
        seq: int,
        task_id: str,
        method: str,
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        op: Any = None,
    ) -> None:
        self.seq = seq
        self.task_id = task_id
        self.method = method
        self.args = args
        self.kwargs = kwargs
        self.op = op
        self.waiter: Optional[Deferred] = None
        self.deadline = 0.0
        self.owner: Any = None

    def release(self, result: Any = None) -> None:
        """Fire the caller's Deferred (once)."""
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.called:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    # the inner store reports a prepared write sent directly like a Deferred
    def callback(self, result: Any) -> None:
        self.owner._sent(result, self)

    def errback(self, failure: Failure) -> None:
        self.owner._send_failed(failure, self)


@implementer(IStateManager)
class ResilientStateManager:
    """
    :class:`IStateManager` around ``inner`` that never lets an unreachable
    store stop task execution (module docstring).

    :param inner: the real state manager.
    :param clock: ``IReactorTime`` for retries and ``start_wait``; the
        global reactor when ``None``.
    :param max_pending: most writes kept while the store is down.
    :param start_wait: seconds a healthy ``started`` may delay its caller.
    :param retry_policy: ``attempt -> seconds`` before retrying the oldest
        queued write (``attempt`` counts failed retries, from 0); by default
        1 s doubling up to ``RETRY_MAX_DELAY`` (5 s).

    ``healthy`` says whether writes go straight to the store, ``pending``
    how many are queued, ``dropped`` how many were given up for good.
    """

    def __init__(
        self,
        inner: Any,
        clock: Optional[IReactorTime] = None,
        max_pending: int = 10000,
        start_wait: float = 2.0,
        retry_policy: Optional[Callable[[int], float]] = None,
    ) -> None:
        if max_pending < 1:
            raise ConfigurationError(f"max_pending must be >= 1, not {max_pending!r}")
        if start_wait < 0:
            raise ConfigurationError(f"start_wait must be >= 0 seconds, not {start_wait!r}")
        self.inner = inner
        self.max_pending = max_pending
        self.start_wait = start_wait
        self.healthy = True
        self.dropped = 0
        self._clock = clock
        self._retry_policy = retry_policy or backoffPolicy(
            initialDelay=1.0, maxDelay=RETRY_MAX_DELAY, factor=2.0, jitter=_no_jitter
        )
        self._seq = 0
        self._queue: Deque[_Write] = deque()  # ordered by seq
        self._inflight = 0  # direct writes on their way, healthy
        # task -> writes behind its in-flight one (None: none yet, the common case)
        self._waiting: Dict[str, Optional[Deque[_Write]]] = {}
        self._replaying: Optional[_Write] = None
        self._draining = False
        self._retry: Optional[IDelayedCall] = None
        self._failures = 0
        self._replayed = 0
        self._dropped_in_outage = 0
        self._flushes: List[Deferred] = []
        self._stopped = False
        # started writes whose caller waits, oldest first, and one timer for
        # the oldest: cheaper than a timer per write
        self._slow: Deque[_Write] = deque()
        self._slow_timer: Optional[IDelayedCall] = None
        # an inner store that checks and encodes a write up front (see
        # RedisStateManager._op_started): each write is checked and
        # normalised once, and the prepared form is its snapshot
        self._prepares = all(
            callable(getattr(inner, name, None))
            for name in ("_op_enqueued", "_op_started", "_op_finished", "_submit")
        )

    @property
    def finished_ttl(self) -> float:
        """The inner store's finished TTL."""
        return self.inner.finished_ttl

    @property
    def pending(self) -> int:
        """Writes queued until the store is back."""
        return len(self._queue)

    # -- IStateManager writers ------------------------------------------

    def enqueued(self, task_id: str, state: str, info: Mapping[str, Any], at: float) -> Deferred:
        """Record a task a producer just published (see :class:`IStateManager`)."""
        if self._prepares:
            try:
                op = self.inner._op_enqueued(task_id, state, info, at)
            except Exception:
                return fail()
            return self._write("enqueued", task_id, (), {}, op=op)
        try:
            _records.check_enqueued(task_id, state, info, at)
        except _BUGS:
            return fail()
        return self._write("enqueued", task_id, (task_id, state, dict(info or {}), at), {})

    def started(
        self, task_id: str, attempt: int, worker: str, info: Mapping[str, Any], at: float
    ) -> Deferred:
        """Record an attempt that starts; waits at most ``start_wait`` seconds."""
        if self._prepares:
            try:
                op = self.inner._op_started(task_id, attempt, worker, info, at)
            except Exception:
                return fail()
            return self._write("started", task_id, (), {}, bounded=True, op=op)
        try:
            _records.check_started(task_id, attempt, worker, info, at)
        except _BUGS:
            return fail()
        args = (task_id, attempt, worker, dict(info or {}), at)
        return self._write("started", task_id, args, {}, bounded=True)

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
        """Record the outcome of an attempt (see :class:`IStateManager`)."""
        if self._prepares:
            try:
                op = self.inner._op_finished(
                    task_id, state, attempt, info, at, result, error, reason, retry_at
                )
            except Exception:
                return fail()
            return self._write("finished", task_id, (), {}, op=op)
        try:
            _records.check_finished(task_id, state, attempt, info, at, error, reason, retry_at)
        except _BUGS:
            return fail()
        # snapshots: a queued write must not see later changes by the caller
        kwargs = {
            "result": _records.json_value(result),
            "error": dict(error) if error is not None else None,
            "reason": reason,
            "retry_at": retry_at,
        }
        args = (task_id, state, attempt, dict(info or {}), at)
        return self._write("finished", task_id, args, kwargs)

    # -- operations that are answered, not queued --------------------------

    def claim(self, task_id: str, state: str, info: Mapping[str, Any], at: float) -> Deferred:
        """The inner store's ``claim``: a name can only be checked with the store up."""
        return maybeDeferred(self.inner.claim, task_id, state, info, at).addErrback(
            self._read_failed)

    def release_name(self, task_id: str, name: str, at: float) -> Deferred:
        """The inner store's ``release_name``."""
        return maybeDeferred(self.inner.release_name, task_id, name, at).addErrback(
            self._read_failed)

    def cancel(self, task_id: str, at: float, reason: Optional[str] = None) -> Deferred:
        """The inner store's ``cancel``: the answer says what happened, so it is not queued."""
        return maybeDeferred(self.inner.cancel, task_id, at, reason).addErrback(
            self._read_failed)

    def requeued(self, task_id: str, at: float) -> Deferred:
        """The inner store's ``requeued``."""
        return maybeDeferred(self.inner.requeued, task_id, at).addErrback(self._read_failed)

    def set_paused(self, queue: str, paused: bool) -> Deferred:
        """The inner store's ``set_paused``."""
        return maybeDeferred(self.inner.set_paused, queue, paused).addErrback(
            self._read_failed)

    def worker_beat(self, worker: str, ttl: float,
                    description: Optional[Mapping[str, Any]] = None) -> Deferred:
        """The inner store's ``worker_beat``."""
        args = (worker, ttl) if description is None else (worker, ttl, description)
        return maybeDeferred(self.inner.worker_beat, *args).addErrback(self._read_failed)

    def find(self, task: str, state: Optional[str] = None, queue: Optional[str] = None,
             limit: int = 100, position: int = 0) -> Deferred:
        """The inner store's ``find``."""
        d = maybeDeferred(self.inner.find, task, state=state, queue=queue, limit=limit,
                          position=position)
        return d.addErrback(self._read_failed)

    def workers(self) -> Deferred:
        """The inner store's live workers."""
        return maybeDeferred(self.inner.workers).addErrback(self._read_failed)

    def counts(self) -> Deferred:
        """The inner store's counts per state."""
        return maybeDeferred(self.inner.counts).addErrback(self._read_failed)

    def worker_alive(self, worker: str) -> Deferred:
        """The inner store's ``worker_alive``."""
        return maybeDeferred(self.inner.worker_alive, worker).addErrback(self._read_failed)

    def paused_queues(self) -> Deferred:
        """The inner store's ``paused_queues``."""
        return maybeDeferred(self.inner.paused_queues).addErrback(self._read_failed)

    # -- reads ----------------------------------------------------------

    def watch_settled(self, on_settled: Any, on_subscribed: Any) -> Any:
        """The inner store's feed of settled tasks (:class:`ISettledFeed`)."""
        return self.inner.watch_settled(on_settled, on_subscribed)

    def get(self, task_id: str) -> Deferred:
        """The inner store's record; ``StateError`` when it cannot be read."""
        return maybeDeferred(self.inner.get, task_id).addErrback(self._read_failed)

    def list(
        self,
        state: Optional[str] = None,
        queue: Optional[str] = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Deferred:
        """The inner store's records; ``StateError`` when they cannot be read."""
        d = maybeDeferred(self.inner.list, state=state, queue=queue, limit=limit, offset=offset)
        return d.addErrback(self._read_failed)

    @staticmethod
    def _read_failed(failure: Failure) -> Failure:
        if failure.check(StateError, CancelledError, TaskAlreadyExists, *_BUGS):
            return failure
        error = failure.value
        raise StateError(f"state store read failed: {type(error).__name__}: {error}") from error

    # -- lifecycle ------------------------------------------------------

    def flush(self) -> Deferred:
        """
        A Deferred that fires when every write so far is durable (or
        dropped), for a clean shutdown.  It never fires while the store
        stays down: bound it with a timeout (cancelling it is fine).
        """
        if self._idle():
            return succeed(None)

        def cancel(d: Deferred) -> None:
            if d in self._flushes:
                self._flushes.remove(d)

        d = Deferred(cancel)
        self._flushes.append(d)
        return d

    def stop(self) -> None:
        """
        Cancel every timer: the retry of the queue (nothing is retried
        afterwards) and the ``start_wait`` of ``started`` writes (their
        callers are released).  Pending ``flush()`` calls fail with
        ``StateError`` if writes are still queued.
        """
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._slow_timer is not None:
            if self._slow_timer.active():
                self._slow_timer.cancel()
            self._slow_timer = None
        slow, self._slow = self._slow, deque()
        for write in slow:
            write.release()
        if self._queue:
            flushes, self._flushes = self._flushes, []
            for d in flushes:
                d.errback(StateError(f"stopped with {len(self._queue)} state writes not saved"))

    # -- writing --------------------------------------------------------

    def _timers(self) -> IReactorTime:
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor  # type: ignore[assignment]
        return self._clock  # type: ignore[return-value]

    def _write(
        self,
        method: str,
        task_id: str,
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        bounded: bool = False,
        op: Any = None,
    ) -> Deferred:
        self._seq += 1
        write = _Write(self._seq, task_id, method, args, kwargs, op)
        waiter = write.waiter = Deferred()
        if not self.healthy:
            self._enqueue(write)
            write.release()
            return waiter
        if bounded and self.start_wait <= 0:
            write.release()
            bounded = False
        waiting = self._waiting
        if task_id in waiting:
            behind = waiting[task_id]
            if behind is None:
                behind = waiting[task_id] = deque()
            behind.append(write)
        else:
            waiting[task_id] = None
            self._send(write)
        if bounded and write.waiter is not None:
            self._wait_for(write)
        return waiter

    def _wait_for(self, write: _Write) -> None:
        """Release the caller of ``write`` after ``start_wait`` if still waiting."""
        clock = self._clock or self._timers()
        write.deadline = clock.seconds() + self.start_wait
        self._slow.append(write)
        if self._slow_timer is None:
            self._slow_timer = clock.callLater(self.start_wait, self._slow_due)

    def _slow_due(self) -> None:
        """The oldest waiting started is due: release every caller that waited enough."""
        self._slow_timer = None
        clock = self._timers()
        now = clock.seconds()
        slow = self._slow
        while slow:
            write = slow[0]
            if write.waiter is not None:
                left = write.deadline - now
                if left > 1e-9:
                    if self._slow_timer is None:  # (a caller may have armed it)
                        self._slow_timer = clock.callLater(left, self._slow_due)
                    return
                slow.popleft()
                write.release()  # its caller may start another write
            else:
                slow.popleft()

    def _trim_slow(self) -> None:
        """Forget released writes at the head of ``_slow``; no timer when none waits."""
        slow = self._slow
        while slow and slow[0].waiter is None:
            slow.popleft()
        if not slow and self._slow_timer is not None:
            if self._slow_timer.active():
                self._slow_timer.cancel()
            self._slow_timer = None

    def _call(self, write: _Write) -> Deferred:
        """The inner store's Deferred for ``write``."""
        if write.op is not None:
            # one at a time: an outcome must not wait for company that cannot come
            return self.inner._submit(write.op, linger=False)
        return maybeDeferred(getattr(self.inner, write.method), *write.args, **write.kwargs)

    def _send(self, write: _Write) -> None:
        """Write straight to the store (healthy)."""
        self._inflight += 1
        if write.op is not None:
            # the store reports to write.callback / write.errback
            write.owner = self
            self.inner._submit(write.op, write)
        else:
            d = maybeDeferred(getattr(self.inner, write.method), *write.args, **write.kwargs)
            d.addCallbacks(self._sent, self._send_failed, (write,), None, (write,))

    def _sent(self, result: Any, write: _Write) -> None:
        self._inflight -= 1
        # the next write of the task goes first: one its caller makes once
        # released is then sent at once, not queued behind this one
        waiting = self._waiting.pop(write.task_id, None)
        if waiting:
            self._waiting[write.task_id] = waiting
            self._send(waiting.popleft())
        write.release(result)
        if self._slow:
            self._trim_slow()
        if self._flushes or not self.healthy:
            self._settled()

    def _send_failed(self, failure: Failure, write: _Write) -> None:
        self._inflight -= 1
        if failure.check(*_BUGS):
            log.failure(
                "state store refused {method} of task {task_id}",
                failure,
                LogLevel.error,
                method=write.method,
                task_id=write.task_id,
            )
            write.release(failure)
            self._next_of(write.task_id)
        else:
            self._insert(write)
            if self.healthy:
                self._outage(failure)
            self._waiting.pop(write.task_id, None)
            write.release()  # last: its caller may write again at once
        if self._slow:
            self._trim_slow()
        self._settled()

    def _next_of(self, task_id: str) -> None:
        """Send the next write of ``task_id`` that waited behind the one that settled."""
        waiting = self._waiting.get(task_id)
        if waiting:
            self._send(waiting.popleft())
        else:
            self._waiting.pop(task_id, None)

    def _outage(self, failure: Failure) -> None:
        """Turn unhealthy: queue the writes waiting behind in-flight ones, warn once."""
        self.healthy = False
        self._failures = 0
        self._replayed = 0
        self._dropped_in_outage = 0
        held = sorted((w for waiting in self._waiting.values() if waiting for w in waiting),
                      key=_seq)
        for waiting in self._waiting.values():
            if waiting:
                waiting.clear()
        for write in held:
            self._insert(write)
            write.release()
        if self._slow:
            self._trim_slow()
        log.warn(
            "state store unavailable ({error}); tasks keep running and state writes are "
            "queued until it is back ({pending} pending)",
            error=f"{type(failure.value).__name__}: {failure.getErrorMessage()}",
            pending=len(self._queue),
        )
        self._schedule()

    def _insert(self, write: _Write) -> None:
        """Queue ``write`` in sequence order (normally at the end)."""
        position = len(self._queue)
        while position and self._queue[position - 1].seq > write.seq:
            position -= 1
        self._queue.insert(position, write)
        self._bound()

    def _enqueue(self, write: _Write) -> None:
        self._queue.append(write)
        self._bound()

    def _bound(self) -> None:
        """Drop the oldest queued writes past ``max_pending`` (never one being replayed)."""
        excess = len(self._queue) - self.max_pending
        if excess <= 0:
            return
        keep_head = self._replaying is not None and self._queue[0] is self._replaying
        for _ in range(excess):
            if keep_head:
                victim = self._queue[1]
                del self._queue[1]
            else:
                victim = self._queue.popleft()
            victim.release()
        self.dropped += excess
        before = self._dropped_in_outage
        self._dropped_in_outage += excess
        # one error when dropping starts, then one per max_pending more
        if before == 0 or before // self.max_pending != self._dropped_in_outage // self.max_pending:
            log.error(
                "state store unavailable and {max_pending} state writes pending: dropped "
                "the {dropped} oldest so far in this outage; their tasks' records will be "
                "stale",
                max_pending=self.max_pending,
                dropped=self._dropped_in_outage,
            )

    # -- draining -------------------------------------------------------

    def _schedule(self) -> None:
        """Retry the oldest queued write after the backoff delay."""
        if self._stopped or self._retry is not None or self._replaying is not None:
            return
        delay = self._retry_policy(self._failures)
        self._failures += 1
        self._retry = self._timers().callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._drain()

    def _settled(self) -> None:
        """An in-flight write settled: maybe start replaying, maybe fire flushes."""
        if not self.healthy and not self._inflight and self._retry is None:
            # the queue waits for in-flight writes, which may belong before it
            self._drain()
        self._maybe_idle()

    def _drain(self) -> None:
        """Replay queued writes in order, one at a time, until one fails."""
        if self._draining or self._replaying is not None or self._inflight:
            return
        self._draining = True
        try:
            while self._queue and self._replaying is None and self._retry is None:
                write = self._replaying = self._queue[0]
                self._call(write).addBoth(self._replay_done, write)
        finally:
            self._draining = False
        if not self._queue and self._replaying is None and not self.healthy:
            self._recovered()

    def _replay_done(self, outcome: Any, write: _Write) -> None:
        self._replaying = None
        if isinstance(outcome, Failure) and not outcome.check(*_BUGS):
            log.debug(
                "state store still unavailable ({error}); {pending} writes pending",
                error=outcome.getErrorMessage(),
                pending=len(self._queue),
            )
            self._schedule()
            return
        self._queue.popleft()
        if isinstance(outcome, Failure):
            self.dropped += 1
            log.failure(
                "state store refused replayed {method} of task {task_id}; dropped",
                outcome,
                LogLevel.error,
                method=write.method,
                task_id=write.task_id,
            )
        else:
            self._replayed += 1
        self._failures = 0
        if not self._draining:
            self._drain()

    def _recovered(self) -> None:
        self.healthy = True
        self._failures = 0
        log.info(
            "state store available again: replayed {replayed} queued state writes"
            " ({dropped} dropped)",
            replayed=self._replayed,
            dropped=self._dropped_in_outage,
        )
        self._maybe_idle()

    def _idle(self) -> bool:
        return (
            not self._queue
            and not self._inflight
            and self._replaying is None
            and not any(self._waiting.values())
        )

    def _maybe_idle(self) -> None:
        if self._flushes and self._idle():
            flushes, self._flushes = self._flushes, []
            for d in flushes:
                d.callback(None)


def _seq(write: _Write) -> int:
    return write.seq
