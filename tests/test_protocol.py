"""
Tests for quebert.protocol: building, decoding and validating task messages.
"""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from quebert import protocol
from quebert.errors import InvalidMessage, SerializationError
from quebert.protocol import (
    BROKER_HEADERS,
    CONTENT_TYPE,
    H_ATTEMPTS,
    H_DELIVERY_COUNT,
    H_FIRST_ATTEMPT,
    H_QUEUE,
    TaskMessage,
    build,
    decode,
    int_header,
    republish_headers,
    time_header,
    to_ms,
)

TASK_ID = "0123456789abcdef"


def body(**fields) -> dict:
    """A valid version-1 body, with ``fields`` changed (None values removed)."""
    data = {
        "version": 1,
        "id": TASK_ID,
        "kind": "call",
        "task": "app.tasks.add",
        "args": [1, 2],
        "kwargs": {"z": 3},
        "queue": "default",
    }
    data.update(fields)
    return {k: v for k, v in data.items() if v is not _DROP}


_DROP = object()


def encode(data) -> bytes:
    return json.dumps(data).encode("utf-8")


class BuildDecodeTests(SynchronousTestCase):
    """What build() writes, decode() reads back unchanged."""

    def test_round_trip(self):
        message, encoded = build(
            "app.tasks.add", (1, "two", [3]), {"x": {"y": None}}, queue="high",
            task_id="task-1", eta=1767225600.5, name="unique:1",
            retry={"max_attempts": 3, "min_backoff": 2.5}, timeout=30, now=1767225590.0,
        )
        self.assertIsInstance(encoded, bytes)
        decoded = decode(encoded, CONTENT_TYPE)
        self.assertEqual(decoded, message)
        self.assertEqual(decoded.args, (1, "two", [3]))
        self.assertEqual(decoded.kwargs, {"x": {"y": None}})
        self.assertEqual(decoded.queue, "high")
        self.assertEqual(decoded.eta, 1767225600.5)
        self.assertEqual(decoded.name, "unique:1")
        self.assertEqual(decoded.retry, {"max_attempts": 3, "min_backoff": 2.5})
        self.assertEqual(decoded.timeout, 30.0)
        self.assertEqual(decoded.created_at, 1767225590.0)
        self.assertEqual(decoded.origin, "quebert")
        self.assertEqual(decoded.kind, "call")

    def test_body_is_versioned_json(self):
        message, encoded = build("app.t", queue="default", now=5.0)
        data = json.loads(encoded)
        self.assertEqual(data["version"], protocol.VERSION)
        self.assertEqual(data["id"], message.id)
        self.assertEqual(data["task"], "app.t")
        self.assertEqual(data["args"], [])
        self.assertEqual(data["kwargs"], {})
        self.assertEqual(data["created_at"], 5.0)

    def test_fresh_ids(self):
        first, _ = build("app.t", queue="default")
        second, _ = build("app.t", queue="default")
        self.assertNotEqual(first.id, second.id)
        decode(build("app.t", queue="default")[1])

    def test_minimal_body_defaults(self):
        decoded = decode(encode({"version": 1, "id": "x", "task": "t"}), default_queue="q")
        self.assertEqual(decoded, TaskMessage(id="x", task="t", queue="q"))

    def test_null_args_and_kwargs_are_empty(self):
        decoded = decode(encode(body(args=None, kwargs=None)))
        self.assertEqual((decoded.args, decoded.kwargs), ((), {}))

    def test_zero_timeout_means_none(self):
        self.assertIsNone(decode(encode(body(timeout=0))).timeout)

    def test_unknown_extra_keys_are_ignored(self):
        decoded = decode(encode(body(future_field={"a": 1}, priority=9)))
        self.assertEqual(decoded.task, "app.tasks.add")

    def test_content_type_with_parameters(self):
        decode(encode(body()), "application/json; charset=utf-8")
        decode(encode(body()), "Application/JSON")
        decode(encode(body()), "text/json")
        decode(encode(body()), None)
        decode(encode(body()), "")

    def test_info(self):
        message, _ = build("app.t", queue="q", name="n", eta=10.0, now=1.0)
        self.assertEqual(message.info(), {"queue": "q", "kind": "call", "task": "app.t",
                                          "name": "n", "eta": 10.0, "created_at": 1.0})

    def test_version_one_as_float(self):
        decode(encode(body(version=1.0)))


