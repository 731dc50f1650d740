"""
A TCP proxy in the test process that a test can cut and restore.

Between the workers and a shared server (Redis), it makes that server
"go down" for the workers alone: :meth:`CuttableProxy.cut` aborts every
proxied connection (both sides, no FIN handshake) and stops listening, so
new connections are refused; :meth:`CuttableProxy.restore` listens again on
the same port.  ``cut(refuse=False)`` keeps listening and closes each new
connection at once instead, as a load balancer or proxy in front of a
server that is down does.  The shared server itself, and every other
client of it, never notice.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer, protocol
from twisted.internet.error import CannotListenError
from twisted.protocols import portforward

from tests._worker import sleep


class _Server(portforward.ProxyServer):
    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        self.factory.accepted += 1
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        self.factory.connections.discard(self)
        super().connectionLost(reason)


class _Closed(protocol.Protocol):
    """
    A connection accepted while the server behind is down: sent the
    factory's ``greeting`` (if any) and closed at once.
    """

    def connectionMade(self) -> None:
        self.factory.accepted += 1
        if self.factory.greeting:
            self.transport.write(self.factory.greeting)
        self.transport.loseConnection()


class _Factory(portforward.ProxyFactory):
    protocol = _Server

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.connections: set = set()
        self.accepted = 0
        #: cut without refusing: new connections are accepted and closed
        self.backend_down = False
        #: bytes such a connection is sent before it is closed
        self.greeting = b""

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        if self.backend_down:
            closed = _Closed()
            closed.factory = self
            return closed
        return super().buildProtocol(addr)


class CuttableProxy:
    """Forward ``127.0.0.1:<port>`` to ``host:port``; ``cut()``/``restore()`` it."""

    def __init__(self, reactor: Any, host: str, port: int) -> None:
        self.reactor = reactor
        self.factory = _Factory(host, port)
        self.listening: Optional[Any] = None
        self.port = 0

    def start(self) -> int:
        """Listen on a free port; return it."""
        self.listening = self.reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port = self.listening.getHost().port
        return self.port

    @property
    def accepted(self) -> int:
        """How many connections the proxy accepted so far."""
        return self.factory.accepted

    @property
    def up(self) -> bool:
        return self.listening is not None

    async def cut(self, refuse: bool = True, greeting: bytes = b"") -> int:
        """
        Refuse new connections (``refuse``) or accept them, send them
        ``greeting`` and close them; abort the open ones; return how many
        were open.
        """
        if refuse and self.listening is not None:
            listening, self.listening = self.listening, None
            await listening.stopListening()
        self.factory.backend_down = not refuse
        self.factory.greeting = greeting
        open_ = list(self.factory.connections)
        for server in open_:
            server.transport.abortConnection()
            peer = getattr(server, "peer", None)
            if peer is not None and peer.transport is not None:
                peer.transport.abortConnection()
        return len(open_)

    async def restore(self, attempts: int = 50) -> None:
        """Forward again, listening on the same port again if the cut refused."""
        self.factory.backend_down = False
        if self.listening is not None:
            return
        for _ in range(attempts):
            try:
                self.listening = self.reactor.listenTCP(self.port, self.factory,
                                                        interface="127.0.0.1")
                return
            except CannotListenError:
                await sleep(0.1)
        raise AssertionError(f"the proxy could not listen on port {self.port} again")

    def stop(self) -> defer.Deferred:
        """For cleanup: close everything."""
        for server in list(self.factory.connections):
            server.transport.abortConnection()
        if self.listening is not None:
            listening, self.listening = self.listening, None
            return defer.maybeDeferred(listening.stopListening)
        return defer.succeed(None)
