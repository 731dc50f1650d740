"""
Tests for quebert.legacy: guillotina_amqp bodies read as tasks, keeping
only their plain context, and the copies the worker publishes of them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from quebert import legacy, protocol
from quebert.errors import InvalidMessage
from quebert.protocol import CONTENT_TYPE, build, decode

LINE_ENDS = ("\n", "\r\n")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def encode(data) -> bytes:
    return json.dumps(data).encode("utf-8")


_DROP = object()


class GuillotinaTests(SynchronousTestCase):
    """Bodies published by guillotina_amqp are read as tasks."""

    def guillotina_body(self, **changes):
        data = {
            "func": "myapp.tasks.reindex",
            "args": ["/db/container/item", 1],
            "kwargs": {"full": True},
            "db_id": "db",
            "container_id": "container",
            "req_data": {"url": "http://localhost/db/container", "method": "POST",
                         "headers": {"Accept": "*/*"}, "annotations": {}},
            "task_id": "task:db-container-7e5c4b4c-3b5b-4a63-9a0a-cc6b1b5e8f31",
        }
        data.update(changes)
        return {k: v for k, v in data.items() if v is not _DROP}

    def test_decodes_with_guillotina_origin(self):
        message = decode(encode(self.guillotina_body()), None, default_queue="guillotina")
        self.assertEqual(message.origin, "guillotina")
        self.assertEqual(message.id, "task:db-container-7e5c4b4c-3b5b-4a63-9a0a-cc6b1b5e8f31")
        self.assertEqual(message.task, "myapp.tasks.reindex")
        self.assertEqual(message.args, ("/db/container/item", 1))
        self.assertEqual(message.kwargs, {"full": True})
        self.assertEqual(message.queue, "guillotina")
        self.assertEqual(message.context, {"db_id": "db", "container_id": "container",
                                           "path": "/db/container"})
        self.assertEqual(message.kind, "call")

    def test_plain_uuid_task_id(self):
        message = decode(encode(self.guillotina_body(
            task_id="7e5c4b4c-3b5b-4a63-9a0a-cc6b1b5e8f31", db_id=None, container_id=None,
            req_data=_DROP)))
        self.assertEqual(message.id, "7e5c4b4c-3b5b-4a63-9a0a-cc6b1b5e8f31")
        self.assertEqual(message.context, {})

    def secret_body(self):
        """A body as guillotina_amqp sends it for a logged-in user, with credentials."""
        return self.guillotina_body(
            req_data={
                "url": "https://admin:pw-SECRET@cms.example.com/db/container/item?token=qs-SECRET",
                "method": "POST",
                "headers": {"Authorization": "Bearer tok-SECRET", "Cookie": "auth_token=ck"},
                "user": {"id": "alice", "roles": {"guillotina.Manager": 1},
                         "groups": ["Managers"], "Authorization": "Bearer tok-SECRET"},
                "annotations": {"jwt": "tok-SECRET"},
            },
            user={"id": "alice", "token": "tok-SECRET"},
            annotations={"auth": "tok-SECRET"},
        )

    def test_only_plain_context_is_kept(self):
        """No credential of the request survives the decode: only ids and the path."""
        message = decode(encode(self.secret_body()))
        self.assertEqual(message.context, {"db_id": "db", "container_id": "container",
                                           "user_id": "alice", "path": "/db/container/item"})
        self.assertNotIn("SECRET", repr(message))
        self.assertNotIn(b"SECRET", protocol.dumps(message.to_body()))

    def test_user_id_sources(self):
        """req_data.user.id first, then a top-level user string or user.id."""
        for changes, expected in (
            ({"req_data": {"user": {"id": "a"}}, "user": "b"}, "a"),
            ({"req_data": {"user": "not-an-object"}, "user": "b"}, "b"),
            ({"req_data": _DROP, "user": {"id": "c", "roles": []}}, "c"),
            ({"req_data": "junk", "user": 7}, None),
            ({"req_data": {"user": {"id": ""}}, "user": {"id": None}}, None),
        ):
            context = decode(encode(self.guillotina_body(**changes))).context
            self.assertEqual(context.get("user_id"), expected, changes)

    def test_path_without_query_credentials_or_host(self):
        for url, expected in (("http://u:p@h:8080/db/c/i?x=1#f", "/db/c/i"),
                              ("/db/c", "/db/c"), ("http://h", None), ("http://h:bad/x", None),
                              (7, None)):
            req_data = {"url": url, "headers": {"Authorization": "Basic eDp5"}}
            context = decode(encode(self.guillotina_body(req_data=req_data))).context
            self.assertEqual(context.get("path"), expected, url)

    def test_non_string_ids_are_refused(self):
        for key in ("db_id", "container_id"):
            e = self.assertRaises(InvalidMessage, decode,
                                  encode(self.guillotina_body(**{key: {"x": 1}})))
            self.assertEqual(e.field, key)
            self.assertEqual(e.task_id, self.guillotina_body()["task_id"])

    def test_overlong_values_are_refused(self):
        """What is kept must fit a version-1 context, so its converted copy decodes."""
        long = "x" * legacy.MAX_LEGACY_VALUE
        e = self.assertRaises(InvalidMessage, decode, encode(self.guillotina_body(db_id=long)))
        self.assertEqual(e.field, "db_id")
        e = self.assertRaises(InvalidMessage, decode, encode(self.guillotina_body(
            req_data={"url": "http://h/" + long})))
        self.assertEqual(e.field, "req_data.url")
        longest = "x" * (legacy.MAX_LEGACY_VALUE - 2)  # its JSON has the quotes
        message = decode(encode(self.guillotina_body(
            db_id=longest, container_id=longest, user=longest,
            req_data={"url": "http://h/" + longest[1:]})))
        self.assertEqual(decode(protocol.dumps(message.to_body())).context, message.context)

    def test_copy_is_the_version_1_body(self):
        """A guillotina message's copies are its version-1 body, which decodes the same."""
        raw = encode(self.secret_body())
        message = decode(raw, default_queue="legacy")
        copy, content_type = legacy.copy_body(message, raw, None)
        self.assertEqual(content_type, CONTENT_TYPE)
        self.assertNotIn(b"SECRET", copy)
        again = decode(copy, content_type, default_queue="other")
        self.assertEqual(again.origin, "quebert")
        self.assertEqual((again.id, again.task, again.args, again.kwargs, again.queue,
                          again.context),
                         (message.id, message.task, message.args, message.kwargs, "legacy",
                          message.context))

    def test_copy_of_an_undecodable_guillotina_body_keeps_only_safe_keys(self):
        data = dict(self.secret_body(), args={"not": "a list"}, kwargs={"n": math.nan})
        raw = json.dumps(data).encode("utf-8")
        self.assertRaises(InvalidMessage, decode, raw)
        copy, content_type = legacy.copy_body(None, raw, None)
        self.assertEqual(content_type, CONTENT_TYPE)
        self.assertNotIn(b"SECRET", copy)
        kept = json.loads(copy)
        self.assertEqual(set(kept), set(legacy.LEGACY_KEPT_KEYS))
        self.assertEqual(kept["args"], {"not": "a list"})
        self.assertTrue(math.isnan(kept["kwargs"]["n"]))

    def test_other_bodies_are_copied_as_received(self):
        _, raw = build("app.add", (1,), queue="q", context={"k": "v"})
        message = decode(raw)
        self.assertEqual(legacy.copy_body(message, raw, "application/json; x=1"),
                         (raw, "application/json; x=1"))
        for junk in (b"\xff\xfe", b"[1]", b'{"version": 2, "func": "x"}', raw):
            self.assertEqual(legacy.copy_body(None, junk, "text/plain"),
                             (junk, "text/plain"))

    def test_missing_args_and_kwargs(self):
        message = decode(encode(self.guillotina_body(args=_DROP, kwargs=_DROP)))
        self.assertEqual((message.args, message.kwargs), ((), {}))

    def test_bad_task_id(self):
        e = self.assertRaises(InvalidMessage, decode,
                              encode(self.guillotina_body(task_id=_DROP)))
        self.assertEqual(e.field, "task_id")
        self.assertIsNone(e.task_id)

    def test_bad_func(self):
        e = self.assertRaises(InvalidMessage, decode,
                              encode(self.guillotina_body(func="os.system;rm")))
        self.assertEqual(e.field, "func")
        self.assertEqual(e.task_id, self.guillotina_body()["task_id"])

    def test_bad_args_and_kwargs(self):
        # An empty object is falsy and read as "no args"; a non-empty one is refused.
        e = self.assertRaises(InvalidMessage, decode,
                              encode(self.guillotina_body(args={"a": 1})))
        self.assertEqual(e.field, "args")
        e = self.assertRaises(InvalidMessage, decode,
                              encode(self.guillotina_body(kwargs=[1])))
        self.assertEqual(e.field, "kwargs")

    def test_versioned_body_with_func_is_not_guillotina(self):
        e = self.assertRaises(InvalidMessage, decode,
                              encode(dict(self.guillotina_body(), version=1)))
        self.assertEqual(e.field, "id")


