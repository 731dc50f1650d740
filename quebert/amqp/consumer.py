# -*- test-case-name: tests.test_amqp -*-
"""
Consuming one work queue on its own channel.

Each queue gets a channel with its own prefetch (QoS is per channel), and
its consumer is (re-)registered on every new connection by the connection's
preparer, so a reconnect never leaves a queue silently unconsumed.  A
consumer cancelled by the broker (queue deleted, node lost) or a channel
closed under it is re-established on a new channel; delivery tags of a dead
channel are dropped, since the broker redelivers those messages anyway.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import attrs
import pika.exceptions
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from quebert._defer import mirror
from quebert.amqp.connection import AMQPConnection
from quebert.amqp.topology import Topology
from quebert.protocol import H_DELIVERY_COUNT

log = Logger()


@attrs.define(eq=False)
class Delivery:
    """One message handed to the mediator, with its way back to the broker."""

    queue: str
    body: bytes
    headers: dict
    content_type: Optional[str]
    message_id: Optional[str]
    redelivered: bool
    _channel: Any = None
    _tag: Optional[int] = None
    settled: bool = False

    @property
    def delivery_count(self) -> Optional[int]:
        """Times a quorum queue returned this message before (or None)."""
        value = (self.headers or {}).get(H_DELIVERY_COUNT)
        return value if isinstance(value, int) else None

    def _settle(self, what: str, send: Callable[[], Any]) -> bool:
        if self.settled:
            return False
        self.settled = True
        channel = self._channel
        if channel is None or not channel.is_open:
            # The tag died with its channel; the broker redelivers.
            log.info("not {what}ing message {message_id} from {queue}: its channel is closed "
                     "(the broker will redeliver it)", what=what,
                     message_id=self.message_id, queue=self.queue)
            return False
        try:
            send()
        except (pika.exceptions.ChannelWrongStateError,
                pika.exceptions.ConnectionWrongStateError) as e:
            log.info("could not {what} message {message_id}: {error}", what=what,
                     message_id=self.message_id, error=e)
            return False
        return True

    def ack(self) -> bool:
        """Acknowledge this one message; False if its channel is gone."""
        return self._settle("ack", lambda: self._channel.basic_ack(self._tag))

    def nack(self, requeue: bool = True) -> bool:
        """Return (or drop) this one message, never ``multiple``."""
        return self._settle(
            "nack", lambda: self._channel.basic_nack(self._tag, multiple=False,
                                                     requeue=requeue)
        )


def delivery_from(queue: str, message) -> Delivery:
    """A :class:`Delivery` from pika's ``ReceivedMessage``."""
    props = message.properties
    return Delivery(
        queue=queue,
        body=message.body or b"",
        headers=dict(props.headers or {}),
        content_type=props.content_type,
        message_id=props.message_id,
        redelivered=bool(message.method.redelivered),
        channel=message.channel,
        tag=message.method.delivery_tag,
    )


