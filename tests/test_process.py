"""
Process workers (``executor="process"``): registration, the AMP wire, the
child's side, the pool on real child processes, and real ``twistd
amqp-worker`` processes on the real RabbitMQ and Redis.
"""

from __future__ import annotations

import contextvars
import functools
import json
import os
import signal
import time
import types

from twisted.internet import defer, reactor
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

import tests.tasks_process as tasks
from quebert.current import CurrentTask, current_task, running_task
from quebert.errors import (
    ConfigurationError,
    InvalidResult,
    ProcessLost,
    Reject,
    TaskTimeout,
    UnknownTask,
)
from quebert.executor import Executor
from quebert.mediator import error_info
from quebert.process import TaskProcessPool
from quebert.process.child import current_from, run_task
from quebert.process.commands import JSONValue
from quebert.process.pool import describe_end, resident_memory
from quebert.process.remote import RemoteTaskError, remote_exception
from quebert.registry import PROCESS, Registry, TaskDefinition, default_registry
from tests._procfs import alive, children_of
from tests._worker import sleep, wait_for
from tests.test_integration import TERMINAL, IntegrationTestCase

TASKS = "tests.tasks_process"


def _module_level(x: int) -> int:
    return x


class RegistrationTests(SynchronousTestCase):
    def setUp(self):
        self.registry = Registry()

    def test_a_module_level_function_registers_for_processes(self):
        definition = self.registry.register(_module_level, "t.ok", executor=PROCESS)
        self.assertEqual(definition.executor, "process")
        self.assertEqual(default_registry.get("proc.pid").executor, PROCESS)

    def test_async_def_is_refused(self):
        async def fetch():
            return 1

        e = self.assertRaises(ConfigurationError, self.registry.register, fetch, "t.a",
                              executor=PROCESS)
        self.assertIn("async def", str(e))
        self.assertNotIn("t.a", self.registry)

    def test_lambdas_and_nested_functions_are_refused(self):
        e = self.assertRaises(ConfigurationError, self.registry.register, lambda: 1, "t.l",
                              executor=PROCESS)
        self.assertIn("a lambda", str(e))

        def nested():
            return 1

        e = self.assertRaises(ConfigurationError, self.registry.register, nested, "t.n",
                              executor=PROCESS)
        self.assertIn("defined inside another function", str(e))
        e = self.assertRaises(ConfigurationError, self.registry.register,
                              functools.partial(_module_level, 1), "t.p", executor=PROCESS)
        self.assertIn("a partial", str(e))

    def test_a_function_of_main_is_refused(self):
        fn = types.FunctionType(_module_level.__code__, {"__name__": "__main__"}, "main_fn")
        fn.__module__ = "__main__"
        e = self.assertRaises(ConfigurationError, self.registry.register, fn, "t.m",
                              executor=PROCESS)
        self.assertIn("__main__", str(e))

    def test_an_unknown_executor_names_the_three(self):
        e = self.assertRaises(ConfigurationError, self.registry.register, _module_level,
                              "t.x", executor="fork")
        self.assertIn("'process'", str(e))


class WireTests(SynchronousTestCase):
    def roundtrip(self, value):
        argument = JSONValue()
        strings = amp.AmpBox()
        argument.toBox(b"v", strings, {"v": value}, None)
        for key, data in strings.items():
            self.assertLessEqual(len(data), 0xFFFF, key)
        # what goes on the wire, parsed back
        parsed = amp.AmpBox()
        parsed.update(strings)
        objects: dict = {}
        argument.fromBox(b"v", parsed, objects, None)
        return strings, objects["v"]

    def test_a_value_larger_than_one_amp_value_is_split_and_joined(self):
        value = {"text": "x" * 200_000, "n": [1, 2.5, None, True]}
        strings, back = self.roundtrip(value)
        self.assertGreater(len(strings), 3)
        self.assertEqual(back, value)

    def test_small_and_pre_encoded_values(self):
        self.assertEqual(self.roundtrip(None)[1], None)
        self.assertEqual(self.roundtrip(b'{"a":1}')[1], {"a": 1})

    def test_not_json_is_refused_when_sent(self):
        self.assertRaises(ValueError, self.roundtrip, float("nan"))


