# -*- test-case-name: tests.test_mediator,tests.test_mediator_url -*-
"""
What the copies the mediator publishes carry.

Every outcome but success publishes a copy of the message before the
original is acked: a retry (into the delay queues), an errored copy, a
re-delay of an early task, a parked copy (:mod:`quebert._redelivery`).
Each function here returns a copy's ``(body, headers, content_type)``: the
producer's headers without the broker's own, plus what the next reader of
the copy needs (attempts so far, the error, the reason).  The body is the
one received, except a guillotina_amqp body's (see
:func:`quebert.legacy.copy_body`).  Also :func:`error_info`, the ``error``
record the state store keeps.
"""

from __future__ import annotations

import traceback
from typing import TYPE_CHECKING, Any, Dict, Optional

from twisted.python.failure import Failure

from quebert import legacy, protocol
from quebert.errors import DispatchError, InvalidMessage, Reject
from quebert.protocol import (
    H_ATTEMPTS,
    H_ERROR_MESSAGE,
    H_ERROR_TYPE,
    H_EXECUTIONS,
    H_FIRST_ATTEMPT,
    H_NOT_BEFORE,
    H_PARKED,
    H_PREVIOUS_RESPONSE,
    H_QUEUE,
    H_REASON,
    TaskMessage,
)

if TYPE_CHECKING:
    from quebert.mediator import Task

__all__ = ["error_info", "retry_copy", "errored_copy", "refused_copy", "delayed_copy",
           "parked_copy"]

#: A copy's body, headers and content type.
Copy = tuple[bytes, dict, Optional[str]]

_HEADER_TEXT_LIMIT = 1000


def error_info(failure: Failure) -> dict:
    """
    The ``error`` record of a failure: type, message, traceback; for a URL
    task's failed request also the answer's status, timing and body prefix.
    """
    exc = failure.value
    if isinstance(exc, (DispatchError, Reject)):
        tb = None  # the message says it all; the stack is quebert's own
    elif getattr(exc, "remote_traceback", None):
        tb = exc.remote_traceback[-8000:]  # a process task's, from its pool process
    else:
        try:
            tb = failure.getTraceback()[-8000:]
        except Exception:
            tb = "".join(traceback.format_exception_only(type(exc), exc))
    error = {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": tb,
    }
    if isinstance(exc, DispatchError):
        for key in ("status", "elapsed", "body"):
            value = exc.response.get(key)
            if value is not None:
                error[key if key != "body" else "response_body"] = value
    return error


def _failed_attempt_headers(task: Task, failure: Failure, error: dict,
                            **more: Any) -> Dict[str, Any]:
    """The headers of a copy of ``task`` after its failed attempt (``error``: its record)."""
    headers = protocol.republish_headers(task.delivery.headers, **{
        H_ATTEMPTS: task.attempt,
        H_FIRST_ATTEMPT: protocol.to_ms(task.first_attempt_at),
        H_QUEUE: task.queue,
        H_ERROR_TYPE: error["type"],
        H_ERROR_MESSAGE: _header_text(error["message"]),
    }, **more)
    _count_response(headers, failure)
    return headers


def retry_copy(task: Task, failure: Failure, error: dict) -> Copy:
    """The copy that retries ``task`` after its failed attempt (``error``: its record)."""
    headers = _failed_attempt_headers(task, failure, error)
    headers.pop(H_NOT_BEFORE, None)
    return _with_body(task.message, task.delivery, headers)


def errored_copy(task: Task, failure: Failure, error: dict, reason: str) -> Copy:
    """The copy of ``task`` for its errored queue, once it failed for good."""
    headers = _failed_attempt_headers(task, failure, error, **{H_REASON: _header_text(reason)})
    return _with_body(task.message, task.delivery, headers)


def refused_copy(delivery: Any, error: InvalidMessage,
                 message: Optional[TaskMessage]) -> Copy:
    """
    The errored copy of a message that can never run; ``message`` is the
    decoded message when decoding succeeded.
    """
    reason = error.reason
    headers = protocol.republish_headers(delivery.headers, **{
        H_QUEUE: delivery.queue,
        H_ERROR_TYPE: f"quebert.errors.{type(error).__name__}",
        H_ERROR_MESSAGE: _header_text(reason),
        H_REASON: _header_text(reason),
    })
    return _with_body(message, delivery, headers)


def delayed_copy(delivery: Any, message: TaskMessage, extra: dict, not_before: float) -> Copy:
    """The copy of a task that arrived early, due at epoch ``not_before``."""
    headers = protocol.republish_headers(delivery.headers, **extra)
    headers[H_NOT_BEFORE] = protocol.to_ms(not_before)
    return _with_body(message, delivery, headers)


def parked_copy(delivery: Any, message: TaskMessage, parks: int) -> Copy:
    """The copy of a task put aside while another worker runs its attempt."""
    headers = protocol.republish_headers(delivery.headers, **{H_PARKED: parks + 1})
    return _with_body(message, delivery, headers)


def _with_body(message: Optional[TaskMessage], delivery: Any, headers: dict) -> Copy:
    body, content_type = legacy.copy_body(message, delivery.body, delivery.content_type)
    return body, headers, content_type


def _count_response(headers: dict, failure: Failure) -> None:
    """A URL task's copy carries its last answer's status and the answers so far."""
    if isinstance(failure.value, DispatchError):
        status = failure.value.status
        headers[H_PREVIOUS_RESPONSE] = status or 0
        if status:
            headers[H_EXECUTIONS] = protocol.int_header(headers, H_EXECUTIONS) + 1


def _header_text(value: str) -> str:
    return value if len(value) <= _HEADER_TEXT_LIMIT else value[: _HEADER_TEXT_LIMIT - 3] + "..."
