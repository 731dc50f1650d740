# -*- test-case-name: tests.test_results -*-
"""
One Redis pub/sub subscription to the channel the state store's ``apply``
script publishes settled task ids to (see :mod:`quebert.state.redis`).

It is a connection of its own (a subscribed Redis connection can run no
other command), kept up by a :class:`~twisted.application.internet.ClientService`:
lost, it is made again (to the primary the sentinels name, for a
``redis+sentinel://`` URL), subscribed again, and its listener told to
read again what it waits for, since anything published while it was away
is gone.  A ``PING`` every ``KEEPALIVE`` seconds that gets no answer within
``KEEPALIVE_TIMEOUT`` drops a connection that went silent (a server gone
without closing it), so that a wait never hangs on a dead subscription.
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from quebert._tcp import NoDelayProtocol
from quebert.state._redis_connect import SENTINEL_DISCOVERY_TIMEOUT, _TLSEndpoint

log = Logger(namespace="quebert.state.redis")

#: Seconds between two keepalive PINGs on the subscription.
KEEPALIVE = 15.0
#: Seconds a keepalive PING may take before the connection is dropped.
KEEPALIVE_TIMEOUT = 5.0


class _SubscriberProtocol(NoDelayProtocol, txredisapi.SubscriberProtocol):
    """Hands each message's ids to the subscription."""

    subscription: SettledSubscription

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        if isinstance(message, str) and message:
            self.subscription.received(message.split("\n"))

    def connectionLost(self, why: Any) -> None:
        self.subscription.lost(self)
        super().connectionLost(why)


class _SubscriberFactory(Factory):
    """Builds subscriber protocols with the URL's credentials (no SELECT: channels are global)."""

    isLazy = True

    def __init__(self, subscription: SettledSubscription, options: Mapping[str, Any]) -> None:
        self.subscription = subscription
        self.options = options

    def buildProtocol(self, addr: Any) -> _SubscriberProtocol:
        p = _SubscriberProtocol(password=self.options.get("password"),
                                username=self.options.get("username"),
                                convertNumbers=False)
        p.factory = self
        p.subscription = self.subscription
        return p

    # what txredisapi's protocol calls on its factory when AUTH fails
    def stopTrying(self) -> None:
        pass

    def connectionError(self, message: str) -> None:
        log.error("Redis subscription for task results: {error}", error=message)


class _SentinelEndpoint:
    """Asks the sentinels for the primary before every connection attempt."""

    def __init__(self, reactor: Any, options: Mapping[str, Any], connect_timeout: float) -> None:
        self.reactor = reactor
        self.service = options["service"]
        self.connect_timeout = connect_timeout
        self.sentinel = txredisapi.Sentinel(
            list(options["sentinels"]), password=options["sentinel_password"],
            connectTimeout=connect_timeout)
        self.sentinel.discovery_timeout = SENTINEL_DISCOVERY_TIMEOUT

    def connect(self, factory: Any) -> defer.Deferred:
        def found(address: Any) -> defer.Deferred:
            host, port = address
            return HostnameEndpoint(self.reactor, host, int(port),
                                    timeout=self.connect_timeout).connect(factory)

        return self.sentinel.discover_master(self.service).addCallback(found)

    def close(self) -> defer.Deferred:
        return self.sentinel.disconnect()


class SettledSubscription:
    """
    Subscribes to ``channel`` on the Redis that ``options`` (from
    :func:`~quebert.state._redis_ops.parse_redis_url`) names and calls
    ``on_settled(ids)`` for each message, ``on_subscribed()`` each time the
    subscription is (re)established.

    :attr:`ready` fires once the first SUBSCRIBE was acknowledged.
    """

    def __init__(self, options: Mapping[str, Any], channel: str,
                 on_settled: Callable[[List[str]], None],
                 on_subscribed: Callable[[], None], *, reactor: Any = None,
                 connect_timeout: float = 5.0) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.reactor = reactor
        self.channel = channel
        self.on_settled = on_settled
        self.on_subscribed = on_subscribed
        self.subscribed = False
        self._ready: List[defer.Deferred] = []
        self._sentinel: Optional[_SentinelEndpoint] = None
        endpoint: Any
        if options.get("sentinels"):
            endpoint = self._sentinel = _SentinelEndpoint(reactor, options, connect_timeout)
        else:
            endpoint = HostnameEndpoint(reactor, options["host"], options["port"],
                                        timeout=connect_timeout)
            if options.get("tls"):
                endpoint = _TLSEndpoint(endpoint, options["host"])
        self._protocol: Optional[_SubscriberProtocol] = None
        self._keepalive: Any = None
        self.service = ClientService(
            endpoint, _SubscriberFactory(self, options), clock=reactor,
            retryPolicy=backoffPolicy(initialDelay=0.1, maxDelay=2.0, factor=2.0),
            prepareConnection=self._subscribe)

    def start(self) -> None:
        self.service.startService()
        self._keepalive = self.reactor.callLater(KEEPALIVE, self._ping)

    def when_ready(self) -> defer.Deferred:
        """Fires once the subscription is live (at once if it is)."""
        if self.subscribed:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._ready.append(d)
        return d

    def stop(self) -> defer.Deferred:
        if self._keepalive is not None and self._keepalive.active():
            self._keepalive.cancel()
        self._keepalive = None
        d = defer.maybeDeferred(self.service.stopService)
        if self._sentinel is not None:
            sentinel = self._sentinel
            d.addBoth(lambda _: sentinel.close())
        return d.addBoth(lambda _: None)

    def _subscribe(self, protocol: _SubscriberProtocol) -> defer.Deferred:
        def subscribe(p: Any) -> defer.Deferred:
            return p.subscribe(self.channel)

        def done(_: Any) -> None:
            self._protocol = protocol
            self.subscribed = True
            log.debug("subscribed to {channel}", channel=self.channel)
            try:
                self.on_subscribed()
            except Exception:
                log.failure("re-reading the tasks waited for failed")
            waiting, self._ready = self._ready, []
            for d in waiting:
                d.callback(None)

        return protocol.whenConnected().addCallback(subscribe).addCallback(done)

    def received(self, ids: List[str]) -> None:
        try:
            self.on_settled(ids)
        except Exception:
            log.failure("handling settled task ids failed")

    def lost(self, protocol: _SubscriberProtocol) -> None:
        if protocol is self._protocol:
            self._protocol = None
            if self.subscribed:
                log.info("Redis subscription for task results lost; reconnecting")
            self.subscribed = False

    def _ping(self) -> None:
        self._keepalive = self.reactor.callLater(KEEPALIVE, self._ping)
        protocol = self._protocol
        if protocol is None:
            return
        timer = self.reactor.callLater(KEEPALIVE_TIMEOUT, self._silent, protocol)

        def answered(_: Any) -> None:
            if timer.active():
                timer.cancel()

        protocol.execute_command("PING", apply_timeout=False).addBoth(answered)

    def _silent(self, protocol: _SubscriberProtocol) -> None:
        log.warn("Redis subscription for task results did not answer a PING within "
                 "{timeout} s; reconnecting", timeout=KEEPALIVE_TIMEOUT)
        if protocol.transport is not None:
            protocol.transport.abortConnection()
