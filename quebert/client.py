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
from typing import Any, Callable, Optional, Union

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from quebert import protocol
from quebert.amqp.broker import AMQPBroker
from quebert.amqp.connection import DEFAULT_AMQP_URL
from quebert.amqp.topology import Topology
from quebert.errors import ConfigurationError
from quebert.protocol import H_ATTEMPTS, H_NOT_BEFORE
from quebert.registry import Registry, TaskFunction, default_registry
from quebert.retry import RETRY_FIELDS
from quebert.state.interface import QUEUED, SCHEDULED

log = Logger(namespace="quebert.client")


@attrs.frozen
class TaskInfo:
    """What a producer learns about a task it published."""

    id: str
    task: str
    queue: str
    eta: Optional[float] = None
    name: Optional[str] = None

    def to_dict(self) -> dict:
        return attrs.asdict(self)


def _epoch(eta: Union[float, int, datetime.datetime]) -> float:
    if isinstance(eta, datetime.datetime):
        if eta.tzinfo is None:
            raise ConfigurationError("_eta datetimes must be timezone-aware")
        return eta.timestamp()
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise ConfigurationError(f"_eta must be epoch seconds or a datetime, not {eta!r}")
    return float(eta)


class Client:
    """
    Publishes tasks to RabbitMQ.

    :param amqp_url: where RabbitMQ is.
    :param state: an optional :class:`~quebert.state.IStateManager`; when
        given, tasks are recorded ``queued``/``scheduled`` as they are sent.
    :param default_queue: queue for tasks that name none.
    """

    def __init__(self, amqp_url: str = DEFAULT_AMQP_URL, *, reactor: Any = None,
                 state: Any = None, exchange: str = "quebert", queue_type: str = "classic",
                 default_queue: str = "default", registry: Optional[Registry] = None) -> None:
        self.topology = Topology(exchange=exchange, queue_type=queue_type)
        self.broker = AMQPBroker(amqp_url, self.topology, reactor=reactor, consume=False,
                                 name="client")
        self.reactor = self.broker.reactor
        self.state = state
        self.default_queue = default_queue
        self.registry = registry if registry is not None else default_registry

    def _ensure_started(self) -> None:
        if not self.broker.running:
            self.broker.startService()

    def add_task(self, fn_or_name: Union[str, Callable, TaskFunction], *args: Any,
                 _queue: Optional[str] = None, _countdown: Optional[float] = None,
                 _eta: Any = None, _name: Optional[str] = None,
                 _task_id: Optional[str] = None, _timeout: Optional[float] = None,
                 _retry: Optional[dict] = None, **kwargs: Any) -> defer.Deferred:
        """
        Publish a task; fires with its :class:`TaskInfo` once the broker
        confirmed it.  Options are the ``_``-prefixed keywords; retry
        overrides may also be given one by one (``_max_attempts=3``).
        Unserialisable arguments raise :class:`SerializationError` here.
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
        eta = None
        if _countdown is not None and _eta is not None:
            raise ConfigurationError("give either _countdown or _eta, not both")
        if _countdown is not None:
            if isinstance(_countdown, bool) or not isinstance(_countdown, (int, float)) \
                    or _countdown < 0:
                raise ConfigurationError(f"_countdown must be seconds >= 0, not {_countdown!r}")
            eta = now + float(_countdown)
        elif _eta is not None:
            eta = _epoch(_eta)
        message, body = protocol.build(
            name, args, kwargs, queue=queue, task_id=_task_id, eta=eta, name=_name,
            retry=retry, timeout=_timeout, now=now,
        )
        delay = max(0.0, eta - now) if eta is not None else 0.0
        headers: dict[str, Any] = {H_ATTEMPTS: 0}
        if delay:
            headers[H_NOT_BEFORE] = protocol.to_ms(eta)
        return defer.ensureDeferred(self._send(message, body, headers, delay))

    async def _send(self, message: protocol.TaskMessage, body: bytes, headers: dict,
                    delay: float) -> TaskInfo:
        self._ensure_started()
        await self.broker.publish(message.queue, body, headers, message_id=message.id,
                                  delay=delay)
        if self.state is not None:
            try:
                await self.state.enqueued(message.id, SCHEDULED if delay else QUEUED,
                                          message.info(), self.reactor.seconds())
            except Exception as e:
                # The task is safely queued; its record appears when it runs.
                log.warn("task {task_id} is queued but its state record could not be "
                         "written: {error}", task_id=message.id, error=e)
        return TaskInfo(id=message.id, task=message.task, queue=message.queue,
                        eta=message.eta, name=message.name)

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
        """Close the connection; fires when it is closed."""
        if self.broker.running:
            return defer.maybeDeferred(self.broker.stopService)
        return defer.succeed(None)


_default_client: Optional[Client] = None


def set_default_client(client: Optional[Client]) -> None:
    """The client that calling a ``@task`` function publishes through."""
    global _default_client
    _default_client = client


def get_default_client() -> Client:
    """The default client, created from ``$QUEBERT_AMQP_URL`` on first use."""
    global _default_client
    if _default_client is None:
        _default_client = Client(os.environ.get("QUEBERT_AMQP_URL", DEFAULT_AMQP_URL))
    return _default_client
