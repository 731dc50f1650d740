# -*- test-case-name: tests.test_mediator -*-
"""
The mediator: from a delivered message to a durable outcome.

For each delivery: decode -> look up the registered task -> check its
arguments -> (re-delay if it is early; settle it from the task's record if
it may not be the only copy) -> before-hooks -> state ``running`` ->
executor -> after-hooks or error-hooks -> outcome.  The outcome is made
durable before the original message is acked: a retry or errored copy is
published with publisher confirms first, so a worker killed at any instant
loses nothing (at-least-once; duplicates are possible).

While a call task runs, :func:`quebert.current_task` tells its function
which task it is (one ``ContextVar`` set per attempt, in the delivery's own
context).

``Mediator`` sends a failed task straight to its errored queue;
:class:`DelayOnErrorMediator` (the default) retries it through the broker's
delay queues with the Cloud Tasks backoff until its attempts and retry
duration are spent.

Extension points for subclasses: ``before_task``, ``after_task``,
``task_failed`` (hooks, may return Deferreds), ``on_failure`` (choose
retry or fail), ``policy_for`` (the retry policy of a task) and
``timeout_for``.  Hooks may also be given as :class:`Hook` objects.

Kept apart, so that this module is the path: :mod:`quebert._intake` (which
deliveries start now, control commands, the drain at shutdown; the base
class), :mod:`quebert._redelivery` (which copy of a task runs: redelivered,
parked, duplicate), :mod:`quebert._republish` (what the retry, errored and
re-delayed copies carry), :mod:`quebert._url_task` (a URL task's request)
and :mod:`quebert._driven` (the coroutine runner).
"""

from __future__ import annotations

import collections
import os
import socket
import warnings
from typing import Any, Iterable, Mapping, Optional

import attrs
from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from quebert import protocol
from quebert._intake import Intake
from quebert._redelivery import Redelivery
from quebert._republish import delayed_copy, error_info, errored_copy, refused_copy, retry_copy
from quebert._url_task import DEFAULT_DISPATCH_DEADLINE, URL_DEFINITION, dispatch
from quebert.current import running_task
from quebert.errors import (
    DispatchError,
    InvalidMessage,
    InvalidResult,
    QuebertError,
    ReactorStalled,
    Reject,
    WorkerLost,
)
from quebert.protocol import (
    H_ATTEMPT_BASE,
    H_ATTEMPTS,
    H_ERROR_TYPE,
    H_FIRST_ATTEMPT,
    H_NOT_BEFORE,
    H_PARKED,
    URL,
    TaskMessage,
)
from quebert.registry import Registry, TaskDefinition, default_registry
from quebert.results import check_result
from quebert.retry import RetryPolicy
from quebert.state.interface import CANCELED, DUPLICATE, FAILED, SCHEDULED, SUCCEEDED
from quebert.stats import TaskStats

log = Logger(namespace="quebert.mediator")

#: A task arriving this many seconds or more before its due time is delayed again.
EARLY_TOLERANCE = 1.0

_CONTEXT_RENAMED = ("Task.context is deprecated: use Task.scratch, the same dict (the "
                    "producer's context is task.message.context)")

#: Makes a call task the running one for ``quebert.current_task()``.
_set_running = running_task.set


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@attrs.define(eq=False)
class Task:
    """What hooks and subclasses see of a task being run."""

    id: str
    name: str
    queue: str
    args: tuple
    kwargs: dict
    attempt: int
    message: TaskMessage
    definition: TaskDefinition
    policy: RetryPolicy
    first_attempt_at: float
    started_at: float
    delivery: Any = attrs.field(repr=False)
    #: Scratch space for the hooks and mediator methods of this attempt, to
    #: share data between them (a start time, a tracing span).  Not the
    #: producer's context: that is ``message.context`` (what the task's
    #: function reads as ``current_task().context``).
    scratch: dict = attrs.field(factory=dict)
    #: The metadata the state store keeps (``TaskMessage.info()``).
    info: dict = attrs.field(
        default=attrs.Factory(lambda self: self.message.info(), takes_self=True), repr=False)
    #: Set when the task was canceled while this attempt ran.
    canceled: bool = False
    #: Attempts made before the task was requeued by hand: its retry
    #: budget counts from there.
    attempt_base: int = 0
    #: The running attempt's Deferred (cancelled to cancel the task).
    running: Optional[defer.Deferred] = attrs.field(default=None, repr=False)
    #: Other deliveries of this task met while the attempt ran (a
    #: redelivery after a reconnect, a copy parked by another worker): the
    #: attempt's outcome settles them too.
    copies: Optional[list] = attrs.field(default=None, repr=False)

    def ack(self) -> None:
        """Ack the delivery this attempt started from and every copy met meanwhile."""
        self.delivery.ack()
        if self.copies:
            for copy in self.copies:
                copy.ack()

    @property
    def context(self) -> dict:
        """
        Deprecated alias of :attr:`scratch` (same dict), renamed because
        it was taken for the producer's context.
        """
        warnings.warn(_CONTEXT_RENAMED, DeprecationWarning, stacklevel=2)
        return self.scratch

    @context.setter
    def context(self, value: dict) -> None:
        warnings.warn(_CONTEXT_RENAMED, DeprecationWarning, stacklevel=2)
        self.scratch = value


