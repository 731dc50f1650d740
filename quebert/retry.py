# -*- test-case-name: tests.test_retry -*-
"""
The retry policy: Google App Engine / Cloud Tasks parameters and formula.

For retry number ``n >= 1``::

    e = min(n - 1, max_doublings)
    k = n - e
    delay = min(max_backoff, min_backoff * 2**e * max(k, 1))

so the delay doubles ``max_doublings`` times, then grows linearly, and is
capped at ``max_backoff``.  Retrying stops only when both the attempt limit
and the duration limit are spent; a limit that is not set (``max_attempts
= -1``, ``max_retry_duration = 0``) never runs out resp. is always spent,
exactly as in Cloud Tasks.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Mapping, Optional

import attrs

from quebert.errors import ConfigurationError

_FIELDS = (
    "max_attempts",
    "max_retry_duration",
    "min_backoff",
    "max_backoff",
    "max_doublings",
    "jitter",
)


def _number(kind: type, name: str) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if isinstance(value, bool):
            raise ConfigurationError(f"{name} must be a number, not {value!r}")
        try:
            number = kind(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigurationError(f"{name} must be a number, not {value!r}")
        if isinstance(number, float) and not math.isfinite(number):
            raise ConfigurationError(f"{name} must be a finite number, not {value!r}")
        return number

    return convert


def _non_negative(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if value < 0:
        raise ConfigurationError(f"{attribute.name} must be >= 0, not {value!r}")


def _attempts(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if value == 0 or value < -1:
        raise ConfigurationError(
            f"max_attempts must be -1 (unlimited) or >= 1, not {value!r}"
        )


def _jitter(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0 <= value <= 1:
        raise ConfigurationError(f"jitter must be between 0 and 1, not {value!r}")


@attrs.frozen
class RetryPolicy:
    """
    When and how often a failed task is retried.

    :param max_attempts: total attempts allowed (first run included);
        ``-1`` means unlimited.
    :param max_retry_duration: seconds after the first attempt during which
        retries may still be made; ``0`` means no duration limit.
    :param min_backoff: delay before the first retry, in seconds.
    :param max_backoff: upper bound of any delay, in seconds.
    :param max_doublings: how many times the delay doubles before it grows
        linearly.
    :param jitter: fraction (0..1) by which a delay may be randomly
        shortened, to spread retries of tasks that failed together.
    """

    max_attempts: int = attrs.field(
        default=5, converter=_number(int, "max_attempts"), validator=_attempts)
    max_retry_duration: float = attrs.field(
        default=0.0, converter=_number(float, "max_retry_duration"), validator=_non_negative)
    min_backoff: float = attrs.field(
        default=1.0, converter=_number(float, "min_backoff"), validator=_non_negative)
    max_backoff: float = attrs.field(
        default=3600.0, converter=_number(float, "max_backoff"), validator=_non_negative)
    max_doublings: int = attrs.field(
        default=16, converter=_number(int, "max_doublings"), validator=_non_negative)
    jitter: float = attrs.field(
        default=0.0, converter=_number(float, "jitter"), validator=_jitter)

    def __attrs_post_init__(self) -> None:
        if self.max_backoff < self.min_backoff:
            raise ConfigurationError(
                f"max_backoff ({self.max_backoff}) must be >= min_backoff ({self.min_backoff})"
            )

    def delay(self, retry: int, rand: Optional[Callable[[], float]] = None) -> float:
        """
        Seconds to wait before retry number ``retry`` (1 for the first
        retry, i.e. after the first failed attempt).
        """
        if retry < 1:
            raise ValueError(f"retry numbers start at 1, not {retry!r}")
        doublings = min(retry - 1, self.max_doublings)
        linear = retry - doublings
        # Exponent is capped by max_doublings, so no overflow; cap early
        # anyway so huge retry counts stay cheap.
        # 2.0 ** 1024 overflows a float: past that the cap applies anyway.
        growth = 2.0 ** min(doublings, 1023) * max(linear, 1)
        value = min(self.max_backoff, self.min_backoff * growth)
        if self.jitter:
            value *= 1 - self.jitter * (rand or random.random)()
        return value

    def attempts_spent(self, attempts: int) -> bool:
        """Whether ``attempts`` finished attempts use up the attempt limit."""
        return self.max_attempts != -1 and attempts >= self.max_attempts

    def duration_spent(self, first_attempt_at: Optional[float], now: float) -> bool:
        """Whether the retry duration limit is used up (or not set)."""
        if not self.max_retry_duration:
            return True
        if first_attempt_at is None:
            return False
        return now - first_attempt_at >= self.max_retry_duration

    def should_retry(self, attempts: int, first_attempt_at: Optional[float], now: float) -> bool:
        """
        Whether a task that has failed ``attempts`` times, the first of them
        started at ``first_attempt_at``, gets another attempt.
        """
        return not (
            self.attempts_spent(attempts) and self.duration_spent(first_attempt_at, now)
        )

    def replace(self, **overrides: Any) -> RetryPolicy:
        """A copy with the given fields changed (``None`` values ignored)."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(changes) - set(_FIELDS)
        if unknown:
            raise ConfigurationError(f"unknown retry option(s): {', '.join(sorted(unknown))}")
        return attrs.evolve(self, **changes)

    def to_dict(self) -> dict:
        return attrs.asdict(self)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: Optional[RetryPolicy] = None):
        """Build a policy from a mapping, starting from ``base``'s values."""
        return (base or cls()).replace(**{k: data.get(k) for k in _FIELDS if k in data})


RETRY_FIELDS = _FIELDS
