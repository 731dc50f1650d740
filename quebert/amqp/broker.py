# -*- test-case-name: tests.test_amqp -*-
"""
``AMQPBroker``: the :class:`~quebert.interfaces.IBroker` on RabbitMQ.

Two connections, as RabbitMQ recommends: one publishes (and may be blocked
by a memory or disk alarm), the other consumes and acks, so flow control on
publishing never stops acknowledgements.

With ``beacon_interval``, each connection gets a liveness
:class:`~quebert.amqp.beacon.Beacon`; the consuming connection's beacons
are published through the publishing connection, so that the consuming
connection never publishes (and is never blocked by an alarm).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pika
from twisted.application.service import MultiService
from twisted.internet import defer
from zope.interface import implementer

from quebert.amqp import control
from quebert.amqp.beacon import Beacon
from quebert.amqp.connection import AMQPConnection
from quebert.amqp.consumer import QueueConsumer
from quebert.amqp.control import ControlListener
from quebert.amqp.publisher import Publisher, properties
from quebert.amqp.topology import MAX_DELAY_MS, Topology
from quebert.interfaces import IBroker


@implementer(IBroker)
class AMQPBroker(MultiService):
    """
    Publisher and consumers for one RabbitMQ node.

    :param consume: whether to open the consuming connection (a producer
        only needs the publishing one).
    :param beacon_interval: seconds between liveness beacons on each
        connection (0: no beacon).
    :param on_stuck: called with the :class:`Beacon` that gave up on a
        stuck connection (reconnecting did not help).
    """

    def __init__(self, url: str, topology: Optional[Topology] = None, *, reactor: Any = None,
                 consume: bool = True, name: str = "quebert", beacon_interval: float = 0.0,
                 on_stuck: Optional[Callable[[Beacon], Any]] = None) -> None:
        super().__init__()
        self.topology = topology or Topology()
        self.exchange = self.topology.exchange
        self.publishing = AMQPConnection(url, name=f"{name}-publisher", reactor=reactor)
        self.publishing.setServiceParent(self)
        self.reactor = self.publishing.reactor
        self.publisher = Publisher(self.publishing, self.topology, declare_errored=consume)
        self.consuming: Optional[AMQPConnection] = None
        if consume:
            self.consuming = AMQPConnection(url, name=f"{name}-consumer", reactor=reactor)
            self.consuming.setServiceParent(self)
        self.consumers: dict[str, QueueConsumer] = {}
        self.control: Optional[ControlListener] = None
        self.beacons: list[Beacon] = []
        if beacon_interval and beacon_interval > 0:
            self.beacons.append(Beacon(self.publishing, beacon_interval, on_gave_up=on_stuck))
            if self.consuming is not None:
                self.beacons.append(Beacon(self.consuming, beacon_interval,
                                           route=self.publishing, on_gave_up=on_stuck))
            for beacon in self.beacons:
                beacon.setServiceParent(self)

    # -- publishing ------------------------------------------------------

    def publish(self, queue: str, body: bytes, headers: dict, *, message_id: str,
                content_type: Optional[str] = "application/json", delay: float = 0.0):
        props = properties(message_id, headers, content_type=content_type)
        delay_ms = int(round(max(delay, 0.0) * 1000))
        if delay_ms <= 0:
            return self.publisher.publish(self.exchange, queue, body, props, declare=queue)
        exchange, routing_key = self.topology.delay_route(min(delay_ms, MAX_DELAY_MS), queue)
        return self.publisher.publish(exchange, routing_key, body, props, declare=queue)

    def publish_errored(self, queue: str, body: bytes, headers: dict, *,
                        message_id: Optional[str],
                        content_type: Optional[str] = "application/json"):
        props = properties(message_id, headers, content_type=content_type)
        return self.publisher.publish("", self.topology.errored_queue(queue), body, props,
                                      declare=queue)

    def publish_control(self, command: str, **fields: Any):
        """
        Broadcast a control command to every listening worker (confirmed;
        dropped, not failed, when no worker listens).
        """
        props = pika.BasicProperties(content_type="application/json", delivery_mode=1)
        return self.publisher.publish(self.topology.control_exchange, "",
                                      control.encode(command, **fields), props,
                                      mandatory=False)

    # -- consuming ---------------------------------------------------------

    def listen_control(self, on_message: Callable[[dict], Any]) -> None:
        """Hand control commands (see :mod:`quebert.amqp.control`) to ``on_message``."""
        if self.consuming is None:
            raise RuntimeError("this broker was built with consume=False")
        self.control = ControlListener(self.consuming, self.topology, on_message)

    def pause(self, queue: str):
        """Stop consuming ``queue`` (its tasks wait in RabbitMQ)."""
        return self.consumers[queue].pause()

    def resume(self, queue: str):
        """Consume ``queue`` again after :meth:`pause`."""
        return self.consumers[queue].resume()

    def consume(self, queue: str, prefetch: int, on_delivery: Callable) -> None:
        if self.consuming is None:
            raise RuntimeError("this broker was built with consume=False")
        if self.consuming.running:
            raise RuntimeError("add consumers before the broker starts")
        self.consumers[queue] = QueueConsumer(self.consuming, self.topology, queue, prefetch,
                                              on_delivery)

    @defer.inlineCallbacks
    def pause_consuming(self):
        yield defer.DeferredList([c.pause() for c in self.consumers.values()],
                                 consumeErrors=True)

    def close_consumers(self) -> None:
        for consumer in self.consumers.values():
            consumer.close_channel()

    def connections(self) -> list:
        """The AMQP connections this broker keeps."""
        return [c for c in (self.publishing, self.consuming) if c is not None]

    def whenConnected(self, fail_after_failures=None):
        """Fires once every connection of this broker is ready."""
        waits = [self.publishing.whenReady(fail_after_failures)]
        if self.consuming is not None:
            waits.append(self.consuming.whenReady(fail_after_failures))
        d = defer.gatherResults(waits, consumeErrors=True)
        return d.addErrback(lambda f: f.value.subFailure if f.check(defer.FirstError) else f)

    def stopService(self):
        self.publisher.stop()
        return super().stopService()
