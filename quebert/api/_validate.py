# -*- test-case-name: tests.test_api -*-
"""
Strict checks of what HTTP clients send, before anything reaches the backend.

Everything here raises :class:`~quebert.api._errors.ApiError` (400,
``invalid_field``) naming the field at fault, dotted for nested ones
(``retry.max_attempts``, ``headers.X-Foo``).  Unknown fields are refused
rather than ignored: a misspelt option (``"countdwon": 60``) silently
ignored would run the task at the wrong time.

The limits and patterns are module constants so that
:mod:`quebert.api.openapi` describes exactly what is enforced here.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import math
import re
from typing import Any, Dict, List, Mapping, Optional
from urllib.parse import parse_qsl, urlsplit

import attrs

from quebert import protocol
from quebert.api._errors import invalid
from quebert.errors import InvalidMessage
from quebert.retry import RETRY_FIELDS
from quebert.state.interface import STATES

#: Patterns (same text as the wire protocol's, matched in full here).
TASK_NAME_PATTERN = protocol._NAME_RE.pattern
ID_PATTERN = protocol._ID_RE.pattern
QUEUE_PATTERN = protocol.QUEUE_RE.pattern
#: RFC 7230 token: what an HTTP method or header name may be made of.
TOKEN_PATTERN = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$"
#: RFC 3339 date-time (``T`` or space, ``Z`` or an offset).
RFC3339_PATTERN = (
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
)

_TASK_NAME = re.compile(TASK_NAME_PATTERN)
_ID = re.compile(ID_PATTERN)
_QUEUE = re.compile(QUEUE_PATTERN)
_TOKEN = re.compile(TOKEN_PATTERN)
_RFC3339 = re.compile(RFC3339_PATTERN)
#: Header values: printable ASCII, spaces and tabs.  No CR, LF, NUL or other
#: control character, which could split or smuggle headers; non-ASCII text
#: must be encoded by the client (RFC 8187), as HTTP has no charset for it.
HEADER_VALUE_PATTERN = r"^[\t\x20-\x7e]*$"
_HEADER_VALUE = re.compile(HEADER_VALUE_PATTERN)

#: Longest countdown, in seconds (ten years: beyond that it is a mistake).
MAX_COUNTDOWN = 10 * 365 * 86400
#: Latest ETA accepted, in epoch seconds (9999-12-31T23:59:59Z).
MAX_EPOCH = 253402300799
#: Largest timeout or dispatch deadline, in seconds (one day).
MAX_TIMEOUT = 86400
#: Largest value of a float retry option (seconds), and of an int one.
MAX_RETRY_SECONDS = 10 * 365 * 86400
MAX_RETRY_INT = 2**31 - 1
MAX_URL_LENGTH = 8192
MAX_METHOD_LENGTH = 32
MAX_HEADERS = 100
MAX_HEADER_NAME = 256
MAX_HEADER_VALUE = 8192
#: Headers the worker sets itself when it makes the request.
FORBIDDEN_HEADERS = frozenset({
    "connection",
    "content-length",
    "host",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
})
URL_SCHEMES = ("http", "https")

#: A task's context: at most this many keys, named like tasks, JSON scalar
#: values, at most this many bytes of JSON (the wire protocol's limits).
MAX_CONTEXT_KEYS = protocol.MAX_CONTEXT_KEYS
MAX_CONTEXT_SIZE = protocol.MAX_CONTEXT_SIZE
CONTEXT_KEY_PATTERN = protocol._NAME_RE.pattern

#: Integer retry options; the others are seconds (``jitter`` a fraction).
RETRY_INTS = frozenset({"max_attempts", "max_doublings"})

MAX_LIST_LIMIT = 1000
DEFAULT_LIST_LIMIT = 100
MAX_LIST_OFFSET = 2**31 - 1

COMMON_FIELDS = ("kind", "queue", "countdown", "eta", "name", "retry", "context")
CALL_FIELDS = COMMON_FIELDS + ("task", "args", "kwargs", "timeout")
URL_FIELDS = COMMON_FIELDS + (
    "url", "method", "headers", "body", "body_base64", "dispatch_deadline",
)
KINDS = ("call", "url")
LIST_PARAMETERS = ("state", "queue", "task", "limit", "offset")


@attrs.frozen
class NewTask:
    """A validated ``POST /tasks`` body: which service method, with what."""

    kind: str
    #: keyword arguments of ``add_task`` or ``add_url_task``
    arguments: Mapping[str, Any]


@attrs.frozen
class ListQuery:
    """Validated ``GET /tasks`` parameters."""

    state: Optional[str] = None
    queue: Optional[str] = None
    limit: int = DEFAULT_LIST_LIMIT
    offset: int = 0
    #: Only tasks of this name; ``offset`` is then a position to go on from.
    task: Optional[str] = None


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _number(
    value: Any,
    field: str,
    *,
    minimum: float = 0,
    maximum: float,
    exclusive_minimum: bool = False,
    integer: bool = False,
) -> float:
    if integer:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON has one number type: 3.0 is the integer 3
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(field, f"{field} must be an integer, not {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or (
        isinstance(value, float) and not math.isfinite(value)
    ):
        # (math.isfinite of a huge int overflows: ints are bounded below instead)
        raise invalid(field, f"{field} must be a finite number, not {_type_name(value)}")
    if value < minimum or (exclusive_minimum and value == minimum):
        relation = ">" if exclusive_minimum else ">="
        raise invalid(field, f"{field} must be {relation} {minimum}, not {value!r}")
    if value > maximum:
        raise invalid(field, f"{field} must be <= {maximum}, not {value!r}")
    return value


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise invalid(field, f"{field} must be a string, not {_type_name(value)}")
    return value


def _matching(value: Any, field: str, pattern: re.Pattern, what: str) -> str:
    _string(value, field)
    if not pattern.fullmatch(value):
        raise invalid(field, f"{field} must be {what}, not {value!r}")
    return value


def _eta(value: Any) -> float:
    if isinstance(value, str):
        if not _RFC3339.fullmatch(value):
            raise invalid("eta", f"eta must be epoch seconds or an RFC 3339 date-time, not "
                                 f"{value!r}")
        text = value.upper().replace(" ", "T").replace("Z", "+00:00")
        # fromisoformat takes at most microseconds: cut a finer fraction.
        text = re.sub(r"(\.\d{6})\d+", r"\1", text)
        try:
            moment = datetime.datetime.fromisoformat(text)
        except ValueError:
            raise invalid("eta", f"eta is not a valid date-time: {value!r}")
        try:
            epoch = moment.timestamp()
        except (OverflowError, ValueError):
            raise invalid("eta", f"eta is out of range: {value!r}")
        return float(_number(epoch, "eta", maximum=MAX_EPOCH))
    return float(_number(value, "eta", maximum=MAX_EPOCH))


def _retry(value: Any) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid("retry", f"retry must be an object, not {_type_name(value)}")
    retry: Dict[str, Any] = {}
    for key, option in value.items():
        field = f"retry.{key}"
        if key not in RETRY_FIELDS:
            raise invalid(field, f"unknown retry option {key!r} (known: "
                                 f"{', '.join(RETRY_FIELDS)})")
        if option is None:
            continue
        if key == "max_attempts":
            option = int(_number(option, field, minimum=-1, maximum=MAX_RETRY_INT,
                                 integer=True))
            if option == 0:
                raise invalid(field, "retry.max_attempts must be -1 (unlimited) or >= 1, not 0")
        elif key in RETRY_INTS:
            option = int(_number(option, field, maximum=MAX_RETRY_INT, integer=True))
        elif key == "jitter":
            option = float(_number(option, field, maximum=1))
        else:
            option = float(_number(option, field, maximum=MAX_RETRY_SECONDS))
        retry[key] = option
    low, high = retry.get("min_backoff"), retry.get("max_backoff")
    if low is not None and high is not None and high < low:
        raise invalid("retry.max_backoff",
                      f"retry.max_backoff ({high}) must be >= retry.min_backoff ({low})")
    return retry


def _context(value: Any) -> Dict[str, Any]:
    """The wire protocol's own check (:func:`quebert.protocol.check_context`)."""
    if not isinstance(value, dict):
        raise invalid("context", f"context must be an object, not {_type_name(value)}")
    try:
        return protocol.check_context(value)
    except InvalidMessage as e:
        raise invalid(e.field, e.reason) from None


