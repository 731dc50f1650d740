# -*- test-case-name: tests.test_protocol,tests.test_legacy -*-
"""
The wire protocol: what a task looks like on the broker.

(Over 700 lines: producers in other languages read this module as the
specification, so every field's encoding and check stays in it.)

A task message is a JSON object (``content_type: application/json``,
``delivery_mode: 2``, ``message_id`` = task id).  Version 1::

    {
      "version": 1,
      "id": "5f0c...",               # unique task id (string)
      "kind": "call",                # "call" or "url"
      "task": "app.tasks.add",       # registered task name (kind "call")
      "args": [1, 2],
      "kwargs": {},
      "queue": "default",            # work queue the task belongs to
      "eta": 1767225600.0,           # optional: not before (epoch seconds)
      "name": null,                  # optional unique name
      "retry": {"max_attempts": 5},  # optional RetryPolicy overrides
      "timeout": 30.0,               # optional: seconds per attempt
      "context": {"db_id": "db"},    # optional: plain data about where it came from
      "created_at": 1767225590.0
    }

A ``url`` task (an HTTP request the worker makes, App Engine push-queue
style) has no ``task``/``args``/``kwargs`` but::

      "url": "https://example.com/hook",
      "method": "POST",              # default POST
      "headers": {"Content-Type": "application/json"},
      "body": "text or base64",      # default ""
      "body_encoding": "utf-8",      # or "base64" for arbitrary bytes
      "dispatch_deadline": 600.0     # optional: seconds the request may take

Unknown keys are ignored so that the format can grow.  Run-time bookkeeping
(how many attempts were made, when the first one started) travels in AMQP
headers, because the body of a task never changes between attempts.

The worker also accepts the body that guillotina_amqp publishes (no
``version``, a ``func``): :func:`decode` hands a body without a
``version`` to the decoders registered with
:func:`register_unversioned_decoder`, which :mod:`quebert.legacy` (built on
this module, and imported by the ``quebert`` package so that it is always
registered) does for that format, keeping only its plain, non-secret data.

This module only converts; it never imports anything a message names.
"""

from __future__ import annotations

import base64
import binascii
import json
import json.scanner
import math
import re
import time
import uuid
from typing import Any, Callable, Mapping, Optional
from urllib.parse import urlsplit

import attrs

from quebert.errors import InvalidMessage, SerializationError
from quebert.retry import RETRY_FIELDS

VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
CONTENT_TYPE = "application/json"
CALL = "call"
URL = "url"
KINDS = frozenset({CALL, URL})
#: HTTP methods a URL task may use.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Longest URL accepted in a URL task.
MAX_URL_LENGTH = 8192
#: Task name recorded for URL tasks (their ``task`` field in the state store).
URL_TASK = "quebert.url"
#: Seconds one attempt of a URL task may take on the wire unless its
#: message (``dispatch_deadline``), its queue or the worker's configuration
#: says (Cloud Tasks' default).
DEFAULT_DISPATCH_DEADLINE = 600.0
#: ``TaskMessage.origin`` of version-1 bodies (guillotina_amqp ones have
#: :data:`quebert.legacy.GUILLOTINA`).
QUEBERT = "quebert"
#: Most keys a task's ``context`` may have.
MAX_CONTEXT_KEYS = 50
#: Largest ``context``, in bytes of the compact JSON :func:`dumps` writes.
MAX_CONTEXT_SIZE = 8192

#: AMQP header: attempts made (started) before this delivery.
H_ATTEMPTS = "x-quebert-attempts"
#: AMQP header: epoch milliseconds (integer) when the first attempt started.
H_FIRST_ATTEMPT = "x-quebert-first-attempt-ms"
#: AMQP header: epoch milliseconds (integer) before which the task must not run.
H_NOT_BEFORE = "x-quebert-not-before-ms"
#: AMQP header: work queue a delayed or errored copy belongs to.
H_QUEUE = "x-quebert-queue"
#: AMQP headers on errored copies and retries.
H_ERROR_TYPE = "x-quebert-error-type"
H_ERROR_MESSAGE = "x-quebert-error-message"
H_REASON = "x-quebert-reason"
#: AMQP header on a URL task's retry: the previous attempt's HTTP status (0: none).
H_PREVIOUS_RESPONSE = "x-quebert-previous-response"
#: AMQP header on a requeued task: attempts made before it was requeued (its
#: retry budget counts from there).
H_ATTEMPT_BASE = "x-quebert-attempt-base"
#: AMQP header on a redelivered message put aside while a live worker
#: finishes its attempt: how many times it was put aside.
H_PARKED = "x-quebert-parked"
#: AMQP header on a URL task: attempts that got an HTTP answer so far.
H_EXECUTIONS = "x-quebert-executions"
#: AMQP header set by quorum queues: deliveries returned to the queue.
H_DELIVERY_COUNT = "x-delivery-count"