class RemoteExceptionTests(SynchronousTestCase):
    def test_a_builtin_error_keeps_its_class_message_and_child_traceback(self):
        exc = remote_exception({"module": "builtins", "qualname": "KeyError",
                                "message": "'k'", "traceback": "Traceback...\nKeyError: 'k'"})
        self.assertIsInstance(exc, KeyError)
        self.assertIsInstance(exc, RemoteTaskError)
        self.assertEqual(str(exc), "'k'")
        info = error_info(Failure(exc))
        self.assertEqual(info["type"], "builtins.KeyError")
        self.assertEqual(info["message"], "'k'")
        self.assertEqual(info["traceback"], "Traceback...\nKeyError: 'k'")

    def test_a_class_of_a_task_module_is_found_without_importing(self):
        exc = remote_exception({"module": TASKS, "qualname": "CustomError",
                                "message": "custom failure 3", "traceback": "tb"})
        self.assertIsInstance(exc, tasks.CustomError)
        self.assertEqual(error_info(Failure(exc))["type"], f"{TASKS}.CustomError")

    def test_a_reject_stays_a_reject(self):
        exc = remote_exception({"module": "quebert.errors", "qualname": "Reject",
                                "message": "no", "traceback": ""})
        self.assertIsInstance(exc, Reject)

    def test_an_unknown_class_keeps_its_name_and_nothing_is_imported(self):
        exc = remote_exception({"module": "no.such.module", "qualname": "Boom",
                                "message": "m", "traceback": "t"})
        self.assertNotIn("no.such.module", __import__("sys").modules)
        self.assertEqual(error_info(Failure(exc))["type"], "no.such.module.Boom")
        self.assertEqual(str(exc), "m")

    def test_a_base_exception_is_an_exception_in_the_worker(self):
        # (SystemExit raised in the worker would stop it)
        exc = remote_exception({"module": "builtins", "qualname": "SystemExit",
                                "message": "3", "traceback": ""})
        self.assertIsInstance(exc, Exception)
        self.assertNotIsInstance(exc, SystemExit)
        self.assertEqual(error_info(Failure(exc))["type"], "builtins.SystemExit")

    def test_how_a_child_ended(self):
        from twisted.internet.error import ProcessDone, ProcessTerminated

        self.assertEqual(describe_end(Failure(ProcessTerminated(exitCode=1))),
                         "exited with status 1")
        self.assertIn("SIGSEGV", describe_end(Failure(ProcessTerminated(
            signal=signal.SIGSEGV))))
        self.assertIn("out of memory", describe_end(Failure(ProcessTerminated(
            signal=signal.SIGKILL))))
        self.assertEqual(describe_end(Failure(ProcessDone(0))), "exited with status 0")


class ChildSideTests(SynchronousTestCase):
    """What a child does with a call, run in this process."""

    def outcome(self, name, args=(), kwargs=None, current=None):
        return json.loads(run_task(default_registry, name, list(args), kwargs or {}, current))

    def test_a_result(self):
        self.assertEqual(self.outcome("proc.add", (2, 3)), {"result": 5})

    def test_only_registered_process_tasks_run(self):
        error = self.outcome("proc.nope")["error"]
        self.assertEqual((error["module"], error["qualname"]), ("quebert.errors", "UnknownTask"))
        self.assertIn("not registered", error["message"])
        error = self.outcome("proc.thread_pid")["error"]
        self.assertIn("executor='thread'", error["message"])

    def test_an_error_is_described(self):
        error = self.outcome("proc.fail", ("boom",))["error"]
        self.assertEqual(error["qualname"], "ValueError")
        self.assertEqual(error["message"], "boom")
        self.assertIn("raise ValueError(message)", error["traceback"])

    def test_a_result_that_is_not_json_fails_for_good(self):
        error = self.outcome("proc.not_json")["error"]
        self.assertEqual(error["qualname"], "InvalidResult")
        self.assertIn("not JSON", error["message"])
        self.assertIsInstance(remote_exception(error), InvalidResult)

    def test_current_task_in_the_call_only(self):
        current = {"id": "t1", "name": "proc.whoami", "queue": "q", "attempt": 2,
                   "context": {"db": "x"}, "unique_name": "u", "origin": "guillotina"}
        result = self.outcome("proc.whoami", current=current)["result"]
        self.assertEqual(result["id"], "t1")
        self.assertEqual(result["attempt"], 2)
        self.assertEqual(result["context"], {"db": "x"})
        self.assertEqual((result["unique_name"], result["origin"]), ("u", "guillotina"))
        self.assertRaises(RuntimeError, current_task)
        self.assertIsNone(current_from(None))


