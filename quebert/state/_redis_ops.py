# -*- test-case-name: tests.test_state -*-
"""
What the Redis state store sends and reads, without a Redis client.

The writes as the ``apply`` script's operations (see
:mod:`quebert.state._redis_scripts`), the answers to a batch, and Redis
URLs: pure functions shared by :class:`quebert.state.redis.RedisStateManager`
(txredisapi, on the reactor) and the Guillotina bridge
(:mod:`quebert.bridge.guillotina.state`, redis-py on asyncio).  This module
imports neither client, so the bridge never imports txredisapi, nor with it
``twisted.internet.reactor``.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import parse_qsl, unquote, urlsplit

from quebert.errors import ConfigurationError
from quebert.state import _records

#: JSON as the scripts read it: compact, no NaN or infinity.
json_encode = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
_float_repr = float.__repr__

# The writes as script operations (see _APPLY in _redis_scripts): checked,
# normalised and encoded once, immutable.  ResilientStateManager keeps these
# rather than the arguments, and hands them to RedisStateManager._submit().


def op_enqueued(task_id: str, state: str, info: Mapping[str, Any], at: float) -> list:
    """A task just published, ``queued`` or ``scheduled``: ``enqueued``."""
    _records.check_enqueued(task_id, state, info, at)
    return ["e", task_id, _float_repr(float(at)), *_records.info_strings(info), state,
            *_arguments(info)]


def _arguments(info: Mapping[str, Any]) -> list:
    """The optional JSON text of the task's arguments (``info["arguments"]``)."""
    text = info.get("arguments")
    if text is None:
        return []
    if not isinstance(text, str):
        raise TypeError(f"info['arguments'] must be JSON text, not {type(text).__name__}")
    return [text]


def op_claim(task_id: str, state: str, info: Mapping[str, Any], at: float) -> list:
    """``op_enqueued`` for a task with a unique name: refused while the name is held."""
    _records.check_enqueued(task_id, state, info, at)
    _records.check_name(info.get("name"))
    return ["n", task_id, _float_repr(float(at)), *_records.info_strings(info), state,
            *_arguments(info)]


def op_release(task_id: str, name: str, at: float) -> list:
    """Free ``name`` if ``task_id`` holds it."""
    _records.check_task_id(task_id)
    _records.check_name(name)
    return ["r", task_id, _float_repr(float(at)), name]


def op_cancel(task_id: str, at: float, reason: Optional[str]) -> list:
    """Cancel a task (see ``IStateManager.cancel``)."""
    _records.check_task_id(task_id)
    return ["c", task_id, _float_repr(float(at)), _records.text(reason, _records.MESSAGE_LIMIT)]


def op_started(
    task_id: str, attempt: int, worker: str, info: Mapping[str, Any], at: float
) -> list:
    """Attempt ``attempt`` starts on ``worker``."""
    _records.check_started(task_id, attempt, worker, info, at)
    return ["s", task_id, _float_repr(float(at)), *_records.info_strings(info), str(attempt),
            _records.text(worker, _records.MESSAGE_LIMIT)]


def op_finished(
    task_id: str,
    state: str,
    attempt: int,
    info: Mapping[str, Any],
    at: float,
    result: Any = None,
    error: Optional[Mapping[str, Any]] = None,
    reason: Optional[str] = None,
    retry_at: Optional[float] = None,
) -> list:
    """The outcome of attempt ``attempt``."""
    _records.check_finished(task_id, state, attempt, info, at, error, reason, retry_at)
    return [
        "f", task_id, _float_repr(float(at)), *_records.info_strings(info), str(attempt),
        state,
        None if result is None else _records.to_json(result),
        None if error is None else json_encode(_records.normalize_error(error)),
        _records.text(reason, _records.MESSAGE_LIMIT),
        None if retry_at is None else _float_repr(float(retry_at)),
    ]


def op_requeued(task_id: str, at: float) -> list:
    """A failed task goes back to ``queued``."""
    _records.check_task_id(task_id)
    return ["q", task_id, _float_repr(float(at))]


# -- answers and URLs ----------------------------------------------------------