def _url(value: Any) -> str:
    _string(value, "url")
    if len(value) > MAX_URL_LENGTH:
        raise invalid("url", f"url is longer than {MAX_URL_LENGTH} characters")
    if not value.isascii() or not value.isprintable() or " " in value:
        raise invalid("url", "url must be printable ASCII without spaces "
                             "(percent-encode anything else)")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        raise invalid("url", f"url is not a valid URL: {e}")
    if parts.scheme.lower() not in URL_SCHEMES or not parts.hostname:
        raise invalid("url", f"url must be an absolute http:// or https:// URL, not {value!r}")
    return value


def _headers(value: Any) -> Dict[str, str]:
    if not isinstance(value, dict):
        raise invalid("headers", f"headers must be an object, not {_type_name(value)}")
    if len(value) > MAX_HEADERS:
        raise invalid("headers", f"at most {MAX_HEADERS} headers may be given")
    seen = set()
    for name, header in value.items():
        field = f"headers.{name}"
        if len(name) > MAX_HEADER_NAME or not _TOKEN.fullmatch(name):
            raise invalid(field, f"header name {name!r} is not an HTTP token")
        lowered = name.lower()
        if lowered in FORBIDDEN_HEADERS:
            raise invalid(field, f"header {name!r} is set by the worker and cannot be given")
        if lowered in seen:
            raise invalid(field, f"header {name!r} is given twice (names are case-insensitive)")
        seen.add(lowered)
        _string(header, field)
        if len(header) > MAX_HEADER_VALUE:
            raise invalid(field, f"{field} is longer than {MAX_HEADER_VALUE} characters")
        if not _HEADER_VALUE.fullmatch(header):
            raise invalid(field, f"{field} must not contain CR, LF or other control characters")
    return dict(value)


