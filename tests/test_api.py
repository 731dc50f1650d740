# -*- test-case-name: tests.test_api -*-
"""
Tests for the HTTP task API (quebert.api), through a real HTTP server on
127.0.0.1 and treq, plus fast in-process checks of its configuration and
validation.
"""

from __future__ import annotations

import base64
import json
from typing import Any, List, Tuple

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyChannel
from zope.interface.exceptions import Invalid

from quebert.api import ApiConfig, ApiResource, MemoryTaskService, make_site
from quebert.api._errors import ApiError
from quebert.api._validate import list_query, new_task
from quebert.api.resource import _ApiRequest, decode_json
from quebert.errors import (
    BrokerError,
    ConfigurationError,
    StateError,
    URLRefused,
)
from quebert.state.interface import FAILED, SUCCEEDED
from tests._api import RO, RW, LiveAPI, _Tracked

#: A body is valid JSON and then one field is wrong: (body, field at fault).
BAD_FIELDS: List[Tuple[dict, str]] = [
    ({"kind": "call"}, "task"),
    ({"kind": "call", "task": 3}, "task"),
    ({"kind": "call", "task": "not a name"}, "task"),
    ({"kind": "call", "task": "app.add", "args": {"a": 1}}, "args"),
    ({"kind": "call", "task": "app.add", "args": "1,2"}, "args"),
    ({"kind": "call", "task": "app.add", "kwargs": [1]}, "kwargs"),
    ({"kind": "call", "task": "app.add", "kwargs": {"_queue": "x"}}, "kwargs._queue"),
    ({"kind": "call", "task": "app.add", "queue": 5}, "queue"),
    ({"kind": "call", "task": "app.add", "queue": "bad queue"}, "queue"),
    ({"kind": "call", "task": "app.add", "queue": "q1\n"}, "queue"),
    ({"kind": "call", "task": "app.add", "queue": "q1\r\n"}, "queue"),
    ({"kind": "call", "task": "app.add\n"}, "task"),
    ({"kind": "url", "url": "http://example.com/", "queue": "q1\n"}, "queue"),
    ({"kind": "call", "task": "app.add", "countdown": "10"}, "countdown"),
    ({"kind": "call", "task": "app.add", "countdown": -1}, "countdown"),
    ({"kind": "call", "task": "app.add", "countdown": True}, "countdown"),
    ({"kind": "call", "task": "app.add", "countdown": 1e12}, "countdown"),
    ({"kind": "call", "task": "app.add", "countdown": 10**400}, "countdown"),
    ({"kind": "call", "task": "app.add", "eta": 10**400}, "eta"),
    ({"kind": "call", "task": "app.add", "timeout": -10**400}, "timeout"),
    ({"kind": "call", "task": "app.add", "retry": {"min_backoff": 10**400}},
     "retry.min_backoff"),
    ({"kind": "call", "task": "app.add", "retry": {"max_attempts": 10**400}},
     "retry.max_attempts"),
    ({"kind": "call", "task": "app.add", "eta": "tomorrow"}, "eta"),
    ({"kind": "call", "task": "app.add", "eta": "2030-01-01T00:00:00"}, "eta"),
    ({"kind": "call", "task": "app.add", "eta": "2030-02-30T00:00:00Z"}, "eta"),
    ({"kind": "call", "task": "app.add", "eta": -5}, "eta"),
    ({"kind": "call", "task": "app.add", "eta": [1]}, "eta"),
    ({"kind": "call", "task": "app.add", "countdown": 5, "eta": 1767225600}, "eta"),
    ({"kind": "call", "task": "app.add", "name": "has space"}, "name"),
    ({"kind": "call", "task": "app.add", "name": "n-1\n"}, "name"),
    ({"kind": "call", "task": "app.add", "name": 12}, "name"),
    ({"kind": "call", "task": "app.add", "retry": 3}, "retry"),
    ({"kind": "call", "task": "app.add", "retry": {"max_attempts": "3"}}, "retry.max_attempts"),
    ({"kind": "call", "task": "app.add", "retry": {"max_attempts": 0}}, "retry.max_attempts"),
    ({"kind": "call", "task": "app.add", "retry": {"max_attempts": 2.5}}, "retry.max_attempts"),
    ({"kind": "call", "task": "app.add", "retry": {"max_attempts": -2}}, "retry.max_attempts"),
    ({"kind": "call", "task": "app.add", "retry": {"min_backoff": -1}}, "retry.min_backoff"),
    ({"kind": "call", "task": "app.add", "retry": {"max_backoff": "x"}}, "retry.max_backoff"),
    ({"kind": "call", "task": "app.add", "retry": {"max_doublings": 1.5}},
     "retry.max_doublings"),
    ({"kind": "call", "task": "app.add", "retry": {"max_retry_duration": False}},
     "retry.max_retry_duration"),
    ({"kind": "call", "task": "app.add", "retry": {"jitter": 2}}, "retry.jitter"),
    ({"kind": "call", "task": "app.add", "retry": {"min_backoff": 10, "max_backoff": 5}},
     "retry.max_backoff"),
    ({"kind": "call", "task": "app.add", "retry": {"attempts": 3}}, "retry.attempts"),
    ({"kind": "call", "task": "app.add", "timeout": 0}, "timeout"),
    ({"kind": "call", "task": "app.add", "timeout": "5"}, "timeout"),
    ({"kind": "call", "task": "app.add", "countdwon": 5}, "countdwon"),
    ({"kind": "call", "task": "app.add", "url": "http://example.com/"}, "url"),
    ({"kind": "call", "task": "app.add", "dispatch_deadline": 5}, "dispatch_deadline"),
    ({"kind": "shell", "task": "app.add"}, "kind"),
    ({"kind": ["call"]}, "kind"),
    ({"task": "app.add"}, "kind"),
    ({"kind": "url"}, "url"),
    ({"kind": "url", "url": 7}, "url"),
    ({"kind": "url", "url": "ftp://example.com/x"}, "url"),
    ({"kind": "url", "url": "/relative"}, "url"),
    ({"kind": "url", "url": "http://exa mple.com/"}, "url"),
    ({"kind": "url", "url": "http://example.com:99999/"}, "url"),
    ({"kind": "url", "url": "http://example.com/\u00e9"}, "url"),
    ({"kind": "url", "url": "http://example.com/", "method": "GE T"}, "method"),
    ({"kind": "url", "url": "http://example.com/", "method": "GET\r\nX: y"}, "method"),
    ({"kind": "url", "url": "http://example.com/", "method": 1}, "method"),
    ({"kind": "url", "url": "http://example.com/", "headers": ["a"]}, "headers"),
    ({"kind": "url", "url": "http://example.com/", "headers": {"X-A": 1}}, "headers.X-A"),
    ({"kind": "url", "url": "http://example.com/", "headers": {"X-A": "a\r\nB: c"}},
     "headers.X-A"),
    ({"kind": "url", "url": "http://example.com/", "headers": {"X-A": "a\nb"}}, "headers.X-A"),
    ({"kind": "url", "url": "http://example.com/", "headers": {"X-A": "a\x00"}}, "headers.X-A"),
    ({"kind": "url", "url": "http://example.com/", "headers": {"X A": "a"}}, "headers.X A"),
    ({"kind": "url", "url": "http://example.com/", "headers": {"X-A\n": "a"}}, "headers.X-A\n"),
    ({"kind": "url", "url": "http://example.com/", "headers": {"X\r\nA": "a"}},
     "headers.X\r\nA"),
    ({"kind": "url", "url": "http://example.com/", "headers": {"Host": "evil"}}, "headers.Host"),
    ({"kind": "url", "url": "http://example.com/", "headers": {"a": "1", "A": "2"}},
     "headers.A"),
    ({"kind": "url", "url": "http://example.com/", "body": 5}, "body"),
    ({"kind": "url", "url": "http://example.com/", "body": "a", "body_base64": "YQ=="},
     "body_base64"),
    ({"kind": "url", "url": "http://example.com/", "body_base64": "not base64!"}, "body_base64"),
    ({"kind": "url", "url": "http://example.com/", "dispatch_deadline": -1},
     "dispatch_deadline"),
    ({"kind": "url", "url": "http://example.com/", "task": "app.add"}, "task"),
    ({"kind": "url", "url": "http://example.com/", "timeout": 3}, "timeout"),
    ({"kind": "call", "task": "app.add", "context": ["db"]}, "context"),
    ({"kind": "call", "task": "app.add", "context": {"1db": "x"}}, "context"),
    ({"kind": "call", "task": "app.add", "context": {"db\n": "x"}}, "context"),
    ({"kind": "call", "task": "app.add", "context": {f"k{i}": i for i in range(51)}},
     "context"),
    ({"kind": "call", "task": "app.add", "context": {"k": "x" * 8192}}, "context"),
    ({"kind": "call", "task": "app.add", "context": {"roles": ["a"]}}, "context.roles"),
    ({"kind": "url", "url": "http://example.com/", "context": {"user": {"id": 1}}},
     "context.user"),
]


