"""
Tests for quebert.watchdog (the reactor-stall watchdog), the stall marks in
task records, the mediator's ReactorStalled accounting and the worker's
second-signal stop: fast ones on a fake clock, then real worker processes.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from quebert import ReactorStalled
from quebert import worker as worker_module
from quebert.config import from_mapping
from quebert.mediator import DelayOnErrorMediator, QueueSettings
from quebert.protocol import H_ATTEMPTS, H_ERROR_MESSAGE, H_ERROR_TYPE, H_REASON
from quebert.registry import REACTOR, Registry
from quebert.retry import RetryPolicy
from quebert.state import RedisStateManager, connect_redis
from quebert.state._records import decode_record
from quebert.tap import Options
from quebert.testing import InlineExecutor, StubWorker
from quebert.watchdog import ReactorWatchdog, RedisStallMarker, snapshot_running
from quebert.worker import (
    EXIT_BROKER_REFUSED,
    EXIT_OK,
    EXIT_REACTOR_STALLED,
    EXIT_STUCK_CONNECTION,
    EXIT_USAGE,
)
from tests import test_integration as integration
from tests._rabbit import wait_counts
from tests._worker import WorkerProcess, sleep, wait_for

T0 = 1_700_000_000.0
REDIS_URL = "redis://127.0.0.1:6379/9"


@attrs.define
class FakeDefinition:
    fn: Any


@attrs.define
class FakeTask:
    id: str
    name: str
    attempt: int
    definition: FakeDefinition
    queue: str = "default"


class FakeTime:
    """A monotonic clock that follows a twisted Clock, plus stalls on top."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.stalled = 0.0

    def __call__(self) -> float:
        return self.clock.seconds() + self.stalled


class RecordingMarker:
    def __init__(self, error: Any = None, block: Any = None) -> None:
        self.calls: list = []
        self.error = error
        self.block = block

    def mark(self, stalls, at, stalled_for, timeout=1.0):
        self.calls.append((list(stalls), at, stalled_for, timeout))
        if self.block is not None:
            self.block.wait(10)
        if self.error is not None:
            raise self.error
        return len(stalls)


def _task_a():
    return None


def _task_b():
    return None


class WatchdogTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.time = FakeTime(self.clock)
        self.exits: list = []
        self.written: list = []
        self.running: dict = {}

    def watchdog(self, timeout=2.0, marker=None, **kwargs) -> ReactorWatchdog:
        dog = ReactorWatchdog(timeout, clock=self.clock, running=lambda: self.running,
                              marker=marker, monotonic=self.time, wall=lambda: T0,
                              exit=self.exits.append, write=self.written.append,
                              thread=False, **kwargs)
        dog.startService()
        self.addCleanup(lambda: dog.running and dog.stopService())
        return dog

    def stall(self, dog, until, step=0.1):
        """The reactor stays stuck while the watchdog thread checks every ``step`` s."""
        while self.time.stalled < until - 1e-9:
            self.time.stalled = min(until, self.time.stalled + step)
            if dog.check():
                return True
        return False

    def test_exit_codes(self):
        self.assertEqual((EXIT_OK, EXIT_USAGE, EXIT_BROKER_REFUSED, EXIT_REACTOR_STALLED,
                          EXIT_STUCK_CONNECTION), (0, 1, 3, 4, 5))

    def test_idle_reactor_is_never_killed(self):
        """An idle reactor runs the watchdog's timed tick: it is never taken for stalled."""
        dog = self.watchdog(timeout=1.0)
        self.assertEqual(dog.interval, 0.25)
        for _ in range(4000):  # 1000 s of an idle reactor, checked often
            self.clock.advance(0.25)
            self.assertFalse(dog.check())
        self.assertEqual(self.exits, [])
        self.assertFalse(dog.fired)

    def test_stalled_reactor_is_killed_after_the_timeout(self):
        marker = RecordingMarker()
        dog = self.watchdog(timeout=2.0, marker=marker)
        self.running["t1"] = FakeTask("t1", "app.block", 3, FakeDefinition(_task_a))
        self.clock.advance(0.5)  # a tick
        self.assertFalse(self.stall(dog, 1.9))  # the reactor stops ticking
        self.assertEqual(self.exits, [])
        self.assertTrue(self.stall(dog, 2.0))
        self.assertEqual(self.exits, [EXIT_REACTOR_STALLED])
        # Checked once more (the thread would have been gone): no second report.
        self.assertFalse(dog.check())
        self.assertEqual(self.exits, [EXIT_REACTOR_STALLED])
        report = "".join(self.written)
        self.assertIn("the reactor has not run for 2.0s", report)
        self.assertIn("t1 (app.block, attempt 3)", report)
        self.assertIn("Reactor thread stack", report)
        self.assertIn("exiting with status 4", report)
        [(stalls, at, stalled_for, _)] = marker.calls
        self.assertEqual([(s.id, s.attempt) for s in stalls], [("t1", 3)])
        self.assertEqual((at, stalled_for), (T0, 2.0))

    def test_stall_of_a_slow_tick_counts_from_the_last_tick(self):
        """The stall is measured from the last tick, not from the last check."""
        dog = self.watchdog(timeout=4.0)
        self.clock.advance(1.0)  # ticks at 0, 1 (interval 1 s)
        self.assertFalse(self.stall(dog, 3.5))
        self.assertTrue(self.stall(dog, 4.0))

    def test_a_failing_report_still_exits(self):
        def broken_write(text):
            raise OSError("stderr is gone")

        dog = ReactorWatchdog(1.0, clock=self.clock, running=lambda: 1 / 0,
                              marker=RecordingMarker(error=ConnectionError("no Redis")),
                              monotonic=self.time, exit=self.exits.append, write=broken_write,
                              thread=False)
        dog.startService()
        self.addCleanup(dog.stopService)
        self.assertTrue(self.stall(dog, 5))
        self.assertEqual(self.exits, [EXIT_REACTOR_STALLED])

    def test_a_stuck_marker_does_not_hold_the_exit(self):
        block = threading.Event()
        self.addCleanup(block.set)
        marker = RecordingMarker(block=block)
        dog = self.watchdog(timeout=1.0, marker=marker, report_budget=0.05)
        self.running["t1"] = FakeTask("t1", "app.block", 1, FakeDefinition(_task_a))
        self.assertTrue(self.stall(dog, 5))
        self.assertEqual(self.exits, [EXIT_REACTOR_STALLED])
        self.assertEqual(len(marker.calls), 1)

    def test_no_marker_without_running_tasks(self):
        marker = RecordingMarker()
        dog = self.watchdog(timeout=1.0, marker=marker)
        self.assertTrue(self.stall(dog, 5))
        self.assertEqual(marker.calls, [])
        self.assertIn("Running tasks: none", "".join(self.written))

    def test_a_paused_process_is_not_a_stalled_reactor(self):
        """
        SIGSTOP, a frozen container: the watchdog thread did not run either.
        The reactor gets to tick before anything is called a stall.
        """
        dog = self.watchdog(timeout=2.0)
        self.time.stalled = 600  # both threads paused for 10 minutes
        self.assertFalse(dog.check())
        self.clock.advance(0.5)  # the reactor runs its overdue tick at once
        self.assertFalse(dog.check())
        self.assertFalse(self.stall(dog, 601.9))
        self.assertEqual(self.exits, [])
        # A pause followed by a real stall is still caught.
        self.time.stalled = 1200
        self.assertFalse(dog.check())
        self.assertTrue(self.stall(dog, 1201))
        self.assertEqual(self.exits, [EXIT_REACTOR_STALLED])

    def test_stopped_watchdog_does_not_fire(self):
        dog = self.watchdog(timeout=1.0)
        dog.stopService()
        self.time.stalled = 100
        self.assertFalse(dog.check())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout_must_be_positive(self):
        self.assertRaises(ValueError, ReactorWatchdog, 0, clock=self.clock)

    def test_the_thread_checks_and_fires(self):
        """With its thread: a real (short) stall on the real monotonic clock."""
        fired = threading.Event()

        def exit_(code):
            self.exits.append(code)
            fired.set()

        dog = ReactorWatchdog(1.0, clock=self.clock, exit=exit_, write=self.written.append)
        dog.startService()
        self.addCleanup(dog.stopService)
        # self.clock never advances: no tick after the first, as if stalled
        self.assertTrue(fired.wait(30))
        self.assertEqual(self.exits, [EXIT_REACTOR_STALLED])


