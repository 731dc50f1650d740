"""
The memory state store at steady state: each task's ``started`` and
``finished`` writes while the oldest finished record expires, with 10 000
then 200 000 records kept.  Prints us per task at each size and their
ratio, which should stay near 1: no write may cost more because the store
holds more records; then the memory a finished record takes.

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

from quebert.state.memory import MAX_FINISHED, MemoryStateManager  # noqa: E402

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


def bytes_per_record(records: int = 100_000) -> float:
    """Python heap (tracemalloc) the store holds per finished record kept."""
    import tracemalloc

    clock = Clock()
    clock.advance(1e9)
    manager = MemoryStateManager(clock=clock, max_finished=None)
    info = {"queue": "default", "kind": "call", "task": "app.tasks.send_email", "name": None,
            "eta": None, "created_at": 1e9}
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(records):
            clock.advance(STEP)
            at = clock.seconds()
            task_id = f"{n:08d}-0000-4000-8000-000000000000"
            manager.started(task_id, 1, "host-7f9c:4711:a1b2c3", info, at)
            manager.finished(task_id, "succeeded", 1, info, at, result={"sent": True})
        return (tracemalloc.get_traced_memory()[0] - before) / records
    finally:
        tracemalloc.stop()


def main(sizes: tuple = (10000, 200000)) -> None:
    figures = [per_task_us(size) for size in sizes]
    for size, us in zip(sizes, figures):
        print(f"{size:>8} records kept: {us:6.1f} us per task (2 writes, 1 expiry)")
    print(f"ratio {sizes[-1]} / {sizes[0]} records: {figures[-1] / figures[0]:.2f}x")
    per_record = bytes_per_record()
    print(f"memory: {per_record:.0f} bytes per finished record kept, "
          f"{per_record * 100_000 / 1e6:.0f} MB per 100,000 "
          f"(a worker keeps at most {MAX_FINISHED:,}: --state memory)")


if __name__ == "__main__":
    main()
