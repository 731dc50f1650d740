# -*- test-case-name: tests.test_topology -*-
"""
Names and declarations of everything quebert keeps on the broker.

For an exchange name ``E`` (default ``quebert``) and each work queue ``Q``:

* ``E`` — direct exchange; ``Q`` is bound to it with routing key ``Q``.
* ``Q`` — the work queue (durable; classic or quorum).
* ``Q.errored`` — where tasks go when their attempts are spent or they
  cannot be run at all; reached through the default exchange.

Delays (retries, countdown, ETA) use a fixed set of ``LEVELS`` delay
queues, the binary decomposition known from NServiceBus: level ``n`` is a
queue ``E.qdelay.NN`` (quorum, the default) or ``E.delay.NN`` (classic)
whose messages all share one TTL of ``2**n`` ms, so expiry order is
queue order and nothing waits behind a longer delay.  The delay is written
in the routing key as ``LEVELS`` bits, most significant first, followed by
the destination queue::

    0.0. ... .1.0.1.0.Q        (bits of the delay in milliseconds, then Q)

Exchange ``E.qdelay.NN`` (topic) sends a message whose bit ``n`` is 1 into
queue ``E.qdelay.NN`` and one whose bit is 0 straight on to exchange
``E.qdelay.(N-1)``.  Expired messages are dead-lettered, routing key kept,
into the next lower exchange; after level 0 they reach the topic exchange
``E.delay.deliver``, which routes ``<LEVELS bits>.Q`` to ``Q``.  A delay of
``d`` ms therefore passes through as many queues as ``d`` has one-bits, and
the number of queues is ``LEVELS`` whatever the delays.

The two queue types have delay levels of their own names, so that a
deployment made with classic delay queues (quebert 0.1's default) keeps
its own tree of levels, untouched, while quorum ones are added beside it:
messages waiting in the old tree still end in ``E.delay.deliver`` and
their work queue, and nothing is routed twice.  Queues that exist with
other arguments than quebert would give them (declared by an earlier
release or by hand) are used as they are, with a warning, instead of
failing with ``406 PRECONDITION_FAILED`` (:meth:`Topology.declare_queue`).
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import pika.exceptions
from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from quebert._defer import mirror
from quebert.errors import ConfigurationError
from quebert.protocol import QUEUE_RE

log = Logger(namespace="quebert.amqp.topology")

#: Number of delay levels: delays up to 2**32 - 1 ms (about 49.7 days).
LEVELS = 32
MAX_DELAY_MS = 2**LEVELS - 1
QUEUE_TYPES = ("classic", "quorum")
#: Quorum queues: replicated on a cluster, and delays dead-letter at least once.
DEFAULT_QUEUE_TYPE = "quorum"
#: Deliveries of one message from a quorum work queue before the broker
#: itself moves it to the errored queue (a backstop for a message that
#: kills its worker before the state store records its attempt).
DEFAULT_DELIVERY_LIMIT = 20


def delay_bits(delay_ms: int) -> list[str]:
    """The ``LEVELS`` routing-key words encoding ``delay_ms``."""
    if not 0 <= delay_ms <= MAX_DELAY_MS:
        raise ValueError(f"delay {delay_ms} ms is outside 0..{MAX_DELAY_MS}")
    return list(format(delay_ms, f"0{LEVELS}b"))


@attrs.frozen
class Topology:
    """Names and arguments of quebert's exchanges and queues."""

    exchange: str = "quebert"
    queue_type: str = DEFAULT_QUEUE_TYPE
    #: TTL of messages in errored queues (ms); ``None`` keeps them forever.
    errored_ttl_ms: Optional[int] = 7 * 24 * 3600 * 1000
    #: Work queues another system declared (guillotina_amqp's, say, with a
    #: dead-letter exchange of its own): declared passively, so that they
    #: are used as they are instead of refused for their arguments.
    existing_queues: frozenset = attrs.field(default=frozenset(), converter=frozenset)
    #: Quorum work queues: deliveries of one message before the broker
    #: dead-letters it into the errored queue; ``None`` or 0 for no limit.
    delivery_limit: Optional[int] = DEFAULT_DELIVERY_LIMIT
    #: ``{queue: the broker's reason}``: queues found with other arguments
    #: and used as they are (each logged once, when first met).
    mismatched: dict = attrs.field(factory=dict, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.queue_type not in QUEUE_TYPES:
            raise ConfigurationError(
                f"queue_type must be one of {', '.join(QUEUE_TYPES)}, not {self.queue_type!r}"
            )
        limit = self.delivery_limit
        if limit is not None and (type(limit) is not int or limit < 0):
            raise ConfigurationError(
                f"delivery_limit must be a whole number >= 0, not {limit!r}")
        if not QUEUE_RE.fullmatch(self.exchange):
            raise ConfigurationError(f"{self.exchange!r} is not a valid exchange name")

    # -- names ---------------------------------------------------------

    @property
    def control_exchange(self) -> str:
        """Fanout exchange every worker listens on (cancel, pause, resume)."""
        return f"{self.exchange}.control"

    def errored_queue(self, queue: str) -> str:
        return f"{queue}.errored"

    @property
    def _delay_prefix(self) -> str:
        kind = "qdelay" if self.queue_type == "quorum" else "delay"
        return f"{self.exchange}.{kind}"

    def delay_exchange(self, level: int) -> str:
        return f"{self._delay_prefix}.{level:02d}"

    def delay_queue(self, level: int) -> str:
        return f"{self._delay_prefix}.{level:02d}"

    def delay_queues(self) -> list[str]:
        """Every delay queue of this topology, level 0 first."""
        return [self.delay_queue(level) for level in range(LEVELS)]

    def other_delay_queues(self) -> list[str]:
        """
        The delay queues of the other queue type: a deployment that
        switched type (0.1 declared classic ones by default) may still have
        tasks waiting there; they drain by themselves into the work queues.
        """
        other = "classic" if self.queue_type == "quorum" else "quorum"
        return attrs.evolve(self, queue_type=other).delay_queues()

    @property
    def deliver_exchange(self) -> str:
        return f"{self.exchange}.delay.deliver"

    def delay_route(self, delay_ms: int, queue: str) -> tuple[str, str]:
        """
        ``(exchange, routing_key)`` that delivers a message to ``queue``
        after ``delay_ms`` milliseconds.  The message enters at the level of
        its highest one-bit, skipping the empty levels above it.
        """
        bits = delay_bits(delay_ms)
        routing_key = ".".join(bits + [queue])
        if delay_ms == 0:
            return self.deliver_exchange, routing_key
        return self.delay_exchange(delay_ms.bit_length() - 1), routing_key

    # -- arguments -----------------------------------------------------

    def _type_arguments(self) -> dict[str, Any]:
        if self.queue_type == "quorum":
            return {"x-queue-type": "quorum"}
        return {}

    def work_queue_arguments(self, queue: Optional[str] = None) -> dict[str, Any]:
        """
        A work queue's arguments.  Quorum ones with a delivery limit (and
        ``queue``, the name, known) dead-letter a message delivered that
        many times into ``queue``'s errored queue, at least once.
        """
        arguments = self._type_arguments()
        if self.queue_type == "quorum" and self.delivery_limit and queue is not None:
            arguments.update({
                "x-delivery-limit": int(self.delivery_limit),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.errored_queue(queue),
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            })
        return arguments

    def errored_queue_arguments(self) -> dict[str, Any]:
        arguments = self._type_arguments()
        if self.errored_ttl_ms:
            arguments["x-message-ttl"] = int(self.errored_ttl_ms)
        return arguments

    def delay_queue_arguments(self, level: int) -> dict[str, Any]:
        arguments = self._type_arguments()
        arguments["x-message-ttl"] = 2**level
        arguments["x-dead-letter-exchange"] = (
            self.delay_exchange(level - 1) if level else self.deliver_exchange
        )
        if self.queue_type == "quorum":
            # Without these, quorum queues dead-letter at most once.
            arguments["x-dead-letter-strategy"] = "at-least-once"
            arguments["x-overflow"] = "reject-publish"
        return arguments

    # -- declarations ----------------------------------------------------

    @inlineCallbacks
    def declare_delays(self, protocol):
        """
        Declare the main and control exchanges and the delay levels
        (idempotent), on channels of ``protocol`` (anything with pika's
        ``channel()``) that are closed afterwards.
        """
        channels = _Channels(protocol)
        try:
            channel = yield channels.get()
            yield channel.exchange_declare(exchange=self.control_exchange,
                                           exchange_type="fanout", durable=True)
            yield channel.exchange_declare(exchange=self.exchange, exchange_type="direct",
                                           durable=True)
            yield channel.exchange_declare(
                exchange=self.deliver_exchange, exchange_type="topic", durable=True
            )
            for level in range(LEVELS):
                yield channel.exchange_declare(
                    exchange=self.delay_exchange(level), exchange_type="topic", durable=True
                )
            for level in range(LEVELS):
                prefix = "*." * (LEVELS - 1 - level)
                name = self.delay_queue(level)
                yield self._declare(channels, name, self.delay_queue_arguments(level))
                channel = yield channels.get()
                yield channel.queue_bind(queue=name, exchange=self.delay_exchange(level),
                                         routing_key=prefix + "1.#")
                yield channel.exchange_bind(
                    destination=self.delay_exchange(level - 1) if level
                    else self.deliver_exchange,
                    source=self.delay_exchange(level),
                    routing_key=prefix + "0.#",
                )
        finally:
            channels.close()

    @inlineCallbacks
    def declare_queue(self, protocol, queue: str, errored: bool = True):
        """
        Declare work queue ``queue``, its bindings and (unless ``errored``
        is false: producers leave that to workers, whose errored TTL may
        differ) its errored queue, on channels of ``protocol``.
        """
        if not QUEUE_RE.fullmatch(queue):
            raise ConfigurationError(f"{queue!r} is not a valid queue name")
        channels = _Channels(protocol)
        try:
            if queue in self.existing_queues:
                # Only checks that it exists (404 NOT_FOUND otherwise).
                channel = yield channels.get()
                yield channel.queue_declare(queue=queue, passive=True)
            else:
                yield self._declare(channels, queue, self.work_queue_arguments(queue))
            channel = yield channels.get()
            yield channel.queue_bind(queue=queue, exchange=self.exchange, routing_key=queue)
            yield channel.queue_bind(
                queue=queue, exchange=self.deliver_exchange, routing_key="*." * LEVELS + queue
            )
            if errored:
                yield self._declare(channels, self.errored_queue(queue),
                                    self.errored_queue_arguments())
        finally:
            channels.close()

    @inlineCallbacks
    def _declare(self, channels: _Channels, name: str, arguments: dict[str, Any]):
        """
        Declare durable queue ``name`` with ``arguments``; when it exists
        with other ones (``406 PRECONDITION_FAILED``: declared by an earlier
        release, another queue type, or by hand), check that it exists and
        use it as it is, warning once per process and queue.
        """
        channel = yield channels.get()
        try:
            yield channel.queue_declare(queue=name, durable=True, arguments=arguments)
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code != 406:
                raise
            channel = yield channels.get()
            yield channel.queue_declare(queue=name, passive=True)
            if name not in self.mismatched:
                self.mismatched[name] = e.reply_text
                log.warn(
                    "queue {queue} exists with other arguments than quebert declares "
                    "({reason}); using it as it is (docs/topology.rst, 'Upgrading and "
                    "migrating queues')", queue=name, reason=e.reply_text)

    @inlineCallbacks
    def waiting_in_other_delays(self, protocol):
        """
        ``{queue: ready messages}`` of the other queue type's delay queues
        that exist and hold messages (tasks delayed by an earlier release,
        still draining into their work queues).
        """
        channels = _Channels(protocol)
        found = {}
        try:
            for name in self.other_delay_queues():
                channel = yield channels.get()
                try:
                    frame = yield channel.queue_declare(queue=name, passive=True)
                except pika.exceptions.ChannelClosedByBroker as e:
                    if e.reply_code == 404:
                        continue
                    raise
                if frame.method.message_count:
                    found[name] = frame.method.message_count
        finally:
            channels.close()
        return found


class _Channels:
    """
    The channel declarations run on: a refused declaration closes its
    channel, and the next step opens a new one.  Closed at the end.
    """

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.channel: Any = None

    @inlineCallbacks
    def get(self):
        if self.channel is None or not self.channel.is_open:
            self.channel = yield mirror(self.protocol.channel())
        return self.channel

    def close(self) -> None:
        if self.channel is not None and self.channel.is_open:
            self.channel.close()