class LineEndTests(SynchronousTestCase):
    """
    A guillotina_amqp task id or ``func`` ending in a line end is refused,
    naming the field (as for version-1 bodies, tests.test_protocol).
    """

    def test_guillotina_task_id_and_func(self):
        good = GuillotinaTests.guillotina_body(None)
        for end in LINE_ENDS:
            e = self.assertRaises(InvalidMessage, decode,
                                  encode(dict(good, task_id=good["task_id"] + end)))
            self.assertEqual((e.field, e.task_id), ("task_id", None))
            e = self.assertRaises(InvalidMessage, decode,
                                  encode(dict(good, func=good["func"] + end)))
            self.assertEqual((e.field, e.task_id), ("func", good["task_id"]))


class ImportTests(SynchronousTestCase):
    """
    Data flows one way: legacy builds on protocol and imports nothing that
    runs tasks; protocol does not import legacy, which registers its
    decoder with it instead (tests.test_import_graph checks the whole graph).
    """

    def quebert_imports(self, module) -> list:
        """``(name, at module level)`` of each quebert module ``module`` imports."""
        import ast
        import inspect

        tree = ast.parse(inspect.getsource(module))
        top = set(map(id, tree.body))
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("quebert"):
                found.append((node.module, id(node) in top))
            elif isinstance(node, ast.Import):
                found.extend((a.name, id(node) in top) for a in node.names
                             if a.name.startswith("quebert"))
        return sorted(found)

    def test_legacy_imports_only_errors_and_protocol(self):
        self.assertEqual(self.quebert_imports(legacy),
                         [("quebert.errors", True), ("quebert.protocol", True)])

    def test_protocol_does_not_import_legacy(self):
        imported = [m for m, _ in self.quebert_imports(protocol)]
        self.assertNotIn("quebert.legacy", imported)
        self.assertNotIn("quebert", imported)  # (``from quebert import legacy``)

    def test_legacy_registers_its_decoder_with_protocol(self):
        self.assertIs(protocol._UNVERSIONED_DECODERS[legacy.GUILLOTINA],
                      legacy._decode_unversioned)

    def test_protocol_decodes_guillotina_bodies_without_legacy_imported(self):
        """
        Whoever decodes through protocol reads guillotina_amqp bodies, even
        if nothing imported quebert.legacy by name: the package does.  In a
        fresh interpreter, since this one has imported legacy already.
        """
        body = json.dumps(GuillotinaTests.guillotina_body(None))
        script = textwrap.dedent(f"""
            import sys
            from quebert.protocol import decode
            message = decode({body!r}.encode(), None, default_queue="g")
            print(message.origin, message.task, message.queue, "quebert.legacy" in sys.modules)
        """)
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                              text=True, timeout=60,
                              env=dict(os.environ, PYTHONPATH=ROOT))
        self.assertEqual((done.returncode, done.stdout.split()),
                         (0, ["guillotina", "myapp.tasks.reindex", "g", "True"]), done.stderr)


