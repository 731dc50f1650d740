"""
Tests for quebert.dispatch.connect: resolve, check every address, connect
by address (a MemoryReactor records where), and the bounded pool.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI

from quebert.dispatch.connect import BoundedPool, GuardedEndpointFactory
from quebert.dispatch.policy import URLPolicy
from quebert.errors import URLRefused
from tests._http import FakeResolver


class _TLSPolicy:
    def __init__(self):
        self.asked = []

    def creatorForNetloc(self, hostname, port):
        self.asked.append((hostname, port))
        from twisted.internet.ssl import optionsForClientTLS

        return optionsForClientTLS(hostname.decode("ascii"))


class GuardedEndpointTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.resolver = FakeResolver({
            "svc.test": ["10.0.0.7", "10.0.0.8"],
            "evil.test": ["93.184.216.34", "169.254.169.254"],
            "v6.test": ["2001:db8::1"],
        })
        self.tls = _TLSPolicy()
        self.factory = GuardedEndpointFactory(self.reactor, URLPolicy(), resolver=self.resolver,
                                              connect_timeout=3, tls_policy=self.tls)

    def connect(self, url):
        endpoint = self.factory.endpointForURI(URI.fromBytes(url.encode()))
        return endpoint.connect(Factory.forProtocol(Protocol))

    def test_connects_to_the_checked_address(self):
        d = self.connect("http://svc.test:8080/x")
        self.assertNoResult(d)
        [(host, port, _, timeout, _)] = self.reactor.tcpClients
        self.assertEqual((host, port, timeout), ("10.0.0.7", 8080, 3))
        self.assertEqual(self.resolver.asked, ["svc.test"])

    def test_any_denied_address_refuses(self):
        d = self.connect("http://evil.test/")
        error = self.failureResultOf(d, URLRefused).value
        self.assertIn("evil.test (169.254.169.254)", str(error))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_ip_literal_is_not_resolved(self):
        self.connect("http://10.1.1.1:81/")
        self.assertEqual(self.resolver.asked, [])
        self.assertEqual(self.reactor.tcpClients[0][:2], ("10.1.1.1", 81))

    def test_ip_literal_denied(self):
        self.failureResultOf(self.connect("http://169.254.169.254/"), URLRefused)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_ipv6(self):
        self.connect("http://v6.test/")
        self.connect("http://[2001:db8::2]:8000/")
        self.assertEqual([c[:2] for c in self.reactor.tcpClients],
                         [("2001:db8::1", 80), ("2001:db8::2", 8000)])

    def test_unknown_host(self):
        self.failureResultOf(self.connect("http://nowhere.test/"), DNSLookupError)

    def test_next_address_after_a_failure(self):
        d = self.connect("http://svc.test/")
        connector = self.reactor.connectors[0]
        self.reactor.tcpClients[0][2].clientConnectionFailed(
            connector, Failure(ConnectionRefusedError()))
        self.assertEqual([c[0] for c in self.reactor.tcpClients], ["10.0.0.7", "10.0.0.8"])
        self.reactor.tcpClients[1][2].clientConnectionFailed(
            self.reactor.connectors[1], Failure(ConnectionRefusedError()))
        self.failureResultOf(d, ConnectionRefusedError)

    def test_cancel_stops_trying(self):
        d = self.connect("http://svc.test/")
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_tls_verifies_the_host_name(self):
        self.connect("https://svc.test/")
        self.assertEqual(self.tls.asked, [(b"svc.test", 443)])
        self.assertEqual(self.reactor.tcpClients[0][:2], ("10.0.0.7", 443))


class _FakeTransport:
    def __init__(self):
        self.closed = False

    def loseConnection(self):
        self.closed = True


class _FakeConnection:
    state = "QUIESCENT"

    def __init__(self):
        self.transport = _FakeTransport()

    def abort(self):
        self.transport.closed = True
        return defer.succeed(None)


class BoundedPoolTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.pool = BoundedPool(self.reactor, max_idle=3, max_idle_per_host=2,
                                idle_timeout=30)

    def test_new_connections_log_nothing(self):
        """Twisted's factory logs two lines per connection: 1,000 a run at 500 in flight."""
        from twisted.logger import globalLogPublisher

        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        factory = self.pool._factory(defer.Deferred(), "http://h/")
        factory.doStart()
        factory.doStop()
        self.assertEqual(logged, [])

    def test_idle_bounded_across_hosts(self):
        connections = [_FakeConnection() for _ in range(5)]
        for i, c in enumerate(connections):
            self.pool._putConnection(("http", f"h{i}", 80), c)
        self.assertEqual(self.pool.idle, 3)
        self.assertEqual([c.transport.closed for c in connections],
                         [True, True, False, False, False])
        self.assertEqual(len(self.pool._connections), 3)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 3)

    def test_idle_bounded_per_host(self):
        connections = [_FakeConnection() for _ in range(3)]
        for c in connections:
            self.pool._putConnection(("http", "h", 80), c)
        self.assertEqual(self.pool.idle, 2)
        self.assertTrue(connections[0].transport.closed)

    def test_idle_timeout_forgets_the_host(self):
        self.pool._putConnection(("http", "h", 80), _FakeConnection())
        self.reactor.advance(30)
        self.assertEqual(self.pool.idle, 0)
        self.assertEqual(self.pool._connections, {})

    def test_reuse_forgets_the_host(self):
        c = _FakeConnection()
        self.pool._putConnection(("http", "h", 80), c)
        self.pool.retryAutomatically = False
        got = self.successResultOf(self.pool.getConnection(("http", "h", 80), None))
        self.assertIs(got, c)
        self.assertEqual(self.pool._connections, {})
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_close(self):
        connections = [_FakeConnection() for _ in range(2)]
        for i, c in enumerate(connections):
            self.pool._putConnection(("http", f"h{i}", 80), c)
        self.successResultOf(self.pool.closeCachedConnections())
        self.assertTrue(all(c.transport.closed for c in connections))
        self.assertEqual(self.pool.idle, 0)
