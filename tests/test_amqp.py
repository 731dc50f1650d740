"""
Tests for quebert.amqp.consumer: ack coalescing per channel.

A fake channel records ``basic_ack``/``basic_nack`` frames, a fake
connection and protocol hand out such channels, and a ``Clock`` plays the
reactor, so "the end of the reactor turn" is ``clock.advance(0)``.
"""

from __future__ import annotations

import pika.exceptions
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from quebert.amqp.consumer import ACK_HOLD, Delivery, QueueConsumer, _Acker


class FakeChannel:
    """Records settlement frames as a pika ``TwistedChannel`` would send them."""

    def __init__(self):
        self.is_open = True
        self.frames: list = []
        self.queue_object = FakeQueue()
        self.closes = 0

    def basic_ack(self, delivery_tag=0, multiple=False):
        if not self.is_open:
            raise pika.exceptions.ChannelWrongStateError("Channel is closed.")
        self.frames.append(("ack", delivery_tag, multiple))

    def basic_nack(self, delivery_tag=0, multiple=False, requeue=True):
        if not self.is_open:
            raise pika.exceptions.ChannelWrongStateError("Channel is closed.")
        self.frames.append(("nack", delivery_tag, multiple, requeue))

    def basic_qos(self, prefetch_count=0):
        return defer.succeed(None)

    def basic_consume(self, queue):
        return defer.succeed((self.queue_object, "ctag"))

    def close(self):
        self.closes += 1
        self.is_open = False

    def settled_tags(self, upto):
        """Which tags 1..upto the broker would consider acked or nacked."""
        acked, nacked = set(), set()
        unacked = set(range(1, upto + 1))
        for frame in self.frames:
            kind, tag, multiple = frame[:3]
            covered = {t for t in unacked if t <= tag} if multiple else {tag}
            assert covered <= unacked, f"{frame} settles an already settled tag"
            unacked -= covered
            (acked if kind == "ack" else nacked).update(covered)
        return acked, nacked


class FakeQueue:
    """pika's ClosableDeferredQueue, as the consumer uses it."""

    def __init__(self):
        self.items: list = []
        self.waiting = None

    def get(self):
        if self.items:
            item = self.items.pop(0)
            return defer.fail(item) if isinstance(item, Exception) else defer.succeed(item)
        self.waiting = defer.Deferred()
        return self.waiting

    def put(self, item):
        if self.waiting is not None:
            waiting, self.waiting = self.waiting, None
            if isinstance(item, Exception):
                waiting.errback(item)
            else:
                waiting.callback(item)
        else:
            self.items.append(item)


class FakeProtocol:
    is_open = True

    def __init__(self):
        self.channels: list = []

    def channel(self):
        channel = FakeChannel()
        self.channels.append(channel)
        return defer.succeed(channel)


class FakeConnection:
    running = True

    def __init__(self, clock):
        self.reactor = clock
        self.preparers: list = []

    def add_preparer(self, preparer):
        self.preparers.append(preparer)


class FakeTopology:
    def declare_queue(self, protocol, queue):
        return defer.succeed(None)


class Method:
    def __init__(self, tag):
        self.delivery_tag = tag
        self.redelivered = False


class Properties:
    headers = None
    content_type = "application/json"

    def __init__(self, tag):
        self.message_id = f"m{tag}"


class Message:
    def __init__(self, channel, tag):
        self.channel = channel
        self.method = Method(tag)
        self.properties = Properties(tag)
        self.body = b"{}"