class BuildErrorTests(SynchronousTestCase):
    """build() refuses what a worker could not read."""

    def test_object_argument(self):
        e = self.assertRaises(SerializationError, build, "app.t", (object(),), queue="q")
        self.assertIn("app.t", str(e))

    def test_nan_argument(self):
        self.assertRaises(SerializationError, build, "app.t", (math.nan,), queue="q")
        self.assertRaises(SerializationError, build, "app.t", (), {"x": math.inf}, queue="q")

    def test_bytes_argument(self):
        self.assertRaises(SerializationError, build, "app.t", (b"raw",), queue="q")

    def test_serialization_error_is_a_type_error(self):
        self.assertRaises(TypeError, build, "app.t", ({1, 2},), queue="q")

    def test_bad_options_raise_invalid_message(self):
        e = self.assertRaises(InvalidMessage, build, "os.system;", queue="q")
        self.assertEqual(e.field, "task")
        e = self.assertRaises(InvalidMessage, build, "app.t", queue="bad queue")
        self.assertEqual(e.field, "queue")
        e = self.assertRaises(InvalidMessage, build, "app.t", queue="q", retry={"bogus": 1})
        self.assertEqual(e.field, "retry")
        e = self.assertRaises(InvalidMessage, build, "app.t", queue="q", task_id="has space")
        self.assertEqual(e.field, "id")
        e = self.assertRaises(InvalidMessage, build, "app.t", queue="q", timeout=-1)
        self.assertEqual(e.field, "timeout")


