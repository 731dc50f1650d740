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

It also follows RabbitMQ's ``connection.blocked``/``unblocked``
notifications (a memory or disk alarm blocks a connection that publishes):
:attr:`AMQPConnection.blocked`, :meth:`~AMQPConnection.whenUnblocked` and
blocked listeners let publishers wait instead of piling up frames, and let
the liveness beacon (:mod:`quebert.amqp.beacon`) tell a blocked connection
from a stuck one.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, List, Optional
from urllib.parse import urlsplit

import pika
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from quebert._defer import mirror
from quebert._tcp import no_delay
from quebert.errors import ConfigurationError

if TYPE_CHECKING:
    from pika.adapters.twisted_connection import TwistedProtocolConnection

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"

Preparer = Callable[[Any], Any]


def _reactor(reactor: Any) -> Any:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        return global_reactor
    return reactor


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def parse_amqp_url(url: str) -> pika.URLParameters:
    """pika parameters for ``url``, or a :class:`ConfigurationError`."""
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ConfigurationError(
            f"AMQP URL must look like amqp://user:password@host:5672/vhost, not {redact(url)!r}"
        )
    try:
        return pika.URLParameters(url)
    except Exception as e:  # pika raises assorted errors for bad query args
        raise ConfigurationError(f"bad AMQP URL {redact(url)!r}: {e}") from e


def split_amqp_urls(value: Any) -> list[str]:
    """
    The node URLs in ``value``: one URL, several separated by commas or
    white space (a comma inside a password must be written ``%2C``), or
    a list of them; each checked (:class:`ConfigurationError` otherwise).
    """
    if isinstance(value, str):
        urls = [u for u in value.replace(",", " ").split() if u]
    elif isinstance(value, (list, tuple)) and all(isinstance(u, str) for u in value):
        urls = [u.strip() for u in value if u.strip()]
    else:
        raise ConfigurationError(
            f"AMQP URL must be a string or a list of strings, not {type(value).__name__}")
    if not urls:
        raise ConfigurationError("no AMQP URL given")
    for url in urls:
        parse_amqp_url(url)
    return urls


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


#: Bytes read from the broker's socket at a time (Twisted's default: 64 KiB).
#: On pika's own frame path, every decoded frame is sliced off the buffer,
#: copying what is left: a 64 KiB read of small frames copies about 14 MB
#: (2.4 us per delivery, measured), 16 KiB reads under 1 MB.  Deliveries
#: decoded whole (:mod:`quebert.amqp._frames`) are not copied, and reads of
#: 16 KiB also keep reactor turns short.
READ_SIZE = 16384

_log = Logger()


@functools.cache
def _pika_connection_class() -> Any:
    """
    ``TwistedProtocolConnection`` reading ``READ_SIZE`` bytes at a time and
    decoding complete deliveries in one step (:mod:`quebert.amqp._frames`).
    """
    # Imported here: pika's Twisted adapter imports the global reactor, and
    # importing quebert must not install one.
    from pika.adapters.twisted_connection import TwistedProtocolConnection

    from quebert.amqp import _frames

    class _Connection(TwistedProtocolConnection):
        _whole_deliveries = False

        def connectionMade(self) -> None:
            no_delay(self.transport)
            if getattr(self.transport, "bufferSize", 0) > READ_SIZE:
                self.transport.bufferSize = READ_SIZE
            self._whole_deliveries = _frames.supported(self._impl)
            if not self._whole_deliveries:
                _log.warn("this pika's internals differ from 1.3/1.4: deliveries are "
                         "decoded by pika, frame by frame (slower, still correct)")
            super().connectionMade()

        def dataReceived(self, data: bytes) -> None:
            if self._whole_deliveries:
                _frames.data_received(self._impl, data)
            else:
                self._impl.data_received(data)

    return _Connection


class _PikaFactory(Factory):
    noisy = False

    def __init__(self, parameters: pika.URLParameters, reactor: Any) -> None:
        #: The parameters of the node being connected to (set per attempt).
        self.parameters = parameters
        self.reactor = reactor

    def buildProtocol(self, addr):
        return _pika_connection_class()(self.parameters, custom_reactor=self.reactor)


class Node:
    """One broker node: its URL, pika parameters and TCP (or TLS) endpoint."""

    def __init__(self, url: str, reactor: Any) -> None:
        self.url = url
        self.parameters = parse_amqp_url(url)
        parts = urlsplit(url)
        port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
        #: ``host:port/vhost``: how logs, ``/health`` and metrics name it.
        self.address = f"{parts.hostname}:{port}/{self.parameters.virtual_host}"
        endpoint: Any = HostnameEndpoint(reactor, parts.hostname, port, timeout=10)
        if parts.scheme == "amqps":
            endpoint = wrapClientTLS(optionsForClientTLS(parts.hostname), endpoint)
        self.endpoint = endpoint

    def __repr__(self) -> str:
        return f"<Node {self.address}>"


