"""
Scenario: a burst of malformed messages, generated with hypothesis and
published raw (pika, as a foreign producer would), shuffled among 1,000
good tasks.

The bad ones: random bytes, JSON that is not an object, objects without
a version, valid bodies with one field of a wrong type or value, unknown
task names, arguments that do not fit the task, bodies over the size
limit, unsupported content types, and guillotina_amqp-shaped bodies with a
bad field.  Every bad message must land in ``default.errored`` with an
``x-quebert-reason`` header, none may run, every good task must succeed
exactly once, and the worker must never restart (same process all along,
no mediator failure logged).

Generation is deterministic (``derandomize``); set
``QUEBERT_FAULTS_SEED=<int>`` to explore other messages.  Before
publishing, each generated message is checked against
:func:`quebert.protocol.decode` and the task registry in the test
process: a "bad" message they would accept fails the test at once (a
generator bug, or a hole in validation worth a look).
"""

from __future__ import annotations

import json
import os
import random
import uuid

import pika
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from quebert import protocol
from quebert.errors import InvalidMessage
from quebert.protocol import QUEUE_RE
from quebert.registry import default_registry
from tests._rabbit import publish_raw, read_all
from tests.faults import tasks as _tasks  # noqa: F401  (registers the tasks here too)
from tests.faults._harness import FaultCase

GOOD = 1000
#: Examples hypothesis draws; each gives 1-5 bad messages.
EXAMPLES = 100
MAX_SIZE = 4096
PREFETCH = 20
#: Task numbers of bad messages start here: a run of one would be a stray.
BAD_BASE = 1_000_000
JSON_TYPES = ("application/json", "text/json")
_ID = protocol._ID_RE
_NAME = protocol._NAME_RE
H_INDEX = "x-fault-index"

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
truthy = json_values.filter(bool)


def _is_json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):
        return False


def _bad_value_for(field: str):
    """Values of ``field`` that a version-1 body must be refused for."""
    if field == "version":
        return json_values.filter(lambda v: not (type(v) in (int, float) and v == 1))
    if field == "id":
        return json_values.filter(lambda v: not (isinstance(v, str) and _ID.match(v)))
    if field == "task":
        return json_values.filter(lambda v: not (isinstance(v, str) and _NAME.match(v)))
    if field == "args":
        return truthy.filter(lambda v: not isinstance(v, list))
    if field == "kwargs":
        return truthy.filter(lambda v: not isinstance(v, dict))
    if field == "queue":
        return truthy.filter(lambda v: not (isinstance(v, str) and QUEUE_RE.match(v)))
    if field == "name":
        return json_values.filter(
            lambda v: v is not None and not (isinstance(v, str) and _ID.match(v)))
    if field == "kind":
        return json_values.filter(lambda v: v is not None and v not in ("call", "url"))
    # timeout, eta, created_at: numbers >= 0 or null only
    return json_values.filter(lambda v: v is not None and not (
        type(v) in (int, float) and v == v and abs(v) != float("inf") and v >= 0))