class ValidationTests(SynchronousTestCase):
    """The request checks, without HTTP."""

    def test_bad_fields(self) -> None:
        """Every malformed field is refused with a 400 naming it."""
        wrong = []
        for body, field in BAD_FIELDS:
            try:
                new_task(body)
            except ApiError as e:
                if (e.status, e.code, e.field) != (400, "invalid_field", field):
                    wrong.append((body, e.status, e.code, e.field))
            else:
                wrong.append((body, "accepted"))
        self.assertEqual(wrong, [])

    def test_call_task(self) -> None:
        """A call task's options come out typed for ``add_task``."""
        task = new_task({
            "kind": "call", "task": "app.add", "args": [1], "kwargs": {"b": 2},
            "queue": "q1", "eta": "2030-01-01T00:00:00.1234567+01:00", "name": "n-1",
            "retry": {"max_attempts": 3.0, "min_backoff": 1, "jitter": 0.5}, "timeout": 2,
        })
        self.assertEqual(task.kind, "call")
        self.assertEqual(dict(task.arguments), {
            "task": "app.add", "args": [1], "kwargs": {"b": 2}, "queue": "q1",
            "eta": 1893452400.123456, "name": "n-1",
            "retry": {"max_attempts": 3, "min_backoff": 1.0, "jitter": 0.5}, "timeout": 2.0,
        })
        self.assertIsInstance(task.arguments["retry"]["max_attempts"], int)

    def test_context(self) -> None:
        """A context is passed on checked; null or absent, it is not passed at all."""
        context = {"db_id": "db", "container_id": "site", "user_id": "u", "n": 1.5,
                   "ok": True, "none": None}
        for kind, extra in (("call", {"task": "app.add"}), ("url", {"url": "http://h/"})):
            task = new_task({"kind": kind, "context": context, **extra})
            self.assertEqual(task.arguments["context"], context)
            self.assertNotIn("context", new_task({"kind": kind, "context": None, **extra})
                             .arguments)

    def test_nulls_are_absent(self) -> None:
        """``null`` options are the same as leaving them out."""
        task = new_task({"kind": "call", "task": "app.add", "args": None, "kwargs": None,
                         "queue": None, "countdown": None, "eta": None, "name": None,
                         "retry": {"max_attempts": None}, "timeout": None})
        self.assertEqual(dict(task.arguments), {"task": "app.add", "args": [], "kwargs": {},
                                                "retry": {}})

    def test_url_task(self) -> None:
        """A URL task's body is bytes, from text or base64."""
        task = new_task({"kind": "url", "url": "https://example.com/hook?a=1",
                         "method": "PUT", "headers": {"X-Token": "a\tb"},
                         "body_base64": base64.b64encode(b"\x00\xff").decode(),
                         "countdown": 0, "dispatch_deadline": 30})
        self.assertEqual(dict(task.arguments), {
            "url": "https://example.com/hook?a=1", "method": "PUT",
            "headers": {"X-Token": "a\tb"}, "body": b"\x00\xff", "countdown": 0.0,
            "dispatch_deadline": 30.0})
        self.assertEqual(new_task({"kind": "url", "url": "http://h/", "body": "h\u00e9"})
                         .arguments["body"], "h\u00e9".encode())

    def test_not_an_object(self) -> None:
        for body in ([], "x", 1, None):
            error = self.assertRaises(ApiError, new_task, body)
            self.assertEqual((error.status, error.field), (400, None))

    def test_strict_json(self) -> None:
        """NaN, duplicate keys, bad UTF-8, deep nesting and empty bodies are refused."""
        for raw in (b'{"a": NaN}', b'{"a": Infinity}', b'{"a": 1, "a": 2}', b"\xff{}",
                    b"", b"  ", b"{", b"[" * 100000, b"1" * 5000):
            error = self.assertRaises(ApiError, decode_json, raw)
            self.assertEqual((error.status, error.code), (400, "invalid_json"), raw[:20])
        self.assertEqual(decode_json(b'{"a": [1, 2.5, "\\u00e9"]}'), {"a": [1, 2.5, "\u00e9"]})

    def test_list_query(self) -> None:
        self.assertEqual(list_query(b"state=failed&queue=q&limit=5&offset=10").limit, 5)
        self.assertEqual(list_query(b"").limit, 100)
        for query, field in ((b"state=nope", "state"), (b"limit=0", "limit"),
                             (b"limit=1001", "limit"), (b"limit=-1", "limit"),
                             (b"limit=1.5", "limit"), (b"offset=-1", "offset"),
                             (b"offset=x", "offset"), (b"queue=a%20b", "queue"),
                             (b"queue=q1%0A", "queue"), (b"queue=q1%0D%0A", "queue"),
                             (b"sort=id", "sort"), (b"limit=1&limit=2", "limit"),
                             (b"state=%ff", None)):
            error = self.assertRaises(ApiError, list_query, query)
            self.assertEqual((error.status, error.field), (400, field), query)


