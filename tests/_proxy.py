"""
A loopback TCP proxy that can freeze traffic without closing sockets.

Runs in the test's reactor, in front of RabbitMQ, for worker processes to
connect through.  :meth:`FreezableProxy.freeze` stops forwarding bytes in
both directions on every connection, current and future (bytes read are
held back, sockets stay open, so nothing looks wrong at the TCP level);
:meth:`FreezableProxy.thaw` forwards what was held and carries on.  The
proxy keeps reading while frozen, so it notices at once when a client
closes or aborts its connection (:attr:`FreezableProxy.closed_at`).
"""

from __future__ import annotations

import time
from typing import Optional

from twisted.internet import protocol, reactor


class _Side(protocol.Protocol):
    """One end of a proxied connection."""

    def __init__(self, proxy: FreezableProxy, pair: _Pair, name: str) -> None:
        self.proxy = proxy
        self.pair = pair
        self.name = name

    def connectionMade(self) -> None:
        # bytes the client sent before the upstream connection was made
        self.pair.flush()

    def dataReceived(self, data: bytes) -> None:
        self.pair.carry(self, data)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.pair.lost(self)


class _Pair:
    """A client connection and its upstream connection to the broker."""

    def __init__(self, proxy: FreezableProxy) -> None:
        self.proxy = proxy
        self.client: Optional[_Side] = None
        self.upstream: Optional[_Side] = None
        self.held: list = []  # (destination name, bytes) held while frozen or unconnected
        self.accepted_at = time.time()
        self.closed_at: Optional[float] = None
        self.closed_by: Optional[str] = None

    def carry(self, source: _Side, data: bytes) -> None:
        destination = "upstream" if source.name == "client" else "client"
        side = self._side(destination)
        if self.proxy.frozen or self.held or side is None or side.transport is None:
            self.held.append((destination, data))
            self.flush()
        else:
            side.transport.write(data)

    def _side(self, name: str) -> Optional[_Side]:
        return self.client if name == "client" else self.upstream

    def flush(self) -> None:
        while self.held and not self.proxy.frozen:
            destination, data = self.held[0]
            side = self._side(destination)
            if side is None or side.transport is None:
                return
            self.held.pop(0)
            side.transport.write(data)

    def lost(self, side: _Side) -> None:
        if self.closed_at is None:
            self.closed_at = time.time()
            self.closed_by = side.name
        other = self.upstream if side is self.client else self.client
        if other is not None and other.transport is not None:
            other.transport.loseConnection()


class _ClientFactory(protocol.Factory):
    noisy = False

    def __init__(self, proxy: FreezableProxy) -> None:
        self.proxy = proxy

    def buildProtocol(self, addr):
        pair = _Pair(self.proxy)
        self.proxy.pairs.append(pair)
        side = _Side(self.proxy, pair, "client")
        pair.client = side
        upstream = protocol.ClientFactory()
        upstream.noisy = False

        def build(addr):
            up = _Side(self.proxy, pair, "upstream")
            pair.upstream = up
            return up

        upstream.buildProtocol = build
        upstream.clientConnectionFailed = lambda connector, reason: (
            side.transport.loseConnection())
        reactor.connectTCP(self.proxy.target_host, self.proxy.target_port, upstream)
        return side


class FreezableProxy:
    """Forwards 127.0.0.1:<port> to ``target_host:target_port``."""

    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 5672) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.frozen = False
        self.pairs: list[_Pair] = []
        self.port = None

    def start(self, testcase) -> int:
        self.port = reactor.listenTCP(0, _ClientFactory(self), interface="127.0.0.1")
        testcase.addCleanup(self.stop)
        return self.port.getHost().port

    def freeze(self) -> float:
        """Stop forwarding, both ways, on every connection; return the time."""
        self.frozen = True
        return time.time()

    def thaw(self) -> None:
        self.frozen = False
        for pair in self.pairs:
            pair.flush()

    def closed_by_client(self, since: float = 0.0) -> list:
        """Times (after ``since``) at which clients closed their connections."""
        return sorted(p.closed_at for p in self.pairs
                      if p.closed_at is not None and p.closed_by == "client"
                      and p.closed_at >= since)

    def stop(self):
        for pair in self.pairs:
            for side in (pair.client, pair.upstream):
                if side is not None and side.transport is not None:
                    side.transport.abortConnection()
        if self.port is not None:
            return self.port.stopListening()
        return None
