"""
Tests for quebert.amqp.topology: delay routing through the binary delay levels.

The declarations are recorded by a fake channel, and a few lines of Python
play the broker: topic matching, exchange-to-exchange bindings, and
dead-lettering of expired messages with their routing key kept.
"""

from __future__ import annotations

import pika.exceptions
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from quebert.amqp.topology import LEVELS, MAX_DELAY_MS, Topology, delay_bits
from quebert.errors import ConfigurationError


class RecordingChannel:
    """
    Records declarations; every call succeeds at once, as a pika channel's
    would.  It plays the connection too: its ``channel()`` is itself.
    """

    is_open = True

    def channel(self):
        return defer.succeed(self)

    def close(self):
        pass

    def __init__(self):
        self.exchanges = {}
        self.queues = {}
        self.queue_bindings = []  # (exchange, routing_key, queue)
        self.exchange_bindings = []  # (source, routing_key, destination)
        self.calls = []

    def exchange_declare(self, exchange, exchange_type="direct", durable=False, **kwargs):
        self.calls.append(("exchange_declare", exchange))
        self.exchanges[exchange] = {"type": exchange_type, "durable": durable}
        return defer.succeed(None)

    def queue_declare(self, queue, durable=False, arguments=None, passive=False, **kwargs):
        self.calls.append(("queue_declare", queue))
        self.queues[queue] = {"durable": durable, "arguments": dict(arguments or {}),
                              "passive": passive}
        return defer.succeed(None)

    def queue_bind(self, queue, exchange, routing_key=None, **kwargs):
        self.calls.append(("queue_bind", queue, exchange, routing_key))
        self.queue_bindings.append((exchange, routing_key, queue))
        return defer.succeed(None)

    def exchange_bind(self, destination, source, routing_key="", **kwargs):
        self.calls.append(("exchange_bind", destination, source, routing_key))
        self.exchange_bindings.append((source, routing_key, destination))
        return defer.succeed(None)


def topic_match(pattern: str, key: str) -> bool:
    """AMQP topic matching: '*' is exactly one word, '#' zero or more words."""

    def match(p: list, k: list) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        if not k:
            return False
        return (p[0] == "*" or p[0] == k[0]) and match(p[1:], k[1:])

    return match(pattern.split("."), key.split("."))


class FakeBroker:
    """Routes messages over the declarations a RecordingChannel saw."""

    def __init__(self, channel: RecordingChannel):
        self.channel = channel

    def _binding_matches(self, exchange: str, pattern: str, key: str) -> bool:
        kind = self.channel.exchanges[exchange]["type"]
        if kind == "direct":
            return pattern == key
        if kind == "topic":
            return topic_match(pattern, key)
        raise AssertionError(f"unexpected exchange type {kind}")

    def route(self, exchange: str, key: str) -> set:
        """The set of queues a publish to ``exchange`` with ``key`` lands in."""
        if exchange == "":
            return {key} if key in self.channel.queues else set()
        assert exchange in self.channel.exchanges, f"exchange {exchange!r} not declared"
        queues: set = set()
        seen = set()
        todo = [exchange]
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            for source, pattern, queue in self.channel.queue_bindings:
                if source == current and self._binding_matches(current, pattern, key):
                    queues.add(queue)
            for source, pattern, destination in self.channel.exchange_bindings:
                if source == current and self._binding_matches(current, pattern, key):
                    assert destination in self.channel.exchanges
                    todo.append(destination)
        return queues

    def deliver(self, exchange: str, key: str, limit: int = 1000) -> list:
        """
        Follow a message through TTL queues until it rests in queues without
        a dead-letter exchange.  Returns one ``(path, total_ttl_ms)`` per
        final copy, ``path`` being the list of queues visited.
        """
        results = []
        todo = [([], 0, queue) for queue in self.route(exchange, key)]
        while todo:
            path, ttl, queue = todo.pop()
            assert len(path) < limit, "message loops"
            path = path + [queue]
            arguments = self.channel.queues[queue]["arguments"]
            dlx = arguments.get("x-dead-letter-exchange")
            if dlx is None or "x-message-ttl" not in arguments:
                # (a quorum work queue dead-letters only past its delivery limit)
                results.append((path, ttl))
                continue
            assert "x-dead-letter-routing-key" not in arguments
            next_ttl = ttl + arguments["x-message-ttl"]
            for target in self.route(dlx, key):
                todo.append((path, next_ttl, target))
        return results