class DecodeErrorTests(SynchronousTestCase):
    """Every kind of bad input is an InvalidMessage naming the field at fault."""

    def assertInvalid(self, raw, field, task_id=None, **kwargs):
        if not isinstance(raw, bytes):
            raw = encode(raw)
        e = self.assertRaises(InvalidMessage, decode, raw, **kwargs)
        self.assertEqual(e.field, field, e.reason)
        self.assertEqual(e.task_id, task_id, e.reason)
        self.assertTrue(e.reason)
        self.assertEqual(str(e), e.reason)
        return e

    def test_not_json(self):
        self.assertInvalid(b"{not json", "body")
        self.assertInvalid(b"", "body")
        self.assertInvalid(b'{"version": 1,', "body")

    def test_not_utf8(self):
        e = self.assertInvalid(b'{"version": 1, "id": "\xff\xfe\xe9"}', "body")
        self.assertIn("UTF-8", e.reason)
        self.assertInvalid(b"\xc3\x28", "body")

    def test_json_but_not_object(self):
        for value in ([1, 2], "text", 3, None, True):
            e = self.assertInvalid(value, "body")
            self.assertIn("object", e.reason)

    def test_missing_version(self):
        self.assertInvalid(body(version=_DROP), "version", TASK_ID)
        self.assertInvalid(body(version=None), "version", TASK_ID)

    def test_unknown_version(self):
        e = self.assertInvalid(body(version=2), "version", TASK_ID)
        self.assertIn("1", e.reason)
        self.assertInvalid(body(version="1"), "version", TASK_ID)
        self.assertInvalid(body(version=0), "version", TASK_ID)

    def test_bool_version(self):
        self.assertInvalid(body(version=True), "version", TASK_ID)

    def test_unhashable_version(self):
        """A list or object version is refused, not a TypeError."""
        self.assertInvalid(body(version=[1]), "version", TASK_ID)
        self.assertInvalid(body(version={"v": 1}), "version", TASK_ID)

    def test_missing_id(self):
        self.assertInvalid(body(id=_DROP), "id")
        self.assertInvalid(body(id=None), "id")

    def test_bad_id(self):
        for value in ("", "has space", "a/b", "x" * 201, 5, ["a"], "é"):
            self.assertInvalid(body(id=value), "id")

    def test_unknown_kind(self):
        e = self.assertInvalid(body(kind="shell"), "kind", TASK_ID)
        self.assertIn("call", e.reason)
        self.assertIn("url", e.reason)
        self.assertInvalid(body(kind=None), "kind", TASK_ID)

    def test_url_kind_needs_a_url(self):
        self.assertInvalid(body(kind="url"), "url", TASK_ID)
        for bad in ("ftp://x/", "http://", "/relative", "http://x:99999/", "http://a b/",
                    "x" * 9000, 5):
            self.assertInvalid(body(kind="url", url=bad), "url", TASK_ID)

    def test_url_kind_fields(self):
        for field, value in (("method", "TRACE"), ("method", 5), ("headers", []),
                             ("headers.a b", {"a b": "c"}), ("headers.x", {"x": "a\r\nb"}),
                             ("headers.x", {"x": 5}), ("body", 5), ("body", "!!"),
                             ("body_encoding", "rot13"), ("dispatch_deadline", -1)):
            data = body(kind="url", url="http://127.0.0.1/x")
            key = field.split(".")[0]
            data[key] = value
            if field == "body":
                data["body_encoding"] = "base64"
            self.assertInvalid(data, field, TASK_ID)

    def test_unhashable_kind(self):
        """A list or object kind is refused, not a TypeError."""
        self.assertInvalid(body(kind=["call"]), "kind", TASK_ID)
        self.assertInvalid(body(kind={}), "kind", TASK_ID)

    def test_missing_task(self):
        self.assertInvalid(body(task=_DROP), "task", TASK_ID)

    def test_bad_task_name(self):
        for value in ("os.system;", "os system", "1abc", "", "a/b", "__import__('os')", 5,
                      ["a"], "a" * 201):
            self.assertInvalid(body(task=value), "task", TASK_ID)

    def test_args_not_a_list(self):
        for value in ({"a": 1}, "abc", 5, True):
            self.assertInvalid(body(args=value), "args", TASK_ID)

    def test_kwargs_not_an_object(self):
        for value in ([1], "abc", 5):
            self.assertInvalid(body(kwargs=value), "kwargs", TASK_ID)

    def test_bad_queue(self):
        for value in ("a b", ".hidden", "x" * 101, 5, ["q"], "q/1"):
            self.assertInvalid(body(queue=value), "queue", TASK_ID)

    def test_missing_queue_uses_default(self):
        self.assertEqual(decode(encode(body(queue=_DROP)), default_queue="dq").queue, "dq")

    def test_bad_name(self):
        for value in ("", "a b", 5):
            self.assertInvalid(body(name=value), "name", TASK_ID)

    def test_retry_not_an_object(self):
        self.assertInvalid(body(retry=[1]), "retry", TASK_ID)
        self.assertInvalid(body(retry="fast"), "retry", TASK_ID)

    def test_unknown_retry_keys(self):
        e = self.assertInvalid(body(retry={"retries": 3, "max_attempts": 2}), "retry", TASK_ID)
        self.assertIn("retries", e.reason)

    def test_bad_retry_max_attempts(self):
        for value in (0, -2, 2.5, "3", True, None, [3]):
            self.assertInvalid(body(retry={"max_attempts": value}), "retry.max_attempts",
                               TASK_ID)

    def test_good_retry_values(self):
        retry = {"max_attempts": -1, "min_backoff": 0, "max_backoff": 10.5,
                 "max_doublings": 3, "max_retry_duration": 60, "jitter": 0.5}
        self.assertEqual(decode(encode(body(retry=retry))).retry, retry)

    def test_bad_retry_numbers(self):
        """A bad retry value names the field as 'retry.<option>'."""
        for key in ("min_backoff", "max_backoff", "max_doublings", "max_retry_duration",
                    "jitter"):
            for value in (-1, "1", True, [1]):
                self.assertInvalid(body(retry={key: value}), f"retry.{key}", TASK_ID)

    def test_retry_jitter_above_one(self):
        """A jitter no RetryPolicy accepts is refused by the decoder (and build())."""
        self.assertInvalid(body(retry={"jitter": 2}), "retry.jitter", TASK_ID)
        self.assertRaises(InvalidMessage, build, "app.t", queue="q", retry={"jitter": 2})

    def test_non_finite_and_negative_eta(self):
        for raw in (b"NaN", b"Infinity", b"-Infinity", b"-1", b'"tomorrow"', b"true"):
            data = encode(body(eta="@@")).replace(b'"@@"', raw)
            self.assertInvalid(data, "eta", TASK_ID)

    def test_non_finite_and_negative_timeout(self):
        for raw in (b"NaN", b"Infinity", b"-5", b'"30"', b"false", b"[]"):
            data = encode(body(timeout="@@")).replace(b'"@@"', raw)
            self.assertInvalid(data, "timeout", TASK_ID)

    def test_bad_created_at(self):
        data = encode(body(created_at="@@")).replace(b'"@@"', b"NaN")
        self.assertInvalid(data, "created_at", TASK_ID)

    def test_oversized_body(self):
        raw = encode(body(args=["x" * 2000]))
        e = self.assertInvalid(raw, "body", max_size=1000)
        self.assertIn("1000", e.reason)
        decode(raw, max_size=len(raw))

    def test_wrong_content_type(self):
        for content_type in ("text/plain", "application/x-pickle", "application/xml"):
            e = self.assertInvalid(encode(body()), "content_type", content_type=content_type)
            self.assertIn(content_type, e.reason)

    def test_deeply_nested_json(self):
        """Nesting too deep for the JSON parser is an InvalidMessage, not a RecursionError."""
        self.assertInvalid(b"[" * 100_000, "body")
        deep = (b'{"version": 1, "id": "x", "task": "t", "args": ' + b"[" * 100_000
                + b"]" * 100_000 + b"}")
        e = self.assertRaises(InvalidMessage, decode, deep)
        self.assertIn(e.field, ("body", "args"))

    def test_huge_integer(self):
        self.assertInvalid(b'{"version": ' + b"9" * 5000 + b"}", "body")


