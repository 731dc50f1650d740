"""
Tests for liveness: the beacon (quebert.amqp.beacon), the stuck consumer
check (quebert.amqp.stuck), blocked connections (quebert.amqp.connection
and the publisher).

The unit tests run on a ``Clock`` with a simulated broker (queues, TTL,
dead-lettering, connections that can freeze); the integration tests run
real ``twistd amqp-worker`` processes against RabbitMQ, through a loopback
proxy that can freeze traffic without closing sockets.
"""

from __future__ import annotations

import itertools
import re
import time
import uuid

import pika
import pika.exceptions
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from quebert.amqp.admin import BrokerAdmin
from quebert.amqp.beacon import Beacon
from quebert.amqp.broker import AMQPBroker
from quebert.amqp.connection import AMQPConnection
from quebert.amqp.consumer import QueueConsumer
from quebert.amqp.publisher import Publisher
from quebert.amqp.stuck import StuckConsumerCheck
from quebert.amqp.topology import Topology
from quebert.config import WorkerConfig, from_mapping
from quebert.errors import ConfigurationError
from quebert.tap import Options
from tests import test_amqp
from tests._proxy import FreezableProxy
from tests._rabbit import (
    RABBIT_HOST,
    RABBIT_PORT,
    _rabbitmqctl_sync,
    make_vhost,
    rabbitmqctl,
    vhost_of,
)
from tests._worker import WorkerProcess, sleep, wait_for
from tests.test_integration import REDIS_URL, IntegrationTestCase

# -- a simulated broker ---------------------------------------------------------


class Frame:
    def __init__(self, **fields):
        for key, value in fields.items():
            setattr(self, key, value)


class SimQueueObject:
    """pika's ClosableDeferredQueue, as far as the beacon uses it."""

    def __init__(self):
        self.items: list = []
        self.waiting = None

    def get(self):
        if self.items:
            return defer.succeed(self.items.pop(0))
        self.waiting = defer.Deferred()
        return self.waiting

    def put(self, item):
        if self.waiting is not None:
            waiting, self.waiting = self.waiting, None
            waiting.callback(item)
        else:
            self.items.append(item)

    def close(self, error):
        if self.waiting is not None:
            waiting, self.waiting = self.waiting, None
            waiting.errback(error)


class SimBroker:
    """Queues with TTL and dead-lettering, on a Clock."""

    def __init__(self, clock):
        self.clock = clock
        self.queues: dict = {}  # name -> {"arguments", "consumer", "owner"}
        self.names = itertools.count(1)

    def declare(self, owner, queue, arguments, **flags):
        name = queue or f"amq.gen-{next(self.names)}"
        self.queues[name] = {"arguments": dict(arguments or {}), "flags": flags,
                             "consumer": None, "owner": owner}
        return name

    def publish(self, publisher, routing_key, body):
        if publisher.frozen or not publisher.is_open:
            return
        queue = self.queues.get(routing_key)
        if queue is None:
            return
        ttl = queue["arguments"].get("x-message-ttl")
        if ttl is not None:
            target = queue["arguments"]["x-dead-letter-routing-key"]
            self.clock.callLater(ttl / 1000.0, self.deliver, target, body)
        else:
            self.deliver(routing_key, body)

    def deliver(self, name, body):
        queue = self.queues.get(name)
        if queue is None or queue["consumer"] is None:
            return
        owner = queue["owner"]
        if owner.frozen or not owner.is_open:
            return
        queue["consumer"].put(Frame(body=body))

    def drop_owned_by(self, owner):
        for name in [n for n, q in self.queues.items() if q["owner"] is owner]:
            del self.queues[name]


class SimChannel:
    def __init__(self, protocol):
        self.protocol = protocol
        self.broker = protocol.broker
        self.is_open = True
        self.published: list = []
        self.declared: list = []
        self.fail_publish = None

    def queue_declare(self, queue="", exclusive=False, auto_delete=False, arguments=None,
                      passive=False, durable=False):
        name = self.broker.declare(self.protocol, queue, arguments, exclusive=exclusive,
                                   auto_delete=auto_delete)
        self.declared.append((name, exclusive, auto_delete, dict(arguments or {})))
        return defer.succeed(Frame(method=Frame(queue=name)))

    def basic_consume(self, queue, auto_ack=False):
        queue_object = SimQueueObject()
        self.broker.queues[queue]["consumer"] = queue_object
        self.consumed = queue_object
        return defer.succeed((queue_object, f"ctag-{queue}"))

    def break_(self, error):
        """The broker closes this channel."""
        self.is_open = False
        consumed = getattr(self, "consumed", None)
        if consumed is not None:
            consumed.close(error)

    def basic_publish(self, exchange, routing_key, body, properties=None):
        if self.fail_publish is not None:
            raise self.fail_publish
        self.published.append((exchange, routing_key, body))
        self.broker.publish(self.protocol, routing_key, body)
        return defer.succeed(None)

    def close(self):
        self.is_open = False


class SimTransport:
    def __init__(self, protocol):
        self.protocol = protocol
        self.connected = True
        self.aborts = 0

    def abortConnection(self):
        self.aborts += 1
        self.connected = False
        self.protocol.lose("aborted")


