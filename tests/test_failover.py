"""
Several broker nodes: ``--amqp-url`` with the URLs of a cluster's nodes.

Unit tests drive :class:`quebert.amqp.connection._FailoverEndpoint` with
fake endpoints; the real ones connect quebert's connections, a worker and
a client to a list whose first node does not answer.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from quebert.amqp.connection import (
    AMQPConnection,
    Node,
    _FailoverEndpoint,
    split_amqp_urls,
)
from quebert.config import from_mapping
from quebert.errors import ConfigurationError
from tests._rabbit import make_vhost, read_all, vhost_of
from tests.test_integration import IntegrationTestCase


class FakeEndpoint:
    def __init__(self, name: str, up: bool) -> None:
        self.name = name
        self.up = up
        self.attempts = 0

    def connect(self, factory):
        self.attempts += 1
        if self.up:
            return defer.succeed(f"protocol of {self.name}")
        return defer.fail(ConnectionRefusedError(self.name))


class Factory:
    """Stands for ClientService's proxy factory: the endpoint must not rely on it."""


def nodes(*states: bool) -> list:
    result = []
    for i, up in enumerate(states):
        node = Node(f"amqp://guest:guest@node{i}:5672/v", reactor=None)
        node.endpoint = FakeEndpoint(f"node{i}", up)
        result.append(node)
    return result


class FailoverEndpointTests(SynchronousTestCase):
    def setUp(self):
        self.attempts = 0
        self.tried: list = []

    @property
    def chosen(self) -> list:
        """The node tried last before each successful connection."""
        return self.connected

    def endpoint(self, nodes):
        self.connected: list = []

        def notify():
            self.attempts += 1

        endpoint = _FailoverEndpoint(nodes, notify, self.tried.append)
        connect = endpoint.connect

        def connect_and_record(factory):
            d = connect(factory)
            d.addCallback(lambda p: (self.connected.append(self.tried[-1]), p)[1])
            return d

        endpoint.connect = connect_and_record
        return endpoint

    def test_the_first_node_that_answers(self):
        ns = nodes(False, True, True)
        factory = Factory()
        protocol = self.successResultOf(self.endpoint(ns).connect(factory))
        self.assertEqual(protocol, "protocol of node1")
        self.assertEqual(self.chosen, [ns[1]])
        self.assertEqual(self.tried, [ns[0], ns[1]])
        self.assertEqual([n.endpoint.attempts for n in ns], [1, 1, 0])
        self.assertEqual(self.attempts, 1)

    def test_after_a_connection_the_next_attempt_starts_at_the_next_node(self):
        """A node that went away is not tried first again: nothing waits for it."""
        ns = nodes(True, True, True)
        endpoint = self.endpoint(ns)
        for expected in (0, 1, 2, 0):
            self.successResultOf(endpoint.connect(Factory()))
            self.assertIs(self.chosen[-1], ns[expected])

    def test_every_node_down_fails_the_attempt(self):
        ns = nodes(False, False, False)
        self.failureResultOf(self.endpoint(ns).connect(Factory()), ConnectionRefusedError)
        self.assertEqual([n.endpoint.attempts for n in ns], [1, 1, 1])
        self.assertEqual(self.chosen, [])

    def test_a_dead_node_is_skipped_in_later_rounds_too(self):
        ns = nodes(True, False, True)
        endpoint = self.endpoint(ns)
        self.successResultOf(endpoint.connect(Factory()))  # node0
        self.successResultOf(endpoint.connect(Factory()))  # node1 is down: node2
        self.assertEqual([n.address for n in self.chosen], ["node0:5672/v", "node2:5672/v"])