class ContextTests(SynchronousTestCase):
    """The optional ``context`` field: plain data about where a task comes from."""

    CONTEXT = {"db_id": "db", "container_id": "site", "user_id": "alice", "depth": 2,
               "ratio": 0.5, "draft": False, "parent": None}

    def test_round_trip(self):
        message, raw = build("app.add", (1,), queue="q", context=self.CONTEXT)
        self.assertEqual(json.loads(raw)["context"], self.CONTEXT)
        decoded = decode(raw)
        self.assertEqual(decoded.context, self.CONTEXT)
        self.assertEqual(decoded, message)
        self.assertEqual(decoded.to_body(), message.to_body())

    def test_fast_path_reads_it_as_the_full_checks_do(self):
        _, raw = build("app.add", (1,), queue="q", context=self.CONTEXT, now=5.0)
        data = json.loads(raw)
        fast = protocol._validate(data)
        self.assertEqual(fast, protocol._validate_fully(data))
        self.assertEqual(fast.context, self.CONTEXT)
        for bad in ({"a": [1]}, {"-a": 1}, {"a": math.inf}):
            outcomes = []
            for validate in (protocol._validate, protocol._validate_fully):
                try:
                    outcomes.append(validate(dict(data, context=bad)))
                except InvalidMessage as e:
                    outcomes.append((e.reason, e.field, e.task_id))
            self.assertEqual(outcomes[0], outcomes[1])
            self.assertIsInstance(outcomes[0], tuple)

    def test_empty_or_null_context_is_not_written(self):
        for context in (None, {}):
            message, raw = build("app.add", (1,), queue="q", context=context)
            self.assertNotIn("context", json.loads(raw))
            self.assertEqual(message.context, {})
        self.assertEqual(decode(encode(body(context=None))).context, {})
        self.assertEqual(decode(encode(body(context={}))).context, {})

    def test_url_task_carries_it(self):
        message, raw = protocol.build_url("https://example.com/hook", queue="q",
                                          context={"user_id": "bob"})
        self.assertEqual(decode(raw).context, {"user_id": "bob"})
        self.assertEqual(message.context, {"user_id": "bob"})

    def test_producer_changes_after_build_do_not_reach_the_task(self):
        context = {"k": "v"}
        message, _ = build("app.add", (), queue="q", context=context)
        context["k"] = "changed"
        self.assertEqual(message.context, {"k": "v"})

    def test_limits(self):
        at_most = {f"k{i}": "v" for i in range(protocol.MAX_CONTEXT_KEYS)}
        self.assertEqual(decode(encode(body(context=at_most))).context, at_most)
        big = {"k": "x" * (protocol.MAX_CONTEXT_SIZE - len('{"k":""}'))}
        self.assertEqual(len(protocol.dumps(big)), protocol.MAX_CONTEXT_SIZE)
        self.assertEqual(decode(encode(body(context=big))).context, big)
        for context, field, words in (
            ([1], "context", "must be a JSON object"),
            ("db", "context", "must be a JSON object"),
            (dict(at_most, extra=1), "context", "more than the 50"),
            ({"k": "x" * protocol.MAX_CONTEXT_SIZE}, "context", "more than the 8192"),
            ({"1st": 1}, "context", "keys must be names"),
            ({"a b": 1}, "context", "keys must be names"),
            ({"k\n": 1}, "context", "keys must be names"),
            ({"k" * 201: 1}, "context", "keys must be names"),
            ({"roles": ["a"]}, "context.roles", "string, number, boolean or null"),
            ({"user": {"id": 1}}, "context.user", "string, number, boolean or null"),
        ):
            e = self.assertRaises(InvalidMessage, decode, encode(body(context=context)))
            self.assertEqual((e.field, e.task_id), (field, TASK_ID), context)
            self.assertIn(words, e.reason)

    def test_non_finite_numbers_are_refused(self):
        raw = b'{"version": 1, "id": "t1", "task": "a.b", "context": {"n": NaN}}'
        e = self.assertRaises(InvalidMessage, decode, raw)
        self.assertEqual(e.field, "context.n")

    def test_build_refuses_bad_context_at_the_call(self):
        for context, field in (({"k": {1, 2}}, "context.k"), ({1: "v"}, "context"),
                               (["k"], "context")):
            e = self.assertRaises(InvalidMessage, build, "app.add", (), queue="q",
                                  context=context)
            self.assertEqual(e.field, field)
            e = self.assertRaises(InvalidMessage, protocol.build_url, "https://e.com/",
                                  queue="q", context=context)
            self.assertEqual(e.field, field)