class QueueConsumer:
    """
    Keeps one consumer on ``queue`` alive with ``prefetch`` unacked
    messages at most, handing each to ``on_delivery(Delivery)``.
    """

    def __init__(self, connection: AMQPConnection, topology: Topology, queue: str,
                 prefetch: int, on_delivery: Callable[[Delivery], Any],
                 clock: Any = None) -> None:
        self.connection = connection
        self.topology = topology
        self.queue = queue
        self.prefetch = prefetch
        self.on_delivery = on_delivery
        self.clock = clock or connection.reactor
        self.consuming = False
        self.paused = False
        self._protocol = None
        self._channel = None
        self._tag: Optional[str] = None
        self._generation = 0
        self.deliveries = 0
        connection.add_preparer(self._prepare)

    @defer.inlineCallbacks
    def _prepare(self, protocol):
        channel = yield protocol.channel()
        try:
            yield self.topology.declare_queue(channel, self.queue)
        finally:
            if channel.is_open:
                channel.close()
        self._protocol = protocol
        if not self.paused:
            yield self._consume(protocol)

    @defer.inlineCallbacks
    def _consume(self, protocol):
        self._generation += 1
        generation = self._generation
        channel = yield protocol.channel()
        yield channel.basic_qos(prefetch_count=self.prefetch)
        queue_object, tag = yield channel.basic_consume(queue=self.queue)
        self._channel, self._tag = channel, tag
        self.consuming = True
        log.info("consuming {queue} (prefetch {prefetch})", queue=self.queue,
                 prefetch=self.prefetch)
        self._pump(queue_object, generation)

    def _pump(self, queue_object, generation: int) -> None:
        # Messages already waiting come back as fired Deferreds: loop over
        # them instead of recursing.
        while True:
            d = queue_object.get()
            if not d.called:
                d.addCallbacks(self._one_and_pump, self._ended,
                               callbackArgs=(queue_object, generation),
                               errbackArgs=(generation,))
                return
            box: list = []
            d.addBoth(box.append)
            if isinstance(box[0], Failure):
                self._ended(box[0], generation)
                return
            self._deliver(box[0])

    def _one_and_pump(self, message, queue_object, generation: int) -> None:
        self._deliver(message)
        self._pump(queue_object, generation)

    def _deliver(self, message) -> None:
        self.deliveries += 1
        try:
            self.on_delivery(delivery_from(self.queue, message))
        except Exception:
            log.failure("delivery handler failed for a message from {queue}", queue=self.queue)

    def _ended(self, failure: Failure, generation: int) -> None:
        if generation != self._generation:
            return None
        self.consuming = False
        self._channel = None
        if self.paused or not self.connection.running:
            return None
        cancelled = failure.check(pika.exceptions.ConsumerCancelled)
        log.warn(
            "consumer of {queue} ended ({why}); re-establishing it",
            queue=self.queue,
            why="cancelled by the broker" if cancelled else repr(failure.value),
        )
        self._restart(generation)
        return None

    @defer.inlineCallbacks
    def _restart(self, generation: int):
        delay = 0.1
        while generation == self._generation and not self.paused and self.connection.running:
            protocol = self._protocol
            if protocol is None or not protocol.is_open:
                # The connection's preparer re-consumes on reconnect.
                return
            try:
                channel = yield protocol.channel()
                try:
                    yield self.topology.declare_queue(channel, self.queue)
                finally:
                    if channel.is_open:
                        channel.close()
                yield self._consume(protocol)
                return
            except Exception as e:
                log.warn("re-consuming {queue} failed: {error}; retrying in {delay}s",
                         queue=self.queue, error=e, delay=delay)
                yield deferLater(self.clock, delay, lambda: None)
                delay = min(delay * 2, 10.0)

    @defer.inlineCallbacks
    def pause(self):
        """
        Stop receiving new messages; messages already received can still
        be acked on the open channel.
        """
        self.paused = True
        channel, tag = self._channel, self._tag
        self._generation += 1
        self.consuming = False
        if channel is not None and channel.is_open and tag is not None:
            try:
                yield mirror_cancel(channel, tag)
            except Exception as e:
                log.info("cancelling consumer of {queue}: {error}", queue=self.queue, error=e)

    @defer.inlineCallbacks
    def resume(self):
        """Start receiving again after :meth:`pause`."""
        self.paused = False
        protocol = self._protocol
        if not self.consuming and protocol is not None and protocol.is_open:
            yield self._consume(protocol)

    def close_channel(self) -> None:
        """Close the channel: unacked messages go back to the queue."""
        channel, self._channel = self._channel, None
        self._generation += 1
        if channel is not None and channel.is_open:
            try:
                channel.close()
            except Exception:
                pass


def mirror_cancel(channel, tag: str) -> defer.Deferred:
    return mirror(channel.basic_cancel(tag))
