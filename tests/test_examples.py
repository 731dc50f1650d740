"""
The examples run as documented: ``examples/med.py`` served by a real
``twistd amqp-worker --config examples/config.json`` and fed by
``python -m examples.produce``, in an isolated vhost and Redis prefix; and
the README's first quick-start command, ``scripts/run-example.sh``, pointed
at the same isolation with its environment variables.
"""

from __future__ import annotations

import os
import sys

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest

from tests._worker import ROOT, WorkerProcess
from tests.test_integration import REDIS_URL, IntegrationTestCase


class MedExampleTests(IntegrationTestCase):
    timeout = 120

    def test_med_example_tasks_succeed_retry_and_fail(self):
        async def run():
            worker = WorkerProcess(self, self.url, REDIS_URL, self.prefix, tasks=(),
                                   queues=(), extra=("--config", "examples/config.json"))
            worker.start()
            await worker.ready(queues=3)
            out, err, code = await getProcessOutputAndValue(
                sys.executable,
                ("-m", "examples.produce", "--amqp-url", self.url, "--redis-url", REDIS_URL,
                 "--prefix", self.prefix),
                env=dict(os.environ, PYTHONPATH=ROOT), path=ROOT)
            self.assertEqual(code, 0, err.decode())
            lines = out.decode().splitlines()
            ids = {line.split()[1]: line.split()[0] for line in lines}
            self.assertEqual(set(ids), {
                "examples.med.add", "examples.med.greet", "examples.med.flaky",
                "examples.med.always_fails", "examples.med.slow",
            })
            task_ids = [line.split()[0] for line in lines]
            records = {r["id"]: r for r in await self.wait_states(task_ids, timeout=60,
                                                                  worker=worker)}
            flaky = records[ids["examples.med.flaky"]]
            self.assertEqual((flaky["state"], flaky["attempts"]), ("succeeded", 3))
            doomed = records[ids["examples.med.always_fails"]]
            self.assertEqual((doomed["state"], doomed["attempts"]), ("failed", 3))
            self.assertEqual(records[ids["examples.med.greet"]]["result"], "hello, quebert")
            results = sorted(r["result"] for r in records.values()
                             if r["task"] == "examples.med.add")
            self.assertEqual(results, [5, 42])
            log = worker.log()
            for hook in ("[pre-hook]", "[post-hook]", "[error-hook]"):
                self.assertIn(hook, log)
            self.assertIn("consuming high (prefetch 15)", log)
            self.assertEqual(await worker.stop(), 0)

        return defer.ensureDeferred(run())


class ProduceAndWaitTests(IntegrationTestCase):
    timeout = 120

    def test_produce_waits_for_every_outcome(self):
        async def run():
            worker = WorkerProcess(self, self.url, REDIS_URL, self.prefix, tasks=(),
                                   queues=(), extra=("--config", "examples/config.json"))
            worker.start()
            await worker.ready(queues=3)
            out, err, code = await getProcessOutputAndValue(
                sys.executable,
                ("-m", "examples.produce", "--amqp-url", self.url, "--redis-url", REDIS_URL,
                 "--prefix", self.prefix, "--wait"),
                env=dict(os.environ, PYTHONPATH=ROOT), path=ROOT)
            self.assertEqual(code, 0, err.decode())
            results = {}
            for line in out.decode().splitlines():
                if line.startswith("result "):
                    _, _, name, outcome = line.split(None, 3)
                    results.setdefault(name, []).append(outcome)
            self.assertEqual(results, {
                "examples.med.add": ["= 5", "= 42"],
                "examples.med.greet": ["= 'hello, quebert'"],
                "examples.med.flaky": ["= 'demo worked after 2 failures'"],
                "examples.med.always_fails": [results["examples.med.always_fails"][0]],
                "examples.med.slow": ["= 0.5"],
            }, out.decode())
            self.assertRegex(results["examples.med.always_fails"][0],
                             r"^TaskFailed: task \S+ failed after 3 attempt\(s\): ")
            self.assertEqual(await worker.stop(), 0)

        return defer.ensureDeferred(run())


class RunExampleScriptTests(IntegrationTestCase):
    timeout = 240

    def test_quick_start_script_shows_tasks_succeed_retry_and_fail(self):
        if not os.path.exists(os.path.join(ROOT, ".venv", "bin", "twistd")):
            raise SkipTest("scripts/run-example.sh runs .venv's twistd, and there is no .venv "
                           "(bash scripts/bootstrap.sh makes it)")

        async def run():
            env = dict(os.environ, QUEBERT_AMQP_URL=self.url, QUEBERT_REDIS_URL=REDIS_URL,
                       QUEBERT_PREFIX=self.prefix, QUEBERT_SKIP_BOOTSTRAP="1",
                       DEMO_SECONDS="10")
            out, err, code = await getProcessOutputAndValue(
                "/bin/bash", ("scripts/run-example.sh",), env=env, path=ROOT)
            output = out.decode(errors="replace")
            self.assertEqual(code, 0, output[-4000:] + err.decode(errors="replace")[-2000:])
            for expected in ("succeeded on attempt 3", "retry in 1.000s", "retry in 2.000s",
                             "failed for good after attempt 3",
                             "the worker has stopped cleanly", f"--state-prefix {self.prefix}",
                             f"--amqp-url {self.url}"):
                self.assertIn(expected, output)
            ids = [line.split()[2] for line in output.splitlines()
                   if line.startswith("  produce | ")]
            self.assertEqual(len(ids), 6, output[-4000:])  # add twice (one with a countdown)
            # the tasks' records are under the given prefix, in the given database
            records = {r["task"]: r for r in await self.wait_states(ids, timeout=10)}
            self.assertEqual((records["examples.med.flaky"]["state"],
                              records["examples.med.always_fails"]["state"]),
                             ("succeeded", "failed"))

        return defer.ensureDeferred(run())
