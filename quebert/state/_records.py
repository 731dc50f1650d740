# -*- test-case-name: tests.test_state -*-
"""
Record building shared by every state manager.

The memory and Redis managers must produce exactly the same records from
the same writes, so everything that decides *what* a record holds lives
here: argument checks, the JSON form of results, error normalisation, the
fields each writer sets or clears, history entries, and the string form of
fields in a Redis hash.  The managers only decide *where* it is kept.

Strings are cleaned of lone surrogates and long texts are truncated, so a
record can always be encoded (UTF-8, JSON) and its size stays bounded: a
write that could never be stored would otherwise be retried forever by
:class:`quebert.state.resilient.ResilientStateManager`.
"""

from __future__ import annotations

import json
import math
import re
from numbers import Real
from typing import Any, Dict, List, Mapping, Optional

from quebert.state.interface import (
    FINISHED_STATES,
    HISTORY_LIMIT,
    INFO_FIELDS,
    OUTCOME_STATES,
    QUEUED,
    RUNNING,
    SCHEDULED,
    STATES,
)

#: Every key of a record, in the order records are built.
RECORD_FIELDS = (
    "id",
    "state",
    "queue",
    "kind",
    "task",
    "name",
    "attempts",
    "created_at",
    "updated_at",
    "eta",
    "started_at",
    "finished_at",
    "worker",
    "result",
    "error",
    "reason",
    "history",
    "cancel_requested",
)
STRING_FIELDS = frozenset({"id", "state", "queue", "kind", "task", "name", "worker", "reason"})
FLOAT_FIELDS = frozenset({"created_at", "updated_at", "eta", "started_at", "finished_at",
                          "cancel_requested"})
INT_FIELDS = frozenset({"attempts"})
JSON_FIELDS = frozenset({"result", "error", "history"})

#: Info fields a later write may change on an existing record.  ``created_at``
#: and ``eta`` are only taken when the record is created: a worker's copy of
#: the original ETA must not overwrite the retry time of a scheduled task.
MUTABLE_INFO_FIELDS = ("queue", "kind", "task", "name")

#: Keys of a history entry, in order; a new entry starts with all of them unset.
HISTORY_FIELDS = ("attempt", "state", "worker", "started_at", "finished_at", "error", "retry_at")
_EMPTY_ENTRY: Dict[str, Any] = dict.fromkeys(HISTORY_FIELDS)
_ENTRY_FLOATS = ("started_at", "finished_at", "retry_at")

_isfinite = math.isfinite
_float_repr = float.__repr__
_NO_INFO: Mapping[str, Any] = {}
assert INFO_FIELDS == ("queue", "kind", "task", "name", "eta", "created_at")

#: Longest ``repr()`` kept for a result that is not JSON.
REPR_LIMIT = 1000
#: Longest error message or reason kept (characters).
MESSAGE_LIMIT = 4000
#: Longest traceback kept; its *end* is kept, where the error is.
TRACEBACK_LIMIT = 20000
#: Most keys kept in an error mapping besides type, message and traceback.
ERROR_EXTRA_LIMIT = 10


# -- argument checks ---------------------------------------------------------


def check_task_id(task_id: Any) -> None:
    """Refuse a task id that is empty, not a ``str``, or not encodable as UTF-8."""
    if type(task_id) is str and task_id and task_id.isascii():
        return  # the common case, cheaply
    if not isinstance(task_id, str) or not task_id:
        raise TypeError(f"task_id must be a non-empty str, not {task_id!r}")
    try:
        task_id.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"task_id {task_id!r} cannot be encoded as UTF-8")


_NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,200}$")


