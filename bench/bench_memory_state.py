"""
The memory state store at steady state: each task's ``started`` and
``finished`` writes while the oldest finished record expires, with 10 000
then 200 000 records kept.  Prints us per task at each size and their
ratio, which should stay near 1: no write may cost more because the store
holds more records.

Run from the repository root::

    .venv/bin/python bench/bench_memory_state.py
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from twisted.internet.task import Clock  # noqa: E402

from quebert.state.memory import MemoryStateManager  # noqa: E402

STEP = 0.001  # seconds between tasks, on the fake clock


def per_task_us(records: int, measured: int = 2000) -> float:
    """us per task once the store holds ``records`` and each task expires one."""
    clock = Clock()
    clock.advance(1e9)
    manager = MemoryStateManager(finished_ttl=records * STEP, clock=clock)
    info = {"queue": "q", "kind": "call", "task": "bench.noop", "name": None, "eta": None,
            "created_at": 1e9}

    def one(n: int) -> None:
        clock.advance(STEP)
        at = clock.seconds()
        manager.started(f"t{n}", 1, "w", info, at)
        manager.finished(f"t{n}", "succeeded", 1, info, at)

    for n in range(records):
        one(n)
    began = time.process_time()
    for n in range(records, records + measured):
        one(n)
    return (time.process_time() - began) / measured * 1e6


def main(sizes: tuple = (10000, 200000)) -> None:
    figures = [per_task_us(size) for size in sizes]
    for size, us in zip(sizes, figures):
        print(f"{size:>8} records kept: {us:6.1f} us per task (2 writes, 1 expiry)")
    print(f"ratio {sizes[-1]} / {sizes[0]} records: {figures[-1] / figures[0]:.2f}x")


if __name__ == "__main__":
    main()
