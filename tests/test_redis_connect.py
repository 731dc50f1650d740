"""
Connections to Redis (``quebert.state._redis_connect``) are re-established
whatever became of the one before: a connection whose SELECT is lost,
left unanswered or refused for a passing reason (Redis frozen, a proxy
whose backend is down, a full server) is dropped and tried again, not
given up for good as txredisapi does; wrong credentials or a database
that does not exist are configuration errors, and stop.
"""

from __future__ import annotations

import time
from typing import Any

import txredisapi
from twisted.internet import reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from quebert.state._redis_connect import _Protocol, _SentinelProtocol
from quebert.state.redis import connect_redis, parse_redis_url
from tests._redis import REDIS_URL, through_freezable_proxy
from tests.faults._proxy import CuttableProxy


async def _sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def _ping(redis: Any, timeout: float) -> Any:
    """PING, failed with CancelledError after ``timeout`` seconds unanswered."""
    return await redis.ping().addTimeout(timeout, reactor)


async def _answered_again(testcase: TestCase, redis: Any, within: float, why: str) -> None:
    """Ping until Redis answers; fail the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            testcase.assertEqual(await _ping(redis, 2), "PONG")
            return
        except Exception as error:  # not connected yet: txredisapi waits, or says so
            testcase.assertLess(time.monotonic(), deadline, f"{why} ({error!r})")
            await _sleep(0.1)


class _Factory:
    """What txredisapi's protocol asks of its factory while it sets up."""

    isLazy = True
    is_master = True

    def __init__(self) -> None:
        self.stopped = 0
        self.errors: list = []

    def stopTrying(self) -> None:
        self.stopped += 1

    def connectionError(self, message: str) -> None:
        self.errors.append(message)


SELECT_3 = b"*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n"


class SetUpTests(SynchronousTestCase):
    """
    A connection's AUTH and SELECT, on a transport in memory, for both
    protocols quebert connects with (plain and through Sentinel).
    """

    def connect(self, protocol_class: Any, password: Any = None) -> tuple:
        factory = _Factory()
        protocol = protocol_class(password=password, dbid=3, convertNumbers=False)
        protocol.factory = factory
        # txredisapi parses a multi-bulk reply one element per turn
        clock = Clock()
        protocol.callLater = clock.callLater
        transport = StringTransport()
        protocol.makeConnection(transport)
        if protocol_class is _SentinelProtocol:
            self.assertIn(b"ROLE", transport.value())
            transport.clear()
            protocol.dataReceived(b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n")
            for _ in range(10):
                clock.advance(0)
        return factory, protocol, transport

    def test_a_select_lost_with_its_connection_leaves_reconnecting_on(self) -> None:
        for protocol_class in (_Protocol, _SentinelProtocol):
            factory, protocol, transport = self.connect(protocol_class)
            self.assertEqual(transport.value(), SELECT_3, protocol_class)
            protocol.connectionLost(Failure(ConnectionDone()))
            self.assertEqual(factory.stopped, 0, protocol_class)
        self.flushLoggedErrors()

    def test_a_passing_refusal_drops_the_connection_only(self) -> None:
        for protocol_class in (_Protocol, _SentinelProtocol):
            factory, protocol, transport = self.connect(protocol_class)
            protocol.dataReceived(b"-ERR max number of clients reached\r\n")
            self.assertEqual(factory.stopped, 0, protocol_class)
            self.assertEqual(transport.disconnecting or transport.disconnected, True)

    def test_no_such_database_stops_reconnecting(self) -> None:
        for protocol_class in (_Protocol, _SentinelProtocol):
            factory, protocol, transport = self.connect(protocol_class)
            protocol.dataReceived(b"-ERR DB index is out of range\r\n")
            self.assertEqual(factory.stopped, 1, protocol_class)
            self.assertIn("could not set dbid", factory.errors[0])

    def test_wrong_credentials_stop_reconnecting(self) -> None:
        factory = _Factory()
        protocol = _Protocol(password="nope", dbid=3, convertNumbers=False)
        protocol.factory = factory
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"-WRONGPASS invalid username-password pair\r\n")
        self.assertEqual(factory.stopped, 1)
        self.assertIn("could not auth", factory.errors[0])

    def test_a_connection_set_up_is_left_alone(self) -> None:
        """Once the set-up is done, a SELECT of the user's is txredisapi's own."""
        factory, protocol, transport = self.connect(_Protocol)
        protocol.dataReceived(b"+OK\r\n")
        transport.clear()
        failures: list = []
        protocol.select(4).addErrback(failures.append)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(failures), 1)
        self.assertEqual(factory.stopped, 0)