class SplitURLTests(SynchronousTestCase):
    def test_forms(self):
        one = "amqp://guest:guest@a:5672/v"
        two = "amqp://guest:guest@b:5673/v"
        self.assertEqual(split_amqp_urls(one), [one])
        self.assertEqual(split_amqp_urls(f"{one},{two}"), [one, two])
        self.assertEqual(split_amqp_urls(f" {one} , {two} "), [one, two])
        self.assertEqual(split_amqp_urls(f"{one} {two}"), [one, two])
        self.assertEqual(split_amqp_urls([one, two]), [one, two])

    def test_errors(self):
        for bad in ("", ",", [], "http://x", "amqp://a:1/v,redis://b", 5, [5]):
            self.assertRaises(ConfigurationError, split_amqp_urls, bad)
        e = self.assertRaises(ConfigurationError, split_amqp_urls,
                              "amqp://u:secret@a/v,nope://u:secret@b/v")
        self.assertNotIn("secret", str(e))

    def test_config_file_takes_a_list(self):
        config = from_mapping({"amqp": {"url": ["amqp://a:5672/v", "amqp://b:5672/v"]}})
        self.assertEqual(config.amqp_url, "amqp://a:5672/v,amqp://b:5672/v")
        self.assertRaises(ConfigurationError, from_mapping, {"amqp": {"url": ["ftp://a"]}})

    def test_connection_names_its_nodes(self):
        connection = AMQPConnection("amqp://guest:guest@a:5672/v,amqps://b/w")
        self.assertEqual([n.address for n in connection.nodes], ["a:5672/v", "b:5671/w"])
        self.assertEqual(connection.address, "a:5672/v")
        self.assertIsNone(connection.connected_node)

    def test_each_node_is_connected_to_with_its_own_credentials_and_vhost(self):
        """The protocol is built with the parameters of the node being tried."""
        connection = AMQPConnection("amqp://u1:p1@a:5672/v1,amqp://u2:p2@b:5672/v2")
        connection._trying(connection.nodes[1])
        factory = connection._factory_for_nodes
        self.assertEqual(factory.parameters.virtual_host, "v2")
        self.assertEqual(factory.parameters.credentials.username, "u2")
        self.assertEqual(connection.address, "b:5672/v2")


def _close_connections(vhost: str) -> None:
    """Have RabbitMQ close every connection to ``vhost`` (blocking)."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_connections", "vhost", "pid"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        name, _, pid = line.partition("\t")
        if name == vhost:
            subprocess.run(["rabbitmqctl", "close_connection", pid, "closed by the tests"],
                           capture_output=True, check=False)


def _dead_port() -> int:
    """A local port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RealFailoverTests(IntegrationTestCase):
    """The first node does not answer: the worker and the client use the second."""

    timeout = 120

    async def test_worker_and_client_skip_a_node_that_does_not_answer(self):
        dead = f"amqp://guest:guest@127.0.0.1:{_dead_port()}/{vhost_of(self.url)}"
        urls = f"{dead},{self.url}"
        worker = self.worker("--amqp-url", urls).start()
        await worker.ready()
        from quebert import Client

        client = Client(urls, state=self.state)
        self.addCleanup(client.close)
        info = await client.add_task("it.add", 1, 2)
        [record] = await self.wait_states([info.id], worker=worker)
        self.assertEqual(record["result"], 3)
        self.assertEqual(client.broker.publishing.connected_node,
                         f"127.0.0.1:5672/{vhost_of(self.url)}")
        self.assertIn("did not answer", worker.log())
        self.assertEqual(await worker.stop(), 0)


class BridgePublisherFailoverTests(TestCase):
    """The Guillotina bridge's asyncio publisher, given several nodes."""

    timeout = 120

    def setUp(self):
        self.url = make_vhost(self)
        self.vhost = vhost_of(self.url)

    def run_asyncio(self, coroutine_function):
        """Run ``coroutine_function()`` in an asyncio loop of its own, in a thread."""
        return deferToThread(lambda: asyncio.run(coroutine_function()))

    async def test_a_node_that_does_not_answer_is_skipped_and_a_lost_one_left(self):
        from quebert.amqp.topology import Topology
        from quebert.bridge.guillotina.publisher import Publisher

        dead = f"amqp://guest:guest@127.0.0.1:{_dead_port()}/{self.vhost}"
        other = self.url.replace("127.0.0.1", "localhost")
        publisher = Publisher([dead, self.url, other], Topology(), timeout=5.0)
        nodes: list = []

        async def first():
            await publisher.publish("q", b'{"n": 1}', {}, message_id="m1")
            nodes.append(publisher.node)

        async def second():
            await publisher.publish("q", b'{"n": 2}', {}, message_id="m2")
            nodes.append(publisher.node)
            await publisher.close()

        async def both():
            await first()
            # RabbitMQ closes the connection: the next publish moves to the next node
            await asyncio.get_running_loop().run_in_executor(
                None, _close_connections, self.vhost)
            await second()

        await self.run_asyncio(both)
        self.assertEqual(nodes[0], f"127.0.0.1:5672/{self.vhost}")
        self.assertEqual(nodes[1], f"localhost:5672/{self.vhost}")
        messages = await deferToThread(read_all, self.url, "q")
        self.assertEqual([p.message_id for p, _ in messages], ["m1", "m2"])
