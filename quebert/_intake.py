# -*- test-case-name: tests.test_mediator.ConcurrencyTests,tests.test_mediator.DrainTests -*-
"""
:class:`Intake`: a mediator's life around the path of its tasks.

Which deliveries start now and which wait for a slot
(``max_running_tasks``), each one's ``handle()`` run in a
:class:`~quebert._driven.Driven` of its own, a handling that failed
unexpectedly given back to its queue after a pause, the control commands
(cancel, pause, resume), and the drain at shutdown.

:class:`quebert.mediator.Mediator` is an ``Intake``: what a delivery
becomes is its ``handle()``; the attributes used here that the mediator
sets (``broker``, ``clock``, ``queues``, ``max_running_tasks``,
``running``, ``counts``) are documented there.
"""

from __future__ import annotations

import collections
import types
from typing import Any, Mapping, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from quebert._defer import mirror
from quebert._driven import Driven

__all__ = ["Intake", "CANCELED_MEMORY"]

# A mediator's lines, whichever module writes them.
log = Logger(namespace="quebert.mediator")

#: Ids of tasks canceled through the control channel, remembered in case
#: their message arrives while the state store cannot say so.
CANCELED_MEMORY = 10000


class Intake:
    """
    Takes deliveries from the broker into ``handle()``, at most
    ``max_running_tasks`` at a time, until a drain stops it.
    """

    def __init__(self) -> None:
        #: Each delivery being handled, with its handling's Deferred.
        self._inflight: dict[Any, defer.Deferred] = {}
        #: Deliveries waiting for a slot, in arrival order.
        self._waiting: collections.deque = collections.deque()
        self.stopping = False
        #: Seconds before a message whose handling failed unexpectedly is returned.
        self.unexpected_error_delay = 2.0
        #: Ids canceled through the control channel (the latest CANCELED_MEMORY).
        self._canceled: collections.OrderedDict = collections.OrderedDict()
        self._drain_ended = False
        self._drain_timer: Optional[defer.Deferred] = None

    async def handle(self, delivery: Any) -> None:
        """Take one delivery all the way to an acked, recorded outcome."""
        raise NotImplementedError

    # -- intake ------------------------------------------------------------

    def start(self) -> None:
        """Register a consumer for every queue, and the control listener, with the broker."""
        for settings in self.queues.values():
            self.broker.consume(settings.name, settings.concurrency, self.on_delivery)
        listen = getattr(self.broker, "listen_control", None)
        if listen is not None:
            listen(self.on_control)

    def on_control(self, message: Mapping[str, Any]) -> None:
        """A control command for every worker (see :mod:`quebert.amqp.control`)."""
        kind = message.get("type")
        if kind == "cancel":
            self.cancel_running(message["id"])
        elif kind in ("pause", "resume"):
            queue = message["queue"]
            if queue in self.queues:
                log.info("{what} queue {queue} (control message)", what=kind, queue=queue)
                d = defer.maybeDeferred(getattr(self.broker, kind), queue)
                d.addErrback(lambda f: log.failure("{what} of queue {queue} failed", f,
                                                   what=kind, queue=queue))

    def cancel_running(self, task_id: str) -> bool:
        """
        Cancel ``task_id`` if it runs here: its attempt's Deferred is
        cancelled (an ``async``/Deferred task gets ``CancelledError``, a URL
        task's request is aborted, a thread task's result is discarded when
        it returns) and the task ends ``canceled``.  Remembers the id
        either way, so a copy met later is not run.  True if it ran here.
        """
        self._canceled[task_id] = True
        if len(self._canceled) > CANCELED_MEMORY:
            self._canceled.popitem(last=False)
        task = self.running.get(task_id)
        if task is None:
            return False
        log.info("canceling task {task_id} ({task}) in attempt {attempt}", task_id=task_id,
                 task=task.name, attempt=task.attempt)
        task.canceled = True
        if task.running is not None and not task.running.called:
            task.running.cancel()
        return True

    def on_delivery(self, delivery: Any) -> None:
        """Called by the broker for each message; never raises."""
        if self.stopping:
            # Not started: give it back now rather than at channel close.
            delivery.nack(requeue=True)
            return
        if len(self._inflight) >= self.max_running_tasks:
            self._waiting.append(delivery)
            return
        self._start(delivery)

    def has_capacity(self) -> bool:
        """Whether one more delivery would start at once rather than wait for a slot."""
        return not self.stopping and len(self._inflight) < self.max_running_tasks

    def _start(self, delivery: Any) -> None:
        handling = self.handle(delivery)
        if type(handling) is types.CoroutineType:
            d = Driven(handling).deferred
        else:  # a subclass's handle() returning a Deferred
            d = defer.ensureDeferred(handling)
        self._inflight[delivery] = d
        d.addCallbacks(self._finished, self._unexpected_then_finished, (delivery,), None,
                       (delivery,))

    def _unexpected_then_finished(self, failure: Failure, delivery: Any) -> None:
        self._finished(self._unexpected(failure, delivery), delivery)

    def _unexpected(self, failure: Failure, delivery: Any) -> None:
        # Typically the broker refused or lost an outcome publish.  Give the
        # message back, after a pause so that a persistent fault cannot
        # spin a hot redelivery loop.
        log.failure("mediator failed on message {message_id} from {queue}; returning it "
                    "to the queue in {delay}s", failure, message_id=delivery.message_id,
                    queue=delivery.queue, delay=self.unexpected_error_delay)
        self.counts["unexpected"] += 1
        self.clock.callLater(self.unexpected_error_delay, delivery.nack, True)

    def _finished(self, _: Any, delivery: Any) -> None:
        self._inflight.pop(delivery, None)
        while self._waiting and len(self._inflight) < self.max_running_tasks:
            waiting = self._waiting.popleft()
            if self.stopping:
                waiting.nack(requeue=True)
            else:
                self._start(waiting)

    # -- shutdown ------------------------------------------------------------

    async def drain(self, timeout: float) -> int:
        """
        Stop taking tasks and wait up to ``timeout`` seconds for the running
        ones.  Fires with how many were still running (left unacked, so
        the broker redelivers them).
        """
        self.stopping = True
        await self.broker.pause_consuming()
        while self._waiting:
            self._waiting.popleft().nack(requeue=True)
        pending = list(self._inflight.values())
        if pending and not self._drain_ended:
            log.info("waiting up to {timeout}s for {count} running task(s)", timeout=timeout,
                     count=len(pending))
            done = defer.DeferredList([mirror(d) for d in pending], consumeErrors=True)
            timer = self._drain_timer = defer.Deferred()
            call = self.clock.callLater(timeout, lambda: timer.called or timer.callback(None))
            await defer.DeferredList([done, timer], fireOnOneCallback=True,
                                     consumeErrors=True)
            self._drain_timer = None
            if call.active():
                call.cancel()
        left = len(self._inflight)
        if left:
            log.warn("{count} task(s) still running after {timeout}s; leaving them unacked "
                     "for redelivery: {ids}", count=left, timeout=timeout,
                     ids=sorted(self.running))
        return left

    def end_drain(self) -> None:
        """
        End the drain now (or make the next one end at once): the tasks
        still running are left unacked, for the broker to redeliver.
        """
        self._drain_ended = True
        timer = self._drain_timer
        if timer is not None and not timer.called:
            timer.callback(None)