def check_name(name: Any) -> None:
    """A unique task name: a short string of the id alphabet."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"a unique name must be 1-200 characters of A-Z a-z 0-9 _ . : -, "
                         f"not {name!r}")


def _check_time(name: str, value: Any, optional: bool = False) -> None:
    if type(value) is float:
        if _isfinite(value):
            return
    elif value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number of epoch seconds, not {value!r}")


def _check_attempt(attempt: Any, minimum: int) -> None:
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < minimum:
        raise ValueError(f"attempt must be an int >= {minimum}, not {attempt!r}")


def _fine_time(value: Any) -> bool:
    """Whether ``value`` is ``None`` or a finite float (the common, cheap case)."""
    return value is None or (type(value) is float and _isfinite(value))


def _check_info(info: Any) -> None:
    if type(info) is dict and _fine_time(info.get("eta")) and _fine_time(info.get("created_at")):
        return
    if info is not None and not isinstance(info, Mapping):
        raise TypeError(f"info must be a mapping, not {type(info).__name__}")
    for name in ("eta", "created_at"):
        _check_time(f"info[{name!r}]", (info or {}).get(name), optional=True)


def check_enqueued(task_id: Any, state: Any, info: Any, at: Any) -> None:
    """Raise ``TypeError``/``ValueError`` if an ``enqueued`` write is malformed."""
    check_task_id(task_id)
    if state not in (QUEUED, SCHEDULED):
        raise ValueError(f"enqueued state must be {QUEUED!r} or {SCHEDULED!r}, not {state!r}")
    _check_info(info)
    _check_time("at", at)


def check_started(task_id: Any, attempt: Any, worker: Any, info: Any, at: Any) -> None:
    """Raise ``TypeError``/``ValueError`` if a ``started`` write is malformed."""
    if (task_id.__class__ is str and task_id and task_id.isascii()
            and attempt.__class__ is int and attempt >= 1
            and (worker is None or worker.__class__ is str)
            and at.__class__ is float and _isfinite(at)
            and info.__class__ is dict and _fine_time(info.get("eta"))
            and _fine_time(info.get("created_at"))):
        return  # the common case, cheaply
    check_task_id(task_id)
    _check_attempt(attempt, 1)
    if worker is not None and not isinstance(worker, str):
        raise TypeError(f"worker must be a str, not {worker!r}")
    _check_info(info)
    _check_time("at", at)


def check_finished(
    task_id: Any,
    state: Any,
    attempt: Any,
    info: Any,
    at: Any,
    error: Any = None,
    reason: Any = None,
    retry_at: Any = None,
) -> None:
    """Raise ``TypeError``/``ValueError`` if a ``finished`` write is malformed."""
    if (task_id.__class__ is str and task_id and task_id.isascii()
            and state in OUTCOME_STATES and attempt.__class__ is int and attempt >= 0
            and at.__class__ is float and _isfinite(at)
            and retry_at is None and error is None and reason is None
            and info.__class__ is dict and _fine_time(info.get("eta"))
            and _fine_time(info.get("created_at"))):
        return  # the common case (a success), cheaply
    check_task_id(task_id)
    if state not in OUTCOME_STATES:
        raise ValueError(f"finished state must be one of {sorted(OUTCOME_STATES)}, not {state!r}")
    _check_attempt(attempt, 0)
    _check_info(info)
    _check_time("at", at)
    _check_time("retry_at", retry_at, optional=True)
    if error is not None and not isinstance(error, Mapping):
        raise TypeError(f"error must be a mapping or None, not {type(error).__name__}")
    if reason is not None and not isinstance(reason, str):
        raise TypeError(f"reason must be a str or None, not {reason!r}")


def check_list(state: Any, queue: Any, limit: Any, offset: Any) -> None:
    """Raise ``TypeError``/``ValueError`` for ``list()`` arguments that make no sense."""
    if state is not None and state not in STATES:
        raise ValueError(f"state must be one of {list(STATES)} or None, not {state!r}")
    if queue is not None and not isinstance(queue, str):
        raise TypeError(f"queue must be a str or None, not {queue!r}")
    for name, value in (("limit", limit), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, not {value!r}")


#: Seconds a finished record is kept by default, by outcome: succeeded
#: records are the bulk and rarely read after an hour; failures and
#: cancellations are what people come back to look at.
DEFAULT_RETENTION: Mapping[str, float] = {
    "succeeded": 3600.0,
    "failed": 7 * 24 * 3600.0,
    "canceled": 7 * 24 * 3600.0,
}


def retention(finished_ttl: Any = None, by_outcome: Optional[Mapping[str, Any]] = None
              ) -> Dict[str, float]:
    """
    Seconds a finished record is kept, by outcome (``succeeded``,
    ``failed``, ``canceled``; 0: forever): what ``by_outcome`` says, else
    ``finished_ttl`` for every outcome, else :data:`DEFAULT_RETENTION`.
    Raises ``ValueError`` for an unknown outcome or a value that is not a
    number >= 0.
    """
    def seconds(value: Any, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, Real) or not value >= 0 \
                or math.isinf(value):
            raise ValueError(f"{what} must be a number of seconds >= 0, not {value!r}")
        return float(value)

    if finished_ttl is None:
        kept = dict(DEFAULT_RETENTION)
    else:
        default = seconds(finished_ttl, "finished_ttl")
        kept = {state: default for state in FINISHED_STATES}
    for state, value in (by_outcome or {}).items():
        if state not in FINISHED_STATES:
            raise ValueError(f"retention is set by outcome ({', '.join(sorted(FINISHED_STATES))}),"
                             f" not for {state!r}")
        kept[state] = seconds(value, f"retention of {state} records")
    return kept


# -- values ------------------------------------------------------------------


def text(value: Any, limit: Optional[int] = None, keep_end: bool = False) -> Optional[str]:
    """
    ``value`` as a ``str`` that UTF-8 can encode (lone surrogates become
    ``?``), cut to ``limit`` characters (its end when ``keep_end``).
    """
    if value is None:
        return None
    if type(value) is str and (limit is None or len(value) <= limit) and value.isascii():
        return value
    value = str(value)
    if limit is not None and len(value) > limit:
        value = value[-limit:] if keep_end else value[:limit]
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def _time(value: Any) -> Optional[float]:
    return None if value is None else float(value)


def to_json(value: Any) -> str:
    """
    The JSON text stored for a task result; never raises.

    A value JSON cannot represent (an object, ``NaN``, a cycle, a mapping
    with non-string keys...) is stored as ``{"repr": repr(value)[:1000]}`` so
    that recording an outcome never fails because of what a task returned.
    """
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, OverflowError, RecursionError):
        try:
            shown = repr(value)
        except Exception as e:  # a broken __repr__ must not lose the outcome
            shown = f"<unrepresentable {type(value).__name__}: {type(e).__name__}>"
        return json.dumps({"repr": text(shown, REPR_LIMIT)}, separators=(",", ":"))


def json_value(value: Any) -> Any:
    """The result as it will be read back: a fresh JSON value (see :func:`to_json`)."""
    kind = type(value)
    if value is None or kind is bool or kind is str or (kind is int and -2**53 < value < 2**53):
        return value  # (what the round trip gives back: the common results, at no cost)
    return json.loads(to_json(value))


def normalize_error(error: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Optional[str]]]:
    """
    An error mapping as stored: ``type``, ``message`` and ``traceback``
    always present (``None`` where missing), other keys (such as ``field``
    for a refused message, at most ``ERROR_EXTRA_LIMIT`` of them) kept; every
    value a string or ``None``, long texts truncated.
    """
    if error is None:
        return None
    normalized = {
        "type": text(error.get("type"), MESSAGE_LIMIT),
        "message": text(error.get("message"), MESSAGE_LIMIT),
        "traceback": text(error.get("traceback"), TRACEBACK_LIMIT, keep_end=True),
    }
    extras = [key for key in error if key not in normalized][:ERROR_EXTRA_LIMIT]
    for key in extras:
        normalized[text(key, 100)] = text(error[key], MESSAGE_LIMIT)  # type: ignore[index]
    return normalized


def plain_info(info: Any) -> Optional[tuple]:
    """
    ``(queue, kind, task, name, eta, created_at)`` of ``info`` when they
    are already as a record keeps them (short ASCII strings, floats or
    ``None``: the common case, checked cheaply); ``None`` otherwise, for
    :func:`normalize_info` to clean.
    """
    if info.__class__ is not dict:
        return None
    get = info.get
    queue, kind, task, name = get("queue"), get("kind"), get("task"), get("name")
    eta, created_at = get("eta"), get("created_at")
    if (queue.__class__ is str and kind.__class__ is str and task.__class__ is str
            and (name is None or name.__class__ is str)
            and len(queue) <= MESSAGE_LIMIT and len(kind) <= MESSAGE_LIMIT
            and len(task) <= MESSAGE_LIMIT and len(name or "") <= MESSAGE_LIMIT
            and (queue + kind + task + (name or "")).isascii()
            and (eta is None or eta.__class__ is float)
            and (created_at is None or created_at.__class__ is float)):
        return queue, kind, task, name, eta, created_at
    return None


def normalize_info(info: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The ``INFO_FIELDS`` of ``info`` with their record types (missing ones ``None``)."""
    get = (info or _NO_INFO).get
    eta, created_at = get("eta"), get("created_at")
    return {
        "queue": text(get("queue"), MESSAGE_LIMIT),
        "kind": text(get("kind"), MESSAGE_LIMIT),
        "task": text(get("task"), MESSAGE_LIMIT),
        "name": text(get("name"), MESSAGE_LIMIT),
        "eta": None if eta is None else float(eta),
        "created_at": None if created_at is None else float(created_at),
    }


