"""
The control channel and pausing consumers, on the real RabbitMQ (a fresh
vhost per test).
"""

from __future__ import annotations

from typing import Any, List

import pika
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from quebert.amqp import control
from quebert.amqp.broker import AMQPBroker
from quebert.amqp.topology import Topology
from tests._rabbit import make_vhost, wait_counts


async def wait_for(predicate: Any, timeout: float = 10.0, step: float = 0.02) -> None:
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError("condition not met in time")
        await deferLater(reactor, step, lambda: None)
        waited += step


class ControlMessageTests(TestCase):
    """Encoding and decoding: bad control messages are ignored, never fatal."""

    def test_round_trip(self) -> None:
        message = control.decode(control.encode(control.CANCEL, id="t1"))
        self.assertEqual((message["type"], message["id"]), ("cancel", "t1"))

    def test_garbage_is_ignored(self) -> None:
        for body in (b"\xff", b"[]", b"{}", b'{"type": "reboot"}', b'{"type": "cancel"}',
                     b'{"type": "pause", "queue": 3}', b"x" * 10000):
            self.assertIsNone(control.decode(body), body[:40])

    def test_unknown_command_cannot_be_sent(self) -> None:
        self.assertRaises(ValueError, control.encode, "reboot")


class ControlChannelTests(TestCase):
    """Real brokers in a fresh vhost."""

    timeout = 60

    def setUp(self) -> None:
        self.url = make_vhost(self)

    def broker(self, queues: List[str] = (), received: list | None = None,
               prefetch: int = 10) -> AMQPBroker:
        broker = AMQPBroker(self.url, Topology(), name="test")
        for queue in queues:
            broker.consume(queue, prefetch, received.append)
        return broker

    async def start(self, broker: AMQPBroker) -> None:
        broker.startService()
        self.addCleanup(broker.stopService)
        await broker.whenConnected()

    async def test_every_worker_gets_a_broadcast(self) -> None:
        """A control command reaches every listening worker, once each."""
        got: dict = {"a": [], "b": []}
        brokers = []
        for name in got:
            broker = self.broker()
            broker.listen_control(got[name].append)
            await self.start(broker)
            brokers.append(broker)
        await brokers[0].publish_control(control.CANCEL, id="task-1")
        await wait_for(lambda: all(got.values()))
        for messages in got.values():
            self.assertEqual([(m["type"], m["id"]) for m in messages], [("cancel", "task-1")])

    async def test_broadcast_without_listeners_is_not_an_error(self) -> None:
        """Nobody listening: the command is dropped, the publish does not fail."""
        broker = self.broker()
        await self.start(broker)
        await broker.publish_control(control.PAUSE, queue="default")

    async def test_garbage_on_the_control_exchange_is_survived(self) -> None:
        """A malformed message is ignored and the listener keeps listening."""
        got: list = []
        broker = self.broker()
        broker.listen_control(got.append)
        await self.start(broker)
        props = pika.BasicProperties()
        channel = await broker.publisher._get_channel()
        await channel.basic_publish(Topology().control_exchange, "", b"\x00not json", props)
        await broker.publish_control(control.RESUME, queue="q")
        await wait_for(lambda: got)
        self.assertEqual([m["type"] for m in got], ["resume"])
        self.assertEqual(broker.control.received, 2)

    async def test_listener_comes_back_after_reconnect(self) -> None:
        """The control queue is exclusive to a connection: a new one listens again."""
        got: list = []
        broker = self.broker()
        broker.listen_control(got.append)
        await self.start(broker)
        first = broker.control.queue
        # drop the consuming connection as a network fault would
        protocol = await broker.consuming.whenReady()
        protocol.transport.abortConnection()
        await wait_for(lambda: broker.control.queue != first, timeout=30)
        await broker.consuming.whenReady()
        await broker.publish_control(control.CANCEL, id="after")
        await wait_for(lambda: got)
        self.assertEqual(got[0]["id"], "after")


class PauseResumeTests(TestCase):
    """Pausing a consumer keeps tasks in RabbitMQ; resuming settles old deliveries."""

    timeout = 60

    def setUp(self) -> None:
        self.url = make_vhost(self)

    async def test_paused_queue_accepts_but_does_not_deliver(self) -> None:
        received: list = []
        broker = AMQPBroker(self.url, Topology(), name="test")
        broker.consume("jobs", 5, received.append)
        broker.startService()
        self.addCleanup(broker.stopService)
        await broker.whenConnected()
        await wait_for(lambda: broker.consumers["jobs"].consuming)
        for n in range(3):
            await broker.publish("jobs", b"{}", {}, message_id=f"m{n}")
        await wait_for(lambda: len(received) == 3)
        await broker.pause("jobs")
        for n in range(3, 6):
            await broker.publish("jobs", b"{}", {}, message_id=f"m{n}")
        await deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(len(received), 3)
        await wait_counts(self.url, "jobs", (3, 3))
        # deliveries from before the pause are still ackable after the resume
        await broker.resume("jobs")
        await wait_for(lambda: len(received) == 6)
        for delivery in received:
            self.assertTrue(delivery.ack())
        await deferLater(reactor, 0.3, lambda: None)
        await wait_counts(self.url, "jobs", (0, 0))
        # one channel: the resume reused the paused one
        self.assertIs(received[0]._channel, received[-1]._channel)

    async def test_pausing_twice_then_resuming(self) -> None:
        """A second pause (the API, then shutdown) returns at once and resume still works."""
        received: list = []
        broker = AMQPBroker(self.url, Topology(), name="test")
        broker.consume("jobs", 5, received.append)
        broker.startService()
        self.addCleanup(broker.stopService)
        await broker.whenConnected()
        await wait_for(lambda: broker.consumers["jobs"].consuming)
        await broker.pause("jobs")
        second = broker.pause("jobs")
        await wait_for(lambda: second.called, timeout=5)
        await broker.pause_consuming()
        await broker.resume("jobs")
        await broker.publish("jobs", b"{}", {}, message_id="m")
        await wait_for(lambda: received)