class Hook:
    """
    A no-op base class for mediator hooks; override what you need.

    Before-hooks run in order, after- and error-hooks in reverse order.
    Any method may return a Deferred.  ``before`` returning ``False`` skips
    the task: it is acked and recorded ``canceled``.  A hook that raises is
    logged with the task id and otherwise ignored.
    """

    def before(self, task: Task) -> Any:
        return None

    def after(self, task: Task, result: Any) -> Any:
        return None

    def error(self, task: Task, failure: Failure) -> Any:
        return None


@attrs.frozen
class QueueSettings:
    """Per-queue settings: concurrency (prefetch), retry and timeout defaults."""

    name: str
    concurrency: int = 10
    retry: RetryPolicy = attrs.field(factory=RetryPolicy)
    timeout: Optional[float] = None
    #: URL tasks: seconds a request may take (``None``: the default, 10 minutes).
    dispatch_deadline: Optional[float] = None


def _waited(message: TaskMessage, attempt: int, now: float) -> Optional[float]:
    """
    Seconds a first attempt waited in its queue: since it was published, or
    since its ETA; ``None`` for a retry (its wait is its backoff) or when
    the producer gave no time.
    """
    if attempt != 1 or message.created_at is None:
        return None
    ready = message.created_at if message.eta is None else max(message.created_at, message.eta)
    return now - ready


