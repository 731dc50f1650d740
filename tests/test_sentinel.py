"""
Redis through Sentinel: ``redis+sentinel://`` URLs, the state store that
follows a failover, ``WAIT`` for replicas.

The live tests run against the set of :mod:`tests._sentinel`
(``scripts/redis-sentinel.sh`` on ports of the tests' own), and skip only
when ``redis-server`` is not installed.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Dict, List

from twisted.internet import defer
from twisted.internet.defer import succeed
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from quebert.errors import ConfigurationError, StateError
from quebert.state._redis_ops import describe_redis_url, parse_redis_url
from quebert.state.redis import (
    SETTLE_LINGER,
    RedisStateManager,
    SentinelHandler,
    connect_redis,
)
from quebert.state.resilient import ResilientStateManager
from tests import _sentinel
from tests._redis import delete_prefixed
from tests._worker import sleep, wait_for

T0 = 1_700_000_000.0

#: Seconds within which the store must write to the promoted replica after
#: ``kill -9`` of the primary: the sentinels' failover (about 2 s here, with
#: down-after-milliseconds 1000), the reconnection (discovery retried within
#: 1 s, reconnects 2 s apart at most) and ResilientStateManager's retry of
#: its queue (1, 2, 4, then every 5 s).
FOLLOW_BOUND = 20.0


def info(queue: str = "default") -> Dict[str, Any]:
    """Task metadata as producers and workers pass it."""
    return {"queue": queue, "kind": "call", "task": "app.tasks.add", "name": None,
            "eta": None, "created_at": T0, "max_retries": 3, "timeout": None,
            "retry_policy": None, "parent_id": None, "root_id": None}


class SentinelURLTests(SynchronousTestCase):
    """``redis+sentinel://`` URLs as every entry point reads them."""

    def test_full_url(self) -> None:
        """Sentinels, service, database, both passwords and the WAIT options are read."""
        self.assertEqual(
            parse_redis_url("redis+sentinel://app:s%40cret@10.0.0.1:26380,sentinel-b,"
                            "[::1]:26390/my%20primary/3?sentinel_password=sp&wait=2"
                            "&wait_timeout=0.25"),
            {
                "sentinels": [("10.0.0.1", 26380), ("sentinel-b", 26379), ("::1", 26390)],
                "service": "my primary",
                "db": 3,
                "username": "app",
                "password": "s@cret",
                "tls": False,
                "sentinel_password": "sp",
                "wait_replicas": 2,
                "wait_timeout": 0.25,
            },
        )

    def test_defaults(self) -> None:
        """Database 0, no passwords, WAIT for 1 replica for 0.5 s; a trailing slash is fine."""
        for url in ("redis+sentinel://h:1/qm", "redis+sentinel://h:1/qm/", "REDIS+SENTINEL://h:1/qm"):
            parsed = parse_redis_url(url)
            self.assertEqual(
                (parsed["service"], parsed["db"], parsed["password"],
                 parsed["sentinel_password"], parsed["wait_replicas"], parsed["wait_timeout"]),
                ("qm", 0, None, None, 1, 0.5), url)
        self.assertEqual(parse_redis_url("redis+sentinel://h/qm?wait=0")["wait_replicas"], 0)

    def test_plain_urls_are_unchanged(self) -> None:
        """A redis:// URL's keys stay what they were: no ``sentinels``."""
        self.assertNotIn("sentinels", parse_redis_url("redis://127.0.0.1:6379/0"))

    def test_malformed_urls_are_configuration_errors(self) -> None:
        """Each malformed form gets a sentence that names the URL and what is wrong."""
        cases = {
            "redis+sentinel://": "names no sentinel",
            "redis+sentinel:///qm": "names no sentinel",
            "redis+sentinel://:pw@/qm": "names no sentinel",
            "redis+sentinel://a:1,,b:2/qm": "empty sentinel address",
            "redis+sentinel://a:1,/qm": "empty sentinel address",
            "redis+sentinel://a:port/qm": "port 'port'",
            "redis+sentinel://a:0/qm": "port '0'",
            "redis+sentinel://a:70000/qm": "port '70000'",
            "redis+sentinel://::1/qm": "in brackets",
            "redis+sentinel://[::1/qm": "malformed sentinel address",
            "redis+sentinel://[::1]x/qm": "malformed sentinel address",
            "redis+sentinel://a:1": "names no service",
            "redis+sentinel://a:1/": "names no service",
            "redis+sentinel://a:1//0": "names no service",
            "redis+sentinel://a:1/qm/zero": "database 'zero'",
            "redis+sentinel://a:1/qm/0/x": "path of 3 parts",
            "redis+sentinel://a:1/qm?ssl=yes": "option 'ssl'",
            "redis+sentinel://a:1/qm?wait=1&wait=2": "option 'wait' twice",
            "redis+sentinel://a:1/qm?wait=-1": "wait='-1'",
            "redis+sentinel://a:1/qm?wait=one": "wait='one'",
            "redis+sentinel://a:1/qm?wait_timeout=0": "wait_timeout='0'",
            "redis+sentinel://a:1/qm?wait_timeout=nan": "wait_timeout='nan'",
            "redis+sentinel://a:1/qm?wait_timeout=120": "wait_timeout='120'",
            "redis+sentinel://a:1/qm#x": "fragment",
            "rediss+sentinel://a:1/qm": "TLS through Sentinel",
        }
        for url, expected in cases.items():
            with self.assertRaises(ConfigurationError, msg=url) as caught:
                connect_redis(url)
            self.assertIn(expected, str(caught.exception), url)
            self.assertIn(repr(url), str(caught.exception), url)

    def test_description_hides_passwords(self) -> None:
        """What the CLI says about a Redis names no password."""
        self.assertEqual(
            describe_redis_url("redis+sentinel://:pw@a:1,[::1]/qm/2?sentinel_password=sp"),
            "a:1,[::1]:26379/qm/2 (Sentinel)")
        self.assertEqual(describe_redis_url("redis://:pw@h:6380/3"), "h:6380/3")

    def test_worker_and_api_options(self) -> None:
        """``twistd amqp-worker``/``quebert-api --redis-url`` take it, and refuse a bad one."""
        from quebert import api_tap, tap

        url = "redis+sentinel://a:26380,b:26381/qm/0"
        for options_class, extra in ((tap.Options, []),
                                     (api_tap.Options, ["--http-port", "8080",
                                                       "--api-read-token", "t" * 32])):
            options = options_class()
            options.parseOptions(["--redis-url", url, *extra])
            self.assertEqual(options["worker_config"].redis_url, url)
            e = self.assertRaises(usage.UsageError, options_class().parseOptions,
                                  ["--redis-url", "redis+sentinel://a:26380/", *extra])
            self.assertIn("names no service", str(e))

    def test_config_file(self) -> None:
        """``state.url`` in a config file takes it too."""
        from quebert.config import from_mapping

        url = "redis+sentinel://a:26380/qm/1"
        self.assertEqual(from_mapping({"state": {"url": url}}).redis_url, url)

    def test_cli(self) -> None:
        """``quebert --redis-url`` passes it to connect_redis."""
        from quebert import cli

        options = cli.build_parser().parse_args(
            ["--redis-url", "redis+sentinel://a:26380/qm", "status", "x"])
        self.assertEqual(options.redis_url, "redis+sentinel://a:26380/qm")

    def test_guillotina_settings(self) -> None:
        """The bridge's ``redis_url`` takes it, and refuses a malformed one."""
        from quebert.bridge.guillotina.settings import BridgeSettings

        url = "redis+sentinel://a:26380/qm/0"
        self.assertEqual(BridgeSettings.from_mapping({"redis_url": url}).redis_url, url)
        e = self.assertRaises(ConfigurationError, BridgeSettings.from_mapping,
                              {"redis_url": "redis+sentinel://a:x/qm"})
        self.assertIn("redis_url", str(e))

    def test_plain_url_does_not_wait(self) -> None:
        """No WAIT on the hot path of a redis:// URL."""
        handler = connect_redis("redis://127.0.0.1:1/0", connect_timeout=1)
        self.addCleanup(handler.disconnect)
        self.assertEqual(RedisStateManager(handler).wait_replicas, 0)

    def test_sentinel_handler(self) -> None:
        """A Sentinel URL's connection carries its WAIT options and reconnects within 2 s."""
        from quebert.state.redis import RECONNECT_MAX_DELAY

        handler = connect_redis("redis+sentinel://127.0.0.1:1/qm/2?wait=2&wait_timeout=0.1",
                                connect_timeout=1)
        self.addCleanup(handler.disconnect)
        self.assertIsInstance(handler, SentinelHandler)
        store = RedisStateManager(handler)
        self.assertEqual((store.wait_replicas, store.wait_timeout), (2, 0.1))
        self.assertEqual(handler._factory.maxDelay, RECONNECT_MAX_DELAY)
        self.assertEqual(handler._factory.dbid, 2)
        self.assertEqual(RedisStateManager(handler, wait_replicas=0).wait_replicas, 0)