def bad_messages(path: str):
    """A strategy of ``(kind, body bytes, content type)`` that must all be refused."""
    def valid(n: int, **changes) -> dict:
        body = {"version": 1, "id": uuid.UUID(int=n).hex, "kind": "call",
                "task": "faults.mark", "args": [path, BAD_BASE + n], "kwargs": {}}
        body.update(changes)
        return body

    def dumps(value) -> bytes:
        return json.dumps(value).encode()  # NaN and Infinity allowed: producers send them

    n = st.integers(0, 2**32)
    json_ct = st.sampled_from([*JSON_TYPES, None, "application/json; charset=utf-8"])
    random_bytes = st.tuples(st.just("bytes"), st.binary(max_size=200)
                             .filter(lambda b: not _is_json_object(b)), json_ct)
    not_object = st.tuples(st.just("json-not-object"),
                           json_values.filter(lambda v: not isinstance(v, dict)).map(dumps),
                           json_ct)
    no_version = st.tuples(
        st.just("no-version"),
        st.dictionaries(st.text(max_size=10).filter(lambda k: k not in ("version", "func")),
                        json_values, max_size=5).map(dumps), json_ct)
    fields = st.sampled_from(["version", "id", "task", "args", "kwargs", "queue", "name",
                              "kind", "timeout", "eta", "created_at"])
    wrong_field = fields.flatmap(lambda f: st.tuples(
        st.just(f"wrong-{f}"),
        st.builds(lambda i, v: dumps(valid(i, **{f: v})), n, _bad_value_for(f)), json_ct))
    unknown_task = st.tuples(
        st.just("unknown-task"),
        st.builds(lambda i, name: dumps(valid(i, task=name)), n,
                  st.from_regex(r"[A-Za-z_][A-Za-z0-9_.:\-]{0,40}", fullmatch=True)
                  .filter(lambda s: s not in default_registry)),
        json_ct)
    misfit = st.tuples(
        st.just("args-do-not-fit"),
        st.builds(lambda i, args, kwargs: dumps(valid(i, args=args, kwargs=kwargs)), n,
                  st.lists(json_values, max_size=8).filter(lambda a: not 2 <= len(a) <= 4),
                  st.just({})) | st.builds(
            lambda i, key: dumps(valid(i, kwargs={key: 1})), n,
            st.text(min_size=1, max_size=10).filter(
                lambda k: k not in ("path", "i", "seconds", "fail_first"))),
        json_ct)
    oversized = st.tuples(
        st.just("oversized"),
        st.builds(lambda i, extra: dumps(valid(i, pad="x" * (MAX_SIZE + extra))), n,
                  st.integers(0, 3 * MAX_SIZE)), json_ct)
    content_type = st.tuples(
        st.just("content-type"),
        st.builds(lambda i: dumps(valid(i)), n),
        (st.sampled_from(["text/plain", "application/xml", "application/octet-stream",
                          "text/html; charset=utf-8", "application/x-msgpack"])
         | st.from_regex(r"[a-z]{1,12}/[a-z+.\-]{1,16}", fullmatch=True))
        .filter(lambda ct: ct.split(";")[0].strip().lower() not in JSON_TYPES))
    guillotina = st.builds(
        lambda i, broken, value: dumps({**{
            "func": "faults.mark", "args": [path, BAD_BASE + i], "kwargs": {},
            "task_id": uuid.UUID(int=i).hex, "req_data": {"url": "/db/guillotina"},
            "db_id": "db", "container_id": "guillotina"}, broken: value}),
        n, st.sampled_from(["func", "task_id"]), json_values.filter(
            lambda v: not (isinstance(v, str) and _NAME.match(v))),
    ) | st.builds(
        lambda i, broken, value: dumps({
            "func": "faults.mark", "task_id": uuid.UUID(int=i).hex,
            "args": [path, BAD_BASE + i], "kwargs": {}, broken: value}),
        n, st.sampled_from(["args", "kwargs"]), st.one_of(
            st.text(min_size=1), st.integers().filter(bool), st.just(True)),
    ) | st.builds(
        lambda i, func: dumps({"func": func, "task_id": uuid.UUID(int=i).hex,
                               "args": [path, BAD_BASE + i]}),
        n, st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,30}", fullmatch=True)
        .filter(lambda s: s not in default_registry))
    guillotina_shaped = st.tuples(st.just("guillotina"), guillotina,
                                  st.sampled_from([None, "application/json"]))
    return st.one_of(random_bytes, not_object, no_version, wrong_field, unknown_task, misfit,
                     oversized, content_type, guillotina_shaped)


def generate(path: str) -> list:
    """Draw the burst of bad messages (deterministic unless QUEBERT_FAULTS_SEED is set)."""
    drawn: list = []
    chosen = os.environ.get("QUEBERT_FAULTS_SEED")
    config = settings(max_examples=EXAMPLES, database=None, derandomize=chosen is None,
                      phases=[Phase.generate], deadline=None,
                      suppress_health_check=list(HealthCheck))

    @config
    @given(st.lists(bad_messages(path), min_size=1, max_size=5))
    def collect(batch):
        drawn.extend(batch)

    if chosen is not None:
        collect = seed(int(chosen))(collect)
    collect()
    return drawn


