# -*- test-case-name: tests.test_dispatch,tests.test_dispatch_stub -*-
"""
Sending a URL task's request and judging the answer.

The rules (App Engine push queues / Cloud Tasks HTTP targets):

- Any 2xx answer is a success: :class:`DispatchResult`.
- Anything else is a failed attempt, raised as
  :class:`~quebert.errors.DispatchError` (transient, so the task is retried
  by its retry policy): another status (``status`` set), a connection or
  TLS error, an answer larger than ``max_response_size``, or the deadline
  passing (:class:`DispatchTimeout`).  429 and 503 answers carry the
  server's ``Retry-After`` as ``retry_after`` (seconds).
- **Redirects are not followed.**  A 3xx is a failed attempt naming the
  ``Location``: following it would send the task to a URL the guardrails
  never saw, and turn a POST into a GET.
- A URL, method, header or body the policy refuses raises
  :class:`~quebert.errors.URLRefused` (a ``Reject``: never retried) and is
  never requested.
- A URL under a service credential's prefix
  (:mod:`quebert.dispatch.credentials`) gets the worker's token in the
  rule's header, added last so the task can neither set nor replace it;
  the task's own ``Authorization`` is dropped then.  The token is scrubbed
  from everything recorded or logged about the answer.

The ``deadline`` covers one attempt on the wire (connecting, sending,
waiting, reading the answer); waiting for the queue's limits or for a free
connection does not count.  Cancelling the Deferred of :meth:`dispatch` at
any stage fires it with ``twisted.internet.defer.CancelledError``: a waiter
leaves its queue, a request in flight has its connection aborted.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Optional, Union

import attrs
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import RESPONSES, PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from quebert._version import __version__
from quebert.dispatch.connect import BoundedPool, GuardedEndpointFactory
from quebert.dispatch.credentials import NO_CREDENTIALS, ServiceCredential, ServiceCredentials
from quebert.dispatch.limits import Gate, QueueLimits
from quebert.dispatch.policy import DROPPED_HEADERS, RESERVED_PREFIX, URLPolicy
from quebert.dispatch.retry_after import parse_retry_after
from quebert.errors import DispatchError, URLRefused

log = Logger(namespace="quebert.dispatch")

#: Answer headers kept in a :class:`DispatchResult`.
KEPT_HEADERS = ("content-type", "content-length", "location", "etag", "retry-after")
_LOCATION_LIMIT = 300

#: The policy and limits of a dispatcher built without them (both immutable).
DEFAULT_POLICY = URLPolicy()
NO_LIMITS = QueueLimits()


class DispatchTimeout(DispatchError):
    """The dispatch deadline passed before a complete answer arrived."""


@attrs.frozen
class URLRequest:
    """The HTTP request a URL task makes.  ``method`` is upper-cased."""

    url: str
    method: str = attrs.field(default="POST", converter=lambda m: str(m).upper())
    headers: Mapping[str, str] = attrs.field(factory=dict, converter=dict, hash=False)
    body: bytes = attrs.field(
        default=b"", converter=lambda b: b.encode("utf-8") if isinstance(b, str) else bytes(b))


@attrs.frozen
class DispatchResult:
    """
    A 2xx answer.  ``body_prefix`` is the start of the body decoded as
    UTF-8 (bad bytes replaced), at most ``body_prefix_limit`` bytes of it;
    ``headers`` keeps a few answer headers (:data:`KEPT_HEADERS`, lower
    case); ``elapsed`` is the attempt's time on the wire in seconds.
    """

    status: int
    elapsed: float
    body_prefix: str
    headers: dict = attrs.field(factory=dict, hash=False)

    def to_record(self) -> dict:
        """What the task's attempt history keeps (JSON-ready)."""
        return {"status": self.status, "elapsed": self.elapsed, "body": self.body_prefix}


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body already in memory (bounded by ``max_request_size``)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> defer.Deferred:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _NoCookies:
    """treq keeps cookies between requests; tasks must not share them."""

    def add_cookie_header(self, request: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

    def set_cookie(self, cookie: Any) -> None:
        pass

    def __iter__(self) -> Any:
        return iter(())


@attrs.define
class _State:
    canceled: bool = False


@attrs.define
class _Body:
    prefix: bytes
    size: int
    too_large: bool


class _BoundedReader(Protocol):
    """
    Reads an answer's body keeping only its first ``prefix_limit`` bytes,
    counting (and dropping) the rest; past ``max_size`` bytes it stops
    reading and closes the connection.  Cancelling its Deferred does the same.
    """

    def __init__(self, prefix_limit: int, max_size: int, declared_too_large: bool) -> None:
        self.prefix = bytearray()
        self.prefix_limit = prefix_limit
        self.max_size = max_size
        self.size = 0
        self.declared_too_large = declared_too_large
        self.finished: defer.Deferred = defer.Deferred(self._cancel)

    def connectionMade(self) -> None:
        if self.declared_too_large:
            self._finish(too_large=True)

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self.size += len(data)
        room = self.prefix_limit - len(self.prefix)
        if room > 0:
            self.prefix += data[:room]
        if self.size > self.max_size:
            self._finish(too_large=True)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(_Body(bytes(self.prefix), self.size, False))
        else:
            self.finished.errback(reason)

    def _finish(self, too_large: bool) -> None:
        self.finished.callback(_Body(bytes(self.prefix), self.size, too_large))
        self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def _cancel(self, d: defer.Deferred) -> None:
        self._abort()


def _read_body(response: Any, prefix_limit: int, max_size: int) -> defer.Deferred:
    length = response.length
    declared_too_large = length is not UNKNOWN_LENGTH and length > max_size
    reader = _BoundedReader(prefix_limit, max_size, declared_too_large)
    response.deliverBody(reader)
    return reader.finished


def _safe_url(url: str) -> str:
    """A URL for logs and messages: no query string (it may hold secrets)."""
    base, sep, _ = url.partition("?")
    return base + ("?..." if sep else "")


def _first(headers: Any, name: str) -> Optional[str]:
    values = headers.getRawHeaders(name)
    if not values:
        return None
    value = values[0]
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _is_tls_error(error: BaseException) -> bool:
    """pyOpenSSL's errors, and service_identity's certificate/host name mismatch."""
    return type(error).__module__.split(".")[0] in ("OpenSSL", "service_identity")


def _describe(error: BaseException) -> str:
    """A sentence for a connection-level error (reasons of ResponseFailed unpacked)."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        inner = [r.value for r in reasons if isinstance(r, Failure)]
        tls = [e for e in inner if _is_tls_error(e)]
        if tls:
            return f"TLS error ({type(tls[0]).__name__}: {tls[0]})"
        text = "; ".join(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                         for e in inner)
        return f"connection failed before a complete answer ({text})"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, DNSLookupError):
        return f"host name lookup failed ({error})"
    if isinstance(error, ConnectTimeoutError):
        return "connect timed out"
    if isinstance(error, ConnectError):
        return f"could not connect ({error})"
    if _is_tls_error(error):
        return f"TLS error ({type(error).__name__}: {error})"
    return f"{type(error).__name__}: {error}"


class URLDispatcher:
    """
    Sends URL tasks' requests, within the policy and the queues' limits.

    One per worker: it owns one persistent connection pool shared by all
    queues.  At most ``max_connections`` requests are on the wire at once
    (and at most ``max_connections_per_host`` to one ``scheme://host:port``);
    the pool keeps at most as many idle connections, closing them after
    ``idle_timeout`` seconds.  ``connect_timeout`` bounds each TCP connect.

    ``limits`` maps queue names to their :class:`QueueLimits`; other queues
    get ``default_limits``.  ``agent`` replaces the guarded network agent
    (tests: ``treq.testing.RequestTraversalAgent``); with it only the checks
    of :meth:`URLPolicy.check_request` apply, not the address checks.
    ``resolver`` (an ``IHostnameResolver``, default the reactor's) and
    ``tls_policy`` (an ``IPolicyForHTTPS``, default browser-like
    verification) configure the guarded agent.  ``credentials`` (loaded
    :class:`~quebert.dispatch.credentials.ServiceCredentials`) are the
    service tokens added to requests under their prefixes.
    """

    def __init__(self, reactor: Any, *, policy: URLPolicy = DEFAULT_POLICY,
                 limits: Mapping[str, QueueLimits] = {},
                 default_limits: QueueLimits = NO_LIMITS,
                 max_connections: int = 100, max_connections_per_host: int = 10,
                 connect_timeout: float = 10.0, idle_timeout: float = 60.0,
                 body_prefix_limit: int = 1024, agent: Any = None,
                 user_agent: str = f"quebert/{__version__}",
                 resolver: Any = None, tls_policy: Any = None,
                 credentials: ServiceCredentials = NO_CREDENTIALS) -> None:
        if max_connections < 1 or max_connections_per_host < 1:
            raise ValueError("max_connections and max_connections_per_host must be >= 1")
        self.reactor = reactor
        self.policy = policy
        self.limits = dict(limits)
        self.default_limits = default_limits
        self.max_connections = max_connections
        self.max_connections_per_host = max_connections_per_host
        self.body_prefix_limit = body_prefix_limit
        self.user_agent = user_agent
        self.credentials = credentials
        self.pool: Optional[BoundedPool] = None
        if agent is None:
            self.pool = BoundedPool(reactor, max_idle=max_connections,
                                    max_idle_per_host=max_connections_per_host,
                                    idle_timeout=idle_timeout)
            endpoints = GuardedEndpointFactory(reactor, policy, resolver=resolver,
                                               connect_timeout=connect_timeout,
                                               tls_policy=tls_policy)
            agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self.pool)
        self._client = HTTPClient(agent, cookiejar=_NoCookies())  # type: ignore[arg-type]
        self._gates: dict[str, Gate] = {}
        self._connections = defer.DeferredSemaphore(max_connections)
        self._hosts: dict[str, defer.DeferredSemaphore] = {}
        self._outstanding: set[defer.Deferred] = set()
        self._closed = False

    # -- public ---------------------------------------------------------

    def dispatch(self, request: URLRequest, *, queue: str, deadline: float,
                 extra_headers: Mapping[str, str] = {}) -> defer.Deferred:
        """
        Send ``request`` for a task of ``queue``; fire with a
        :class:`DispatchResult` for a 2xx answer, fail with ``DispatchError``
        (``DispatchTimeout`` after ``deadline`` seconds on the wire) or
        ``URLRefused``.  ``extra_headers`` (quebert's ``X-Quebert-*``) are
        added and win over the request's own.  Cancellable at any stage
        (fires ``CancelledError``).
        """
        if not deadline or deadline <= 0:
            raise ValueError(f"deadline must be > 0 seconds, not {deadline!r}")
        task = extra_headers.get("X-Quebert-TaskName")
        if self._closed:
            return defer.fail(DispatchError("the URL dispatcher is closed",
                                            response=_record(None, 0.0, b"", "closed")))
        try:
            target = self.policy.check_request(request)
            credential = self.credentials.for_target(target)
            headers = self._headers(request, extra_headers, credential)
        except URLRefused as e:
            log.warn("URL task refused: {reason}", queue=queue, task=task, reason=str(e))
            return defer.fail(e)
        if credential is not None:
            own = sorted(n for n in request.headers
                         if n.lower() in ("authorization", credential.header.lower()))
            if own:
                log.warn("URL task's own {headers} header(s) dropped: the worker's service "
                         "credential for {prefix} replaces them", queue=queue, task=task,
                         headers=", ".join(own), prefix=credential.rule.url_prefix)

        state = _State()
        inner = defer.Deferred.fromCoroutine(
            self._dispatch(request, target, headers, queue, float(deadline), task, state))

        def cancel(_: defer.Deferred) -> None:
            state.canceled = True
            inner.cancel()

        outer: defer.Deferred = defer.Deferred(cancel)
        self._outstanding.add(outer)

        def settle(result: Any) -> None:
            self._outstanding.discard(outer)
            if outer.called:
                return
            if state.canceled:
                log.info("URL dispatch canceled: {method} {url}", queue=queue, task=task,
                         method=request.method, url=_safe_url(target.url))
                outer.errback(defer.CancelledError())
            elif isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)

        inner.addBoth(settle)
        return outer

    def stats(self) -> dict:
        """Per queue: ``in_flight``, ``waiting``, ``tokens`` (``None``: no rate limit)."""
        return {name: gate.stats() for name, gate in sorted(self._gates.items())}

    def pool_stats(self) -> dict:
        """Connections: requests on the wire, waiting for one, idle kept."""
        return {
            "in_flight": self.max_connections - self._connections.tokens,
            "waiting": len(self._connections.waiting),
            "idle": self.pool.idle if self.pool is not None else 0,
            "max_connections": self.max_connections,
        }

    def close(self) -> defer.Deferred:
        """
        Refuse new dispatches, cancel those still outstanding (they fire
        ``CancelledError``; drain the worker first) and close the pool's
        idle connections.  Fires when they are closed.
        """
        self._closed = True
        for d in list(self._outstanding):
            d.cancel()
        for gate in self._gates.values():
            if gate.bucket is not None:
                gate.bucket.stop()
        if self.pool is None:
            return defer.succeed(None)
        return self.pool.closeCachedConnections()

    # -- internals ------------------------------------------------------

    def _gate(self, queue: str) -> Gate:
        gate = self._gates.get(queue)
        if gate is None:
            gate = self._gates[queue] = Gate(self.reactor,
                                             self.limits.get(queue, self.default_limits))
        return gate

    def _headers(self, request: URLRequest, extra_headers: Mapping[str, str],
                 credential: Optional[ServiceCredential]) -> dict:
        """
        The request's headers: the task's own (less the dropped and reserved
        ones), ``User-Agent``, ``extra_headers``, and last the service
        credential's header (the task's same-named header and its
        ``Authorization`` dropped, so the task cannot override the token).
        """
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            lower = name.lower()
            if lower in DROPPED_HEADERS or lower.startswith(RESERVED_PREFIX):
                continue
            headers[name] = value
        if not any(name.lower() == "user-agent" for name in headers):
            headers["User-Agent"] = self.user_agent
        added = dict(extra_headers)
        if credential is not None:
            for name in [n for n in headers
                         if n.lower() in ("authorization", credential.header.lower())]:
                del headers[name]
            added[credential.header] = credential.value
        for name, value in added.items():
            for existing in [n for n in headers if n.lower() == name.lower()]:
                del headers[existing]
            headers[name] = value
        return headers

    async def _dispatch(self, request: URLRequest, target: Any, headers: dict, queue: str,
                        deadline: float, task: Optional[str], state: _State) -> DispatchResult:
        gate = self._gate(queue)
        releases: list[Any] = []
        gate.waiting += 1
        waiting = True
        try:
            if gate.slots is not None:
                await gate.slots.acquire()
                releases.append(gate.slots.release)
            if gate.bucket is not None:
                await gate.bucket.take()
            host = self._host_slots(target.origin)
            await host.acquire()
            releases.append(lambda: self._release_host(target.origin, host))
            await self._connections.acquire()
            releases.append(self._connections.release)
            gate.waiting -= 1
            waiting = False
            gate.in_flight += 1
            releases.append(lambda: setattr(gate, "in_flight", gate.in_flight - 1))
            return await self._attempt(request, target, headers, queue, deadline, task, state)
        finally:
            if waiting:
                gate.waiting -= 1
            for release in reversed(releases):
                release()

    def _host_slots(self, origin: str) -> defer.DeferredSemaphore:
        slots = self._hosts.get(origin)
        if slots is None:
            slots = self._hosts[origin] = defer.DeferredSemaphore(self.max_connections_per_host)
        return slots

    def _release_host(self, origin: str, slots: defer.DeferredSemaphore) -> None:
        slots.release()
        if slots.tokens == slots.limit and not slots.waiting:
            self._hosts.pop(origin, None)

    async def _attempt(self, request: URLRequest, target: Any, headers: dict, queue: str,
                       deadline: float, task: Optional[str], state: _State) -> DispatchResult:
        """One request on the wire, bounded by ``deadline``."""
        started = self.reactor.seconds()
        wall = time.monotonic()
        timed_out = False
        exchange = defer.Deferred.fromCoroutine(self._exchange(request, target, headers))

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            exchange.cancel()

        timer = self.reactor.callLater(deadline, expire)
        url = _safe_url(target.url)
        fields = dict(queue=queue, task=task, method=request.method, url=url)
        try:
            status, answer_headers, body = await exchange
        except URLRefused as e:
            log.warn("URL task refused: {reason}", reason=str(e), **fields)
            raise
        except Exception as e:
            elapsed = self._elapsed(started, wall)
            if state.canceled:
                raise defer.CancelledError()
            if timed_out:
                message = f"{request.method} {url}: no complete answer within the " \
                          f"{deadline:g}s dispatch deadline"
                log.info("URL dispatch timed out after {elapsed}s: {method} {url}",
                         elapsed=elapsed, **fields)
                raise DispatchTimeout(message, response=_record(None, elapsed, b"",
                                                                "deadline exceeded"))
            if isinstance(e, (defer.CancelledError, ConnectingCancelledError)):
                raise defer.CancelledError()
            reason = self.credentials.redact(_describe(e))
            log.info("URL dispatch failed: {method} {url}: {reason}", reason=reason, **fields)
            raise DispatchError(f"{request.method} {url}: {reason}",
                                response=_record(None, elapsed, b"", reason)) from e
        finally:
            if timer.active():
                timer.cancel()
        elapsed = self._elapsed(started, wall)
        return self._judge(request, url, status, answer_headers, body, elapsed, fields)

    def _elapsed(self, started: float, wall: float) -> float:
        # The reactor's clock (a test Clock included) when it moved, else wall time.
        elapsed = self.reactor.seconds() - started
        if elapsed <= 0:
            elapsed = time.monotonic() - wall
        return round(max(elapsed, 0.0), 3)

    async def _exchange(self, request: URLRequest, target: Any, headers: dict) -> Any:
        body: Optional[_BytesProducer] = None
        if request.body or request.method in ("POST", "PUT", "PATCH"):
            body = _BytesProducer(request.body)  # Content-Length: 0 on an empty POST
        response = await self._client.request(
            request.method, target.url, headers=headers, data=body,
            allow_redirects=False, unbuffered=True)
        read = await _read_body(response, self.body_prefix_limit,
                                self.policy.max_response_size)
        return response.code, response.headers, read

    def _judge(self, request: URLRequest, url: str, status: int, headers: Any, body: _Body,
               elapsed: float, fields: dict) -> DispatchResult:
        redact = self.credentials.redact  # a target may echo the service token back
        kept = {}
        for name in KEPT_HEADERS:
            value = _first(headers, name)
            if value is not None:
                kept[name] = redact(value[:_LOCATION_LIMIT])
        prefix = redact(body.prefix.decode("utf-8", "replace"))
        if 200 <= status < 300 and not body.too_large:
            log.debug("URL dispatch succeeded: {method} {url} answered {status} in {elapsed}s",
                      status=status, elapsed=elapsed, **fields)
            return DispatchResult(status=status, elapsed=elapsed, body_prefix=prefix,
                                  headers=kept)
        phrase = RESPONSES.get(status, b"").decode("latin-1")
        answered = f"{request.method} {url} answered {status}" + (f" {phrase}" if phrase else "")
        retry_after = None
        if body.too_large:
            message = f"{answered} with a body larger than max_response_size " \
                      f"({self.policy.max_response_size} bytes); the rest was not read"
        elif 300 <= status < 400:
            location = kept.get("location")
            where = f"to {location!r} " if location else ""
            message = f"{answered}: redirect {where}not followed " \
                      "(URL tasks never follow redirects; use the final URL)"
        else:
            message = answered
            if status in (429, 503):
                retry_after = parse_retry_after(kept.get("retry-after"), self.reactor.seconds())
                if retry_after is not None:
                    message += f" (Retry-After {retry_after:g}s)"
        log.info("URL dispatch failed: {message}", message=message, status=status,
                 elapsed=elapsed, **fields)
        raise DispatchError(message, status=status, retry_after=retry_after,
                            response=_record(status, elapsed, prefix, message))


def _record(status: Optional[int], elapsed: float, body: Union[bytes, str],
            error: Optional[str]) -> dict:
    """The attempt-history record of a failed attempt (JSON-ready)."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    record: dict[str, Any] = {"status": status, "elapsed": elapsed, "body": body}
    if error:
        record["error"] = error
    return record