class _FakeFactory:
    generation = 1


class _FakeHandler(SentinelHandler):
    """A SentinelHandler answering ``apply`` and ``WAIT`` itself."""

    def __init__(self, acknowledged: int = 1, reconnect: bool = False) -> None:
        self._factory = _FakeFactory()
        self.acknowledged = acknowledged
        self.reconnect = reconnect
        self.commands: List[tuple] = []

    def evalsha(self, sha: str, keys: list, args: list) -> Any:
        self.commands.append(("EVALSHA",))
        return succeed([0, 1, "ok"])

    def execute_command(self, *args: str) -> Any:
        self.commands.append(args)
        if self.reconnect:  # the connection is replaced before WAIT is answered
            d: defer.Deferred = defer.Deferred()

            def answer() -> None:
                self._factory.generation += 1
                d.callback(self.acknowledged)

            self.answer = answer
            return d
        return succeed(self.acknowledged)


class WaitUnitTests(SynchronousTestCase):
    """When the store sends WAIT, and what it makes of the answer (no server)."""

    def store(self, handler: _FakeHandler) -> RedisStateManager:
        from twisted.internet.task import Clock

        self.clock = Clock()
        return RedisStateManager(handler, clock=self.clock)

    def test_one_wait_per_batch_of_settling_writes(self) -> None:
        handler = _FakeHandler()
        store = self.store(handler)
        results = [store.enqueued(f"t{i}", "queued", info(), T0) for i in range(3)]
        self.clock.advance(0)
        self.assertEqual(handler.commands, [("EVALSHA",), ("WAIT", "1", "500")])
        self.assertEqual(self.successResultOf(results[0]), "ok")
        for d in results[1:]:
            self.successResultOf(d)

    def test_started_alone_does_not_wait(self) -> None:
        handler = _FakeHandler()
        store = self.store(handler)
        self.successResultOf(_flushed(self.clock, store.started("t", 1, "w", info(), T0)))
        self.assertEqual(handler.commands, [("EVALSHA",)])

    def test_reconnection_between_write_and_wait_fails_the_batch(self) -> None:
        handler = _FakeHandler(reconnect=True)
        store = self.store(handler)
        d = _flushed(self.clock, store.finished("t", "succeeded", 1, info(), T0))
        self.assertNoResult(d)
        handler.answer()
        failure = self.failureResultOf(d, StateError)
        self.assertIn("re-established", str(failure.value))

    def test_a_started_write_does_not_wait_for_the_replicas_of_its_batch(self) -> None:
        """
        An outcome and a start in one batch: the start is answered once the
        batch is applied, the outcome once WAIT is (here: failed by a
        reconnection).
        """
        handler = _FakeHandler(reconnect=True)
        store = self.store(handler)
        outcome = store.finished("a", "succeeded", 1, info(), T0)
        started = store.started("b", 1, "w", info(), T0 + 1)
        self.clock.advance(0)
        self.assertEqual(handler.commands, [("EVALSHA",), ("WAIT", "1", "500")])
        self.assertIsNone(self.successResultOf(started))
        self.assertNoResult(outcome)
        handler.answer()
        self.failureResultOf(outcome, StateError)

    def test_timed_out_wait_degrades_then_probes(self) -> None:
        handler = _FakeHandler(acknowledged=0)
        store = self.store(handler)
        self.successResultOf(_flushed(self.clock, store.enqueued("a", "queued", info(), T0)))
        self.assertEqual((store.wait_timeouts, store._wait_degraded), (1, True))
        handler.commands.clear()
        self.successResultOf(_flushed(self.clock, store.enqueued("b", "queued", info(), T0)))
        self.assertEqual(handler.commands, [("EVALSHA",)], "no WAIT while degraded")
        self.clock.advance(5)
        handler.acknowledged = 1
        handler.commands.clear()
        self.successResultOf(_flushed(self.clock, store.enqueued("c", "queued", info(), T0)))
        self.assertEqual(handler.commands, [("EVALSHA",), ("WAIT", "1", "50")], "a probe")
        self.assertFalse(store._wait_degraded)


