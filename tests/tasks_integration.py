"""
Tasks the integration tests run in real worker processes.

State that must survive a worker being killed lives in files the test
names, so several processes (and restarts) see the same counters.
"""

from __future__ import annotations

import fcntl
import json
import os
import time

from twisted.internet import defer, reactor

from quebert import current_task, task


def _append(path: str, record: dict) -> int:
    """Append a JSON line to ``path`` atomically; return the line count."""
    with open(path, "a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(record) + "\n")
        f.flush()
        f.seek(0)
        count = sum(1 for _ in f)
        fcntl.flock(f, fcntl.LOCK_UN)
    return count


@task(name="it.noop")
def noop(i: int = 0) -> int:
    return i


@task(name="it.add")
def add(x: int, y: int) -> int:
    return x + y


@task(name="it.record")
def record(path: str, i: int) -> int:
    """Write one line per run: the test counts runs (and duplicates)."""
    _append(path, {"i": i, "pid": os.getpid(), "at": time.time()})
    return i


@task(name="it.slow_record")
def slow_record(path: str, i: int, seconds: float = 0.05) -> int:
    time.sleep(seconds)
    _append(path, {"i": i, "pid": os.getpid(), "at": time.time()})
    return i


@task(name="it.flaky", min_backoff=0.5, max_backoff=10, max_attempts=5)
def flaky(path: str, failures: int) -> str:
    """Fails ``failures`` times (counted in ``path``), then succeeds."""
    runs = _append(path, {"at": time.time(), "pid": os.getpid()})
    if runs <= failures:
        raise RuntimeError(f"planned failure {runs} of {failures}")
    return f"ok after {failures} failures"


@task(name="it.always_fails", min_backoff=0.2, max_backoff=1, max_attempts=3)
def always_fails() -> None:
    raise ValueError("this task always fails")


@task(name="it.sleep")
async def sleep(seconds: float) -> float:
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d
    return seconds


@task(name="it.kill_worker", min_backoff=0.1, max_backoff=0.5, max_attempts=3)
def kill_worker(path: str) -> None:
    """A poison task: kills the process running it, every time."""
    _append(path, {"at": time.time(), "pid": os.getpid()})
    os.kill(os.getpid(), 9)


@task(name="it.block_reactor", executor="reactor", min_backoff=0.1, max_backoff=0.5,
      max_attempts=2)
def block_reactor(path: str, seconds: float = 10.0) -> float:
    """A poison task: blocks the reactor (a bug the watchdog must catch)."""
    _append(path, {"at": time.time(), "pid": os.getpid()})
    time.sleep(seconds)
    return seconds


@task(name="it.sleep_thread")
def sleep_thread(path: str, i: int, seconds: float) -> int:
    """A thread task: records its start and its end."""
    _append(path, {"i": i, "event": "start", "pid": os.getpid(), "at": time.time()})
    time.sleep(seconds)
    _append(path, {"i": i, "event": "end", "pid": os.getpid(), "at": time.time()})
    return i


def _whoami() -> dict:
    current = current_task()
    return {"id": current.id, "name": current.name, "queue": current.queue,
            "origin": current.origin, "context": dict(current.context)}


@task(name="it.whoami", aliases=("guillotina_app.tasks.whoami",))
async def whoami() -> dict:
    """An ``async def`` task reporting what quebert.current_task() tells it."""
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(0.01, d.callback, None)
    await d
    return _whoami()


@task(name="it.whoami_thread")
def whoami_thread() -> dict:
    """The same from a thread (reached through the legacy_tasks config block)."""
    return _whoami()


@task(name="it.fail_slowly", min_backoff=3600, max_backoff=3600, max_attempts=2)
def fail_slowly() -> None:
    """Fails once, and is retried an hour later: its copy waits in a delay queue."""
    raise RuntimeError("planned failure, retried in an hour")