class DelayRoutingTests(SynchronousTestCase):
    """A message published at delay_route(d, Q) spends exactly d ms in delay queues."""

    queue_type = "quorum"
    level_prefix = "quebert.qdelay."

    def setUp(self):
        self.topology = Topology(queue_type=self.queue_type)
        self.channel = RecordingChannel()
        self.successResultOf(self.topology.declare_delays(self.channel))
        for queue in ("default", "a.b", "b", "a", "x.y.z"):
            self.successResultOf(self.topology.declare_queue(self.channel, queue))
        self.broker = FakeBroker(self.channel)

    def check_delay(self, delay_ms: int, queue: str) -> None:
        exchange, key = self.topology.delay_route(delay_ms, queue)
        results = self.broker.deliver(exchange, key)
        self.assertEqual(len(results), 1, f"{delay_ms} ms to {queue}: {results}")
        path, total = results[0]
        self.assertEqual(path[-1], queue)
        self.assertEqual(total, delay_ms)
        expected = [self.topology.delay_queue(level) for level in reversed(range(LEVELS))
                    if delay_ms >> level & 1]
        self.assertEqual(path[:-1], expected)
        # each delay queue holds one TTL: the delays sum to d
        ttls = [self.channel.queues[q]["arguments"]["x-message-ttl"] for q in path[:-1]]
        self.assertEqual(sum(ttls), delay_ms)
        self.assertEqual(ttls, sorted(ttls, reverse=True))

    def test_several_delays(self):
        for delay_ms in (0, 1, 2, 3, 100, 400, 1500, 60_000, 3_600_000, 2**31,
                         2**32 - 1):
            for queue in ("default", "a.b", "x.y.z"):
                self.check_delay(delay_ms, queue)

    def test_every_single_level(self):
        for level in range(LEVELS):
            self.check_delay(2**level, "default")

    def test_zero_delay_goes_straight_to_the_queue(self):
        exchange, key = self.topology.delay_route(0, "default")
        self.assertEqual(exchange, self.topology.deliver_exchange)
        self.assertEqual(self.broker.deliver(exchange, key), [(["default"], 0)])

    def test_entry_at_highest_bit(self):
        p = self.level_prefix
        self.assertEqual(self.topology.delay_route(1, "q")[0], p + "00")
        self.assertEqual(self.topology.delay_route(400, "q")[0], p + "08")
        self.assertEqual(self.topology.delay_route(1500, "q")[0], p + "10")
        self.assertEqual(self.topology.delay_route(MAX_DELAY_MS, "q")[0], p + "31")

    def test_entering_at_the_top_level_works_too(self):
        """Publishing to the highest delay exchange routes the same way."""
        for delay_ms in (0, 5, 1500):
            _, key = self.topology.delay_route(delay_ms, "a.b")
            results = self.broker.deliver(self.topology.delay_exchange(LEVELS - 1), key)
            self.assertEqual(len(results), 1)
            self.assertEqual(results[0][0][-1], "a.b")
            self.assertEqual(results[0][1], delay_ms)

    def test_dotted_queue_names_do_not_leak(self):
        """A message for 'a.b' never reaches queue 'b' (or 'a'), and vice versa."""
        for delay_ms in (0, 7, 1500):
            for queue in ("a.b", "b", "a"):
                exchange, key = self.topology.delay_route(delay_ms, queue)
                finals = [path[-1] for path, _ in self.broker.deliver(exchange, key)]
                self.assertEqual(finals, [queue])

    def test_direct_publish(self):
        self.assertEqual(self.broker.route("quebert", "a.b"), {"a.b"})
        self.assertEqual(self.broker.route("quebert", "b"), {"b"})
        self.assertEqual(self.broker.route("quebert", "nope"), set())

    def test_errored_queue_reached_through_default_exchange(self):
        self.assertEqual(self.broker.route("", self.topology.errored_queue("a.b")),
                         {"a.b.errored"})

    def test_routing_key_format(self):
        _, key = self.topology.delay_route(5, "a.b")
        self.assertEqual(key, ".".join(["0"] * 29 + ["1", "0", "1", "a", "b"]))

    def test_delay_bits(self):
        self.assertEqual(delay_bits(0), ["0"] * LEVELS)
        self.assertEqual(delay_bits(MAX_DELAY_MS), ["1"] * LEVELS)
        self.assertEqual(delay_bits(6)[-3:], ["1", "1", "0"])

    def test_out_of_range_delays(self):
        self.assertRaises(ValueError, self.topology.delay_route, -1, "q")
        self.assertRaises(ValueError, self.topology.delay_route, 2**32, "q")

    def test_number_of_delay_queues_is_bounded(self):
        delay_queues = [q for q in self.channel.queues if q.startswith(self.level_prefix)]
        self.assertEqual(len(delay_queues), LEVELS)
        self.assertEqual(delay_queues, self.topology.delay_queues())


