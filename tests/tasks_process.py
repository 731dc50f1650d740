"""
Process tasks (``executor="process"``) for tests.test_process: run in the
pool children of a worker, or of a :class:`~quebert.process.TaskProcessPool`
a test starts itself.  Counters that must survive a child being killed live
in files the test names.
"""

from __future__ import annotations

import fcntl
import json
import os
import time

from quebert import current_task, task
from quebert.errors import Reject


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


class CustomError(Exception):
    """An exception class of a task module: the worker knows it too."""

    def __init__(self, code: int) -> None:
        super().__init__(f"custom failure {code}")
        self.code = code


@task(name="proc.pid", executor="process")
def pid() -> int:
    return os.getpid()


@task(name="proc.add", executor="process")
def add(x: int, y: int) -> int:
    return x + y


@task(name="proc.spin", executor="process")
def spin(n: int = 300_000) -> int:
    """A pure-Python CPU-bound loop (about 20 ms for the default on one core)."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


@task(name="proc.echo", executor="process")
def echo(value: object) -> object:
    return value


@task(name="proc.whoami", executor="process")
def whoami() -> dict:
    current = current_task()
    return {"id": current.id, "name": current.name, "queue": current.queue,
            "attempt": current.attempt, "context": dict(current.context),
            "unique_name": current.unique_name, "origin": current.origin,
            "pid": os.getpid()}


@task(name="proc.fail", executor="process", max_attempts=1)
def fail(message: str) -> None:
    raise ValueError(message)


@task(name="proc.custom_fail", executor="process", max_attempts=1)
def custom_fail(code: int) -> None:
    raise CustomError(code)


@task(name="proc.reject", executor="process")
def reject(message: str) -> None:
    raise Reject(message)


@task(name="proc.not_json", executor="process")
def not_json() -> object:
    return {1, 2, 3}


@task(name="proc.forever", executor="process", min_backoff=0.2, max_backoff=1,
      max_attempts=2)
def forever(path: str = "") -> None:
    """A runaway CPU task: never returns (records its pid first)."""
    if path:
        _append(path, {"pid": os.getpid(), "at": time.time()})
    while True:
        pass


@task(name="proc.exit", executor="process")
def exit_now(code: int = 1) -> None:
    os._exit(code)


@task(name="proc.die_on_first_attempt", executor="process", min_backoff=0.2,
      max_backoff=1, max_attempts=3)
def die_on_first_attempt(path: str) -> dict:
    """Kills its own process on attempt 1, succeeds on a later one."""
    attempt = current_task().attempt
    _append(path, {"pid": os.getpid(), "attempt": attempt, "at": time.time()})
    if attempt == 1:
        os._exit(1)
    return {"attempt": attempt, "pid": os.getpid()}


@task(name="proc.hog", executor="process", min_backoff=0.2, max_backoff=1, max_attempts=1)
def hog(megabytes: int, seconds: float = 5.0, keep: bool = False) -> int:
    """
    Holds ``megabytes`` of memory for ``seconds``; with ``keep``, for the
    rest of its process's life (a leak).
    """
    block = bytearray(megabytes * 2 ** 20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(seconds)
    if keep:
        _kept.append(block)
    return len(block)


_kept: list = []


@task(name="proc.record", executor="process", min_backoff=0.1, max_backoff=0.5,
      max_attempts=-1)
def record(path: str, i: int, seconds: float = 0.0) -> int:
    """One line per run (the fault scenarios count runs and duplicates)."""
    if seconds:
        time.sleep(seconds)
    _append(path, {"i": i, "pid": os.getpid(), "at": time.time()})
    return i


@task(name="proc.thread_pid")
def thread_pid() -> int:
    """A thread task, for comparison: runs in the worker's own process."""
    return os.getpid()
