"""
Prometheus metrics of a worker, served by its HTTP API at ``GET /metrics``.

Everything is read from the worker's parts when Prometheus scrapes (a
custom collector): the mediator's outcome counters, what it holds, the
state store's health and backlog, the AMQP connections, and the per-task
figures of :class:`quebert.stats.TaskStats` (outcomes per task name and
queue, histograms of run time and of queue wait), which the mediator
keeps in plain dicts for about a microsecond per attempt; nothing else is
added to the path of a task.  The process collectors of ``prometheus_client`` (CPU,
memory, file descriptors, garbage collections) are in the same registry.
Each worker has a registry of its own, never the global one, so that
several workers in one process (tests) do not collide.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "WorkerMetrics"]

#: What happened to deliveries, the mediator's counters (``Mediator.counts``).
OUTCOMES = {
    "succeeded": "the attempt succeeded",
    "retried": "the attempt failed and a retry was scheduled",
    "failed": "the attempt failed and the task went to the errored queue",
    "rejected": "the message could never run (malformed, unknown task...)",
    "canceled": "the task was canceled before or while it ran",
    "skipped": "a before-hook skipped the task",
    "redelivered_settled": "a copy acked because its attempt had already ended",
    "parked": "a copy put aside while another live worker ran its attempt",
    "duplicates": "a copy whose attempt the state store said had started already",
    "unexpected": "the mediator failed on a delivery and returned it to its queue",
}


class _WorkerCollector(Collector):
    def __init__(self, mediator: Any, state: Any,
                 connections: Callable[[], Iterable[Any]]) -> None:
        self.mediator = mediator
        self.state = state
        self.connections = connections

    def collect(self) -> Iterator[Any]:
        mediator = self.mediator
        outcomes = CounterMetricFamily(
            "quebert_deliveries", "Deliveries handled by this worker, by outcome: "
            + "; ".join(f"{name}: {what}" for name, what in OUTCOMES.items()),
            labels=["outcome"])
        counts = mediator.counts
        for name in OUTCOMES:
            outcomes.add_metric([name], counts.get(name, 0))
        yield outcomes
        yield GaugeMetricFamily("quebert_tasks_running", "Attempts running now.",
                                value=len(mediator.running))
        yield GaugeMetricFamily(
            "quebert_deliveries_in_progress",
            "Deliveries this worker is handling (running, or on their way to an outcome).",
            value=len(mediator._inflight))
        yield GaugeMetricFamily(
            "quebert_deliveries_waiting",
            "Deliveries received and waiting for a free slot (max_running_tasks).",
            value=len(mediator._waiting))
        yield GaugeMetricFamily("quebert_max_running_tasks",
                                "Attempts this worker runs at once at most.",
                                value=mediator.max_running_tasks)
        healthy = getattr(self.state, "healthy", None)
        if healthy is not None:
            yield GaugeMetricFamily(
                "quebert_state_store_healthy",
                "1 while the state store answers; 0 while its writes are queued.",
                value=1 if healthy else 0)
            yield GaugeMetricFamily(
                "quebert_state_writes_pending",
                "State writes queued until the state store is back.",
                value=self.state.pending)
        ready = GaugeMetricFamily(
            "quebert_amqp_connection_ready",
            "1 while the AMQP connection is open and set up.", labels=["connection"])
        made = CounterMetricFamily(
            "quebert_amqp_connections",
            "AMQP connections set up since the worker started (more than 1: reconnects).",
            labels=["connection"])
        node = GaugeMetricFamily(
            "quebert_amqp_connection_node",
            "1 for the RabbitMQ node (host:port/vhost) each open AMQP connection is on.",
            labels=["connection", "node"])
        for connection in self.connections():
            name = connection.connection_name
            current = connection.current
            ready.add_metric([name], 1 if current is not None and current.is_open else 0)
            made.add_metric([name], connection.connected_count)
            address = getattr(connection, "connected_node", None)
            if address is not None:
                node.add_metric([name, address], 1)
        yield ready
        yield made
        yield node
        yield from self._process_pool()
        yield from self._tasks()

    def _tasks(self) -> Iterator[Any]:
        """Per task name and queue: outcomes, run time, queue wait (quebert.stats)."""
        stats = getattr(self.mediator, "stats", None)
        if stats is None:
            return
        outcomes = CounterMetricFamily(
            "quebert_task_attempts",
            "Attempts that ended, by task name, queue and outcome (succeeded, retried, "
            "failed, canceled); task names past the worker's cap are counted as (other).",
            labels=["task", "queue", "outcome"])
        for (task, queue, outcome), n in list(stats.outcomes.items()):
            outcomes.add_metric([task, queue, outcome], n)
        yield outcomes
        for name, what, histograms in (
                ("quebert_task_run_seconds",
                 "Seconds attempts ran (start to outcome), by task name and queue.",
                 stats.run_time),
                ("quebert_task_queue_wait_seconds",
                 "Seconds first attempts waited from being published (or their ETA) to "
                 "their start, by task name and queue (producers' clocks: skew shows).",
                 stats.wait_time)):
            family = HistogramMetricFamily(name, what, labels=["task", "queue"])
            for (task, queue), histogram in list(histograms.items()):
                family.add_metric([task, queue], histogram.cumulative(), histogram.sum)
            yield family

    def _process_pool(self) -> Iterator[Any]:
        """The pool of processes (``executor="process"`` tasks), when the worker has one."""
        pool = getattr(getattr(self.mediator, "executor", None), "processes", None)
        if pool is None:
            return
        yield GaugeMetricFamily("quebert_process_pool_size",
                                "Processes the pool for executor='process' tasks keeps.",
                                value=pool.size)
        yield GaugeMetricFamily("quebert_process_pool_processes",
                                "Pool processes alive now (below the size while one is "
                                "being replaced).", value=pool.children)
        yield GaugeMetricFamily("quebert_process_pool_busy",
                                "Pool processes running a task now.", value=pool.busy)
        replaced = CounterMetricFamily(
            "quebert_process_pool_replaced",
            "Pool processes that ended and were replaced, by reason: timeout, canceled, "
            "memory (killed with their task), died (ended on their own), recycled "
            "(max_tasks_per_child), memory_recycled (over the limit after a task).",
            labels=["reason"])
        for reason in ("timeout", "canceled", "memory", "died", "recycled", "memory_recycled"):
            replaced.add_metric([reason], pool.ended.get(reason, 0))
        yield replaced


class WorkerMetrics:
    """
    The metrics registry of one worker.  ``exposition()`` renders it in
    Prometheus's text format (served with :data:`CONTENT_TYPE_LATEST`).
    """

    def __init__(self, mediator: Any, state: Any = None,
                 connections: Optional[Callable[[], Iterable[Any]]] = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_WorkerCollector(mediator, state, connections or (lambda: ())))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def exposition(self) -> bytes:
        """The current figures, in Prometheus's text exposition format."""
        return generate_latest(self.registry)