class ClassicDelayRoutingTests(DelayRoutingTests):
    """The same with classic queues, whose delay levels have names of their own."""

    queue_type = "classic"
    level_prefix = "quebert.delay."


class UpgradeRoutingTests(SynchronousTestCase):
    """
    A deployment declared with classic delay queues (quebert 0.1's
    default) keeps its tree of levels when quorum ones are added beside it.
    """

    def setUp(self):
        self.classic = Topology(queue_type="classic", delivery_limit=None)
        self.quorum = Topology()
        self.channel = RecordingChannel()
        for topology in (self.classic, self.quorum):
            self.successResultOf(topology.declare_delays(self.channel))
            self.successResultOf(topology.declare_queue(self.channel, "default"))
        self.broker = FakeBroker(self.channel)

    def test_the_two_trees_share_no_queue_or_exchange_but_the_deliver_exchange(self):
        self.assertFalse(set(self.classic.delay_queues()) & set(self.quorum.delay_queues()))
        classic = {self.classic.delay_exchange(n) for n in range(LEVELS)}
        quorum = {self.quorum.delay_exchange(n) for n in range(LEVELS)}
        self.assertFalse(classic & quorum)
        self.assertEqual(self.classic.deliver_exchange, self.quorum.deliver_exchange)
        self.assertEqual(self.quorum.other_delay_queues(), self.classic.delay_queues())
        self.assertEqual(self.classic.other_delay_queues(), self.quorum.delay_queues())

    def test_each_delayed_message_arrives_once_whichever_tree_it_entered(self):
        for topology in (self.classic, self.quorum):
            for delay_ms in (1, 400, 1500, 3_600_000):
                exchange, key = topology.delay_route(delay_ms, "default")
                results = self.broker.deliver(exchange, key)
                self.assertEqual(len(results), 1, results)
                path, total = results[0]
                self.assertEqual(path[-1], "default")
                self.assertEqual(total, delay_ms)
                self.assertTrue(set(path[:-1]) <= set(topology.delay_queues()), path)

    def test_a_message_expiring_from_an_old_level_drains_down_the_old_tree(self):
        """What waits in classic level 8 goes on to level 7 and the work queue, once."""
        _, key = self.classic.delay_route(400, "default")
        results = self.broker.deliver(
            self.classic.delay_queue_arguments(8)["x-dead-letter-exchange"], key)
        self.assertEqual(results, [(["quebert.delay.07", "quebert.delay.04", "default"], 144)])


