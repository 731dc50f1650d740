# -*- test-case-name: tests.test_testing -*-
"""
Test doubles for code that uses quebert, in the spirit of ``treq.testing``.

``StubBroker`` is an in-memory :class:`~quebert.interfaces.IBroker` whose
delays run on a ``Clock``; ``InlineExecutor`` runs task functions on the
caller's thread (no thread pool), and ``StubWorker`` wires them to the real
mediator, so a unit test exercises the real path of a task — hooks, retries
with backoff, errored queues, state — in microseconds::

    from twisted.internet.task import Clock
    from quebert.testing import StubWorker

    clock = Clock()
    worker = StubWorker(clock, registry=my_registry)
    worker.enqueue("app.tasks.add", 1, 2)
    worker.run_until_idle()
    assert worker.state_of(task_id)["state"] == "succeeded"

Messages are encoded and decoded exactly as on RabbitMQ, so malformed
bodies can be tested too (``StubBroker.publish_raw``).
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable, Mapping, Optional

import attrs
from twisted.internet import defer
from zope.interface import implementer

from quebert import protocol
from quebert.errors import TaskTimeout
from quebert.interfaces import IBroker
from quebert.mediator import DelayOnErrorMediator, Hook, Mediator, QueueSettings
from quebert.registry import REACTOR, Registry, TaskDefinition, default_registry
from quebert.state.memory import MemoryStateManager


@attrs.define
class StubMessage:
    """A message sitting in a stub queue."""

    body: bytes
    headers: dict
    message_id: Optional[str]
    content_type: Optional[str] = protocol.CONTENT_TYPE
    redelivered: bool = False
    delivery_count: int = 0


@attrs.define(eq=False)
class StubDelivery:
    """A :class:`StubMessage` handed to a consumer, not yet settled."""

    broker: StubBroker = attrs.field(repr=False)
    queue: str
    message: StubMessage
    settled: bool = False

    body = property(lambda self: self.message.body)
    headers = property(lambda self: self.message.headers)
    content_type = property(lambda self: self.message.content_type)
    message_id = property(lambda self: self.message.message_id)
    redelivered = property(lambda self: self.message.redelivered)

    @property
    def delivery_count(self) -> Optional[int]:
        return None

    def ack(self) -> bool:
        if self.settled:
            return False
        self.settled = True
        self.broker._settle(self, requeue=False)
        return True

    def nack(self, requeue: bool = True) -> bool:
        if self.settled:
            return False
        self.settled = True
        self.broker._settle(self, requeue=requeue)
        return True


@implementer(IBroker)
class StubBroker:
    """
    An in-memory broker: queues, errored queues and delays on a clock.

    Deliveries are dispatched synchronously as messages arrive and as
    prefetch slots free up.  ``crash()`` simulates a worker dying: every
    unacked message goes back to its queue marked redelivered.
    """

    def __init__(self, clock: Any, exchange: str = "quebert") -> None:
        self.clock = clock
        self.exchange = exchange
        self.queues: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.errored: dict[str, list] = collections.defaultdict(list)
        self.unacked: dict[str, list] = collections.defaultdict(list)
        self.delayed: list = []
        self.published: list = []
        self._consumers: dict[str, tuple[int, Callable]] = {}
        self.paused = False
        #: Queues paused one by one (``pause``/``resume``).
        self.paused_queues: set[str] = set()
        self._control_listeners: list[Callable] = []
        #: Control commands broadcast, in order.
        self.control: list[dict] = []

    # -- IBroker -----------------------------------------------------------

    def publish(self, queue: str, body: bytes, headers: dict, *, message_id: str,
                content_type: Optional[str] = protocol.CONTENT_TYPE, delay: float = 0.0):
        message = StubMessage(body=body, headers=dict(headers), message_id=message_id,
                              content_type=content_type)
        self.published.append((queue, message, delay))
        if delay > 0:
            call = self.clock.callLater(delay, self._arrive, queue, message)
            self.delayed.append(call)
        else:
            self._arrive(queue, message)
        return defer.succeed(None)

    def publish_errored(self, queue: str, body: bytes, headers: dict, *,
                        message_id: Optional[str],
                        content_type: Optional[str] = protocol.CONTENT_TYPE):
        self.errored[queue].append(StubMessage(body=body, headers=dict(headers),
                                               message_id=message_id,
                                               content_type=content_type))
        return defer.succeed(None)

    def consume(self, queue: str, prefetch: int, on_delivery: Callable) -> None:
        self._consumers[queue] = (prefetch, on_delivery)
        self._dispatch(queue)

    def pause_consuming(self):
        self.paused = True
        return defer.succeed(None)

    def resume_consuming(self) -> None:
        self.paused = False
        for queue in list(self._consumers):
            self._dispatch(queue)

    def close_consumers(self) -> None:
        self.crash()

    def pause(self, queue: str):
        self.paused_queues.add(queue)
        return defer.succeed(None)

    def resume(self, queue: str):
        self.paused_queues.discard(queue)
        self._dispatch(queue)
        return defer.succeed(None)

    def listen_control(self, on_message: Callable[[dict], Any]) -> None:
        self._control_listeners.append(on_message)

    def publish_control(self, command: str, **fields: Any):
        """Broadcast to every listener at once, as the fanout exchange does."""
        message = {"type": command, "sent_at": self.clock.seconds(), **fields}
        self.control.append(message)
        for listener in list(self._control_listeners):
            listener(message)
        return defer.succeed(None)

    # -- test helpers --------------------------------------------------------

    def publish_raw(self, queue: str, body: bytes, *, headers: Optional[dict] = None,
                    message_id: Optional[str] = None,
                    content_type: Optional[str] = protocol.CONTENT_TYPE) -> None:
        """Put any bytes in ``queue``, as a foreign producer could."""
        self._arrive(queue, StubMessage(body=body, headers=dict(headers or {}),
                                        message_id=message_id, content_type=content_type))

    def crash(self) -> None:
        """Every unacked message goes back to the front of its queue, redelivered."""
        for queue, deliveries in list(self.unacked.items()):
            for delivery in reversed(deliveries):
                delivery.settled = True
                delivery.message.redelivered = True
                self.queues[queue].appendleft(delivery.message)
            deliveries.clear()
        for queue in list(self._consumers):
            self._dispatch(queue)

    def pending_delays(self) -> int:
        """Delayed messages not yet arrived."""
        self.delayed = [c for c in self.delayed if c.active()]
        return len(self.delayed)

    def idle(self) -> bool:
        """No message ready, unacked or delayed."""
        return (not any(self.queues.values()) and not any(self.unacked.values())
                and not self.pending_delays())

    # -- internals -------------------------------------------------------------

    def _arrive(self, queue: str, message: StubMessage) -> None:
        self.queues[queue].append(message)
        self._dispatch(queue)

    def _settle(self, delivery: StubDelivery, requeue: bool) -> None:
        unacked = self.unacked[delivery.queue]
        if delivery in unacked:
            unacked.remove(delivery)
        if requeue:
            delivery.message.redelivered = True
            self.queues[delivery.queue].appendleft(delivery.message)
        self._dispatch(delivery.queue)

    def _dispatch(self, queue: str) -> None:
        consumer = self._consumers.get(queue)
        if consumer is None or self.paused or queue in self.paused_queues:
            return
        prefetch, on_delivery = consumer
        ready = self.queues[queue]
        while ready and len(self.unacked[queue]) < prefetch and not self.paused:
            delivery = StubDelivery(self, queue, ready.popleft())
            self.unacked[queue].append(delivery)
            on_delivery(delivery)


class InlineExecutor:
    """
    Runs task functions right away on the calling thread; timeouts use
    the clock.  For unit tests only: a real worker never blocks the reactor.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock

    def run(self, definition: TaskDefinition, args: tuple, kwargs: Mapping[str, Any],
            timeout: Optional[float] = None) -> defer.Deferred:
        def call() -> Any:
            result = definition.fn(*args, **kwargs)
            if definition.executor == REACTOR and not isinstance(result, defer.Deferred):
                import inspect

                if inspect.isawaitable(result):
                    return defer.ensureDeferred(result)
            return result

        d = defer.maybeDeferred(call)
        if timeout:
            name = definition.name

            def convert(result: Any, seconds: float) -> Any:
                if isinstance(result, defer.Failure) and result.check(defer.CancelledError):
                    raise TaskTimeout(f"task {name!r} timed out after {timeout:g}s")
                return result

            d.addTimeout(timeout, self.clock, onTimeoutCancel=convert)
        return d