class SimProtocol:
    def __init__(self, broker, frozen=False):
        self.broker = broker
        self.frozen = frozen
        self.is_open = True
        self.closed = defer.Deferred()
        self.transport = SimTransport(self)
        self.channels: list = []

    def channel(self):
        channel = SimChannel(self)
        self.channels.append(channel)
        return defer.succeed(channel)

    def lose(self, reason):
        if not self.is_open:
            return
        self.is_open = False
        for channel in self.channels:
            channel.is_open = False
        self.broker.drop_owned_by(self)
        self.closed.callback(reason)


class SimConnection:
    """An AMQPConnection stand-in: preparers, blocked and attempt listeners."""

    def __init__(self, clock, broker, name):
        self.reactor = clock
        self.broker = broker
        self.connection_name = name
        self.preparers: list = []
        self.blocked_listeners: list = []
        self.attempt_listeners: list = []
        self.blocked = False
        self.blocked_reason = None
        self.current = None
        self.latest = None
        self.drops = 0
        self.running = True

    def add_preparer(self, preparer):
        self.preparers.append(preparer)

    def add_blocked_listener(self, listener):
        self.blocked_listeners.append(listener)

    def add_attempt_listener(self, listener):
        self.attempt_listeners.append(listener)

    def attempt(self, frozen=False):
        """A connection attempt; with ``frozen``, the handshake never completes."""
        for listener in self.attempt_listeners:
            listener()
        protocol = SimProtocol(self.broker, frozen=frozen)
        self.latest = protocol
        if frozen:
            return protocol
        for preparer in self.preparers:
            result = preparer(protocol)
            if hasattr(result, "__await__"):
                result = defer.ensureDeferred(result)
            if isinstance(result, defer.Deferred):
                self.test.successResultOf(result)
        self.current = protocol
        protocol.closed.addBoth(self._lost, protocol)
        return protocol

    def _lost(self, reason, protocol):
        if self.current is protocol:
            self.current = None
        if self.blocked:
            self.set_blocked(False)
        return reason

    def drop(self):
        protocol = self.current or self.latest
        if protocol is None or not protocol.transport.connected:
            return False
        self.drops += 1
        protocol.transport.abortConnection()
        return True

    def set_blocked(self, blocked):
        self.blocked = blocked
        self.blocked_reason = "low on memory" if blocked else None
        for listener in self.blocked_listeners:
            listener(blocked)


class LogCapture:
    def __init__(self, testcase):
        self.events: list = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def matching(self, fragment):
        return [e for e in self.events if fragment in e.get("log_format", "")]


# -- the beacon -----------------------------------------------------------------