@implementer(IStreamClientEndpoint)
class _FailoverEndpoint:
    """
    Connects to the first of ``nodes`` that accepts the TCP connection,
    starting after the node used last (the first node at the start), so
    that a node that went away is not tried first again: nothing waits for
    it to come back while another node answers.  Fails only when every
    node refused or timed out, and ``ClientService`` then backs off.
    ``notify()`` is called before each attempt, ``trying(node)`` before
    each node is tried (the protocol factory must use its parameters: the
    factory ``connect`` is given is ``ClientService``'s proxy).
    """

    def __init__(self, nodes: List[Node], notify: Callable[[], None],
                 trying: Callable[[Node], None]) -> None:
        self.nodes = nodes
        self._notify = notify
        self._trying = trying
        self._next = 0

    @defer.inlineCallbacks
    def connect(self, factory):
        self._notify()
        failure = None
        start = self._next
        for i in range(len(self.nodes)):
            index = (start + i) % len(self.nodes)
            node = self.nodes[index]
            self._trying(node)
            try:
                protocol = yield node.endpoint.connect(factory)
            except Exception as e:
                failure = Failure(e)
                if len(self.nodes) > 1:
                    _log.info("AMQP node {address} did not answer ({error})",
                              address=node.address, error=e)
                continue
            self._next = (index + 1) % len(self.nodes)
            return protocol
        failure.raiseException()

    def __repr__(self) -> str:
        return " | ".join(node.address for node in self.nodes)


class _RetryLog(Logger):
    """
    ``ClientService``'s log, saying the attempt number this connection
    counts.  ``ClientService`` starts counting again at every TCP connection
    made, so a broker that accepts the TCP connection and then refuses the
    AMQP set-up (an unknown vhost, say) had every retry logged as "retry
    1", while the delay, from this connection's own count, kept growing.
    """

    def __init__(self, connection: AMQPConnection) -> None:
        super().__init__(namespace=f"{__name__}.AMQPConnection", source=connection)
        self._connection = connection

    def emit(self, level: Any, format: Optional[str] = None, **kwargs: Any) -> None:
        attempt = kwargs.get("attempt")
        if isinstance(attempt, int) and format and format.startswith("Scheduling retry"):
            kwargs["attempt"] = max(attempt, self._connection.failed_preparations)
        super().emit(level, format, **kwargs)


