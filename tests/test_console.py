"""
The console, without a browser: the feed's snapshots and rates (a Clock),
its files and event stream over a live API server (memory backend), the
connection cap, ``GET /tasks?task=``, and the per-task figures behind the
rates and ``/metrics``.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List

import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from quebert.api.console import ConsoleFeed, asset
from quebert.api.memory import MemoryTaskService
from quebert.stats import OTHER, TaskStats
from quebert.testing import StubWorker
from tests._api import RO, RW, LiveAPI
from tests._worker import wait_for

T0 = 1767225600.0


class _Service:
    """An overview that a test changes between ticks."""

    def __init__(self) -> None:
        self.calls = 0
        self.queues: List[dict] = [{"name": "q", "ready": 0, "unacked": 0, "delayed": 0,
                                    "settings": {"big": True}}]
        self.workers: Dict[str, dict] = {}
        self.pending: Any = None

    def overview(self) -> Any:
        self.calls += 1
        if self.pending is not None:
            return self.pending
        return {"queues": [dict(q) for q in self.queues],
                "workers": json.loads(json.dumps(self.workers)),
                "counts": {"queued": 1}}


def _events(payloads: List[bytes]) -> List[dict]:
    out = []
    for payload in payloads:
        name, data = payload.decode().strip().split("\n")
        out.append({"event": name[len("event: "):], **json.loads(data[len("data: "):])})
    return out


class FeedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.service = _Service()
        self.feed = ConsoleFeed(self.service, self.clock, interval=1.0, window=10.0)

    def test_one_overview_per_tick_for_every_listener_and_none_without(self) -> None:
        a: List[bytes] = []
        b: List[bytes] = []
        stop_a = self.feed.subscribe(a.append)
        stop_b = self.feed.subscribe(b.append)
        self.assertEqual(len(b), 1, "the latest snapshot at once")
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual((self.service.calls, len(a), len(b)), (3, 3, 3))
        self.assertNotIn("settings", _events(a)[0]["queues"][0])
        stop_a()
        stop_b()
        self.clock.advance(5)
        self.assertEqual(self.service.calls, 3, "nobody listens: no overview")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_slow_overview_skips_beats(self) -> None:
        self.service.pending = defer.Deferred()
        got: List[bytes] = []
        self.feed.subscribe(got.append)
        self.clock.advance(3)
        self.assertEqual(self.service.calls, 1)
        self.service.pending.callback({"queues": [], "workers": {}, "counts": {}})
        self.service.pending = None
        self.clock.advance(1)
        self.assertEqual((self.service.calls, len(got)), (2, 2))

    def test_rates_from_workers_and_backlog(self) -> None:
        got: List[bytes] = []
        counts = {"started": 0, "succeeded": 0, "failed": 0, "retried": 0, "canceled": 0}
        self.service.workers = {"w1": {"counts": {"q": dict(counts)}}}
        self.feed.subscribe(got.append)
        for second in range(1, 11):
            counts["succeeded"] += 8
            counts["retried"] += 2
            self.service.workers = {"w1": {"counts": {"q": dict(counts)}}}
            # the backlog grows by 5 a second while 10 go out: 15 arrive
            self.service.queues[0]["ready"] = 5 * second
            if second == 5:  # a new worker: its counts start now, no spike
                self.service.workers["w2"] = {"counts": {"q": {"succeeded": 10_000}}}
            elif second > 5:
                self.service.workers["w2"] = {"counts": {"q": {"succeeded": 10_000}}}
            self.clock.advance(1)
        queue = _events(got)[-1]["queues"][0]
        self.assertAlmostEqual(queue["rate_out"], 10.0, places=6)
        self.assertAlmostEqual(queue["rate_in"], 15.0, places=6)
        self.assertAlmostEqual(queue["failures_per_minute"], 120.0, places=6)

    def test_workers_with_their_last_beat_age(self) -> None:
        got: List[bytes] = []
        self.service.workers = {"h:1": {"host": "h", "beat_at": T0 - 0.5, "counts": {}}}
        self.feed.subscribe(got.append)
        worker = _events(got)[0]["workers"][0]
        self.assertEqual((worker["id"], worker["host"], worker["last_beat"]), ("h:1", "h", 0.5))
        self.assertNotIn("counts", worker)

    def test_a_failing_overview_is_told_and_the_feed_goes_on(self) -> None:
        got: List[bytes] = []
        self.service.pending = defer.fail(RuntimeError("redis is down"))
        self.feed.subscribe(got.append)
        self.service.pending = None
        self.clock.advance(1)
        events = _events(got)
        self.assertEqual(events[0]["event"], "problem")
        self.assertIn("redis is down", events[0]["message"])
        self.assertEqual(events[1]["event"], "overview")
        self.flushLoggedErrors()


class StatsTests(SynchronousTestCase):
    def test_outcomes_per_task_and_queue(self) -> None:
        stats = TaskStats()
        stats.started("a", "q", 0.2)
        stats.ended("a", "q", "succeeded", 0.03)
        stats.started("a", "q", None)
        stats.ended("a", "q", "retried", 1.0)
        self.assertEqual(stats.outcomes, {("a", "q", "succeeded"): 1, ("a", "q", "retried"): 1})
        self.assertEqual(stats.per_queue()["q"],
                         {"started": 2, "succeeded": 1, "retried": 1, "failed": 0,
                          "canceled": 0})
        run = stats.run_time[("a", "q")]
        self.assertEqual((run.count, round(run.sum, 6)), (2, 1.03))
        self.assertEqual(dict(run.cumulative())["0.05"], 1)
        self.assertEqual(dict(run.cumulative())["+Inf"], 2)
        self.assertEqual(stats.wait_time[("a", "q")].count, 1, "retries have no queue wait")

    def test_task_names_are_capped(self) -> None:
        stats = TaskStats(max_task_names=2)
        for name in ("a", "b", "c", "d", "a"):
            stats.ended(name, "q", "failed")
        self.assertEqual(stats.outcomes, {("a", "q", "failed"): 2, ("b", "q", "failed"): 1,
                                          (OTHER, "q", "failed"): 2})

    def test_the_worker_exposes_them(self) -> None:
        from quebert.metrics import WorkerMetrics
        from quebert.registry import Registry

        registry = Registry()
        registry.register(lambda x: x, name="app.ok")
        worker = StubWorker(Clock(), registry=registry)
        worker.state_of(worker.enqueue("app.ok", 1))
        text = WorkerMetrics(worker.mediator).exposition().decode()
        self.assertIn('quebert_task_attempts_total{outcome="succeeded",queue="default",'
                      'task="app.ok"} 1.0', text)
        self.assertIn('quebert_task_run_seconds_count{queue="default",task="app.ok"} 1.0',
                      text)
        self.assertIn('quebert_task_queue_wait_seconds_bucket{le="+Inf",queue="default",'
                      'task="app.ok"} 1.0', text)


class ConsoleHTTPTests(LiveAPI, TestCase):
    """The console's files and stream on a live server."""

    timeout = 60

    async def setUp(self) -> None:
        self.memory = MemoryTaskService(tasks=("app.add", "app.send"))
        await self.start_api(self.memory, max_streams=2, max_connections=20)

    async def test_files_are_public_with_a_strict_policy(self) -> None:
        response = await self.request("GET", "/ui/", token=None)
        self.assertEqual(response.code, 200)
        self.assertIn(b'<script type="module" src="app.js">', response.raw)
        policy = response.header("content-security-policy")
        self.assertIn("script-src 'self'", policy)
        self.assertIn("default-src 'none'", policy)
        self.assertNotIn("unsafe-inline", policy)
        self.assertEqual(response.header("x-frame-options"), "DENY")
        self.assertEqual(response.header("referrer-policy"), "no-referrer")
        js = await self.request("GET", "/ui/app.js", token=None)
        self.assertEqual((js.code, js.header("content-type")),
                         (200, "text/javascript; charset=utf-8"))
        moved = await self.agent.request(b"GET", (self.base + "/ui").encode())
        self.assertEqual((moved.code, moved.headers.getRawHeaders(b"location")),
                         (301, [b"/ui/"]))
        await treq.content(moved)

    async def test_only_the_shipped_files(self) -> None:
        for path in ("/ui/nope.js", "/ui/../resource.py", "/ui/ui/app.js", "/ui/%2e%2e"):
            self.assertError(await self.request("GET", path, token=None), 404, "not_found")
        self.assertError(await self.request("POST", "/ui/", token=None), 405,
                         "method_not_allowed")

    def test_no_inline_script_or_style_in_the_page(self) -> None:
        page = asset("index.html")[0].decode()
        self.assertNotIn("<script>", page)
        self.assertNotIn("style=", page)
        self.assertNotIn("onclick", page)
        for name in ("app.js", "views.js", "api.js"):
            self.assertNotIn("innerHTML", asset(name)[0].decode(), name)

    async def open_stream(self, token: str) -> Any:
        received: List[bytes] = []

        class Reader(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        port = int(self.base.rsplit(":", 1)[1])
        protocol = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                                         Reader())
        protocol.transport.write(f"GET /events HTTP/1.1\r\nHost: x\r\n"
                                 f"Authorization: Bearer {token}\r\n\r\n".encode())
        self.addCleanup(protocol.transport.loseConnection)
        return protocol, received

    async def test_the_stream_says_the_access_and_sends_overviews(self) -> None:
        _, received = await self.open_stream(RO)
        await wait_for(lambda: b"event: overview" in b"".join(received), 10,
                       what="an overview")
        text = b"".join(received).decode()
        self.assertIn("text/event-stream", text)
        self.assertIn('event: hello\ndata: {"access":"read-only"', text)
        _, received = await self.open_stream(RW)
        await wait_for(lambda: b"event: hello" in b"".join(received), 10, what="hello")
        self.assertIn(b'"access":"read-write"', b"".join(received))

    async def test_the_stream_needs_a_token_and_is_capped(self) -> None:
        response = await self.request("GET", "/events", token=None)
        self.assertError(response, 401, "unauthorized")
        first, _ = await self.open_stream(RO)
        second, _ = await self.open_stream(RO)
        await deferLater(reactor, 0.3, lambda: None)
        _, third = await self.open_stream(RO)
        await wait_for(lambda: b"503" in b"".join(third), 10, what="a 503")
        first.transport.loseConnection()
        await deferLater(reactor, 0.3, lambda: None)
        _, fourth = await self.open_stream(RO)
        await wait_for(lambda: b"event: hello" in b"".join(fourth), 10, what="a free slot")

    async def test_connections_beyond_the_cap_are_closed(self) -> None:
        held = []
        for _ in range(20):
            protocol = await connectProtocol(
                TCP4ClientEndpoint(reactor, "127.0.0.1", int(self.base.rsplit(":", 1)[1])),
                Protocol())
            held.append(protocol)
            self.addCleanup(protocol.transport.loseConnection)
        lost: List[Any] = []

        class Watch(Protocol):
            def connectionLost(self, reason: Any) -> None:
                lost.append(reason)

        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", int(self.base.rsplit(":", 1)[1])),
            Watch())
        await wait_for(lambda: lost, 10, what="the 21st connection to be closed")
        for protocol in held:
            protocol.transport.loseConnection()
        await deferLater(reactor, 0.2, lambda: None)
        response = await self.request("GET", "/tasks")
        self.assertEqual(response.code, 200, "room again")
        self.flushLoggedErrors()

    async def test_tasks_by_name(self) -> None:
        for i in range(5):
            await self.post_task(task="app.send" if i % 2 else "app.add", args=[i])
        page = (await self.request("GET", "/tasks?task=app.send&limit=1")).json
        self.assertEqual([t["task"] for t in page["tasks"]], ["app.send"])
        rest = (await self.request(
            "GET", f"/tasks?task=app.send&limit=5&offset={page['next_offset']}")).json
        self.assertEqual((len(rest["tasks"]), rest["next_offset"]), (1, None))
        self.assertError(await self.request("GET", "/tasks?task=bad%20name"), 400,
                         "invalid_field", "task")