def accepted(body: bytes, content_type) -> bool:
    """Would a worker run this message (decode, registered task, arguments fit)?"""
    try:
        message = protocol.decode(body, content_type, max_size=MAX_SIZE)
        definition = default_registry.get(message.task, message.id)
        definition.bind(message.args, message.kwargs, message.id)
    except InvalidMessage:
        return False
    return True


class MalformedTests(FaultCase):
    scenario = "malformed"
    fault = f"hypothesis burst of malformed messages shuffled among {GOOD} good ones"

    def test_malformed_burst_goes_to_errored_and_the_worker_keeps_going(self):
        return defer.ensureDeferred(self._test())

    async def _test(self):
        path = self.runs.path
        bad = generate(path)
        slipped = [(kind, body[:200], ct) for kind, body, ct in bad if accepted(body, ct)]
        self.assertEqual(slipped, [], "generated 'bad' messages that a worker would accept")
        kinds = sorted({kind.split("-")[0] if kind.startswith("wrong-") else kind
                        for kind, _, _ in bad})

        good_ids = {}
        items = []
        for i in range(GOOD):
            message, body = protocol.build("faults.mark", (path, i), queue="default")
            good_ids[i] = message.id
            if i % 10 == 0:  # guillotina_amqp's own shape: no content type, no headers
                body = json.dumps({"func": "faults.mark", "args": [path, i], "kwargs": {},
                                   "task_id": message.id, "db_id": "db"}).encode()
                props = pika.BasicProperties(delivery_mode=2)
            else:
                props = pika.BasicProperties(content_type=protocol.CONTENT_TYPE,
                                             delivery_mode=2, message_id=message.id)
            items.append((body, props))
        for n, (_, body, ct) in enumerate(bad):
            items.append((body, pika.BasicProperties(content_type=ct, delivery_mode=2,
                                                     headers={H_INDEX: n})))
        random.Random(4).shuffle(items)

        worker = self.worker(queues=(f"default:{PREFETCH}",),
                             extra=("--max-message-size", str(MAX_SIZE))).start()
        await worker.ready()
        pid = worker.process.pid
        await deferToThread(publish_raw, self.url, "default", items)

        records = await self.wait_done(good_ids, workers=(worker,))
        tally = self.tally(records, {i: 1 for i in good_ids})
        self.check(tally, duplicate_bound=0, attempt_bound=0, records=records)
        await self.assert_queues({"default.errored": (len(bad), 0)}, timeout=30)

        errored = await deferToThread(read_all, self.url, "default.errored")
        by_index = {}
        for properties, body in errored:
            headers = properties.headers or {}
            self.assertTrue(headers.get("x-quebert-reason"),
                            f"an errored copy without a reason: {headers}")
            by_index[headers.get(H_INDEX)] = (body, headers["x-quebert-reason"])
        self.assertEqual(sorted(by_index), list(range(len(bad))),
                         "every bad message, once, in the errored queue")
        for n, (kind, body, _) in enumerate(bad):
            copy = by_index[n][0]
            if kind != "guillotina":
                self.assertEqual(copy, body, "errored copies keep the body")
                continue
            # guillotina_amqp bodies are never copied as received: their
            # req_data may hold the caller's credentials (docs/protocol.rst).
            self.assertNotIn(b"req_data", copy)
            original, kept = json.loads(body), json.loads(copy)
            self.assertEqual(kept.get("task_id", kept.get("id")), original.get("task_id"),
                             "the errored copy is the same task")

        self.assertTrue(worker.alive)
        self.assertEqual(worker.process.pid, pid)
        self.assertEqual(worker.starts, 1)
        log = worker.log()
        self.assertEqual(log.count("consuming default"), 1, "the consumer was never re-made")
        self.assertNotIn("#critical", log, "the mediator failed on a message")
        self.assertNotIn("Unhandled", log)
        self.row["recovery"] = "n/a (no outage: the worker must not stop)"
        await self.stop_workers(worker)
        await self.assert_queues()
        self.passed(f"{len(bad)} bad messages ({len(kinds)} kinds: {', '.join(kinds)}) all "
                    f"refused with a reason; worker pid {pid} never restarted")
