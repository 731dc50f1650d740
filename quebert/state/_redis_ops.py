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
from typing import Any, Dict, Mapping, Optional
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
    return ["e", task_id, _float_repr(float(at)), *_records.info_strings(info), state]


def op_claim(task_id: str, state: str, info: Mapping[str, Any], at: float) -> list:
    """``op_enqueued`` for a task with a unique name: refused while the name is held."""
    _records.check_enqueued(task_id, state, info, at)
    _records.check_name(info.get("name"))
    return ["n", task_id, _float_repr(float(at)), *_records.info_strings(info), state]


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


def parse_redis_url(url: str) -> Dict[str, Any]:
    """
    ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS) as
    keyword arguments; a ``ConfigurationError`` saying what is wrong otherwise.
    """
    example = "redis://[:password@]host[:port][/db], e.g. redis://127.0.0.1:6379/0"
    if not isinstance(url, str):
        raise ConfigurationError(f"The Redis URL must be a string like {example}, not {url!r}.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigurationError(f"Redis URL {url!r} is not valid ({e}); expected {example}.")
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigurationError(
            f"Redis URL {url!r} must start with redis:// or rediss://; expected {example}."
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