def answers(reply: Any) -> Dict[int, str]:
    """
    The writes' answers in an ``apply`` reply: ``{position: text}`` (see
    ``_APPLY`` in :mod:`quebert.state._redis_scripts`).
    """
    if not isinstance(reply, list) or len(reply) < 3:
        return {}
    found = {}
    for i in range(1, len(reply) - 1, 2):
        value = reply[i + 1]
        found[int(reply[i])] = value.decode() if isinstance(value, bytes) else str(value)
    return found


#: Scheme of a Redis reached through Sentinel (see :func:`parse_sentinel_url`).
SENTINEL_SCHEME = "redis+sentinel"
#: Port of a sentinel named without one.
SENTINEL_PORT = 26379
#: Replicas a settling state write waits for through Sentinel, by default.
DEFAULT_WAIT_REPLICAS = 1
#: Seconds that ``WAIT`` may take, by default.
DEFAULT_WAIT_TIMEOUT = 0.5

_SENTINEL_EXAMPLE = (
    "redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/SERVICE[/db]"
    "[?sentinel_password=...&wait=1&wait_timeout=0.5], e.g. "
    "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/mymaster/0"
)


def parse_redis_url(url: str) -> Dict[str, Any]:
    """
    ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS) as
    keyword arguments; a ``ConfigurationError`` saying what is wrong otherwise.

    ``redis+sentinel://...`` URLs are read by :func:`parse_sentinel_url`:
    their result has a ``sentinels`` key, which a plain URL's has not.
    """
    example = "redis://[:password@]host[:port][/db], e.g. redis://127.0.0.1:6379/0"
    if not isinstance(url, str):
        raise ConfigurationError(f"The Redis URL must be a string like {example}, not {url!r}.")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == SENTINEL_SCHEME:
        return parse_sentinel_url(url)
    if scheme == "rediss+sentinel":
        raise ConfigurationError(
            f"Redis URL {url!r}: TLS through Sentinel (rediss+sentinel://) is not supported;"
            f" expected {_SENTINEL_EXAMPLE}, or rediss://host:port/db for TLS.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigurationError(f"Redis URL {url!r} is not valid ({e}); expected {example}.")
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigurationError(
            f"Redis URL {url!r} must start with redis://, rediss:// or redis+sentinel://;"
            f" expected {example}."
        )
    if not parts.hostname:
        raise ConfigurationError(f"Redis URL {url!r} names no host; expected {example}.")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ConfigurationError(
            f"Redis URL {url!r} has database {path!r}; it must be a number; expected {example}."
        )
    if parts.query and parse_qsl(parts.query, keep_blank_values=True):
        raise ConfigurationError(
            f"Redis URL {url!r} has options ({parts.query!r}) that quebert does not support."
        )
    return {
        "host": parts.hostname,
        "port": port if port is not None else 6379,
        "db": int(path) if path else 0,
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "tls": parts.scheme == "rediss",
    }


def _sentinel_address(url: str, item: str) -> Tuple[str, int]:
    """One ``host[:port]`` (``[v6]:port`` too) of a Sentinel URL's list."""
    if not item:
        raise ConfigurationError(
            f"Redis URL {url!r} has an empty sentinel address (a stray comma?);"
            f" expected {_SENTINEL_EXAMPLE}.")
    if item.startswith("["):
        host, bracket, rest = item[1:].partition("]")
        if not bracket or not host or (rest and not rest.startswith(":")):
            raise ConfigurationError(
                f"Redis URL {url!r} has a malformed sentinel address {item!r};"
                f" expected {_SENTINEL_EXAMPLE}.")
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_ = item.partition(":")
        port_text = port_text_ if colon else None
        if not host or ":" in port_text_:
            raise ConfigurationError(
                f"Redis URL {url!r} has a malformed sentinel address {item!r} (an IPv6"
                f" address goes in brackets); expected {_SENTINEL_EXAMPLE}.")
    if port_text is None:
        return host, SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigurationError(
            f"Redis URL {url!r}: sentinel {item!r} has port {port_text!r}; it must be a"
            f" number from 1 to 65535; expected {_SENTINEL_EXAMPLE}.")
    return host, int(port_text)


def parse_sentinel_url(url: str) -> Dict[str, Any]:
    """
    ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/SERVICE[/db][?options]``
    as keyword arguments: ``sentinels`` (``[(host, port)]``, port 26379 by
    default), ``service`` (the name the sentinels monitor), ``db``,
    ``username`` and ``password`` (for the data nodes, the primary and its
    replicas), ``tls`` (always false) and the options:

    ``sentinel_password``
        the sentinels' own password (``requirepass`` in their configuration
        file), when they have one; the URL's password is the data nodes'.
    ``wait``
        replicas that must acknowledge the writes that settle a task before
        they count as saved (``WAIT``; default 1, 0 turns it off).
    ``wait_timeout``
        seconds ``WAIT`` may take (default 0.5).

    A ``ConfigurationError`` names what is wrong otherwise.
    """
    if not isinstance(url, str):
        raise ConfigurationError(
            f"The Redis URL must be a string like {_SENTINEL_EXAMPLE}, not {url!r}.")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != SENTINEL_SCHEME:
        raise ConfigurationError(
            f"Redis URL {url!r} is not a Sentinel URL; expected {_SENTINEL_EXAMPLE}.")
    rest, _, fragment = rest.partition("#")
    if fragment:
        raise ConfigurationError(
            f"Redis URL {url!r} has a fragment (#{fragment}); expected {_SENTINEL_EXAMPLE}.")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if colon and password_text else None
    if not hosts:
        raise ConfigurationError(
            f"Redis URL {url!r} names no sentinel; expected {_SENTINEL_EXAMPLE}.")
    sentinels: List[Tuple[str, int]] = [_sentinel_address(url, h) for h in hosts.split(",")]
    segments = path.split("/") if path else []
    if segments and segments[-1] == "":
        segments.pop()  # a trailing slash
    if not segments or not segments[0]:
        raise ConfigurationError(
            f"Redis URL {url!r} names no service (the name the sentinels monitor, after the"
            f" addresses); expected {_SENTINEL_EXAMPLE}.")
    if len(segments) > 2:
        raise ConfigurationError(
            f"Redis URL {url!r} has a path of {len(segments)} parts; expected /SERVICE or"
            f" /SERVICE/db: {_SENTINEL_EXAMPLE}.")
    service = unquote(segments[0])
    db_text = segments[1] if len(segments) == 2 else ""
    if db_text and not db_text.isdigit():
        raise ConfigurationError(
            f"Redis URL {url!r} has database {db_text!r}; it must be a number;"
            f" expected {_SENTINEL_EXAMPLE}.")
    options: Dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in ("sentinel_password", "wait", "wait_timeout"):
            raise ConfigurationError(
                f"Redis URL {url!r} has option {name!r}; a Sentinel URL takes"
                f" sentinel_password, wait and wait_timeout.")
        if name in options:
            raise ConfigurationError(f"Redis URL {url!r} gives option {name!r} twice.")
        options[name] = value
    wait_text = options.get("wait", str(DEFAULT_WAIT_REPLICAS))
    if not wait_text.isdigit():
        raise ConfigurationError(
            f"Redis URL {url!r} has wait={wait_text!r}; it must be a number of replicas"
            f" (0: do not wait for replicas).")
    timeout_text = options.get("wait_timeout", repr(DEFAULT_WAIT_TIMEOUT))
    try:
        wait_timeout = float(timeout_text)
    except ValueError:
        wait_timeout = float("nan")
    if not 0.001 <= wait_timeout <= 60:
        raise ConfigurationError(
            f"Redis URL {url!r} has wait_timeout={timeout_text!r}; it must be seconds from"
            f" 0.001 to 60.")
    return {
        "sentinels": sentinels,
        "service": service,
        "db": int(db_text) if db_text else 0,
        "username": username,
        "password": password,
        "tls": False,
        "sentinel_password": options.get("sentinel_password") or None,
        "wait_replicas": int(wait_text),
        "wait_timeout": wait_timeout,
    }


def describe_redis_url(url: str) -> str:
    """Where a Redis URL points, without its credentials, for messages."""
    try:
        options = parse_redis_url(url)
    except ConfigurationError:
        return "?"
    if options.get("sentinels"):
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
                         for h, p in options["sentinels"])
        return f"{hosts}/{options['service']}/{options['db']} (Sentinel)"
    host = options["host"]
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{options['port']}/{options['db']}"
