"""
What the per-task figures (``quebert.stats.TaskStats``: outcome counters
per task name and queue, run-time and queue-wait histograms) cost a
worker: ``bench_hotpath``'s whole mediator path, with the real
``TaskStats`` and with one that does nothing, runs alternating in the
same process; medians and the difference per task printed.

    .venv/bin/python bench/bench_stats.py [runs] [tasks]
"""

from __future__ import annotations

import os
import statistics
import sys
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import bench_hotpath  # noqa: E402
from quebert import mediator  # noqa: E402
from quebert.stats import TaskStats  # noqa: E402


class NoStats(TaskStats):
    """The baseline: the calls are made, nothing is kept."""

    def started(self, name: str, queue: str, waited: Optional[float]) -> None:
        pass

    def ended(self, name: str, queue: str, outcome: str, ran: Optional[float] = None) -> None:
        pass


def measure(runs: int = 5, tasks: int = 20000) -> dict:
    """Median us per task with and without the figures, and their difference."""
    kept, bare = [], []
    original: Any = mediator.TaskStats
    try:
        for _ in range(runs):
            mediator.TaskStats = NoStats
            bare.append(bench_hotpath.run(tasks=tasks))
            mediator.TaskStats = original
            kept.append(bench_hotpath.run(tasks=tasks))
    finally:
        mediator.TaskStats = original
    with_stats, without = statistics.median(kept), statistics.median(bare)
    return {"with": with_stats, "without": without, "cost": with_stats - without,
            "ratio": with_stats / without}


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    tasks = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    figures = measure(runs, tasks)
    print(f"mediator path, us of CPU per task (median of {runs} runs of {tasks} tasks):")
    print(f"  without per-task figures  {figures['without']:8.1f}")
    print(f"  with per-task figures     {figures['with']:8.1f}")
    print(f"  cost                      {figures['cost']:8.2f} us per task "
          f"(ratio {figures['ratio']:.3f})")


if __name__ == "__main__":
    main()
