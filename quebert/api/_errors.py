# -*- test-case-name: tests.test_api -*-
"""
Errors as the HTTP API answers them.

Every error response is ``{"error": {"code", "message", "field", ...}}``
with a stable machine-readable ``code``.  :func:`from_exception` maps the
:mod:`quebert.errors` a backend raises to a status and a code; anything it
does not know becomes ``None`` (the caller answers a generic 500).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from quebert.errors import (
    BrokerError,
    ConfigurationError,
    InvalidMessage,
    QueueNotFound,
    SerializationError,
    StateError,
    TaskAlreadyExists,
    TaskNotFound,
    TaskStateConflict,
    UnknownTask,
    URLRefused,
)

#: Every error code, with the status it comes with.
CODES = {
    "invalid_json": 400,
    "invalid_field": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "task_not_found": 404,
    "queue_not_found": 404,
    "method_not_allowed": 405,
    "task_already_exists": 409,
    "task_state_conflict": 409,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "unknown_task": 422,
    "url_refused": 422,
    "internal_error": 500,
    "service_unavailable": 503,
}

#: Seconds a client is told to wait after a 503 from a backend outage.
RETRY_AFTER = 5


class ApiError(Exception):
    """
    An error answer: ``status``, ``code`` (see :data:`CODES`), a message
    for humans, the request ``field`` at fault (dotted, e.g.
    ``retry.max_attempts``), extra keys for the error object, and extra
    response headers.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        field: Optional[str] = None,
        extra: Optional[Mapping[str, Any]] = None,
        headers: Optional[Mapping[str, str]] = None,
        status: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status if status is not None else CODES[code]
        self.message = message
        self.field = field
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})

    def body(self) -> Dict[str, Any]:
        error: Dict[str, Any] = {"code": self.code, "message": self.message, "field": self.field}
        for key, value in self.extra.items():
            error.setdefault(key, value)
        return {"error": error}


def invalid(field: Optional[str], message: str) -> ApiError:
    """A 400 naming the request field at fault."""
    return ApiError("invalid_field", message, field=field)


def from_exception(error: BaseException) -> Optional[ApiError]:
    """The answer to a backend exception, or ``None`` for an unexpected one."""
    # Order matters: UnknownTask is an InvalidMessage, URLRefused a Reject.
    if isinstance(error, TaskNotFound):
        return ApiError("task_not_found", str(error), extra={"task_id": error.task_id})
    if isinstance(error, QueueNotFound):
        return ApiError("queue_not_found", str(error), extra={"queue": error.queue})
    if isinstance(error, TaskAlreadyExists):
        return ApiError(
            "task_already_exists",
            str(error),
            field="name",
            extra={"name": error.name, "task_id": error.task_id},
        )
    if isinstance(error, TaskStateConflict):
        return ApiError(
            "task_state_conflict",
            str(error),
            extra={"task_id": error.task_id, "state": error.state},
        )
    if isinstance(error, UnknownTask):
        return ApiError("unknown_task", error.reason, field=error.field or "task")
    if isinstance(error, URLRefused):
        return ApiError("url_refused", str(error), field=getattr(error, "field", None) or "url")
    if isinstance(error, InvalidMessage):
        return ApiError("invalid_field", error.reason, field=error.field)
    if isinstance(error, (ConfigurationError, SerializationError)):
        return ApiError("invalid_field", str(error), field=getattr(error, "field", None))
    if isinstance(error, (BrokerError, StateError)):
        # The cause may name hosts or credentials: the detail goes to the log.
        return ApiError(
            "service_unavailable",
            "the task service is unavailable, try again later",
            headers={"Retry-After": str(RETRY_AFTER)},
        )
    return None