class PoolTests(TestCase):
    """A :class:`TaskProcessPool` on real child processes."""

    timeout = 120

    def pool(self, size=2, **kwargs) -> TaskProcessPool:
        pool = TaskProcessPool(reactor, size, [TASKS], **kwargs)
        self.addCleanup(pool.stop)
        return pool

    def run_task(self, pool, name, *args, timeout=None, current=None, **kwargs):
        definition = default_registry.get(name)
        context = contextvars.copy_context()
        if current is not None:
            context.run(running_task.set, current)
        return context.run(pool.run, definition, args, kwargs, timeout)

    async def full(self, pool, size=None):
        await wait_for(lambda: pool.children == (size or pool.size) and pool.busy == 0, 30,
                       what="the pool back to full size")

    async def test_tasks_run_in_children_with_current_task(self):
        pool = self.pool(expected=["proc.pid"])
        await pool.start()
        self.assertEqual(len(pool.pids()), 2)
        pid = await self.run_task(pool, "proc.pid")
        self.assertIn(pid, pool.pids())
        self.assertNotEqual(pid, os.getpid())
        current = CurrentTask(id="abc", name="proc.whoami", queue="default", attempt=1,
                              context=types.MappingProxyType({"k": [1]}))
        me = await self.run_task(pool, "proc.whoami", current=current)
        self.assertEqual((me["id"], me["queue"], me["context"]), ("abc", "default", {"k": [1]}))
        big = "é" * 100_000
        self.assertEqual(await self.run_task(pool, "proc.echo", big), big)
        results = await defer.gatherResults([self.run_task(pool, "proc.add", i, 1)
                                             for i in range(20)])
        self.assertEqual(results, [i + 1 for i in range(20)])

    async def test_errors_come_back_with_their_class(self):
        pool = self.pool(1)
        await pool.start()
        with self.assertRaises(ValueError) as caught:
            await self.run_task(pool, "proc.fail", "boom")
        self.assertEqual(str(caught.exception), "boom")
        self.assertIn("tasks_process.py", caught.exception.remote_traceback)
        with self.assertRaises(tasks.CustomError):
            await self.run_task(pool, "proc.custom_fail", 4)
        with self.assertRaises(Reject):
            await self.run_task(pool, "proc.reject", "no")
        self.assertEqual(pool.ended, {})

    async def test_a_task_the_child_does_not_register_is_refused(self):
        pool = self.pool(1)
        await pool.start()
        definition = TaskDefinition(name="proc.not_there", fn=_module_level, executor=PROCESS)
        with self.assertRaises(UnknownTask) as caught:
            await pool.run(definition, (1,), {})
        self.assertIn("not registered in this pool process", str(caught.exception))

    async def test_a_pool_missing_an_expected_task_does_not_start(self):
        pool = self.pool(1, expected=["proc.pid", "proc.elsewhere"])
        with self.assertRaises(ConfigurationError) as caught:
            await pool.start()
        self.assertIn("proc.elsewhere", str(caught.exception))

    async def test_a_timeout_kills_the_child_and_the_pool_replaces_it(self):
        pool = self.pool(2)
        await pool.start()
        before = pool.pids()
        with self.assertRaises(TaskTimeout) as caught:
            await self.run_task(pool, "proc.forever", timeout=0.5)
        self.assertIn("was killed", str(caught.exception))
        await self.full(pool)
        self.assertEqual(len(set(before) - set(pool.pids())), 1)
        self.assertEqual(pool.ended["timeout"], 1)
        self.assertEqual(await self.run_task(pool, "proc.add", 1, 1), 2)

    async def test_cancel_kills_the_child(self):
        pool = self.pool(1)
        await pool.start()
        [pid] = pool.pids()
        d = self.run_task(pool, "proc.forever")
        await wait_for(lambda: pool.busy == 1, 10, what="the task to start")
        d.cancel()
        with self.assertRaises(defer.CancelledError):
            await d
        await wait_for(lambda: not alive(pid), 10, what="the child to die")
        await self.full(pool)
        self.assertEqual(pool.ended["canceled"], 1)

    async def test_cancel_of_a_waiting_call_runs_nothing(self):
        pool = self.pool(1)
        await pool.start()
        path = os.path.abspath(self.mktemp())
        busy = self.run_task(pool, "proc.record", path, 0, 0.5)
        waiting = self.run_task(pool, "proc.record", path, 1)
        waiting.cancel()
        self.assertEqual(await busy, 0)
        self.failureResultOf(waiting, defer.CancelledError)
        self.assertEqual(await self.run_task(pool, "proc.add", 1, 2), 3)
        with open(path) as f:
            self.assertEqual([json.loads(line)["i"] for line in f], [0])

    async def test_a_child_that_dies_fails_its_task_with_process_lost(self):
        pool = self.pool(1)
        await pool.start()
        with self.assertRaises(ProcessLost) as caught:
            await self.run_task(pool, "proc.exit", 7)
        self.assertIn("exited with status 7", str(caught.exception))
        path = os.path.abspath(self.mktemp())
        d = self.run_task(pool, "proc.forever", path)
        await wait_for(lambda: os.path.exists(path), 10, what="the task to start")
        with open(path) as f:
            pid = json.loads(f.readline())["pid"]
        os.kill(pid, signal.SIGSEGV)
        with self.assertRaises(ProcessLost) as caught:
            await d
        self.assertIn("SIGSEGV", str(caught.exception))
        await self.full(pool)
        self.assertEqual(pool.ended["died"], 2)

    async def test_an_idle_child_killed_is_replaced(self):
        pool = self.pool(2)
        await pool.start()
        victim = pool.pids()[0]
        os.kill(victim, signal.SIGKILL)
        await wait_for(lambda: victim not in pool.pids() and pool.children == 2, 30,
                       what="the child to be replaced")
        results = await defer.gatherResults([self.run_task(pool, "proc.pid")
                                             for _ in range(4)])
        self.assertTrue(set(results) <= set(pool.pids()))

    async def test_max_tasks_per_child_recycles(self):
        pool = self.pool(1, max_tasks_per_child=2)
        await pool.start()
        pids = [await self.run_task(pool, "proc.pid") for _ in range(6)]
        self.assertEqual(len(set(pids)), 3, pids)
        self.assertEqual(pids[0], pids[1])
        self.assertNotEqual(pids[1], pids[2])
        self.assertGreaterEqual(pool.ended["recycled"], 2)

    async def test_memory_limit(self):
        pool = self.pool(1, memory_limit=150 * 2 ** 20)
        await pool.start()
        [pid] = pool.pids()
        self.assertLess(resident_memory(pid), 150 * 2 ** 20)
        with self.assertRaises(ProcessLost) as caught:
            await self.run_task(pool, "proc.hog", 300, 30)
        self.assertIn("memory limit of 150 MiB", str(caught.exception))
        await self.full(pool)
        self.assertEqual(pool.ended["memory"], 1)
        self.assertNotEqual(pool.pids(), [pid])

    async def test_a_child_over_the_memory_limit_after_its_task_is_replaced(self):
        # (no check while the task runs: only the one after it)
        pool = self.pool(1, memory_limit=150 * 2 ** 20, memory_check_interval=3600)
        await pool.start()
        [pid] = pool.pids()
        self.assertEqual(await self.run_task(pool, "proc.hog", 50, 0, True), 50 * 2 ** 20)
        self.assertEqual(pool.pids(), [pid], "under the limit: kept")
        self.assertEqual(await self.run_task(pool, "proc.hog", 200, 0, True), 200 * 2 ** 20)
        await wait_for(lambda: pool.ended["memory_recycled"] == 1, 30,
                       what="the child to be replaced")
        await self.full(pool)
        self.assertNotEqual(pool.pids(), [pid])

    async def test_a_memory_limit_below_an_idle_child_refuses_to_start(self):
        pool = self.pool(1, memory_limit=2 ** 20)
        with self.assertRaises(ConfigurationError) as caught:
            await pool.start()
        self.assertIn("below what an idle pool process uses", str(caught.exception))

    async def test_stop_kills_busy_children_and_leaves_none(self):
        pool = self.pool(2)
        await pool.start()
        pids = pool.pids()
        running = self.run_task(pool, "proc.forever")
        await wait_for(lambda: pool.busy == 1, 10, what="the task to start")
        await pool.stop()
        for pid in pids:
            await wait_for(lambda pid=pid: not alive(pid), 10, what=f"child {pid} to exit")
        self.assertEqual(pool.children, 0)
        self.assertNoResult(running)  # left unsettled, as a thread task still running
        self.assertEqual(pool.ended, {})

    async def test_the_executor_dispatches_to_the_pool(self):
        pool = self.pool(1)
        executor = Executor(reactor, max_threads=1, processes=pool)
        await executor.start()
        self.addCleanup(executor.stop)
        self.assertNotEqual(await executor.run(default_registry.get("proc.pid"), (), {}),
                            os.getpid())
        no_pool = Executor(reactor, max_threads=1)
        self.failureResultOf(no_pool.run(default_registry.get("proc.pid"), (), {}),
                             ConfigurationError)


