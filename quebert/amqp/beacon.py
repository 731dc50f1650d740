# -*- test-case-name: tests.test_beacon -*-
"""
The liveness beacon: is this AMQP connection still delivering?

A TCP connection can stay open while nothing moves through it (a wedged
load balancer or NAT, a broker node that stopped serving it): heartbeats
may still pass, or be disabled, and the consumer just never gets another
message.  A :class:`Beacon` watches one :class:`AMQPConnection` by sending
itself a small message through the broker every ``interval`` seconds:

* on every (re)connection it declares, on the watched connection, an
  exclusive, auto-delete, server-named *beacon queue*, and an exclusive
  *beacon-delay queue* whose ``x-message-ttl`` (``interval * 1000`` ms)
  dead-letters (default exchange, routing key = the beacon queue) into the
  beacon queue, which it consumes;
* a ``LoopingCall`` publishes ``{"sent": <time>, "n": <seq>}`` into the
  delay queue; it comes back ``interval`` seconds later, plus the round
  trip;
* no beacon back for ``3 * interval`` means the connection is stuck: the
  figures are logged and the TCP connection is aborted, so that
  ``ClientService`` reconnects and the preparers re-declare and re-consume;
* if no beacon comes back within another ``3 * interval`` after the first
  reconnection attempt, :attr:`Beacon.on_gave_up` is called (the worker
  exits with :data:`quebert.worker.EXIT_STUCK_CONNECTION` so that its
  supervisor restarts it).

Beacons are *published* on the ``route`` connection, by default the
watched one.  The worker's consuming connection is watched with beacons
published through its publishing connection: a connection that publishes
during a resource alarm is blocked by RabbitMQ (it stops reading from it,
acks included), and keeping the consuming connection free of publishes is
why there are two connections.  An exclusive queue accepts messages
published by other connections.

While the route is blocked (``connection.blocked``), unavailable or
reconnecting, no beacon is sent and none is expected: a blocked or a
reconnecting connection is not a stuck one.  A connection that is lost on
its own (broker restart) is reconnected by ``ClientService`` as usual,
with no deadline: only a connection the beacon dropped has one.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

import pika
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from quebert.amqp.connection import AMQPConnection

log = Logger(namespace="quebert.amqp.beacon")

#: Beacons may be late by this many intervals before the connection is stuck.
STUCK_AFTER = 3
#: Largest beacon body read (anything bigger is not ours).
MAX_BEACON_SIZE = 1024


class Beacon(Service):
    """
    Liveness of ``connection``.

    :param interval: seconds between beacons, also their delay (TTL).
    :param route: the connection beacons are published on (default:
        ``connection`` itself).
    :param on_gave_up: called with this beacon when reconnecting did not
        bring beacons back.
    """

    def __init__(self, connection: AMQPConnection, interval: float, *,
                 route: Optional[AMQPConnection] = None, clock: Any = None,
                 on_gave_up: Optional[Callable[[Beacon], Any]] = None) -> None:
        if interval <= 0:
            raise ValueError("the beacon interval must be > 0")
        self.connection = connection
        self.route = route if route is not None else connection
        self.interval = float(interval)
        self.ttl_ms = max(1, int(round(self.interval * 1000)))
        self.bound = STUCK_AFTER * self.interval
        self.clock = clock if clock is not None else connection.reactor
        self.on_gave_up = on_gave_up
        self.name = connection.connection_name

        self._protocol: Any = None
        self._channel: Any = None
        self._queue: Optional[str] = None
        self._delay: Optional[str] = None
        self._sender: Any = None
        self._sender_protocol: Any = None

        #: Figures, for logs and tests.
        self.sent = 0
        self.received = 0
        self.last_sent_at: Optional[float] = None
        self.last_back_at: Optional[float] = None
        self.last_round_trip: Optional[float] = None
        self.armed_at: Optional[float] = None
        self.drops = 0
        self.dropped_at: Optional[float] = None
        self.gave_up = False

        self._deadline: Any = None
        self._giveup: Any = None
        self._attempt_after_drop = False
        self._reopening = False
        self._paused_for: Optional[str] = None
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock

        connection.add_preparer(self._prepare)
        if self.route is not connection:
            self.route.add_preparer(self._prepare_sender)
        self.route.add_blocked_listener(self._route_blocked)
        connection.add_attempt_listener(self._attempt)

    # -- service -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.gave_up = False
        if not self._loop.running:
            self._loop.start(self.interval, now=False)

    def stopService(self):
        if self._loop.running:
            self._loop.stop()
        self._disarm()
        self._cancel_giveup()
        return super().stopService()

    # -- (re)connections ------------------------------------------------

    async def _prepare(self, protocol) -> None:
        channel = await protocol.channel()
        frame = await channel.queue_declare(
            queue="", exclusive=True, auto_delete=True,
            arguments={"x-queue-type": "classic"})
        queue = frame.method.queue
        frame = await channel.queue_declare(
            queue="", exclusive=True, auto_delete=False,
            arguments={"x-queue-type": "classic", "x-message-ttl": self.ttl_ms,
                       "x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue})
        delay = frame.method.queue
        queue_object, _tag = await channel.basic_consume(queue=queue, auto_ack=True)
        self._protocol, self._channel = protocol, channel
        self._queue, self._delay = queue, delay
        if self.route is self.connection:
            self._sender, self._sender_protocol = channel, protocol
        closed = getattr(protocol, "closed", None)
        if closed is not None:
            closed.addBoth(self._lost, protocol)
        log.debug("beacon of AMQP {name} connection: every {interval}s through {delay} "
                  "into {queue}", name=self.name, interval=self.interval, delay=delay,
                  queue=queue)
        self._pump(queue_object, protocol)
        self._disarm()
        self._tick()  # the first beacon goes now, not an interval later

    async def _prepare_sender(self, protocol) -> None:
        channel = await protocol.channel()
        self._sender, self._sender_protocol = channel, protocol
        closed = getattr(protocol, "closed", None)
        if closed is not None:
            closed.addBoth(self._route_lost, protocol)
        self._tick()

    def _lost(self, reason: Any, protocol) -> Any:
        if protocol is self._protocol:
            self._protocol = self._channel = None
            if self._sender_protocol is protocol:
                self._sender = self._sender_protocol = None
            self._disarm()
        return reason

    def _route_lost(self, reason: Any, protocol) -> Any:
        if protocol is self._sender_protocol:
            self._sender = self._sender_protocol = None
            self._disarm()
        return reason

    def _attempt(self) -> None:
        """A connection attempt starts: after a drop, the last bound runs from here."""
        if self.dropped_at is None:
            return
        if not self._attempt_after_drop:
            self._attempt_after_drop = True
            self._start_giveup()
        elif self._giveup is None and self._deadline is None:
            # the reconnected connection was lost again before a beacon came back
            self._start_giveup()

    # -- sending -----------------------------------------------------------

    def _usable_sender(self) -> Any:
        sender = self._sender
        if sender is None or not sender.is_open:
            return None
        return sender

    def _why_not_armed(self) -> Optional[str]:
        """Why no beacon can be expected now, or None when one can."""
        protocol = self._protocol
        if (protocol is None or not protocol.is_open or self._channel is None
                or not self._channel.is_open):
            return "not connected"
        if self.route.blocked:
            return f"blocked by RabbitMQ ({self.route.blocked_reason})"
        if self.connection.blocked:
            return f"blocked by RabbitMQ ({self.connection.blocked_reason})"
        if self._usable_sender() is None:
            return f"the {self.route.connection_name} connection is not ready"
        return None

    def _tick(self) -> None:
        # A LoopingCall stops at its first uncaught exception: catch all.
        if not self.running:
            return
        try:
            if (self.route is not self.connection and self._sender is not None
                    and not self._sender.is_open):
                self._reopen_sender()
            why = self._why_not_armed()
            if why is not None:
                self._disarm()
                if why != self._paused_for and why != "not connected" and self.sent:
                    log.info("beacon of AMQP {name} connection paused: {why}",
                             name=self.name, why=why)
                self._paused_for = why
                return
            if self._paused_for is not None and self._paused_for != "not connected" and self.sent:
                log.info("beacon of AMQP {name} connection resumed", name=self.name)
            self._paused_for = None
            self._arm_if_possible()
            self._send()
        except Exception:
            log.failure("beacon of AMQP {name} connection failed to run", name=self.name)

    def _send(self) -> None:
        sender = self._usable_sender()
        if sender is None or self._delay is None:
            return
        now = self.clock.seconds()
        self.sent += 1
        body = json.dumps({"sent": now, "n": self.sent}, separators=(",", ":")).encode()
        properties = pika.BasicProperties(content_type="application/json", delivery_mode=1)
        try:
            d = sender.basic_publish("", self._delay, body, properties)
        except Exception as e:
            log.info("beacon of AMQP {name} connection not sent: {error}", name=self.name,
                     error=e)
            return
        self.last_sent_at = now
        if d is not None and hasattr(d, "addErrback"):
            d.addErrback(lambda f: log.info("beacon of AMQP {name} connection not sent: "
                                            "{error}", name=self.name,
                                            error=f.getErrorMessage()))

    # -- receiving ---------------------------------------------------------

    def _pump(self, queue_object, protocol) -> None:
        d = queue_object.get()
        d.addCallbacks(self._one, self._ended, callbackArgs=(queue_object, protocol),
                       errbackArgs=(protocol,))

    def _one(self, message, queue_object, protocol) -> None:
        try:
            if protocol is self._protocol:
                self._back(message[3] if isinstance(message, tuple) else message.body)
        except Exception:
            log.failure("beacon of AMQP {name} connection: bad beacon", name=self.name)
        self._pump(queue_object, protocol)

    def _ended(self, failure, protocol) -> None:
        if protocol is not self._protocol or not self.running:
            return None
        self._channel = None
        self._disarm()
        if not protocol.is_open:
            return None  # the connection went: the next one prepares again
        # The beacon queue was deleted (basic.cancel) or the channel closed
        # under us: declare new queues on a new channel of this connection.
        log.warn("beacon of AMQP {name} connection lost its queue ({error}); declaring "
                 "new ones", name=self.name, error=failure.getErrorMessage() or
                 type(failure.value).__name__)
        if self._sender_protocol is protocol and self.route is self.connection:
            self._sender = None

        def failed(f) -> None:
            log.warn("beacon of AMQP {name} connection: declaring new queues failed "
                     "({error}); reconnecting", name=self.name, error=f.getErrorMessage())
            self.connection.drop()

        defer.ensureDeferred(self._prepare(protocol)).addErrback(failed)
        return None

    def _reopen_sender(self) -> None:
        """The route's channel closed under a live connection: open another."""
        protocol = self._sender_protocol
        if self._reopening or protocol is None or not protocol.is_open:
            return
        self._reopening = True

        def opened(channel) -> None:
            if protocol is self._sender_protocol:
                self._sender = channel

        def failed(f) -> None:
            log.info("beacon of AMQP {name} connection: no channel on {route} ({error})",
                     name=self.name, route=self.route.connection_name,
                     error=f.getErrorMessage())

        def done(_) -> None:
            self._reopening = False

        d = defer.ensureDeferred(_channel_of(protocol))
        d.addCallbacks(opened, failed).addBoth(done)

    def _back(self, body: bytes) -> None:
        now = self.clock.seconds()
        sent = None
        if len(body) <= MAX_BEACON_SIZE:
            try:
                sent = float(json.loads(body)["sent"])
            except (ValueError, KeyError, TypeError):
                sent = None
        self.received += 1
        self.last_back_at = now
        if sent is not None:
            self.last_round_trip = max(0.0, now - sent - self.ttl_ms / 1000.0)
        if self.dropped_at is not None:
            log.warn(
                "AMQP {name} connection recovered: beacon back {seconds:.1f}s after the "
                "stuck connection was dropped (round trip {round_trip})", name=self.name,
                seconds=now - self.dropped_at, round_trip=_seconds(self.last_round_trip))
            self.dropped_at = None
            self._attempt_after_drop = False
            self._cancel_giveup()
        if self._why_not_armed() is None:
            self._arm(now)

    # -- deadlines -------------------------------------------------------

    def _arm_if_possible(self) -> None:
        if self._deadline is None and self.running and self._why_not_armed() is None:
            self._arm(self.clock.seconds())
            # After a drop, the beacon deadline of the new connection now
            # bounds the recovery (see _stuck).
            self._cancel_giveup()

    def _arm(self, now: float) -> None:
        """Expect a beacon back within ``bound`` seconds from ``now``."""
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        if self.armed_at is None:
            self.armed_at = now
        self._deadline = self.clock.callLater(self.bound, self._stuck)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self.armed_at = None

    def _stuck(self) -> None:
        self._deadline = None
        now = self.clock.seconds()
        since = self.last_back_at
        if self.armed_at is not None and (since is None or since < self.armed_at):
            since = self.armed_at
        self.armed_at = None
        figures = dict(
            name=self.name, age=now - since if since is not None else 0.0,
            interval=self.interval, bound=self.bound,
            last=("never" if self.last_back_at is None
                  else f"{now - self.last_back_at:.1f}s ago"),
            sent_ago=_seconds(None if self.last_sent_at is None else now - self.last_sent_at),
            sent=self.sent, received=self.received,
            round_trip=_seconds(self.last_round_trip))
        if self.dropped_at is not None:
            # Reconnecting did not bring beacons back.
            log.warn(
                "AMQP {name} connection is still stuck after reconnecting: no beacon back "
                "for {age:.1f}s (interval {interval}s, limit {bound}s; last beacon back "
                "{last}, last sent {sent_ago} ago, {sent} sent, {received} received)",
                **figures)
            self._give_up()
            if self.gave_up:
                return
        self.drops += 1
        log.warn(
            "AMQP {name} connection is stuck: no beacon back for {age:.1f}s (interval "
            "{interval}s, limit {bound}s; last beacon back {last}, last sent {sent_ago} ago, "
            "{sent} sent, {received} received, last round trip {round_trip}); dropping it "
            "to reconnect (drop #{drops})", drops=self.drops, **figures)
        self.dropped_at = now
        self._attempt_after_drop = False
        self._start_giveup()
        self._protocol = self._channel = None
        if self.route is self.connection:
            self._sender = self._sender_protocol = None
        if not self.connection.drop():
            log.info("AMQP {name} connection was already gone", name=self.name)

    def _start_giveup(self) -> None:
        self._cancel_giveup()
        if self.running:
            self._giveup = self.clock.callLater(self.bound, self._give_up)

    def _cancel_giveup(self) -> None:
        if self._giveup is not None and self._giveup.active():
            self._giveup.cancel()
        self._giveup = None

    def _route_blocked(self, blocked: bool) -> None:
        if blocked:
            # A blocked connection is not a stuck one (the broker talks to
            # it): stop expecting beacons, and forget an earlier drop.
            self._disarm()
            self._cancel_giveup()
            self.dropped_at = None
        else:
            self._arm_if_possible()

    def _give_up(self) -> None:
        self._giveup = None
        if self.gave_up or not self.running:
            return
        self.gave_up = True
        now = self.clock.seconds()
        log.critical(
            "AMQP {name} connection still brings no beacon back {seconds:.1f}s after the "
            "stuck connection was dropped (interval {interval}s, limit {bound}s after the "
            "reconnection attempt; {sent} sent, {received} received, last beacon back "
            "{last}); giving up",
            name=self.name, seconds=now - (self.dropped_at or now), interval=self.interval,
            bound=self.bound, sent=self.sent, received=self.received,
            last=("never" if self.last_back_at is None
                  else f"{now - self.last_back_at:.1f}s ago"))
        if self.on_gave_up is None:
            # nobody to stop: keep dropping and reconnecting
            self.gave_up = False
            self.dropped_at = None
            return
        try:
            self.on_gave_up(self)
        except Exception:
            log.failure("beacon give-up handler failed")


async def _channel_of(protocol) -> Any:
    return await protocol.channel()


def _seconds(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}s"