class ConfigTests(SynchronousTestCase):
    def test_no_token_is_refused(self) -> None:
        """An API nobody can use, or that is open by accident, is a configuration error."""
        self.assertRaises(ConfigurationError, ApiConfig)
        self.assertTrue(ApiConfig(anonymous="read-write").open)
        self.assertFalse(ApiConfig(read_only_tokens=("t",)).open)

    def test_bad_values(self) -> None:
        for options in ({"read_write_tokens": "abc"}, {"read_write_tokens": ("",)},
                        {"read_write_tokens": ("a b",)}, {"read_write_tokens": ("\u00e9",)},
                        {"read_write_tokens": ("t",), "read_only_tokens": ("t",)},
                        {"read_write_tokens": ("t",), "anonymous": "all"},
                        {"read_write_tokens": ("t",), "max_body_size": 0},
                        {"read_write_tokens": ("t",), "idle_timeout": -1}):
            self.assertRaises(ConfigurationError, ApiConfig, **options)

    def test_repr_hides_tokens(self) -> None:
        config = ApiConfig(read_write_tokens=("secret-1",), read_only_tokens=("secret-2",))
        self.assertNotIn("secret", repr(config))

    def test_resource_checks_its_backend(self) -> None:
        """A backend that is not an ITaskService is refused when the API is built."""
        self.assertRaises(Invalid, ApiResource, object(), ApiConfig(read_write_tokens=("t",)))