def _flushed(clock: Any, d: defer.Deferred) -> defer.Deferred:
    """``d``, once the batch holding its write has gone (outcomes linger first)."""
    clock.advance(SETTLE_LINGER)
    return d


class _LiveCase(TestCase):
    """A store connected through the test Sentinel set, on a prefix of its own."""

    timeout = 120

    def setUp(self) -> Any:
        self.url = _sentinel.sentinel_set()
        self.prefix = f"quebert-test-{uuid.uuid4().hex}:"
        self.redis = connect_redis(self.url)
        self.addCleanup(self.redis.disconnect)
        self.addCleanup(lambda: delete_prefixed(self.redis, self.prefix))
        return self.redis.ping()

    def store(self, url: str = "") -> RedisStateManager:
        redis = self.redis
        if url:
            redis = connect_redis(url)
            self.addCleanup(redis.disconnect)
        return RedisStateManager(redis, prefix=self.prefix)


class SentinelStoreTests(_LiveCase):
    """The state store through Sentinel, the set healthy."""

    async def test_writes_and_reads(self) -> None:
        """Records are written to the primary, and on the replica once answered."""
        store = self.store()
        self.assertEqual(store.wait_replicas, 1)
        await store.enqueued("a", "queued", info(), T0)
        await store.started("a", 1, "w1", info(), T0 + 1)
        await store.finished("a", "succeeded", 1, info(), T0 + 2, result=5)
        record = await store.get("a")
        self.assertEqual((record["state"], record["result"]), ("succeeded", 5))
        self.assertEqual([r["id"] for r in await store.list(queue="default")], ["a"])
        self.assertEqual(store.wait_timeouts, 0)
        data1, data2 = _sentinel.ENV["QUEBERT_SENTINEL_DATA_PORTS"].split()
        port = int(data1 if _sentinel.replica_of_primary() == "data1" else data2)
        self.assertEqual(
            _sentinel.cli(port, "-n", "9", "hget", f"{self.prefix}task:a", "state"),
            "succeeded", "WAIT answered: the replica has the final state")

    async def test_wait_times_out_without_replica(self) -> None:
        """
        With the replica gone, a settling write waits ``wait_timeout`` once,
        succeeds, and later writes do not wait.
        """
        store = self.store(self.url + "?wait_timeout=0.3")
        await store.enqueued("warm", "queued", info(), T0)
        self.addCleanup(deferToThread, _sentinel.restore)
        _sentinel.stop_member(_sentinel.replica_of_primary())
        start = time.monotonic()
        await store.enqueued("a", "queued", info(), T0)
        first = time.monotonic() - start
        start = time.monotonic()
        await store.finished("a", "failed", 0, info(), T0 + 1, reason="x")
        second = time.monotonic() - start
        self.assertEqual(store.wait_timeouts, 1)
        self.assertGreaterEqual(first, 0.29)
        self.assertLess(second, 0.2, "degraded: no WAIT")
        self.assertEqual((await store.get("a"))["state"], "failed")

    async def test_stall_marker(self) -> None:
        """The watchdog's blocking client asks a sentinel for the primary."""
        from quebert.watchdog import RedisStallMarker, Stall

        store = self.store()
        await store.enqueued("a", "queued", info(), T0)
        await store.started("a", 2, "w1", info(), T0 + 1)
        marker = RedisStallMarker("redis+sentinel://127.0.0.1:1,"
                                  + self.url.split("://", 1)[1], self.prefix)
        marked = await deferToThread(marker.mark, [Stall("a", "app.x", 2)], T0 + 5, 2.0, 2.0)
        self.assertEqual(marked, 1)
        self.assertEqual((await store.get("a"))["stalled"]["attempt"], 2)

    def test_stall_marker_without_sentinels(self) -> None:
        """No sentinel answers: the mark fails, saying so."""
        from quebert.watchdog import RedisStallMarker, Stall

        marker = RedisStallMarker("redis+sentinel://127.0.0.1:1/qm", self.prefix)
        d = deferToThread(marker.mark, [Stall("a", "x", 1)], T0, 1.0, 0.5)
        return self.assertFailure(d, ConnectionError)