class AMQPConnection(ClientService):
    """
    A reconnecting, prepared AMQP connection.

    :param url: ``amqp://`` or ``amqps://`` URL, or the URLs of several nodes
        of one cluster (a list, or separated by commas): the connection
        goes to the first that answers and, when it is lost, to the next
        (:class:`_FailoverEndpoint`).  pika ignores host, port and TLS under
        Twisted, so they configure the endpoints here.
    :param name: used in log events (``publisher``, ``consumer``...).

    Use :meth:`whenReady` rather than ``whenConnected``: the latter may hand
    out a connection whose AMQP handshake or preparation failed.  (A failed
    preparation is reported to ``ClientService`` as a made connection that
    is then dropped: its own prepare-failure path leaves the socket open and
    trips over the later disconnect.)
    """

    log = Logger()

    def __init__(self, url: Any, *, name: str = "amqp", reactor: Any = None,
                 retry_policy: Optional[Callable[[int], float]] = None) -> None:
        self.reactor = _reactor(reactor)
        self.nodes = [Node(u, self.reactor) for u in split_amqp_urls(url)]
        #: The node connected to, or last tried.
        self.node = self.nodes[0]
        self.url = self.node.url
        self.connection_name = name
        self.parameters = self.node.parameters
        self._preparers: List[Preparer] = []
        self._ready_waiters: list = []
        self.connected_count = 0
        self.failed_preparations = 0
        self._stopping = False
        self.current: Optional[TwistedProtocolConnection] = None
        #: The newest protocol, prepared or not (a handshake may hang).
        self._latest: Optional[TwistedProtocolConnection] = None
        #: Whether RabbitMQ has blocked the current connection (resource alarm).
        self.blocked = False
        self.blocked_reason: Optional[str] = None
        self._blocked_at: Optional[float] = None
        self._blocked_listeners: List[Callable[[bool], Any]] = []
        self._unblocked_waiters: List[defer.Deferred] = []
        self._attempt_listeners: List[Callable[[], Any]] = []
        #: Called with a Failure when the broker refuses our setup for good
        #: (access refused, conflicting queue arguments).
        self.on_fatal: Optional[Callable[[Failure], Any]] = None
        endpoint = _FailoverEndpoint(self.nodes, self._attempting, self._trying)
        policy = retry_policy or backoffPolicy(initialDelay=0.5, maxDelay=30.0)
        self._log = _RetryLog(self)  # (ClientService's, read by its __init__)
        self._factory_for_nodes = _PikaFactory(self.parameters, self.reactor)
        super().__init__(
            endpoint,
            self._factory_for_nodes,
            retryPolicy=lambda failures: policy(max(failures, self.failed_preparations)),
            clock=self.reactor,
            prepareConnection=self._prepare,
        )

    def startService(self) -> None:
        self._stopping = False
        super().startService()

    @property
    def address(self) -> str:
        """``host:port/vhost`` of the node connected to (or being tried)."""
        return self.node.address

    @property
    def connected_node(self) -> Optional[str]:
        """The address of the node of the open, prepared connection; ``None`` without one."""
        current = self.current
        return self.node.address if current is not None and current.is_open else None

    def _trying(self, node: Node) -> None:
        if node is not self.node and len(self.nodes) > 1:
            self.log.info("AMQP {name} connection: trying node {address}",
                          name=self.connection_name, address=node.address)
        self.node = node
        self.url = node.url
        self.parameters = node.parameters
        self._factory_for_nodes.parameters = node.parameters

    def add_preparer(self, preparer: Preparer) -> None:
        """
        Run ``preparer(protocol)`` (may return a Deferred) on every new
        connection, in the order added, before it is handed out.
        """
        self._preparers.append(preparer)

    def add_attempt_listener(self, listener: Callable[[], Any]) -> None:
        """Call ``listener()`` each time a connection attempt starts."""
        self._attempt_listeners.append(listener)

    def add_blocked_listener(self, listener: Callable[[bool], Any]) -> None:
        """
        Call ``listener(True)`` when RabbitMQ blocks the connection (memory
        or disk alarm) and ``listener(False)`` when it is unblocked or lost.
        """
        self._blocked_listeners.append(listener)

    def whenUnblocked(self) -> defer.Deferred:
        """Fires at once when not blocked, else once unblocked (or the connection is lost)."""
        if not self.blocked:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        self._unblocked_waiters.append(waiter)
        return waiter

    def drop(self) -> bool:
        """
        Abort the TCP connection now (no AMQP close: the connection is
        assumed stuck), so that ``ClientService`` reconnects and the
        preparers run again.  False if there is no connection to drop.
        """
        protocol = self.current or self._latest
        transport = getattr(protocol, "transport", None)
        if transport is None or not getattr(transport, "connected", True):
            return False
        transport.abortConnection()
        return True

    def _attempting(self) -> None:
        for listener in list(self._attempt_listeners):
            try:
                listener()
            except Exception:
                self.log.failure("connection attempt listener failed")

    def _watch_blocked(self, protocol) -> None:
        impl = getattr(protocol, "_impl", None)
        if impl is None:
            return
        impl.add_on_connection_blocked_callback(
            lambda _conn, frame: self._set_blocked(protocol, True, frame))
        impl.add_on_connection_unblocked_callback(
            lambda _conn, frame: self._set_blocked(protocol, False, frame))

    def _set_blocked(self, protocol, blocked: bool, frame: Any = None) -> None:
        if protocol is not self._latest or blocked == self.blocked:
            return
        now = self.reactor.seconds()
        self.blocked = blocked
        if blocked:
            self._blocked_at = now
            self.blocked_reason = getattr(getattr(frame, "method", None), "reason", None) or (
                "resource alarm")
            self.log.warn(
                "AMQP {name} connection blocked by RabbitMQ ({reason}); publishing waits "
                "until it is unblocked", name=self.connection_name, reason=self.blocked_reason)
        else:
            since = now - self._blocked_at if self._blocked_at is not None else 0.0
            self.log.warn("AMQP {name} connection unblocked after {seconds:.1f}s",
                          name=self.connection_name, seconds=since)
            self._blocked_at = None
            self.blocked_reason = None
            waiters, self._unblocked_waiters = self._unblocked_waiters, []
            for waiter in waiters:
                if not waiter.called:
                    waiter.callback(None)
        for listener in list(self._blocked_listeners):
            try:
                listener(blocked)
            except Exception:
                self.log.failure("blocked listener failed")

    def whenReady(self, fail_after_failures: Optional[int] = None) -> defer.Deferred:
        """
        Fire with the current prepared protocol, or the next one.  With
        ``fail_after_failures``, fail after that many consecutive failed
        attempts (TCP or AMQP).
        """
        current = self.current
        if current is not None and current.is_open:
            return defer.succeed(current)
        waiter: defer.Deferred = defer.Deferred()
        self._ready_waiters.append([waiter, fail_after_failures])
        if fail_after_failures is not None:
            tcp = self.whenConnected(failAfterFailures=fail_after_failures)
            tcp.addErrback(self._fail_waiter, waiter)
        return waiter

    def _fail_waiter(self, failure: Failure, waiter: defer.Deferred) -> None:
        if failure.check(defer.CancelledError) and not self.running:
            failure = Failure(ConnectionError("connection service stopped"))
        self._ready_waiters = [w for w in self._ready_waiters if w[0] is not waiter]
        if not waiter.called:
            waiter.errback(failure)

    def _prepare(self, proxy):
        protocol = getattr(proxy, "_protocol", proxy)

        def abort(_: defer.Deferred) -> None:
            # Stopped while preparing; pika's own Deferreds are left alone.
            if protocol.transport is not None:
                protocol.transport.abortConnection()

        reported: defer.Deferred = defer.Deferred(canceller=abort)
        work = defer.ensureDeferred(self._run_preparers(protocol))
        work.addCallbacks(self._prepared, self._not_prepared, callbackArgs=(protocol,),
                          errbackArgs=(protocol, reported))
        work.addBoth(lambda _: reported.called or reported.callback(None))
        return reported

    async def _run_preparers(self, protocol) -> None:
        self._latest = protocol
        if self.blocked:
            # a new connection starts unblocked
            self._set_blocked(protocol, False)
        ready = mirror(protocol.ready)
        # a failed handshake is reported through ``ready`` (ours); pika's
        # own Deferred would otherwise log it as unhandled when collected
        protocol.ready.addErrback(lambda _: None)
        await ready
        self._watch_blocked(protocol)
        for preparer in self._preparers:
            await preparer(protocol)

    def _prepared(self, _: Any, protocol) -> None:
        self.current = protocol
        self.connected_count += 1
        self.failed_preparations = 0
        if protocol.closed is not None:
            protocol.closed.addBoth(self._lost, protocol)
        self.log.info(
            "AMQP {name} connection ready ({address}, connection #{count})",
            name=self.connection_name, address=self.address, count=self.connected_count,
        )
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter, _remaining in waiters:
            if not waiter.called:
                waiter.callback(protocol)

    def _not_prepared(self, failure: Failure, protocol, reported: defer.Deferred) -> None:
        self.failed_preparations += 1
        self.log.warn(
            "AMQP {name} connection to {address} could not be prepared (attempt {n}): {error}",
            name=self.connection_name, address=self.address, n=self.failed_preparations,
            error=describe(failure.value),
        )
        # Hand ClientService a "made" connection, then drop it: it reconnects
        # with backoff (see the class docstring).
        if not reported.called:
            reported.callback(None)
        if protocol.transport is not None and protocol.transport.connected:
            protocol.transport.abortConnection()
        remaining = []
        for waiter, left in self._ready_waiters:
            if left is not None and left <= 1:
                if not waiter.called:
                    waiter.errback(failure)
            else:
                remaining.append([waiter, None if left is None else left - 1])
        self._ready_waiters = remaining
        if is_permanent(failure.value) and self.on_fatal is not None:
            self.on_fatal(failure)

    def _lost(self, reason: Any, protocol) -> None:
        if self.current is protocol:
            self.current = None
        if self._latest is protocol and self.blocked:
            self._set_blocked(protocol, False)
        if self.running and not self._stopping:
            self.log.warn("AMQP {name} connection to {address} lost: {reason}; reconnecting",
                          name=self.connection_name, address=self.address, reason=reason)

    @defer.inlineCallbacks
    def stopService(self):
        self._stopping = True
        protocol = self.current
        self.current = None
        if protocol is not None and protocol.is_open:
            closed = protocol.closed
            protocol.close()
            if closed is not None:
                # Give the broker a moment to confirm the close.
                timer: defer.Deferred = defer.Deferred()
                call = self.reactor.callLater(2.0, timer.callback, None)
                yield defer.DeferredList([mirror(closed), timer], fireOnOneCallback=True,
                                         consumeErrors=True)
                if call.active():
                    call.cancel()
        yield super().stopService()
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter, _ in waiters:
            if not waiter.called:
                waiter.errback(ConnectionError("connection service stopped"))


#: AMQP reply codes that retrying cannot fix.
PERMANENT_REPLY_CODES = frozenset({403, 406, 530})


def is_permanent(error: BaseException) -> bool:
    """Whether the broker refused something for good (access, arguments)."""
    return isinstance(error, pika.exceptions.ChannelClosedByBroker) and (
        error.reply_code in PERMANENT_REPLY_CODES
    )


def describe(error: BaseException) -> str:
    """A readable sentence for pika's terse errors."""
    if isinstance(error, pika.exceptions.ChannelClosed):
        return f"broker closed the channel: {error.reply_code} {error.reply_text}"
    if isinstance(error, pika.exceptions.AMQPConnectionError):
        return ("AMQP handshake failed (wrong credentials, unknown vhost or no permission, "
                "or the broker closed the connection)")
    return f"{type(error).__name__}: {error}"