#: Line ends a regex ``$`` also matches before (``\n``), and one it does not.
LINE_ENDS = ("\n", "\r\n")


class LineEndTests(SynchronousTestCase):
    """
    An id or a name ending in a line end is refused, naming the field: such
    an id would reach Redis keys, log lines and AMQP headers.
    """

    def assertInvalid(self, data, field, task_id=TASK_ID):
        e = self.assertRaises(InvalidMessage, decode, encode(data))
        self.assertEqual((e.field, e.task_id), (field, task_id), e.reason)
        return e

    def test_the_reported_body(self):
        raw = b'{"version":1,"id":"abc\\n","task":"a.b\\n","queue":"q\\n"}'
        e = self.assertRaises(InvalidMessage, decode, raw)
        self.assertEqual((e.field, e.task_id), ("id", None))

    def test_id(self):
        for end in LINE_ENDS:
            e = self.assertInvalid(body(id=TASK_ID + end), "id", None)
            self.assertIn(repr(TASK_ID + end), e.reason)

    def test_task(self):
        for end in LINE_ENDS:
            self.assertInvalid(body(task="app.tasks.add" + end), "task")

    def test_queue(self):
        for end in LINE_ENDS:
            self.assertInvalid(body(queue="default" + end), "queue")
            e = self.assertRaises(InvalidMessage, decode, encode(body(queue=_DROP)),
                                  default_queue="default" + end)
            self.assertEqual(e.field, "queue")

    def test_unique_name(self):
        for end in LINE_ENDS:
            self.assertInvalid(body(name="nightly" + end), "name")

    def test_context_keys(self):
        for end in LINE_ENDS:
            self.assertInvalid(body(context={"user_id" + end: "bob"}), "context")

    def test_url_header_names(self):
        for end in LINE_ENDS:
            name = "X-Request-Source" + end
            self.assertInvalid(body(kind="url", url="https://example.com/hook",
                                    headers={name: "billing"}), f"headers.{name}")

    def test_fast_path_agrees(self):
        """What the fast path lets through, the full checks would let through."""
        data = json.loads(build("app.add", (1,), queue="q1", now=5.0)[1])
        for key in ("id", "task", "queue"):
            for end in LINE_ENDS:
                odd = dict(data, **{key: data[key] + end})
                for validate in (protocol._validate, protocol._validate_fully):
                    e = self.assertRaises(InvalidMessage, validate, odd)
                    self.assertEqual(e.field, key)

    def test_build(self):
        for end in LINE_ENDS:
            for args, kwargs, field in (
                (("app.add" + end,), {"queue": "q"}, "task"),
                (("app.add",), {"queue": "q" + end}, "queue"),
                (("app.add",), {"queue": "q", "task_id": "abc" + end}, "id"),
                (("app.add",), {"queue": "q", "name": "n" + end}, "name"),
            ):
                e = self.assertRaises(InvalidMessage, build, *args, **kwargs)
                self.assertEqual(e.field, field)
            for kwargs, field in (({"queue": "q" + end}, "queue"),
                                  ({"queue": "q", "task_id": "abc" + end}, "id"),
                                  ({"queue": "q", "headers": {"X-A" + end: "b"}},
                                   "headers.X-A" + end)):
                e = self.assertRaises(InvalidMessage, protocol.build_url,
                                      "https://example.com/hook", **kwargs)
                self.assertEqual(e.field, field)

    def test_no_module_pattern_is_used_with_match(self):
        """
        Module-level patterns (``_ID_RE``, ``QUEUE_RE``...) are anchored with
        ``^...$`` and checked with ``fullmatch``: with ``match`` a name
        ending in "\\n" would pass again.
        """
        import ast
        import pathlib
        import re

        import quebert

        constant = re.compile(r"_?[A-Z][A-Z0-9_]*")
        found = []
        for path in sorted(pathlib.Path(quebert.__file__).parent.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "match"):
                    receiver = node.func.value
                    name = getattr(receiver, "id", getattr(receiver, "attr", ""))
                    if constant.fullmatch(name):
                        found.append(f"{path.name}:{node.lineno} {name}.match")
        self.assertEqual(found, [])


