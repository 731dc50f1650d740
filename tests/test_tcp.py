"""quebert's client connections send small writes at once (TCP_NODELAY)."""

from __future__ import annotations

import socket

import pika
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from quebert._tcp import no_delay
from quebert.amqp.connection import _pika_connection_class
from quebert.state.redis import connect_redis
from tests._redis import REDIS_URL


def nodelay_of(transport) -> int:
    return transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


class NoDelayTests(SynchronousTestCase):
    def test_a_transport_without_the_option_is_left_alone(self) -> None:
        self.assertFalse(no_delay(StringTransport()))

    def test_a_transport_refusing_the_option_is_left_alone(self) -> None:
        class Refusing(StringTransport):
            def setTcpNoDelay(self, enabled: bool) -> None:
                raise OSError("not a TCP socket")

        self.assertFalse(no_delay(Refusing()))


class ConnectionTests(TestCase):
    timeout = 30

    async def test_redis_connections_have_nagle_off(self) -> None:
        """
        Without it a state batch sent while the one before is unanswered
        waited for the server's acknowledgement (a delayed ACK, up to 40 ms).
        """
        redis = connect_redis(REDIS_URL)
        self.addCleanup(redis.disconnect)
        await redis.ping()
        [connection] = redis._factory.pool
        self.assertEqual(nodelay_of(connection.transport), 1)

    async def test_amqp_connections_have_nagle_off(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        from tests._rabbit import RABBIT_HOST, RABBIT_PORT, make_vhost

        url = make_vhost(self, "quebert-test-tcp")
        protocol = _pika_connection_class()(pika.URLParameters(url))
        await connectProtocol(TCP4ClientEndpoint(reactor, RABBIT_HOST, RABBIT_PORT), protocol)
        self.addCleanup(lambda: protocol.close() if protocol.is_open else None)
        await protocol.ready
        self.assertEqual(nodelay_of(protocol.transport), 1)
