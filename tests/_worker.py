"""
Real ``twistd amqp-worker`` processes for integration tests.

A :class:`WorkerProcess` runs the worker exactly as an operator would
(``twistd -n amqp-worker ...``), logs to a file the test can read, and is
killed in cleanup whatever happens.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Iterable, Mapping, Optional

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def sleep(seconds: float) -> defer.Deferred:
    return deferLater(reactor, seconds, lambda: None)


async def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` (may return a Deferred/coroutine) until true."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if isinstance(value, defer.Deferred) or hasattr(value, "__await__"):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await sleep(interval)


class WorkerProcess:
    """One worker process; ``start()``, then ``stop()`` or ``kill()``."""

    def __init__(self, testcase, amqp_url: str, redis_url: str, prefix: str, *,
                 tasks: Iterable[str] = ("tests.tasks_integration",),
                 queues: Iterable[str] = ("default:50",), extra: Iterable[str] = (),
                 name: str = "worker", env: Optional[Mapping[str, str]] = None) -> None:
        self.testcase = testcase
        self.log_path = os.path.abspath(testcase.mktemp() + f"-{name}.log")
        self.args = [TWISTD, "--pidfile=", "-n", f"--logfile={self.log_path}", "amqp-worker",
                     "--amqp-url", amqp_url, "--redis-url", redis_url,
                     "--state-prefix", prefix]
        for module in tasks:
            self.args += ["--tasks", module]
        for queue in queues:
            self.args += ["--queue", queue]
        self.args += list(extra)
        #: Variables added to the worker's environment (service tokens, say).
        self.env = dict(env or {})
        self.process: Optional[subprocess.Popen] = None
        self.starts = 0
        testcase.addCleanup(self._cleanup)

    def start(self) -> WorkerProcess:
        env = dict(os.environ, **self.env)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self.process = subprocess.Popen(self.args, cwd=ROOT, env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        self.starts += 1
        return self

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    async def ready(self, queues: int = 1, timeout: float = 30.0) -> None:
        """Wait until the worker has (re)registered its consumers."""
        expected = queues * self.starts

        def consuming():
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n"
                                     + self.log()[-3000:])
            return self.log().count("consuming ") >= expected

        await wait_for(consuming, timeout, what="worker to consume")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait for the exit code."""
        assert self.process is not None
        if self.alive:
            self.process.send_signal(sig)
        await wait_for(lambda: not self.alive, timeout, what="worker to exit")
        return self.process.returncode

    async def kill(self) -> int:
        return await self.stop(signal.SIGKILL, timeout=10.0)

    def _cleanup(self) -> None:
        if self.alive:
            self.process.kill()
            self.process.wait(10)