class BridgeSentinelTests(SynchronousTestCase):
    """The Guillotina bridge's store (redis-py, asyncio) through Sentinel."""

    def test_writes_and_reads(self) -> None:
        import asyncio

        from quebert import protocol
        from quebert.bridge.guillotina.state import BridgeState

        url = _sentinel.sentinel_set()
        prefix = f"quebert-test-{uuid.uuid4().hex}:"
        message, _ = protocol.build("app.t", queue="q", task_id="bridge-1")

        async def main() -> Any:
            state = BridgeState.from_url(url, prefix=prefix)
            try:
                await state.enqueued(message, "queued", time.time())
                record = await state.get("bridge-1")
                await state.redis.delete(*await state.redis.keys(prefix + "*"))
                return record
            finally:
                await state.close()

        record = asyncio.run(main())
        self.assertEqual(record["state"], "queued")


class SentinelFailoverTests(_LiveCase):
    """``kill -9`` of the primary under a worker's store."""

    async def test_store_follows_promoted_replica(self) -> None:
        """
        A ResilientStateManager through Sentinel queues what is written
        during the failover and replays it on the promoted replica within
        ``FOLLOW_BOUND``; what was answered before the kill (WAIT) is there.
        """
        store = ResilientStateManager(self.store())
        self.addCleanup(store.stop)
        for task_id in ("before", "during"):
            await store.enqueued(task_id, "queued", info(), T0)
            await store.started(task_id, 1, "w1", info(), T0 + 1)
        await store.finished("before", "succeeded", 1, info(), T0 + 2, result="b")
        self.addCleanup(deferToThread, _sentinel.restore)
        old = _sentinel.kill_primary()
        killed = time.monotonic()
        # the task settles while Redis fails over: queued, then replayed
        await store.finished("during", "succeeded", 1, info(), T0 + 3, result="d")
        await store.enqueued("after", "queued", info(), T0 + 3)

        async def settled() -> bool:
            try:
                record = await store.get("during")
            except StateError:
                return False
            return record is not None and record["state"] == "succeeded"

        await wait_for(settled, FOLLOW_BOUND, interval=0.1,
                       what="the task's final state on the promoted replica")
        took = time.monotonic() - killed
        self.assertNotEqual(_sentinel.primary(), old)
        before = await store.get("before")
        self.assertEqual((before["state"], before["result"]), ("succeeded", "b"))
        during = await store.get("during")
        self.assertEqual((during["state"], during["attempts"], during["result"]),
                         ("succeeded", 1, "d"))
        await wait_for(lambda: store.healthy and not store.pending, 10, what="the replay")
        self.assertEqual((await store.get("after"))["state"], "queued")
        self.assertEqual(store.dropped, 0)
        print(f"\nstore on the promoted replica {took:.1f} s after kill -9 of the primary")


