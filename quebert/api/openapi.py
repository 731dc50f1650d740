# -*- test-case-name: tests.test_api_schema -*-
"""
The OpenAPI 3.1 document of the HTTP task API, served at ``/openapi.json``.

Written by hand as data, next to the code it describes: the limits and
patterns come from :mod:`quebert.api._validate`, the error codes from
:mod:`quebert.api._errors` and the operations must be exactly
:data:`quebert.api.resource.ROUTES` (a test checks both ways, and a
Schemathesis run checks the live server against it).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

from quebert._version import __version__
from quebert.api import _validate as v
from quebert.api._errors import CODES
from quebert.retry import RETRY_FIELDS
from quebert.state.interface import STATES

__all__ = ["document"]


def _ref(name: str) -> Dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str, **more: Any) -> Dict[str, Any]:
    return {"type": [kind, "null"], **more}


def _number(minimum: float, maximum: float, *, exclusive: bool = False,
            description: str = "") -> Dict[str, Any]:
    schema: Dict[str, Any] = {"type": ["number", "null"], "maximum": maximum}
    if exclusive:
        schema["exclusiveMinimum"] = minimum
    else:
        schema["minimum"] = minimum
    if description:
        schema["description"] = description
    return schema


_RETRY_PROPERTIES: Dict[str, Any] = {
    "max_attempts": {
        "type": ["integer", "null"], "minimum": -1, "maximum": v.MAX_RETRY_INT,
        "not": {"const": 0},
        "description": "Attempts allowed in all, the first included; -1: unlimited.",
    },
    "max_retry_duration": _number(0, v.MAX_RETRY_SECONDS, description=(
        "Seconds after the first attempt during which retries may still be made; "
        "0: no duration limit.")),
    "min_backoff": _number(0, v.MAX_RETRY_SECONDS,
                           description="Delay before the first retry (seconds)."),
    "max_backoff": _number(0, v.MAX_RETRY_SECONDS, description=(
        "Upper bound of any retry delay (seconds); must be >= min_backoff when both "
        "are given.")),
    "max_doublings": {"type": ["integer", "null"], "minimum": 0, "maximum": v.MAX_RETRY_INT,
                      "description": "How often the delay doubles before growing linearly."},
    "jitter": _number(0, 1, description="Fraction by which a delay may be randomly shortened."),
}
assert tuple(_RETRY_PROPERTIES) == tuple(RETRY_FIELDS)

_COMMON_PROPERTIES: Dict[str, Any] = {
    "queue": {"type": ["string", "null"], "pattern": v.QUEUE_PATTERN,
              "description": "Work queue (default: the task's or the service's default)."},
    "countdown": _number(0, v.MAX_COUNTDOWN,
                         description="Run no sooner than this many seconds from now."),
    "eta": {
        "description": ("Run no sooner than this time: epoch seconds or an RFC 3339 "
                        "date-time with a time zone.  Not together with countdown."),
        "anyOf": [
            {"type": "number", "minimum": 0, "maximum": v.MAX_EPOCH},
            {"type": "string", "format": "date-time", "pattern": v.RFC3339_PATTERN},
            {"type": "null"},
        ],
    },
    "name": {"type": ["string", "null"], "pattern": v.ID_PATTERN,
             "description": "Unique task name: a second task of that name is refused (409)."},
    "retry": {"type": ["object", "null"], "additionalProperties": False,
              "properties": _RETRY_PROPERTIES,
              "description": "Retry policy overrides (Cloud Tasks parameters)."},
    "context": {
        "type": ["object", "null"],
        "maxProperties": v.MAX_CONTEXT_KEYS,
        "propertyNames": {"pattern": v.CONTEXT_KEY_PATTERN},
        "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
        "description": (
            "Plain data about where the task comes from (e.g. db_id, container_id, "
            "user_id), which the task reads with quebert.current_task(): names to JSON "
            f"scalars, at most {v.MAX_CONTEXT_KEYS} keys and {v.MAX_CONTEXT_SIZE} bytes of "
            "compact JSON.  Not stored in the task's record."),
    },
}

#: countdown and eta are exclusive (either may be null, meaning absent).
_NOT_BOTH: Dict[str, Any] = {
    "required": ["countdown", "eta"],
    "properties": {"countdown": {"type": "number"}, "eta": {"type": ["number", "string"]}},
}

_CALL_TASK: Dict[str, Any] = {
    "type": "object",
    "description": "Run a registered task function.",
    "required": ["kind", "task"],
    "not": _NOT_BOTH,
    "additionalProperties": False,
    "properties": {
        "kind": {"const": "call"},
        "task": {"type": "string", "pattern": v.TASK_NAME_PATTERN,
                 "description": "Registered task name."},
        "args": {"type": ["array", "null"], "description": "Positional arguments (JSON)."},
        "kwargs": {"type": ["object", "null"],
                   "propertyNames": {"not": {"pattern": "^_"}},
                   "description": "Keyword arguments (JSON); names must not start with _."},
        **_COMMON_PROPERTIES,
        "timeout": _number(0, v.MAX_TIMEOUT, exclusive=True,
                           description="Seconds one attempt may run."),
    },
}

_URL_TASK: Dict[str, Any] = {
    "type": "object",
    "description": "Make an HTTP request; a 2xx answer is success, anything else is retried.",
    "required": ["kind", "url"],
    "not": _NOT_BOTH,
    "additionalProperties": False,
    "properties": {
        "kind": {"const": "url"},
        "url": {"type": "string", "maxLength": v.MAX_URL_LENGTH,
                "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://[!-~]+$",
                "description": "Absolute http:// or https:// URL, printable ASCII."},
        "method": {"type": ["string", "null"], "pattern": v.TOKEN_PATTERN,
                   "maxLength": v.MAX_METHOD_LENGTH, "description": "Default: POST."},
        "headers": {
            "type": ["object", "null"],
            "maxProperties": v.MAX_HEADERS,
            "propertyNames": {"pattern": v.TOKEN_PATTERN, "maxLength": v.MAX_HEADER_NAME},
            "additionalProperties": {"type": "string", "pattern": v.HEADER_VALUE_PATTERN,
                                     "maxLength": v.MAX_HEADER_VALUE},
            "description": ("Request headers: token names, printable ASCII values; not "
                            + ", ".join(sorted(v.FORBIDDEN_HEADERS)) + "."),
        },
        "body": {"type": ["string", "null"], "description": "Request body as text (UTF-8)."},
        "body_base64": {"type": ["string", "null"], "contentEncoding": "base64",
                        "description": "Request body as base64; not together with body."},
        **_COMMON_PROPERTIES,
        "dispatch_deadline": _number(0, v.MAX_TIMEOUT, exclusive=True,
                                     description="Seconds one request may take."),
    },
}

_HISTORY_ENTRY: Dict[str, Any] = {
    "type": "object",
    "required": ["attempt", "state"],
    "properties": {
        "attempt": {"type": "integer"},
        "state": {"type": "string"},
        "worker": _nullable("string"),
        "started_at": _nullable("number"),
        "finished_at": _nullable("number"),
        "error": _nullable("object"),
        "retry_at": _nullable("number"),
    },
}

_RECORD_FIELDS = ("id", "state", "queue", "kind", "task", "name", "attempts", "created_at",
                  "updated_at", "eta", "started_at", "finished_at", "worker", "result",
                  "error", "reason", "history")

_TASK: Dict[str, Any] = {
    "type": "object",
    "description": ("A task's state record.  A URL task's task is its method and URL "
                    "without query string; "
                    "further keys may be added."),
    "required": list(_RECORD_FIELDS),
    "properties": {
        "id": {"type": "string"},
        "state": {"type": "string", "enum": list(STATES)},
        "queue": _nullable("string"),
        "kind": _nullable("string"),
        "task": _nullable("string"),
        "name": _nullable("string"),
        "attempts": {"type": "integer", "minimum": 0},
        "created_at": _nullable("number"),
        "updated_at": _nullable("number"),
        "eta": _nullable("number"),
        "started_at": _nullable("number"),
        "finished_at": _nullable("number"),
        "worker": _nullable("string"),
        "result": {"description": "The task's JSON result, or null."},
        "error": {
            "type": ["object", "null"],
            "properties": {"type": _nullable("string"), "message": _nullable("string"),
                           "traceback": _nullable("string")},
        },
        "reason": _nullable("string"),
        "history": {"type": "array", "items": _ref("HistoryEntry")},
        "cancel_requested": {**_nullable("number"),
                             "description": "When a cancel was asked for (epoch seconds)."},
        "arguments": {
            "type": "object",
            "description": ("Only when the producer recorded it: the task's args, kwargs and "
                            "context (a URL task's url and method), or, past the producer's "
                            "size cap, {truncated, size, preview} with the start of their "
                            "JSON text."),
        },
        "stalled": {
            "type": "object",
            "description": ("Only when the reactor-stall watchdog killed a worker while this "
                            "task ran: the latest such stall (attempt, epoch seconds, seconds "
                            "stalled, whether this task's function blocked the reactor)."),
            "properties": {"attempt": {"type": "integer"}, "at": {"type": "number"},
                           "for": {"type": "number"}, "culprit": _nullable("boolean")},
        },
    },
}

_QUEUE: Dict[str, Any] = {
    "type": "object",
    "required": ["name", "ready", "unacked", "delayed", "errored", "consumers", "paused",
                 "settings"],
    "properties": {
        "name": {"type": "string"},
        "ready": _nullable("integer", minimum=0, description="Messages waiting."),
        "unacked": _nullable("integer", minimum=0, description="Messages being worked on."),
        "delayed": _nullable("integer", minimum=0,
                             description="Tasks waiting for an ETA or a retry."),
        "errored": _nullable("integer", minimum=0,
                             description="Messages in the errored queue."),
        "consumers": _nullable("integer", minimum=0),
        "paused": {"type": "boolean"},
        "settings": {"type": "object"},
    },
}

_HEALTH: Dict[str, Any] = {
    "type": "object",
    "required": ["live", "ready"],
    "properties": {
        "live": {"type": "boolean", "description": "The process runs (always true)."},
        "ready": {"type": "boolean",
                  "description": "The service can take tasks (200), or not (503)."},
        "amqp": {"type": "boolean", "description": "The broker connection is up."},
        "redis": {"type": "boolean", "description": "The state store is reachable."},
        "nodes": {"type": "object",
                  "description": ("The RabbitMQ node (host:port/vhost) each AMQP connection "
                                  "is on, by connection name; null while one is down."),
                  "additionalProperties": _nullable("string")},
    },
}

_ERROR: Dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "field"],
            "description": ("code is stable and machine-readable; field names the request "
                            "field at fault (dotted) or is null.  Some codes add keys: "
                            "task_id, state, name, queue."),
            "properties": {
                "code": {"type": "string", "enum": list(CODES)},
                "message": {"type": "string"},
                "field": _nullable("string"),
                "task_id": _nullable("string"),
                "state": _nullable("string"),
                "name": _nullable("string"),
                "queue": _nullable("string"),
            },
        },
    },
}


def _json(schema: Dict[str, Any]) -> Dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error(description: str, headers: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    response: Dict[str, Any] = {"description": description, "content": _json(_ref("Error"))}
    if headers:
        response["headers"] = headers
    return response


def _header(description: str, required: bool = True) -> Dict[str, Any]:
    return {"description": description, "required": required, "schema": {"type": "string"}}


_RESPONSES: Dict[str, Any] = {
    "BadRequest": _error("Malformed JSON (invalid_json) or an invalid field (invalid_field, "
                         "field names it)."),
    "Unauthorized": _error("No valid bearer token (unauthorized).", {
        "WWW-Authenticate": _header("Bearer challenge.")}),
    "Forbidden": _error("A read-only token tried to write (forbidden)."),
    "NotFound": _error("No such task (task_not_found) or queue (queue_not_found)."),
    "Conflict": _error("The task name is taken (task_already_exists) or the task's state "
                       "does not allow this (task_state_conflict)."),
    "PayloadTooLarge": _error("The request body is over the limit (payload_too_large)."),
    "UnsupportedMediaType": _error("The body is not application/json "
                                   "(unsupported_media_type)."),
    "Unprocessable": _error("Well-formed but refused: the task is not registered "
                            "(unknown_task) or the URL is refused (url_refused)."),
    "InternalError": _error("Unexpected failure (internal_error); details are logged, "
                            "never returned."),
    "Unavailable": _error("The broker or the state store is unavailable "
                          "(service_unavailable); retry later.", {
                              "Retry-After": _header("Seconds to wait.")}),
}


def _responses(ok: Dict[str, Any], *errors: str) -> Dict[str, Any]:
    statuses = {"BadRequest": "400", "Unauthorized": "401", "Forbidden": "403",
                "NotFound": "404", "Conflict": "409", "PayloadTooLarge": "413",
                "UnsupportedMediaType": "415", "Unprocessable": "422",
                "InternalError": "500", "Unavailable": "503"}
    responses = dict(ok)
    for name in errors:
        responses[statuses[name]] = {"$ref": f"#/components/responses/{name}"}
    return responses


def _ok(status: str, description: str, schema: Dict[str, Any],
        headers: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    response: Dict[str, Any] = {"description": description, "content": _json(schema)}
    if headers:
        response["headers"] = headers
    return {status: response}


_READ = ("Unauthorized", "PayloadTooLarge", "InternalError", "Unavailable")
_WRITE = _READ + ("Forbidden",)

_TASK_ID = {"name": "task_id", "in": "path", "required": True,
            "schema": {"type": "string", "pattern": v.ID_PATTERN}}
_QUEUE_NAME = {"name": "queue", "in": "path", "required": True,
               "schema": {"type": "string", "pattern": v.QUEUE_PATTERN}}

_PATHS: Dict[str, Any] = {
    "/tasks": {
        "post": {
            "operationId": "addTask",
            "summary": "Push a task",
            "requestBody": {"required": True, "content": _json({
                "oneOf": [_ref("CallTask"), _ref("URLTask")],
                "discriminator": {"propertyName": "kind",
                                  "mapping": {"call": "#/components/schemas/CallTask",
                                              "url": "#/components/schemas/URLTask"}},
            })},
            "responses": _responses(
                _ok("201", "Published; the body is its record.", _ref("Task"), {
                    "Location": _header("Path of the new task.")}),
                "BadRequest", "Conflict", "UnsupportedMediaType", "Unprocessable", *_WRITE),
        },
        "get": {
            "operationId": "listTasks",
            "summary": "List tasks, most recently updated first",
            "parameters": [
                {"name": "state", "in": "query", "schema": {"type": "string",
                                                            "enum": list(STATES)}},
                {"name": "queue", "in": "query", "schema": {"type": "string",
                                                            "pattern": v.QUEUE_PATTERN}},
                {"name": "limit", "in": "query", "schema": {
                    "type": "integer", "minimum": 1, "maximum": v.MAX_LIST_LIMIT,
                    "default": v.DEFAULT_LIST_LIMIT}},
                {"name": "offset", "in": "query", "schema": {
                    "type": "integer", "minimum": 0, "maximum": v.MAX_LIST_OFFSET,
                    "default": 0}},
            ],
            "responses": _responses(
                _ok("200", "A page of tasks.", _ref("TaskList")), "BadRequest", *_READ),
        },
    },
    "/tasks/{task_id}": {
        "parameters": [_TASK_ID],
        "get": {
            "operationId": "getTask",
            "summary": "A task's record",
            "description": ("With ``wait``, the answer comes once the task is finished "
                            "(succeeded, failed or canceled; at once if it is) or when "
                            "that many seconds have passed, with the record as it is "
                            "then: its ``state`` tells which.  One subscription per "
                            "server serves every waiting request, no polling."),
            "parameters": [
                {"name": "wait", "in": "query", "schema": {
                    "type": "number", "minimum": 0, "maximum": 60, "default": 0}},
            ],
            "responses": _responses(_ok("200", "The record.", _ref("Task")), "NotFound",
                                    "BadRequest", *_READ),
        },
        "delete": {
            "operationId": "cancelTask",
            "summary": "Cancel a task",
            "description": ("A waiting task is canceled at once; for a running one "
                            "cancellation is requested from its worker.  A finished task "
                            "cannot be canceled (409)."),
            "responses": _responses(
                _ok("200", "The canceled (or cancel-requested) record.", _ref("Task")),
                "NotFound", "Conflict", *_WRITE),
        },
    },
    "/tasks/{task_id}/requeue": {
        "parameters": [_TASK_ID],
        "post": {
            "operationId": "requeueTask",
            "summary": "Run a failed task again",
            "responses": _responses(
                _ok("200", "The requeued record.", _ref("Task")),
                "NotFound", "Conflict", *_WRITE),
        },
    },
    "/queues": {
        "get": {
            "operationId": "listQueues",
            "summary": "Queues with their counts and settings",
            "responses": _responses(_ok("200", "The queues.", _ref("QueueList")), *_READ),
        },
    },
    "/queues/{queue}/pause": {
        "parameters": [_QUEUE_NAME],
        "post": {
            "operationId": "pauseQueue",
            "summary": "Stop consuming a queue (tasks keep arriving)",
            "responses": _responses(_ok("200", "The queue.", _ref("Queue")), "NotFound",
                                    *_WRITE),
        },
    },
    "/queues/{queue}/resume": {
        "parameters": [_QUEUE_NAME],
        "post": {
            "operationId": "resumeQueue",
            "summary": "Consume a paused queue again",
            "responses": _responses(_ok("200", "The queue.", _ref("Queue")), "NotFound",
                                    *_WRITE),
        },
    },
    "/health": {
        "get": {
            "operationId": "health",
            "summary": "Readiness (no authentication)",
            "security": [],
            "responses": {
                **_ok("200", "Ready to take tasks.", _ref("Health")),
                "413": {"$ref": "#/components/responses/PayloadTooLarge"},
                "500": {"$ref": "#/components/responses/InternalError"},
                "503": {"description": "Not ready (or the check itself failed).",
                        "content": _json({"anyOf": [_ref("Health"), _ref("Error")]})},
            },
        },
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics of the worker (text exposition format)",
            "description": "Served by a worker's API (twistd amqp-worker --http-port): "
                           "deliveries by outcome, attempts running, state store health "
                           "and backlog, AMQP connections, process figures. quebert-api "
                           "alone answers 404.",
            "responses": _responses({"200": {
                "description": "The metrics.",
                "content": {"text/plain; version=0.0.4; charset=utf-8": {
                    "schema": {"type": "string"}}},
            }}, "NotFound", *_READ),
        },
    },
    "/openapi.json": {
        "get": {
            "operationId": "openapi",
            "summary": "This document (no authentication)",
            "security": [],
            "responses": {
                **_ok("200", "The OpenAPI document.", {"type": "object"}),
                "413": {"$ref": "#/components/responses/PayloadTooLarge"},
                "500": {"$ref": "#/components/responses/InternalError"},
            },
        },
    },
}

_DOCUMENT: Dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "quebert task API",
        "version": __version__,
        "description": ("Push, inspect and cancel quebert tasks.  Every error is "
                        "{\"error\": {\"code\", \"message\", \"field\"}}.  Unknown request "
                        "fields are refused (400); null means absent."),
    },
    "paths": _PATHS,
    "components": {
        "securitySchemes": {"bearerAuth": {
            "type": "http", "scheme": "bearer",
            "description": "A read-only token may GET; writes need a read-write token."}},
        "schemas": {
            "CallTask": _CALL_TASK,
            "URLTask": _URL_TASK,
            "Task": _TASK,
            "HistoryEntry": _HISTORY_ENTRY,
            "TaskList": {
                "type": "object",
                "required": ["tasks", "limit", "offset", "next_offset"],
                "properties": {
                    "tasks": {"type": "array", "items": _ref("Task")},
                    "limit": {"type": "integer"},
                    "offset": {"type": "integer"},
                    "next_offset": _nullable("integer", description=(
                        "offset of the next page, null on the last one.")),
                },
            },
            "Queue": _QUEUE,
            "QueueList": {"type": "object", "required": ["queues"],
                          "properties": {"queues": {"type": "array", "items": _ref("Queue")}}},
            "Health": _HEALTH,
            "Error": _ERROR,
        },
        "responses": _RESPONSES,
    },
    "security": [{"bearerAuth": []}],
}


def document(config: Any = None, base_path: str = "") -> Dict[str, Any]:
    """
    A fresh copy of the OpenAPI document.  ``config`` (an
    :class:`~quebert.api.config.ApiConfig`) marks authentication optional
    when anonymous access is allowed; ``base_path`` is where the API is
    mounted, if not at the root.
    """
    result = copy.deepcopy(_DOCUMENT)
    if config is not None:
        get_task = result["paths"]["/tasks/{task_id}"]["get"]
        get_task["parameters"][0]["schema"]["maximum"] = config.max_wait
    if config is not None and config.anonymous != "none":
        security: List[Dict[str, Any]] = [{"bearerAuth": []}, {}]
        result["security"] = security
    if base_path:
        result["servers"] = [{"url": base_path}]
    return result
