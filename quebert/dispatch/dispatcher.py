# -*- test-case-name: tests.test_dispatch,tests.test_dispatch_stub -*-
"""
Sending a URL task's request and judging the answer.

(Over 700 lines: a request's whole life, limits, sending, reading and
judging the answer, is kept in one module, as one state machine per
dispatch.)

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

Sending: the request goes through Twisted's ``Agent`` on the dispatcher's
persistent pool (:class:`~quebert.dispatch.connect.BoundedPool`), the
agent treq itself wraps, not through ``treq.HTTPClient.request``.  Per
request, treq parses the URL again (hyperlink), wraps the agent in a
``CookieAgent`` (tasks must not share cookies anyway), a
``ContentDecoderAgent`` (which asks for gzip and inflates answers before
``max_response_size`` can bound them) and its response in two proxies:
about 170 us of CPU a request on the machine of ``bench/README.rst``,
against some 65 us for everything else a dispatch adds to the agent's own
work (``bench/bench_url.py clients``).  The policy has already rebuilt the
URL in its checked, ASCII form, and the body is read by a bounded reader
of ours.
The verdicts of the policy on requests it let through are remembered
(:meth:`URLDispatcher._check`), and a dispatch is one small state machine
(:class:`_Dispatch`) rather than nested coroutines.

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
from twisted.internet import defer
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import RESPONSES, PotentialDataLoss
from twisted.web.http_headers import Headers
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

#: Requests whose policy verdict a dispatcher remembers (URLDispatcher._check).
VERDICTS = 512

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


def _fields(queue: str, task: Optional[str], request: Any, target: Any) -> dict:
    """What a log line about one attempt names (built only when one is logged)."""
    return {"queue": queue, "task": task, "method": request.method,
            "url": _safe_url(target.url)}


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
    ``task_log_level`` is the level of the per-task log lines (a worker's
    ``--log-level``): a debug line for every 2xx answer only when it is
    ``debug`` (one per task otherwise costs the worker more CPU than the
    rest of the dispatcher).
    """

    def __init__(self, reactor: Any, *, policy: URLPolicy = DEFAULT_POLICY,
                 limits: Mapping[str, QueueLimits] = {},
                 default_limits: QueueLimits = NO_LIMITS,
                 max_connections: int = 100, max_connections_per_host: int = 10,
                 connect_timeout: float = 10.0, idle_timeout: float = 60.0,
                 body_prefix_limit: int = 1024, agent: Any = None,
                 user_agent: str = f"quebert/{__version__}",
                 resolver: Any = None, tls_policy: Any = None,
                 credentials: ServiceCredentials = NO_CREDENTIALS,
                 task_log_level: LogLevel = LogLevel.info) -> None:
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
        #: A success is logged (at debug) only when this is ``debug``;
        #: failures, refusals and timeouts always are.
        self.task_log_level = task_log_level
        self.pool: Optional[BoundedPool] = None
        if agent is None:
            self.pool = BoundedPool(reactor, max_idle=max_connections,
                                    max_idle_per_host=max_connections_per_host,
                                    idle_timeout=idle_timeout)
            endpoints = GuardedEndpointFactory(reactor, policy, resolver=resolver,
                                               connect_timeout=connect_timeout,
                                               tls_policy=tls_policy)
            agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self.pool)
        self._agent = agent
        self._gates: dict[str, Gate] = {}
        self._connections = defer.DeferredSemaphore(max_connections)
        self._hosts: dict[str, defer.DeferredSemaphore] = {}
        self._outstanding: set[defer.Deferred] = set()
        self._closed = False
        #: The policy's verdicts on requests it let through, by what it reads
        #: of them (see _check).
        self._verdicts: dict[tuple, Any] = {}
        self._verdicts_of = policy

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
            target = self._check(request)
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

        return _Dispatch(self, request, target, headers, queue, float(deadline),
                         task).start()

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

    def _check(self, request: URLRequest) -> Any:
        """
        ``policy.check_request(request)``, remembered: its verdict depends on
        the URL, the method, the headers and whether the body is within
        ``max_request_size``, nothing else (the policy is immutable), so a
        request alike in those gets the same Target without the URL being
        parsed and its address judged again (tasks of a queue mostly share
        them).  Only requests let through are remembered, at most
        :data:`VERDICTS` of them.
        """
        policy = self.policy
        if policy is not self._verdicts_of:  # (replaced since: forget the old verdicts)
            self._verdicts.clear()
            self._verdicts_of = policy
        try:
            key = (request.url, request.method, tuple(request.headers.items()),
                   len(request.body) <= policy.max_request_size)
            target = self._verdicts.get(key)
        except TypeError:  # an unhashable header value: the policy refuses it
            return self._check_request(request)
        if target is None:
            target = self._check_request(request)
            if len(self._verdicts) >= VERDICTS:
                self._verdicts.clear()
            self._verdicts[key] = target
        return target

    def _check_request(self, request: URLRequest) -> Any:
        return self.policy.check_request(request)

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
        lowers = set()
        for name, value in request.headers.items():
            lower = name.lower()
            if lower in DROPPED_HEADERS or lower.startswith(RESERVED_PREFIX):
                continue
            headers[name] = value
            lowers.add(lower)
        if "user-agent" not in lowers:
            headers["User-Agent"] = self.user_agent
            lowers.add("user-agent")
        # The added headers by lower-case name, a later one replacing an
        # earlier one; each replaces the task's header(s) of that name.
        added: dict[str, tuple] = {}
        for name, value in extra_headers.items():
            lower = name.lower()
            added.pop(lower, None)
            added[lower] = (name, value)
        gone = set(added)
        if credential is not None:
            lower = credential.header.lower()
            added.pop(lower, None)
            added[lower] = (credential.header, credential.value)
            gone.update(("authorization", lower))
        if not lowers.isdisjoint(gone):
            headers = {n: v for n, v in headers.items() if n.lower() not in gone}
        for name, value in added.values():
            headers[name] = value
        return headers

    def _host_slots(self, origin: str) -> defer.DeferredSemaphore:
        slots = self._hosts.get(origin)
        if slots is None:
            slots = self._hosts[origin] = defer.DeferredSemaphore(self.max_connections_per_host)
        return slots

    def _release_host(self, origin: str, slots: defer.DeferredSemaphore) -> None:
        slots.release()
        if slots.tokens == slots.limit and not slots.waiting:
            self._hosts.pop(origin, None)

    def _elapsed(self, started: float, wall: float) -> float:
        # The reactor's clock (a test Clock included) when it moved, else wall time.
        elapsed = self.reactor.seconds() - started
        if elapsed <= 0:
            elapsed = time.monotonic() - wall
        return round(max(elapsed, 0.0), 3)

    def _exchange(self, request: URLRequest, target: Any, headers: dict) -> defer.Deferred:
        """
        Send the request, read the answer: fires with (status, headers,
        :class:`_Body`).  A plain callback chain (cancelling it cancels the
        stage it is at: connecting, waiting for the answer, reading it).
        """
        body: Optional[_BytesProducer] = None
        if request.body or request.method in ("POST", "PUT", "PATCH"):
            body = _BytesProducer(request.body)  # Content-Length: 0 on an empty POST
        try:
            raw = Headers()
            for name, value in headers.items():
                raw.addRawHeader(name, value)
            # The agent itself, not treq's HTTPClient.request: see "Sending" in
            # the module docstring.  target.url is ASCII (rebuilt by the policy).
            sent = self._agent.request(request.method.encode("ascii"),
                                       target.url.encode("ascii"), raw, body)
        except Exception:
            return defer.fail()
        return sent.addCallback(self._read)

    def _read(self, response: Any) -> defer.Deferred:
        read = _read_body(response, self.body_prefix_limit, self.policy.max_response_size)
        return read.addCallback(lambda body: (response.code, response.headers, body))

    def _judge(self, request: URLRequest, target: Any, status: int, headers: Any, body: _Body,
               elapsed: float, queue: str, task: Optional[str]) -> DispatchResult:
        redact = self.credentials.redact  # a target may echo the service token back
        kept = {}
        for name in KEPT_HEADERS:
            value = _first(headers, name)
            if value is not None:
                kept[name] = redact(value[:_LOCATION_LIMIT])
        prefix = redact(body.prefix.decode("utf-8", "replace"))
        if 200 <= status < 300 and not body.too_large:
            if self.task_log_level <= LogLevel.debug:
                log.debug("URL dispatch succeeded: {method} {url} answered {status} in "
                          "{elapsed}s", status=status, elapsed=elapsed,
                          **_fields(queue, task, request, target))
            return DispatchResult(status=status, elapsed=elapsed, body_prefix=prefix,
                                  headers=kept)
        fields = _fields(queue, task, request, target)
        url = fields["url"]
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


