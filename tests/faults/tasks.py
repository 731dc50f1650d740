"""
Tasks the fault scenarios run in real worker processes.

Every run of a task appends one line ``"<i> <pid> <epoch seconds>\\n"`` to
the file the test names, with a single ``write`` on an ``O_APPEND``
descriptor: the kernel keeps such lines whole even when several worker
processes (and threads) append at once, and a line is on disk the moment
the function has run, whatever happens to its worker next.  The test
counts runs per task from that file (:class:`tests.faults._harness.Runs`),
so a duplicate run is seen even when the state store would hide it.
"""

from __future__ import annotations

import os
import time

from twisted.internet import defer, reactor

from quebert import task


class PlannedFailure(Exception):
    """Raised by a task's first run when the test asks for a retry."""


def record_run(path: str, i: int) -> None:
    """Append this run's line to ``path`` (one atomic ``write``)."""
    line = f"{i} {os.getpid()} {time.time():.6f}\n".encode("ascii")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _first_time(path: str, i: int) -> bool:
    """True only the first time it is asked for ``(path, i)``, across processes."""
    try:
        os.close(os.open(f"{path}.failed-{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return False
    return True


@task(name="faults.mark", min_backoff=0.5, max_backoff=2, max_attempts=5)
def mark(path: str, i: int, seconds: float = 0.0, fail_first: bool = False) -> int:
    """
    A no-op-ish thread task: optionally sleep, record the run, and (with
    ``fail_first``) fail the first run so that the task goes through a
    delay queue once.
    """
    if seconds:
        time.sleep(seconds)
    record_run(path, i)
    if fail_first and _first_time(path, i):
        raise PlannedFailure(f"planned first-run failure of task {i}")
    return i


@task(name="faults.amark")
async def amark(path: str, i: int, seconds: float = 0.0) -> int:
    """The reactor-side twin of :func:`mark`: sleeps without a thread."""
    if seconds:
        d: defer.Deferred = defer.Deferred()
        reactor.callLater(seconds, d.callback, None)
        await d
    record_run(path, i)
    return i


@task(name="faults.poison", min_backoff=0.1, max_backoff=0.5, max_attempts=3)
def poison(path: str) -> None:
    """Kills the process running it, every time (after recording the run as ``-1``)."""
    record_run(path, -1)
    os.kill(os.getpid(), 9)


@task(name="faults.fail", min_backoff=0.5, max_backoff=1, max_attempts=3)
def fail(path: str, i: int, seconds: float = 0.0) -> None:
    """Sleeps, records the run, and fails: every time, until its budget is spent."""
    if seconds:
        time.sleep(seconds)
    record_run(path, i)
    raise PlannedFailure(f"task {i} always fails")


@task(name="faults.block_reactor", executor="reactor", min_backoff=0.1, max_backoff=0.5,
      max_attempts=2)
def block_reactor(path: str, seconds: float = 30.0) -> None:
    """Blocks the reactor (a sleep on the reactor thread) after recording the run as ``-2``."""
    record_run(path, -2)
    time.sleep(seconds)