class SnapshotTests(SynchronousTestCase):
    def test_culprit_is_the_task_on_the_reactor_stack(self):
        running = {"a": FakeTask("a", "app.a", 1, FakeDefinition(_task_a)),
                   "b": FakeTask("b", "app.b", 2, FakeDefinition(_task_b))}
        box = []

        def task_b_running():  # this frame stands for task b blocking the reactor
            box.extend(snapshot_running(running, sys._getframe()))

        running["b"].definition.fn = task_b_running
        task_b_running()
        self.assertEqual({s.id: s.culprit for s in box}, {"a": False, "b": True})

    def test_culprit_unknown_when_no_task_is_on_the_stack(self):
        running = {"a": FakeTask("a", "app.a", 1, FakeDefinition(_task_a))}
        [stall] = snapshot_running(running, sys._getframe())
        self.assertIsNone(stall.culprit)
        [stall] = snapshot_running(running, None)
        self.assertEqual((stall.id, stall.name, stall.attempt, stall.culprit),
                         ("a", "app.a", 1, None))

    def test_copy_survives_a_dict_changing_size(self):
        class Changing(dict):
            tries = 0

            def values(self):
                Changing.tries += 1
                if Changing.tries < 3:
                    raise RuntimeError("dictionary changed size during iteration")
                return super().values()

        running = Changing(a=FakeTask("a", "app.a", 1, FakeDefinition(_task_a)))
        self.assertEqual([s.id for s in snapshot_running(running)], ["a"])


class StallRecordTests(SynchronousTestCase):
    def fields(self, **extra):
        base = {"id": "t", "state": "running", "attempts": "2", "history": "[]"}
        base.update(extra)
        return base

    def test_no_mark_no_key(self):
        self.assertNotIn("stalled", decode_record(self.fields()))

    def test_mark_is_decoded(self):
        record = decode_record(self.fields(stalled_attempt="2", stalled_at=repr(T0),
                                           stalled_for="2.5", stalled_culprit="1"))
        self.assertEqual(record["stalled"],
                         {"attempt": 2, "at": T0, "for": 2.5, "culprit": True})
        record = decode_record(self.fields(stalled_attempt="2", stalled_at=repr(T0),
                                           stalled_for="2.5", stalled_culprit=""))
        self.assertIsNone(record["stalled"]["culprit"])

    def test_bad_marks_are_ignored(self):
        for extra in ({"stalled_at": "soon", "stalled_attempt": "1", "stalled_for": "1"},
                      {"stalled_at": "1.0", "stalled_for": "1"},
                      {"stalled_at": "nan", "stalled_attempt": "1", "stalled_for": "1"}):
            record = decode_record(self.fields(**extra))
            self.assertNotIn("stalled", record, extra)
            self.assertEqual(record["attempts"], 2)

    def test_error_messages(self):
        self.assertEqual(str(ReactorStalled(2, 12.34, True)),
                         "attempt 2 stalled the reactor for 12.3 s (watchdog)")
        self.assertIn("another task stalled the reactor", str(ReactorStalled(1, 3, False)))
        self.assertIn("when the reactor stalled", str(ReactorStalled(1, 3)))


