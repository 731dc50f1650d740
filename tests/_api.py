"""
A live HTTP task API for tests: a real server on 127.0.0.1, port 0, with a
:class:`~quebert.api.MemoryTaskService` behind it, and a treq client.

The server's connections are tracked so that cleanup waits until every one
is closed: trial then finds a clean reactor.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Optional

import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.protocols.policies import WrappingFactory
from twisted.web.client import Agent, HTTPConnectionPool

from quebert.api import ApiConfig, MemoryTaskService, make_site

RW = "rw-token-0123456789"
RO = "ro-token-9876543210"
TASKS = ("app.add", "app.send")


class _Tracked(WrappingFactory):
    """Counts live server connections; ``idle()`` fires when there are none."""

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self._waiting: list = []

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def idle(self) -> defer.Deferred:
        if not self.protocols:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        return d


class Response:
    """What a test looks at: status, headers (lower-case names) and body."""

    def __init__(self, code: int, headers: Dict[str, list], raw: bytes) -> None:
        self.code = code
        self.headers = headers
        self.raw = raw

    def header(self, name: str) -> Optional[str]:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    @property
    def json(self) -> Any:
        return json.loads(self.raw)

    def __repr__(self) -> str:
        return f"<Response {self.code} {self.raw[:300]!r}>"


class LiveAPI:
    """
    Mixin for a trial ``TestCase``: ``start_api()`` in ``setUp`` serves an
    API; ``request()`` talks to it.
    """

    service: MemoryTaskService
    base: str

    async def start_api(self, service: Any = None, config: Optional[ApiConfig] = None,
                        metrics: Any = None, **config_options: Any) -> None:
        self.service = service if service is not None else MemoryTaskService(tasks=TASKS)
        if config is None:
            options: Dict[str, Any] = {"read_write_tokens": (RW,), "read_only_tokens": (RO,)}
            options.update(config_options)
            config = ApiConfig(**options)
        self.config = config
        self.factory = _Tracked(make_site(self.service, config, reactor=reactor,
                                          metrics=metrics))
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.factory)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=pool)
        self.addCleanup(self.factory.idle)  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)  # type: ignore[attr-defined]

    async def request(self, method: str, path: str, *, token: Optional[str] = RW,
                      json_body: Any = None, data: Any = None,
                      headers: Optional[Mapping[str, str]] = None) -> Response:
        sent: Dict[str, list] = {}
        if token is not None:
            sent["Authorization"] = [f"Bearer {token}"]
        if json_body is not None:
            data = json.dumps(json_body).encode("utf-8")
            sent["Content-Type"] = ["application/json"]
        for name, value in (headers or {}).items():
            sent[name] = [value]
        response = await treq.request(method, self.base + path, headers=sent, data=data,
                                      agent=self.agent)
        raw = await treq.content(response)
        found = {name.decode("ascii").lower(): [v.decode("latin-1") for v in values]
                 for name, values in response.headers.getAllRawHeaders()}
        return Response(response.code, found, raw)

    async def post_task(self, **body: Any) -> Response:
        body.setdefault("kind", "call")
        if body["kind"] == "call":
            body.setdefault("task", "app.add")
        return await self.request("POST", "/tasks", json_body=body)

    def assertError(self, response: Response, status: int, code: str,
                    field: Any = ...) -> Dict[str, Any]:
        """Check an error answer and return its error object."""
        test: Any = self
        test.assertEqual((response.code, response.header("content-type")),
                         (status, "application/json"), response)
        body = response.json
        test.assertEqual(set(body), {"error"})
        error = body["error"]
        test.assertEqual(error["code"], code, response)
        test.assertIsInstance(error["message"], str)
        test.assertIn("field", error)
        if field is not ...:
            test.assertEqual(error["field"], field, response)
        test.assertNotIn(b"Traceback", response.raw)
        return error

