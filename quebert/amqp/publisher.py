# -*- test-case-name: tests.test_amqp -*-
"""
Publishing with publisher confirms, surviving reconnects.

``Publisher.publish`` fires only once the broker has confirmed the message
(it is durable in a queue); transient failures (channel or connection lost,
broker nack) are retried on the next channel, so a caller that waits for
the confirm before acking the original message never loses a task.  A
retried publish may duplicate a message: at-least-once.

While RabbitMQ blocks the connection (``connection.blocked``: a memory or
disk alarm), new publishes wait for ``connection.unblocked`` before they
are written, instead of piling up in pika's buffer or failing.
"""

from __future__ import annotations

from typing import Any, Optional

import pika
import pika.exceptions
from twisted.internet import defer
from twisted.internet import error as twisted_error
from twisted.internet.task import deferLater
from twisted.logger import Logger

from quebert._defer import Shared, bounded, mirror
from quebert.amqp.connection import AMQPConnection, is_permanent
from quebert.amqp.topology import Topology
from quebert.errors import BrokerError, UnroutableError

_TRANSIENT = (
    pika.exceptions.AMQPChannelError,
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.NackError,
    pika.exceptions.ChannelWrongStateError,
    pika.exceptions.ConnectionWrongStateError,
    ConnectionError,
    # pika's Twisted adapter fails a pending publish with Twisted's own
    # connection errors, which are not builtin ConnectionErrors
    twisted_error.ConnectionLost,
    twisted_error.ConnectionDone,
    twisted_error.ConnectionClosed,
)


#: Seconds a channel opening or a queue declaration may take.
ANSWER_TIMEOUT = 10.0