class OptionsTests(SynchronousTestCase):
    def test_command_line_and_config_file(self):
        from quebert.config import from_mapping
        from quebert.tap import Options

        options = Options()
        options.parseOptions(["--state", "memory", "--processes", "3",
                              "--max-tasks-per-child", "100", "--process-memory-limit", "512"])
        config = options["worker_config"]
        self.assertEqual((config.processes, config.max_tasks_per_child,
                          config.process_memory_limit), (3, 100, 512))
        config = from_mapping({"processes": 2, "max_tasks_per_child": 0,
                               "process_memory_limit": 0})
        self.assertEqual((config.processes, config.max_tasks_per_child,
                          config.process_memory_limit), (2, 0, None))
        self.assertRaises(ConfigurationError, from_mapping, {"processes": 0})

    def test_bad_values_are_usage_errors(self):
        from twisted.python.usage import UsageError

        from quebert.tap import Options

        for argv in (["--processes", "0"], ["--processes", "x"],
                     ["--max-tasks-per-child", "-1"]):
            self.assertRaises(UsageError, Options().parseOptions, ["--state", "memory", *argv])

    def test_a_worker_without_process_tasks_has_no_pool(self):
        from quebert.config import WorkerConfig
        from quebert.worker import process_pool

        registry = Registry()
        registry.register(_module_level, "t.thread")
        self.assertIsNone(process_pool(WorkerConfig(), registry, reactor))
        registry.register(_module_level, "t.proc", executor=PROCESS)
        pool = process_pool(WorkerConfig(processes=3, process_memory_limit=100), registry,
                            reactor)
        self.assertEqual((pool.size, pool.expected, pool.memory_limit),
                         (3, ["t.proc"], 100 * 2 ** 20))
        self.assertEqual(process_pool(WorkerConfig(), registry, reactor).size,
                         os.cpu_count())