class BeaconTests(SynchronousTestCase):
    interval = 2.0

    def setUp(self):
        self.clock = Clock()
        self.broker = SimBroker(self.clock)
        self.connection = SimConnection(self.clock, self.broker, "publisher")
        self.connection.test = self
        self.gave_up: list = []
        self.beacon = Beacon(self.connection, self.interval, clock=self.clock,
                             on_gave_up=self.gave_up.append)
        self.logs = LogCapture(self)
        self.beacon.startService()
        self.addCleanup(self.beacon.stopService)

    def run_for(self, seconds, step=0.1):
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(step)

    def test_declares_exclusive_queues_with_ttl_in_milliseconds(self):
        """
        The beacon queue is exclusive, auto-delete and server-named; the
        delay queue is exclusive and dead-letters into it after
        ``interval * 1000`` milliseconds.
        """
        beacon = Beacon(SimConnection(self.clock, self.broker, "x"), 2.5, clock=self.clock)
        protocol = SimProtocol(self.broker)
        self.successResultOf(defer.ensureDeferred(beacon._prepare(protocol)))
        (queue, q_exclusive, q_auto, q_args), (delay, d_exclusive, _, d_args) = (
            protocol.channels[0].declared)
        self.assertTrue(queue.startswith("amq.gen-"))
        self.assertTrue(q_exclusive)
        self.assertTrue(q_auto)
        self.assertTrue(d_exclusive)
        self.assertEqual(d_args["x-message-ttl"], 2500)
        self.assertIsInstance(d_args["x-message-ttl"], int)
        self.assertEqual(d_args["x-dead-letter-exchange"], "")
        self.assertEqual(d_args["x-dead-letter-routing-key"], queue)
        self.assertEqual(q_args["x-queue-type"], "classic")
        self.assertEqual(Beacon(SimConnection(self.clock, self.broker, "y"), 0.2,
                                clock=self.clock).ttl_ms, 200)

    def test_healthy_connection_is_never_dropped(self):
        self.connection.attempt()
        self.run_for(100 * self.interval)
        self.assertEqual(self.connection.drops, 0)
        self.assertGreaterEqual(self.beacon.received, 95)
        self.assertApproximates(self.beacon.last_round_trip, 0.0, 0.11)  # clock steps
        self.assertEqual(self.gave_up, [])

    def test_frozen_connection_is_dropped_within_three_intervals(self):
        protocol = self.connection.attempt()
        self.run_for(10 * self.interval)
        frozen_at = self.clock.seconds()
        last_back = self.beacon.last_back_at
        protocol.frozen = True
        while self.connection.drops == 0:
            self.clock.advance(0.05)
            self.assertLess(self.clock.seconds(), frozen_at + 10 * self.interval)
        dropped_at = self.clock.seconds()
        self.assertLessEqual(dropped_at - frozen_at, 3 * self.interval + 0.05)
        self.assertApproximates(dropped_at - last_back, 3 * self.interval, 0.06)
        self.assertEqual(protocol.transport.aborts, 1)
        [event] = self.logs.matching("connection is stuck")
        self.assertEqual(event["interval"], self.interval)
        self.assertApproximates(event["age"], 3 * self.interval, 0.06)
        self.assertEqual(event["name"], "publisher")

    def test_recovers_when_the_new_connection_brings_beacons_back(self):
        protocol = self.connection.attempt()
        self.run_for(5 * self.interval)
        protocol.frozen = True
        self.run_for(3 * self.interval + 0.2)
        self.assertEqual(self.connection.drops, 1)
        self.clock.advance(0.5)
        self.connection.attempt()
        self.run_for(20 * self.interval)
        self.assertEqual(self.connection.drops, 1)
        self.assertEqual(self.gave_up, [])
        self.assertIsNone(self.beacon.dropped_at)
        self.assertEqual(len(self.logs.matching("connection recovered")), 1)

    def test_gives_up_when_reconnecting_hangs(self):
        """A new connection whose handshake never completes: give up 3 x interval later."""
        protocol = self.connection.attempt()
        self.run_for(5 * self.interval)
        protocol.frozen = True
        self.run_for(3 * self.interval + 0.1)
        self.assertEqual(self.connection.drops, 1)
        self.clock.advance(1.0)
        attempted_at = self.clock.seconds()
        self.connection.attempt(frozen=True)
        while not self.gave_up:
            self.clock.advance(0.05)
            self.assertLess(self.clock.seconds(), attempted_at + 10 * self.interval)
        self.assertApproximates(self.clock.seconds() - attempted_at, 3 * self.interval, 0.06)
        self.assertEqual(self.gave_up, [self.beacon])
        self.run_for(20 * self.interval)
        self.assertEqual(self.gave_up, [self.beacon])

    def test_gives_up_when_the_new_connection_is_stuck_too(self):
        protocol = self.connection.attempt()
        self.run_for(5 * self.interval)
        protocol.frozen = True
        self.run_for(3 * self.interval + 0.1)
        self.clock.advance(0.5)
        again = self.connection.attempt()
        again.frozen = True
        prepared_at = self.clock.seconds()
        while not self.gave_up:
            self.clock.advance(0.05)
            self.assertLess(self.clock.seconds(), prepared_at + 10 * self.interval)
        self.assertApproximates(self.clock.seconds() - prepared_at, 3 * self.interval, 0.06)
        self.assertEqual(self.connection.drops, 1)

    def test_blocked_connection_is_not_stuck(self):
        """Beacons are skipped, not expected, while RabbitMQ blocks the route."""
        protocol = self.connection.attempt()
        self.run_for(5 * self.interval)
        self.connection.set_blocked(True)
        protocol.frozen = True  # a blocked connection delivers no beacon either
        sent = self.beacon.sent
        self.run_for(20 * self.interval)
        self.assertEqual(self.beacon.sent, sent)
        self.assertEqual(self.connection.drops, 0)
        protocol.frozen = False
        self.connection.set_blocked(False)
        self.run_for(20 * self.interval)
        self.assertEqual(self.connection.drops, 0)
        self.assertGreater(self.beacon.sent, sent + 15)
        self.assertEqual(len(self.logs.matching("paused")), 1)
        self.assertEqual(len(self.logs.matching("resumed")), 1)

    def test_connection_lost_on_its_own_has_no_deadline(self):
        """A broker restart is ClientService's business: no drop, no give-up."""
        protocol = self.connection.attempt()
        self.run_for(5 * self.interval)
        protocol.lose("broker restarted")
        self.run_for(50 * self.interval)
        self.assertEqual(self.connection.drops, 0)
        self.assertEqual(self.gave_up, [])
        self.connection.attempt()
        self.run_for(10 * self.interval)
        self.assertEqual(self.connection.drops, 0)

    def test_publish_errors_do_not_stop_the_loop(self):
        protocol = self.connection.attempt()
        protocol.channels[0].fail_publish = pika.exceptions.ChannelWrongStateError("closed")
        self.run_for(3 * self.interval)
        self.assertTrue(self.beacon._loop.running)
        protocol.channels[0].fail_publish = RuntimeError("boom")
        self.run_for(3 * self.interval)
        self.assertTrue(self.beacon._loop.running)

    def test_channel_closed_under_the_beacon_is_replaced(self):
        protocol = self.connection.attempt()
        self.run_for(5 * self.interval)
        protocol.channels[0].break_(pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND"))
        self.assertEqual(len(protocol.channels), 2)
        received = self.beacon.received
        self.run_for(20 * self.interval)
        self.assertGreater(self.beacon.received, received + 15)
        self.assertEqual(self.connection.drops, 0)
        self.assertEqual(len(self.logs.matching("lost its queue")), 1)

    def test_stopped_beacon_leaves_no_timers(self):
        self.connection.attempt()
        self.run_for(5 * self.interval)
        self.beacon.stopService()
        self.connection.current.lose("stopped")
        ours = [c for c in self.clock.getDelayedCalls() if "SimBroker" not in repr(c)]
        self.assertEqual(ours, [])


class RoutedBeaconTests(SynchronousTestCase):
    """The consuming connection's beacon is published through the publishing connection."""

    interval = 1.0

    def setUp(self):
        self.clock = Clock()
        self.broker = SimBroker(self.clock)
        self.publishing = SimConnection(self.clock, self.broker, "publisher")
        self.consuming = SimConnection(self.clock, self.broker, "consumer")
        self.publishing.test = self.consuming.test = self
        self.gave_up: list = []
        self.beacon = Beacon(self.consuming, self.interval, route=self.publishing,
                             clock=self.clock, on_gave_up=self.gave_up.append)
        self.beacon.startService()
        self.addCleanup(self.beacon.stopService)

    def run_for(self, seconds, step=0.1):
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(step)

    def test_consuming_connection_never_publishes(self):
        consumer = self.consuming.attempt()
        publisher = self.publishing.attempt()
        self.run_for(30)
        self.assertEqual(sum(len(c.published) for c in consumer.channels), 0)
        self.assertGreaterEqual(sum(len(c.published) for c in publisher.channels), 29)
        self.assertGreaterEqual(self.beacon.received, 28)
        self.assertEqual(self.consuming.drops, 0)

    def test_frozen_consuming_connection_is_dropped(self):
        consumer = self.consuming.attempt()
        self.publishing.attempt()
        self.run_for(10)
        consumer.frozen = True
        frozen_at = self.clock.seconds()
        while not self.consuming.drops:
            self.clock.advance(0.05)
            self.assertLess(self.clock.seconds(), frozen_at + 10)
        self.assertLessEqual(self.clock.seconds() - frozen_at, 3 * self.interval + 0.05)
        self.assertEqual(self.publishing.drops, 0)

    def test_route_channel_closed_is_reopened(self):
        self.consuming.attempt()
        publisher = self.publishing.attempt()
        self.run_for(5)
        publisher.channels[0].break_(pika.exceptions.ChannelClosedByBroker(504, "oops"))
        self.run_for(2)
        self.assertEqual(len(publisher.channels), 2)
        received = self.beacon.received
        self.run_for(20)
        self.assertGreater(self.beacon.received, received + 15)
        self.assertEqual(self.consuming.drops, 0)

    def test_no_beacon_expected_while_the_route_is_down_or_blocked(self):
        self.consuming.attempt()
        publisher = self.publishing.attempt()
        self.run_for(10)
        publisher.lose("publisher connection lost")
        self.run_for(30)
        self.assertEqual(self.consuming.drops, 0)
        self.publishing.attempt()
        self.run_for(10)
        self.publishing.set_blocked(True)
        self.run_for(30)
        self.assertEqual(self.consuming.drops, 0)
        self.publishing.set_blocked(False)
        received = self.beacon.received
        self.run_for(10)
        self.assertGreater(self.beacon.received, received)
        self.assertEqual(self.consuming.drops, 0)
        self.assertEqual(self.gave_up, [])


# -- blocked connections ----------------------------------------------------------


class FakeImpl:
    def __init__(self):
        self.on_blocked = None
        self.on_unblocked = None

    def add_on_connection_blocked_callback(self, callback):
        self.on_blocked = callback

    def add_on_connection_unblocked_callback(self, callback):
        self.on_unblocked = callback


class FakeReadyProtocol:
    def __init__(self):
        self.ready = defer.succeed(None)
        self._impl = FakeImpl()
        self.closed = defer.Deferred()
        self.is_open = True
        self.transport = None


def _blocked_frame(reason="low on memory"):
    return Frame(method=Frame(reason=reason))


class BlockedConnectionTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.connection = AMQPConnection("amqp://guest:guest@127.0.0.1:5672/", name="pub",
                                         reactor=self.clock)
        self.changes: list = []
        self.connection.add_blocked_listener(self.changes.append)
        self.protocol = FakeReadyProtocol()
        self.successResultOf(defer.ensureDeferred(
            self.connection._run_preparers(self.protocol)))
        self.connection._prepared(None, self.protocol)

    def test_blocked_and_unblocked(self):
        self.assertFalse(self.connection.blocked)
        self.successResultOf(self.connection.whenUnblocked())
        self.protocol._impl.on_blocked(None, _blocked_frame())
        self.assertTrue(self.connection.blocked)
        self.assertEqual(self.connection.blocked_reason, "low on memory")
        waiting = self.connection.whenUnblocked()
        self.assertNoResult(waiting)
        self.protocol._impl.on_unblocked(None, Frame(method=Frame()))
        self.successResultOf(waiting)
        self.assertFalse(self.connection.blocked)
        self.assertEqual(self.changes, [True, False])

    def test_lost_connection_is_no_longer_blocked(self):
        self.protocol._impl.on_blocked(None, _blocked_frame())
        waiting = self.connection.whenUnblocked()
        self.protocol.closed.callback(Exception("lost"))
        self.successResultOf(waiting)
        self.assertFalse(self.connection.blocked)
        self.assertEqual(self.changes, [True, False])

    def test_stale_connection_notifications_are_ignored(self):
        old = self.protocol
        new = FakeReadyProtocol()
        self.successResultOf(defer.ensureDeferred(self.connection._run_preparers(new)))
        old._impl.on_blocked(None, _blocked_frame())
        self.assertFalse(self.connection.blocked)


class FakeConfirmChannel:
    is_open = True

    def __init__(self):
        self.published: list = []

    def basic_publish(self, exchange, routing_key, body, properties, mandatory=True):
        self.published.append(routing_key)
        return defer.succeed(None)


class PublisherBlockedTests(SynchronousTestCase):
    def test_publish_waits_until_unblocked(self):
        clock = Clock()
        connection = AMQPConnection("amqp://guest:guest@127.0.0.1:5672/", name="pub",
                                    reactor=clock)
        protocol = FakeReadyProtocol()
        self.successResultOf(defer.ensureDeferred(connection._run_preparers(protocol)))
        connection._prepared(None, protocol)
        publisher = Publisher(connection, Topology(), clock=clock)
        channel = FakeConfirmChannel()
        publisher._protocol, publisher._channel = protocol, channel
        protocol._impl.on_blocked(None, _blocked_frame())
        d = publisher.publish("quebert", "q", b"{}", pika.BasicProperties())
        clock.advance(60)
        self.assertNoResult(d)
        self.assertEqual(channel.published, [])
        protocol._impl.on_unblocked(None, Frame(method=Frame()))
        self.successResultOf(d)
        self.assertEqual(channel.published, ["q"])


# -- stuck consumers --------------------------------------------------------------


class FakeConsumer:
    def __init__(self, clock, prefetch=10):
        self.clock = clock
        self.paused = False
        self.consuming = True
        self.consuming_since = clock.seconds()
        self.last_delivery_at = None
        self.unacked = 0
        self.prefetch = prefetch
        self.deliveries = 0
        self.resubscribed = 0

    def deliver(self):
        self.deliveries += 1
        self.last_delivery_at = self.clock.seconds()

    def resubscribe(self):
        self.resubscribed += 1
        self.consuming_since = self.clock.seconds()
        return defer.succeed(True)


class StuckConsumerCheckTests(SynchronousTestCase):
    timeout = 60.0

    def setUp(self):
        self.clock = Clock()
        self.consumer = FakeConsumer(self.clock)
        self.ready = 5
        self.capacity = True
        self.depth_calls = 0
        self.depth_result = None
        self.check = StuckConsumerCheck({"q": self.consumer}, self.depth,
                                        lambda: self.capacity, self.timeout, clock=self.clock)
        self.check.startService()
        self.addCleanup(self.check.stopService)

    def depth(self, queue):
        self.depth_calls += 1
        if self.depth_result is not None:
            return self.depth_result
        return defer.succeed((self.ready, 1))

    def run_for(self, seconds):
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(1)

    def test_idle_consumer_with_ready_messages_is_resubscribed(self):
        self.run_for(self.timeout - 1)
        self.assertEqual(self.consumer.resubscribed, 0)
        self.run_for(2 * self.check.period + 1)
        self.assertEqual(self.consumer.resubscribed, 1)
        self.assertEqual(self.check.resubscribes, 1)
        # after re-subscribing, a full timeout again
        self.run_for(self.timeout - 1)
        self.assertEqual(self.consumer.resubscribed, 1)

    def test_a_stuck_consumer_is_unhealthy_until_it_receives_again(self):
        self.assertTrue(self.check.healthy())
        self.run_for(self.timeout + 2 * self.check.period + 1)
        self.assertEqual(self.consumer.resubscribed, 1)
        self.assertFalse(self.check.healthy())
        self.assertEqual(list(self.check.stuck), ["q"])
        self.run_for(self.timeout / 2)  # still nothing received
        self.assertFalse(self.check.healthy())
        self.consumer.deliver()
        self.clock.advance(self.check.period)
        self.assertTrue(self.check.healthy())

    def test_a_stuck_consumer_with_nothing_left_to_receive_is_healthy(self):
        self.run_for(self.timeout + 2 * self.check.period + 1)
        self.assertFalse(self.check.healthy())
        self.ready = 0
        self.run_for(self.timeout + self.check.period)
        self.assertTrue(self.check.healthy())

    def test_a_stuck_consumer_that_stops_consuming_is_healthy(self):
        self.run_for(self.timeout + 2 * self.check.period + 1)
        self.assertFalse(self.check.healthy())
        self.consumer.paused = True
        self.clock.advance(self.check.period)
        self.assertTrue(self.check.healthy())

    def test_not_stuck_without_ready_messages(self):
        self.ready = 0
        self.run_for(10 * self.timeout)
        self.assertEqual(self.consumer.resubscribed, 0)

    def test_not_stuck_at_prefetch_or_without_capacity(self):
        self.consumer.unacked = self.consumer.prefetch
        self.run_for(5 * self.timeout)
        self.assertEqual(self.consumer.resubscribed, 0)
        self.consumer.unacked = 0
        self.capacity = False
        self.run_for(5 * self.timeout)
        self.assertEqual(self.consumer.resubscribed, 0)
        self.assertEqual(self.depth_calls, 0)

    def test_not_stuck_when_paused_or_receiving(self):
        self.consumer.paused = True
        self.run_for(5 * self.timeout)
        self.assertEqual(self.consumer.resubscribed, 0)
        self.consumer.paused = False
        for _ in range(int(5 * self.timeout / 10)):
            self.consumer.deliver()
            self.run_for(10)
        self.assertEqual(self.consumer.resubscribed, 0)

    def test_needs_two_sightings_without_delivery_in_between(self):
        self.run_for(self.timeout)  # the first sighting
        self.assertEqual(len(self.check._suspect), 1)
        self.consumer.deliver()  # a delivery just after: not stuck
        self.consumer.last_delivery_at -= self.timeout  # even if it looks old
        self.clock.advance(self.check.period)
        self.assertEqual(self.consumer.resubscribed, 0)
        self.clock.advance(self.check.period)  # two sightings with nothing in between
        self.assertEqual(self.consumer.resubscribed, 1)

    def test_unanswered_depth_skips_the_round(self):
        self.depth_result = defer.Deferred()  # never fires
        self.run_for(3 * self.timeout)
        self.assertEqual(self.consumer.resubscribed, 0)
        # one call per round from the timeout on (60, 75, ... 180 s), none overlapping
        self.assertEqual(self.depth_calls, 9)


class CancellableChannel(test_amqp.FakeChannel):
    def __init__(self):
        super().__init__()
        self.cancelled: list = []
        self.consumes = 0

    def basic_consume(self, queue):
        self.consumes += 1
        return defer.succeed((self.queue_object, f"ctag-{id(self)}"))

    def basic_cancel(self, tag):
        self.cancelled.append(tag)
        return defer.succeed(None)


class CancellableProtocol(test_amqp.FakeProtocol):
    def channel(self):
        channel = CancellableChannel()
        self.channels.append(channel)
        return defer.succeed(channel)


class ResubscribeTests(SynchronousTestCase):
    def test_resubscribe_keeps_old_channel_until_its_deliveries_settle(self):
        clock = Clock()
        deliveries: list = []
        consumer = QueueConsumer(test_amqp.FakeConnection(clock), test_amqp.FakeTopology(),
                                 "q", 10, deliveries.append)
        protocol = CancellableProtocol()
        self.successResultOf(consumer._prepare(protocol))
        old = protocol.channels[0]  # (FakeTopology declares on no channel)
        old.queue_object.put(test_amqp.Message(old, 1))
        self.assertEqual(consumer.unacked, 1)

        self.assertTrue(self.successResultOf(consumer.resubscribe()))
        self.assertEqual(old.cancelled, [f"ctag-{id(old)}"])
        new = protocol.channels[-1]
        self.assertIsNot(new, old)
        self.assertTrue(consumer.consuming)
        self.assertEqual(consumer.unacked, 0)
        self.assertTrue(old.is_open, "the old channel still holds a running delivery")

        self.assertTrue(deliveries[0].ack())
        clock.advance(0)
        consumer.reap_retired()
        self.assertEqual(old.frames, [("ack", 1, False)])
        self.assertFalse(old.is_open)
        new.queue_object.put(test_amqp.Message(new, 1))
        self.assertEqual(len(deliveries), 2)


# -- real workers, a real broker --------------------------------------------------

#: Seconds allowed on top of the computed bounds (process and broker latency).
MARGIN = 1.5
INTERVAL = 1


def _via_proxy(url: str, port: int) -> str:
    """``url`` through the proxy on ``port``, with AMQP heartbeats off."""
    return f"amqp://guest:guest@127.0.0.1:{port}/{vhost_of(url)}?heartbeat=0"


class FrozenConnectionTests(IntegrationTestCase):
    """A worker behind a proxy that freezes traffic without closing the sockets."""

    timeout = 180

    def worker_via_proxy(self):
        self.proxy = FreezableProxy(RABBIT_HOST, RABBIT_PORT)
        port = self.proxy.start(self)
        return WorkerProcess(self, _via_proxy(self.url, port), REDIS_URL, self.prefix,
                             extra=("--beacon-interval", str(INTERVAL),
                                    "--shutdown-timeout", "5"))

    async def _running(self, worker):
        worker.start()
        await worker.ready()
        task = await self.client.add_task("it.add", 1, 2)
        [record] = await self.wait_states([task.id], worker=worker)
        self.assertEqual(record["state"], "succeeded")
        await sleep(3 * INTERVAL)  # beacons are flowing
        self.assertEqual(self.proxy.closed_by_client(), [])
        self.assertNotIn("is stuck", worker.log())

    def test_frozen_connection_is_detected_and_the_worker_recovers_on_thaw(self):
        async def run():
            worker = self.worker_via_proxy()
            await self._running(worker)
            frozen_at = self.proxy.freeze()
            await wait_for(lambda: self.proxy.closed_by_client(frozen_at), 3 * INTERVAL + 10,
                           what="the worker to drop a frozen connection")
            detected = self.proxy.closed_by_client(frozen_at)[0] - frozen_at
            self.proxy.thaw()
            self.assertLessEqual(detected, 3 * INTERVAL + MARGIN)
            self.assertIn("connection is stuck: no beacon back", worker.log())
            await wait_for(lambda: "connection recovered" in worker.log(), 30,
                           what="beacons to come back after the thaw")
            task = await self.client.add_task("it.add", 40, 2)
            [record] = await self.wait_states([task.id], worker=worker)
            self.assertEqual(record["state"], "succeeded")
            self.assertEqual(record["result"], 42)
            self.assertTrue(worker.alive)
            self.assertNotIn("giving up", worker.log())
            self.assertEqual(await worker.stop(), 0)

        return defer.ensureDeferred(run())

    def test_worker_exits_5_when_reconnecting_does_not_help(self):
        async def run():
            worker = self.worker_via_proxy()
            await self._running(worker)
            frozen_at = self.proxy.freeze()  # new connections are frozen too
            await wait_for(lambda: not worker.alive, 60, what="the worker to give up")
            elapsed = time.time() - frozen_at
            log = worker.log()
            self.assertEqual(worker.process.returncode, 5, log[-3000:])
            self.assertIn("connection is stuck: no beacon back", log)
            self.assertIn("giving up", log)
            self.assertIn("exit code 5", log)
            # detected within 3 x interval, then 3 x interval after the
            # reconnection attempt (ClientService waits up to 1.5 s), then a
            # prompt shutdown (nothing runs)
            self.assertLessEqual(elapsed, 3 * INTERVAL + 1.5 + 3 * INTERVAL + 5 + MARGIN)
            detected = self.proxy.closed_by_client(frozen_at)[0] - frozen_at
            self.assertLessEqual(detected, 3 * INTERVAL + MARGIN)

        return defer.ensureDeferred(run())


class BrokerEventTests(IntegrationTestCase):
    timeout = 180

    def test_deleted_work_queue_is_declared_and_consumed_again(self):
        """RabbitMQ cancels the consumer of a deleted queue; the worker consumes again."""
        async def run():
            worker = self.worker("--beacon-interval", str(INTERVAL)).start()
            await worker.ready()

            def delete_queue():
                connection = pika.BlockingConnection(pika.URLParameters(self.url))
                try:
                    connection.channel().queue_delete("default")
                finally:
                    connection.close()

            await deferToThread(delete_queue)
            await wait_for(lambda: worker.log().count("consuming default") >= 2, 30,
                           what="the worker to consume the re-created queue")
            self.assertIn("cancelled by the broker", worker.log())
            task = await self.client.add_task("it.add", 2, 2)
            [record] = await self.wait_states([task.id], worker=worker)
            self.assertEqual(record["result"], 4)
            self.assertEqual(await worker.stop(), 0)

        return defer.ensureDeferred(run())

    def test_memory_alarm_blocks_publishing_without_losing_tasks_or_beacons(self):
        """
        While RabbitMQ's memory alarm blocks publishing connections, the
        worker's beacons pause (a blocked connection is not a stuck one)
        and a task published meanwhile runs once the alarm clears.  The
        alarm affects the whole broker: it lasts a few seconds and is
        cleared in ``finally`` and again in cleanup.
        """
        async def run():
            watermark = await _memory_watermark()
            self.addCleanup(_set_memory_watermark_sync, watermark)
            worker = self.worker("--beacon-interval", str(INTERVAL)).start()
            await worker.ready()
            task = await self.client.add_task("it.add", 1, 1)
            await self.wait_states([task.id], worker=worker)
            pending = None
            try:
                await rabbitmqctl("set_vm_memory_high_watermark", "0.0000001")
                alarm_at = time.time()
                pending = defer.ensureDeferred(self.client.add_task("it.add", 20, 22))
                await wait_for(lambda: "blocked by RabbitMQ" in worker.log(), 15,
                               what="the worker's publishing connection to be blocked")
                # blocked for longer than the 3 x interval a stuck connection gets
                await sleep(max(0.0, 3 * INTERVAL + 1.5 - (time.time() - alarm_at)))
            finally:
                await rabbitmqctl("set_vm_memory_high_watermark", *watermark)
            info = await pending
            [record] = await self.wait_states([info.id], worker=worker)
            self.assertEqual(record["result"], 42)
            await wait_for(lambda: "unblocked after" in worker.log(), 15,
                           what="the worker to see the connection unblocked")
            log = worker.log()
            self.assertIn("paused: blocked by RabbitMQ", log)
            self.assertNotIn("is stuck", log)
            self.assertTrue(worker.alive)
            self.assertEqual(await worker.stop(), 0)

        return defer.ensureDeferred(run())


async def _memory_watermark() -> tuple:
    """The broker's memory watermark, as arguments of ``set_vm_memory_high_watermark``."""
    out = await rabbitmqctl("environment")
    match = re.search(r"\{vm_memory_high_watermark,\s*(\{absolute,\s*([^}]+)\}|[0-9.]+)\}",
                      out)
    if match is None:
        return ("0.4",)
    if match.group(2) is not None:
        return ("absolute", match.group(2).strip().strip('"'))
    value = float(match.group(1))
    # a value left by an interrupted run of this test is not worth restoring
    return (match.group(1),) if value >= 0.05 else ("0.4",)


def _set_memory_watermark_sync(watermark: tuple) -> None:
    _rabbitmqctl_sync("set_vm_memory_high_watermark", *watermark)


class StuckConsumerLiveTests(TestCase):
    """A consumer the broker silently stopped serving, in-process against RabbitMQ."""

    timeout = 60

    def setUp(self):
        self.url = make_vhost(self)

    def test_silently_cancelled_consumer_is_resubscribed(self):
        async def run():
            topology = Topology(exchange=f"stuck-{uuid.uuid4().hex[:8]}")
            broker = AMQPBroker(self.url, topology)
            received: list = []

            def on_delivery(delivery):
                received.append(delivery)
                delivery.ack()

            broker.consume("q", 5, on_delivery)
            check = StuckConsumerCheck(broker.consumers,
                                       BrokerAdmin(broker.consuming, topology).depth,
                                       lambda: True, 1.0, clock=broker.reactor)
            check.setServiceParent(broker)
            broker.startService()
            self.addCleanup(broker.stopService)
            await broker.whenConnected()
            consumer = broker.consumers["q"]
            await wait_for(lambda: consumer.consuming, 10, what="the consumer")
            # Cancel behind the consumer's back, at pika's level (nowait):
            # the Twisted wrapper's queue never learns, nothing ends.
            consumer._channel._channel.basic_cancel(consumer_tag=consumer._tag)
            await sleep(0.2)
            await broker.publish("q", b"{}", {}, message_id="m1")
            await wait_for(lambda: received, 15, what="the re-subscribed consumer to deliver")
            self.assertEqual(check.resubscribes, 1)
            self.assertEqual(consumer.resubscribes, 1)
            self.assertEqual(received[0].message_id, "m1")

        return defer.ensureDeferred(run())


# -- options and wiring -------------------------------------------------------------


class LivenessConfigTests(SynchronousTestCase):
    def parse(self, *argv):
        options = Options()
        options.parseOptions(list(argv))
        return options["worker_config"]

    def test_defaults(self):
        config = self.parse()
        self.assertEqual(config.beacon_interval, 5.0)
        self.assertEqual(config.stuck_consumer_timeout, 60.0)

    def test_command_line_and_file(self):
        config = self.parse("--beacon-interval", "0.5", "--stuck-consumer-timeout", "0")
        self.assertEqual(config.beacon_interval, 0.5)
        self.assertEqual(config.stuck_consumer_timeout, 0.0)
        config = from_mapping({"beacon_interval": 0, "stuck_consumer_timeout": 120})
        self.assertEqual(config.beacon_interval, 0)
        self.assertEqual(config.stuck_consumer_timeout, 120)

    def test_bad_values(self):
        for argv, fragment in [
            (("--beacon-interval", "-1"), "--beacon-interval must be >= 0"),
            (("--beacon-interval", "soon"), "--beacon-interval must be a number"),
            (("--stuck-consumer-timeout", "nan"), "--stuck-consumer-timeout must be a finite"),
        ]:
            e = self.assertRaises(usage.UsageError, Options().parseOptions, list(argv))
            self.assertIn(fragment, str(e))
        e = self.assertRaises(ConfigurationError, from_mapping, {"beacon_interval": "x"})
        self.assertIn("beacon_interval must be a number", str(e))

    def test_worker_wiring(self):
        from quebert.worker import EXIT_STUCK_CONNECTION, WorkerService

        self.assertEqual(EXIT_STUCK_CONNECTION, 5)
        worker = WorkerService(WorkerConfig(state="memory", beacon_interval=2.0))
        publishing, consuming = worker.broker.publishing, worker.broker.consuming
        [mine, theirs] = worker.broker.beacons
        self.assertIs(mine.connection, publishing)
        self.assertIs(mine.route, publishing)
        self.assertIs(theirs.connection, consuming)
        self.assertIs(theirs.route, publishing)
        self.assertEqual(theirs.ttl_ms, 2000)
        self.assertIsNotNone(worker.stuck_check)
        self.assertEqual(worker.stuck_check.timeout, 60.0)
        # a stuck consumer makes /health say "not ready"
        served = WorkerService(WorkerConfig(state="memory", http_port=0,
                                            api_tokens=("t" * 32,)))
        readiness = served.api_service.task_service.readiness
        before = [check() for check in readiness]
        served.stuck_check.stuck["default"] = 0
        after = [check() for check in readiness]
        self.assertEqual(after.count(False), before.count(False) + 1, (before, after))
        quiet = WorkerService(WorkerConfig(state="memory", beacon_interval=0,
                                           stuck_consumer_timeout=0))
        self.assertEqual(quiet.broker.beacons, [])
        self.assertIsNone(quiet.stuck_check)