class OptionsTests(SynchronousTestCase):
    def parse(self, *args):
        options = Options()
        options.parseOptions(["--state", "memory", *args])
        return options["worker_config"]

    def test_off_by_default(self):
        self.assertIsNone(self.parse().auto_kill_timeout)

    def test_option(self):
        self.assertEqual(self.parse("--auto-kill-timeout", "60").auto_kill_timeout, 60.0)
        self.assertIsNone(self.parse("--auto-kill-timeout", "0").auto_kill_timeout)

    def test_bad_values(self):
        for value, fragment in (("x", "must be a number"), ("-1", ">= 0"),
                                ("0.5", "at least 1 second"), ("inf", "finite")):
            e = self.assertRaises(usage.UsageError, self.parse, "--auto-kill-timeout", value)
            self.assertIn(fragment, str(e))

    def test_config_file_key(self):
        self.assertEqual(from_mapping({"auto_kill_timeout": 30}).auto_kill_timeout, 30.0)
        self.assertIsNone(from_mapping({"auto_kill_timeout": 0}).auto_kill_timeout)
        self.assertIsNone(from_mapping({"auto_kill_timeout": None}).auto_kill_timeout)
        self.assertIsNone(from_mapping({}).auto_kill_timeout)


class StallingState:
    """The memory store, with a watchdog's stall mark on one record."""

    def __init__(self, state, task_id, mark):
        self._state, self._task_id, self._mark = state, task_id, mark

    def __getattr__(self, name):
        return getattr(self._state, name)

    def get(self, task_id):
        def add(record):
            if record is not None and task_id == self._task_id:
                record["stalled"] = dict(self._mark)
            return record

        return self._state.get(task_id).addCallback(add)