class BodyLimitTests(SynchronousTestCase):
    """The request class keeps at most the limit in memory, whatever arrives."""

    def request(self, length: Any) -> Any:
        channel = DummyChannel()
        channel.site = make_site(MemoryTaskService(clock=Clock()),
                                 ApiConfig(read_write_tokens=("t",), max_body_size=10),
                                 reactor=Clock())
        request = _ApiRequest(channel)
        request.gotLength(length)
        return request

    def test_announced(self) -> None:
        request = self.request(11)
        for _ in range(1000):
            request.handleContentChunk(b"x" * 1000)
        self.assertTrue(request._quebert_too_large)
        self.assertEqual(request.content.getvalue(), b"")

    def test_chunked(self) -> None:
        request = self.request(None)
        request.handleContentChunk(b"x" * 6)
        request.handleContentChunk(b"x" * 4)
        self.assertEqual((request._quebert_too_large, request.content.getvalue()),
                         (False, b"x" * 10))
        for _ in range(1000):
            request.handleContentChunk(b"x" * 1000)
        self.assertTrue(request._quebert_too_large)
        self.assertEqual(request.content.getvalue(), b"")


class _Failing(MemoryTaskService):
    """A backend whose operations fail as a test says."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.errors: dict = {}

    def _maybe_fail(self, operation: str, result: Any) -> Any:
        if operation in self.errors:
            return defer.fail(self.errors[operation])
        return result

    def add_task(self, *args: Any, **kwargs: Any) -> defer.Deferred:
        return self._maybe_fail("add_task", super().add_task(*args, **kwargs))

    def add_url_task(self, *args: Any, **kwargs: Any) -> defer.Deferred:
        return self._maybe_fail("add_url_task", super().add_url_task(*args, **kwargs))

    def get(self, task_id: str) -> defer.Deferred:
        if "get-sync" in self.errors:
            raise self.errors["get-sync"]
        return self._maybe_fail("get", super().get(task_id))

    def health(self) -> defer.Deferred:
        return self._maybe_fail("health", super().health())


class HTTPTests(LiveAPI, TestCase):
    """Every endpoint, through a real server."""

    async def setUp(self) -> None:
        await self.start_api(_Failing(tasks=("app.add", "app.send"), queues=("default", "q1")))

    # -- POST /tasks -----------------------------------------------------

    async def test_add_call_task(self) -> None:
        """201, the record, and a Location where the record can be read."""
        response = await self.post_task(args=[1, 2], kwargs={"c": 3}, queue="q1",
                                        retry={"max_attempts": 2}, timeout=5)
        self.assertEqual(response.code, 201, response)
        record = response.json
        self.assertEqual((record["state"], record["queue"], record["kind"], record["task"]),
                         ("queued", "q1", "call", "app.add"))
        self.assertEqual(response.header("location"), f"/tasks/{record['id']}")
        published = self.service.published[record["id"]]
        self.assertEqual((published["args"], published["kwargs"], published["retry"],
                          published["timeout"]), ([1, 2], {"c": 3}, {"max_attempts": 2}, 5.0))
        again = await self.request("GET", response.header("location"), token=RO)
        self.assertEqual((again.code, again.json), (200, record))

    async def test_add_with_context(self) -> None:
        """The context reaches the backend, for call and URL tasks; a bad one is a 400."""
        context = {"db_id": "db", "container_id": "site", "user_id": "alice"}
        call = await self.post_task(context=context)
        self.assertEqual(call.code, 201, call)
        self.assertEqual(self.service.published[call.json["id"]]["context"], context)
        url = await self.post_task(kind="url", url="https://example.com/x", context=context)
        self.assertEqual(url.code, 201, url)
        self.assertEqual(self.service.published[url.json["id"]]["context"], context)
        bad = await self.post_task(context={"db": {"nested": 1}})
        error = self.assertError(bad, 400, "invalid_field", "context.db")
        self.assertIn("string, number, boolean or null", error["message"])

    async def test_add_scheduled(self) -> None:
        """countdown and eta (number or RFC 3339) make a scheduled task."""
        by_countdown = (await self.post_task(countdown=3600)).json
        self.assertEqual(by_countdown["state"], "scheduled")
        self.assertApproximates(by_countdown["eta"], by_countdown["created_at"] + 3600, 1)
        by_number = (await self.post_task(eta=4102444800)).json
        self.assertEqual((by_number["state"], by_number["eta"]), ("scheduled", 4102444800.0))
        by_text = (await self.post_task(eta="2100-01-01T00:00:00Z")).json
        self.assertEqual(by_text["eta"], 4102444800.0)

    async def test_add_url_task(self) -> None:
        response = await self.post_task(kind="url", url="https://example.com/hook",
                                        method="PUT", headers={"X-Sig": "abc"},
                                        body="{\"a\": 1}", dispatch_deadline=10, name="hook-1")
        self.assertEqual(response.code, 201, response)
        record = response.json
        self.assertEqual((record["kind"], record["url"], record["method"], record["name"]),
                         ("url", "https://example.com/hook", "PUT", "hook-1"))
        published = self.service.published[record["id"]]
        self.assertEqual((published["body"], published["headers"],
                          published["dispatch_deadline"]),
                         (b'{"a": 1}', {"X-Sig": "abc"}, 10.0))
        binary = await self.post_task(kind="url", url="http://example.com/",
                                      body_base64=base64.b64encode(b"\x00\x01").decode())
        self.assertEqual(self.service.published[binary.json["id"]]["body"], b"\x00\x01")
        self.assertEqual(self.service.published[binary.json["id"]]["method"], "POST")

    async def test_invalid_fields(self) -> None:
        """Each malformed field gets a 400 that names it."""
        wrong = []
        for body, field in BAD_FIELDS:
            response = await self.request("POST", "/tasks", json_body=body)
            error = response.json.get("error", {})
            if (response.code, error.get("code"), error.get("field")) != (
                    400, "invalid_field", field):
                wrong.append((body, response))
        self.assertEqual(wrong, [])
        self.assertEqual(self.service.published, {})

    async def test_malformed_json(self) -> None:
        for raw in (b"{", b"[1, 2]", b'{"kind": NaN}', b"\xfe\xff", b"",
                    b'{"kind": "call", "kind": "url"}'):
            response = await self.request("POST", "/tasks", data=raw,
                                          headers={"Content-Type": "application/json"})
            self.assertEqual(response.code, 400, (raw, response))
            self.assertIn(response.json["error"]["code"], ("invalid_json", "invalid_field"))

    async def test_overflowing_numbers(self) -> None:
        """1e400 reads as infinity: refused as not finite, naming the field."""
        for field, raw in (("countdown", b'"countdown": 1e400'),
                           ("retry.max_doublings", b'"retry": {"max_doublings": 1e400}'),
                           ("eta", b'"eta": -1e400')):
            response = await self.request(
                "POST", "/tasks", data=b'{"kind": "call", "task": "app.add", ' + raw + b"}",
                headers={"Content-Type": "application/json"})
            self.assertError(response, 400, "invalid_field", field)

    async def test_content_type(self) -> None:
        """Bodies must be declared application/json (415 otherwise)."""
        body = json.dumps({"kind": "call", "task": "app.add"}).encode()
        for content_type in (None, "text/plain", "application/x-www-form-urlencoded",
                             "application/json; charset=latin-1", "application/jsonx"):
            headers = {"Content-Type": content_type} if content_type else {}
            response = await self.request("POST", "/tasks", data=body, headers=headers)
            self.assertError(response, 415, "unsupported_media_type")
        ok = await self.request("POST", "/tasks", data=body,
                                headers={"Content-Type": "Application/JSON; charset=UTF-8"})
        self.assertEqual(ok.code, 201, ok)

    async def test_too_large(self) -> None:
        """A body over the limit is a 413, whether its length is announced or not."""
        big = json.dumps({"kind": "call", "task": "app.add",
                          "args": ["x" * (1024 * 1024)]}).encode()
        response = await self.request("POST", "/tasks", data=big,
                                      headers={"Content-Type": "application/json"})
        self.assertError(response, 413, "payload_too_large")
        # Unknown length: treq sends it chunked.
        chunked = await self.request("POST", "/tasks", data=FileBodyProducer(_Unsized(big)),
                                     headers={"Content-Type": "application/json"})
        self.assertError(chunked, 413, "payload_too_large")
        self.assertEqual(self.service.published, {})

    async def test_too_large_no_continue(self) -> None:
        """An announced oversized body gets no "100 Continue" invitation, then a 413."""
        received = bytearray()

        class Raw(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.extend(data)

        host, port = self.base.rsplit(":", 1)
        size = 2 * 1024 * 1024
        raw = await TCP4ClientEndpoint(reactor, "127.0.0.1", int(port)).connect(
            Factory.forProtocol(Raw))
        self.addCleanup(raw.transport.loseConnection)
        raw.transport.write(
            b"POST /tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + RW.encode()
            + b"\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
            + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (size,))
        await deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(bytes(received), b"")
        raw.transport.write(b" " * size)
        for _ in range(100):
            if b"payload_too_large" in received:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(received.startswith(b"HTTP/1.1 413 "), bytes(received[:200]))

    async def test_duplicate_name(self) -> None:
        """409 with the id of the task holding the name."""
        first = await self.post_task(name="once")
        second = await self.post_task(name="once")
        error = self.assertError(second, 409, "task_already_exists", "name")
        self.assertEqual((error["task_id"], error["name"]), (first.json["id"], "once"))

    async def test_unknown_task(self) -> None:
        self.assertError(await self.post_task(task="app.missing"), 422, "unknown_task", "task")

    async def test_url_refused(self) -> None:
        """A URL the backend's guardrails refuse is a 422 naming the field."""
        refused = URLRefused("private networks are not allowed")
        self.service.errors["add_url_task"] = refused
        response = await self.post_task(kind="url", url="http://10.0.0.1/")
        self.assertError(response, 422, "url_refused", "url")
        refused.field = "body"  # type: ignore[attr-defined]
        response = await self.post_task(kind="url", url="http://example.com/")
        self.assertError(response, 422, "url_refused", "body")

    async def test_backend_configuration_error(self) -> None:
        self.service.errors["add_task"] = ConfigurationError("queue q9 has no such option")
        self.assertError(await self.post_task(), 400, "invalid_field", None)

    # -- backend failures ----------------------------------------------

    async def test_backend_unavailable(self) -> None:
        """Broker or state store down: 503 with Retry-After, no detail."""
        self.service.errors["add_task"] = BrokerError("amqp://guest:secret@rabbit down")
        response = await self.post_task()
        self.assertError(response, 503, "service_unavailable")
        self.assertEqual(response.header("retry-after"), "5")
        self.assertNotIn(b"secret", response.raw)
        self.service.errors["get"] = StateError("redis down")
        self.assertError(await self.request("GET", "/tasks/abc"), 503, "service_unavailable")

    async def test_backend_bug(self) -> None:
        """An unexpected exception is a generic 500, logged, never shown."""
        self.service.errors["get"] = ZeroDivisionError("secret detail")
        response = await self.request("GET", "/tasks/abc")
        self.assertError(response, 500, "internal_error")
        self.assertNotIn(b"secret", response.raw)
        self.assertNotIn(b"ZeroDivision", response.raw)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        # raised synchronously instead of through the Deferred
        self.service.errors = {"get-sync": KeyError("secret")}
        response = await self.request("GET", "/tasks/abc")
        self.assertError(response, 500, "internal_error")
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    async def test_backend_returns_garbage(self) -> None:
        """A record that cannot be encoded is a 500 too, not a hung request."""
        def bad_health() -> defer.Deferred:
            return defer.succeed({"ready": True, "live": object()})

        self.service.health = bad_health  # type: ignore[method-assign]
        response = await self.request("GET", "/health", token=None)
        self.assertError(response, 500, "internal_error")
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    # -- GET /tasks ------------------------------------------------------

    async def test_list_and_filters(self) -> None:
        ids = []
        for queue in ("default", "q1", "default", "q1", "default"):
            ids.append((await self.post_task(queue=queue)).json["id"])
        await self.service.state.finished(ids[0], FAILED, 1, {}, 4102444800.0, reason="x")
        everything = (await self.request("GET", "/tasks", token=RO)).json
        self.assertEqual((len(everything["tasks"]), everything["limit"], everything["offset"],
                          everything["next_offset"]), (5, 100, 0, None))
        self.assertEqual(everything["tasks"][0]["id"], ids[0])  # most recently updated
        q1 = (await self.request("GET", "/tasks?queue=q1")).json["tasks"]
        self.assertEqual({t["id"] for t in q1}, {ids[1], ids[3]})
        failed = (await self.request("GET", "/tasks?state=failed")).json["tasks"]
        self.assertEqual([t["id"] for t in failed], [ids[0]])
        both = (await self.request("GET", "/tasks?state=queued&queue=default")).json["tasks"]
        self.assertEqual({t["id"] for t in both}, {ids[2], ids[4]})

    async def test_paging(self) -> None:
        for _ in range(5):
            await self.post_task()
        seen = []
        offset: Any = 0
        pages = 0
        while offset is not None:
            page = (await self.request("GET", f"/tasks?limit=2&offset={offset}")).json
            self.assertLessEqual(len(page["tasks"]), 2)
            seen += [t["id"] for t in page["tasks"]]
            offset = page["next_offset"]
            pages += 1
        self.assertEqual((len(seen), len(set(seen)), pages), (5, 5, 3))
        exact = (await self.request("GET", "/tasks?limit=5")).json
        self.assertEqual(exact["next_offset"], None)
        beyond = (await self.request("GET", "/tasks?offset=50")).json
        self.assertEqual((beyond["tasks"], beyond["next_offset"]), ([], None))

    async def test_list_bad_query(self) -> None:
        for query, field in (("state=done", "state"), ("limit=0", "limit"),
                             ("limit=5000", "limit"), ("offset=-2", "offset"),
                             ("color=red", "color")):
            self.assertError(await self.request("GET", f"/tasks?{query}"), 400,
                             "invalid_field", field)

    # -- one task ----------------------------------------------------------

    async def test_get_unknown(self) -> None:
        error = self.assertError(await self.request("GET", "/tasks/nope"), 404,
                                 "task_not_found")
        self.assertEqual(error["task_id"], "nope")
        # ids that cannot exist, even percent-encoded
        for path in ("/tasks/a%2Fb", "/tasks/a%20b", "/tasks/" + "a" * 201, "/tasks/nope%0A"):
            self.assertError(await self.request("GET", path), 404, "task_not_found")
        # not even UTF-8: no route matches
        self.assertError(await self.request("GET", "/tasks/%ff"), 404, "not_found")

    async def test_cancel(self) -> None:
        """Cancel a waiting task; 409 once it has finished; 404 if unknown."""
        task_id = (await self.post_task()).json["id"]
        response = await self.request("DELETE", f"/tasks/{task_id}")
        self.assertEqual((response.code, response.json["state"]), (200, "canceled"), response)
        again = await self.request("DELETE", f"/tasks/{task_id}")
        self.assertEqual(self.assertError(again, 409, "task_state_conflict")["state"],
                         "canceled")
        done = (await self.post_task()).json["id"]
        await self.service.state.finished(done, SUCCEEDED, 1, {}, 4102444800.0, result=3)
        error = self.assertError(await self.request("DELETE", f"/tasks/{done}"), 409,
                                 "task_state_conflict")
        self.assertEqual((error["state"], error["task_id"]), ("succeeded", done))
        self.assertError(await self.request("DELETE", "/tasks/nope"), 404, "task_not_found")

    async def test_requeue(self) -> None:
        task_id = (await self.post_task()).json["id"]
        not_failed = await self.request("POST", f"/tasks/{task_id}/requeue")
        self.assertEqual(self.assertError(not_failed, 409, "task_state_conflict")["state"],
                         "queued")
        await self.service.state.finished(task_id, FAILED, 3, {}, 4102444800.0,
                                          reason="attempts spent")
        response = await self.request("POST", f"/tasks/{task_id}/requeue")
        self.assertEqual((response.code, response.json["state"], response.json["attempts"]),
                         (200, "queued", 3), response)
        self.assertError(await self.request("POST", "/tasks/nope/requeue"), 404,
                         "task_not_found")

    # -- queues ------------------------------------------------------------

    async def test_queues(self) -> None:
        await self.post_task(queue="q1")
        await self.post_task(queue="q1", countdown=60)
        queues = (await self.request("GET", "/queues", token=RO)).json["queues"]
        by_name = {q["name"]: q for q in queues}
        self.assertEqual(set(by_name), {"default", "q1"})
        self.assertEqual((by_name["q1"]["ready"], by_name["q1"]["delayed"],
                          by_name["q1"]["paused"]), (1, 1, False))

    async def test_pause_resume(self) -> None:
        paused = await self.request("POST", "/queues/q1/pause")
        self.assertEqual((paused.code, paused.json["name"], paused.json["paused"]),
                         (200, "q1", True))
        listed = (await self.request("GET", "/queues")).json["queues"]
        self.assertTrue([q for q in listed if q["name"] == "q1"][0]["paused"])
        resumed = await self.request("POST", "/queues/q1/resume")
        self.assertEqual((resumed.code, resumed.json["paused"]), (200, False))
        error = self.assertError(await self.request("POST", "/queues/nope/pause"), 404,
                                 "queue_not_found")
        self.assertEqual(error["queue"], "nope")
        self.assertError(await self.request("POST", "/queues/bad%20name/resume"), 404,
                         "queue_not_found")
        for path in ("/queues/q1%0A/pause", "/queues/q1%0D%0A/resume"):
            self.assertError(await self.request("POST", path), 404, "queue_not_found")

    # -- health, schema, HTTP plumbing -------------------------------------

    async def test_health(self) -> None:
        """No token needed; 200 when ready, 503 with the same body when not."""
        ready = await self.request("GET", "/health", token=None)
        self.assertEqual((ready.code, ready.json),
                         (200, {"live": True, "ready": True, "amqp": True, "redis": True}))
        self.service.amqp = False
        down = await self.request("GET", "/health", token="wrong")
        self.assertEqual((down.code, down.json["ready"], down.json["amqp"]),
                         (503, False, False))

    async def test_openapi(self) -> None:
        response = await self.request("GET", "/openapi.json", token=None)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.json["openapi"], "3.1.0")
        self.assertEqual(response.json["security"], [{"bearerAuth": []}])

    async def test_unknown_paths(self) -> None:
        """404 JSON, never twisted's HTML page."""
        for path in ("/", "/nope", "/tasks/", "/tasks/abc/", "/tasks/abc/retry", "//tasks",
                     "/queues/q1", "/health/x", "/%ff"):
            response = await self.request("GET", path)
            self.assertError(response, 404, "not_found")
            self.assertNotIn(b"<html", response.raw.lower())

    async def test_wrong_method(self) -> None:
        """405 with Allow."""
        cases = (("PUT", "/tasks", "POST, GET, HEAD"), ("PATCH", "/tasks/abc",
                                                         "GET, DELETE, HEAD"),
                 ("GET", "/tasks/abc/requeue", "POST"), ("DELETE", "/queues", "GET, HEAD"),
                 ("GET", "/queues/q1/pause", "POST"), ("POST", "/health", "GET, HEAD"),
                 ("OPTIONS", "/openapi.json", "GET, HEAD"))
        for method, path, allow in cases:
            response = await self.request(method, path)
            self.assertError(response, 405, "method_not_allowed")
            self.assertEqual(response.header("allow"), allow, (method, path))

    async def test_head(self) -> None:
        response = await self.request("HEAD", "/tasks")
        self.assertEqual((response.code, response.raw), (200, b""))
        self.assertEqual(response.header("content-type"), "application/json")

    async def test_common_headers(self) -> None:
        response = await self.request("GET", "/tasks")
        self.assertEqual((response.header("cache-control"),
                          response.header("x-content-type-options")), ("no-store", "nosniff"))