class StubWorker:
    """
    The real mediator over a :class:`StubBroker`, an
    :class:`InlineExecutor` and a memory state store, all on ``clock``.
    """

    def __init__(self, clock: Any, *, registry: Optional[Registry] = None,
                 queues: Iterable[Any] = ("default",),
                 mediator_class: type = DelayOnErrorMediator, hooks: Iterable[Hook] = (),
                 max_running_tasks: int = 100, state: Any = None,
                 max_message_size: int = 1024 * 1024, dispatcher: Any = None) -> None:
        self.clock = clock
        self.registry = registry if registry is not None else default_registry
        self.broker = StubBroker(clock)
        self.state = state if state is not None else MemoryStateManager(clock=clock)
        settings = [q if isinstance(q, QueueSettings) else QueueSettings(name=q)
                    for q in queues]
        self.default_queue = settings[0].name
        self.mediator: Mediator = mediator_class(
            broker=self.broker, state=self.state, executor=InlineExecutor(clock), clock=clock,
            queues=settings, registry=self.registry, max_running_tasks=max_running_tasks,
            worker_id="stub-worker", hooks=hooks, max_message_size=max_message_size,
            dispatcher=dispatcher,
        )
        self.mediator.start()

    def enqueue(self, name: str, *args: Any, _queue: Optional[str] = None,
                _countdown: Optional[float] = None, _task_id: Optional[str] = None,
                _retry: Optional[dict] = None, _timeout: Optional[float] = None,
                _context: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> str:
        """
        Publish a task the way :class:`~quebert.Client` does; return its id.
        ``_context`` is what the task then reads in ``current_task().context``.
        """
        now = self.clock.seconds()
        definition = self.registry.lookup(name)
        queue = _queue or (definition.queue if definition else None) or self.default_queue
        eta = now + _countdown if _countdown else None
        message, body = protocol.build(name, args, kwargs, queue=queue, task_id=_task_id,
                                       eta=eta, retry=_retry, timeout=_timeout, now=now,
                                       context=_context)
        headers: dict[str, Any] = {protocol.H_ATTEMPTS: 0}
        if eta:
            headers[protocol.H_NOT_BEFORE] = protocol.to_ms(eta)
        self.broker.publish(queue, body, headers, message_id=message.id,
                            delay=_countdown or 0.0)
        return message.id

    def enqueue_url(self, url: str, *, method: str = "POST", headers: Optional[dict] = None,
                    body: Any = b"", _queue: Optional[str] = None,
                    _countdown: Optional[float] = None, _name: Optional[str] = None,
                    _retry: Optional[dict] = None,
                    _dispatch_deadline: Optional[float] = None) -> str:
        """Publish a URL task the way :class:`~quebert.Client` does; return its id."""
        now = self.clock.seconds()
        queue = _queue or self.default_queue
        eta = now + _countdown if _countdown else None
        message, encoded = protocol.build_url(
            url, method=method, headers=headers, body=body, queue=queue, eta=eta, name=_name,
            retry=_retry, dispatch_deadline=_dispatch_deadline, now=now)
        self.state.enqueued(message.id, "scheduled" if eta else "queued", message.info(), now)
        headers_: dict[str, Any] = {protocol.H_ATTEMPTS: 0}
        if eta:
            headers_[protocol.H_NOT_BEFORE] = protocol.to_ms(eta)
        self.broker.publish(queue, encoded, headers_, message_id=message.id,
                            delay=_countdown or 0.0)
        return message.id

    def cancel(self, task_id: str) -> Optional[str]:
        """Cancel as :meth:`quebert.Client.cancel` does; the state the task was in."""
        box: list = []
        self.state.cancel(task_id, self.clock.seconds(), "canceled by a test").addBoth(
            box.append)
        self.broker.publish_control("cancel", id=task_id)
        return box[0] if box else None

    def run_until_idle(self, max_seconds: float = 86400.0, step: float = 0.001) -> None:
        """Advance the clock until no message is ready, unacked or delayed."""
        deadline = self.clock.seconds() + max_seconds
        while not self.broker.idle() and self.clock.seconds() < deadline:
            pending = [c.getTime() for c in self.clock.getDelayedCalls() if c.active()]
            if pending:
                self.clock.advance(max(min(pending) - self.clock.seconds(), 0.0))
            else:
                self.clock.advance(step)

    def state_of(self, task_id: str) -> Optional[dict]:
        """The task's state record (the memory store answers synchronously)."""
        box: list = []
        self.state.get(task_id).addBoth(box.append)
        return box[0] if box else None