class MediatorStallTests(SynchronousTestCase):
    """A redelivered message whose attempt the watchdog marked: ReactorStalled."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.registry = Registry()
        self.registry.register(lambda: defer.Deferred(), "app.block", executor=REACTOR,
                               max_attempts=2, min_backoff=1)
        self.worker = StubWorker(self.clock, registry=self.registry)

    def crash_and_restart(self, mark):
        """The worker dies; a new one (whose store shows ``mark``) gets the message back."""
        task_id = self.task_id
        state = StallingState(self.worker.state, task_id, mark) if mark else self.worker.state
        mediator = DelayOnErrorMediator(
            broker=self.worker.broker, state=state, executor=InlineExecutor(self.clock),
            clock=self.clock, queues=[QueueSettings("default", retry=RetryPolicy())],
            registry=self.registry, worker_id="stub-worker-2")
        mediator.start()
        self.worker.mediator = mediator
        self.worker.broker.crash()

    def test_stalled_attempts_end_in_errored_queue_with_the_reason(self):
        self.task_id = self.worker.enqueue("app.block")
        self.crash_and_restart({"attempt": 1, "at": T0, "for": 2.5, "culprit": True})
        record = self.worker.state_of(self.task_id)
        self.assertEqual(record["state"], "scheduled")
        self.assertEqual(record["error"]["type"], "quebert.errors.ReactorStalled")
        self.assertEqual(record["error"]["message"],
                         "attempt 1 stalled the reactor for 2.5 s (watchdog)")
        self.clock.advance(1)
        self.assertEqual(self.worker.state_of(self.task_id)["attempts"], 2)
        self.crash_and_restart({"attempt": 2, "at": T0 + 1, "for": 3.0, "culprit": True})
        record = self.worker.state_of(self.task_id)
        self.assertEqual(record["state"], "failed")
        self.assertEqual(record["attempts"], 2)
        self.assertEqual(record["error"]["type"], "quebert.errors.ReactorStalled")
        self.assertIn("attempt 2 stalled the reactor for 3.0 s (watchdog)", record["reason"])
        self.assertIn("retry budget (2 attempts) is spent", record["reason"])
        [errored] = self.worker.broker.errored["default"]
        self.assertEqual(errored.headers[H_ERROR_TYPE], "quebert.errors.ReactorStalled")
        self.assertEqual(errored.headers[H_ATTEMPTS], 2)
        self.assertIn("stalled the reactor", errored.headers[H_REASON])
        self.assertIn("stalled the reactor", errored.headers[H_ERROR_MESSAGE])
        self.assertTrue(self.worker.broker.idle())

    def test_a_mark_of_an_earlier_attempt_is_ignored(self):
        self.task_id = self.worker.enqueue("app.block")
        self.crash_and_restart({"attempt": 1, "at": T0, "for": 2.5, "culprit": True})
        self.clock.advance(1)
        # attempt 2's worker dies without a watchdog: a plain lost worker
        self.crash_and_restart({"attempt": 1, "at": T0, "for": 2.5, "culprit": True})
        record = self.worker.state_of(self.task_id)
        self.assertEqual((record["state"], record["attempts"]), ("failed", 2))
        self.assertEqual(record["error"]["type"], "quebert.errors.WorkerLost")
        self.assertEqual(record["history"][0]["error"]["type"],
                         "quebert.errors.ReactorStalled")


class DrainTests(SynchronousTestCase):
    def test_end_drain_leaves_running_tasks_at_once(self):
        clock = Clock()
        registry = Registry()
        registry.register(lambda: defer.Deferred(), "app.forever", executor=REACTOR)
        worker = StubWorker(clock, registry=registry)
        worker.enqueue("app.forever")
        result = []
        defer.ensureDeferred(worker.mediator.drain(30)).addCallback(result.append)
        clock.advance(1)
        self.assertEqual(result, [])
        worker.mediator.end_drain()
        self.assertEqual(result, [1])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_end_drain_before_the_drain(self):
        clock = Clock()
        registry = Registry()
        registry.register(lambda: defer.Deferred(), "app.forever", executor=REACTOR)
        worker = StubWorker(clock, registry=registry)
        worker.enqueue("app.forever")
        worker.mediator.end_drain()
        result = []
        defer.ensureDeferred(worker.mediator.drain(30)).addCallback(result.append)
        self.assertEqual(result, [1])


class RedisMarkerTests(TestCase):
    """The watchdog's synchronous Redis client against the real Redis (db 9)."""

    def setUp(self):
        self.prefix = f"quebert-test-{uuid.uuid4().hex[:12]}:"
        self.redis = connect_redis(REDIS_URL)
        self.state = RedisStateManager(self.redis, prefix=self.prefix)
        self.addCleanup(self._cleanup)

    @defer.inlineCallbacks
    def _cleanup(self):
        cursor = 0
        while True:
            cursor, keys = yield self.redis.scan(cursor, self.prefix + "*", 500)
            if keys:
                yield self.redis.delete(*keys)
            if int(cursor) == 0:
                break
        yield self.redis.disconnect()

    @defer.inlineCallbacks
    def test_marks_records_of_the_running_attempt_only(self):
        from quebert.watchdog import Stall

        info = {"queue": "default", "kind": "call", "task": "app.x", "created_at": T0}
        yield self.state.started("a", 2, "w", info, T0)
        yield self.state.started("b", 1, "w", info, T0)
        marker = RedisStallMarker(REDIS_URL, self.prefix)
        stalls = [Stall("a", "app.x", 2, culprit=True), Stall("b", "app.x", 3),
                  Stall("missing", "app.x", 1)]
        marked = yield deferToThread(marker.mark, stalls, T0 + 5, 2.25, 2.0)
        self.assertEqual(marked, 1)
        a = yield self.state.get("a")
        self.assertEqual(a["stalled"], {"attempt": 2, "at": T0 + 5, "for": 2.25,
                                        "culprit": True})
        self.assertEqual(a["state"], "running")
        b = yield self.state.get("b")
        self.assertNotIn("stalled", b)
        missing = yield self.state.get("missing")
        self.assertIsNone(missing, "a mark never creates a half record")
        # A later attempt's writes keep working on a marked record.
        yield self.state.finished("a", "succeeded", 2, info, T0 + 6, result=1)
        a = yield self.state.get("a")
        self.assertEqual((a["state"], a["result"], a["stalled"]["attempt"]),
                         ("succeeded", 1, 2))

    def test_unreachable_redis_fails_within_the_timeout(self):
        from quebert.watchdog import Stall

        marker = RedisStallMarker("redis://127.0.0.1:1/9", self.prefix)
        d = deferToThread(marker.mark, [Stall("a", "x", 1)], T0, 1.0, 0.5)
        return self.assertFailure(d, OSError)


