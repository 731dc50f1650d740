# -*- test-case-name: tests.test_dispatch_connect -*-
"""
Connecting to a URL task's target: resolve, check every address, connect
to a checked one.

:class:`GuardedEndpointFactory` is the ``IAgentEndpointFactory`` of the
dispatcher's ``Agent``.  For each new connection it resolves the host name
through the reactor's ``nameResolver`` (``getaddrinfo`` in the reactor's
thread pool), checks *every* address against the policy's networks
(refusing the request if any is denied: a name that resolves to one public
and one metadata address is not one to trust), and then connects by IP
address to those addresses in turn.  The address connected to is the
address checked, so there is no window for a DNS answer to change in
between (DNS rebinding).  For ``https`` the TLS layer still uses the URL's
host name for SNI and certificate verification.

:class:`BoundedPool` is Twisted's persistent ``HTTPConnectionPool`` with a
bound on idle connections across all hosts.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IResolutionReceiver, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.web.client import (
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from quebert.dispatch.policy import URLPolicy

log = Logger(namespace="quebert.dispatch")


def resolve(resolver: Any, host: str, port: int) -> defer.Deferred:
    """
    All the IP addresses (strings) ``resolver`` (an ``IHostnameResolver``)
    finds for ``host``; fails with ``DNSLookupError`` when there are none.
    """
    d: defer.Deferred = defer.Deferred()
    addresses: list[str] = []

    @implementer(IResolutionReceiver)
    class Receiver:
        def resolutionBegan(self, resolution: Any) -> None:
            pass

        def addressResolved(self, address: Any) -> None:
            addresses.append(address.host)

        def resolutionComplete(self) -> None:
            if d.called:
                return
            if addresses:
                d.callback(list(dict.fromkeys(addresses)))
            else:
                d.errback(DNSLookupError(f"no address found for {host!r}"))

    resolver.resolveHostName(Receiver(), host, port, addressTypes=[IPv4Address, IPv6Address],
                             transportSemantics="TCP")
    return d


@implementer(IAgentEndpointFactory)
class GuardedEndpointFactory:
    """
    Endpoints that connect only to addresses ``policy`` allows.

    ``resolver`` defaults to ``reactor.nameResolver``; ``tls_policy`` (an
    ``IPolicyForHTTPS``) to ``BrowserLikePolicyForHTTPS()``, which verifies
    certificates against the system's trust store.
    """

    def __init__(self, reactor: Any, policy: URLPolicy, *, resolver: Any = None,
                 connect_timeout: float = 10.0, tls_policy: Optional[IPolicyForHTTPS] = None
                 ) -> None:
        self.reactor = reactor
        self.policy = policy
        self.resolver = resolver
        self.connect_timeout = connect_timeout
        self.tls_policy = tls_policy or BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return GuardedEndpoint(self, uri.scheme.decode("ascii"), host, uri.port)


@implementer(IStreamClientEndpoint)
class GuardedEndpoint:
    """One ``scheme://host:port``; see :class:`GuardedEndpointFactory`."""

    def __init__(self, factory: GuardedEndpointFactory, scheme: str, host: str,
                 port: int) -> None:
        self.factory = factory
        self.scheme = scheme
        self.host = host
        self.port = port

    def __repr__(self) -> str:
        return f"<GuardedEndpoint {self.scheme}://{self.host}:{self.port}>"

    def connect(self, protocolFactory: Any) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, protocolFactory: Any) -> Any:
        policy = self.factory.policy
        try:
            addresses = [ipaddress.ip_address(self.host).compressed]
        except ValueError:
            resolver = self.factory.resolver or self.factory.reactor.nameResolver
            addresses = await resolve(resolver, self.host, self.port)
        for address in addresses:
            policy.check_address(address, host=self.host)
        error: Optional[Exception] = None
        for address in addresses:
            endpoint = self._endpoint(address)
            try:
                return await endpoint.connect(protocolFactory)
            except ConnectError as e:
                log.debug("could not connect to {host} at {address}: {error}",
                          host=self.host, address=address, error=e)
                error = e
        assert error is not None
        raise error

    def _endpoint(self, address: str) -> IStreamClientEndpoint:
        factory = self.factory
        tcp: IStreamClientEndpoint
        if ":" in address:
            tcp = TCP6ClientEndpoint(factory.reactor, address.split("%", 1)[0], self.port,
                                     timeout=factory.connect_timeout)
        else:
            tcp = TCP4ClientEndpoint(factory.reactor, address, self.port,
                                     timeout=factory.connect_timeout)
        if self.scheme == "https":
            creator = factory.tls_policy.creatorForNetloc(self.host.encode("ascii"), self.port)
            return wrapClientTLS(creator, tcp)
        return tcp


class _QuietFactory(_HTTP11ClientFactory):
    """Twisted's HTTP/1.1 connection factory without its two log lines per connection."""

    noisy = False


class BoundedPool(HTTPConnectionPool):
    """
    A persistent connection pool keeping at most ``max_idle`` idle
    connections in all (the oldest is closed to make room), at most
    ``max_idle_per_host`` per ``scheme://host:port``, each for at most
    ``idle_timeout`` seconds.  Connections in use are bounded by the
    dispatcher, which never has more than ``max_connections`` requests in
    flight.

    This leans on ``HTTPConnectionPool``'s ``_connections``/``_timeouts``
    attributes, unchanged in Twisted for over a decade; ``tests`` pin it.
    """

    _factory = _QuietFactory

    def __init__(self, reactor: Any, *, max_idle: int, max_idle_per_host: int,
                 idle_timeout: float = 60.0) -> None:
        super().__init__(reactor, persistent=True)
        self.max_idle = max_idle
        self.maxPersistentPerHost = max_idle_per_host
        self.cachedConnectionTimeout = idle_timeout

    @property
    def idle(self) -> int:
        """Idle connections kept right now."""
        return len(self._timeouts)

    def getConnection(self, key: Any, endpoint: Any) -> defer.Deferred:
        d = super().getConnection(key, endpoint)
        if not self._connections.get(key, True):
            del self._connections[key]
        return d

    def _putConnection(self, key: Any, connection: Any) -> None:
        super()._putConnection(key, connection)
        while len(self._timeouts) > self.max_idle:
            oldest = next(iter(self._timeouts))
            for k, connections in self._connections.items():
                if oldest in connections:
                    self._timeouts[oldest].cancel()
                    self._removeConnection(k, oldest)
                    break
            else:  # pragma: no cover - the two dicts always agree
                break

    def _removeConnection(self, key: Any, connection: Any) -> None:
        super()._removeConnection(key, connection)
        if not self._connections.get(key, True):
            del self._connections[key]
