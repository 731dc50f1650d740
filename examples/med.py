"""
The 2009 quebert example in today's API.

Three priority queues (``high``, ``medium``, ``low``) with their own
capacity (see ``examples/config.json``), a ``DelayOnErrorMediator`` whose
hooks log every task, and a flaky task that succeeds after a few failures.

Run a worker on it::

    twistd -n --pidfile= amqp-worker --config examples/config.json

and enqueue the example tasks with ``python -m examples.produce``.
"""

from __future__ import annotations

import threading
import time

from twisted.internet import defer, reactor
from twisted.logger import Logger

from quebert import DelayOnErrorMediator, task

log = Logger(namespace="examples.med")

_failures: dict[str, int] = {}
_lock = threading.Lock()


@task(queue="high")
def add(x: int, y: int) -> int:
    """A plain function: runs in the worker's thread pool."""
    return x + y


@task(queue="medium")
async def greet(name: str, delay: float = 0.1) -> str:
    """An ``async def`` task: runs on the reactor, never blocking it."""
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(delay, d.callback, None)
    await d
    return f"hello, {name}"


@task(queue="medium", min_backoff=1, max_backoff=8, max_attempts=6)
def flaky(key: str, failures: int = 2) -> str:
    """Fails ``failures`` times for ``key`` (in this worker), then succeeds."""
    with _lock:
        seen = _failures.get(key, 0)
        if seen < failures:
            _failures[key] = seen + 1
            raise RuntimeError(f"flaky {key}: failure {seen + 1} of {failures}")
    return f"{key} worked after {failures} failures"


@task(queue="low", max_attempts=3, min_backoff=1)
def always_fails(reason: str = "this task never works") -> None:
    """Spends its three attempts, then lands in low.errored."""
    raise ValueError(reason)


@task(queue="low")
def slow(seconds: float = 1.0) -> float:
    """Sleeps in a thread: the reactor keeps serving other tasks meanwhile."""
    time.sleep(seconds)
    return seconds


class ExampleMediator(DelayOnErrorMediator):
    """A DelayOnErrorMediator whose hooks log around every task."""

    def before_task(self, task):
        log.info("[pre-hook] {task_id} {task}{args} attempt {attempt} on {queue}",
                 task_id=task.id, task=task.name, args=task.args, attempt=task.attempt,
                 queue=task.queue)

    def after_task(self, task, result):
        log.info("[post-hook] {task_id} {task} returned {result!r}", task_id=task.id,
                 task=task.name, result=result)

    def task_failed(self, task, failure):
        log.info("[error-hook] {task_id} {task} attempt {attempt} raised {error}",
                 task_id=task.id, task=task.name, attempt=task.attempt,
                 error=failure.getErrorMessage())