class WorkerProcessTests(integration.IntegrationTestCase):
    """Real ``twistd amqp-worker`` processes, RabbitMQ and Redis."""

    timeout = 180

    def worker(self, *extra, queues=("default:10",)) -> WorkerProcess:
        return WorkerProcess(self, self.url, REDIS_URL, self.prefix, queues=queues,
                             extra=extra)

    def test_stalled_reactor_kills_the_worker_and_the_poison_task_fails(self):
        async def run():
            path = os.path.abspath(self.mktemp())
            worker = self.worker("--auto-kill-timeout", "2").start()
            await worker.ready()
            poison = await self.client.add_task("it.block_reactor", path, 10.0)
            await wait_for(lambda: integration._read_lines(path), 30, what="the task to start")
            started = time.monotonic()
            await wait_for(lambda: not worker.alive, 15, what="the watchdog to kill")
            self.assertLess(time.monotonic() - started, 2 + 4, "timeout + margin")
            self.assertEqual(worker.process.returncode, EXIT_REACTOR_STALLED)
            log = worker.log()
            self.assertIn("the reactor has not run for", log)
            self.assertIn(poison.id, log)
            self.assertIn("in block_reactor", log)  # the main thread's stack
            self.assertIn("time.sleep(seconds)", log)
            record = await self.state.get(poison.id)
            self.assertEqual(record["state"], "running")
            self.assertEqual(record["stalled"]["attempt"], 1)
            self.assertTrue(record["stalled"]["culprit"])

            async def restart_until_failed():
                current = await self.state.get(poison.id)
                if current is not None and current["state"] == "failed":
                    return current
                if not worker.alive:
                    worker.start()
                    await worker.ready()
                return False

            record = await wait_for(restart_until_failed, 120, interval=0.3,
                                    what="the poison task to fail")
            self.assertEqual(worker.starts, 3, "killed twice, restarted twice")
            self.assertEqual(record["attempts"], 2)
            self.assertEqual(len(integration._read_lines(path)), 2,
                             "ran exactly max_attempts times")
            self.assertEqual(record["error"]["type"], "quebert.errors.ReactorStalled")
            self.assertIn("attempt 2 stalled the reactor for", record["reason"])
            self.assertIn("(watchdog)", record["reason"])
            self.assertEqual(record["history"][0]["error"]["type"],
                             "quebert.errors.ReactorStalled")

            def errored():
                import pika

                connection = pika.BlockingConnection(pika.URLParameters(self.url))
                try:
                    method, props, _ = connection.channel().basic_get("default.errored",
                                                                      auto_ack=True)
                    return props
                finally:
                    connection.close()

            props = await deferToThread(errored)
            self.assertEqual(props.message_id, poison.id)
            self.assertEqual(props.headers["x-quebert-error-type"],
                             "quebert.errors.ReactorStalled")
            self.assertIn("stalled the reactor", props.headers["x-quebert-reason"])
            # The restarted worker is healthy and still consuming.
            ok = await self.client.add_task("it.add", 1, 2)
            await wait_for(lambda: self._succeeded(ok.id), 30, what="a task after restarts")
            self.assertEqual(await worker.stop(), 0)

        return defer.ensureDeferred(run())

    async def _succeeded(self, task_id):
        record = await self.state.get(task_id)
        return record is not None and record["state"] == "succeeded"

    def test_idle_worker_is_not_killed(self):
        async def run():
            worker = self.worker("--auto-kill-timeout", "1").start()
            await worker.ready()
            await sleep(5)
            self.assertTrue(worker.alive, worker.log()[-3000:])
            self.assertIn("reactor watchdog on", worker.log())
            self.assertNotIn("has not run", worker.log())
            info = await self.client.add_task("it.add", 2, 2)
            await wait_for(lambda: self._succeeded(info.id), 30, what="a task")
            self.assertEqual(await worker.stop(), 0)

        return defer.ensureDeferred(run())

    def test_second_sigterm_stops_at_once_and_leaves_tasks_for_redelivery(self):
        async def run():
            path = os.path.abspath(self.mktemp())
            worker = self.worker("--shutdown-timeout", "60").start()
            await worker.ready()
            quick = [await self.client.add_task("it.record", path, i) for i in range(5)]
            for info in quick:
                await wait_for(lambda info=info: self._succeeded(info.id), 30,
                               what="the quick tasks")
            slow = [await self.client.add_task("it.sleep", 30.0),
                    await self.client.add_task("it.sleep_thread", path, 100, 30.0)]

            async def both_running():
                records = [await self.state.get(i.id) for i in slow]
                return all(r is not None and r["state"] == "running" for r in records)

            await wait_for(both_running, 30, what="the slow tasks to run")
            worker.process.send_signal(signal.SIGTERM)
            await wait_for(lambda: "draining" in worker.log(), 10, what="the drain")
            await sleep(0.5)
            self.assertTrue(worker.alive, "the first SIGTERM drains")
            stopped = time.monotonic()
            code = await worker.stop(signal.SIGTERM, timeout=15)
            self.assertLess(time.monotonic() - stopped, 5)
            self.assertEqual(code, -signal.SIGTERM)
            self.assertIn("stopping now", worker.log())
            # both slow tasks are back in the queue, ready
            await wait_counts(self.url, "default", (2, 0))
            lines = integration._read_lines(path)
            self.assertEqual(sorted(line["i"] for line in lines if "event" not in line),
                             list(range(5)), "each finished task ran once")
            self.assertEqual([line["event"] for line in lines if "event" in line], ["start"])

        return defer.ensureDeferred(run())


