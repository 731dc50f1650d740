"""
Integration tests of the ``quebert`` command (:mod:`quebert.cli`).

The real command runs in a subprocess (``python -m quebert.cli``) against
the real RabbitMQ, in a vhost of its own per test, and the real Redis
(database 9) under a key prefix of its own per test; only keys with that
prefix are deleted afterwards.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from typing import List, Optional

import pika
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from quebert import protocol as wire
from tests._rabbit import make_vhost, queue_counts, wait_counts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REDIS_URL = "redis://127.0.0.1:6379/9"
ID_RE = re.compile(r"^[0-9a-f]{32}$")


class Result:
    """What one run of the command did."""

    def __init__(self, out: bytes, err: bytes, code: int, seconds: float) -> None:
        self.out = out.decode()
        self.err = err.decode()
        self.code = code
        self.seconds = seconds

    def __repr__(self) -> str:
        return f"<exit {self.code} after {self.seconds:.1f}s out={self.out!r} err={self.err!r}>"


@defer.inlineCallbacks
def run_cli(*args: str, env: Optional[dict] = None):
    """Run ``python -m quebert.cli ARGS``; fire with a :class:`Result`."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("QUEBERT_")}
    environ.update(env or {})
    started = time.monotonic()
    out, err, code = yield getProcessOutputAndValue(
        sys.executable, ("-m", "quebert.cli", *args), env=environ, path=REPO)
    return Result(out, err, code, time.monotonic() - started)


