# -*- test-case-name: tests.test_legacy,tests.test_mediator_guillotina -*-
"""
The guillotina_amqp format: reading what existing Guillotina producers
publish, and never passing on what they should not have put in it.

guillotina_amqp publishes to a direct durable exchange with the queue name
as routing key, no content type and no headers, a JSON body without a
``version``::

    {
      "func": "guillotina_app.tasks.reindex",   # dotted path of the function
      "args": [], "kwargs": {"full": true},
      "task_id": "task:db-site-7e5c...",
      "req_data": {"url": ..., "method": ..., "headers": {"Authorization": ...},
                   "user": {"id": ..., "roles": ..., "groups": ...}},
      "db_id": "db", "container_id": "site",
      "user": ..., "annotations": {...}
    }

:func:`quebert.protocol.decode` hands such a body (:func:`is_guillotina`)
to :func:`decode_guillotina`, which this module registers with it
(:func:`quebert.protocol.register_unversioned_decoder`) when it is imported;
the ``quebert`` package imports it, so every process that decodes messages
reads this format.  It makes the body a task of the queue it came from,
with ``origin`` :data:`GUILLOTINA`:

* kept: ``task_id`` (the task id), ``func`` (a name looked up in the
  worker's registry, aliases included, **never imported**), ``args``,
  ``kwargs``, and as the task's ``context`` only plain data
  (:func:`guillotina_context`): ``db_id``, ``container_id``, the user's id
  and the request's path, each at most :data:`MAX_LEGACY_VALUE` bytes of
  JSON;
* dropped, at decode, before any hook or task sees the message:
  ``req_data`` (its headers carry the caller's ``Authorization`` and
  cookies, its ``user`` the roles, groups and token), the top-level
  ``user`` object, ``annotations`` and any other key.

The credentials rule: no credential of a guillotina_amqp body leaves the
worker.  So the worker never republishes such a body as received: every
copy (a retry, a re-delay, an errored copy, a copy put aside) is the
task's version-1 body, and a body refused before it could be decoded is
reduced to :data:`LEGACY_KEPT_KEYS` (:func:`copy_body`).  The contract is
``docs/protocol.rst``, "guillotina_amqp messages".

Data flows one way: this module builds on :mod:`quebert.protocol` (its
message class and validation helpers, and the registration of decoders)
and imports nothing that runs tasks; ``protocol`` does not import it.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

from quebert.errors import InvalidMessage
from quebert.protocol import (
    _ID_RE,
    _NAME_RE,
    CONTENT_TYPE,
    QUEBERT,
    TaskMessage,
    dumps,
    register_unversioned_decoder,
    urlsplit_safe,
)

#: ``TaskMessage.origin`` of a guillotina_amqp body.
GUILLOTINA = "guillotina"
#: Largest value kept from a guillotina_amqp body into ``context``, in bytes
#: of JSON (the four kept values then always fit in
#: :data:`quebert.protocol.MAX_CONTEXT_SIZE`).
MAX_LEGACY_VALUE = 2000
#: The only keys of a guillotina_amqp body a refused copy keeps: its
#: ``req_data`` (request headers, with the caller's ``Authorization``),
#: ``user`` and ``annotations`` never leave the worker.
LEGACY_KEPT_KEYS = ("task_id", "func", "args", "kwargs", "db_id", "container_id")


def is_guillotina(data: Any) -> bool:
    """Whether decoded JSON is a guillotina_amqp body (``func``, no ``version``)."""
    return isinstance(data, dict) and "version" not in data and "func" in data


def decode_guillotina(data: Mapping[str, Any], default_queue: str) -> TaskMessage:
    """
    A guillotina_amqp body as a task of the queue it came from.  ``func``
    is a name for the registry (aliases included), never imported; the
    context keeps only :func:`guillotina_context`'s plain data.
    """
    task_id = data.get("task_id")
    if not isinstance(task_id, str) or not _ID_RE.fullmatch(task_id):
        raise InvalidMessage(
            f"guillotina task: 'task_id' must be an id string, not {task_id!r}", field="task_id"
        )
    func = data.get("func")
    if not isinstance(func, str) or not _NAME_RE.fullmatch(func):
        raise InvalidMessage(
            f"guillotina task: 'func' must be a task name, not {func!r}",
            field="func",
            task_id=task_id,
        )
    args = data.get("args") or []
    kwargs = data.get("kwargs") or {}
    if not isinstance(args, list):
        raise InvalidMessage("guillotina task: 'args' must be a JSON array", field="args",
                             task_id=task_id)
    if not isinstance(kwargs, dict):
        raise InvalidMessage("guillotina task: 'kwargs' must be a JSON object", field="kwargs",
                             task_id=task_id)
    return TaskMessage(
        id=task_id,
        task=func,
        queue=default_queue,
        args=tuple(args),
        kwargs=kwargs,
        origin=GUILLOTINA,
        context=guillotina_context(data, task_id),
    )


def _decode_unversioned(data: Mapping[str, Any], default_queue: str) -> Optional[TaskMessage]:
    """:func:`decode_guillotina` for a guillotina_amqp body, ``None`` for any other."""
    if "func" not in data:  # (is_guillotina: decode() has checked the rest)
        return None
    return decode_guillotina(data, default_queue)


register_unversioned_decoder(GUILLOTINA, _decode_unversioned)


def guillotina_context(data: Mapping[str, Any], task_id: Optional[str] = None) -> dict:
    """
    The plain, non-secret data of a guillotina_amqp body: ``db_id``,
    ``container_id``, ``user_id`` (``req_data.user.id``, else a top-level
    ``user`` string or ``user.id``) and ``path`` (``req_data.url``'s path:
    no scheme, host, credentials, query or fragment).  Nothing else of
    ``req_data`` (its headers carry the caller's ``Authorization``), no
    ``user`` object, no ``annotations``.

    Missing or ``null`` values are left out.  A ``db_id`` or
    ``container_id`` that is not a string, or any kept value longer than
    :data:`MAX_LEGACY_VALUE` bytes of JSON, is :class:`InvalidMessage`
    (the task would otherwise run without the scope it names).
    """
    context: dict[str, Any] = {}
    for key in ("db_id", "container_id"):
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidMessage(f"guillotina task: {key!r} must be a string, not "
                                 f"{type(value).__name__}", field=key, task_id=task_id)
        context[key] = value
    req_data = data.get("req_data")
    req_data = req_data if isinstance(req_data, dict) else {}
    user = req_data.get("user")
    user_id = _user_id(user) if isinstance(user, dict) else None
    if user_id is None:
        user_id = _user_id(data.get("user"))
    if user_id is not None:
        context["user_id"] = user_id
    url = req_data.get("url")
    if isinstance(url, str):
        parts = urlsplit_safe(url)
        if parts is not None and parts.path:
            context["path"] = parts.path
    for key, value in context.items():
        if len(dumps(value)) > MAX_LEGACY_VALUE:
            field = "req_data.url" if key == "path" else key
            raise InvalidMessage(
                f"guillotina task: {field!r} is longer than {MAX_LEGACY_VALUE} bytes of JSON",
                field=field, task_id=task_id)
    return context


def _user_id(user: Any) -> Optional[str]:
    """A user id from a guillotina ``user``: the string itself, or an object's ``id``."""
    if isinstance(user, dict):
        user = user.get("id")
    return user if isinstance(user, str) and user else None


def copy_body(message: Optional[TaskMessage], body: bytes,
              content_type: Optional[str]) -> tuple[bytes, Optional[str]]:
    """
    What a copy of a received message carries (a retry, a re-delay, an
    errored copy): ``(body, content_type)``.

    A version-1 body is copied as received.  A guillotina_amqp body never
    is: it may carry the request's ``Authorization`` header and user
    (``req_data``), which must not spread to delay and errored queues.  Its
    copy is the version-1 body of ``message`` (same id, task, arguments,
    plain context), or, when it could not be decoded (``message`` is
    ``None``), the body reduced to :data:`LEGACY_KEPT_KEYS`.
    """
    if message is not None:
        if message.origin == QUEBERT:
            return body, content_type
        return dumps(message.to_body()), CONTENT_TYPE
    try:
        data = json.loads(body)
    except (ValueError, TypeError, RecursionError):
        return body, content_type
    if not is_guillotina(data):
        return body, content_type
    kept = {k: data[k] for k in LEGACY_KEPT_KEYS if k in data}
    # (json.loads reads NaN and Infinity, which dumps refuses: keep them as read)
    return json.dumps(kept, separators=(",", ":")).encode("utf-8"), CONTENT_TYPE