class HeaderTests(SynchronousTestCase):
    """Reading and copying AMQP headers."""

    def test_int_header(self):
        self.assertEqual(int_header({H_ATTEMPTS: 3}, H_ATTEMPTS), 3)
        self.assertEqual(int_header({H_ATTEMPTS: "4"}, H_ATTEMPTS), 4)
        self.assertEqual(int_header({H_ATTEMPTS: b"5"}, H_ATTEMPTS), 5)
        self.assertEqual(int_header({H_ATTEMPTS: 2.9}, H_ATTEMPTS), 2)
        self.assertEqual(int_header({H_ATTEMPTS: -3}, H_ATTEMPTS), 0)

    def test_int_header_defaults(self):
        self.assertEqual(int_header(None, H_ATTEMPTS), 0)
        self.assertEqual(int_header({}, H_ATTEMPTS, 7), 7)
        self.assertEqual(int_header({"other": 1}, H_ATTEMPTS, 7), 7)
        self.assertEqual(int_header({H_ATTEMPTS: None}, H_ATTEMPTS, 7), 7)
        self.assertEqual(int_header({H_ATTEMPTS: "three"}, H_ATTEMPTS, 7), 7)
        self.assertEqual(int_header({H_ATTEMPTS: b"\xff"}, H_ATTEMPTS, 7), 7)
        self.assertEqual(int_header({H_ATTEMPTS: [1]}, H_ATTEMPTS, 7), 7)
        self.assertEqual(int_header({H_ATTEMPTS: {"a": 1}}, H_ATTEMPTS, 7), 7)

    def test_to_ms(self):
        self.assertEqual(to_ms(1.0), 1000)
        self.assertEqual(to_ms(1767225600.1234), 1767225600123)
        self.assertEqual(to_ms(0.0005), 0)
        self.assertEqual(to_ms(0.0016), 2)
        self.assertIsInstance(to_ms(2.5), int)

    def test_time_header(self):
        self.assertEqual(time_header({H_FIRST_ATTEMPT: 1500}, H_FIRST_ATTEMPT), 1.5)
        self.assertEqual(time_header({H_FIRST_ATTEMPT: "2500"}, H_FIRST_ATTEMPT), 2.5)
        self.assertEqual(time_header({H_FIRST_ATTEMPT: b"3000"}, H_FIRST_ATTEMPT), 3.0)
        self.assertEqual(time_header({H_FIRST_ATTEMPT: to_ms(1767225600.25)},
                                     H_FIRST_ATTEMPT), 1767225600.25)

    def test_time_header_bad_values(self):
        for value in (None, "soon", b"\xff", "nan", "inf", float("nan"), [1], {}):
            self.assertIsNone(time_header({H_FIRST_ATTEMPT: value}, H_FIRST_ATTEMPT), value)
        self.assertIsNone(time_header(None, H_FIRST_ATTEMPT))
        self.assertIsNone(time_header({}, H_FIRST_ATTEMPT))

    def test_republish_strips_broker_headers(self):
        headers = {
            "x-death": [{"count": 1, "queue": "quebert.delay.03"}],
            "x-first-death-exchange": "quebert.delay.03",
            "x-first-death-queue": "quebert.delay.03",
            "x-first-death-reason": "expired",
            "x-last-death-exchange": "quebert.delay.00",
            "x-last-death-queue": "quebert.delay.00",
            "x-last-death-reason": "expired",
            H_DELIVERY_COUNT: 2,
            H_ATTEMPTS: 1,
            "traceparent": "00-abc-def-01",
        }
        result = republish_headers(headers, **{H_ATTEMPTS: 2, H_QUEUE: "q"})
        self.assertEqual(result, {H_ATTEMPTS: 2, H_QUEUE: "q", "traceparent": "00-abc-def-01"})
        self.assertFalse(set(result) & BROKER_HEADERS)
        # the original is untouched
        self.assertEqual(headers[H_ATTEMPTS], 1)
        self.assertIn("x-death", headers)

    def test_republish_none_headers(self):
        self.assertEqual(republish_headers(None), {})
        self.assertEqual(republish_headers(None, a=1), {"a": 1})