class AckerTests(SynchronousTestCase):
    """The coalescing rules, on one channel."""

    def setUp(self):
        self.clock = Clock()
        self.channel = FakeChannel()
        self.acker = _Acker(self.channel, self.clock)

    def deliver(self, count):
        for tag in range(1, count + 1):
            self.acker.delivered(tag)

    def test_in_order_acks_coalesce(self):
        """Acks made in one turn go out at its end as one multiple ack."""
        self.deliver(5)
        for tag in range(1, 6):
            self.assertTrue(self.acker.ack(tag))
        self.assertEqual(self.channel.frames, [])
        self.clock.advance(0)
        self.assertEqual(self.channel.frames, [("ack", 5, True)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_single_ack_is_not_multiple(self):
        self.deliver(3)
        self.acker.ack(1)
        self.clock.advance(0)
        self.assertEqual(self.channel.frames, [("ack", 1, False)])

    def test_out_of_order_never_covers_unsettled(self):
        """
        An ack behind a still-running delivery waits for the gap to fill,
        then joins the multiple ack; no frame ever covers tag 2 early.
        """
        self.deliver(4)
        self.acker.ack(1)
        self.acker.ack(3)
        self.acker.ack(4)
        self.clock.advance(0)
        self.assertEqual(self.channel.frames, [("ack", 1, False)])
        self.acker.ack(2)
        self.clock.advance(0)
        self.assertEqual(self.channel.frames, [("ack", 1, False), ("ack", 4, True)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_held_ack_goes_out_alone_after_hold(self):
        """An ack stuck behind a long task is sent on its own within ACK_HOLD."""
        self.deliver(3)
        self.acker.ack(2)
        self.acker.ack(3)
        self.clock.advance(0)
        self.assertEqual(self.channel.frames, [])
        self.clock.advance(ACK_HOLD)
        self.assertEqual(self.channel.frames, [("ack", 2, False), ("ack", 3, False)])
        acked, _ = self.channel.settled_tags(3)
        self.assertEqual(acked, {2, 3})
        # Tag 1 finishes later: alone, and nothing left pending.
        self.acker.ack(1)
        self.clock.advance(0)
        self.assertEqual(self.channel.frames[-1], ("ack", 1, False))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_nack_between_acks(self):
        """
        A nack goes out at once, single, after the acks queued before it; a
        later multiple ack spanning its tag is sent after it.
        """
        self.deliver(4)
        self.acker.ack(1)
        self.assertTrue(self.acker.nack(2, True))
        self.assertEqual(self.channel.frames, [("ack", 1, False), ("nack", 2, False, True)])
        self.acker.ack(3)
        self.acker.ack(4)
        self.clock.advance(0)
        self.assertEqual(self.channel.frames[-1], ("ack", 4, True))
        acked, nacked = self.channel.settled_tags(4)
        self.assertEqual((acked, nacked), ({1, 3, 4}, {2}))

    def test_nack_flushes_held_acks_first(self):
        """Acks held behind a gap go out before a nack that follows them."""
        self.deliver(3)
        self.acker.ack(2)
        self.acker.nack(3, False)
        self.assertEqual(self.channel.frames, [("ack", 2, False), ("nack", 3, False, False)])
        self.acker.ack(1)
        self.clock.advance(0)
        acked, nacked = self.channel.settled_tags(3)
        self.assertEqual((acked, nacked), ({1, 2}, {3}))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_random_orders_are_safe(self):
        """Whatever the order of acks, nacks and turns, every frame is valid."""
        import random
        rng = random.Random(7)
        for _ in range(200):
            clock, channel = Clock(), FakeChannel()
            acker = _Acker(channel, clock)
            count = rng.randint(1, 12)
            for tag in range(1, count + 1):
                acker.delivered(tag)
            order = list(range(1, count + 1))
            rng.shuffle(order)
            nacked = set(rng.sample(order, rng.randint(0, min(2, count))))
            for tag in order:
                if tag in nacked:
                    acker.nack(tag, True)
                else:
                    acker.ack(tag)
                if rng.random() < 0.3:
                    clock.advance(rng.choice([0, ACK_HOLD]))
            clock.advance(0)
            clock.advance(ACK_HOLD)
            acked_on_wire, nacked_on_wire = channel.settled_tags(count)
            self.assertEqual(nacked_on_wire, nacked)
            self.assertEqual(acked_on_wire, set(range(1, count + 1)) - nacked)
            self.assertEqual(clock.getDelayedCalls(), [])

    def test_closed_channel_drops_pending(self):
        """Acks pending when the channel closes are dropped, not raised."""
        self.deliver(2)
        self.assertTrue(self.acker.ack(1))
        self.channel.is_open = False
        self.clock.advance(0)
        self.assertEqual(self.channel.frames, [])
        self.assertFalse(self.acker.ack(2))
        self.assertFalse(self.acker.nack(2, True))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_send_failure_drops(self):
        """A channel that turns out closed while sending: dropped, no error."""
        self.deliver(1)
        self.acker.ack(1)

        def closed(*a, **kw):
            raise pika.exceptions.ChannelWrongStateError("Channel is closed.")
        self.channel.basic_ack = closed
        self.clock.advance(0)
        self.assertTrue(self.acker.dead)


class DeliveryTests(SynchronousTestCase):
    def test_ack_return_values(self):
        clock, channel = Clock(), FakeChannel()
        acker = _Acker(channel, clock)
        acker.delivered(1)
        delivery = Delivery("q", b"", {}, None, "m1", False, channel=channel, tag=1,
                            acker=acker)
        self.assertTrue(delivery.ack())
        self.assertFalse(delivery.ack())
        self.assertFalse(delivery.nack())
        clock.advance(0)
        self.assertEqual(channel.frames, [("ack", 1, False)])

    def test_ack_on_closed_channel(self):
        clock, channel = Clock(), FakeChannel()
        acker = _Acker(channel, clock)
        acker.delivered(1)
        delivery = Delivery("q", b"", {}, None, "m1", False, channel=channel, tag=1,
                            acker=acker)
        channel.is_open = False
        self.assertFalse(delivery.ack())


class QueueConsumerTests(SynchronousTestCase):
    """The consumer hands out deliveries bound to their channel's acker."""

    def setUp(self):
        self.clock = Clock()
        self.connection = FakeConnection(self.clock)
        self.protocol = FakeProtocol()
        self.deliveries: list = []
        self.consumer = QueueConsumer(self.connection, FakeTopology(), "q", 10,
                                      self.deliveries.append)
        self.successResultOf(self.consumer._prepare(self.protocol))
        # (the declarations open channels of their own: FakeTopology opens none)
        self.channel = self.protocol.channels[0]

    def put(self, channel, *tags):
        for tag in tags:
            channel.queue_object.put(Message(channel, tag))

    def test_acks_of_one_turn_coalesce(self):
        self.put(self.channel, 1, 2, 3)
        self.assertEqual(len(self.deliveries), 3)
        for delivery in self.deliveries:
            self.assertTrue(delivery.ack())
        self.clock.advance(0)
        self.assertEqual(self.channel.frames, [("ack", 3, True)])

    def test_old_tags_never_ack_on_new_channel(self):
        """
        After the channel dies and the consumer re-consumes on a new one,
        acks of the old deliveries go nowhere, and a multiple ack on the new
        channel covers only its own tags.
        """
        self.put(self.channel, 1, 2)
        old = list(self.deliveries)
        self.assertTrue(old[0].ack())
        self.channel.is_open = False
        self.channel.queue_object.put(pika.exceptions.ChannelClosed(0, "gone"))
        self.clock.advance(0)
        self.assertEqual(self.channel.frames, [])

        self.clock.advance(1)
        self.assertEqual(len(self.protocol.channels), 2)
        new_channel = self.protocol.channels[1]
        self.assertTrue(self.consumer.consuming)
        self.put(new_channel, 1)
        self.assertFalse(old[1].ack())
        self.assertTrue(self.deliveries[-1].ack())
        self.clock.advance(0)
        self.assertEqual(new_channel.frames, [("ack", 1, False)])
        self.assertEqual(self.channel.frames, [])

    def test_close_channel_flushes_first(self):
        """A clean stop sends the acks made just before it, then closes."""
        self.put(self.channel, 1, 2, 3)
        self.deliveries[0].ack()
        self.deliveries[2].ack()
        self.consumer.close_channel()
        self.assertEqual(self.channel.frames, [("ack", 1, False), ("ack", 3, False)])
        self.assertEqual(self.channel.closes, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ReadSizeTests(SynchronousTestCase):
    """The broker connection reads READ_SIZE bytes at a time (pika re-slices its buffer)."""

    def make_protocol(self):
        import pika
        from twisted.internet.testing import MemoryReactorClock, StringTransport

        from quebert.amqp.connection import _PikaFactory

        factory = _PikaFactory(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/"),
                               MemoryReactorClock())
        return factory.buildProtocol(None), StringTransport()

    def test_a_larger_read_size_is_lowered(self):
        from pika.adapters.twisted_connection import TwistedProtocolConnection

        from quebert.amqp.connection import READ_SIZE

        protocol, transport = self.make_protocol()
        self.assertIsInstance(protocol, TwistedProtocolConnection)
        transport.bufferSize = 65536
        protocol.makeConnection(transport)
        self.assertEqual(transport.bufferSize, READ_SIZE)
        # the handshake goes on as before: pika sent the protocol header
        self.assertTrue(transport.value().startswith(b"AMQP"))

    def test_a_smaller_read_size_or_none_is_left_alone(self):
        protocol, transport = self.make_protocol()
        transport.bufferSize = 4096
        protocol.makeConnection(transport)
        self.assertEqual(transport.bufferSize, 4096)
        protocol, transport = self.make_protocol()
        protocol.makeConnection(transport)  # (a TLS wrapper has no bufferSize)
        self.assertFalse(hasattr(transport, "bufferSize"))


class RetryLogTests(TestCase):
    """Reconnect log lines count the attempts that failed the AMQP set-up too."""

    timeout = 60

    async def _test(self) -> None:
        import uuid

        from twisted.logger import globalLogPublisher

        from quebert.amqp.connection import AMQPConnection
        from tests._worker import wait_for

        retries: list = []

        def observe(event: dict) -> None:
            if str(event.get("log_format", "")).startswith("Scheduling retry") \
                    and event.get("log_source") is connection:
                retries.append(event["attempt"])

        # RabbitMQ takes the TCP connection, then refuses the vhost: before,
        # each retry was logged "retry 1" while the delays grew.
        connection = AMQPConnection(
            f"amqp://guest:guest@127.0.0.1:5672/quebert-no-such-vhost-{uuid.uuid4().hex[:8]}",
            name="test", retry_policy=lambda failures: 0.05)
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        connection.startService()
        self.addCleanup(connection.stopService)
        await wait_for(lambda: len(retries) >= 3, 30, what="three retries")
        self.assertEqual(retries[:3], [1, 2, 3])
        self.assertGreaterEqual(connection.failed_preparations, 3)

    def test_retries_after_a_refused_set_up_are_numbered(self):
        return defer.ensureDeferred(self._test())
