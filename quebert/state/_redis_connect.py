"""
Connections to Redis for the state store: :func:`connect_redis` (one
server, TLS included) and, for ``redis+sentinel://`` URLs, the primary that
Redis Sentinel names (:class:`SentinelHandler`), reconnecting within
``RECONNECT_MAX_DELAY`` and with Nagle's algorithm off
(:func:`quebert._tcp.no_delay`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import txredisapi
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from quebert._tcp import NoDelayProtocol
from quebert.state import _redis_ops
from quebert.state._redis_ops import parse_redis_url

log = Logger(namespace="quebert.state.redis")

#: Seconds between two attempts to reconnect to Redis, at most (txredisapi's
#: default, 10, could leave a worker's state writes queued for 10 s after
#: Redis was back).
RECONNECT_MAX_DELAY = 2.0

#: Seconds a Sentinel URL's connection waits for the sentinels to name the
#: primary before it tries again (txredisapi's 10 s would leave a worker
#: without Redis for 10 s after a failover that took 2).
SENTINEL_DISCOVERY_TIMEOUT = 1.0


def _options_of(redis: Any) -> Optional[Mapping[str, Any]]:
    """The URL options :func:`connect_redis` kept on its handle (None: another handle)."""
    # not getattr: txredisapi's handles answer any attribute with a command
    return getattr(redis, "__dict__", {}).get("quebert_options")



# -- connecting --------------------------------------------------------------


class _TLSEndpoint:
    """TLS over a client endpoint, handing back the wrapped (Redis) protocol."""

    def __init__(self, endpoint: Any, host: str) -> None:
        self._endpoint = endpoint
        self._host = host

    def connect(self, factory: Any) -> Deferred:
        from twisted.internet.ssl import optionsForClientTLS
        from twisted.protocols.tls import TLSMemoryBIOFactory

        wrapper = TLSMemoryBIOFactory(optionsForClientTLS(self._host), True, factory)
        return self._endpoint.connect(wrapper).addCallback(lambda p: p.wrappedProtocol)


def connect_redis(
    url: str,
    reactor: Optional[Any] = None,
    *,
    poolsize: int = 1,
    connect_timeout: float = 5.0,
    reply_timeout: Optional[float] = 30.0,
) -> Any:
    """
    A lazy, reconnecting txredisapi connection to the Redis at ``url``
    (``redis://[:password@]host[:port][/db]``, or ``rediss://`` for TLS).

    It can be used at once: commands wait until it is connected.  One
    connection is the default because Redis runs one command at a time
    anyway, and commands on one connection keep their order, which the
    state writes of a task rely on.  ``reply_timeout`` drops a connection
    whose server stopped answering, so that it is re-established.  Call
    ``disconnect()`` on the result to close it.

    :param reactor: reactor to connect with (the global one when ``None``;
        txredisapi still uses the global reactor for its own timers).
    With a ``redis+sentinel://`` URL the connection is made to the primary
    the sentinels name, asked again on every reconnection, so that it
    follows a failover (see :func:`_connect_sentinel`).

    :raises ConfigurationError: the URL is not a Redis URL.
    """
    options = parse_redis_url(url)
    if options.get("sentinels"):
        return _connect_sentinel(options, poolsize=poolsize, connect_timeout=connect_timeout,
                                 reply_timeout=reply_timeout)
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    factory_class = txredisapi.RedisFactory
    if not hasattr(factory_class, "startConnecting"):  # txredisapi < 1.5
        return txredisapi.lazyConnectionPool(
            options["host"],
            options["port"],
            dbid=options["db"],
            poolsize=poolsize,
            password=options["password"],
            ssl_context_factory=options["tls"],
            connectTimeout=connect_timeout,
            replyTimeout=reply_timeout,
            convertNumbers=False,
        )
    from twisted.internet.endpoints import HostnameEndpoint

    factory = factory_class(
        f"{options['host']}:{options['port']}",
        options["db"],
        poolsize,
        isLazy=True,
        password=options["password"],
        replyTimeout=reply_timeout,
        convertNumbers=False,
        username=options["username"],
    )
    factory.protocol = _Protocol
    factory.reconnect = True
    factory.maxDelay = RECONNECT_MAX_DELAY

    def refused(failure: Failure) -> None:
        # a lazy handle has nobody waiting on the factory: say it here
        log.error(
            "Cannot use Redis at {host}:{port}: {error}",
            host=options["host"],
            port=options["port"],
            error=failure.getErrorMessage(),
        )

    factory.deferred.addErrback(refused)
    endpoint: Any = HostnameEndpoint(
        reactor, options["host"], options["port"], timeout=connect_timeout
    )
    if options["tls"]:
        endpoint = _TLSEndpoint(endpoint, options["host"])
    factory.startConnecting(endpoint)
    factory.handler.quebert_options = options
    return factory.handler


#: Words of the error replies to AUTH or SELECT that no later connection
#: would get past: wrong credentials, no such database.  Other refusals
#: ("max number of clients reached", "LOADING ...") pass, like an outage.
_FINAL_SETUP_ERRORS = ("WRONGPASS", "NOAUTH", "NOPERM", "invalid password",
                       "AUTH <password>", "no password is set", "DB index")


class _SetupKeepsTrying:
    """
    A mixin for txredisapi's protocol: a new connection whose AUTH or
    SELECT is lost, left unanswered or refused for a passing reason is
    dropped and the next one tried, as any lost connection is.

    txredisapi stops reconnecting for good (``factory.stopTrying()``) when
    either fails, whatever the reason.  Wrong credentials or a database
    that does not exist are configuration errors, and are left to it
    (:data:`_FINAL_SETUP_ERRORS`).  But a reconnection made while Redis is
    frozen, partitioned, restarting, full or behind a proxy whose backend
    is down loses its SELECT, and txredisapi would never connect again:
    every later state write of the worker would fail until it was
    restarted.
    """

    _setting_up = False

    def connectionMade(self) -> Any:
        self._setting_up = True

        def ready(protocol: Any) -> Any:
            self._setting_up = False
            return protocol

        self.whenConnected().addCallback(ready)  # type: ignore[attr-defined]
        return super().connectionMade()  # type: ignore[misc]

    def select(self, index: int) -> Deferred:
        return self._set_up("SELECT", super().select, index)  # type: ignore[misc]

    def auth(self, password: str, username: Optional[str] = None) -> Deferred:
        return self._set_up("AUTH", super().auth, password, username)  # type: ignore[misc]

    def _set_up(self, command: str, send: Any, *args: Any) -> Deferred:
        d = maybeDeferred(send, *args)
        if not self._setting_up:
            return d

        def failed(failure: Failure) -> Any:
            error = failure.getErrorMessage()
            if failure.check(txredisapi.ResponseError) and any(
                    word in error for word in _FINAL_SETUP_ERRORS):
                return failure  # txredisapi stops, and says why
            log.warn("Redis connection dropped: {command} failed ({error}); "
                     "reconnecting", command=command, error=error)
            transport = getattr(self, "transport", None)
            if transport is not None:
                transport.abortConnection()
            # never fires: this connection's set-up ends here, without
            # txredisapi's stopTrying(), and its slot reconnects as for any
            # lost connection
            return Deferred()

        return d.addErrback(failed)


class _Protocol(NoDelayProtocol, _SetupKeepsTrying, txredisapi.RedisProtocol):
    """txredisapi's protocol, without Nagle's algorithm, reconnecting after
    a lost set-up."""


class _SentinelProtocol(NoDelayProtocol, _SetupKeepsTrying, txredisapi.SentinelRedisProtocol):
    """The same for connections found through Sentinel."""


class _SentinelFactory(txredisapi.SentinelConnectionFactory):
    """
    txredisapi's Sentinel connection factory, reconnecting within
    ``RECONNECT_MAX_DELAY`` and counting the connections it made, so that a
    write can tell whether it was answered on the connection its ``WAIT``
    went to.
    """

    maxDelay = RECONNECT_MAX_DELAY
    generation = 0
    protocol = _SentinelProtocol

    def addConnection(self, conn: Any) -> None:
        self.generation += 1
        super().addConnection(conn)


class SentinelHandler(txredisapi.ConnectionHandler):
    """
    The handle :func:`connect_redis` returns for a ``redis+sentinel://``
    URL: the txredisapi connection to the primary, whose ``disconnect()``
    also closes the connections to the sentinels.  ``wait_replicas`` and
    ``wait_timeout`` are the URL's (:class:`RedisStateManager` reads them).
    """

    wait_replicas = _redis_ops.DEFAULT_WAIT_REPLICAS
    wait_timeout = _redis_ops.DEFAULT_WAIT_TIMEOUT

    @property
    def generation(self) -> int:
        """Connections made so far: a new one means the old one was lost."""
        return self._factory.generation

    def disconnect(self) -> Deferred:
        """Close the connection to the primary and those to the sentinels."""
        from twisted.internet import reactor
        from twisted.internet.defer import gatherResults
        from twisted.internet.task import deferLater

        sentinels = self._factory.sentinel_manager
        protocols = list(self._factory.pool)
        for handler in sentinels.sentinels:
            protocols += handler._factory.pool
        d = gatherResults([self._factory.disconnect(), sentinels.disconnect()],
                          consumeErrors=True)

        def parsed(_: Any, turns: int = 0) -> Any:
            # txredisapi parses a reply read before the disconnection (a
            # sentinel's late answer) one bulk string per reactor turn
            # (callLater(0)); let it finish, so that nothing is left behind
            if turns < 1000 and any(getattr(p, "paused", False) for p in protocols):
                return deferLater(reactor, 0, parsed, None, turns + 1)
            return None

        return d.addCallback(lambda _: deferLater(reactor, 0, parsed, None))


def _connect_sentinel(options: Mapping[str, Any], *, poolsize: int, connect_timeout: float,
                      reply_timeout: Optional[float]) -> SentinelHandler:
    """
    ``connect_redis`` for a Sentinel URL's ``options``: txredisapi's
    ``Sentinel(...).master_for(service)``, lazy and reconnecting like the
    plain connection.  Before each connection attempt the sentinels are
    asked for the primary (the first healthy answer wins; none within
    ``SENTINEL_DISCOVERY_TIMEOUT``: the attempt fails and is retried), and a
    server that answers ``ROLE`` with anything but ``master`` is dropped.
    """
    sentinel = txredisapi.Sentinel(
        list(options["sentinels"]), password=options["sentinel_password"],
        connectTimeout=connect_timeout, replyTimeout=reply_timeout)
    sentinel.discovery_timeout = SENTINEL_DISCOVERY_TIMEOUT
    handler = sentinel.master_for(
        options["service"], factory_class=_SentinelFactory, dbid=options["db"],
        poolsize=poolsize, isLazy=True, handler=SentinelHandler,
        password=options["password"], username=options["username"],
        replyTimeout=reply_timeout, convertNumbers=False)
    handler.wait_replicas = options["wait_replicas"]
    handler.wait_timeout = options["wait_timeout"]
    handler.quebert_options = options
    return handler
