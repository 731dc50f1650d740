# -*- test-case-name: tests.test_admin -*-
"""
Looking into RabbitMQ from a client: queue depths, and taking one task
back out of an errored queue.

Everything here uses short-lived channels on the publishing connection: a
passive declare or a ``basic.get`` that fails closes its channel, never the
connection or the confirmed publishing channel.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import pika.exceptions
from twisted.internet import defer
from twisted.logger import Logger

from quebert._defer import mirror
from quebert.amqp.connection import AMQPConnection
from quebert.amqp.topology import Topology

log = Logger(namespace="quebert.amqp.admin")

#: Messages of an errored queue looked at, at most, to find one task.
ERRORED_SCAN_LIMIT = 10000


@attrs.frozen
class ErroredMessage:
    """A task's message taken out of an errored queue."""

    body: bytes
    headers: dict
    content_type: Optional[str]
    message_id: Optional[str]


class BrokerAdmin:
    """Queue inspection over ``connection`` (the publishing one)."""

    def __init__(self, connection: AMQPConnection, topology: Topology) -> None:
        self.connection = connection
        self.topology = topology

    @defer.inlineCallbacks
    def _channel(self):
        protocol = yield self.connection.whenReady()
        channel = yield mirror(protocol.channel())
        return channel

    @defer.inlineCallbacks
    def depth(self, queue: str):
        """
        ``(ready, consumers)`` of ``queue``, or ``None`` when it does not
        exist.  (Unacked counts are not in AMQP; the state store knows how
        many tasks run.)
        """
        channel = yield self._channel()
        try:
            frame = yield mirror(channel.queue_declare(queue=queue, passive=True))
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code == 404:
                return None
            raise
        finally:
            if channel.is_open:
                channel.close()
        return frame.method.message_count, frame.method.consumer_count

    @defer.inlineCallbacks
    def take_errored(self, queue: str, task_id: str, republish: Any,
                     limit: int = ERRORED_SCAN_LIMIT):
        """
        Find the message of ``task_id`` in ``queue``'s errored queue, hand
        it to ``republish(ErroredMessage)`` (which must return a Deferred
        firing once the copy is safely published), then remove it.  Every
        other message looked at goes back where it was.  Fires with True
        if it was found and moved, False if not (within ``limit`` messages).
        """
        channel = yield self._channel()
        found = None
        try:
            for _ in range(limit):
                got = yield mirror(channel.basic_get(self.topology.errored_queue(queue)))
                if got is None:
                    break
                if got.properties.message_id == task_id:
                    found = got
                    break
            if found is None:
                return False
            properties = found.properties
            yield republish(ErroredMessage(
                body=found.body, headers=dict(properties.headers or {}),
                content_type=properties.content_type, message_id=properties.message_id))
            channel.basic_ack(found.method.delivery_tag)
            return True
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code == 404:
                return False
            raise
        finally:
            # unacked messages looked at go back to their places
            if channel.is_open:
                channel.close()