class SystemdUnitTests(SynchronousTestCase):
    def test_example_unit(self):
        import configparser

        from tests._worker import ROOT

        unit = configparser.ConfigParser(strict=True, interpolation=None)
        unit.optionxform = str
        with open(os.path.join(ROOT, "examples", "quebert-worker.service")) as f:
            unit.read_file(f)
        service = unit["Service"]
        self.assertEqual(service["Restart"], "on-failure")
        self.assertEqual(service["KillSignal"], "SIGTERM")
        self.assertGreater(int(service["TimeoutStopSec"]), 30 + 10,
                           "above the default shutdown_timeout and the rest of the stop")
        self.assertIn("twistd -n --pidfile= amqp-worker --config /etc/quebert/worker.json "
                      "--auto-kill-timeout 60", service["ExecStart"])
        self.assertEqual(service["RestartPreventExitStatus"].split(),
                         [str(EXIT_USAGE), str(EXIT_BROKER_REFUSED)])


class StopSignalTests(SynchronousTestCase):
    """The first SIGTERM/SIGINT goes to the reactor, the second ends the drain."""

    def service(self, **config):
        from quebert.config import WorkerConfig
        from quebert.worker import WorkerService

        clock = Clock()
        clock.callFromThread = lambda f, *a, **kw: f(*a, **kw)
        service = WorkerService(WorkerConfig(state="memory", **config), reactor=clock)
        self.addCleanup(service.executor.stop)
        return service, clock

    def test_first_signal_to_the_reactor_second_stops_at_once(self):
        service, clock = self.service()
        self.assertIsNone(service.watchdog)
        handled = []
        previous = lambda n, frame: handled.append(n)  # noqa: E731 - the reactor's handler
        service._on_stop_signal(previous, signal.SIGTERM, None)
        self.assertEqual(handled, [signal.SIGTERM])
        self.assertFalse(service._hard_stop_requested)
        service._on_stop_signal(previous, signal.SIGINT, None)
        self.assertEqual(handled, [signal.SIGTERM])
        self.assertTrue(service._hard_stop_requested)
        self.assertTrue(service.mediator._drain_ended)
        self.assertEqual(clock._exitSignal, signal.SIGINT)
        exits = []
        self.patch(os, "_exit", exits.append)
        self.patch(os, "write", lambda fd, data: len(data))
        service._on_stop_signal(previous, signal.SIGTERM, None)
        self.assertEqual(exits, [128 + signal.SIGTERM])

    def test_a_stop_already_under_way_is_cut_short_by_the_first_signal(self):
        service, clock = self.service()
        service._stopping = True  # e.g. RabbitMQ refused the setup
        service.exit_code = EXIT_BROKER_REFUSED
        handled = []
        service._on_stop_signal(lambda n, frame: handled.append(n), signal.SIGTERM, None)
        self.assertEqual(handled, [])
        self.assertTrue(service.mediator._drain_ended)
        # its own exit status wins over the signal's
        self.assertIsNone(getattr(clock, "_exitSignal", None))

    def test_watchdog_is_a_child_service_when_configured(self):
        service, clock = self.service(auto_kill_timeout=30.0)
        self.assertIs(service.getServiceNamed("reactor-watchdog"), service.watchdog)
        self.assertEqual((service.watchdog.timeout, service.watchdog.exit_code),
                         (30.0, EXIT_REACTOR_STALLED))
        self.assertIsNone(service.watchdog.marker, "no Redis to mark records in")


