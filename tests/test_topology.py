"""
Tests for quebert.amqp.topology: delay routing through the binary delay levels.

The declarations are recorded by a fake channel, and a few lines of Python
play the broker: topic matching, exchange-to-exchange bindings, and
dead-lettering of expired messages with their routing key kept.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from quebert.amqp.topology import LEVELS, MAX_DELAY_MS, Topology, delay_bits
from quebert.errors import ConfigurationError


class RecordingChannel:
    """Records declarations; every call succeeds at once, as a pika channel's would."""

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
            if dlx is None:
                results.append((path, ttl))
                continue
            assert "x-dead-letter-routing-key" not in arguments
            next_ttl = ttl + arguments["x-message-ttl"]
            for target in self.route(dlx, key):
                todo.append((path, next_ttl, target))
        return results


class DelayRoutingTests(SynchronousTestCase):
    """A message published at delay_route(d, Q) spends exactly d ms in delay queues."""

    def setUp(self):
        self.topology = Topology()
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
        self.assertEqual(self.topology.delay_route(1, "q")[0], "quebert.delay.00")
        self.assertEqual(self.topology.delay_route(400, "q")[0], "quebert.delay.08")
        self.assertEqual(self.topology.delay_route(1500, "q")[0], "quebert.delay.10")
        self.assertEqual(self.topology.delay_route(MAX_DELAY_MS, "q")[0], "quebert.delay.31")

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
        delay_queues = [q for q in self.channel.queues if q.startswith("quebert.delay.")]
        self.assertEqual(len(delay_queues), LEVELS)


class ArgumentsTests(SynchronousTestCase):
    """Queue arguments for classic and quorum queues."""

    def declared(self, topology: Topology) -> RecordingChannel:
        channel = RecordingChannel()
        self.successResultOf(topology.declare_delays(channel))
        self.successResultOf(topology.declare_queue(channel, "work"))
        return channel

    def test_classic(self):
        topology = Topology()
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

    def test_quorum(self):
        topology = Topology(queue_type="quorum")
        channel = self.declared(topology)
        self.assertEqual(channel.queues["work"]["arguments"], {"x-queue-type": "quorum"})
        self.assertEqual(channel.queues["work.errored"]["arguments"]["x-queue-type"], "quorum")
        for level in range(LEVELS):
            arguments = channel.queues[topology.delay_queue(level)]["arguments"]
            self.assertEqual(arguments["x-queue-type"], "quorum")
            self.assertEqual(arguments["x-dead-letter-strategy"], "at-least-once")
            self.assertEqual(arguments["x-overflow"], "reject-publish")
            self.assertEqual(arguments["x-message-ttl"], 2**level)

    def test_dead_letter_chain(self):
        topology = Topology(exchange="jobs")
        self.assertEqual(topology.delay_queue_arguments(0)["x-dead-letter-exchange"],
                         "jobs.delay.deliver")
        self.assertEqual(topology.delay_queue_arguments(5)["x-dead-letter-exchange"],
                         "jobs.delay.04")

    def test_everything_durable(self):
        channel = self.declared(Topology())
        self.assertTrue(all(e["durable"] for e in channel.exchanges.values()))
        self.assertTrue(all(q["durable"] for q in channel.queues.values()))
        self.assertEqual(channel.exchanges["quebert"]["type"], "direct")
        self.assertEqual(channel.exchanges["quebert.delay.deliver"]["type"], "topic")
        self.assertEqual(channel.exchanges["quebert.delay.17"]["type"], "topic")

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
        topology = Topology(errored_ttl_ms=None)
        self.assertEqual(topology.errored_queue_arguments(), {})
        self.assertEqual(Topology(queue_type="quorum", errored_ttl_ms=0)
                         .errored_queue_arguments(), {"x-queue-type": "quorum"})

    def test_custom_exchange_names(self):
        topology = Topology(exchange="jobs")
        channel = self.declared(topology)
        self.assertIn("jobs", channel.exchanges)
        self.assertIn("jobs.delay.deliver", channel.exchanges)
        self.assertIn("jobs.delay.31", channel.queues)
        self.assertEqual(topology.delay_route(3, "q")[0], "jobs.delay.01")


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