class _Dispatch:
    """
    One dispatch, from :meth:`URLDispatcher.dispatch` to its outcome: a slot
    of the queue (if limited), a token (if rate limited), a slot of the
    host, a connection slot, then one attempt on the wire bounded by the
    deadline; everything taken is given back, in reverse, before ``outer``
    fires.  A plain state machine rather than coroutines: a slot that is
    free is taken there and then (no Deferred), and a dispatch costs one
    object and the attempt's Deferreds.  ``waiting_on`` is the Deferred it
    waits for (a waiter, or the exchange), which cancelling ``outer``
    cancels.
    """

    __slots__ = ("dispatcher", "request", "target", "headers", "queue", "deadline", "task",
                 "outer", "gate", "held", "waiting", "waiting_on", "canceled", "timed_out",
                 "timer", "started", "wall", "host_slots")

    def __init__(self, dispatcher: URLDispatcher, request: URLRequest, target: Any,
                 headers: dict, queue: str, deadline: float, task: Optional[str]) -> None:
        self.dispatcher = dispatcher
        self.request = request
        self.target = target
        self.headers = headers
        self.queue = queue
        self.deadline = deadline
        self.task = task
        self.outer: defer.Deferred = defer.Deferred(self._cancel)
        self.gate = dispatcher._gate(queue)
        #: Releases of what was taken (undone in reverse).
        self.held: list = []
        self.waiting = False
        self.waiting_on: Optional[defer.Deferred] = None
        self.canceled = False
        self.timed_out = False
        self.timer: Any = None
        self.started = 0.0
        self.wall = 0.0
        self.host_slots: Optional[defer.DeferredSemaphore] = None

    def start(self) -> defer.Deferred:
        self.dispatcher._outstanding.add(self.outer)
        self.gate.waiting += 1
        self.waiting = True
        try:
            self._step(0)
        except Exception:  # (a bug: still give everything back, and say so)
            self._done(Failure())
        return self.outer

    # -- waiting for the limits -------------------------------------------

    def _step(self, step: int) -> None:
        """Take the limits from ``step`` on; wait where one is not free."""
        gate = self.gate
        dispatcher = self.dispatcher
        while True:
            if step == 0:
                waiter = None
                if gate.slots is not None:
                    waiter = self._take(gate.slots, gate.slots.release)
            elif step == 1:
                waiter = None
                if gate.bucket is not None:
                    waiter = gate.bucket.take()
                    if waiter.called:  # a token was there: fired already
                        waiter = None
            elif step == 2:
                self.host_slots = dispatcher._host_slots(self.target.origin)
                waiter = self._take(self.host_slots, self._release_host)
            elif step == 3:
                waiter = self._take(dispatcher._connections, dispatcher._connections.release)
            else:
                gate.waiting -= 1
                self.waiting = False
                gate.in_flight += 1
                self.held.append(self._out_of_flight)
                self._attempt()
                return
            step += 1
            if waiter is not None:
                self.waiting_on = waiter
                waiter.addCallbacks(self._waited, self._done, (step,))
                waiter.addErrback(self._done)  # (what _waited raises)
                return

    def _take(self, slots: defer.DeferredSemaphore, release: Any) -> Optional[defer.Deferred]:
        """
        A token of ``slots``: taken at once when one is free (``tokens`` > 0
        means nobody waits), else a waiter to wait for; ``release`` gives it
        back.
        """
        if slots.tokens > 0:
            slots.tokens -= 1
            self.held.append(release)
            return None
        return slots.acquire().addCallback(self._taken, release)

    def _taken(self, result: Any, release: Any) -> Any:
        self.held.append(release)
        return result

    def _release_host(self) -> None:
        self.dispatcher._release_host(self.target.origin, self.host_slots)

    def _waited(self, _: Any, step: int) -> None:
        self.waiting_on = None
        self._step(step)

    def _out_of_flight(self) -> None:
        self.gate.in_flight -= 1

    # -- the attempt ----------------------------------------------------------

    def _attempt(self) -> None:
        """One request on the wire, bounded by the deadline."""
        dispatcher = self.dispatcher
        self.started = dispatcher.reactor.seconds()
        self.wall = time.monotonic()
        exchange = dispatcher._exchange(self.request, self.target, self.headers)
        self.waiting_on = exchange
        self.timer = dispatcher.reactor.callLater(self.deadline, self._expire)
        exchange.addCallbacks(self._answered, self._failed)
        exchange.addErrback(self._done)  # (what _answered and _failed raise)

    def _expire(self) -> None:
        self.timer = None
        self.timed_out = True
        if self.waiting_on is not None:
            self.waiting_on.cancel()

    def _stop_timer(self) -> None:
        self.waiting_on = None
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None

    def _answered(self, answer: Any) -> None:
        self._stop_timer()
        status, answer_headers, body = answer
        elapsed = self.dispatcher._elapsed(self.started, self.wall)
        self._done(self.dispatcher._judge(self.request, self.target, status, answer_headers,
                                          body, elapsed, self.queue, self.task))

    def _failed(self, failure: Failure) -> None:
        self._stop_timer()
        e = failure.value
        request, target = self.request, self.target
        if isinstance(e, URLRefused):
            log.warn("URL task refused: {reason}", reason=str(e),
                     **_fields(self.queue, self.task, request, target))
            self._done(failure)
            return
        if not isinstance(e, Exception):
            self._done(failure)
            return
        dispatcher = self.dispatcher
        elapsed = dispatcher._elapsed(self.started, self.wall)
        if self.canceled:
            raise defer.CancelledError()
        fields = _fields(self.queue, self.task, request, target)
        url = fields["url"]
        if self.timed_out:
            message = f"{request.method} {url}: no complete answer within the " \
                      f"{self.deadline:g}s dispatch deadline"
            log.info("URL dispatch timed out after {elapsed}s: {method} {url}",
                     elapsed=elapsed, **fields)
            raise DispatchTimeout(message, response=_record(None, elapsed, b"",
                                                            "deadline exceeded"))
        if isinstance(e, (defer.CancelledError, ConnectingCancelledError)):
            raise defer.CancelledError()
        reason = dispatcher.credentials.redact(_describe(e))
        log.info("URL dispatch failed: {method} {url}: {reason}", reason=reason, **fields)
        raise DispatchError(f"{request.method} {url}: {reason}",
                            response=_record(None, elapsed, b"", reason)) from e

    # -- the outcome ------------------------------------------------------------

    def _done(self, result: Any, *_: Any) -> None:
        """Give back what was taken (in reverse), then fire ``outer``."""
        self.waiting_on = None
        if self.waiting:
            self.waiting = False
            self.gate.waiting -= 1
        held, self.held = self.held, []
        for release in reversed(held):
            release()
        outer = self.outer
        self.dispatcher._outstanding.discard(outer)
        if outer.called:
            return
        if self.canceled:
            log.info("URL dispatch canceled: {method} {url}", queue=self.queue, task=self.task,
                     method=self.request.method, url=_safe_url(self.target.url))
            outer.errback(defer.CancelledError())
        elif isinstance(result, Failure):
            outer.errback(result)
        else:
            outer.callback(result)

    def _cancel(self, _: defer.Deferred) -> None:
        self.canceled = True
        if self.waiting_on is not None:
            self.waiting_on.cancel()


def _record(status: Optional[int], elapsed: float, body: Union[bytes, str],
            error: Optional[str]) -> dict:
    """The attempt-history record of a failed attempt (JSON-ready)."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    record: dict[str, Any] = {"status": status, "elapsed": elapsed, "body": body}
    if error:
        record["error"] = error
    return record
