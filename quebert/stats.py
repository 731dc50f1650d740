# -*- test-case-name: tests.test_stats -*-
"""
Per-task figures of one worker: :class:`TaskStats`.

The mediator tells it when an attempt starts (with how long the task
waited in its queue) and how each attempt ended (with how long it ran).
It keeps, in plain dicts and lists, what the worker's ``/metrics`` exposes
(outcome counters per task name and queue, histograms of run time and of
queue wait) and what its beat tells the console (attempts and outcomes per
queue).  An update is a few dict look-ups and one ``bisect``: 1.6 µs of
CPU per task, measured by ``bench/bench_stats.py``.

Label sets are bounded: at most ``max_task_names`` distinct task names are
kept apart; tasks of any further name are counted under ``OTHER`` (a
worker serving URL tasks would otherwise make a label of every URL).
"""

from __future__ import annotations

import bisect
from typing import Dict, List, Optional, Tuple

#: The task-name label of names past ``max_task_names``.
OTHER = "(other)"
#: Distinct task names kept apart by default.
DEFAULT_MAX_TASK_NAMES = 100
#: Histogram bucket bounds, in seconds (Prometheus's defaults, and a few
#: longer ones for tasks and waits that take minutes).
BUCKETS: Tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                              10.0, 30.0, 60.0, 300.0, 900.0)
#: Outcomes counted per queue for the console, and per task for /metrics.
OUTCOMES = ("succeeded", "retried", "failed", "canceled")


class Histogram:
    """Counts per bucket (the last one: above every bound), a sum and a count."""

    __slots__ = ("counts", "sum", "count")

    def __init__(self) -> None:
        self.counts: List[int] = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> List[Tuple[str, int]]:
        """``(upper bound, observations <= it)`` pairs, ``+Inf`` last (Prometheus's form)."""
        out, total = [], 0
        for bound, n in zip(BUCKETS, self.counts):
            total += n
            out.append((repr(bound), total))
        out.append(("+Inf", total + self.counts[-1]))
        return out


class TaskStats:
    """What one worker counts of the tasks it runs."""

    def __init__(self, max_task_names: int = DEFAULT_MAX_TASK_NAMES) -> None:
        self.max_task_names = max_task_names
        self._names: Dict[str, str] = {}
        #: (task, queue, outcome) -> attempts
        self.outcomes: Dict[Tuple[str, str, str], int] = {}
        #: (task, queue) -> run-time histogram
        self.run_time: Dict[Tuple[str, str], Histogram] = {}
        #: (task, queue) -> queue-wait histogram (first attempts only)
        self.wait_time: Dict[Tuple[str, str], Histogram] = {}
        #: queue -> {"started": n, outcome: n}: what the console's rates use
        self.queues: Dict[str, Dict[str, int]] = {}

    def label(self, name: str) -> str:
        """``name``, or :data:`OTHER` once ``max_task_names`` other names are kept."""
        label = self._names.get(name)
        if label is None:
            label = name if len(self._names) < self.max_task_names else OTHER
            if label is not OTHER:
                self._names[name] = label
        return label

    def started(self, name: str, queue: str, waited: Optional[float]) -> None:
        """An attempt starts; ``waited``: seconds since it could first have run, if known."""
        counts = self.queues.get(queue)
        if counts is None:
            counts = self.queues[queue] = dict.fromkeys(("started", *OUTCOMES), 0)
        counts["started"] += 1
        if waited is not None:
            key = (self.label(name), queue)
            histogram = self.wait_time.get(key)
            if histogram is None:
                histogram = self.wait_time[key] = Histogram()
            histogram.observe(waited if waited > 0 else 0.0)

    def ended(self, name: str, queue: str, outcome: str, ran: Optional[float] = None) -> None:
        """An attempt ended in ``outcome`` after running ``ran`` seconds (if it ran)."""
        key = (self.label(name), queue)
        outcome_key = (*key, outcome)
        self.outcomes[outcome_key] = self.outcomes.get(outcome_key, 0) + 1
        counts = self.queues.get(queue)
        if counts is None:
            counts = self.queues[queue] = dict.fromkeys(("started", *OUTCOMES), 0)
        if outcome in counts:
            counts[outcome] += 1
        if ran is not None:
            histogram = self.run_time.get(key)
            if histogram is None:
                histogram = self.run_time[key] = Histogram()
            histogram.observe(ran if ran > 0 else 0.0)

    def per_queue(self) -> Dict[str, Dict[str, int]]:
        """A copy of the per-queue counts, for the worker's beat."""
        return {queue: dict(counts) for queue, counts in self.queues.items()}