class Mediator(Intake):
    """
    Runs deliveries through hooks and the executor to a durable outcome.

    On failure the task goes to its errored queue; see
    :class:`DelayOnErrorMediator` for retries.
    """

    def __init__(self, *, broker: Any, state: Any, executor: Any, clock: Any,
                 queues: Iterable[QueueSettings], registry: Optional[Registry] = None,
                 max_running_tasks: int = 100, worker_id: Optional[str] = None,
                 hooks: Iterable[Hook] = (), max_message_size: int = 1024 * 1024,
                 task_log_level: LogLevel = LogLevel.info, dispatcher: Any = None,
                 max_result_size: int = 1024 * 1024) -> None:
        super().__init__()
        self.broker = broker
        self.state = state
        self.executor = executor
        self.clock = clock
        self.registry = registry if registry is not None else default_registry
        self.queues = {q.name: q for q in queues}
        self.max_running_tasks = max_running_tasks
        self.worker_id = worker_id or default_worker_id()
        self.hooks = list(hooks)
        self.max_message_size = max_message_size
        #: Largest result kept, in bytes of JSON (0: no limit); see :func:`check_result`.
        self.max_result_size = max_result_size
        self.task_log_level = task_log_level  # (sets _info_logged)
        #: Tasks currently in the executor, by id.
        self.running: dict[str, Task] = {}
        self.counts: collections.Counter = collections.Counter()
        #: Per-task figures: outcomes per task name and queue, run and wait times.
        self.stats = TaskStats()
        self._before_hooks, self._after_hooks, self._error_hooks = self._hook_chains()
        self._policies: dict[tuple, RetryPolicy] = {}
        #: Makes URL tasks' requests (:class:`quebert.dispatch.URLDispatcher`).
        self.dispatcher = dispatcher
        #: Which copy of a task runs (redelivered, parked, duplicate ones).
        self._redelivery = Redelivery(self)

    @property
    def task_log_level(self) -> LogLevel:
        """Least level of the per-task log lines (started, succeeded...)."""
        return self._task_log_level

    @task_log_level.setter
    def task_log_level(self, level: LogLevel) -> None:
        self._task_log_level = level
        # LogLevel comparisons are slow: the common check, made once
        self._info_logged = not LogLevel.info < level

    # -- the path of one task -------------------------------------------

    async def handle(self, delivery: Any) -> None:
        """Take one delivery all the way to an acked, recorded outcome."""
        now = self.clock.seconds()
        message = None
        try:
            message = protocol.decode(delivery.body, delivery.content_type,
                                      default_queue=delivery.queue,
                                      max_size=self.max_message_size)
            if message.kind == URL:
                if self.dispatcher is None:
                    raise InvalidMessage("this worker is not set up to run URL tasks",
                                         field="kind", task_id=message.id)
                definition = URL_DEFINITION
            else:
                definition = self.registry.get(message.task, message.id)
                if definition.name != message.task:
                    # An alias (a legacy name): the task is known by its own name.
                    message = attrs.evolve(message, task=definition.name)
                definition.bind(message.args, message.kwargs, message.id)
        except InvalidMessage as e:
            await self.reject(delivery, e, message)
            return
        if message.queue != delivery.queue:
            # The queue it came from rules: retries, errored copy, settings.
            message = attrs.evolve(message, queue=delivery.queue)

        headers = delivery.headers or {}
        previous = headers.get(H_ATTEMPTS)
        if previous.__class__ is not int or previous < 0:  # (a first attempt: 0)
            previous = protocol.int_header(headers, H_ATTEMPTS)
        first_attempt_at = (protocol.time_header(headers, H_FIRST_ATTEMPT)
                            if H_FIRST_ATTEMPT in headers else None)
        policy = self.policy_for(message, definition)

        not_before = (protocol.time_header(headers, H_NOT_BEFORE)
                      if H_NOT_BEFORE in headers else None) or message.eta
        if not_before is not None and not_before - now >= EARLY_TOLERANCE:
            await self._delay(delivery, message, not_before - now, {})
            return

        waiting = self._redelivery.claim(delivery, message.id)
        if waiting is not None and not await waiting:
            return  # a copy of the attempt running here: settled with it
        try:
            await self._handle_claimed(delivery, message, definition, headers, previous,
                                       first_attempt_at, policy, now)
        finally:
            self._redelivery.release(message.id)

    async def _handle_claimed(self, delivery: Any, message: TaskMessage,
                              definition: TaskDefinition, headers: Mapping[str, Any],
                              previous: int, first_attempt_at: Optional[float],
                              policy: RetryPolicy, now: float) -> None:
        """``handle()``, once this delivery is the only copy of its task here."""
        parks = protocol.int_header(headers, H_PARKED)
        if (delivery.redelivered or delivery.delivery_count or parks) and \
                await self._redelivery.settle(delivery, message, definition, policy,
                                              previous, first_attempt_at, parks, now):
            return

        if self._canceled and message.id in self._canceled:
            await self._canceled_before_start(delivery, message, previous)
            return

        attempt = previous + 1
        task = Task(
            id=message.id, name=message.task, queue=delivery.queue, args=message.args,
            kwargs=dict(message.kwargs), attempt=attempt, message=message,
            definition=definition, policy=policy,
            first_attempt_at=first_attempt_at or now, started_at=now, delivery=delivery,
            info=message.info(),
        )
        # In this delivery's own context (see Driven): the task's function
        # and the hooks around it see it, nothing else does.  A URL task runs
        # no function of ours: None, not whatever this context was copied with.
        _set_running(task if definition is not URL_DEFINITION else None)
        if self._before_hooks and not await self._run_before_hooks(task):
            await self.state.finished(task.id, CANCELED, attempt - 1, task.info,
                                      self.clock.seconds(), reason="skipped by a before-hook")
            delivery.ack()
            self._log(task, "task {task_id} ({task}) skipped by a before-hook")
            self.counts["skipped"] += 1
            return

        if H_ATTEMPT_BASE in headers:
            task.attempt_base = protocol.int_header(headers, H_ATTEMPT_BASE)
        started = await self.state.started(task.id, attempt, self.worker_id, task.info, now)
        if started is not None:
            if started == CANCELED:
                delivery.ack()
                self.counts["canceled"] += 1
                self._log(task, "task {task_id} ({task}) was canceled; not running it")
                return
            if started == DUPLICATE:
                await self._redelivery.settle_duplicate(
                    delivery, message, definition, policy, previous, first_attempt_at, parks,
                    now)
                return
        if self._info_logged:
            self._log(task, "task {task_id} ({task}) attempt {attempt} started")
        self.stats.started(task.name, task.queue, _waited(message, attempt, now))
        self.running[task.id] = task
        self._redelivery.release(task.id)
        try:
            await self._run(task)
        except BaseException:
            if task.copies:
                # Its outcome could not be settled: the copies go back too
                # (the delivery it started from is returned by _unexpected).
                for copy in task.copies:
                    self.clock.callLater(self.unexpected_error_delay, copy.nack, True)
            raise
        finally:
            self.running.pop(task.id, None)

    async def _run(self, task: Task) -> None:
        """Run one attempt and settle it (with every copy met meanwhile)."""
        try:
            if task.message.kind == URL:
                task.running = dispatch(self.dispatcher, task, self.timeout_for(task))
            else:
                task.running = self.executor.run(task.definition, task.args, task.kwargs,
                                                 self.timeout_for(task))
            result = await task.running
        except BaseException as e:
            if not isinstance(e, (Exception, defer.CancelledError)):
                raise
            failure = Failure()
        else:
            failure = None
        task.running = None
        if failure is None and result is not None and task.message.kind != URL:
            try:
                check_result(result, self.max_result_size, task.name)
            except InvalidResult:
                failure = Failure()

        if task.canceled and failure is not None:
            await self._canceled_while_running(task)
            return
        if failure is None:
            if task.message.kind == URL:
                result = result.to_record()
            if self._after_hooks:
                await self._run_after_hooks(task, result)
            await self.state.finished(task.id, SUCCEEDED, task.attempt, task.info,
                                      self.clock.seconds(), result=result)
            task.ack()
            self.counts["succeeded"] += 1
            self.stats.ended(task.name, task.queue, SUCCEEDED,
                             self.clock.seconds() - task.started_at)
            if self._info_logged:
                self._log(task, "task {task_id} ({task}) succeeded on attempt {attempt} "
                          "in {duration:.3f}s", duration=self.clock.seconds() - task.started_at)
        else:
            await self._run_error_hooks(task, failure)
            await self.on_failure(task, failure)

    async def _canceled_before_start(self, delivery: Any, message: TaskMessage,
                                     previous: int) -> None:
        await self.state.finished(message.id, CANCELED, previous, message.info(),
                                  self.clock.seconds(), reason="canceled before it started")
        delivery.ack()
        self.counts["canceled"] += 1
        self.stats.ended(message.task, delivery.queue, CANCELED)
        log.info("task {task_id} ({task}) was canceled; not running it", task_id=message.id,
                 task=message.task)

    async def _canceled_while_running(self, task: Task) -> None:
        await self.state.finished(task.id, CANCELED, task.attempt, task.info,
                                  self.clock.seconds(),
                                  reason=f"canceled while attempt {task.attempt} ran")
        task.ack()
        self.counts["canceled"] += 1
        self.stats.ended(task.name, task.queue, CANCELED, self.clock.seconds() - task.started_at)
        self._log(task, "task {task_id} ({task}) canceled during attempt {attempt}",
                  level=LogLevel.warn)

    # -- extension points ------------------------------------------------

    def policy_for(self, message: TaskMessage, definition: TaskDefinition) -> RetryPolicy:
        """Queue default, overridden by the task's, overridden by the message's."""
        key = (message.queue, definition.name,
               tuple(sorted(message.retry.items())) if message.retry else ())
        policy = self._policies.get(key)
        if policy is None:
            policy = self._policies[key] = self._make_policy(message, definition)
            if len(self._policies) > 10000:
                self._policies.clear()
        return policy

    def _make_policy(self, message: TaskMessage, definition: TaskDefinition) -> RetryPolicy:
        settings = self.queues.get(message.queue)
        base = settings.retry if settings is not None else RetryPolicy()
        try:
            return base.replace(**definition.retry).replace(**message.retry)
        except QuebertError as e:
            log.warn("task {task_id}: bad retry options ({error}); using queue defaults",
                     task_id=message.id, error=e)
            return base

    def timeout_for(self, task: Task) -> Optional[float]:
        """
        Seconds an attempt may run: message, then task, then queue.  For a
        URL task, its dispatch deadline: message, then queue, then 10 minutes.
        """
        if task.message.kind == URL:
            settings = self.queues.get(task.queue)
            return (task.message.dispatch_deadline
                    or (settings.dispatch_deadline if settings is not None else None)
                    or DEFAULT_DISPATCH_DEADLINE)
        if task.message.timeout:
            return task.message.timeout
        if task.definition.timeout:
            return task.definition.timeout
        settings = self.queues.get(task.queue)
        return settings.timeout if settings is not None else None

    def before_task(self, task: Task) -> Any:
        """Hook: before a task runs.  Return ``False`` to skip it."""
        return None

    def after_task(self, task: Task, result: Any) -> Any:
        """Hook: after a task succeeded, with its result."""
        return None

    def task_failed(self, task: Task, failure: Failure) -> Any:
        """Hook: after an attempt failed (before retry or errored)."""
        return None

    async def on_failure(self, task: Task, failure: Failure) -> None:
        """Decide what a failed attempt leads to: here, always the errored queue."""
        await self.fail(task, failure)

    # -- outcomes ----------------------------------------------------------

    async def retry(self, task: Task, failure: Failure, delay: float) -> None:
        """Publish a delayed copy (confirmed), record ``scheduled``, ack."""
        error = error_info(failure)
        body, headers, content_type = retry_copy(task, failure, error)
        await self.broker.publish(task.queue, body, headers, message_id=task.id,
                                  content_type=content_type, delay=delay)
        now = self.clock.seconds()
        await self.state.finished(task.id, SCHEDULED, task.attempt, task.info, now,
                                  error=error, retry_at=now + delay)
        task.ack()
        self.counts["retried"] += 1
        self.stats.ended(task.name, task.queue, "retried", now - task.started_at)
        self._log(task, "task {task_id} ({task}) attempt {attempt} failed: {error}; "
                  "retry in {delay:.3f}s", error=error["message"] or error["type"],
                  delay=delay, level=LogLevel.warn)

    async def fail(self, task: Task, failure: Failure, reason: Optional[str] = None) -> None:
        """Publish an errored copy (confirmed), record ``failed``, ack."""
        error = error_info(failure)
        stalled = isinstance(failure.value, ReactorStalled)
        what = (f"{error['message']} ({error['type']})" if stalled
                else f"attempt {task.attempt} failed with {error['type']}")
        reason = reason or (
            f"{what} and the retry budget ({task.policy.max_attempts} attempts) is spent"
            if task.policy.max_attempts != -1 or task.policy.max_retry_duration
            else error["message"] if stalled else f"attempt {task.attempt} failed"
        )
        body, headers, content_type = errored_copy(task, failure, error, reason)
        await self.broker.publish_errored(task.queue, body, headers, message_id=task.id,
                                          content_type=content_type)
        await self.state.finished(task.id, FAILED, task.attempt, task.info,
                                  self.clock.seconds(), error=error, reason=reason)
        task.ack()
        self.counts["failed"] += 1
        self.stats.ended(task.name, task.queue, FAILED, self.clock.seconds() - task.started_at)
        self._log(task, "task {task_id} ({task}) failed for good after attempt {attempt}: "
                  "{reason}", reason=reason, level=LogLevel.error)

    async def reject(self, delivery: Any, error: InvalidMessage,
                     message: Optional[TaskMessage] = None) -> None:
        """
        A message that can never run: errored queue with the reason, state
        ``failed`` when it has an id, ack.  Logged once.  ``message`` is the
        decoded message when decoding succeeded (and the task was refused
        after): a guillotina_amqp body's copy is then its version-1 body.
        """
        reason = error.reason
        body, headers, content_type = refused_copy(delivery, error, message)
        task_id = error.task_id or delivery.message_id
        await self.broker.publish_errored(delivery.queue, body, headers, message_id=task_id,
                                          content_type=content_type)
        if error.task_id:
            info = {"queue": delivery.queue}
            await self.state.finished(
                error.task_id, FAILED, protocol.int_header(headers, H_ATTEMPTS), info,
                self.clock.seconds(),
                error={"type": headers[H_ERROR_TYPE], "message": reason, "traceback": None,
                       "field": error.field},
                reason=reason,
            )
        delivery.ack()
        self.counts["rejected"] += 1
        self.stats.ended(message.task if message is not None else "(invalid)", delivery.queue,
                         FAILED)
        log.error("message {message_id} from {queue} refused: {reason}",
                  message_id=task_id, queue=delivery.queue, reason=reason, field=error.field)

    async def _delay(self, delivery: Any, message: TaskMessage, delay: float,
                     extra: dict) -> None:
        body, headers, content_type = delayed_copy(delivery, message, extra,
                                                   self.clock.seconds() + delay)
        await self.broker.publish(delivery.queue, body, headers, message_id=message.id,
                                  content_type=content_type, delay=delay)
        delivery.ack()

    async def _worker_lost(self, delivery: Any, message: TaskMessage,
                           definition: TaskDefinition, policy: RetryPolicy, attempts: int,
                           first_attempt_at: float, stalled: Optional[dict] = None) -> None:
        """
        Attempt ``attempts`` was lost with its worker (``stalled``: the
        watchdog's mark when it was killed for stalling its reactor): it
        counts as a failed attempt, through ``on_failure``.  Called by
        :meth:`Redelivery.settle <quebert._redelivery.Redelivery.settle>`.
        """
        task = Task(
            id=message.id, name=message.task, queue=delivery.queue, args=message.args,
            kwargs=dict(message.kwargs), attempt=attempts, message=message,
            definition=definition, policy=policy, first_attempt_at=first_attempt_at,
            started_at=self.clock.seconds(), delivery=delivery,
        )
        task.attempt_base = protocol.int_header(delivery.headers, H_ATTEMPT_BASE)
        if stalled is not None:
            failure = Failure(ReactorStalled(attempts, stalled["for"], stalled.get("culprit")))
            log.warn("task {task_id} ({task}) redelivered: {error}", task_id=task.id,
                     task=task.name, attempt=attempts, error=failure.value)
        else:
            failure = Failure(WorkerLost(
                f"the worker running attempt {attempts} was lost (killed, crashed or stalled)"
            ))
            log.warn("task {task_id} ({task}) redelivered: attempt {attempt} was lost with "
                     "its worker", task_id=task.id, task=task.name, attempt=attempts)
        await self.on_failure(task, failure)

    # -- hooks -------------------------------------------------------------

    async def _call_hook(self, what: str, task: Task, fn: Any, *args: Any) -> Any:
        try:
            return await defer.maybeDeferred(fn, task, *args)
        except Exception:
            log.failure("{what}-hook {hook!r} failed for task {task_id}", what=what,
                        hook=fn, task_id=task.id)
            return None

    def _hook_chains(self) -> tuple[list, list, list]:
        """The hook callables, in order; no-op defaults left out."""
        def overridden(name: str) -> bool:
            return getattr(type(self), name) is not getattr(Mediator, name)

        def hooked(hook: Hook, name: str) -> bool:
            return getattr(type(hook), name) is not getattr(Hook, name)

        before = ([self.before_task] if overridden("before_task") else []) + [
            h.before for h in self.hooks if hooked(h, "before")]
        after = [h.after for h in reversed(self.hooks) if hooked(h, "after")] + (
            [self.after_task] if overridden("after_task") else [])
        error = [h.error for h in reversed(self.hooks) if hooked(h, "error")] + (
            [self.task_failed] if overridden("task_failed") else [])
        return before, after, error

    async def _run_before_hooks(self, task: Task) -> bool:
        for fn in self._before_hooks:
            if await self._call_hook("before", task, fn) is False:
                return False
        return True

    async def _run_after_hooks(self, task: Task, result: Any) -> None:
        for fn in self._after_hooks:
            await self._call_hook("after", task, fn, result)

    async def _run_error_hooks(self, task: Task, failure: Failure) -> None:
        for fn in self._error_hooks:
            await self._call_hook("error", task, fn, failure)

    # -- logging -------------------------------------------------------------

    def _log(self, task: Task, fmt: str, level: LogLevel = LogLevel.info, **kw: Any) -> None:
        if level is LogLevel.info:
            if not self._info_logged:
                return
        elif level < self._task_log_level:
            return
        log.emit(level, fmt, task_id=task.id, task=task.name, attempt=task.attempt,
                 queue=task.queue, **kw)


class DelayOnErrorMediator(Mediator):
    """
    Retries failed attempts through the broker's delay queues with the
    Cloud Tasks backoff, until both the attempt limit and the retry
    duration are spent; then the errored queue.

    A task that raises :class:`~quebert.errors.Reject` (a refused URL
    among them) fails at once.  A URL task whose server answered 429 or 503
    with a longer ``Retry-After`` than the backoff waits that long instead.
    """

    async def on_failure(self, task: Task, failure: Failure) -> None:
        now = self.clock.seconds()
        if isinstance(failure.value, Reject):
            await self.fail(task, failure, reason=str(failure.value))
        elif task.policy.should_retry(task.attempt - task.attempt_base, task.first_attempt_at,
                                      now):
            delay = task.policy.delay(task.attempt - task.attempt_base)
            retry_after = getattr(failure.value, "retry_after", None)
            if isinstance(failure.value, DispatchError) and retry_after and retry_after > delay:
                delay = retry_after
            await self.retry(task, failure, delay)
        else:
            await self.fail(task, failure)
