"""
A real Guillotina 7 application in a subprocess, for the bridge's tests.

:class:`GuillotinaProcess` runs ``python -m tests._guillotina SETTINGS_JSON``:
uvicorn serving ``guillotina.factory.make_app(settings=...)`` on a loopback
socket the child binds to port 0 itself (no port race), which prints
``PORT <n>`` once the application has started; ``{port}`` in
``quebert.callback_url`` is replaced by that port.  The process is killed
in cleanup whatever happens; the database is a fresh DUMMY_FILE per test.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from typing import Optional

from twisted.internet import defer

# The application process runs this module too: it must not import
# tests._worker, whose module-level reactor import would install a Twisted
# reactor in it (test_bridge_guillotina_live checks that none is).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sleep(seconds: float) -> defer.Deferred:
    from tests._worker import sleep

    return sleep(seconds)

#: Guillotina's root user, as the settings below configure it.
ROOT_USER = ("root", "admin")


def settings_for(testcase, amqp_url: str, redis_url: str, prefix: str, **quebert) -> dict:
    """Settings of a test application: a fresh DUMMY_FILE database, the bridge, the test app."""
    db_file = os.path.abspath(testcase.mktemp() + "-db.pickle")
    return {
        "applications": ["quebert.bridge.guillotina", "tests.guillotina_bridge_app"],
        "databases": {"db": {"storage": "DUMMY_FILE", "filename": db_file}},
        "root_user": {"password": ROOT_USER[1]},
        "jwt": {"secret": "bridge-test-secret-0123456789abcdef", "algorithm": "HS256"},
        "auth_token_validators": [
            "guillotina.auth.validators.SaltedHashPasswordValidator",
            "guillotina.auth.validators.JWTValidator",
            "tests.guillotina_bridge_app.OperatorValidator",
        ],
        "quebert": {"amqp_url": amqp_url, "redis_url": redis_url, "state_prefix": prefix,
                     "callback_url": "http://127.0.0.1:{port}", **quebert},
    }


class GuillotinaProcess:
    """One application process; ``await start()``, then ``base_url``; stopped in cleanup."""

    def __init__(self, testcase, settings: dict) -> None:
        self.settings = settings
        self.log_path = os.path.abspath(testcase.mktemp() + "-guillotina.log")
        self.process: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None
        testcase.addCleanup(self._cleanup)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    async def start(self, timeout: float = 60.0) -> GuillotinaProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests._guillotina", json.dumps(self.settings)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log().splitlines():
                if line.startswith("PORT "):
                    self.port = int(line.split()[1])
                    return self
            if self.process.poll() is not None:
                raise AssertionError(f"guillotina exited with {self.process.returncode}:\n"
                                     + self.log()[-4000:])
            if time.monotonic() > deadline:
                raise AssertionError("guillotina did not start:\n" + self.log()[-4000:])
            await sleep(0.1)

    @defer.inlineCallbacks
    def stop(self, timeout: float = 30.0):
        """SIGTERM, and wait for the exit code."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            deadline = time.monotonic() + timeout
            while self.process.poll() is None and time.monotonic() < deadline:
                yield sleep(0.1)
        return None if self.process is None else self.process.poll()

    def _cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


async def _serve(settings: dict) -> None:
    import uvicorn
    from guillotina.factory import make_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    quebert = settings.get("quebert") or {}
    if isinstance(quebert.get("callback_url"), str):
        quebert["callback_url"] = quebert["callback_url"].replace("{port}", str(port))
    config = uvicorn.Config(make_app(settings=settings), lifespan="on", log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            serving.result()
            return
        await asyncio.sleep(0.05)
    print(f"PORT {port}", flush=True)
    await serving


if __name__ == "__main__":
    asyncio.run(_serve(json.loads(sys.argv[1])))