def _body(data: Mapping[str, Any]) -> bytes:
    if data.get("body") is not None and data.get("body_base64") is not None:
        raise invalid("body_base64", "give either body or body_base64, not both")
    if data.get("body") is not None:
        text = _string(data["body"], "body")
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            raise invalid("body", "body is not encodable as UTF-8 (lone surrogate)")
    if data.get("body_base64") is not None:
        text = _string(data["body_base64"], "body_base64")
        try:
            return base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise invalid("body_base64", "body_base64 is not valid base64")
    return b""


def new_task(data: Any) -> NewTask:
    """Check a decoded ``POST /tasks`` body; raise ``ApiError`` naming the field at fault."""
    if not isinstance(data, dict):
        raise invalid(None, f"the request body must be a JSON object, not {_type_name(data)}")
    kind = data.get("kind")
    if kind is None:
        raise invalid("kind", "kind is required: 'call' or 'url'")
    if kind not in KINDS:
        raise invalid("kind", f"kind must be 'call' or 'url', not {kind!r}")
    allowed = CALL_FIELDS if kind == "call" else URL_FIELDS
    for key in data:
        if key not in allowed:
            raise invalid(key, f"unknown field {key!r} for a {kind!r} task (allowed: "
                               f"{', '.join(allowed)})")
    arguments: Dict[str, Any] = {}
    get = data.get
    if get("queue") is not None:
        arguments["queue"] = _matching(get("queue"), "queue", _QUEUE,
                                       "a queue name (1-100 of A-Z a-z 0-9 _ . : -)")
    if get("countdown") is not None and get("eta") is not None:
        raise invalid("eta", "give either countdown or eta, not both")
    if get("countdown") is not None:
        arguments["countdown"] = float(_number(get("countdown"), "countdown",
                                               maximum=MAX_COUNTDOWN))
    if get("eta") is not None:
        arguments["eta"] = _eta(get("eta"))
    if get("name") is not None:
        arguments["name"] = _matching(get("name"), "name", _ID,
                                      "1-200 characters of A-Z a-z 0-9 _ . : -")
    if get("retry") is not None:
        arguments["retry"] = _retry(get("retry"))
    if get("context") is not None:
        arguments["context"] = _context(get("context"))
    if kind == "call":
        if get("task") is None:
            raise invalid("task", "task is required for a 'call' task")
        arguments["task"] = _matching(get("task"), "task", _TASK_NAME, "a task name")
        args = get("args")
        if args is not None and not isinstance(args, list):
            raise invalid("args", f"args must be an array, not {_type_name(args)}")
        kwargs = get("kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise invalid("kwargs", f"kwargs must be an object, not {_type_name(kwargs)}")
        for key in kwargs or ():
            if key.startswith("_"):
                # Client.add_task reads _-prefixed keywords as options.
                raise invalid(f"kwargs.{key}", "keyword argument names must not start with '_'")
        arguments["args"] = list(args or [])
        arguments["kwargs"] = dict(kwargs or {})
        if get("timeout") is not None:
            arguments["timeout"] = float(_number(get("timeout"), "timeout", maximum=MAX_TIMEOUT,
                                                 exclusive_minimum=True))
        return NewTask("call", arguments)
    if get("url") is None:
        raise invalid("url", "url is required for a 'url' task")
    arguments["url"] = _url(get("url"))
    method = get("method")
    if method is not None:
        _string(method, "method")
        if len(method) > MAX_METHOD_LENGTH or not _TOKEN.fullmatch(method):
            raise invalid("method", f"method must be an HTTP method token, not {method!r}")
        arguments["method"] = method
    if get("headers") is not None:
        arguments["headers"] = _headers(get("headers"))
    arguments["body"] = _body(data)
    if get("dispatch_deadline") is not None:
        arguments["dispatch_deadline"] = float(_number(
            get("dispatch_deadline"), "dispatch_deadline", maximum=MAX_TIMEOUT,
            exclusive_minimum=True))
    return NewTask("url", arguments)


def task_query(query: bytes, max_wait: float) -> float:
    """
    Check the query string of ``GET /tasks/{id}``: the seconds to wait for
    the task to finish (``wait``, 0 to ``max_wait``; 0 when not given).
    """
    try:
        pairs = parse_qsl(query.decode("utf-8"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise invalid(None, "the query string is not valid UTF-8")
    wait = [value for key, value in pairs if key == "wait"]
    for key, _ in pairs:
        if key != "wait":
            raise invalid(key, f"unknown query parameter {key!r} (known: wait)")
    if not wait:
        return 0.0
    if len(wait) > 1:
        raise invalid("wait", "query parameter 'wait' is given more than once")
    text = wait[0]
    try:
        seconds = float(text) if text.isascii() and len(text) <= 20 else None
    except ValueError:
        seconds = None
    if seconds is None or not math.isfinite(seconds):
        raise invalid("wait", f"wait must be a number of seconds, not {text[:50]!r}")
    if not 0 <= seconds <= max_wait:
        raise invalid("wait", f"wait must be between 0 and {max_wait:g} seconds, not {text!r}")
    return seconds


def _query_int(values: List[str], name: str, minimum: int, maximum: int) -> int:
    (text,) = values
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise invalid(name, f"{name} must be an integer, not {text!r}")
    number = int(text)
    if not minimum <= number <= maximum:
        raise invalid(name, f"{name} must be between {minimum} and {maximum}, not {number}")
    return number


def list_query(query: bytes) -> ListQuery:
    """Check the query string of ``GET /tasks``."""
    try:
        pairs = parse_qsl(query.decode("utf-8"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise invalid(None, "the query string is not valid UTF-8")
    values: Dict[str, List[str]] = {}
    for key, value in pairs:
        values.setdefault(key, []).append(value)
    for key, given in values.items():
        if key not in LIST_PARAMETERS:
            raise invalid(key, f"unknown query parameter {key!r} (known: "
                               f"{', '.join(LIST_PARAMETERS)})")
        if len(given) > 1:
            raise invalid(key, f"query parameter {key!r} is given more than once")
    state = queue = None
    if "state" in values:
        state = values["state"][0]
        if state not in STATES:
            raise invalid("state", f"state must be one of {', '.join(STATES)}, not {state!r}")
    if "queue" in values:
        queue = _matching(values["queue"][0], "queue", _QUEUE, "a queue name")
    task = None
    if "task" in values:
        task = _matching(values["task"][0], "task", _TASK_NAME, "a task name")
    limit = DEFAULT_LIST_LIMIT
    if "limit" in values:
        limit = _query_int(values["limit"], "limit", 1, MAX_LIST_LIMIT)
    offset = 0
    if "offset" in values:
        offset = _query_int(values["offset"], "offset", 0, MAX_LIST_OFFSET)
    return ListQuery(state=state, queue=queue, limit=limit, offset=offset, task=task)


def path_id(value: str) -> bool:
    """Whether ``value`` can be a task id (anything else cannot exist: 404)."""
    return bool(_ID.fullmatch(value))


def path_queue(value: str) -> bool:
    """Whether ``value`` can be a queue name."""
    return bool(_QUEUE.fullmatch(value))