class ReconnectionTests(TestCase):
    timeout = 60

    async def test_a_front_whose_backend_is_down_is_tried_again(self) -> None:
        """
        A proxy in front of Redis accepts connections and closes them while
        its backend is down: the connections' SELECT is lost, they are
        tried again, and once the backend is back one gets through.
        """
        await self.tried_until_forwarded()

    async def test_a_full_server_is_tried_again(self) -> None:
        """'max number of clients reached' passes: the connection is tried again."""
        await self.tried_until_forwarded(b"-ERR max number of clients reached\r\n")

    async def tried_until_forwarded(self, greeting: bytes = b"") -> None:
        """
        Connect through a :class:`~tests.faults._proxy.CuttableProxy` that
        accepts and closes connections (after ``greeting``) until it has
        seen three, then forwards them: Redis must answer.
        """
        parsed = parse_redis_url(REDIS_URL)
        front = CuttableProxy(reactor, parsed["host"], parsed["port"])
        port = front.start()
        self.addCleanup(front.stop)
        await front.cut(refuse=False, greeting=greeting)
        redis = connect_redis(f"redis://127.0.0.1:{port}/{parsed['db']}")
        self.addCleanup(redis.disconnect)
        deadline = time.monotonic() + 20
        while front.accepted < 3:
            self.assertLess(time.monotonic(), deadline, "gave up reconnecting")
            await _sleep(0.05)
        await front.restore()
        await _answered_again(self, redis, 20, f"never connected once forwarded ({greeting!r})")
        self.flushLoggedErrors()

    async def test_a_reconnection_left_unanswered_is_tried_again(self) -> None:
        """
        Redis stops answering with its sockets open (frozen, partitioned)
        for longer than a reconnection takes: the connection is dropped
        after the reply timeout, the reconnection's SELECT is left
        unanswered and dropped too, and once Redis answers again a later
        attempt connects.  txredisapi alone stops reconnecting for good
        when a SELECT fails, whatever the reason.
        """
        proxy, redis = through_freezable_proxy(self, reply_timeout=0.5)
        self.assertEqual(await _ping(redis, 10), "PONG")

        frozen_at = proxy.freeze()
        with self.assertRaises(txredisapi.TimeoutError):
            await _ping(redis, 10)
        deadline = time.monotonic() + 20
        while len(proxy.closed_by_client(since=frozen_at)) < 2:
            self.assertLess(time.monotonic(), deadline,
                            "the reconnection made while frozen was not dropped")
            await _sleep(0.1)
        proxy.thaw()
        await _answered_again(self, redis, 20, "never connected again after the freeze")

    async def test_a_refused_database_is_not_tried_again(self) -> None:
        """
        A SELECT the server refuses (no such database) is a configuration
        error, not an outage: the connection gives up and says so instead
        of reconnecting in a loop.
        """
        parsed = parse_redis_url(REDIS_URL)
        await self.assert_given_up(f"redis://{parsed['host']}:{parsed['port']}/100000")

    async def test_refused_credentials_are_not_tried_again(self) -> None:
        """So is an AUTH the server refuses (this one has no password)."""
        parsed = parse_redis_url(REDIS_URL)
        await self.assert_given_up(
            f"redis://:not-the-password@{parsed['host']}:{parsed['port']}/{parsed['db']}")

    async def assert_given_up(self, url: str) -> None:
        redis = connect_redis(url)
        self.addCleanup(redis.disconnect)
        deadline = time.monotonic() + 10
        while not redis._factory.stopped:
            self.assertLess(time.monotonic(), deadline, "still reconnecting")
            await _sleep(0.05)
        with self.assertRaises(txredisapi.ConnectionError):
            await _ping(redis, 5)
        self.flushLoggedErrors()