class UnversionedDecoderTests(SynchronousTestCase):
    """protocol.register_unversioned_decoder: how a foreign format is read."""

    def setUp(self):
        saved = dict(protocol._UNVERSIONED_DECODERS)

        def restore():
            protocol._UNVERSIONED_DECODERS.clear()
            protocol._UNVERSIONED_DECODERS.update(saved)

        self.addCleanup(restore)

    def test_a_decoder_returning_none_leaves_the_body_to_the_next(self):
        seen = []

        def other(data, queue):
            seen.append(data)
            return None

        protocol._UNVERSIONED_DECODERS.clear()
        protocol.register_unversioned_decoder("other", other)
        legacy_decoder = legacy._decode_unversioned
        protocol.register_unversioned_decoder(legacy.GUILLOTINA, legacy_decoder)
        body = GuillotinaTests.guillotina_body(None)
        self.assertEqual(decode(encode(body)).origin, legacy.GUILLOTINA)
        self.assertEqual(seen, [body])

    def test_no_decoder_takes_it_the_version_is_missing(self):
        e = self.assertRaises(InvalidMessage, decode, encode({"task": "a.b", "id": "x"}))
        self.assertEqual(e.field, "version")

    def test_registering_a_name_again_replaces_its_decoder(self):
        marker = object()
        protocol.register_unversioned_decoder(legacy.GUILLOTINA, lambda data, queue: marker)
        self.assertIs(decode(encode({"anything": 1})), marker)
        self.assertEqual(len(protocol._UNVERSIONED_DECODERS), 1)

    def test_versioned_bodies_never_reach_them(self):
        protocol.register_unversioned_decoder("boom", lambda data, queue: self.fail(data))
        message, body = build("a.b", (1,), {}, queue="default")
        self.assertEqual(decode(body, CONTENT_TYPE).task, "a.b")