_time_reprs: Dict[float, str] = {}


def _time_repr(value: float) -> str:
    """``repr`` of a float, remembered: a task's info times are written twice or more."""
    text = _time_reprs.get(value) if value else None  # (0.0 == -0.0, but not their reprs)
    if text is None:
        text = _float_repr(value)
        if value:
            if len(_time_reprs) >= 4096:
                _time_reprs.clear()
            _time_reprs[value] = text
    return text


def info_strings(info: Optional[Mapping[str, Any]]) -> List[Optional[str]]:
    """
    ``[queue, kind, task, name, eta, created_at]`` of ``info`` as Redis hash
    values (cleaned strings; times as the exact ``repr`` of their float),
    ``None`` where missing.
    """
    plain = plain_info(info)
    if plain is not None:
        queue, kind, task, name, eta, created_at = plain
        return [queue, kind, task, name,
                None if eta is None else _time_repr(eta),
                None if created_at is None else _time_repr(created_at)]
    get = (info or _NO_INFO).get
    eta, created_at = get("eta"), get("created_at")
    return [
        text(get("queue"), MESSAGE_LIMIT),
        text(get("kind"), MESSAGE_LIMIT),
        text(get("task"), MESSAGE_LIMIT),
        text(get("name"), MESSAGE_LIMIT),
        None if eta is None else _float_repr(float(eta)),
        None if created_at is None else _float_repr(float(created_at)),
    ]