class MetricsTests(SynchronousTestCase):
    def test_pool_figures_in_metrics_only_with_a_pool(self):
        import collections

        from quebert.metrics import WorkerMetrics

        pool = types.SimpleNamespace(size=2, children=1, busy=1,
                                     ended=collections.Counter(timeout=3, died=1))

        def mediator(processes):
            return types.SimpleNamespace(
                counts={}, running={}, _inflight={}, _waiting=[], max_running_tasks=10,
                executor=types.SimpleNamespace(processes=processes))

        text = WorkerMetrics(mediator(pool)).exposition().decode()
        self.assertIn("quebert_process_pool_size 2.0", text)
        self.assertIn("quebert_process_pool_processes 1.0", text)
        self.assertIn("quebert_process_pool_busy 1.0", text)
        self.assertIn('quebert_process_pool_replaced_total{reason="timeout"} 3.0', text)
        self.assertIn('quebert_process_pool_replaced_total{reason="died"} 1.0', text)
        self.assertIn('quebert_process_pool_replaced_total{reason="recycled"} 0.0', text)
        self.assertNotIn("quebert_process_pool",
                         WorkerMetrics(mediator(None)).exposition().decode())


class WorkerProcessTests(IntegrationTestCase):
    """Real workers with a pool of processes (``--tasks tests.tasks_process``)."""

    def worker(self, *extra, queues=("default:20",), name="worker"):
        from tests._worker import WorkerProcess

        return WorkerProcess(self, self.url, "redis://127.0.0.1:6379/9", self.prefix,
                             tasks=(TASKS,), queues=queues,
                             extra=("--processes", "2", *extra), name=name)

    async def test_process_tasks_timeouts_cancels_and_lost_processes(self):
        worker = self.worker().start()
        await worker.ready()
        self.assertIn("process pool: 2 process(es)", worker.log())
        pool_pids = children_of(worker.process.pid)
        self.assertEqual(len(pool_pids), 2)

        # In a child, with current_task(); a thread task runs in the worker.
        who = await self.client.add_task("proc.whoami", _context={"db": "d1"},
                                         _name="unique-who")
        in_thread = await self.client.add_task("proc.thread_pid")
        spin = await self.client.add_task("proc.spin", 100_000)
        by_id = {r["id"]: r for r in await self.wait_states(
            [who.id, in_thread.id, spin.id], worker=worker)}
        me = by_id[who.id]["result"]
        self.assertIn(me["pid"], pool_pids)
        self.assertEqual((me["id"], me["name"], me["queue"], me["attempt"], me["context"],
                          me["unique_name"]),
                         (who.id, "proc.whoami", "default", 1, {"db": "d1"}, "unique-who"))
        self.assertEqual(by_id[in_thread.id]["result"], worker.process.pid)
        self.assertEqual(by_id[spin.id]["state"], "succeeded")

        # A timeout kills the child (twice: max_attempts=2); the pool is full again.
        runaway = await self.client.add_task("proc.forever", _timeout=1)
        [record] = await self.wait_states([runaway.id], timeout=60, worker=worker)
        self.assertEqual(record["state"], "failed")
        self.assertEqual(record["attempts"], 2)
        self.assertEqual(record["error"]["type"], "quebert.errors.TaskTimeout")
        self.assertIn("was killed", record["error"]["message"])
        await wait_for(lambda: len(children_of(worker.process.pid)) == 2, 30,
                       what="the pool back to 2 processes")
        # the two attempts killed two processes: two original ones, or one
        # original one and the process that replaced it
        self.assertLess(len(set(pool_pids) & set(children_of(worker.process.pid))), 2)

        # A cancel of a running process task kills its child; it ends canceled.
        path = os.path.abspath(self.mktemp())
        doomed = await self.client.add_task("proc.forever", path)
        await wait_for(lambda: os.path.exists(path), 30, what="the runaway task to start")
        with open(path) as f:
            pid = json.loads(f.readline())["pid"]
        await self.client.cancel(doomed.id)
        [record] = await self.wait_states([doomed.id], timeout=30, worker=worker)
        self.assertEqual(record["state"], "canceled")
        await wait_for(lambda: not alive(pid), 10, what="the canceled task's process to die")

        # A child dying (os._exit) fails the attempt with ProcessLost; retried, it succeeds.
        path = os.path.abspath(self.mktemp())
        dies = await self.client.add_task("proc.die_on_first_attempt", path)
        [record] = await self.wait_states([dies.id], timeout=60, worker=worker)
        self.assertEqual(record["state"], "succeeded")
        self.assertEqual(record["result"]["attempt"], 2)
        self.assertEqual(record["history"][0]["error"]["type"], "quebert.errors.ProcessLost")
        self.assertIn("exited with status 1", record["history"][0]["error"]["message"])

        # Errors keep the child's type and traceback; Reject fails at once.
        fails = await self.client.add_task("proc.fail", "boom")
        rejected = await self.client.add_task("proc.reject", "refused")
        by_id = {r["id"]: r for r in await self.wait_states([fails.id, rejected.id],
                                                            worker=worker)}
        self.assertEqual(by_id[fails.id]["error"]["type"], "builtins.ValueError")
        self.assertIn("raise ValueError(message)", by_id[fails.id]["error"]["traceback"])
        self.assertEqual(by_id[rejected.id]["attempts"], 1)
        self.assertEqual(by_id[rejected.id]["state"], "failed")

        await wait_for(lambda: len(children_of(worker.process.pid)) == 2, 30,
                       what="the pool back to 2 processes")
        pids = children_of(worker.process.pid)
        self.assertEqual(await worker.stop(), 0)
        for pid in pids:
            await wait_for(lambda pid=pid: not alive(pid), 10, what="the pool to stop")

    async def test_recycling_and_memory_limit(self):
        worker = self.worker("--max-tasks-per-child", "2", "--process-memory-limit", "150",
                             queues=("default:1",)).start()
        await worker.ready()
        infos = [await self.client.add_task("proc.pid") for _ in range(6)]
        records = await self.wait_states([i.id for i in infos], worker=worker)
        pids = [r["result"] for r in records]
        self.assertGreaterEqual(len(set(pids)), 3, pids)
        hog = await self.client.add_task("proc.hog", 300, 30)
        [record] = await self.wait_states([hog.id], timeout=60, worker=worker)
        self.assertEqual(record["state"], "failed")
        self.assertEqual(record["error"]["type"], "quebert.errors.ProcessLost")
        self.assertIn("memory limit of 150 MiB", record["error"]["message"])
        self.assertEqual(await worker.stop(), 0)

    async def test_graceful_stop_drains_process_tasks(self):
        worker = self.worker("--shutdown-timeout", "20").start()
        await worker.ready()
        path = os.path.abspath(self.mktemp())
        infos = [await self.client.add_task("proc.record", path, i, 1.5) for i in range(2)]
        await self.wait_states([i.id for i in infos], states=("running",), worker=worker)
        pids = children_of(worker.process.pid)
        self.assertEqual(await worker.stop(signal.SIGTERM), 0)
        records = await self.wait_states([i.id for i in infos], timeout=5)
        self.assertEqual({r["state"] for r in records}, {"succeeded"})
        for pid in pids:
            self.assertFalse(alive(pid), f"pool process {pid} outlived the worker")

    async def test_kill_9_of_the_worker_leaves_no_pool_process(self):
        worker = self.worker().start()
        await worker.ready()
        path = os.path.abspath(self.mktemp())
        busy = await self.client.add_task("proc.forever", path)
        await wait_for(lambda: os.path.exists(path), 30, what="a runaway task to start")
        pids = children_of(worker.process.pid)
        self.assertEqual(len(pids), 2)
        self.assertEqual(await worker.kill(), -signal.SIGKILL)
        started = time.monotonic()
        for pid in pids:
            await wait_for(lambda pid=pid: not alive(pid), 10,
                           what=f"pool process {pid} to die with its worker")
        print(f"\npool processes gone {time.monotonic() - started:.2f}s after kill -9 "
              "of their worker")
        # the runaway task is delivered again to the next worker
        worker.start()
        await worker.ready()
        await self.client.cancel(busy.id)
        [record] = await self.wait_states([busy.id], states=TERMINAL, timeout=30,
                                          worker=worker)
        self.assertEqual(record["state"], "canceled")
        self.assertEqual(await worker.stop(), 0)
        await sleep(0)