# Checked with ``fullmatch``, never ``match``: ``$`` also matches before a
# final newline, so ``match`` lets "abc\n" through.  The patterns keep their
# ``^...$`` (not ``\Z``) because the OpenAPI document publishes them, and
# ECMA-262 regexes have no ``\Z``.
_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,200}$")
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,100}$")
_BAD_HEADER_VALUE = re.compile(r"[\r\n\x00]")
#: What a URL may not hold: whitespace (``\s`` is ``str.isspace``: the same
#: CPython test, Unicode included) or NUL.
_SPACE_OR_NUL = re.compile(r"[\s\x00]")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:\-]{0,199}$")
QUEUE_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.:\-]{0,99}$")


def new_task_id() -> str:
    """A fresh random task id."""
    return uuid.uuid4().hex


# Not slotted: a frozen attrs class with a ``__dict__`` is built about twice
# as fast, and :func:`_validate`'s fast path builds one with a single dict.
@attrs.frozen(slots=False)
class TaskMessage:
    """One task as read from (or written to) the broker."""

    id: str
    task: str
    queue: str
    args: tuple = ()
    kwargs: Mapping[str, Any] = attrs.field(factory=dict)
    kind: str = "call"
    eta: Optional[float] = None
    name: Optional[str] = None
    retry: Mapping[str, Any] = attrs.field(factory=dict)
    timeout: Optional[float] = None
    created_at: Optional[float] = None
    #: "quebert" for version-1 bodies, "guillotina" for guillotina_amqp ones.
    origin: str = QUEBERT
    #: Plain data about where the task was enqueued from (string keys,
    #: JSON scalar values): the body's ``context``; for a guillotina_amqp
    #: body its ``db_id``, ``container_id``, ``user_id`` and ``path``.
    context: Mapping[str, Any] = attrs.field(factory=dict)
    #: URL tasks: the request to make.
    url: Optional[str] = None
    method: str = "POST"
    headers: Mapping[str, str] = attrs.field(factory=dict)
    body: bytes = b""
    dispatch_deadline: Optional[float] = None

    def to_body(self) -> dict:
        """The JSON-ready body of this message."""
        body: dict[str, Any] = {"version": VERSION, "id": self.id, "kind": self.kind}
        if self.kind == URL:
            body.update(url=self.url, method=self.method, headers=dict(self.headers),
                        dispatch_deadline=self.dispatch_deadline)
            try:
                body["body"] = self.body.decode("utf-8")
                body["body_encoding"] = "utf-8"
            except UnicodeDecodeError:
                body["body"] = base64.b64encode(self.body).decode("ascii")
                body["body_encoding"] = "base64"
        else:
            body.update(task=self.task, args=list(self.args), kwargs=dict(self.kwargs))
        body.update({
            "queue": self.queue,
            "eta": self.eta,
            "name": self.name,
            "retry": dict(self.retry) or None,
            "timeout": self.timeout,
            "created_at": self.created_at,
        })
        if self.context:
            body["context"] = dict(self.context)
        return body

    def info(self) -> dict:
        """The metadata the state store keeps about this task."""
        return {
            "queue": self.queue,
            "kind": self.kind,
            "task": self.task,
            "name": self.name,
            "eta": self.eta,
            "created_at": self.created_at,
        }