class ApiStopSignalTests(SynchronousTestCase):
    """quebert-api: the first SIGTERM/SIGINT stops gracefully, the second exits at once."""

    def service(self):
        from quebert.config import WorkerConfig
        from quebert.worker import ApiService

        clock = Clock()
        clock.callFromThread = lambda f, *a, **kw: f(*a, **kw)
        self.patch(worker_module, "connect_redis", lambda *a, **kw: None)
        self.patch(worker_module, "serve_api", lambda *a, **kw: (None, None))
        return ApiService(WorkerConfig(state="redis", http_port=0), reactor=clock), clock

    def test_first_signal_to_the_reactor_second_exits_at_once(self):
        service, clock = self.service()
        handled, exits, written = [], [], []
        self.patch(os, "_exit", exits.append)
        self.patch(os, "write", lambda fd, data: written.append(data) or len(data))
        previous = lambda n, frame: handled.append(n)  # noqa: E731 - the reactor's handler
        service._on_stop_signal(previous, signal.SIGTERM, None)
        self.assertEqual((handled, exits), ([signal.SIGTERM], []))
        service._on_stop_signal(previous, signal.SIGTERM, None)
        self.assertEqual(handled, [signal.SIGTERM])
        self.assertEqual(exits, [128 + signal.SIGTERM])
        self.assertIn(b"quebert-api: signal", b"".join(written))

    def test_a_signal_during_a_stop_exits_at_once(self):
        service, clock = self.service()
        exits = []
        self.patch(os, "_exit", exits.append)
        self.patch(os, "write", lambda fd, data: len(data))
        service._stopping = True
        service._on_stop_signal(lambda n, frame: None, signal.SIGINT, None)
        self.assertEqual(exits, [128 + signal.SIGINT])

    def test_handlers_are_installed_when_the_reactor_runs(self):
        service, clock = self.service()
        calls = []
        clock.callWhenRunning = lambda f, *a: calls.append(f)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(calls, [service._wrap_signal_handlers])
