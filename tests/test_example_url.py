"""
``examples/url_tasks/run.sh`` works as its README says: run as a user
would, but on a fresh vhost, a fresh Redis key prefix and free ports, and
checked on what it prints.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

from twisted.trial.unittest import TestCase

from tests._rabbit import make_vhost
from tests._redis import REDIS_URL, isolated_redis
from tests._worker import ROOT, wait_for

SCRIPT = os.path.join(ROOT, "examples", "url_tasks", "run.sh")
#: The script normally takes about 5 s; this bounds a hung run.
RUN_TIMEOUT = 75.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


class URLTasksExampleTests(TestCase):
    timeout = 120

    def _stop(self, process: subprocess.Popen) -> None:
        """Stop the script and everything it started (its own process group)."""
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # run.sh's trap stops its children
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left, if anything
        except ProcessLookupError:
            pass
        process.wait(10)

    async def test_run_sh(self) -> None:
        amqp_url = make_vhost(self, prefix="quebert-example")
        _redis, prefix = await isolated_redis(self)
        target_port, api_port = free_port(), free_port()
        while api_port == target_port:
            api_port = free_port()
        output = os.path.abspath(self.mktemp() + ".out")
        env = dict(os.environ, AMQP_URL=amqp_url, REDIS_URL=REDIS_URL, STATE_PREFIX=prefix,
                   TARGET_PORT=str(target_port), API_PORT=str(api_port))
        env.pop("API_TOKEN", None)
        with open(output, "wb") as out:
            process = subprocess.Popen(["bash", SCRIPT], cwd=ROOT, env=env, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        self.addCleanup(self._stop, process)
        started = time.monotonic()
        await wait_for(lambda: process.poll() is not None, RUN_TIMEOUT, interval=0.2,
                       what="examples/url_tasks/run.sh to finish")
        elapsed = time.monotonic() - started
        with open(output, encoding="utf-8", errors="replace") as f:
            text = f.read()
        self.assertEqual(process.returncode, 0, text[-6000:])
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