class AuthTests(LiveAPI, TestCase):
    """Bearer tokens: who may read, who may write."""

    async def setUp(self) -> None:
        await self.start_api()

    async def test_missing(self) -> None:
        for method, path in (("GET", "/tasks"), ("GET", "/tasks/x"), ("GET", "/queues"),
                             ("POST", "/tasks"), ("DELETE", "/tasks/x"),
                             ("POST", "/queues/default/pause")):
            response = await self.request(method, path, token=None)
            self.assertError(response, 401, "unauthorized")
            self.assertEqual(response.header("www-authenticate"), 'Bearer realm="quebert"')

    async def test_invalid(self) -> None:
        """Wrong tokens, other schemes and malformed headers are all 401."""
        for value in (f"Bearer {RW}x", f"Bearer {RW[:-1]}", "Bearer", "Bearer ",
                      f"Basic {RW}", RW, f"Token {RW}"):
            response = await self.request("GET", "/tasks", token=None,
                                          headers={"Authorization": value})
            self.assertError(response, 401, "unauthorized")
            self.assertIn('error="invalid_token"', response.header("www-authenticate"))
        lower = await self.request("GET", "/tasks", token=None,
                                   headers={"Authorization": f"bearer {RW}"})
        self.assertEqual(lower.code, 200)

    async def test_read_only(self) -> None:
        """A read-only token reads, and gets 403 on every write."""
        self.assertEqual((await self.request("GET", "/tasks", token=RO)).code, 200)
        self.assertEqual((await self.request("GET", "/queues", token=RO)).code, 200)
        for method, path in (("POST", "/tasks"), ("DELETE", "/tasks/x"),
                             ("POST", "/tasks/x/requeue"), ("POST", "/queues/default/pause"),
                             ("POST", "/queues/default/resume")):
            response = await self.request(method, path, token=RO,
                                          json_body={"kind": "call", "task": "app.add"})
            self.assertError(response, 403, "forbidden")
        self.assertEqual(self.service.published, {})

    async def test_public(self) -> None:
        for path in ("/health", "/openapi.json"):
            self.assertEqual((await self.request("GET", path, token=None)).code, 200)

    async def test_token_never_logged(self) -> None:
        """The access log names the access level, never the token."""
        from twisted.logger import globalLogPublisher

        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        await self.request("GET", "/tasks", token=RO)
        await self.request("GET", "/tasks", token="a-wrong-token")
        api = [e for e in events if e.get("log_namespace") == "quebert.api"]
        self.assertTrue(api)
        self.assertNotIn(RO, repr(api))
        self.assertNotIn("a-wrong-token", repr(api))
        self.assertIn("read-only", [e.get("access") for e in api])