# -- what each writer does ---------------------------------------------------


def new_record(task_id: str, info: Optional[Mapping[str, Any]], at: float) -> Dict[str, Any]:
    """A record for a task never seen before; a writer then applies its changes."""
    record: Dict[str, Any] = dict.fromkeys(RECORD_FIELDS)
    record.update(normalize_info(info))
    record["id"] = task_id
    record["attempts"] = 0
    record["created_at"] = record["created_at"] if record["created_at"] is not None else float(at)
    record["updated_at"] = float(at)
    record["history"] = []
    return record


def info_updates(info: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The info fields a write sets on an existing record: those it knows."""
    normalized = normalize_info(info)
    return {name: normalized[name] for name in MUTABLE_INFO_FIELDS if normalized[name] is not None}


def enqueued_changes(state: str, at: float) -> Dict[str, Any]:
    """Fields ``enqueued`` sets on the record it creates."""
    return {"state": state, "updated_at": float(at)}


def started_is_stale(record: Mapping[str, Any], attempt: int) -> bool:
    """
    Whether a ``started`` write must not apply: a later attempt started,
    or this one did (running, or its outcome recorded).  A replayed or
    timed-out write must never rewind a record, and a second copy of the
    task must not start the same attempt again (``DUPLICATE``).
    """
    attempts = record.get("attempts") or 0
    return attempts > attempt or (attempts == attempt and (
        record.get("state") in OUTCOME_STATES or record.get("state") == RUNNING))


def started_changes(attempt: int, worker: Optional[str], at: float) -> Dict[str, Any]:
    """
    Fields ``started`` sets (``None`` clears): the outcome of a previous
    attempt (result, error, reason, finished_at) no longer describes the
    task; it stays in that attempt's history entry.
    """
    return {
        "state": RUNNING,
        "attempts": attempt,
        "worker": text(worker, MESSAGE_LIMIT),
        "started_at": float(at),
        "updated_at": float(at),
        "finished_at": None,
        "result": None,
        "error": None,
        "reason": None,
    }


def finished_changes(
    state: str,
    at: float,
    result: Any,
    error: Optional[Mapping[str, Any]],
    reason: Optional[str],
    retry_at: Optional[float],
) -> Dict[str, Any]:
    """
    Fields ``finished`` sets (``None`` clears).  ``attempts`` is not among
    them: it becomes ``max(attempts, attempt)``, which needs the stored value.
    """
    changes = {
        "state": state,
        "updated_at": float(at),
        "finished_at": float(at) if state in FINISHED_STATES else None,
        "result": json_value(result),
        "error": normalize_error(error),
        "reason": text(reason, MESSAGE_LIMIT),
    }
    if state == SCHEDULED:
        changes["eta"] = _time(retry_at)
    return changes


def started_entry(attempt: int, worker: Optional[str], at: float) -> Dict[str, Any]:
    """The history entry of an attempt that starts (it replaces any for that attempt)."""
    entry = dict(_EMPTY_ENTRY)
    entry.update(
        attempt=attempt, state=RUNNING, worker=text(worker, MESSAGE_LIMIT), started_at=float(at)
    )
    return entry


def outcome_entry(
    attempt: int,
    state: str,
    at: float,
    error: Optional[Mapping[str, Any]],
    retry_at: Optional[float],
) -> Dict[str, Any]:
    """
    What ``finished`` merges into the history entry of ``attempt`` (the
    entry is created, without worker and start time, if the attempt never
    started).
    """
    return {
        "attempt": attempt,
        "state": state,
        "finished_at": float(at),
        "error": normalize_error(error),
        "retry_at": _time(retry_at),
    }


def upsert_history(
    history: List[Dict[str, Any]], attempt: int, fields: Mapping[str, Any], replace: bool
) -> List[Dict[str, Any]]:
    """
    A new history list (sorted by attempt, one entry per attempt) with
    ``fields`` replacing (``replace``) or merged into the entry of
    ``attempt``, keeping the latest ``HISTORY_LIMIT`` entries.

    The Redis scripts implement the same rule in Lua; keep them in step.
    """
    history = [dict(entry) for entry in history]
    for index, entry in enumerate(history):
        if entry["attempt"] == attempt:
            if replace:
                history[index] = {**_EMPTY_ENTRY, **fields}
            else:
                entry.update(fields)
            break
        if entry["attempt"] > attempt:
            history.insert(index, {**_EMPTY_ENTRY, **fields})
            break
    else:
        history.append({**_EMPTY_ENTRY, **fields})
    return history[-HISTORY_LIMIT:]


# -- Redis hash form ---------------------------------------------------------


def _decode_entry(entry: Mapping[str, Any]) -> Dict[str, Any]:
    decoded = {**_EMPTY_ENTRY, **entry}
    decoded["attempt"] = int(decoded["attempt"])
    for name in _ENTRY_FLOATS:
        decoded[name] = _time(decoded[name])
    return decoded


#: The ``history`` of a record whose one entry its own fields describe (see
#: ``DERIVED`` in :mod:`quebert.state._redis_scripts`).
DERIVED_HISTORY = "{}"


def derived_entry(record: Mapping[str, Any]) -> Dict[str, Any]:
    """The one history entry of a record whose ``history`` is ``DERIVED_HISTORY``."""
    scheduled = record["state"] == SCHEDULED
    return {
        "attempt": record["attempts"],
        "state": record["state"],
        "worker": record["worker"],
        "started_at": record["started_at"],
        "finished_at": record["updated_at"] if scheduled else record["finished_at"],
        "error": record["error"],
        "retry_at": record["eta"] if scheduled else None,
    }


#: Longest JSON text of a task's arguments kept in its record by default.
ARGUMENTS_LIMIT = 2048


def arguments_text(args: Any, kwargs: Any, context: Any,
                   limit: int = ARGUMENTS_LIMIT) -> Optional[str]:
    """
    What a record keeps of a task's arguments, for people looking at it
    (the console, ``quebert status``): the JSON text of ``{"args",
    "kwargs", "context"}``, or when that is longer than ``limit``
    characters ``{"truncated": true, "size": N, "preview": "<its start>"}``.
    ``None`` when ``limit`` is 0 (nothing kept).  Never raises.
    """
    if not limit:
        return None
    value = {"args": list(args or ()), "kwargs": dict(kwargs or {})}
    if context:
        value["context"] = dict(context)
    text = to_json(value)
    if len(text) <= limit:
        return text
    return json.dumps({"truncated": True, "size": len(text), "preview": text[:limit]},
                      separators=(",", ":"))


def info_with_arguments(message: Any, limit: int = ARGUMENTS_LIMIT) -> Dict[str, Any]:
    """
    A :class:`~quebert.protocol.TaskMessage`'s record info fields, with
    ``arguments`` (:func:`arguments_text`) when ``limit`` allows: a call
    task's args, kwargs and context, a URL task's url and method (never its
    headers nor its body, which may carry what only the target should see).
    """
    info = message.info()
    if limit:
        if message.kind == "url":
            args, kwargs = (), {"url": message.url, "method": message.method}
        else:
            args, kwargs = message.args, message.kwargs
        info["arguments"] = arguments_text(args, kwargs, message.context, limit)
    return info


def decode_record(fields: Mapping[str, Any]) -> Dict[str, Any]:
    """A record (module docstring of the interface) from the fields of its hash."""
    record: Dict[str, Any] = {}
    derived = fields.get("history") == DERIVED_HISTORY
    for name in RECORD_FIELDS:
        value = fields.get(name)
        if value is None or (derived and name == "history"):
            record[name] = None
        elif name in FLOAT_FIELDS:
            record[name] = float(value)
        elif name in INT_FIELDS:
            record[name] = int(value)
        elif name in JSON_FIELDS:
            record[name] = json.loads(value)
        else:
            record[name] = str(value)
    record["attempts"] = record["attempts"] or 0
    if record["finished_at"] is None and record["state"] in FINISHED_STATES:
        # not stored since the one-index layout: no write changes a finished
        # record's updated_at
        record["finished_at"] = record["updated_at"]
    if derived:
        record["history"] = [derived_entry(record)]
    else:
        # cjson writes an empty Lua table as an object
        record["history"] = [_decode_entry(entry) for entry in record["history"] or ()]
    stalled = decode_stalled(fields)
    if stalled is not None:
        record["stalled"] = stalled
    arguments = fields.get("arguments")
    if arguments is not None:
        record["arguments"] = json.loads(arguments)
    return record


#: Hash fields the reactor-stall watchdog writes (:mod:`quebert.watchdog`)
#: on the record of each task running when it killed its worker.
STALLED_FIELDS = ("stalled_attempt", "stalled_at", "stalled_for", "stalled_culprit")


def decode_stalled(fields: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """
    The latest stall mark of a record's hash as ``{"attempt", "at", "for",
    "culprit"}`` (``culprit``: ``True``, ``False`` or ``None`` for unknown),
    or ``None`` when there is none or it cannot be read.  Written outside
    the state store's scripts by a dying worker, so it is never trusted to
    be well formed: a bad mark is ignored, never an error.
    """
    if fields.get("stalled_at") is None:
        return None
    try:
        attempt = int(fields["stalled_attempt"])
        at = float(fields["stalled_at"])
        stalled_for = float(fields["stalled_for"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (_isfinite(at) and _isfinite(stalled_for)):
        return None
    culprit = {"1": True, "0": False}.get(str(fields.get("stalled_culprit") or ""))
    return {"attempt": attempt, "at": at, "for": stalled_for, "culprit": culprit}


def longest(kept: Mapping[str, float]) -> float:
    """The longest of a retention by outcome (0, forever, when one is 0)."""
    return 0.0 if 0 in kept.values() else max(kept.values())
