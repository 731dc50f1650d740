"""
A real HTTP target for the dispatcher's tests: a twisted.web site on
127.0.0.1, port 0, with one resource per behaviour, that records what it
saw (requests, connections, the most requests in flight at once).

Nothing sleeps: slow resources hold their requests until the test
releases them (or the client drops the connection).
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostnameResolver
from twisted.web import http, resource, server
from zope.interface import implementer


class _Leaf(resource.Resource):
    isLeaf = True

    def __init__(self, target, render):
        super().__init__()
        self.target = target
        self._render = render

    def render(self, request):
        self.target.requests.append(request)
        return self._render(self.target, request)


def _ok(target, request):
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"ETag", b'"v1"')
    request.setHeader(b"X-Noise", b"ignored")
    return "hé, ok".encode()


def _no_content(target, request):
    request.setResponseCode(204)
    return b""


def _status(code, body=b"", headers=()):
    def render(target, request):
        request.setResponseCode(code)
        for name, value in headers:
            request.setHeader(name, value)
        return body

    return render


def _unavailable(target, request):
    request.setResponseCode(503)
    when = target.reactor.seconds() + 30
    request.setHeader(b"Retry-After", http.datetimeToString(when))
    return b"down for maintenance"


def _redirect(target, request):
    request.setResponseCode(302)
    request.setHeader(b"Location", b"/ok")
    return b""


def _echo(target, request):
    request.setHeader(b"Content-Type", b"application/json")
    headers = {k.decode(): [v.decode() for v in vs]
               for k, vs in request.requestHeaders.getAllRawHeaders()}
    return json.dumps({
        "method": request.method.decode(),
        "path": request.uri.decode(),
        "headers": {k.lower(): v for k, v in headers.items()},
        "body": request.content.read().decode("latin-1"),
    }).encode()


def _set_cookie(target, request):
    request.addCookie(b"session", b"secret", path=b"/")
    return b"cookie set"


def _huge(target, request):
    request.setHeader(b"Content-Type", b"application/octet-stream")
    return b"x" * target.huge_size


def _huge_chunked(target, request):
    # No Content-Length: the client only learns the size by counting.
    for _ in range(target.huge_size // 4096):
        request.write(b"y" * 4096)
    request.finish()
    return server.NOT_DONE_YET


def _hold(target, request):
    """Keep the request open until the test calls ``target.release()``."""
    target.in_flight += 1
    target.max_in_flight = max(target.max_in_flight, target.in_flight)
    target.held.append(request)

    def gone(reason):
        target.in_flight -= 1
        if reason is not None:
            target.dropped.append(request)

    request.notifyFinish().addBoth(gone)
    for d in target.arrivals:
        d.callback(request)
    target.arrivals = []
    return server.NOT_DONE_YET


ROUTES = {
    b"ok": _ok,
    b"nocontent": _no_content,
    b"notfound": _status(404, b"missing"),
    b"error": _status(500, b"\xff\xfeboom"),
    b"busy": _status(429, b"slow down", [(b"Retry-After", b"7")]),
    b"unavailable": _unavailable,
    b"redirect": _redirect,
    b"echo": _echo,
    b"setcookie": _set_cookie,
    b"huge": _huge,
    b"hugechunked": _huge_chunked,
    b"hold": _hold,
}


class _Root(resource.Resource):
    def __init__(self, target):
        super().__init__()
        self.target = target

    def getChild(self, path, request):
        render = ROUTES.get(path)
        if render is None:
            return resource.NoResource()
        return _Leaf(self.target, render)


class _Site(server.Site):
    def __init__(self, target, root):
        super().__init__(root)
        self.target = target
        self.noisy = False

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        lost = defer.Deferred()
        self.target.lost.append(lost)
        made, gone = protocol.makeConnection, protocol.connectionLost

        def makeConnection(transport):
            self.target.connections.append(transport)
            made(transport)

        def connectionLost(reason):
            gone(reason)
            lost.callback(None)

        protocol.makeConnection = makeConnection
        protocol.connectionLost = connectionLost
        return protocol


class LocalTarget:
    """The HTTP server the tests dispatch to."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.requests = []
        self.connections = []
        self.lost = []
        self.held = []
        self.dropped = []
        self.arrivals = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.huge_size = 100 * 1024
        self.port = None

    def start(self):
        self.port = self.reactor.listenTCP(0, _Site(self, _Root(self)), interface="127.0.0.1")
        return self

    @property
    def base(self):
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def url(self, path):
        return f"{self.base}/{path}"

    def paths(self):
        return [r.path.decode() for r in self.requests]

    def arrival(self):
        """A Deferred firing with the next request that reaches ``/hold``."""
        d = defer.Deferred()
        self.arrivals.append(d)
        return d

    def release(self, body=b"released"):
        """Answer the oldest held request still open."""
        while self.held:
            request = self.held.pop(0)
            if request not in self.dropped and not request.finished:
                request.write(body)
                request.finish()
                return

    @defer.inlineCallbacks
    def stop(self):
        while self.held:
            self.release()
        for transport in self.connections:
            if transport.connected:
                transport.abortConnection()
        yield defer.gatherResults(self.lost)
        yield self.port.stopListening()


@implementer(IHostnameResolver)
class FakeResolver:
    """Answers host names from a table; records the names asked."""

    def __init__(self, table):
        self.table = table
        self.asked = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None,
                        transportSemantics="TCP"):
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        for address in self.table.get(hostName, ()):
            kind = IPv6Address if ":" in address else IPv4Address
            receiver.addressResolved(kind("TCP", address, portNumber))
        receiver.resolutionComplete()
        return None