class SentinelWorkerTests(TestCase):
    """A real worker and client on RabbitMQ, with state through Sentinel."""

    timeout = 240

    def setUp(self) -> None:
        from tests import test_integration

        self.url = _sentinel.sentinel_set()
        self.amqp_url = test_integration.make_vhost(self)
        self.prefix = f"quebert-test-{uuid.uuid4().hex[:12]}:"
        self.redis = connect_redis(self.url)
        self.state = RedisStateManager(self.redis, prefix=self.prefix)
        from quebert.client import Client

        self.client = Client(self.amqp_url, state=self.state)
        self.addCleanup(self.redis.disconnect)
        self.addCleanup(lambda: delete_prefixed(self.redis, self.prefix))
        self.addCleanup(self.client.close)

    async def test_tasks_survive_failover(self) -> None:
        """Tasks published before, during and after a failover all end succeeded."""
        from tests._worker import WorkerProcess

        worker = WorkerProcess(self, self.amqp_url, self.url, self.prefix,
                               queues=("default:10",)).start()
        await worker.ready()
        ids = [(await self.client.add_task("it.add", i, 1)).id for i in range(20)]
        self.addCleanup(deferToThread, _sentinel.restore)
        _sentinel.kill_primary()
        for i in range(20, 40):
            try:
                ids.append((await self.client.add_task("it.add", i, 1)).id)
            except StateError:  # the producer's record may fail mid-failover
                pass
            await sleep(0.1)

        async def done() -> bool:
            for task_id in ids:
                try:
                    record = await self.state.get(task_id)
                except StateError:
                    return False
                if record is None or record["state"] != "succeeded":
                    if not worker.alive:
                        raise AssertionError("worker died:\n" + worker.log()[-3000:])
                    return False
            return True

        await wait_for(done, 60, interval=0.5, what="every task to succeed")
        self.assertEqual(await worker.stop(), 0)