class ArgumentsTests(SynchronousTestCase):
    """Queue arguments for classic and quorum queues."""

    def declared(self, topology: Topology) -> RecordingChannel:
        channel = RecordingChannel()
        self.successResultOf(topology.declare_delays(channel))
        self.successResultOf(topology.declare_queue(channel, "work"))
        return channel

    def test_classic(self):
        topology = Topology(queue_type="classic")
        channel = self.declared(topology)
        self.assertEqual(channel.queues["work"]["arguments"], {})
        self.assertEqual(channel.queues["work.errored"]["arguments"],
                         {"x-message-ttl": 7 * 24 * 3600 * 1000})
        for level in range(LEVELS):
            arguments = channel.queues[topology.delay_queue(level)]["arguments"]
            self.assertEqual(arguments["x-message-ttl"], 2**level)
            self.assertNotIn("x-queue-type", arguments)
            self.assertNotIn("x-dead-letter-strategy", arguments)
            self.assertNotIn("x-overflow", arguments)

    def test_quorum_is_the_default(self):
        self.assertEqual(Topology().queue_type, "quorum")
        self.assertEqual(Topology().delivery_limit, 20)

    def test_quorum(self):
        topology = Topology(queue_type="quorum")
        channel = self.declared(topology)
        self.assertEqual(channel.queues["work"]["arguments"], {
            "x-queue-type": "quorum",
            "x-delivery-limit": 20,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "work.errored",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        })
        self.assertEqual(channel.queues["work.errored"]["arguments"]["x-queue-type"], "quorum")
        for level in range(LEVELS):
            arguments = channel.queues[topology.delay_queue(level)]["arguments"]
            self.assertEqual(arguments["x-queue-type"], "quorum")
            self.assertEqual(arguments["x-dead-letter-strategy"], "at-least-once")
            self.assertEqual(arguments["x-overflow"], "reject-publish")
            self.assertEqual(arguments["x-message-ttl"], 2**level)

    def test_delivery_limit(self):
        arguments = Topology(delivery_limit=3).work_queue_arguments("q")
        self.assertEqual(arguments["x-delivery-limit"], 3)
        for off in (0, None):
            self.assertEqual(Topology(delivery_limit=off).work_queue_arguments("q"),
                             {"x-queue-type": "quorum"})
        # classic queues have no delivery limit
        self.assertEqual(Topology(queue_type="classic").work_queue_arguments("q"), {})
        for bad in (-1, 2.5, "3", True):
            e = self.assertRaises(ConfigurationError, Topology, delivery_limit=bad)
            self.assertIn("delivery_limit", str(e))

    def test_dead_letter_chain(self):
        topology = Topology(exchange="jobs")
        self.assertEqual(topology.delay_queue_arguments(0)["x-dead-letter-exchange"],
                         "jobs.delay.deliver")
        self.assertEqual(topology.delay_queue_arguments(5)["x-dead-letter-exchange"],
                         "jobs.qdelay.04")
        classic = Topology(exchange="jobs", queue_type="classic")
        self.assertEqual(classic.delay_queue_arguments(5)["x-dead-letter-exchange"],
                         "jobs.delay.04")

    def test_everything_durable(self):
        channel = self.declared(Topology())
        self.assertTrue(all(e["durable"] for e in channel.exchanges.values()))
        self.assertTrue(all(q["durable"] for q in channel.queues.values()))
        self.assertEqual(channel.exchanges["quebert"]["type"], "direct")
        self.assertEqual(channel.exchanges["quebert.delay.deliver"]["type"], "topic")
        self.assertEqual(channel.exchanges["quebert.qdelay.17"]["type"], "topic")

    def test_existing_queue_is_declared_passively(self):
        """A queue another system declared is checked, not declared with quebert's arguments."""
        topology = Topology(queue_type="quorum", existing_queues=["work"])
        channel = self.declared(topology)
        self.assertEqual(channel.queues["work"], {"durable": False, "arguments": {},
                                                  "passive": True})
        self.assertIn(("quebert", "work", "work"), channel.queue_bindings)
        self.assertFalse(channel.queues["work.errored"]["passive"])
        self.assertEqual(channel.queues["work.errored"]["arguments"]["x-queue-type"], "quorum")
        other = self.declared(Topology(existing_queues=["other"]))
        self.assertFalse(other.queues["work"]["passive"])

    def test_errored_ttl_disabled(self):
        topology = Topology(queue_type="classic", errored_ttl_ms=None)
        self.assertEqual(topology.errored_queue_arguments(), {})
        self.assertEqual(Topology(queue_type="quorum", errored_ttl_ms=0)
                         .errored_queue_arguments(), {"x-queue-type": "quorum"})

    def test_custom_exchange_names(self):
        topology = Topology(exchange="jobs")
        channel = self.declared(topology)
        self.assertIn("jobs", channel.exchanges)
        self.assertIn("jobs.delay.deliver", channel.exchanges)
        self.assertIn("jobs.qdelay.31", channel.queues)
        self.assertEqual(topology.delay_route(3, "q")[0], "jobs.qdelay.01")