def dumps(value: Any) -> bytes:
    """Strict JSON encoding: no NaN, no arbitrary objects."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")


def build(
    task: str,
    args: tuple = (),
    kwargs: Optional[Mapping[str, Any]] = None,
    *,
    queue: str,
    task_id: Optional[str] = None,
    eta: Optional[float] = None,
    name: Optional[str] = None,
    retry: Optional[Mapping[str, Any]] = None,
    timeout: Optional[float] = None,
    now: Optional[float] = None,
    context: Optional[Mapping[str, Any]] = None,
) -> tuple[TaskMessage, bytes]:
    """
    Build a validated call task and its encoded body.

    Raises :class:`SerializationError` when the arguments are not JSON, and
    :class:`InvalidMessage` when an option is malformed (``context``
    included, see :func:`check_context`), so that producers fail at the
    call rather than in a worker.
    """
    kwargs = dict(kwargs or {})
    context = check_context(_copy(context)) if context is not None else {}
    message = TaskMessage(
        id=task_id or new_task_id(),
        task=task,
        queue=queue,
        args=tuple(args),
        kwargs=kwargs,
        eta=eta,
        name=name,
        retry=dict(retry or {}),
        timeout=timeout,
        created_at=time.time() if now is None else now,
        context=context,
    )
    body = message.to_body()
    try:
        encoded = dumps(body)
    except (TypeError, ValueError) as e:
        raise SerializationError(
            f"arguments of task {task!r} cannot be sent as JSON: {e}"
        ) from e
    # Round-trip through the decoder so producers and workers agree.
    _validate(json.loads(encoded))
    return message, encoded


def build_url(
    url: str,
    *,
    method: str = "POST",
    headers: Optional[Mapping[str, str]] = None,
    body: Any = b"",
    queue: str,
    task_id: Optional[str] = None,
    eta: Optional[float] = None,
    name: Optional[str] = None,
    retry: Optional[Mapping[str, Any]] = None,
    dispatch_deadline: Optional[float] = None,
    now: Optional[float] = None,
    context: Optional[Mapping[str, Any]] = None,
) -> tuple[TaskMessage, bytes]:
    """
    Build a validated URL task and its encoded body.

    ``body`` may be ``bytes`` or ``str`` (sent UTF-8 encoded), or a JSON
    value (``dict``/``list``), which is sent as JSON with a
    ``Content-Type: application/json`` header unless one is given.
    Raises :class:`InvalidMessage` naming the field at fault.  ``context``
    travels with the task as for :func:`build` (the request does not carry
    it).
    """
    headers = dict(headers or {})
    context = check_context(_copy(context)) if context is not None else {}
    if isinstance(body, (dict, list)):
        try:
            body = dumps(body)
        except (TypeError, ValueError) as e:
            raise SerializationError(f"URL task body cannot be sent as JSON: {e}") from e
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = CONTENT_TYPE
    elif isinstance(body, str):
        body = body.encode("utf-8")
    elif body is None:
        body = b""
    elif not isinstance(body, bytes):
        raise SerializationError(
            f"URL task body must be bytes, str or a JSON object/array, not {type(body).__name__}")
    message = TaskMessage(
        id=task_id or new_task_id(), task=url_task_name(str(method).upper(), str(url)),
        queue=queue, kind=URL, eta=eta, name=name, retry=dict(retry or {}),
        created_at=time.time() if now is None else now, url=url,
        method=str(method).upper(), headers=headers, body=body,
        dispatch_deadline=dispatch_deadline, context=context,
    )
    try:
        encoded = dumps(message.to_body())
    except (TypeError, ValueError) as e:
        raise SerializationError(f"URL task cannot be sent as JSON: {e}") from e
    _validate(json.loads(encoded))
    return message, encoded


def decode(
    body: bytes,
    content_type: Optional[str] = None,
    default_queue: str = "default",
    max_size: Optional[int] = None,
) -> TaskMessage:
    """
    Decode and validate a message body.

    Raises :class:`InvalidMessage` with a reason naming the field at fault.
    A body without a ``version`` goes to the registered unversioned
    decoders (:func:`register_unversioned_decoder`): one with a ``func`` is
    read as a guillotina_amqp task (:func:`quebert.legacy.decode_guillotina`).
    """
    if max_size is not None and len(body) > max_size:
        raise InvalidMessage(
            f"message body is {len(body)} bytes, larger than the {max_size} byte limit",
            field="body",
        )
    if content_type and content_type != CONTENT_TYPE and content_type.split(";")[
            0].strip().lower() not in (CONTENT_TYPE, "text/json"):
        raise InvalidMessage(
            f"content type {content_type!r} is not supported (use {CONTENT_TYPE})",
            field="content_type",
        )
    data = _scan_object(body)
    if data is None:
        try:
            data = json.loads(_text(body))
        except ValueError as e:
            raise InvalidMessage(f"message body is not JSON: {e}", field="body")
        except RecursionError:
            raise InvalidMessage("message body is JSON nested too deeply to read", field="body")
    if not isinstance(data, dict):
        raise InvalidMessage(
            f"message body must be a JSON object, not {type(data).__name__}", field="body"
        )
    if "version" not in data:
        for decoder in _UNVERSIONED_DECODERS.values():
            message = decoder(data, default_queue)
            if message is not None:
                return message
    return _validate(data, default_queue)


#: Readers of bodies in another format than this one (no ``version``),
#: by the name of that format: see :func:`register_unversioned_decoder`.
_UNVERSIONED_DECODERS: dict[str, Callable[[dict, str], Optional[TaskMessage]]] = {}


def register_unversioned_decoder(
    name: str, decoder: Callable[[dict, str], Optional[TaskMessage]],
) -> None:
    """
    Have :func:`decode` try ``decoder(data, default_queue)`` on bodies
    without a ``version``: it returns the :class:`TaskMessage` of a body in
    its format, ``None`` for a body in another one (which the next decoder,
    and at last the version check, get), or raises :class:`InvalidMessage`.

    A format is registered by the module that reads it (as
    :mod:`quebert.legacy` registers guillotina_amqp's), so that this module
    depends on none of them; registering a ``name`` again replaces its
    decoder.
    """
    _UNVERSIONED_DECODERS[name] = decoder


_scan_once = json.scanner.make_scanner(json.JSONDecoder())


def _text(body: Any) -> str:
    """
    The body as text: UTF-8 only (``json.loads`` would also take UTF-16
    and UTF-32, which the protocol does not allow); a leading byte order
    mark is ignored, as RFC 8259 lets a reader do.
    """
    if isinstance(body, str):
        return body
    body = bytes(body)
    if b"\x00" in body:  # (never in JSON text: a NUL must be written \u0000)
        raise InvalidMessage("message body has NUL bytes: not UTF-8 JSON (UTF-16 or UTF-32?)",
                             field="body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidMessage(f"message body is not UTF-8 text ({e.reason} at byte {e.start})",
                             field="body") from None
    return text[1:] if text[:1] == "\ufeff" else text


def _scan_object(body: Any) -> Optional[dict]:
    """
    The common body, a JSON object in UTF-8 without surrounding whitespace,
    read by the scanner ``json.loads`` uses without the checks around it;
    ``None`` for anything else (errors included), which ``json.loads`` then
    reads or explains.
    """
    if type(body) is not bytes or body[:1] != b"{":
        return None
    try:
        text = body.decode("utf-8")
        data, end = _scan_once(text, 0)
    except Exception:
        return None
    if end != len(text) or type(data) is not dict:
        return None
    return data


def _task_id_of(data: Mapping[str, Any]) -> Optional[str]:
    value = data.get("id", data.get("task_id"))
    if isinstance(value, str) and _ID_RE.fullmatch(value):
        return value
    return None


def _number(data: Mapping[str, Any], key: str, task_id: Optional[str]) -> Optional[float]:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidMessage(
            f"{key!r} must be a number, not {value!r}", field=key, task_id=task_id
        )
    if value < 0:
        raise InvalidMessage(f"{key!r} must be >= 0, not {value!r}", field=key, task_id=task_id)
    return float(value)


_new = object.__new__
_set_dict = object.__setattr__
_INF = math.inf


def _validate(data: Mapping[str, Any], default_queue: str = "default") -> TaskMessage:
    """The :class:`TaskMessage` of a decoded version-1 body, or ``InvalidMessage``."""
    # Fast path: a call body as build() writes it, with no optional field
    # set but created_at.  Anything else takes the full checks below, which
    # also name what is wrong; what passes here passes there, unchanged.
    get = data.get
    version, task_id, name, args, kwargs, created_at, context = (
        get("version"), get("id"), get("task"), get("args"), get("kwargs"), get("created_at"),
        get("context"))
    queue = get("queue") or default_queue
    if (version.__class__ is int and version == 1
            and task_id.__class__ is str and _ID_RE.fullmatch(task_id)
            and get("kind", CALL) == CALL
            and name.__class__ is str and _NAME_RE.fullmatch(name)
            and args.__class__ is list and kwargs.__class__ is dict
            and queue.__class__ is str and QUEUE_RE.fullmatch(queue)
            and get("name") is None and get("retry") is None and get("timeout") is None
            and get("eta") is None
            and (created_at is None
                 or (created_at.__class__ is float and 0.0 <= created_at < _INF))
            and (context is None or context.__class__ is dict)):
        # (a context is checked here, where its errors are the full path's)
        context = check_context(context, task_id) if context else {}
        message = _new(TaskMessage)
        _set_dict(message, "__dict__", {
            "id": task_id, "task": name, "queue": queue, "args": tuple(args),
            "kwargs": kwargs, "kind": CALL, "eta": None, "name": None, "retry": {},
            "timeout": None, "created_at": created_at, "origin": QUEBERT, "context": context,
            "url": None, "method": "POST", "headers": {}, "body": b"",
            "dispatch_deadline": None,
        })
        return message
    return _validate_fully(data, default_queue)


def _validate_fully(data: Mapping[str, Any], default_queue: str = "default") -> TaskMessage:
    task_id = _task_id_of(data)
    version = data.get("version")
    if version is None:
        raise InvalidMessage("missing field 'version'", field="version", task_id=task_id)
    supported = ", ".join(map(str, sorted(SUPPORTED_VERSIONS)))
    if not isinstance(version, (int, float)) or isinstance(version, bool):
        raise InvalidMessage(
            f"'version' must be an integer (supported: {supported}), not "
            f"{type(version).__name__} {version!r}",
            field="version",
            task_id=task_id,
        )
    if version not in SUPPORTED_VERSIONS:
        raise InvalidMessage(
            f"protocol version {version!r} is not supported (supported: {supported})",
            field="version",
            task_id=task_id,
        )
    raw_id = data.get("id")
    if raw_id is None:
        raise InvalidMessage("missing field 'id'", field="id")
    if task_id is None:
        raise InvalidMessage(
            f"'id' must be 1-200 characters of A-Z a-z 0-9 _ . : -, not {raw_id!r}", field="id"
        )
    kind = data.get("kind", "call")
    if not isinstance(kind, str) or kind not in KINDS:
        raise InvalidMessage(
            f"task kind {kind!r} is not supported (supported: {', '.join(sorted(KINDS))})",
            field="kind",
            task_id=task_id,
        )
    if kind == URL:
        request = _validate_request(data, task_id)
        name, args, kwargs = url_task_name(request["method"], request["url"]), [], {}
    else:
        request = {}
        name = data.get("task")
        if name is None:
            raise InvalidMessage("missing field 'task'", field="task", task_id=task_id)
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise InvalidMessage(
                f"'task' must be a registered task name, not {name!r}", field="task",
                task_id=task_id)
        args = data.get("args", [])
        if args is None:
            args = []
        if not isinstance(args, list):
            raise InvalidMessage(
                f"'args' must be a JSON array, not {type(args).__name__}", field="args",
                task_id=task_id)
        kwargs = data.get("kwargs", {})
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, dict):
            raise InvalidMessage(
                f"'kwargs' must be a JSON object, not {type(kwargs).__name__}",
                field="kwargs",
                task_id=task_id,
            )
    queue = data.get("queue") or default_queue
    if not isinstance(queue, str) or not QUEUE_RE.fullmatch(queue):
        raise InvalidMessage(f"'queue' is not a valid queue name: {queue!r}", field="queue",
                             task_id=task_id)
    unique = data.get("name")
    if unique is not None and (not isinstance(unique, str) or not _ID_RE.fullmatch(unique)):
        raise InvalidMessage(
            f"'name' must be 1-200 characters of A-Z a-z 0-9 _ . : -, not {unique!r}",
            field="name",
            task_id=task_id,
        )
    retry = data.get("retry") or {}
    if retry:
        _validate_retry(retry, task_id)
    timeout = _number(data, "timeout", task_id)
    if timeout == 0:
        timeout = None
    context = data.get("context")
    context = check_context(context, task_id) if context is not None else {}
    return TaskMessage(
        id=task_id,
        task=name,
        queue=queue,
        args=tuple(args),
        kwargs=kwargs,
        kind=kind,
        eta=_number(data, "eta", task_id),
        name=unique,
        retry=retry,
        timeout=timeout,
        created_at=_number(data, "created_at", task_id),
        context=context,
        **request,
    )


def check_context(context: Any, task_id: Optional[str] = None) -> dict:
    """
    ``context`` checked (a copy, as a dict), or :class:`InvalidMessage`
    naming the field at fault.

    A context is a JSON object of at most :data:`MAX_CONTEXT_KEYS` keys, each
    a name (a letter or ``_``, then up to 199 of ``A-Z a-z 0-9 _ . : -``),
    whose values are JSON scalars (string, finite number, boolean, null) and
    whose compact JSON is at most :data:`MAX_CONTEXT_SIZE` bytes.  Scalars
    only, so that it stays plain data: read-only all the way down once it is
    wrapped in a mapping proxy (see :func:`quebert.current_task`), and
    small enough to travel with every copy of the task.
    """
    if context.__class__ is not dict:
        if not isinstance(context, Mapping):
            raise InvalidMessage(
                f"'context' must be a JSON object, not {type(context).__name__}",
                field="context", task_id=task_id)
        context = dict(context)
    if len(context) > MAX_CONTEXT_KEYS:
        raise InvalidMessage(
            f"'context' has {len(context)} keys, more than the {MAX_CONTEXT_KEYS} allowed",
            field="context", task_id=task_id)
    for key, value in context.items():
        if key.__class__ is not str or not _NAME_RE.fullmatch(key):
            raise InvalidMessage(
                f"'context' keys must be names (a letter or _, then up to 199 of A-Z a-z 0-9 "
                f"_ . : -), not {str(key)[:100]!r}", field="context", task_id=task_id)
        if value is None or value.__class__ in _CONTEXT_SCALARS:
            if value.__class__ is float and not math.isfinite(value):
                raise InvalidMessage(f"'context.{key}' must be a finite number, not {value!r}",
                                     field=f"context.{key}", task_id=task_id)
            continue
        raise InvalidMessage(
            f"'context.{key}' must be a string, number, boolean or null, not "
            f"{type(value).__name__}", field=f"context.{key}", task_id=task_id)
    size = len(dumps(context))
    if size > MAX_CONTEXT_SIZE:
        raise InvalidMessage(
            f"'context' is {size} bytes of JSON, more than the {MAX_CONTEXT_SIZE} allowed",
            field="context", task_id=task_id)
    return context


_CONTEXT_SCALARS = frozenset({str, int, float, bool})


def _copy(value: Any) -> Any:
    """A producer's mapping copied (its later changes must not reach the task)."""
    return dict(value) if isinstance(value, Mapping) else value


def _validate_request(data: Mapping[str, Any], task_id: Optional[str]) -> dict:
    """The request fields of a URL task, validated (the guardrails come at dispatch)."""
    url = data.get("url")
    if url is None:
        raise InvalidMessage("missing field 'url'", field="url", task_id=task_id)
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise InvalidMessage(f"'url' must be a URL of at most {MAX_URL_LENGTH} characters",
                             field="url", task_id=task_id)
    parts = urlsplit_safe(url)
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidMessage(f"'url' must be an absolute http or https URL, not {url[:200]!r}",
                             field="url", task_id=task_id)
    if _SPACE_OR_NUL.search(url):
        raise InvalidMessage("'url' must not contain whitespace or control characters",
                             field="url", task_id=task_id)
    method = data.get("method")
    if method is None:
        method = "POST"
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise InvalidMessage(
            f"'method' must be one of {', '.join(sorted(METHODS))}, not {method!r}",
            field="method", task_id=task_id)
    headers = data.get("headers")
    if headers is None:
        headers = {}
    if not isinstance(headers, dict):
        raise InvalidMessage("'headers' must be a JSON object of strings", field="headers",
                             task_id=task_id)
    for key, value in headers.items():
        if not _TOKEN_RE.fullmatch(key):
            raise InvalidMessage(f"header name {key[:100]!r} is not a valid HTTP token",
                                 field=f"headers.{key[:100]}", task_id=task_id)
        if not isinstance(value, str) or _BAD_HEADER_VALUE.search(value):
            raise InvalidMessage(
                f"header {key!r} must be a string without CR, LF or NUL",
                field=f"headers.{key}", task_id=task_id)
    text = data.get("body")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise InvalidMessage("'body' must be a string (text, or base64 with "
                             "body_encoding 'base64')", field="body", task_id=task_id)
    encoding = data.get("body_encoding") or "utf-8"
    if encoding == "base64":
        try:
            body = base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise InvalidMessage("'body' is not valid base64", field="body", task_id=task_id)
    elif encoding in ("utf-8", "utf8", "text"):
        body = text.encode("utf-8", "surrogatepass")
    else:
        raise InvalidMessage(f"'body_encoding' must be 'utf-8' or 'base64', not {encoding!r}",
                             field="body_encoding", task_id=task_id)
    deadline = _number(data, "dispatch_deadline", task_id)
    return {"url": url, "method": method.upper(), "headers": dict(headers), "body": body,
            "dispatch_deadline": deadline or None}


def urlsplit_safe(url: str) -> Any:
    """``urllib.parse.urlsplit`` or ``None`` for what it cannot parse (bad ports...)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        return None
    return parts


def url_task_name(method: str, url: str) -> str:
    """What a URL task is listed as: method and URL without credentials or query."""
    parts = urlsplit_safe(url)
    if parts is None:
        return f"{method} ?"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{method} {parts.scheme}://{host}{parts.path}"[:200]


def _validate_retry(retry: Any, task_id: str) -> None:
    if not isinstance(retry, dict):
        raise InvalidMessage("'retry' must be a JSON object", field="retry", task_id=task_id)
    unknown = set(retry) - set(RETRY_FIELDS)
    if unknown:
        raise InvalidMessage(
            f"unknown retry option(s): {', '.join(sorted(unknown))}",
            field="retry",
            task_id=task_id,
        )
    for key, value in retry.items():
        if key != "max_attempts":
            try:
                number = _number(retry, key, task_id)
            except InvalidMessage as e:
                raise InvalidMessage(e.reason.replace(f"{key!r}", f"'retry.{key}'"),
                                     field=f"retry.{key}", task_id=task_id)
            if key == "jitter" and number is not None and number > 1:
                raise InvalidMessage(f"'retry.jitter' must be between 0 and 1, not {value!r}",
                                     field="retry.jitter", task_id=task_id)
        if key == "max_attempts" and (
            isinstance(value, bool) or not isinstance(value, int) or value == 0 or value < -1
        ):
            raise InvalidMessage(
                f"'retry.max_attempts' must be -1 or a positive integer, not {value!r}",
                field="retry.max_attempts",
                task_id=task_id,
            )


#: Headers RabbitMQ sets itself.  They must not be copied into a republished
#: message: the broker drops a message that is dead-lettered through a queue
#: its ``x-death`` already names (cycle detection), which would silently
#: lose a task on its second pass through the delay queues.
BROKER_HEADERS = frozenset({
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    H_DELIVERY_COUNT,
})


def republish_headers(headers: Optional[Mapping[str, Any]], **updates: Any) -> dict:
    """
    The headers for a copy of a message: the producer's headers, without
    the broker's own, with ``updates`` applied.
    """
    result = {k: v for k, v in (headers or {}).items() if k not in BROKER_HEADERS}
    result.update(updates)
    return result


def int_header(headers: Optional[Mapping[str, Any]], key: str, default: int = 0) -> int:
    """Read an integer header defensively (producers in other languages)."""
    if not headers:
        return default
    value = headers.get(key)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        return max(int(value), 0) if value is not None else default
    except (TypeError, ValueError):
        return default


def to_ms(seconds: float) -> int:
    """Epoch seconds as the integer milliseconds time headers carry."""
    return int(round(seconds * 1000))


def time_header(headers: Optional[Mapping[str, Any]], key: str) -> Optional[float]:
    """Read an epoch-milliseconds header as epoch seconds; ``None`` if absent or bad."""
    value = _float_header(headers, key)
    return None if value is None else value / 1000.0


def _float_header(headers: Optional[Mapping[str, Any]], key: str) -> Optional[float]:
    if not headers:
        return None
    value = headers.get(key)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        result = float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
    if result is not None and not math.isfinite(result):
        return None
    return result
