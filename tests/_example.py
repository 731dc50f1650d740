"""
Running an example's ``run.sh`` as a user would, for the example tests.

:func:`run_script` starts the script in a session of its own (so that it
and everything it starts can be stopped together), waits for it, and
returns its exit status and output; whatever happens, cleanup stops the
whole group (SIGTERM, which the scripts' traps pass on, then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from typing import Mapping, Tuple

from tests._worker import ROOT, wait_for


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop(process: subprocess.Popen) -> None:
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


async def run_script(testcase, script: str, env: Mapping[str, str],
                     timeout: float) -> Tuple[int, str, float]:
    """
    Run ``bash script`` from the checkout's root with ``env`` added to the
    environment; ``(exit status, output, seconds taken)``.
    """
    output = os.path.abspath(testcase.mktemp() + ".out")
    with open(output, "wb") as out:
        process = subprocess.Popen(["bash", script], cwd=ROOT, env={**os.environ, **env},
                                   stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    testcase.addCleanup(_stop, process)
    started = time.monotonic()
    await wait_for(lambda: process.poll() is not None, timeout, interval=0.2,
                   what=f"{os.path.relpath(script, ROOT)} to finish")
    elapsed = time.monotonic() - started
    with open(output, encoding="utf-8", errors="replace") as f:
        return process.returncode, f.read(), elapsed
