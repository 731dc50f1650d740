# -*- test-case-name: tests.test_amqp -*-
"""
One reconnecting AMQP connection, as a Twisted service.

``AMQPConnection`` is a ``ClientService`` around pika's
``TwistedProtocolConnection``.  Each time TCP connects it waits for pika's
``ready`` (TCP-connected is not AMQP-ready), then runs every registered
*preparer* — open channels, set QoS, declare topology, register consumers —
before ``whenConnected()`` fires.  A preparer that fails fails the whole
attempt, the connection is dropped, and ``ClientService`` retries with
backoff, so a consumer can never be silently missing after a reconnect.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional
from urllib.parse import urlsplit

import pika
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger

from quebert.errors import ConfigurationError

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"

Preparer = Callable[[Any], Any]


def _reactor(reactor: Any) -> Any:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        return global_reactor
    return reactor


def parse_amqp_url(url: str) -> pika.URLParameters:
    """pika parameters for ``url``, or a :class:`ConfigurationError`."""
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ConfigurationError(
            f"AMQP URL must look like amqp://user:password@host:5672/vhost, not {url!r}"
        )
    try:
        return pika.URLParameters(url)
    except Exception as e:  # pika raises assorted errors for bad query args
        raise ConfigurationError(f"bad AMQP URL {url!r}: {e}") from e


def amqp_url(host: str = "127.0.0.1", port: int = 5672, login: str = "guest",
             password: str = "guest", vhost: str = "/", heartbeat: Optional[int] = None,
             ssl: bool = False) -> str:
    """Build an AMQP URL from guillotina_amqp-style settings."""
    from urllib.parse import quote

    scheme = "amqps" if ssl else "amqp"
    url = f"{scheme}://{quote(login, safe='')}:{quote(password, safe='')}@{host}:{int(port)}/"
    url += quote(vhost, safe="")
    if heartbeat is not None:
        url += f"?heartbeat={int(heartbeat)}"
    return url


class _PikaFactory(Factory):
    def __init__(self, parameters: pika.URLParameters, reactor: Any) -> None:
        self.parameters = parameters
        self.reactor = reactor

    def buildProtocol(self, addr):
        return TwistedProtocolConnection(self.parameters, custom_reactor=self.reactor)


class AMQPConnection(ClientService):
    """
    A reconnecting, prepared AMQP connection.

    :param url: ``amqp://`` or ``amqps://`` URL.  pika ignores host, port and
        TLS under Twisted, so they configure the endpoint here.
    :param name: used in log events (``publisher``, ``consumer``...).
    """

    log = Logger()

    def __init__(self, url: str, *, name: str = "amqp", reactor: Any = None,
                 retry_policy: Optional[Callable[[int], float]] = None) -> None:
        self.url = url
        self.connection_name = name
        self.parameters = parse_amqp_url(url)
        self.reactor = _reactor(reactor)
        self._preparers: List[Preparer] = []
        self.connected_count = 0
        self.current: Optional[TwistedProtocolConnection] = None
        parts = urlsplit(url)
        endpoint = HostnameEndpoint(self.reactor, parts.hostname, parts.port or (
            5671 if parts.scheme == "amqps" else 5672), timeout=10)
        if parts.scheme == "amqps":
            endpoint = wrapClientTLS(optionsForClientTLS(parts.hostname), endpoint)
        super().__init__(
            endpoint,
            _PikaFactory(self.parameters, self.reactor),
            retryPolicy=retry_policy or backoffPolicy(initialDelay=0.5, maxDelay=30.0),
            clock=self.reactor,
            prepareConnection=self._prepare,
        )

    def add_preparer(self, preparer: Preparer) -> None:
        """
        Run ``preparer(protocol)`` (may return a Deferred) on every new
        connection, in the order added, before it is handed out.
        """
        self._preparers.append(preparer)

    @defer.inlineCallbacks
    def _prepare(self, proxy):
        protocol = getattr(proxy, "_protocol", proxy)
        try:
            # pika's ``ready`` is ours to wait on, never to cancel.
            yield protocol.ready
            for preparer in self._preparers:
                yield preparer(protocol)
        except Exception as e:
            self.log.warn(
                "AMQP {name} connection to {host} could not be prepared: {error}",
                name=self.connection_name, host=self.parameters.host, error=e,
            )
            if protocol.transport is not None:
                protocol.transport.abortConnection()
            raise
        self.current = protocol
        self.connected_count += 1
        if protocol.closed is not None:
            protocol.closed.addBoth(self._lost, protocol)
        self.log.info(
            "AMQP {name} connection ready ({host}:{port}{vhost}, connection #{count})",
            name=self.connection_name, host=self.parameters.host, port=self.parameters.port,
            vhost=self.parameters.virtual_host, count=self.connected_count,
        )

    def _lost(self, reason: Any, protocol) -> None:
        if self.current is protocol:
            self.current = None
        if self.running:
            self.log.warn("AMQP {name} connection lost: {reason}; reconnecting",
                          name=self.connection_name, reason=reason)

    @defer.inlineCallbacks
    def stopService(self):
        protocol = self.current
        if protocol is not None and protocol.is_open:
            closed = protocol.closed
            protocol.close()
            if closed is not None:
                # Give the broker a moment to confirm the close.
                timeout = defer.Deferred()
                call = self.reactor.callLater(2.0, timeout.callback, None)
                mirror = defer.Deferred()
                closed.addBoth(lambda r: (mirror.called or mirror.callback(None), r)[1])
                yield defer.DeferredList([mirror, timeout], fireOnOneCallback=True,
                                         consumeErrors=True)
                if call.active():
                    call.cancel()
        self.current = None
        yield super().stopService()
