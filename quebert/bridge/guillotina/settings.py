# -*- test-case-name: tests.test_bridge_guillotina -*-
"""
The add-on's settings: ``app_settings["quebert"]``, read and checked once.

Guillotina merges the add-on's defaults (:data:`DEFAULTS`) with the
application's own ``"quebert"`` block key by key, so an application sets
only what differs.  :meth:`BridgeSettings.from_mapping` refuses anything
that would only fail later, at the first publish, with a sentence naming
the key, so that a misconfigured application does not start.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional
from urllib.parse import urlsplit

import attrs

from quebert.amqp.connection import split_amqp_urls
from quebert.amqp.topology import QUEUE_TYPES
from quebert.errors import ConfigurationError
from quebert.protocol import QUEUE_RE
from quebert.state._records import retention
from quebert.state._redis_ops import parse_redis_url

#: Id of the principal a request carrying the service token is authenticated as.
SERVICE_PRINCIPAL = "quebert-service"

#: Shortest service token accepted: anything shorter can be guessed.
MIN_TOKEN_LENGTH = 16

#: ``app_settings["quebert"]`` defaults (the add-on's ``app_settings``).
DEFAULTS: dict = {
    # RabbitMQ, as the workers reach it too (same vhost).
    "amqp_url": "amqp://guest:guest@127.0.0.1:5672/%2F",
    # The workers' --exchange; the control exchange is "{exchange}.control".
    "exchange": "quebert",
    # Queue of tasks that name none and whose @task gives none.
    "queue": "default",
    # The workers' --queue-type and --delivery-limit: queues are declared as
    # they declare them (queues that exist with other arguments are used as
    # they are).
    "queue_type": "quorum",
    "delivery_limit": 20,
    # Redis of the workers' state store, and its key prefix (--state-prefix).
    "redis_url": "redis://127.0.0.1:6379/0",
    "state_prefix": "quebert:",
    # Seconds finished records are kept whatever their outcome (the workers'
    # state.ttl; None: by outcome, as state_retention says); also, the
    # longest, how long the per-container index and the debug copy of a
    # task's message are kept.
    "state_ttl": None,
    # Seconds kept by outcome (the workers' state.retention), e.g.
    # {"succeeded": 3600}; outcomes it does not name keep state_ttl, or the
    # defaults: succeeded 3600, failed and canceled 604800.
    "state_retention": {},
    # Seconds a unique task name stays taken after its task finished.
    "name_tombstone": 3600,
    # This application's base URL as the workers reach it: relative paths
    # given to add_url_task are resolved against it (never against a
    # request's Host header).  None: only absolute URLs are accepted.
    "callback_url": None,
    # Bearer token the workers send to callback URLs (their
    # dispatch.credentials); a request carrying it is authenticated as the
    # service principal.  None: nobody is authenticated that way.
    "service_token": None,
    # Seconds one publish (connect, declare, confirm) may take.
    "publish_timeout": 10.0,
}


def _seconds(settings: Mapping[str, Any], key: str, *, positive: bool) -> float:
    value = settings.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ConfigurationError(
            f'app_settings["quebert"]["{key}"] must be a number of seconds {bound}, '
            f"not {value!r}")
    return float(value)


def _retention(settings: Mapping[str, Any]) -> Dict[str, float]:
    value = settings.get("state_retention") or {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            'app_settings["quebert"]["state_retention"] must be an object of seconds by '
            f"outcome (succeeded, failed, canceled), not {value!r}")
    try:
        kept = retention(None, value)
    except ValueError as e:
        raise ConfigurationError(f'app_settings["quebert"]["state_retention"]: {e}') from None
    return {outcome: kept[outcome] for outcome in value}


def _name(settings: Mapping[str, Any], key: str) -> str:
    value = settings.get(key)
    if not isinstance(value, str) or not QUEUE_RE.fullmatch(value):
        raise ConfigurationError(
            f'app_settings["quebert"]["{key}"] must be 1-100 characters of A-Z a-z 0-9 '
            f"_ . : - (not starting with . or :), not {value!r}")
    return value


def _callback_url(value: Any) -> Optional[str]:
    if value is None:
        return None
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname \
            or parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigurationError(
            'app_settings["quebert"]["callback_url"] must be the absolute http(s) base URL '
            "of this application as the workers reach it (no query, fragment or "
            f"credentials), e.g. http://guillotina.internal:8080, not {value!r}")
    return value.rstrip("/")


def _token(value: Any) -> Optional[str]:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) < MIN_TOKEN_LENGTH or not value.isprintable() \
            or any(c.isspace() for c in value):
        raise ConfigurationError(
            'app_settings["quebert"]["service_token"] must be a string of at least '
            f"{MIN_TOKEN_LENGTH} printable characters without spaces (the same secret as "
            "the workers' dispatch.credentials token), or null")
    return value


@attrs.frozen
class BridgeSettings:
    """The checked ``app_settings["quebert"]``; see :data:`DEFAULTS` for each key."""

    amqp_url: str
    exchange: str
    queue: str
    queue_type: str
    delivery_limit: Optional[int]
    redis_url: str
    state_prefix: str
    state_ttl: Optional[float]
    state_retention: Mapping[str, float]
    name_tombstone: float
    callback_url: Optional[str]
    service_token: Optional[str] = attrs.field(repr=False)
    publish_timeout: float

    @classmethod
    def from_mapping(cls, settings: Optional[Mapping[str, Any]]) -> BridgeSettings:
        """Defaults overridden by ``settings``; ``ConfigurationError`` naming a bad key."""
        merged = {**DEFAULTS, **(settings or {})}
        unknown = set(merged) - set(DEFAULTS)
        if unknown:
            raise ConfigurationError(
                f'unknown key(s) in app_settings["quebert"]: {", ".join(sorted(unknown))} '
                f"(known: {', '.join(sorted(DEFAULTS))})")
        amqp_url = merged["amqp_url"]
        try:
            amqp_url = ",".join(split_amqp_urls(amqp_url))
        except ConfigurationError as e:
            raise ConfigurationError(
                'app_settings["quebert"]["amqp_url"] must be an amqp:// or amqps:// URL, '
                "or several (a cluster's nodes) separated by commas or in a list, e.g. "
                f"amqp://guest:guest@127.0.0.1:5672/%2F, not {amqp_url!r} ({e})") from e
        if merged["queue_type"] not in QUEUE_TYPES:
            raise ConfigurationError(
                f'app_settings["quebert"]["queue_type"] must be one of '
                f"{', '.join(QUEUE_TYPES)}, not {merged['queue_type']!r}")
        limit = merged["delivery_limit"]
        if limit is not None and (type(limit) is not int or limit < 0):
            raise ConfigurationError(
                'app_settings["quebert"]["delivery_limit"] must be a whole number >= 0 '
                f"(the workers' --delivery-limit; 0 or None: none), not {limit!r}")
        try:
            parse_redis_url(merged["redis_url"])
        except ConfigurationError as e:
            raise ConfigurationError(f'app_settings["quebert"]["redis_url"]: {e}') from e
        prefix = merged["state_prefix"]
        if not isinstance(prefix, str) or not prefix:
            raise ConfigurationError(
                'app_settings["quebert"]["state_prefix"] must be a non-empty string '
                f"(the workers' --state-prefix), not {prefix!r}")
        return cls(
            amqp_url=amqp_url,
            exchange=_name(merged, "exchange"),
            queue=_name(merged, "queue"),
            queue_type=merged["queue_type"],
            delivery_limit=limit or None,
            redis_url=merged["redis_url"],
            state_prefix=prefix,
            state_ttl=(None if merged["state_ttl"] is None
                       else _seconds(merged, "state_ttl", positive=False)),
            state_retention=_retention(merged),
            name_tombstone=_seconds(merged, "name_tombstone", positive=False),
            callback_url=_callback_url(merged["callback_url"]),
            service_token=_token(merged["service_token"]),
            publish_timeout=_seconds(merged, "publish_timeout", positive=True),
        )
