# -*- test-case-name: tests.test_api -*-
"""
The HTTP task API on plain ``twisted.web``: :class:`ApiResource` and
:func:`make_site`.

(Over 700 lines: every route of the API, so that each request's checks run
in one order, written once.)

One leaf resource routes every request itself (:data:`ROUTES`), so that
no part of ``twisted.web`` ever answers with one of its HTML pages: unknown
paths, wrong methods, authentication, size limits, bad input and backend
failures all get the JSON error body of :mod:`quebert.api._errors`.  A
request goes through, in order: routing (404, 405), authentication (401,
403), the body size limit (413), the content type (415), JSON decoding and
validation (400), then one :class:`~quebert.api.interfaces.ITaskService`
call whose errors map to 404/409/422/503, anything unexpected to a
generic 500 that is logged and never shows a traceback.

:func:`make_site` also installs a request class that refuses oversized
bodies while they are read, without buffering them, and structured access
logs (namespace ``quebert.api``) that never include a token.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import attrs
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from quebert.api import _validate, console, openapi
from quebert.api._errors import ApiError, from_exception
from quebert.api.config import NONE, READ_ONLY, READ_WRITE, ApiConfig
from quebert.api.interfaces import ITaskService

log = Logger(namespace="quebert.api")

JSON = "application/json"
#: Headers on every answer: JSON is never cached nor sniffed as HTML.
_COMMON_HEADERS = {
    b"Cache-Control": b"no-store",
    b"X-Content-Type-Options": b"nosniff",
}
_REALM = 'Bearer realm="quebert"'
_NOT_DONE_YET = server.NOT_DONE_YET


@attrs.frozen
class Route:
    """
    One operation: ``method`` on ``path`` (an OpenAPI path template such
    as ``/tasks/{task_id}``), served by ``ApiResource.<handler>``.
    ``write`` operations need a read-write token; ``public`` ones need
    none.
    """

    method: str
    path: str
    handler: str
    write: bool = False
    public: bool = False

    @property
    def segments(self) -> Tuple[str, ...]:
        return tuple(self.path.strip("/").split("/"))

    def match(self, segments: List[str]) -> Optional[Dict[str, str]]:
        """The path parameters if ``segments`` fit this route's path, else ``None``."""
        template = self.segments
        if len(template) != len(segments):
            return None
        parameters: Dict[str, str] = {}
        for pattern, segment in zip(template, segments):
            if pattern.startswith("{") and pattern.endswith("}"):
                if not segment:
                    return None
                parameters[pattern[1:-1]] = segment
            elif pattern != segment:
                return None
        return parameters


#: Every operation of the API; the OpenAPI document lists exactly these
#: (``HEAD`` is also answered wherever ``GET`` is, as HTTP requires).
ROUTES = (
    Route("POST", "/tasks", "add_task", write=True),
    Route("GET", "/tasks", "list_tasks"),
    Route("GET", "/tasks/{task_id}", "get_task"),
    Route("DELETE", "/tasks/{task_id}", "cancel_task", write=True),
    Route("POST", "/tasks/{task_id}/requeue", "requeue_task", write=True),
    Route("GET", "/queues", "list_queues"),
    Route("POST", "/queues/{queue}/pause", "pause_queue", write=True),
    Route("POST", "/queues/{queue}/resume", "resume_queue", write=True),
    Route("GET", "/health", "health", public=True),
    Route("GET", "/metrics", "metrics"),
    Route("GET", "/openapi.json", "openapi", public=True),
)

_Answer = Tuple[int, Any, Mapping[str, str]]

#: The console's event stream: read access, not in the OpenAPI document
#: (a stream that never ends is no REST operation; docs/http-api.rst).
_EVENTS = Route("GET", "/events", "events")


def _digest(token: bytes) -> bytes:
    # Hashing first makes every comparison the same length, so not even a
    # token's length leaks through timing.
    return hashlib.sha256(token).digest()