def basic_get(amqp_url: str, queue: str):
    """Take one message off ``queue`` (blocking: run it in a thread)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        return None if method is None else (properties, body)
    finally:
        connection.close()


def delete_redis_prefix(prefix: str) -> None:
    """Delete the keys under ``prefix`` in database 9 (and nothing else)."""
    keys = subprocess.run(
        ["redis-cli", "-u", REDIS_URL, "--scan", "--pattern", prefix + "*"],
        capture_output=True, text=True, check=True, timeout=30).stdout.split()
    for start in range(0, len(keys), 500):
        subprocess.run(["redis-cli", "-u", REDIS_URL, "DEL", *keys[start:start + 500]],
                       capture_output=True, check=True, timeout=30)


class UsageTests(unittest.TestCase):
    """Bad command lines: exit code 2 and a message naming the option."""

    timeout = 60

    @defer.inlineCallbacks
    def assertUsageError(self, option: str, *args: str):
        result = yield run_cli(*args, "--amqp-url", "amqp://guest:guest@127.0.0.1:1/")
        self.assertEqual(result.code, 2, result)
        self.assertEqual(result.out, "")
        self.assertIn(option, result.err)
        self.assertNotIn("Traceback", result.err)
        return result

    def test_args_not_json(self):
        return self.assertUsageError("--args", "enqueue", "app.add", "--args", "[1,")

    def test_args_not_an_array(self):
        return self.assertUsageError("--args", "enqueue", "app.add", "--args", '{"a": 1}')

    def test_kwargs_not_an_object(self):
        return self.assertUsageError("--kwargs", "enqueue", "app.add", "--kwargs", "[1]")

    def test_kwargs_reserved_key(self):
        return self.assertUsageError("--kwargs", "enqueue", "app.add", "--kwargs", '{"_q": 1}')

    def test_eta_without_offset(self):
        return self.assertUsageError("--eta", "enqueue", "app.add", "--eta",
                                     "2030-01-01T00:00:00")

    def test_countdown_and_eta(self):
        return self.assertUsageError("--eta", "enqueue", "app.add", "--countdown", "5",
                                     "--eta", "2030-01-01T00:00:00Z")

    def test_backoffs_reversed(self):
        return self.assertUsageError("--max-backoff", "enqueue", "app.add", "--min-backoff",
                                     "10", "--max-backoff", "1")

    def test_zero_attempts(self):
        return self.assertUsageError("--max-attempts", "enqueue", "app.add",
                                     "--max-attempts", "0")

    @defer.inlineCallbacks
    def test_unknown_state(self):
        result = yield self.assertUsageError("--state", "list", "--state", "lost")
        self.assertIn("queued", result.err)  # the valid choices are listed

    def test_no_command(self):
        return self.assertUsageError("COMMAND")


class _Silent(protocol.Protocol):
    """Accepts a connection and never says a word (an AMQP handshake hangs)."""

    def connectionMade(self):
        self.factory.connections.append(self)
        self.lost = defer.Deferred()

    def connectionLost(self, reason):
        self.lost.callback(None)


class ErrorTests(unittest.TestCase):
    """Failures are one ``quebert: error:`` line, exit code 1, in bounded time."""

    timeout = 60

    def assertOneErrorLine(self, result: Result, *fragments: str) -> None:
        self.assertEqual(result.code, 1, result)
        self.assertEqual(result.out, "")
        lines = result.err.splitlines()
        self.assertEqual(len(lines), 1, result)
        self.assertTrue(lines[0].startswith("quebert: error: "), result)
        for fragment in fragments:
            self.assertIn(fragment, lines[0])

    @defer.inlineCallbacks
    def test_amqp_refused(self):
        """Nothing listens on port 1: fails at the first attempt, with the reason."""
        result = yield run_cli("enqueue", "app.add", "--no-state", "--connect-timeout", "20",
                               "--amqp-url", "amqp://guest:guest@127.0.0.1:1/")
        self.assertOneErrorLine(result, "127.0.0.1:1", "refused")
        self.assertLess(result.seconds, 15)

    @defer.inlineCallbacks
    def test_amqp_handshake_hangs(self):
        """A server that accepts and stays silent: the timer ends the wait."""
        factory = protocol.Factory.forProtocol(_Silent)
        factory.connections = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"amqp://guest:guest@127.0.0.1:{port.getHost().port}/"
        result = yield run_cli("enqueue", "app.add", "--no-state", "--connect-timeout", "1",
                               "--amqp-url", url)
        for connection in factory.connections:
            connection.transport.abortConnection()
            yield connection.lost
        self.assertOneErrorLine(result, "within 1 s")
        self.assertLess(result.seconds, 10)
        self.assertTrue(factory.connections)

    @defer.inlineCallbacks
    def test_unknown_vhost(self):
        vhost = f"quebert-test-cli-absent-{uuid.uuid4().hex[:12]}"
        result = yield run_cli("enqueue", "app.add", "--no-state", "--amqp-url",
                               f"amqp://guest:guest@127.0.0.1:5672/{vhost}")
        self.assertOneErrorLine(result, vhost, "vhost")

    @defer.inlineCallbacks
    def test_invalid_task_name_before_connecting(self):
        """Options are checked before the network: the broker is never asked."""
        result = yield run_cli("enqueue", "not a name", "--no-state",
                               "--amqp-url", "amqp://guest:guest@127.0.0.1:1/")
        self.assertOneErrorLine(result, "'task'")
        self.assertNotIn("refused", result.err)

    @defer.inlineCallbacks
    def test_bad_amqp_url(self):
        result = yield run_cli("enqueue", "app.add", "--no-state", "--amqp-url", "http://x/")
        self.assertOneErrorLine(result, "AMQP URL")

    @defer.inlineCallbacks
    def test_redis_unreachable_for_status(self):
        result = yield run_cli("status", "abc", "--connect-timeout", "1",
                               "--redis-url", "redis://127.0.0.1:1/9")
        self.assertOneErrorLine(result, "127.0.0.1:1/9", "within 1 s")
        self.assertLess(result.seconds, 10)


class BrokerHarness(unittest.TestCase):
    """The CLI against RabbitMQ (a fresh vhost) and Redis (a fresh prefix)."""

    timeout = 120

    def setUp(self):
        self.amqp_url = make_vhost(self, prefix="quebert-test-cli")
        self.prefix = f"quebert-test-cli-{uuid.uuid4().hex[:12]}:"
        self.addCleanup(delete_redis_prefix, self.prefix)

    def quebert(self, *args: str, env: Optional[dict] = None):
        environ = {"QUEBERT_AMQP_URL": self.amqp_url, "QUEBERT_REDIS_URL": REDIS_URL}
        environ.update(env or {})
        return run_cli(*args, "--prefix", self.prefix, env=environ)

    @defer.inlineCallbacks
    def enqueue(self, *args: str) -> str:
        result = yield self.quebert("enqueue", *args)
        self.assertEqual(result.code, 0, result)
        self.assertEqual(result.err, "")
        self.assertRegex(result.out, r"^[A-Za-z0-9_.:\-]+\n$")
        return result.out.strip()

    @defer.inlineCallbacks
    def status(self, task_id: str) -> dict:
        result = yield self.quebert("status", task_id)
        self.assertEqual(result.code, 0, result)
        self.assertGreater(len(result.out.splitlines()), 1)  # pretty, not one line
        return json.loads(result.out)

    @defer.inlineCallbacks
    def listing(self, *args: str) -> List[dict]:
        result = yield self.quebert("list", *args)
        self.assertEqual(result.code, 0, result)
        self.assertEqual(result.err, "")
        return [json.loads(line) for line in result.out.splitlines()]



class BrokerTests(BrokerHarness):
    """``enqueue``, ``status`` and ``list`` against RabbitMQ and Redis."""

    @defer.inlineCallbacks
    def test_enqueue_publishes(self):
        """The id alone is printed and the task is in its queue, readable."""
        task_id = yield self.enqueue(
            "app.add", "--args", '[1, "two"]', "--kwargs", '{"x": {"y": null}}',
            "--queue", "cli-q", "--timeout", "30", "--max-attempts", "3",
            "--min-backoff", "2", "--max-backoff", "60", "--name", "unique-1")
        self.assertRegex(task_id, ID_RE)
        yield defer.ensureDeferred(wait_counts(self.amqp_url, "cli-q", (1, 0)))
        got = yield threads.deferToThread(basic_get, self.amqp_url, "cli-q")
        self.assertIsNotNone(got)
        properties, body = got
        message = wire.decode(body, properties.content_type)
        self.assertEqual(message.id, task_id)
        self.assertEqual(properties.message_id, task_id)
        self.assertEqual(message.task, "app.add")
        self.assertEqual(message.args, (1, "two"))
        self.assertEqual(message.kwargs, {"x": {"y": None}})
        self.assertEqual(message.queue, "cli-q")
        self.assertEqual(message.name, "unique-1")
        self.assertEqual(message.timeout, 30.0)
        self.assertEqual(dict(message.retry),
                         {"max_attempts": 3, "min_backoff": 2.0, "max_backoff": 60.0})
        self.assertIsNone(message.eta)

    @defer.inlineCallbacks
    def test_task_id_and_exchange(self):
        task_id = yield self.enqueue("app.add", "--task-id", "my-task.1", "--exchange", "clix")
        self.assertEqual(task_id, "my-task.1")
        yield defer.ensureDeferred(wait_counts(self.amqp_url, "default", (1, 0)))
        counts = yield queue_counts(self.amqp_url)
        self.assertIn("clix.qdelay.00", counts)

    @defer.inlineCallbacks
    def test_status_of_queued_task(self):
        task_id = yield self.enqueue("app.add", "--queue", "cli-q")
        record = yield self.status(task_id)
        self.assertEqual(record["id"], task_id)
        self.assertEqual(record["state"], "queued")
        self.assertEqual(record["task"], "app.add")
        self.assertEqual(record["queue"], "cli-q")
        self.assertEqual(record["attempts"], 0)

    @defer.inlineCallbacks
    def test_options_before_the_command(self):
        """Connection options may come before the command name too."""
        task_id = yield self.enqueue("app.add")
        result = yield run_cli("--redis-url", REDIS_URL, "--prefix", self.prefix,
                               "status", task_id)
        self.assertEqual(result.code, 0, result)
        self.assertEqual(json.loads(result.out)["id"], task_id)

    @defer.inlineCallbacks
    def test_countdown_is_scheduled(self):
        before = time.time()
        task_id = yield self.enqueue("app.add", "--queue", "cli-q", "--countdown", "3600")
        record = yield self.status(task_id)
        self.assertEqual(record["state"], "scheduled")
        self.assertLess(abs(record["eta"] - (before + 3600)), 60)
        counts = yield queue_counts(self.amqp_url)
        self.assertEqual(counts["cli-q"], (0, 0))  # waiting in a delay queue

    @defer.inlineCallbacks
    def test_eta_iso8601(self):
        task_id = yield self.enqueue("app.add", "--eta", "2100-01-01T01:00:00+01:00")
        record = yield self.status(task_id)
        self.assertEqual(record["state"], "scheduled")
        self.assertEqual(record["eta"], 4102444800.0)

    @defer.inlineCallbacks
    def test_status_of_unknown_task(self):
        result = yield self.quebert("status", "no-such-id")
        self.assertEqual(result.code, 1, result)
        self.assertEqual(result.out, "")
        self.assertEqual(result.err, "quebert: error: no such task: no-such-id\n")

    @defer.inlineCallbacks
    def test_no_state(self):
        task_id = yield self.enqueue("app.add", "--no-state")
        result = yield self.quebert("status", task_id)
        self.assertEqual(result.code, 1, result)
        self.assertIn("no such task", result.err)
        yield defer.ensureDeferred(wait_counts(self.amqp_url, "default", (1, 0)))

    @defer.inlineCallbacks
    def test_no_tracebacks_leaves_them_out_of_status_and_list(self):
        from quebert.state import RedisStateManager, connect_redis

        redis = connect_redis(REDIS_URL)
        self.addCleanup(redis.disconnect)
        state = RedisStateManager(redis, prefix=self.prefix)
        info = {"queue": "default", "kind": "call", "task": "app.add"}
        error = {"type": "builtins.ValueError", "message": "bad",
                 "traceback": "Traceback (most recent call last):\n  ...\nValueError: bad\n"}
        yield state.started("tb-1", 1, "w", info, 1.0)
        yield state.finished("tb-1", "scheduled", 1, info, 2.0, error=error, retry_at=3.0)
        yield state.started("tb-1", 2, "w", info, 3.0)
        yield state.finished("tb-1", "failed", 2, info, 4.0, error=error, reason="spent")
        full = yield self.status("tb-1")
        self.assertEqual([e["error"]["traceback"] for e in full["history"]],
                         [error["traceback"]] * 2)
        result = yield self.quebert("status", "tb-1", "--no-tracebacks")
        self.assertEqual(result.code, 0, result)
        self.assertNotIn("Traceback", result.out)
        brief = json.loads(result.out)
        self.assertEqual(brief["error"], {"type": "builtins.ValueError", "message": "bad"})
        self.assertEqual([(e["attempt"], e["error"]["message"]) for e in brief["history"]],
                         [(1, "bad"), (2, "bad")])
        self.assertEqual({k: v for k, v in brief.items() if k not in ("error", "history")},
                         {k: v for k, v in full.items() if k not in ("error", "history")})
        listed = yield self.listing("--no-tracebacks")
        self.assertEqual(listed, [brief])

    @defer.inlineCallbacks
    def test_list_filters(self):
        first = yield self.enqueue("app.one", "--queue", "q1")
        second = yield self.enqueue("app.two", "--queue", "q1")
        later = yield self.enqueue("app.three", "--queue", "q2", "--countdown", "600")
        records = yield self.listing()
        self.assertEqual([r["id"] for r in records], [later, second, first])
        self.assertEqual(records[0]["state"], "scheduled")
        result = yield self.quebert("list")
        for line in result.out.splitlines():
            self.assertEqual(line, json.dumps(json.loads(line), separators=(",", ":"),
                                              sort_keys=True))
        scheduled = yield self.listing("--state", "scheduled")
        self.assertEqual([r["id"] for r in scheduled], [later])
        queued = yield self.listing("--state", "queued")
        self.assertEqual([r["id"] for r in queued], [second, first])
        in_q1 = yield self.listing("--queue", "q1")
        self.assertEqual([r["id"] for r in in_q1], [second, first])
        none = yield self.listing("--queue", "q2", "--state", "queued")
        self.assertEqual(none, [])
        newest = yield self.listing("--limit", "1")
        self.assertEqual([r["id"] for r in newest], [later])

    @defer.inlineCallbacks
    def test_redis_unreachable_still_enqueues(self):
        """State is best effort: a warning, the id, the task in its queue."""
        result = yield self.quebert("enqueue", "app.add", "--connect-timeout", "2",
                                    "--redis-url", "redis://127.0.0.1:1/9")
        self.assertEqual(result.code, 0, result)
        task_id = result.out.strip()
        self.assertRegex(task_id, ID_RE)
        lines = result.err.splitlines()
        self.assertEqual(len(lines), 1, result)
        self.assertTrue(lines[0].startswith("quebert: warning: "), result)
        self.assertIn(task_id, lines[0])
        self.assertLess(result.seconds, 15)
        yield defer.ensureDeferred(wait_counts(self.amqp_url, "default", (1, 0)))


class TaskManagementTests(BrokerHarness):
    """``enqueue-url``, ``cancel``, ``requeue``, ``pause`` and ``resume``."""

    @defer.inlineCallbacks
    def test_enqueue_url_then_cancel(self):
        result = yield self.quebert(
            "enqueue-url", "http://127.0.0.1:9/hook", "-X", "PUT", "-H", "X-A: 1",
            "-d", '{"a": 1}', "--countdown", "60", "--name", "cli-url-1",
            "--max-attempts", "2")
        self.assertEqual(result.code, 0, result)
        task_id = result.out.strip()
        record = yield self.status(task_id)
        self.assertEqual((record["state"], record["kind"], record["task"], record["name"]),
                         ("scheduled", "url", "PUT http://127.0.0.1:9/hook", "cli-url-1"))
        # the same unique name again is refused, with the holder named
        again = yield self.quebert("enqueue-url", "http://127.0.0.1:9/hook",
                                   "--name", "cli-url-1")
        self.assertEqual(again.code, 1, again)
        self.assertIn("already exists", again.err)
        self.assertIn(task_id, again.err)
        canceled = yield self.quebert("cancel", task_id)
        self.assertEqual(canceled.code, 0, canceled)
        self.assertEqual(json.loads(canceled.out)["state"], "canceled")
        twice = yield self.quebert("cancel", task_id)
        self.assertEqual(twice.code, 1)
        self.assertIn("already canceled", twice.err)
        missing = yield self.quebert("cancel", "no-such-task")
        self.assertEqual(missing.code, 1)
        self.assertIn("no task", missing.err)

    @defer.inlineCallbacks
    def test_enqueue_url_refuses_bad_targets(self):
        for args, words in ((["http://169.254.169.254/latest"], "169.254"),
                            (["ftp://example.com/x"], "http"),
                            (["http://127.0.0.1/x", "-H", "no colon"], "NAME: VALUE")):
            result = yield self.quebert("enqueue-url", *args, "--no-state")
            self.assertNotEqual(result.code, 0, result)
            self.assertIn(words, result.err)

    @defer.inlineCallbacks
    def test_requeue_needs_a_failed_task(self):
        task_id = yield self.enqueue("app.add", "--args", "[1, 2]")
        result = yield self.quebert("requeue", task_id)
        self.assertEqual(result.code, 1, result)
        self.assertIn("not failed", result.err)

    @defer.inlineCallbacks
    def test_pause_and_resume(self):
        from quebert.state import RedisStateManager, connect_redis

        result = yield self.quebert("pause", "mail")
        self.assertEqual((result.code, result.out.strip()), (0, "paused mail"), result)
        redis = connect_redis(REDIS_URL)
        self.addCleanup(redis.disconnect)
        state = RedisStateManager(redis, prefix=self.prefix)
        self.assertEqual((yield state.paused_queues()), {"mail"})
        result = yield self.quebert("resume", "mail")
        self.assertEqual(result.code, 0, result)
        self.assertEqual((yield state.paused_queues()), set())
