"""
``examples/url_tasks/run.sh`` works as its README says: run as a user
would, but on a fresh vhost, a fresh Redis key prefix and free ports, and
checked on what it prints.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from tests._example import free_port, listening, run_script
from tests._rabbit import make_vhost
from tests._redis import REDIS_URL, isolated_redis
from tests._worker import ROOT

SCRIPT = os.path.join(ROOT, "examples", "url_tasks", "run.sh")
#: The script normally takes about 5 s; this bounds a hung run.
RUN_TIMEOUT = 75.0


class URLTasksExampleTests(TestCase):
    timeout = 120

    async def test_run_sh(self) -> None:
        amqp_url = make_vhost(self, prefix="quebert-example")
        _redis, prefix = await isolated_redis(self)
        target_port, api_port = free_port(), free_port()
        while api_port == target_port:
            api_port = free_port()
        env = dict(AMQP_URL=amqp_url, REDIS_URL=REDIS_URL, STATE_PREFIX=prefix,
                   TARGET_PORT=str(target_port), API_PORT=str(api_port), API_TOKEN="")
        status, text, elapsed = await run_script(self, SCRIPT, env, RUN_TIMEOUT)
        self.assertEqual(status, 0, text[-6000:])
        results = [line for line in text.splitlines() if line.startswith("RESULT ")]
        self.assertEqual(results, [
            "RESULT hello: state=succeeded attempts=1 (ok)",
            "RESULT flaky: state=succeeded attempts=3 (ok)",
            "RESULT duplicate: second push: HTTP 409 task_already_exists (ok)",
            "RESULT slow: state=canceled reason=canceled while attempt 1 ran (ok)",
        ], text[-6000:])
        # the target saw the retries, with quebert's headers
        self.assertIn("GET /flaky -> 200 (call 3)", text)
        self.assertIn("taskpreviousresponse=503 taskretrycount=2", text)
        # the slow request was aborted, not answered
        self.assertIn("GET /slow: the client went away before the answer", text)
        self.assertNotIn("/slow answered 200", text)
        self.assertIn('"ready": true', text)
        self.assertIn("all checks passed", text)
        self.assertLess(elapsed, 50, "the example should take seconds, not minutes")
        # everything it started is gone
        self.assertFalse(listening(api_port), "the worker's API still listens")
        self.assertFalse(listening(target_port), "the target server still listens")
