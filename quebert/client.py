# -*- test-case-name: tests.test_client -*-
"""
Publishing tasks: :class:`Client` and the default client ``@task`` uses.

A client holds one reconnecting AMQP connection, publishes every task with
publisher confirms (the returned Deferred fires once the broker has the
task on disk) and declares the queues it publishes to, so a task sent
before any worker ever ran is kept, not dropped as unroutable.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Mapping, Optional, Union

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from quebert import _default_client, protocol
from quebert.amqp import control
from quebert.amqp.admin import BrokerAdmin, ErroredMessage
from quebert.amqp.broker import AMQPBroker
from quebert.amqp.connection import DEFAULT_AMQP_URL
from quebert.amqp.topology import DEFAULT_DELIVERY_LIMIT, DEFAULT_QUEUE_TYPE, Topology
from quebert.errors import (
    ConfigurationError,
    QuebertError,
    TaskNotFound,
    TaskStateConflict,
)
from quebert.protocol import H_ATTEMPT_BASE, H_ATTEMPTS, H_FIRST_ATTEMPT, H_NOT_BEFORE
from quebert.registry import Registry, TaskFunction, default_registry
from quebert.retry import RETRY_FIELDS
from quebert.state import _records
from quebert.state._records import ARGUMENTS_LIMIT
from quebert.state.interface import FAILED, FINISHED_STATES, QUEUED, SCHEDULED

log = Logger(namespace="quebert.client")


@attrs.frozen
class TaskInfo:
    """What a producer learns about a task it published."""

    id: str
    task: str
    queue: str
    eta: Optional[float] = None
    name: Optional[str] = None
    #: The client that published it, which :meth:`result` waits through.
    _client: Any = attrs.field(default=None, eq=False, repr=False)

    def to_dict(self) -> dict:
        return attrs.asdict(self, filter=lambda a, _: a.name != "_client")

    def result(self, timeout: Optional[float] = None) -> defer.Deferred:
        """
        ``Client.result`` of this task, through the client that published
        it: ``info = await client.add_task(add, 2, 3); await info.result()``.
        """
        if self._client is None:
            raise ConfigurationError("this TaskInfo was not made by a Client; "
                                     "use Client.result(task_id)")
        return self._client.result(self.id, timeout)


def _epoch(eta: Union[float, int, datetime.datetime]) -> float:
    if isinstance(eta, datetime.datetime):
        if eta.tzinfo is None:
            raise ConfigurationError("_eta datetimes must be timezone-aware")
        return eta.timestamp()
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise ConfigurationError(f"_eta must be epoch seconds or a datetime, not {eta!r}")
    return float(eta)


def _check_queue(queue: Any) -> None:
    if not isinstance(queue, str) or not protocol.QUEUE_RE.fullmatch(queue):
        raise ConfigurationError(f"{queue!r} is not a valid queue name "
                                 "(1-100 of A-Z a-z 0-9 _ . : -, not starting with . or :)")


class Client:
    """
    Publishes tasks to RabbitMQ.

    :param amqp_url: where RabbitMQ is.
    :param state: an optional :class:`~quebert.state.IStateManager`; when
        given, tasks are recorded ``queued``/``scheduled`` as they are sent.
    :param queue_type: ``quorum`` (the default) or ``classic``: the type of
        the queues it declares, as the workers' ``--queue-type``; queues that
        exist with another type are used as they are.
    :param delivery_limit: the workers' ``--delivery-limit``.
    :param record_arguments: longest JSON text of a task's arguments (and
        context) its record keeps for people looking at it (the console,
        ``quebert status``); longer ones are kept as a truncated preview,
        0 keeps none.  Only with ``state``.
    :param default_queue: queue for tasks that name none.
    :param url_policy: a :class:`~quebert.dispatch.URLPolicy` URL tasks are
        checked against when they are added (the worker checks again,
        with the network, before every request); the default policy when
        ``None``.

    Unique task names (``_name``/``name``), cancellation, requeueing and
    pausing need ``state``: that is where names are claimed atomically and
    where cancellations are kept for workers that meet the task later.
    """

    def __init__(self, amqp_url: str = DEFAULT_AMQP_URL, *, reactor: Any = None,
                 state: Any = None, exchange: str = "quebert",
                 queue_type: str = DEFAULT_QUEUE_TYPE,
                 default_queue: str = "default", registry: Optional[Registry] = None,
                 url_policy: Any = None,
                 delivery_limit: Optional[int] = DEFAULT_DELIVERY_LIMIT,
                 record_arguments: int = ARGUMENTS_LIMIT) -> None:
        self.topology = Topology(exchange=exchange, queue_type=queue_type,
                                 delivery_limit=delivery_limit)
        _check_queue(default_queue)
        self.broker = AMQPBroker(amqp_url, self.topology, reactor=reactor, consume=False,
                                 name="client")
        self.admin = BrokerAdmin(self.broker.publishing, self.topology)
        if url_policy is None:
            from quebert.dispatch import URLPolicy

            url_policy = URLPolicy()
        self.url_policy = url_policy
        self.reactor = self.broker.reactor
        self.state = state
        self.default_queue = default_queue
        self.registry = registry if registry is not None else default_registry
        self._waiter: Any = None
        self.record_arguments = record_arguments

    def _ensure_started(self) -> None:
        if not self.broker.running:
            self.broker.startService()

    def add_task(self, fn_or_name: Union[str, Callable, TaskFunction], *args: Any,
                 _queue: Optional[str] = None, _countdown: Optional[float] = None,
                 _eta: Any = None, _name: Optional[str] = None,
                 _task_id: Optional[str] = None, _timeout: Optional[float] = None,
                 _retry: Optional[dict] = None, _context: Optional[Mapping[str, Any]] = None,
                 **kwargs: Any) -> defer.Deferred:
        """
        Publish a task; fires with its :class:`TaskInfo` once the broker
        confirmed it.  Options are the ``_``-prefixed keywords; retry
        overrides may also be given one by one (``_max_attempts=3``).
        ``_context`` is plain data about where the task comes from (names to
        JSON scalars, see ``docs/protocol.rst``) that the task reads with
        :func:`quebert.current_task`.  Unserialisable arguments raise
        :class:`SerializationError` here, a bad context
        :class:`~quebert.errors.InvalidMessage`.
        """
        retry = dict(_retry or {})
        for field in RETRY_FIELDS:
            key = f"_{field}"
            if key in kwargs:
                retry[field] = kwargs.pop(key)
        stray = [k for k in kwargs if k.startswith("_")]
        if stray:
            raise ConfigurationError(f"unknown task option(s): {', '.join(sorted(stray))}")
        name, definition = self._resolve(fn_or_name)
        queue = _queue or (definition.queue if definition else None) or self.default_queue
        now = self.reactor.seconds()
        eta = self._eta(_countdown, _eta, now, "_countdown", "_eta")
        message, body = protocol.build(
            name, args, kwargs, queue=queue, task_id=_task_id, eta=eta, name=_name,
            retry=retry, timeout=_timeout, now=now, context=_context,
        )
        return self._publish(message, body, now)

    def add_url_task(self, url: str, *, method: str = "POST",
                     headers: Optional[dict] = None, body: Any = b"",
                     queue: Optional[str] = None, countdown: Optional[float] = None,
                     eta: Any = None, name: Optional[str] = None,
                     task_id: Optional[str] = None, retry: Optional[dict] = None,
                     dispatch_deadline: Optional[float] = None,
                     context: Optional[Mapping[str, Any]] = None,
                     **retry_fields: Any) -> defer.Deferred:
        """
        Publish a URL task: a worker makes this HTTP request, and any 2xx
        answer is success; anything else is retried like a failed call
        task.  ``body`` is bytes, text, or a JSON object/array (sent as
        JSON).  ``context`` travels with the task as for :meth:`add_task`
        (it is not sent to the URL).  Fires with the :class:`TaskInfo`.
        The URL is checked against ``url_policy`` here (raising
        :class:`~quebert.errors.URLRefused`) so that a task that can never
        be sent is refused at once.
        """
        retry = dict(retry or {})
        for key in list(retry_fields):
            if key in RETRY_FIELDS:
                retry[key] = retry_fields.pop(key)
        if retry_fields:
            raise ConfigurationError(
                f"unknown URL task option(s): {', '.join(sorted(retry_fields))}")
        now = self.reactor.seconds()
        when = self._eta(countdown, eta, now, "countdown", "eta")
        message, encoded = protocol.build_url(
            url, method=method, headers=headers, body=body, queue=queue or self.default_queue,
            task_id=task_id, eta=when, name=name, retry=retry,
            dispatch_deadline=dispatch_deadline, now=now, context=context,
        )
        from quebert.dispatch import URLRequest

        self.url_policy.check_request(URLRequest(url=message.url, method=message.method,
                                                 headers=message.headers, body=message.body))
        return self._publish(message, encoded, now)

    @staticmethod
    def _eta(countdown: Any, eta: Any, now: float, countdown_name: str,
             eta_name: str) -> Optional[float]:
        if countdown is not None and eta is not None:
            raise ConfigurationError(f"give either {countdown_name} or {eta_name}, not both")
        if countdown is not None:
            if isinstance(countdown, bool) or not isinstance(countdown, (int, float)) \
                    or countdown < 0:
                raise ConfigurationError(
                    f"{countdown_name} must be seconds >= 0, not {countdown!r}")
            return now + float(countdown)
        if eta is not None:
            return _epoch(eta)
        return None

    def _publish(self, message: protocol.TaskMessage, body: bytes,
                 now: float) -> defer.Deferred:
        if message.name is not None and self.state is None:
            raise ConfigurationError(
                "tasks with a unique name need a state store: Client(..., state=...)")
        delay = max(0.0, message.eta - now) if message.eta is not None else 0.0
        headers: dict[str, Any] = {H_ATTEMPTS: 0}
        if delay:
            headers[H_NOT_BEFORE] = protocol.to_ms(message.eta)
        return defer.ensureDeferred(self._send(message, body, headers, delay))

    async def _send(self, message: protocol.TaskMessage, body: bytes, headers: dict,
                    delay: float) -> TaskInfo:
        self._ensure_started()
        state = SCHEDULED if delay else QUEUED
        if message.name is not None:
            # Taking the name is the race: the store decides, atomically.
            await self.state.claim(message.id, state, self._info(message),
                                   self.reactor.seconds())
            try:
                await self.broker.publish(message.queue, body, headers,
                                          message_id=message.id, delay=delay)
            except Exception as e:
                await self._unclaim(message, e)
                raise
        else:
            await self.broker.publish(message.queue, body, headers, message_id=message.id,
                                      delay=delay)
            if self.state is not None:
                try:
                    await self.state.enqueued(message.id, state, self._info(message),
                                              self.reactor.seconds())
                except Exception as e:
                    # The task is safely queued; its record appears when it runs.
                    log.warn("task {task_id} is queued but its state record could not be "
                             "written: {error}", task_id=message.id, error=e)
        return TaskInfo(id=message.id, task=message.task, queue=message.queue,
                        eta=message.eta, name=message.name, client=self)

    def _info(self, message: protocol.TaskMessage) -> dict:
        """The record's info fields, with a preview of the arguments."""
        return _records.info_with_arguments(message, self.record_arguments)

    async def _unclaim(self, message: protocol.TaskMessage, error: Exception) -> None:
        """The publish of a named task failed: free its name, record why."""
        now = self.reactor.seconds()
        try:
            await self.state.finished(message.id, FAILED, 0, message.info(), now,
                                      reason=f"publishing the task failed: {error}")
            await self.state.release_name(message.id, message.name, now)
        except Exception as e:
            log.warn("task {task_id} was not published and its name {name!r} could not be "
                     "released: {error}", task_id=message.id, name=message.name, error=e)

    # -- results -----------------------------------------------------------

    def result(self, task_id: str, timeout: Optional[float] = None) -> defer.Deferred:
        """
        Wait for a task to finish: fires with its return value once it
        succeeded; fails with :class:`~quebert.errors.TaskFailed` (the
        remote error's type, message and traceback, the reason, the
        attempts made), :class:`~quebert.errors.TaskCanceled`,
        :class:`~quebert.errors.TaskNotFound` (no record: unknown, or
        expired after the results' retention), or
        :class:`~quebert.errors.ResultTimeout` when ``timeout`` seconds
        pass first.  A task that finished before the call answers at once.

        All waits of one client share one subscription to the state store
        (Redis pub/sub), re-established after a reconnection or a Sentinel
        failover; cancelling the Deferred stops waiting.
        """
        return self._results().result(task_id, timeout)

    def wait(self, task_id: str, timeout: Optional[float] = None) -> defer.Deferred:
        """
        Like :meth:`result`, but fires with the task's whole record (its
        state, result or error, attempts and history) whatever the outcome.
        """
        return self._results().wait(task_id, timeout)

    def _results(self) -> Any:
        if self._waiter is None:
            from quebert.results import ResultWaiter

            self._waiter = ResultWaiter(self._need_state("waiting for results"), self.reactor)
        return self._waiter

    # -- managing tasks and queues --------------------------------------------

    def _need_state(self, what: str) -> Any:
        if self.state is None:
            raise ConfigurationError(f"{what} needs a state store: Client(..., state=...)")
        return self.state

    async def cancel(self, task_id: str, reason: Optional[str] = None) -> dict:
        """
        Cancel a task: a queued or scheduled one never runs; a running one
        is stopped by its worker (told through the control exchange).
        Fires with the task's record.  Fails with
        :class:`~quebert.errors.TaskNotFound`, or
        :class:`~quebert.errors.TaskStateConflict` when it already finished.
        """
        state = self._need_state("cancel")
        self._ensure_started()
        old = await state.cancel(task_id, self.reactor.seconds(), reason or "canceled")
        if old is None:
            raise TaskNotFound(task_id)
        if old in FINISHED_STATES:
            raise TaskStateConflict(f"task {task_id} already {old}; nothing to cancel",
                                    task_id=task_id, state=old)
        try:
            await self.broker.publish_control(control.CANCEL, id=task_id)
        except QuebertError as e:
            # Recorded: workers will not start it; a running attempt
            # ends canceled when it is recorded.
            log.warn("cancel of task {task_id} recorded but not broadcast: {error}",
                     task_id=task_id, error=e)
        return await state.get(task_id)

    async def requeue(self, task_id: str) -> dict:
        """
        Put a ``failed`` task back in its queue, taking its message out of
        the errored queue, with a fresh retry budget (attempts go on
        counting).  Fires with its record.  Fails with
        :class:`~quebert.errors.TaskNotFound` or
        :class:`~quebert.errors.TaskStateConflict` (not failed, or its
        message is no longer in the errored queue).
        """
        state = self._need_state("requeue")
        self._ensure_started()
        record = await state.get(task_id)
        if record is None:
            raise TaskNotFound(task_id)
        if record["state"] != FAILED:
            raise TaskStateConflict(f"task {task_id} is {record['state']}, not failed",
                                    task_id=task_id, state=record["state"])
        queue = record["queue"]
        attempts = int(record.get("attempts") or 0)

        def republish(message: ErroredMessage) -> defer.Deferred:
            headers = protocol.republish_headers(message.headers, **{
                H_ATTEMPTS: attempts, H_ATTEMPT_BASE: attempts})
            for key in (H_FIRST_ATTEMPT, H_NOT_BEFORE, protocol.H_ERROR_TYPE,
                        protocol.H_ERROR_MESSAGE, protocol.H_REASON, protocol.H_QUEUE):
                headers.pop(key, None)
            return self.broker.publish(queue, message.body, headers, message_id=task_id,
                                       content_type=message.content_type)

        moved = await self.admin.take_errored(queue, task_id, republish)
        if not moved:
            raise TaskStateConflict(
                f"task {task_id} failed but its message is not in the errored queue "
                f"{self.topology.errored_queue(queue)!r} (expired or removed)",
                task_id=task_id, state=FAILED)
        await state.requeued(task_id, self.reactor.seconds())
        return await state.get(task_id)

    async def pause(self, queue: str) -> None:
        """Every worker stops taking tasks from ``queue`` (it still accepts tasks)."""
        _check_queue(queue)
        state = self._need_state("pause")
        self._ensure_started()
        await state.set_paused(queue, True)
        await self.broker.publish_control(control.PAUSE, queue=queue)

    async def resume(self, queue: str) -> None:
        """Workers take tasks from ``queue`` again."""
        _check_queue(queue)
        state = self._need_state("resume")
        self._ensure_started()
        await state.set_paused(queue, False)
        await self.broker.publish_control(control.RESUME, queue=queue)

    def _resolve(self, fn_or_name: Any):
        if isinstance(fn_or_name, TaskFunction):
            return fn_or_name.name, fn_or_name.definition
        if isinstance(fn_or_name, str):
            return fn_or_name, self.registry.lookup(fn_or_name)
        if callable(fn_or_name):
            definition = self.registry.find_function(fn_or_name)
            if definition is not None:
                return definition.name, definition
            raise ConfigurationError(
                f"{fn_or_name!r} is not a registered task (decorate it with @quebert.task)"
            )
        raise ConfigurationError(f"expected a task or a task name, not {fn_or_name!r}")

    def whenConnected(self, fail_after_failures: Optional[int] = None) -> defer.Deferred:
        """
        Fires once the client's connection is ready; with
        ``fail_after_failures``, fails after that many failed attempts.
        """
        self._ensure_started()
        return self.broker.whenConnected(fail_after_failures)

    def close(self) -> defer.Deferred:
        """
        Close the connection and the results subscription (pending waits
        fail with ``CancelledError``); fires when both are closed.
        """
        d = defer.succeed(None)
        if self._waiter is not None:
            d = self._waiter.close().addErrback(
                lambda f: log.failure("closing the results subscription failed", f))
            self._waiter = None

        def stop(_: Any) -> Any:
            if self.broker.running:
                return self.broker.stopService()
            return None

        return d.addCallback(stop)


def set_default_client(client: Optional[Client]) -> None:
    """The client that calling a ``@task`` function publishes through (``None`` forgets it)."""
    _default_client.set_client(client)


def get_default_client() -> Client:
    """The default client, created from ``$QUEBERT_AMQP_URL`` on first use."""
    return _default_client.get_client()


def client_from_environment() -> Client:
    """
    A :class:`Client` on ``$QUEBERT_AMQP_URL`` (default
    :data:`~quebert.amqp.connection.DEFAULT_AMQP_URL`), on the global
    reactor: the default client when none was set.
    """
    return Client(os.environ.get("QUEBERT_AMQP_URL", DEFAULT_AMQP_URL))
