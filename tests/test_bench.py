"""
Smoke tests of the benchmarks in ``bench/``: they still run and report.

Nothing here asserts a speed (figures on a shared machine drift, and a
timing assertion in a test would fail at random); the benchmarks only
have to work, so that their figures can be trusted when they are run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import bench_hotpath, bench_memory_state, bench_stats  # noqa: E402


class HotPathTests(SynchronousTestCase):
    def test_runs_every_task_to_its_ack_with_and_without_a_state_store(self):
        # run() asserts that every task succeeded; it returns us of CPU per task
        self.assertGreater(bench_hotpath.run(tasks=400), 0)
        self.assertGreater(bench_hotpath.run(tasks=400, null_state=True), 0)

    def test_help_prints_the_usage_and_profiles_nothing(self):
        # "--help" was once taken for a profile file name: a run, then a
        # 16 KB file named --help in the working directory
        from io import StringIO
        from unittest import mock

        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(cwd)
        out = StringIO()
        with mock.patch.object(sys, "argv", ["bench_hotpath.py", "--help"]), \
                mock.patch.object(sys, "stdout", out), \
                mock.patch.object(bench_hotpath, "run", side_effect=AssertionError("ran")):
            bench_hotpath.main()
        self.assertIn("us per task", out.getvalue())
        self.assertEqual(os.listdir(cwd), [])


class StatsBenchTests(SynchronousTestCase):
    def test_measures_the_path_with_and_without_the_figures(self):
        from quebert import mediator
        from quebert.stats import TaskStats

        figures = bench_stats.measure(runs=1, tasks=300)
        self.assertGreater(figures["without"], 0)
        self.assertGreater(figures["with"], 0)
        self.assertIs(mediator.TaskStats, TaskStats, "the real class is put back")


class MemoryStateBenchTests(SynchronousTestCase):
    def test_measures_a_store_of_each_size(self):
        self.assertGreater(bench_memory_state.per_task_us(300, measured=100), 0)


class ThroughputTests(TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def test_a_small_run_reports_both_consumers_and_the_target(self):
        results = os.path.abspath(self.mktemp())
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            [os.path.join(ROOT, "bench", "bench_throughput.py"), "--tasks", "300",
             "--repeat", "1", "--configs", "baseline-fast,redis-async", "--no-latency",
             "--json", results],
            env=dict(os.environ), path=ROOT, reactor=reactor)
        text = out.decode() + err.decode()
        self.assertEqual(code, 0, text)
        self.assertIn("baseline: bare pika consumer", text)
        self.assertIn("quebert, redis state, async def", text)
        self.assertIn("bare, quebert's decoding (diag.)", text)
        self.assertIn("TARGET quebert, redis state, async def >= 0.5x baseline:", text)
        self.assertIn("consumer user", text)
        with open(results, encoding="utf-8") as f:
            data = json.load(f)
        measured = {r["config"] for r in data["throughput"] if "tasks_per_s" in r}
        self.assertEqual(measured, {"baseline", "baseline-fast", "redis-async"}, text)
        self.assertEqual(data["latency"], [], "--no-latency skips the paced runs")


class LatencyCurveTests(SynchronousTestCase):
    def test_reports_each_configuration_at_each_rate_and_where_it_meets_the_target(self):
        from bench import bench_throughput

        def run(name: str, rate: float, p50: float, p99: float) -> dict:
            return {"config": name, "rate": rate, "p50_ms": p50, "p99_ms": p99}

        text = bench_throughput.curve_report(
            [run("baseline-incr", 1000, 0.3, 0.9), run("redis-incr", 1000, 0.5, 2.0),
             run("baseline-incr", 4000, 0.6, 2.9), run("redis-incr", 4000, 1.2, 4.5),
             {"config": "redis-incr", "rate": 4000, "error": "lost"}],
            ["baseline-incr", "redis-incr"])
        self.assertIn("0.50 /  2.00", text)
        self.assertIn("1.20 /  4.50", text)
        self.assertIn("baseline-incr: p50 <= 1.5 ms and p99 <= 3.0 ms up to 4000/s", text)
        self.assertIn("redis-incr: p50 <= 1.5 ms and p99 <= 3.0 ms up to 1000/s", text)


class LatencyCurveRunTests(TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def test_each_rate_is_measured_by_a_run_of_its_own(self):
        # every rate's worker once wrote the same files: the second rate
        # read the first one's figures back
        results = os.path.abspath(self.mktemp())
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            [os.path.join(ROOT, "bench", "bench_throughput.py"), "--tasks", "200",
             "--repeat", "1", "--configs", "baseline-incr", "--no-latency",
             "--latency-curve", "100,300", "--paced-seconds", "1", "--json", results,
             "--keep"],
            env=dict(os.environ), path=ROOT, reactor=reactor)
        text = out.decode() + err.decode()
        self.assertEqual(code, 0, text)
        self.assertIn("latency (enqueue to start) against the paced rate", text)
        with open(results, encoding="utf-8") as f:
            data = json.load(f)
        self.assertEqual(sorted((r["rate"], r.get("count")) for r in data["curve"]),
                         [(100.0, 100), (300.0, 300)], text)
        workdir = re.search(r"files in (\S+)", text).group(1)
        self.addCleanup(shutil.rmtree, workdir, True)
        figures = sorted(f for f in os.listdir(workdir) if re.search(r"lat0.*\.1\.json$", f))
        self.assertEqual(len(figures), 2, figures)


class QueueTypesTests(TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def test_a_small_run_compares_classic_and_quorum_with_and_without_retries(self):
        results = os.path.abspath(self.mktemp())
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            [os.path.join(ROOT, "bench", "bench_queue_types.py"), "--tasks", "200",
             "--repeat", "1", "--configs", "redis-async,redis-retry",
             "--retry-backoff", "0.05", "--json", results],
            env=dict(os.environ), path=ROOT, reactor=reactor)
        text = out.decode() + err.decode()
        self.assertEqual(code, 0, text)
        self.assertIn("RATIO quorum/classic quebert, redis state, async def:", text)
        self.assertIn("RATIO quorum/classic quebert, redis state, retry once:", text)
        self.assertIn("quebert.qdelay.05, quebert.qdelay.04, quebert.qdelay.01", text)
        self.assertNotIn("WARNING", text)
        self.assertNotIn("ERROR", text)
        with open(results, encoding="utf-8") as f:
            data = json.load(f)
        measured = {(r["config"], r["queue_type"]) for r in data["results"]
                    if "tasks_per_s" in r}
        self.assertEqual(measured, {("redis-async", "classic"), ("redis-async", "quorum"),
                                    ("redis-retry", "classic"), ("redis-retry", "quorum")},
                         text)
        # every task of the retry runs started twice and succeeded once
        for r in data["results"]:
            self.assertEqual(r["redis_succeeded"], 200, r)


class ProcessesBenchTests(TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def test_a_small_run_reports_threads_processes_and_their_ratio(self):
        results = os.path.abspath(self.mktemp())
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            [os.path.join(ROOT, "bench", "bench_processes.py"), "--tasks", "20",
             "--repeat", "1", "--ms", "2", "--json", results],
            env=dict(os.environ), path=ROOT, reactor=reactor)
        text = out.decode() + err.decode()
        self.assertEqual(code, 0, text)
        self.assertIn("RATIO processes/threads:", text)
        with open(results, encoding="utf-8") as f:
            data = json.load(f)
        by_kind = {r["kind"]: r for r in data["results"]}
        self.assertEqual(set(by_kind), {"threads", "processes"})
        self.assertEqual(by_kind["threads"]["pids"], 1, "threads run in the worker")
        self.assertEqual(by_kind["processes"]["tasks"], 20)