class Publisher:
    """
    Confirmed publishing over one :class:`AMQPConnection`.

    Declares the delay topology on every new connection, and each work
    queue it publishes to (once per connection), so that a task published
    before any worker ran is never dropped as unroutable.
    """

    log = Logger()

    def __init__(self, connection: AMQPConnection, topology: Topology,
                 clock: Any = None, declare_errored: bool = True) -> None:
        self.connection = connection
        self.topology = topology
        self.clock = clock or connection.reactor
        self._protocol = None
        self._channel = None
        self._lock = defer.DeferredLock()
        self._declared: set[str] = set()
        self._declaring: dict[tuple, Shared] = {}
        self._reopening: Optional[Shared] = None
        self.stopped = False
        self.declare_errored = declare_errored
        connection.add_preparer(self._prepare)

    @defer.inlineCallbacks
    def _prepare(self, protocol):
        yield self.topology.declare_delays(protocol)
        self._protocol = protocol
        self._declared = set()
        self._channel = None
        yield self._open_channel(protocol)

    @defer.inlineCallbacks
    def _open_channel(self, protocol):
        channel = yield protocol.channel()
        yield channel.confirm_delivery()
        self._channel = channel
        return channel

    def _usable_channel(self):
        channel = self._channel
        if channel is not None and channel.is_open:
            return channel
        return None

    @defer.inlineCallbacks
    def _get_channel(self):
        while True:
            if self.stopped:
                raise BrokerError("publisher is stopped")
            channel = self._usable_channel()
            if channel is not None:
                return channel
            protocol = self._protocol
            if protocol is not None and protocol.is_open:
                try:
                    # every publish waiting for the new channel shares one reopening
                    if self._reopening is None or self._reopening.done:
                        self._reopening = Shared(self._lock.run(self._bounded, self._reopen,
                                                                protocol))
                    yield self._reopening.wait()
                except Exception as e:
                    self.log.warn("could not open a publishing channel: {error}", error=e)
                    yield deferLater(self.clock, 0.5, lambda: None)
                continue
            try:
                yield self.connection.whenReady()
            except (defer.CancelledError, ConnectionError):
                raise BrokerError("publisher is stopped")

    def _bounded(self, operation, *args):
        """
        ``operation(*args)``, given up (not cancelled: it is pika's) after
        ``ANSWER_TIMEOUT`` seconds with a transient error, so that a channel
        opened on a connection that dies meanwhile (pika never answers it)
        cannot hold the lock, and every publish waiting behind it, forever.
        """
        return bounded(defer.maybeDeferred(operation, *args), ANSWER_TIMEOUT, self.clock,
                       lambda: ConnectionError(
                           f"RabbitMQ did not answer within {ANSWER_TIMEOUT:g}s"))

    def _reopen(self, protocol):
        if self._usable_channel() is not None or protocol is not self._protocol:
            return None
        return self._open_channel(protocol)

    def _ensure_queue(self, protocol, queue: str):
        if queue in self._declared:
            return defer.succeed(None)
        # every publish to a queue not declared yet shares one declaration
        key = (id(protocol), queue)
        shared = self._declaring.get(key)
        if shared is None or shared.done:
            shared = self._declaring[key] = Shared(
                self._lock.run(self._bounded, self._declare_queue, protocol, queue))
            shared.wait().addBoth(
                lambda _, s=shared: self._declaring.pop(key) if self._declaring.get(key) is s
                else None)
        return shared.wait()

    @defer.inlineCallbacks
    def _declare_queue(self, protocol, queue: str):
        if queue in self._declared:
            return
        # (on channels of its own: a failed declare closes its channel)
        try:
            yield self.topology.declare_queue(protocol, queue, errored=self.declare_errored)
        except pika.exceptions.ChannelClosedByBroker as e:
            if is_permanent(e):
                raise BrokerError(
                    f"RabbitMQ refused to declare queue {queue!r}: {e.reply_code} "
                    f"{e.reply_text}") from e
            raise
        if protocol is self._protocol:
            self._declared.add(queue)

    @defer.inlineCallbacks
    def publish(self, exchange: str, routing_key: str, body: bytes,
                properties: pika.BasicProperties, *, declare: Optional[str] = None,
                mandatory: bool = True):
        """
        Publish and wait for the broker's confirm, retrying transient
        failures.  ``declare`` names a work queue to make sure of first.
        Fails with :class:`UnroutableError` if nothing is bound to the route
        (unless ``mandatory`` is false: then such a message is dropped).
        """
        failures = 0
        redeclared = False
        while True:
            if self.connection.blocked:
                yield self._wait_unblocked(exchange, routing_key)
            channel = yield self._get_channel()
            try:
                if declare is not None:
                    yield self._ensure_queue(self._protocol, declare)
                yield mirror(channel.basic_publish(exchange, routing_key, body, properties,
                                                   mandatory=mandatory))
                return None
            except BrokerError:
                raise
            except pika.exceptions.UnroutableError:
                if declare is not None and not redeclared:
                    # The queue was deleted since it was declared (no queue got
                    # the message, so sending it again duplicates nothing).
                    self._declared.discard(declare)
                    redeclared = True
                    continue
                raise UnroutableError(
                    f"no queue is bound to exchange {exchange!r} with routing key "
                    f"{routing_key!r}"
                )
            except _TRANSIENT as e:
                failures += 1
                if self.stopped:
                    raise BrokerError(f"publish failed while stopping: {e!r}") from e
                self.log.warn(
                    "publish to {exchange}/{routing_key} failed ({error!r}); retry #{n}",
                    exchange=exchange, routing_key=routing_key, error=e, n=failures,
                )
                yield deferLater(self.clock, min(0.05 * 2**failures, 5.0), lambda: None)

    @defer.inlineCallbacks
    def _wait_unblocked(self, exchange: str, routing_key: str):
        started = self.clock.seconds()
        self.log.info("publish to {exchange}/{routing_key} waits: the connection is blocked "
                      "by RabbitMQ ({reason})", exchange=exchange, routing_key=routing_key,
                      reason=self.connection.blocked_reason)
        yield self.connection.whenUnblocked()
        self.log.info("publish to {exchange}/{routing_key} resumes after {seconds:.1f}s",
                      exchange=exchange, routing_key=routing_key,
                      seconds=self.clock.seconds() - started)

    def stop(self) -> None:
        self.stopped = True


def properties(message_id: Optional[str], headers: dict, *,
               content_type: Optional[str] = "application/json",
               extra: Optional[dict] = None) -> pika.BasicProperties:
    """Persistent message properties for a task."""
    return pika.BasicProperties(
        content_type=content_type,
        delivery_mode=2,
        message_id=message_id,
        headers=headers,
        **(extra or {}),
    )

