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
queue ``E.delay.NN`` whose messages all share one TTL of ``2**n`` ms, so
expiry order is queue order and nothing waits behind a longer delay.  The
delay is written in the routing key as ``LEVELS`` bits, most significant
first, followed by the destination queue::

    0.0. ... .1.0.1.0.Q        (bits of the delay in milliseconds, then Q)

Exchange ``E.delay.NN`` (topic) sends a message whose bit ``n`` is 1 into
queue ``E.delay.NN`` and one whose bit is 0 straight on to exchange
``E.delay.(N-1)``.  Expired messages are dead-lettered, routing key kept,
into the next lower exchange; after level 0 they reach the topic exchange
``E.delay.deliver``, which routes ``<LEVELS bits>.Q`` to ``Q``.  A delay of
``d`` ms therefore passes through as many queues as ``d`` has one-bits, and
the number of queues is ``LEVELS`` whatever the delays.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
from twisted.internet.defer import inlineCallbacks

from quebert.errors import ConfigurationError
from quebert.protocol import QUEUE_RE

#: Number of delay levels: delays up to 2**32 - 1 ms (about 49.7 days).
LEVELS = 32
MAX_DELAY_MS = 2**LEVELS - 1
QUEUE_TYPES = ("classic", "quorum")


def delay_bits(delay_ms: int) -> list[str]:
    """The ``LEVELS`` routing-key words encoding ``delay_ms``."""
    if not 0 <= delay_ms <= MAX_DELAY_MS:
        raise ValueError(f"delay {delay_ms} ms is outside 0..{MAX_DELAY_MS}")
    return list(format(delay_ms, f"0{LEVELS}b"))


@attrs.frozen
class Topology:
    """Names and arguments of quebert's exchanges and queues."""

    exchange: str = "quebert"
    queue_type: str = "classic"
    #: TTL of messages in errored queues (ms); ``None`` keeps them forever.
    errored_ttl_ms: Optional[int] = 7 * 24 * 3600 * 1000
    #: Work queues another system declared (guillotina_amqp's, say, with a
    #: dead-letter exchange of its own): declared passively, so that they
    #: are used as they are instead of refused for their arguments.
    existing_queues: frozenset = attrs.field(default=frozenset(), converter=frozenset)

    def __attrs_post_init__(self) -> None:
        if self.queue_type not in QUEUE_TYPES:
            raise ConfigurationError(
                f"queue_type must be one of {', '.join(QUEUE_TYPES)}, not {self.queue_type!r}"
            )
        if not QUEUE_RE.fullmatch(self.exchange):
            raise ConfigurationError(f"{self.exchange!r} is not a valid exchange name")

    # -- names ---------------------------------------------------------

    @property
    def control_exchange(self) -> str:
        """Fanout exchange every worker listens on (cancel, pause, resume)."""
        return f"{self.exchange}.control"

    def errored_queue(self, queue: str) -> str:
        return f"{queue}.errored"

    def delay_exchange(self, level: int) -> str:
        return f"{self.exchange}.delay.{level:02d}"

    def delay_queue(self, level: int) -> str:
        return f"{self.exchange}.delay.{level:02d}"

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

    def work_queue_arguments(self) -> dict[str, Any]:
        return self._type_arguments()

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
    def declare_delays(self, channel):
        """Declare the main and control exchanges and the delay levels (idempotent)."""
        yield channel.exchange_declare(exchange=self.control_exchange, exchange_type="fanout",
                                       durable=True)
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
            yield channel.queue_declare(
                queue=name, durable=True, arguments=self.delay_queue_arguments(level)
            )
            yield channel.queue_bind(queue=name, exchange=self.delay_exchange(level),
                                     routing_key=prefix + "1.#")
            yield channel.exchange_bind(
                destination=self.delay_exchange(level - 1) if level else self.deliver_exchange,
                source=self.delay_exchange(level),
                routing_key=prefix + "0.#",
            )

    @inlineCallbacks
    def declare_queue(self, channel, queue: str, errored: bool = True):
        """
        Declare work queue ``queue``, its bindings and (unless ``errored``
        is false: producers leave that to workers, whose errored TTL may
        differ) its errored queue.
        """
        if not QUEUE_RE.fullmatch(queue):
            raise ConfigurationError(f"{queue!r} is not a valid queue name")
        if queue in self.existing_queues:
            # Only checks that it exists (404 NOT_FOUND otherwise).
            yield channel.queue_declare(queue=queue, passive=True)
        else:
            yield channel.queue_declare(queue=queue, durable=True,
                                        arguments=self.work_queue_arguments())
        yield channel.queue_bind(queue=queue, exchange=self.exchange, routing_key=queue)
        yield channel.queue_bind(
            queue=queue, exchange=self.deliver_exchange, routing_key="*." * LEVELS + queue
        )
        if errored:
            yield channel.queue_declare(
                queue=self.errored_queue(queue), durable=True,
                arguments=self.errored_queue_arguments(),
            )