class ValidationTests(SynchronousTestCase):
    """Bad names and types are refused."""

    def test_invalid_queue_type(self):
        e = self.assertRaises(ConfigurationError, Topology, queue_type="stream")
        self.assertIn("stream", str(e))

    def test_invalid_exchange(self):
        for name in ("", "has space", "a/b", ".start", "quebert\n", "quebert\r\n"):
            self.assertRaises(ConfigurationError, Topology, exchange=name)

    def test_invalid_queue_name(self):
        channel = RecordingChannel()
        failure = self.failureResultOf(Topology().declare_queue(channel, "bad queue"),
                                       ConfigurationError)
        self.assertIn("bad queue", str(failure.value))
        self.assertEqual(channel.calls, [])

    def test_queue_name_ending_in_a_newline(self):
        """A regex "$" matches before a final newline: the name is refused all the same."""
        channel = RecordingChannel()
        for name in ("q\n", "q\r\n"):
            failure = self.failureResultOf(Topology().declare_queue(channel, name),
                                           ConfigurationError)
            self.assertIn(repr(name), str(failure.value))
        self.assertEqual(channel.calls, [])

    def test_declarations_are_sequential(self):
        """Each declaration waits for the previous one (one outstanding RPC)."""
        pending = []

        class SlowChannel(RecordingChannel):
            def exchange_declare(self, *args, **kwargs):
                super().exchange_declare(*args, **kwargs)
                d = defer.Deferred()
                pending.append(d)
                return d

        channel = SlowChannel()
        d = Topology().declare_delays(channel)
        self.assertNoResult(d)
        self.assertEqual(len(channel.calls), 1)
        while pending:
            pending.pop().callback(None)
        self.successResultOf(d)


class TopicMatcherTests(SynchronousTestCase):
    """The test's own topic matcher behaves like RabbitMQ's."""

    def test_matcher(self):
        self.assertTrue(topic_match("*.b", "a.b"))
        self.assertFalse(topic_match("*.b", "x.a.b"))
        self.assertTrue(topic_match("#.b", "x.a.b"))
        self.assertTrue(topic_match("#.b", "b"))
        self.assertTrue(topic_match("a.#", "a"))
        self.assertTrue(topic_match("*.1.#", "0.1.q"))
        self.assertFalse(topic_match("*.1.#", "0.0.q"))
        self.assertFalse(topic_match("*.*.b", "0.0.a.b"))
        self.assertTrue(topic_match("*.*.a.b", "0.0.a.b"))


class _RefusingConnection:
    """
    Channels that refuse to declare the queues in ``refuse`` with arguments
    (406, as RabbitMQ does for a queue that exists with other ones) and
    close, as a refused channel does; passive declarations succeed, unless
    the queue is in ``missing`` (404).
    """

    def __init__(self, refuse=(), missing=(), code=406):
        self.refuse = set(refuse)
        self.missing = set(missing)
        self.code = code
        self.record = RecordingChannel()
        self.opened = 0

    def channel(self):
        self.opened += 1
        connection, record = self, self.record

        class Channel:
            is_open = True

            def close(self):
                self.is_open = False

            def __getattr__(self, name):
                assert self.is_open, "used after it was closed"
                return getattr(record, name)

            def queue_declare(self, queue, passive=False, **kwargs):
                assert self.is_open, "used after it was closed"
                if passive and queue in connection.missing:
                    self.is_open = False
                    return defer.fail(pika.exceptions.ChannelClosedByBroker(
                        404, f"NOT_FOUND - no queue '{queue}'"))
                if not passive and queue in connection.refuse:
                    self.is_open = False
                    return defer.fail(pika.exceptions.ChannelClosedByBroker(
                        connection.code, f"PRECONDITION_FAILED - inequivalent arg for {queue}"))
                return record.queue_declare(queue, passive=passive, **kwargs)

        return defer.succeed(Channel())


