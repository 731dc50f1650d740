"""
CPU-bound tasks for ``bench/bench_processes.py``: the same pure-Python
loop registered twice, once for the worker's thread pool and once for its
pool of processes.  Each run appends ``"<start> <end> <pid>\\n"`` to the
file the benchmark names (one ``write`` on an ``O_APPEND`` descriptor, so
lines stay whole when several processes append at once).
"""

from __future__ import annotations

import os
import time

from quebert import task


def spin(steps: int) -> int:
    """A pure-Python loop: holds the GIL for as long as it runs."""
    total = 0
    for i in range(steps):
        total += i * i % 7
    return total


def _run(path: str, steps: int) -> int:
    start = time.time()
    total = spin(steps)
    line = f"{start:.6f} {time.time():.6f} {os.getpid()}\n".encode("ascii")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return total


@task(name="bench.cpu_thread")
def cpu_thread(path: str, steps: int) -> int:
    """The loop in the worker's thread pool (the GIL serialises it)."""
    return _run(path, steps)


@task(name="bench.cpu_process", executor="process")
def cpu_process(path: str, steps: int) -> int:
    """The loop in the worker's pool of processes (one core each)."""
    return _run(path, steps)
