# -*- test-case-name: tests.test_control -*-
"""
The control channel: messages every worker must see at once.

A fanout exchange ``{exchange}.control`` carries small JSON commands::

    {"type": "cancel", "id": "<task id>", "sent_at": 1767225600.0}
    {"type": "pause",  "queue": "default", "sent_at": ...}
    {"type": "resume", "queue": "default", "sent_at": ...}

Each worker binds an exclusive, auto-delete, server-named queue to it on
every (re)connection and consumes it without acks: a command is a nudge to
the workers alive right now.  What must survive a worker that was not
listening lives in the state store (a canceled task's record, the set of
paused queues), and workers consult it when they start or meet a task.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import pika
from twisted.internet import defer
from twisted.logger import Logger

from quebert.amqp.topology import Topology

if TYPE_CHECKING:
    # Only an annotation: the Guillotina bridge encodes control messages
    # with this module in an asyncio process, where importing pika's Twisted
    # adapter would install a reactor.
    from quebert.amqp.connection import AMQPConnection

log = Logger(namespace="quebert.control")

CANCEL = "cancel"
PAUSE = "pause"
RESUME = "resume"
COMMANDS = frozenset({CANCEL, PAUSE, RESUME})

#: Largest control message read; anything bigger is not one of ours.
MAX_CONTROL_SIZE = 4096


def encode(command: str, **fields: Any) -> bytes:
    """The body of a control message."""
    if command not in COMMANDS:
        raise ValueError(f"unknown control command {command!r}")
    return json.dumps({"type": command, "sent_at": time.time(), **fields},
                      separators=(",", ":")).encode("utf-8")


def decode(body: bytes) -> Optional[dict]:
    """A control message as a dict, or ``None`` (logged) if it is not one."""
    if len(body) > MAX_CONTROL_SIZE:
        log.warn("ignoring a {size}-byte control message", size=len(body))
        return None
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        log.warn("ignoring a control message that is not JSON")
        return None
    if not isinstance(message, dict) or message.get("type") not in COMMANDS:
        log.warn("ignoring an unknown control message")
        return None
    key = "id" if message["type"] == CANCEL else "queue"
    if not isinstance(message.get(key), str):
        log.warn("ignoring a {type} control message without {key}", type=message["type"],
                 key=key)
        return None
    return message


class ControlListener:
    """
    Consumes the control exchange on ``connection``, handing each valid
    message (a dict) to ``on_message``.
    """

    def __init__(self, connection: AMQPConnection, topology: Topology,
                 on_message: Callable[[dict], Any]) -> None:
        self.connection = connection
        self.topology = topology
        self.on_message = on_message
        self.queue: Optional[str] = None
        self.received = 0
        self._protocol: Any = None
        connection.add_preparer(self._prepare)

    @defer.inlineCallbacks
    def _prepare(self, protocol):
        self._protocol = protocol
        channel = yield protocol.channel()
        exchange = self.topology.control_exchange
        yield channel.exchange_declare(exchange=exchange, exchange_type="fanout", durable=True)
        frame = yield channel.queue_declare(queue="", exclusive=True, auto_delete=True,
                                            arguments={"x-queue-type": "classic"})
        queue = frame.method.queue
        yield channel.queue_bind(queue=queue, exchange=exchange, routing_key="")
        queue_object, _ = yield channel.basic_consume(queue=queue, auto_ack=True)
        self.queue = queue
        log.debug("listening for control messages on {queue}", queue=queue)
        self._pump(queue_object)

    def _pump(self, queue_object) -> None:
        d = queue_object.get()
        d.addCallbacks(self._one, self._ended, callbackArgs=(queue_object,))

    def _one(self, message, queue_object) -> None:
        _channel, _method, _properties, body = message
        self.received += 1
        command = decode(body)
        if command is not None:
            try:
                self.on_message(command)
            except Exception:
                log.failure("control message handler failed for {command}", command=command)
        self._pump(queue_object)

    def _ended(self, failure) -> None:
        # The channel or connection went away; the next connection's
        # preparer listens again.  A broker-side cancel (queue deleted by
        # an operator) also lands here: listen again on this connection.
        if failure.check(pika.exceptions.ConsumerCancelled) and self.connection.running:
            log.warn("control consumer cancelled by the broker; listening again")
            protocol = self._protocol
            if protocol is not None and protocol.is_open:
                self._prepare(protocol).addErrback(
                    lambda f: log.failure("listening for control messages failed", f))
        return None