class AnonymousTests(LiveAPI, TestCase):
    async def test_read_only(self) -> None:
        """anonymous='read-only': reads without a token, writes need one."""
        await self.start_api(anonymous="read-only")
        self.assertEqual((await self.request("GET", "/tasks", token=None)).code, 200)
        self.assertError(await self.post_task_anonymous(), 403, "forbidden")
        self.assertEqual((await self.post_task()).code, 201)
        # a wrong token is still refused
        self.assertError(await self.request("GET", "/tasks", token="nope"), 401, "unauthorized")
        document = (await self.request("GET", "/openapi.json")).json
        self.assertEqual(document["security"], [{"bearerAuth": []}, {}])

    async def test_open(self) -> None:
        await self.start_api(config=ApiConfig(anonymous="read-write"))
        self.assertEqual((await self.post_task_anonymous()).code, 201)

    async def test_small_limit(self) -> None:
        await self.start_api(max_body_size=100)
        response = await self.post_task(args=["x" * 100])
        self.assertError(response, 413, "payload_too_large")
        self.assertEqual((await self.post_task()).code, 201)

    async def post_task_anonymous(self) -> Any:
        return await self.request("POST", "/tasks", token=None,
                                  json_body={"kind": "call", "task": "app.add"})


class _Unsized:
    """A file whose length FileBodyProducer cannot find out (so: chunked)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def read(self, size: int) -> bytes:
        chunk = self._data[self._at:self._at + size]
        self._at += len(chunk)
        return chunk

    def close(self) -> None:
        pass


class MountedTests(TestCase):
    """ApiResource below another resource, in a Site that does not limit bodies."""

    async def test_mounted(self) -> None:
        root = Resource()
        service = MemoryTaskService()
        root.putChild(b"api", ApiResource(service, ApiConfig(read_write_tokens=(RW,),
                                                             max_body_size=200)))
        factory = _Tracked(Site(root))
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(factory.idle)
        self.addCleanup(port.stopListening)
        client: Any = LiveAPI()
        client.base = f"http://127.0.0.1:{port.getHost().port}/api"
        client.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        created = await client.post_task(task="app.add")
        self.assertEqual(created.code, 201, created)
        self.assertEqual(created.header("location"), f"/api/tasks/{created.json['id']}")
        document = (await client.request("GET", "/openapi.json")).json
        self.assertEqual(document["servers"], [{"url": "/api"}])
        # the resource still refuses a large body before parsing it
        big = await client.post_task(task="app.add", args=["x" * 300])
        self.assertEqual(big.code, 413, big)
        self.assertEqual(len(service.published), 1)
