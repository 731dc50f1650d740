"""
The examples run as documented: ``examples/med.py`` served by a real
``twistd amqp-worker --config examples/config.json`` and fed by
``python -m examples.produce``, in an isolated vhost and Redis prefix.
"""

from __future__ import annotations

import os
import sys

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue

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
