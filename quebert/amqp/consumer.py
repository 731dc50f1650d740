# -*- test-case-name: tests.test_amqp -*-
"""
Consuming one work queue on its own channel.

Each queue gets a channel with its own prefetch (QoS is per channel), and
its consumer is (re-)registered on every new connection by the connection's
preparer, so a reconnect never leaves a queue silently unconsumed.  A
consumer cancelled by the broker (queue deleted, node lost) or a channel
closed under it is re-established on a new channel; delivery tags of a dead
channel are dropped, since the broker redelivers those messages anyway.

Acks are coalesced per channel (:class:`_Acker`): the acks made during one
reactor turn go out at the end of that turn, the longest run of settled
deliveries at the head of the channel as one ``basic_ack(tag,
multiple=True)``.  An ack stuck behind a delivery that is still running is
held at most :data:`ACK_HOLD` seconds in case the gap fills, then sent on
its own: a multiple ack never covers a delivery that is unsettled or was
nacked.  Nacks are always single and go out at once, after the acks made
before them.  Holding an ack only delays it, after the outcome is already
durable, so a crash meanwhile means a redelivery (a duplicate the mediator
recognises from the state store), never a loss.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Optional

import attrs
import pika.exceptions
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from quebert._defer import bounded, mirror
from quebert.amqp.connection import AMQPConnection
from quebert.amqp.topology import Topology
from quebert.protocol import H_DELIVERY_COUNT

log = Logger()

#: Longest an ack waits (seconds) behind an earlier delivery that is still
#: unsettled, hoping to join a multiple ack, before it is sent on its own.
ACK_HOLD = 0.005

#: Seconds a re-subscription waits for the broker to confirm the old
#: consumer's cancellation.
CANCEL_WAIT = 5.0

_WRONG_STATE = (pika.exceptions.ChannelWrongStateError,
                pika.exceptions.ConnectionWrongStateError)


class _Acker:
    """
    The acks and nacks of one channel, acks coalesced per reactor turn.

    ``_outstanding`` holds the delivery tags handed out on the channel and
    not yet settled on the wire, in delivery order (which is tag order);
    ``_acked`` those of them acked by the mediator but not yet sent.  A
    flush sends the longest all-acked prefix of ``_outstanding`` as one
    frame; acked tags behind an unsettled one wait for the gap to fill, at
    most ``hold`` seconds, then go out one by one.
    """

    def __init__(self, channel: Any, clock: Any, hold: float = ACK_HOLD) -> None:
        self.channel = channel
        self.clock = clock
        self.hold = hold
        self.dead = False
        self._outstanding: collections.deque = collections.deque()
        self._acked: set = set()
        self._turn_call: Any = None
        self._hold_call: Any = None
        #: ``basic_ack`` frames sent, and the acks they carried.
        self.ack_frames = 0
        self.acks = 0

    def delivered(self, tag: int) -> None:
        self._outstanding.append(tag)

    def alive(self) -> bool:
        if self.dead:
            return False
        if not self.channel.is_open:
            self.drop()
            return False
        return True

    def drop(self) -> None:
        """The channel is gone: forget its tags (the broker redelivers them)."""
        self.dead = True
        self._outstanding.clear()
        self._acked.clear()
        for call in (self._turn_call, self._hold_call):
            if call is not None and call.active():
                call.cancel()
        self._turn_call = self._hold_call = None

    def ack(self, tag: int) -> bool:
        """Queue an ack; True if it will go out on a live channel."""
        if not self.alive():
            return False
        self._acked.add(tag)
        if self._turn_call is None:
            self._turn_call = self.clock.callLater(0, self._end_of_turn)
        return True

    def nack(self, tag: int, requeue: bool) -> bool:
        """Send one nack now, after every ack queued before it."""
        if not self.alive():
            return False
        self.flush(everything=True)
        if self.dead:
            return False
        try:
            self.channel.basic_nack(tag, multiple=False, requeue=requeue)
        except _WRONG_STATE as e:
            log.info("could not nack delivery {tag}: {error}", tag=tag, error=e)
            self.drop()
            return False
        try:
            self._outstanding.remove(tag)
        except ValueError:
            pass
        return True

    def _end_of_turn(self) -> None:
        self._turn_call = None
        self.flush()

    def _hold_over(self) -> None:
        self._hold_call = None
        self.flush(everything=True)

    def flush(self, everything: bool = False) -> None:
        """
        Send the acked prefix as one frame; with ``everything``, also the
        acks held behind a gap, one by one.
        """
        if self._turn_call is not None:
            if self._turn_call.active():
                self._turn_call.cancel()
            self._turn_call = None
        acked = self._acked
        if not acked or not self.alive():
            return
        outstanding = self._outstanding
        last, count = None, 0
        while outstanding and outstanding[0] in acked:
            last = outstanding.popleft()
            acked.discard(last)
            count += 1
        try:
            if last is not None:
                self.channel.basic_ack(last, multiple=count > 1)
                self.ack_frames += 1
                self.acks += count
            if acked and everything:
                held = acked
                self._acked = acked = set()
                self._outstanding = outstanding = collections.deque(
                    t for t in outstanding if t not in held)
                for tag in sorted(held):
                    self.channel.basic_ack(tag, multiple=False)
                    self.ack_frames += 1
                    self.acks += 1
        except _WRONG_STATE as e:
            log.info("could not send acks: {error} (the broker will redeliver)", error=e)
            self.drop()
            return
        if not acked:
            if self._hold_call is not None:
                if self._hold_call.active():
                    self._hold_call.cancel()
                self._hold_call = None
        elif self._hold_call is None:
            self._hold_call = self.clock.callLater(self.hold, self._hold_over)


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
    _acker: Optional[_Acker] = None

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

    def _gone(self, what: str) -> bool:
        log.info("not {what}ing message {message_id} from {queue}: its channel is closed "
                 "(the broker will redeliver it)", what=what,
                 message_id=self.message_id, queue=self.queue)
        return False

    def ack(self) -> bool:
        """
        Acknowledge this one message (sent at the end of the reactor turn,
        possibly with others); False if its channel is gone.
        """
        acker = self._acker
        if acker is None:
            return self._settle("ack", lambda: self._channel.basic_ack(self._tag))
        if self.settled:
            return False
        self.settled = True
        return acker.ack(self._tag) or self._gone("ack")

    def nack(self, requeue: bool = True) -> bool:
        """Return (or drop) this one message, never ``multiple``."""
        acker = self._acker
        if acker is not None:
            if self.settled:
                return False
            self.settled = True
            return acker.nack(self._tag, requeue) or self._gone("nack")
        return self._settle(
            "nack", lambda: self._channel.basic_nack(self._tag, multiple=False,
                                                     requeue=requeue)
        )


def delivery_from(queue: str, message, acker: Optional[_Acker] = None) -> Delivery:
    """A :class:`Delivery` from pika's ``ReceivedMessage``."""
    props = message.properties
    tag = message.method.delivery_tag
    if acker is not None:
        acker.delivered(tag)
    return Delivery(
        queue=queue,
        body=message.body or b"",
        headers=dict(props.headers or {}),
        content_type=props.content_type,
        message_id=props.message_id,
        redelivered=bool(message.method.redelivered),
        channel=message.channel,
        tag=tag,
        acker=acker,
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
        # pika's Twisted adapter imports the global reactor: imported here,
        # at setup, rather than with this module (importing quebert must not
        # install a reactor) or per message.
        from pika.adapters.twisted_connection import ClosableDeferredQueue

        self._queue_class = ClosableDeferredQueue
        self.consuming = False
        self.paused = False
        self._protocol = None
        self._channel = None
        self._acker: Optional[_Acker] = None
        self._tag: Optional[str] = None
        self._generation = 0
        self.deliveries = 0
        #: When the last message arrived, and when consuming last (re)started.
        self.last_delivery_at: Optional[float] = None
        self.consuming_since: Optional[float] = None
        self.resubscribes = 0
        #: Channels of cancelled consumers, kept open until their deliveries settle.
        self._retired: list = []
        connection.add_preparer(self._prepare)

    @defer.inlineCallbacks
    def _prepare(self, protocol):
        yield self.topology.declare_queue(protocol, self.queue)
        self._protocol = protocol
        if not self.paused:
            yield self._consume(protocol)

    @defer.inlineCallbacks
    def _consume(self, protocol, channel=None):
        self._generation += 1
        generation = self._generation
        if channel is None:
            channel = yield protocol.channel()
            acker = _Acker(channel, self.clock)
            yield channel.basic_qos(prefetch_count=self.prefetch)
        else:
            # resuming on the channel that still holds unacked deliveries:
            # its prefetch window counts them, and they stay ackable
            acker = self._acker
        queue_object, tag = yield channel.basic_consume(queue=self.queue)
        self._channel, self._tag, self._acker = channel, tag, acker
        self.consuming = True
        self.consuming_since = self.clock.seconds()
        log.info("consuming {queue} (prefetch {prefetch})", queue=self.queue,
                 prefetch=self.prefetch)
        self._pump(queue_object, generation, acker)

    def _pump(self, queue_object, generation: int, acker: _Acker) -> None:
        # Messages already waiting come back as fired Deferreds: loop over
        # them instead of recursing.
        while True:
            d = queue_object.get()
            if not d.called:
                d.addCallbacks(self._one_and_pump, self._ended,
                               callbackArgs=(queue_object, generation, acker),
                               errbackArgs=(generation, acker))
                self._hand_over(queue_object, acker)
                return
            box: list = []
            d.addBoth(box.append)
            if isinstance(box[0], Failure):
                self._ended(box[0], generation, acker)
                return
            self._deliver(box[0], acker)

    def _hand_over(self, queue_object, acker: _Acker) -> None:
        """
        With pika's queue drained and our ``get()`` waiting, have its
        ``put`` hand each message straight to :meth:`_deliver`: the same
        order and calls, without a Deferred and a ``get()`` per message.
        The waiting ``get()`` still fails when the queue is closed (the
        consumer cancelled, the channel closed), which ends the consumer.
        """
        queue_class = self._queue_class
        if type(queue_object) is not queue_class:
            return
        deliver = self._deliver
        queue_put = queue_class.put

        def put(message: Any) -> Any:
            if queue_object.closed or queue_object.pending or not queue_object.waiting:
                return queue_put(queue_object, message)
            deliver(message, acker)
            return None

        queue_object.put = put

    def _one_and_pump(self, message, queue_object, generation: int, acker: _Acker) -> None:
        self._deliver(message, acker)
        self._pump(queue_object, generation, acker)

    def _deliver(self, message, acker: _Acker) -> None:
        self.deliveries += 1
        self.last_delivery_at = self.clock.seconds()
        try:
            self.on_delivery(delivery_from(self.queue, message, acker))
        except Exception:
            log.failure("delivery handler failed for a message from {queue}", queue=self.queue)

    def _ended(self, failure: Failure, generation: int, acker: Optional[_Acker] = None) -> None:
        if acker is not None and not acker.channel.is_open:
            acker.drop()
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
                yield self.topology.declare_queue(protocol, self.queue)
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
        # A consumer tag is cancelled once: pika never answers a second
        # basic.cancel of the same tag (pausing twice would hang).
        channel, tag = self._channel, self._tag
        self._tag = None
        self._generation += 1
        self.consuming = False
        if channel is not None and channel.is_open and tag is not None:
            try:
                yield mirror_cancel(channel, tag)
            except Exception as e:
                log.info("cancelling consumer of {queue}: {error}", queue=self.queue, error=e)

    @defer.inlineCallbacks
    def resume(self):
        """
        Start receiving again after :meth:`pause`, on the same channel when
        it is still open, so that deliveries received before the pause can
        still be acked and the prefetch window counts them.
        """
        self.paused = False
        protocol = self._protocol
        if not self.consuming and protocol is not None and protocol.is_open:
            channel = self._channel
            if channel is not None and (not channel.is_open or self._acker is None
                                        or not self._acker.alive()):
                channel = None
            yield self._consume(protocol, channel)

    @property
    def unacked(self) -> int:
        """Deliveries of the current channel not yet acked or nacked on the wire."""
        acker = self._acker
        if acker is None or acker.dead:
            return 0
        return len(acker._outstanding)

    @defer.inlineCallbacks
    def resubscribe(self):
        """
        Cancel the consumer and consume again on a fresh channel (a
        consumer the broker silently stopped serving).  The old channel
        stays open until the deliveries it holds are settled, so running
        tasks can still be acked.  Fires True if consuming again.
        """
        protocol = self._protocol
        if self.paused or protocol is None or not protocol.is_open:
            return False
        channel, tag, acker = self._channel, self._tag, self._acker
        self._tag = None
        self._generation += 1  # the old pump's end is not a reason to restart
        self.consuming = False
        self.resubscribes += 1
        known = getattr(channel, "consumer_tags", None)
        if isinstance(known, (list, tuple, set)) and tag not in known:
            # pika forgot this consumer: it would never answer a cancel
            log.info("consumer {tag} of {queue} is unknown to its channel; not cancelling it",
                     tag=tag, queue=self.queue)
        elif channel is not None and channel.is_open and tag is not None:
            cancel = channel.basic_cancel(tag)
            waiting = mirror(cancel)
            cancel.addErrback(lambda _: None)  # its late outcome is ours to drop
            try:
                yield bounded(waiting, CANCEL_WAIT, self.clock,
                              lambda: TimeoutError(f"no cancel-ok in {CANCEL_WAIT}s"))
            except Exception as e:
                log.info("cancelling consumer of {queue}: {error}", queue=self.queue, error=e)
        if channel is not None:
            self._retired.append((channel, acker))
        self.reap_retired()
        if self.paused or self.consuming or protocol is not self._protocol:
            return self.consuming
        try:
            yield self._consume(protocol)
        except Exception as e:
            log.warn("re-consuming {queue} failed: {error}; re-establishing it", queue=self.queue,
                     error=e)
            self._restart(self._generation)
            return False
        return True

    def reap_retired(self) -> None:
        """Close the channels of cancelled consumers whose deliveries are all settled."""
        keep = []
        for channel, acker in self._retired:
            if acker is not None and acker.alive():
                acker.flush(everything=True)
                if acker._outstanding:
                    keep.append((channel, acker))
                    continue
                acker.drop()
            if channel.is_open:
                try:
                    channel.close()
                except Exception:
                    pass
        self._retired = keep

    def close_channel(self) -> None:
        """Close the channel: unacked messages go back to the queue."""
        channel, self._channel = self._channel, None
        acker, self._acker = self._acker, None
        self._generation += 1
        if acker is not None:
            # Acks made just before (say, by the last drained task) go out first.
            acker.flush(everything=True)
            acker.drop()
        if channel is not None and channel.is_open:
            try:
                channel.close()
            except Exception:
                pass
        retired, self._retired = self._retired, []
        for channel, acker in retired:
            if acker is not None:
                acker.flush(everything=True)
                acker.drop()
            if channel.is_open:
                try:
                    channel.close()
                except Exception:
                    pass


def mirror_cancel(channel, tag: str) -> defer.Deferred:
    return mirror(channel.basic_cancel(tag))