# -- fuzzing -------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)

_KEYS = ["version", "id", "kind", "task", "args", "kwargs", "queue", "eta", "name", "retry",
         "timeout", "created_at", "func", "task_id"]
_GOOD = {
    "version": st.just(1),
    "id": st.just(TASK_ID),
    "task_id": st.just(TASK_ID),
    "kind": st.just("call"),
    "task": st.just("app.t"),
    "func": st.just("app.t"),
    "args": st.lists(st.integers(), max_size=3),
    "kwargs": st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    "queue": st.just("default"),
    "retry": st.dictionaries(st.sampled_from(["max_attempts", "min_backoff", "jitter"]),
                             json_values, max_size=3),
}

task_like = st.fixed_dictionaries(
    {},
    optional={key: (_GOOD[key] | json_values) if key in _GOOD else json_values
              for key in _KEYS},
)


class FuzzTests(SynchronousTestCase):
    """decode() either returns a TaskMessage or raises InvalidMessage: nothing else."""

    def check(self, raw: bytes, **kwargs) -> None:
        try:
            result = decode(raw, **kwargs)
        except InvalidMessage as e:
            self.assertIsInstance(e.reason, str)
        else:
            self.assertIsInstance(result, TaskMessage)
            self.assertIsInstance(result.args, tuple)
            self.assertIsInstance(result.kwargs, dict)
            self.assertTrue(protocol.QUEUE_RE.match(result.queue))

    @settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=200))
    def test_arbitrary_bytes(self, raw):
        self.check(raw)

    @settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
    @given(json_values)
    def test_arbitrary_json(self, value):
        self.check(json.dumps(value).encode("utf-8"))

    @settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
    @given(task_like)
    def test_task_like_objects(self, value):
        self.check(json.dumps(value).encode("utf-8"))

    @settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
    @given(task_like, st.sampled_from([None, CONTENT_TYPE, "text/plain", "garbage;;"]),
           st.one_of(st.none(), st.integers(min_value=0, max_value=300)))
    def test_with_content_type_and_size(self, value, content_type, max_size):
        self.check(json.dumps(value).encode("utf-8"), content_type=content_type,
                   max_size=max_size)


