# -*- test-case-name: tests.test_dispatch_limits -*-
"""
Per-queue dispatch limits: how many requests at once, how many per second.

These are Cloud Tasks' queue rate limits.  ``max_concurrent_dispatches`` is
a semaphore; ``max_dispatches_per_second`` a token bucket holding at most
``max_burst_size`` tokens, refilled continuously on the reactor's clock.
Every dispatch, first attempt or retry, takes a slot and then a token.

Waiters are Deferreds in a list: they are the tasks this worker is already
running (bounded by prefetch and ``max_running_tasks``), never the queue's
backlog, which stays on the broker.  Cancelling a waiter removes it.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Mapping, Optional

import attrs
from twisted.internet import defer

from quebert.errors import ConfigurationError

#: A float rounding margin: a bucket holding 0.9999999999 tokens has one.
_EPSILON = 1e-9


def _optional_positive(what: str, integer: bool):
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value is None:
            return
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            kind = "an integer" if integer else "a number"
            raise ConfigurationError(f"{what} must be {kind} or null, not {value!r}")
        if not math.isfinite(value) or value <= 0:
            raise ConfigurationError(f"{what} must be > 0, not {value!r}")

    return check


@attrs.frozen
class QueueLimits:
    """
    How hard one queue may push its URL targets.  ``None`` means no limit.

    ``max_burst_size`` is how many dispatches may start back to back after
    a quiet spell; it defaults to ``ceil(max_dispatches_per_second)`` (at
    least 1).
    """

    max_concurrent_dispatches: Optional[int] = attrs.field(
        default=None, validator=_optional_positive("max_concurrent_dispatches", True))
    max_dispatches_per_second: Optional[float] = attrs.field(
        default=None, validator=_optional_positive("max_dispatches_per_second", False))
    max_burst_size: Optional[int] = attrs.field(
        default=None, validator=_optional_positive("max_burst_size", True))

    #: The keys :meth:`from_config` reads (in ``dispatch`` or a queue's block).
    CONFIG_KEYS = ("max_concurrent_dispatches", "max_dispatches_per_second", "max_burst_size")

    @property
    def burst(self) -> int:
        """The bucket's capacity, default filled in."""
        if self.max_burst_size is not None:
            return self.max_burst_size
        return max(1, math.ceil(self.max_dispatches_per_second or 1))

    @classmethod
    def from_config(cls, mapping: Mapping[str, Any],
                    defaults: Optional[QueueLimits] = None) -> QueueLimits:
        """
        Limits from a config block, on top of ``defaults``; other keys are
        ignored.  A block setting a rate but no burst size gets the default
        burst of its own rate, not the burst of ``defaults``.
        """
        base = defaults or cls()
        values: dict[str, Any] = {}
        if "max_dispatches_per_second" in mapping and "max_burst_size" not in mapping:
            values["max_burst_size"] = None
        for key in cls.CONFIG_KEYS:
            if key in mapping:
                value = mapping[key]
                if (key != "max_dispatches_per_second" and isinstance(value, float)
                        and value.is_integer()):
                    value = int(value)
                values[key] = value
        return attrs.evolve(base, **values)


class TokenBucket:
    """
    ``rate`` tokens a second, at most ``burst`` in store, on ``clock``.

    :meth:`take` fires once a token was taken for the caller; waiters are
    served in order, woken by one ``callLater`` at the time the next token
    is due (no timer runs while nobody waits).
    """

    def __init__(self, clock: Any, rate: float, burst: int) -> None:
        self.clock = clock
        self.rate = float(rate)
        self.burst = burst
        self._tokens = float(burst)
        self._updated = clock.seconds()
        self._waiters: collections.deque[defer.Deferred] = collections.deque()
        self._timer: Any = None

    @property
    def tokens(self) -> float:
        """Tokens in store right now."""
        self._refill()
        return self._tokens

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def take(self) -> defer.Deferred:
        """A Deferred firing ``None`` once a token is ours; cancel it to give up."""
        self._refill()
        if not self._waiters and self._tokens >= 1 - _EPSILON:
            self._tokens = max(self._tokens - 1, 0.0)
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred(self._cancel)
        self._waiters.append(d)
        self._schedule()
        return d

    def _refill(self) -> None:
        now = self.clock.seconds()
        elapsed = max(now - self._updated, 0.0)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._updated = now

    def _cancel(self, d: defer.Deferred) -> None:
        self._waiters.remove(d)
        if not self._waiters and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        if self._timer is not None or not self._waiters:
            return
        delay = max((1 - self._tokens) / self.rate, 0.0)
        self._timer = self.clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        self._refill()
        while self._waiters and self._tokens >= 1 - _EPSILON:
            self._tokens = max(self._tokens - 1, 0.0)
            self._waiters.popleft().callback(None)
        self._schedule()

    def stop(self) -> None:
        """Stop the timer (the waiters are cancelled by their owners)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Gate:
    """
    The limits of one queue, applied: a slot (if limited), then a token (if
    rate limited).  Counts what :meth:`~quebert.dispatch.URLDispatcher.stats`
    shows.
    """

    def __init__(self, clock: Any, limits: QueueLimits) -> None:
        self.limits = limits
        self.slots: Optional[defer.DeferredSemaphore] = None
        if limits.max_concurrent_dispatches is not None:
            self.slots = defer.DeferredSemaphore(limits.max_concurrent_dispatches)
        self.bucket: Optional[TokenBucket] = None
        if limits.max_dispatches_per_second is not None:
            self.bucket = TokenBucket(clock, limits.max_dispatches_per_second, limits.burst)
        #: Dispatches waiting for a slot, a token or a connection.
        self.waiting = 0
        #: Requests on the wire.
        self.in_flight = 0

    def stats(self) -> dict:
        return {
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "tokens": None if self.bucket is None else round(self.bucket.tokens, 3),
            "max_concurrent_dispatches": self.limits.max_concurrent_dispatches,
            "max_dispatches_per_second": self.limits.max_dispatches_per_second,
            "max_burst_size": None if self.bucket is None else self.limits.burst,
        }