class ExistingQueueTests(SynchronousTestCase):
    """Queues that exist with other arguments are used as they are, not fatal."""

    def test_a_queue_declared_differently_is_used_as_it_is(self):
        connection = _RefusingConnection(refuse=["work", "work.errored"])
        topology = Topology()
        self.successResultOf(topology.declare_queue(connection, "work"))
        record = connection.record
        self.assertTrue(record.queues["work"]["passive"])
        self.assertTrue(record.queues["work.errored"]["passive"])
        # its bindings are made all the same, on a fresh channel
        self.assertIn(("quebert", "work", "work"), record.queue_bindings)
        self.assertIn(("quebert.delay.deliver", "*." * LEVELS + "work", "work"),
                      record.queue_bindings)
        self.assertEqual(sorted(topology.mismatched), ["work", "work.errored"])
        self.assertIn("inequivalent", topology.mismatched["work"])
        self.assertEqual(connection.opened, 3)

    def test_a_delay_queue_declared_differently_is_used_as_it_is(self):
        connection = _RefusingConnection(refuse=["quebert.qdelay.05"])
        topology = Topology()
        self.successResultOf(topology.declare_delays(connection))
        record = connection.record
        self.assertTrue(record.queues["quebert.qdelay.05"]["passive"])
        self.assertFalse(record.queues["quebert.qdelay.06"]["passive"])
        self.assertIn(("quebert.qdelay.05", "*." * 26 + "1.#", "quebert.qdelay.05"),
                      record.queue_bindings)
        self.assertEqual(list(topology.mismatched), ["quebert.qdelay.05"])

    def test_warned_once_per_queue(self):
        topology = Topology()
        events = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(3):
            self.successResultOf(topology.declare_queue(_RefusingConnection(["work"]), "work"))
        warnings = [e for e in events if e.get("queue") == "work"
                    and "other arguments" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)

    def test_a_missing_queue_is_still_an_error(self):
        """406 then 404: the queue vanished in between; the declaration fails."""
        connection = _RefusingConnection(refuse=["work"], missing=["work"])
        failure = self.failureResultOf(Topology().declare_queue(connection, "work"),
                                       pika.exceptions.ChannelClosedByBroker)
        self.assertEqual(failure.value.reply_code, 404)

    def test_access_refused_is_not_taken_for_a_mismatch(self):
        connection = _RefusingConnection(refuse=["work"], code=403)
        failure = self.failureResultOf(Topology().declare_queue(connection, "work"),
                                       pika.exceptions.ChannelClosedByBroker)
        self.assertEqual(failure.value.reply_code, 403)

    def test_waiting_in_other_delays(self):
        """The other type's delay queues that exist and hold messages are reported."""
        connection = _RefusingConnection(missing=Topology().other_delay_queues()[2:])

        class Frame:
            def __init__(self, count):
                self.method = type("M", (), {"message_count": count})()

        counts = {"quebert.delay.00": 0, "quebert.delay.01": 7}
        record = connection.record
        original = record.queue_declare

        def queue_declare(queue, **kwargs):
            original(queue, **kwargs)
            return defer.succeed(Frame(counts.get(queue, 0)))

        record.queue_declare = queue_declare
        found = self.successResultOf(Topology().waiting_in_other_delays(connection))
        self.assertEqual(found, {"quebert.delay.01": 7})