class FastPathTests(SynchronousTestCase):
    """The fast path of _validate gives what the full checks give."""

    def test_same_message_as_the_full_checks(self):
        for kwargs in ({}, {"now": 0.0}, {"now": 1767225590.5}):
            _, body = protocol.build("app.add", (1, [2], {"x": None}), {"k": "v"},
                                     queue="q1", **kwargs)
            data = json.loads(body)
            fast = protocol._validate(data, "default")
            full = protocol._validate_fully(data, "default")
            self.assertEqual(fast, full)
            self.assertEqual(repr(fast), repr(full))
            self.assertEqual(fast.to_body(), full.to_body())
            self.assertEqual(protocol.decode(body), full)

    def test_odd_bodies_take_the_full_checks(self):
        _, body = protocol.build("app.add", (1,), queue="q1", now=5.0)
        for text in (b" " + body, body + b"\n", b"\xef\xbb\xbf" + body):
            self.assertEqual(protocol.decode(text), protocol.decode(body))

    def test_bodies_in_other_encodings_than_utf8_are_refused_saying_so(self):
        # json.loads alone would read UTF-16 and UTF-32; the protocol is UTF-8
        _, body = protocol.build("app.add", (1,), queue="q1", now=5.0)
        for encoding in ("utf-16", "utf-16-le", "utf-32"):
            with self.assertRaises(InvalidMessage) as caught:
                protocol.decode(body.decode().encode(encoding))
            self.assertEqual(caught.exception.field, "body")
            self.assertIn("not UTF-8", caught.exception.reason)
        with self.assertRaises(InvalidMessage) as caught:
            protocol.decode(b'{"version": 1, "task": "caf\xe9"}')  # Latin-1
        self.assertEqual(caught.exception.reason,
                         "message body is not UTF-8 text (invalid continuation byte at byte 27)")

    def test_a_version_of_the_wrong_type_is_refused_saying_so(self):
        _, body = protocol.build("app.add", (1,), queue="q1", now=5.0)
        data = json.loads(body)
        for value, reason in (("1", "'version' must be an integer (supported: 1), not str '1'"),
                              (True, "'version' must be an integer (supported: 1), not bool True"),
                              (2, "protocol version 2 is not supported (supported: 1)")):
            with self.assertRaises(InvalidMessage) as caught:
                protocol.decode(json.dumps(dict(data, version=value)).encode())
            self.assertEqual((caught.exception.reason, caught.exception.field),
                             (reason, "version"))

    def test_odd_fields_take_the_full_checks(self):
        _, body = protocol.build("app.add", (1,), queue="q1", now=5.0)
        data = json.loads(body)
        for key, value in (("version", True), ("version", 1.0), ("created_at", 5),
                           ("queue", None), ("kind", "call")):
            odd = dict(data, **{key: value})
            outcomes = []
            for validate in (protocol._validate, protocol._validate_fully):
                try:
                    outcomes.append(validate(odd, "q1"))
                except InvalidMessage as e:
                    outcomes.append((e.reason, e.field, e.task_id))
            self.assertEqual(outcomes[0], outcomes[1])