def _encode(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode("ascii")


@attrs.frozen
class _Text:
    """An answer that is not JSON: ``payload`` sent as it is."""

    payload: bytes
    content_type: str


def _write(request: server.Request, status: int, body: Any,
           headers: Mapping[str, str] = {}) -> None:  # noqa: B006 - never mutated
    """Finish ``request`` with a JSON answer (unless the client has gone)."""
    if getattr(request, "_quebert_gone", False) or request.finished:
        return
    if isinstance(body, _Text):
        payload, content_type = body.payload, body.content_type
    else:
        payload, content_type = _encode(body), JSON
    request.setResponseCode(status)
    for name, value in _COMMON_HEADERS.items():
        request.setHeader(name, value)
    for name, value in headers.items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    request.setHeader(b"Content-Type", content_type.encode("ascii"))
    request.setHeader(b"Content-Length", b"%d" % (len(payload),))
    request.write(payload)
    request.finish()


def _internal_error() -> ApiError:
    return ApiError("internal_error", "internal server error; the event is logged")


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    result: Dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ApiError("invalid_json", f"key {key!r} appears twice in an object",
                           field=key)
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ApiError("invalid_json", f"{name} is not valid JSON")


def decode_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError("invalid_json", "the request body is not UTF-8 text")
    if not text.strip():
        raise ApiError("invalid_json", "the request body is empty; a JSON object is expected")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError("invalid_json", "the request body is nested too deeply")
    except ValueError as e:
        raise ApiError("invalid_json", f"the request body is not valid JSON: {e}")


class ApiResource(Resource):
    """
    The whole HTTP task API as one leaf resource, over an
    :class:`~quebert.api.interfaces.ITaskService`.

    It can be put at the root of a :class:`~twisted.web.server.Site` (see
    :func:`make_site`, which also limits bodies as they are read) or
    below another resource with ``putChild``; paths are then relative to
    where it is mounted, and ``Location`` headers and the OpenAPI document
    follow.
    """

    isLeaf = True

    def __init__(self, service: Any, config: ApiConfig,
                 metrics: Optional[Callable[[], bytes]] = None) -> None:
        super().__init__()
        verifyObject(ITaskService, service)
        self.service = service
        self.config = config
        self._feed: Optional[console.ConsoleFeed] = None
        self._streams = 0
        #: Renders the Prometheus metrics ``GET /metrics`` serves (a worker's).
        self.metrics_exposition = metrics
        self._read_write = tuple(_digest(t.encode("ascii")) for t in config.read_write_tokens)
        self._read_only = tuple(_digest(t.encode("ascii")) for t in config.read_only_tokens)

    # -- twisted.web ------------------------------------------------------

    def render(self, request: server.Request) -> Any:
        """Answer any request; the answer is written when the backend replies."""
        request.notifyFinish().addErrback(lambda _: setattr(request, "_quebert_gone", True))
        d = defer.ensureDeferred(self._answer(request))
        d.addErrback(self._last_resort, request)
        return _NOT_DONE_YET

    def _last_resort(self, failure: Failure, request: server.Request) -> None:
        log.failure("the HTTP API could not answer {method} {path}", failure=failure,
                    method=_text(request.method), path=_text(request.path))
        try:
            error = _internal_error()
            _write(request, error.status, error.body())
        except Exception:
            request.loseConnection()

    async def _answer(self, request: server.Request) -> None:
        try:
            first = request.postpath[0] if request.postpath else b""
            if first == b"ui":
                status, body, headers = self._console_file(request)
            elif first == b"events" and len(request.postpath) == 1:
                self._stream(request)
                return
            else:
                status, body, headers = await self._dispatch(request)
        except ApiError as error:
            status, body, headers = error.status, error.body(), error.headers
        _write(request, status, body, headers)

    # -- the console (quebert/api/console.py): its files and its event stream --

    def _console_file(self, request: server.Request) -> _Answer:
        """``/ui/`` and its files: public, GET only, a fixed list of names."""
        method = _text(request.method)
        if method not in ("GET", "HEAD"):
            raise ApiError("method_not_allowed", f"method {method[:20]} is not allowed here "
                           "(allowed: GET, HEAD)", headers={"Allow": "GET, HEAD"})
        request._quebert_access = "public"  # type: ignore[attr-defined]
        rest = request.postpath[1:]
        if not rest:  # /ui: the page's relative links need the slash
            return 301, _Text(b"", "text/plain"), {
                "Location": f"{self._base(request)}/ui/"}
        found = console.asset(_text(rest[0]) or "index.html") if len(rest) == 1 else None
        if found is None:
            raise ApiError("not_found", f"no such resource: {_text(request.path)[:200]}")
        payload, content_type = found
        return 200, _Text(payload, content_type), dict(console.SECURITY_HEADERS)

    def _stream(self, request: server.Request) -> None:
        """
        ``GET /events`` (read access): a ``text/event-stream`` of the
        console's snapshots, opened with a ``hello`` event saying what the
        token may do.
        """
        if _text(request.method) != "GET":
            raise ApiError("method_not_allowed", "method not allowed here (allowed: GET)",
                           headers={"Allow": "GET"})
        self._authorize(request, _EVENTS)
        if self._streams >= self.config.max_streams:
            raise ApiError("service_unavailable",
                           f"too many console streams open (at most "
                           f"{self.config.max_streams}); close one and try again",
                           headers={"Retry-After": "5"})
        if self._feed is None:
            self._feed = console.ConsoleFeed(self.service, self._clock())
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"X-Accel-Buffering", b"no")
        channel = getattr(request, "channel", None)
        if channel is not None and hasattr(channel, "setTimeout"):
            channel.setTimeout(None)  # the stream is meant to stay open
        access = getattr(request, "_quebert_access", READ_ONLY)
        request.write(console.event("hello", {
            "access": "read-write" if access == READ_WRITE else "read-only",
            "interval": console.INTERVAL}))
        self._streams += 1

        def send(payload: bytes) -> None:
            if not request.finished and not getattr(request, "_quebert_gone", False):
                request.write(payload)

        stop = self._feed.subscribe(send)

        def closed(_: Any) -> None:
            self._streams -= 1
            stop()

        request.notifyFinish().addBoth(closed)

    def _clock(self) -> Any:
        site = getattr(self, "_site_reactor", None)
        if site is not None:
            return site
        from twisted.internet import reactor

        return reactor

    async def _dispatch(self, request: server.Request) -> _Answer:
        route, parameters = self._route(request)
        self._authorize(request, route)
        self._check_size(request)
        handler = getattr(self, route.handler)
        return await handler(request, **parameters)

    # -- the steps every request goes through -----------------------------

    def _route(self, request: server.Request) -> Tuple[Route, Dict[str, str]]:
        try:
            segments = [segment.decode("utf-8") for segment in request.postpath]
        except UnicodeDecodeError:
            segments = None
        method = _text(request.method)
        wanted = "GET" if method == "HEAD" else method
        allowed = []
        if segments is not None:
            for route in ROUTES:
                parameters = route.match(segments)
                if parameters is None:
                    continue
                if route.method == wanted:
                    return route, parameters
                allowed.append(route.method)
        if not allowed:
            raise ApiError("not_found", f"no such resource: {_text(request.path)[:200]}")
        if "GET" in allowed:
            allowed.append("HEAD")
        raise ApiError(
            "method_not_allowed",
            f"method {method[:20]} is not allowed here (allowed: {', '.join(allowed)})",
            headers={"Allow": ", ".join(allowed)},
        )

    def _authorize(self, request: server.Request, route: Route) -> None:
        """
        Find the access level of the request (kept on it for the access
        log); raise 401/403 when it is not enough for ``route``.
        """
        if route.public:
            request._quebert_access = "public"  # type: ignore[attr-defined]
            return
        given = request.requestHeaders.getRawHeaders(b"authorization")
        if not given:
            level = self.config.anonymous
            if level == NONE:
                raise ApiError("unauthorized", "this API needs a bearer token "
                               "(Authorization: Bearer TOKEN)",
                               headers={"WWW-Authenticate": _REALM})
        else:
            level = self._token_level(given)
        request._quebert_access = level  # type: ignore[attr-defined]
        if route.write and level != READ_WRITE:
            raise ApiError(
                "forbidden",
                "this token may only read; writing needs a read-write token",
                headers={"WWW-Authenticate": f'{_REALM}, error="insufficient_scope"'},
            )

    def _token_level(self, given: List[bytes]) -> str:
        scheme, _, token = given[0].strip().partition(b" ")
        token = token.strip()
        invalid = ApiError(
            "unauthorized", "the bearer token is missing, malformed or not valid",
            headers={"WWW-Authenticate": f'{_REALM}, error="invalid_token"'},
        )
        if len(given) != 1 or scheme.lower() != b"bearer" or not token:
            raise invalid
        digest = _digest(token)
        level = NONE
        # No early exit: every configured token is compared every time.
        for candidate in self._read_only:
            if hmac.compare_digest(digest, candidate):
                level = READ_ONLY
        for candidate in self._read_write:
            if hmac.compare_digest(digest, candidate):
                level = READ_WRITE
        if level == NONE:
            raise invalid
        return level

    def _too_large(self) -> ApiError:
        return ApiError("payload_too_large", "the request body is larger than the "
                        f"{self.config.max_body_size} byte limit")

    def _check_size(self, request: server.Request) -> None:
        if getattr(request, "_quebert_too_large", False):
            raise self._too_large()
        length = request.getHeader(b"content-length")
        if length is not None and length.strip().isdigit() \
                and int(length) > self.config.max_body_size:
            raise self._too_large()

    def _body(self, request: server.Request) -> Any:
        """The JSON body of a request that must have one."""
        content_type = request.getHeader(b"content-type")
        media, *parameters = (content_type or b"").decode("latin-1").split(";")
        charset = [p.split("=", 1)[1].strip().strip('"').lower() for p in parameters
                   if p.strip().lower().startswith("charset=")]
        if media.strip().lower() != JSON or any(c not in ("utf-8", "utf8") for c in charset):
            raise ApiError("unsupported_media_type",
                           "the request body must be JSON (Content-Type: application/json)")
        content = request.content
        if content is None:
            raw = b""
        else:
            # Guard also when this resource runs in a Site of its own that
            # does not limit bodies as they arrive (see make_site).
            content.seek(0)
            raw = content.read(self.config.max_body_size + 1)
        if len(raw) > self.config.max_body_size:
            raise self._too_large()
        return decode_json(raw)

    async def _backend(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        """Call the backend; its errors become answers, unexpected ones a logged 500."""
        try:
            return await defer.maybeDeferred(getattr(self.service, operation), *args, **kwargs)
        except Exception as e:
            error = from_exception(e)
            if error is None:
                log.failure("task service operation {operation} failed", operation=operation)
                error = _internal_error()
            elif error.status >= 500:
                log.warn("task service operation {operation} failed: {error!r}",
                         operation=operation, error=e)
            raise error from None

    @staticmethod
    def _base(request: server.Request) -> str:
        """Where this resource is mounted ('' at the root)."""
        return "".join("/" + _text(segment) for segment in request.prepath)

    # -- operations -----------------------------------------------------

    async def add_task(self, request: server.Request) -> _Answer:
        new = _validate.new_task(self._body(request))
        operation = "add_task" if new.kind == "call" else "add_url_task"
        if new.kind == "call":
            arguments = dict(new.arguments)
            task, args, kwargs = arguments.pop("task"), arguments.pop("args"), \
                arguments.pop("kwargs")
            record = await self._backend(operation, task, args, kwargs, **arguments)
        else:
            arguments = dict(new.arguments)
            record = await self._backend(operation, arguments.pop("url"), **arguments)
        task_id = record["id"] if isinstance(record, dict) else None
        if not isinstance(task_id, str):
            log.error("task service {operation} answered without a task id", operation=operation)
            raise _internal_error()
        location = f"{self._base(request)}/tasks/{task_id}"
        log.info("task {task_id} added through the HTTP API ({kind})", task_id=task_id,
                 kind=new.kind)
        return 201, record, {"Location": location}

    async def list_tasks(self, request: server.Request) -> _Answer:
        _, _, query = request.uri.partition(b"?")
        wanted = _validate.list_query(query)
        if wanted.task is not None:
            records, position = await self._backend(
                "find", wanted.task, wanted.state, wanted.queue, wanted.limit, wanted.offset)
            return 200, {"tasks": list(records), "limit": wanted.limit,
                         "offset": wanted.offset, "next_offset": position}, {}
        records = await self._backend("list", wanted.state, wanted.queue, wanted.limit + 1,
                                      wanted.offset)
        records = list(records)
        more = len(records) > wanted.limit
        return 200, {
            "tasks": records[: wanted.limit],
            "limit": wanted.limit,
            "offset": wanted.offset,
            "next_offset": wanted.offset + wanted.limit if more else None,
        }, {}

    def _task_id(self, task_id: str) -> str:
        if not _validate.path_id(task_id):
            raise ApiError("task_not_found", f"no task {task_id[:200]!r}",
                           extra={"task_id": task_id[:200]})
        return task_id

    async def get_task(self, request: server.Request, task_id: str) -> _Answer:
        _, _, query = request.uri.partition(b"?")
        wait = _validate.task_query(query, self.config.max_wait) if query else 0.0
        if wait:
            record = await self._wait(request, self._task_id(task_id), wait)
        else:
            record = await self._backend("get", self._task_id(task_id))
        if record is None:
            raise ApiError("task_not_found", f"no task {task_id!r}", extra={"task_id": task_id})
        return 200, record, {}

    async def _wait(self, request: server.Request, task_id: str, seconds: float) -> Any:
        """
        The backend's ``wait``: the record once the task finished, or as it
        is after ``seconds``.  A client that hangs up stops the wait.
        """
        d = defer.maybeDeferred(self.service.wait, task_id, seconds)
        request.notifyFinish().addErrback(lambda _: d.called or d.cancel())
        try:
            return await d
        except defer.CancelledError:
            return None  # nobody to answer
        except Exception as e:
            error = from_exception(e)
            if error is None:
                log.failure("task service operation wait failed")
                error = _internal_error()
            raise error from None

    async def cancel_task(self, request: server.Request, task_id: str) -> _Answer:
        record = await self._backend("cancel", self._task_id(task_id))
        log.info("task {task_id} cancel requested through the HTTP API", task_id=task_id)
        return 200, record, {}

    async def requeue_task(self, request: server.Request, task_id: str) -> _Answer:
        record = await self._backend("requeue", self._task_id(task_id))
        log.info("task {task_id} requeued through the HTTP API", task_id=task_id)
        return 200, record, {}

    async def list_queues(self, request: server.Request) -> _Answer:
        queues = await self._backend("queues")
        return 200, {"queues": list(queues)}, {}

    def _queue(self, queue: str) -> str:
        if not _validate.path_queue(queue):
            raise ApiError("queue_not_found", f"no queue {queue[:200]!r}",
                           extra={"queue": queue[:200]})
        return queue

    async def pause_queue(self, request: server.Request, queue: str) -> _Answer:
        answer = await self._backend("pause", self._queue(queue))
        log.info("queue {queue} paused through the HTTP API", queue=queue)
        return 200, answer, {}

    async def resume_queue(self, request: server.Request, queue: str) -> _Answer:
        answer = await self._backend("resume", self._queue(queue))
        log.info("queue {queue} resumed through the HTTP API", queue=queue)
        return 200, answer, {}

    async def health(self, request: server.Request) -> _Answer:
        status = await self._backend("health")
        ready = isinstance(status, dict) and status.get("ready") is True
        return (200 if ready else 503), status, {}

    async def metrics(self, request: server.Request) -> _Answer:
        if self.metrics_exposition is None:
            raise ApiError("not_found", "this server has no metrics (a worker's API has)")
        from quebert.metrics import CONTENT_TYPE_LATEST

        return 200, _Text(self.metrics_exposition(), CONTENT_TYPE_LATEST), {}

    async def openapi(self, request: server.Request) -> _Answer:
        return 200, openapi.document(self.config, base_path=self._base(request)), {}


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class _ApiRequest(server.Request):
    """
    A request that refuses an oversized body while it arrives.

    ``twisted.web`` buffers a whole body (in memory, or a temporary file
    past 100 kB) before the resource sees it.  This one keeps at most the
    site's ``max_body_size`` bytes: a larger ``Content-Length``, or a
    chunked body growing past the limit, is read and thrown away, and the
    resource answers 413.  A failure escaping a resource gets a JSON 500,
    never twisted's HTML traceback page.
    """

    _quebert_too_large = False
    _quebert_received = 0
    _quebert_started: Optional[float] = None

    def _limit(self) -> Optional[int]:
        return getattr(getattr(self.channel, "site", None), "max_body_size", None)

    def gotLength(self, length: Optional[int]) -> None:
        limit = self._limit()
        if limit is None:
            super().gotLength(length)
            return
        site = getattr(self.channel, "site", None)
        self._quebert_started = site.reactor.seconds() if site is not None else None
        if length is not None and length > limit:
            self._quebert_too_large = True
            # No "100 Continue" invitation to send a body that will be refused.
            self.requestHeaders.removeHeader(b"expect")
        self.content = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        limit = self._limit()
        if limit is None:
            super().handleContentChunk(data)
            return
        if self._quebert_too_large:
            return
        self._quebert_received += len(data)
        if self._quebert_received > limit:
            self._quebert_too_large = True
            self.content = io.BytesIO()
            return
        self.content.write(data)

    def processingFailed(self, reason: Failure) -> Failure:
        log.failure("the HTTP API failed on {method} {path}", failure=reason,
                    method=_text(self.method), path=_text(self.path))
        error = _internal_error()
        if not self.startedWriting and not self.finished:
            _write(self, error.status, error.body())
        return reason


class _ApiSite(server.Site):
    """A site with the API's body limit and structured access logs."""

    def __init__(self, resource: Any, config: ApiConfig, reactor: Any) -> None:
        super().__init__(resource, requestFactory=_ApiRequest, reactor=reactor,
                         timeout=config.idle_timeout, parsePOSTFormSubmission=False)
        self.max_body_size = config.max_body_size
        self.max_connections = config.max_connections
        self.displayTracebacks = False
        self.noisy = False
        #: HTTP connections open now.
        self.open_connections = 0
        self._refusing = False
        if isinstance(resource, ApiResource):
            resource._site_reactor = reactor

    def buildProtocol(self, addr: Any) -> Any:
        """
        A connection beyond ``max_connections`` is answered 503 and closed
        at once, without reading it (logged once a burst).
        """
        if self.open_connections >= self.max_connections:
            if not self._refusing:
                log.warn("HTTP API: {count} connections open, the most allowed; closing new "
                         "ones until some end", count=self.open_connections)
                self._refusing = True
            return _Refused()
        channel = super().buildProtocol(addr)
        if channel is None:
            return None
        self.open_connections += 1
        lost = channel.connectionLost

        def counted(reason: Any) -> None:
            self.open_connections -= 1
            if self.open_connections < self.max_connections:
                self._refusing = False
            lost(reason)

        channel.connectionLost = counted
        return channel

    def log(self, request: server.Request) -> None:
        started = getattr(request, "_quebert_started", None)
        duration = (self.reactor.seconds() - started) if started is not None else None
        uri = _text(request.uri)
        log.info(
            "{client} {method} {uri} {status} {size} {duration_ms}ms access={access}",
            client=_client(request),
            method=_text(request.method)[:20],
            uri=uri if len(uri) <= 500 else uri[:500] + "...",
            status=request.code,
            size=request.sentLength,
            duration_ms=None if duration is None else round(duration * 1000, 1),
            access=getattr(request, "_quebert_access", None),
            user_agent=_text(request.getHeader(b"user-agent") or b"")[:200],
        )


class _Refused(Protocol):
    """A connection over the limit: a bare 503, then closed."""

    def connectionMade(self) -> None:
        self.transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                             b"Retry-After: 5\r\nConnection: close\r\n\r\n")
        self.transport.loseConnection()


def _client(request: server.Request) -> str:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return host if host is not None else str(address)


def make_site(service: Any, config: ApiConfig, reactor: Any = None,
              metrics: Optional[Callable[[], bytes]] = None) -> server.Site:
    """
    A :class:`~twisted.web.server.Site` serving the HTTP task API of
    ``service`` (an :class:`~quebert.api.interfaces.ITaskService`) at its
    root; listen on it with ``endpoint.listen(site)``.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    if not isinstance(config, ApiConfig):
        raise TypeError(f"config must be an ApiConfig, not {type(config).__name__}")
    return _ApiSite(ApiResource(service, config, metrics), config, reactor)
