# -*- test-case-name: tests.test_api_memory -*-
"""
:class:`MemoryTaskService`: the HTTP API's backend, in process memory.

Nothing runs: tasks are recorded in a
:class:`~quebert.state.memory.MemoryStateManager` and stay ``queued`` (or
``scheduled``) until a test moves them on through :attr:`state` (its
``started``/``finished`` writers, as a worker would).  It keeps the
semantics the HTTP API relies on, so that the API's tests, and users'
tests of their own HTTP clients, exercise every answer:

- named tasks are unique while their record exists (409 otherwise);
- cancel: a queued, scheduled or running task becomes ``canceled``; a
  finished one is a conflict;
- requeue: a ``failed`` task becomes ``queued`` again; any other is a
  conflict;
- queues are those given plus those tasks were sent to; their counts come
  from the records (``ready`` = queued, ``delayed`` = scheduled,
  ``unacked`` = running, ``errored`` = failed); pausing only sets a flag;
- health is ready unless :attr:`ready` (or :attr:`amqp`/:attr:`redis`) is
  set false.

Every method returns an already-fired ``Deferred``.  Nothing global is
registered.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, Optional

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from quebert import protocol
from quebert.api.interfaces import ITaskService
from quebert.errors import (
    ConfigurationError,
    QueueNotFound,
    TaskAlreadyExists,
    TaskNotFound,
    TaskStateConflict,
    UnknownTask,
)
from quebert.retry import RetryPolicy
from quebert.state.interface import (
    FAILED,
    FINISHED_STATES,
    QUEUED,
    RUNNING,
    SCHEDULED,
)
from quebert.state.memory import MemoryStateManager

__all__ = ["MemoryTaskService"]

_LIST_PAGE = 1000


@implementer(ITaskService)
class MemoryTaskService:
    """
    :class:`~quebert.api.interfaces.ITaskService` in memory.

    :param state: where records live; a new ``MemoryStateManager`` on
        ``clock`` when ``None``.
    :param clock: ``IReactorTime`` for timestamps; the global reactor when
        ``None``.
    :param queues: queues known from the start (others appear when a task
        is sent to them).
    :param default_queue: queue of tasks that name none.
    :param tasks: registered task names; when given, other names are
        refused with :class:`~quebert.errors.UnknownTask`.
    """

    def __init__(
        self,
        state: Optional[MemoryStateManager] = None,
        *,
        clock: Optional[IReactorTime] = None,
        queues: Iterable[str] = ("default",),
        default_queue: str = "default",
        tasks: Optional[Iterable[str]] = None,
    ) -> None:
        self._clock = clock
        self.state = state if state is not None else MemoryStateManager(clock=clock)
        self.default_queue = default_queue
        self.tasks = frozenset(tasks) if tasks is not None else None
        self._queues: Dict[str, bool] = {name: False for name in queues}
        self._queues.setdefault(default_queue, False)
        self._names: Dict[str, str] = {}
        #: URL-task extras (url, method) by task id; the state store keeps
        #: only the common record fields.
        self._extra: Dict[str, Dict[str, Any]] = {}
        #: What was published, by task id: the arguments of add_task or
        #: add_url_task, for tests to look at.
        self.published: Dict[str, Dict[str, Any]] = {}
        self._waiter: Any = None
        self.ready = True
        self.amqp = True
        self.redis = True

    # -- ITaskService -----------------------------------------------------

    def add_task(self, task: str, args: list, kwargs: dict, *, queue: Optional[str] = None,
                 countdown: Optional[float] = None, eta: Optional[float] = None,
                 name: Optional[str] = None, retry: Optional[dict] = None,
                 timeout: Optional[float] = None, context: Optional[dict] = None) -> Deferred:
        """Record a call task as published."""
        return maybeDeferred(
            self._add, "call", task, queue, countdown, eta, name, retry,
            {"task": task, "args": list(args), "kwargs": dict(kwargs), "timeout": timeout,
             "context": dict(context or {})},
        )

    def add_url_task(self, url: str, *, method: str = "POST", headers: Optional[dict] = None,
                     body: bytes = b"", queue: Optional[str] = None,
                     countdown: Optional[float] = None, eta: Optional[float] = None,
                     name: Optional[str] = None, retry: Optional[dict] = None,
                     dispatch_deadline: Optional[float] = None,
                     context: Optional[dict] = None) -> Deferred:
        """Record a URL task as published."""
        return maybeDeferred(
            self._add, "url", None, queue, countdown, eta, name, retry,
            {"url": url, "method": method, "headers": dict(headers or {}), "body": body,
             "dispatch_deadline": dispatch_deadline, "context": dict(context or {})},
        )

    def get(self, task_id: str) -> Deferred:
        """Fire with the record, or ``None``."""
        return self.state.get(task_id).addCallback(self._decorate)

    def wait(self, task_id: str, timeout: float) -> Deferred:
        """The record once the task finished, or as it is after ``timeout`` seconds."""
        from quebert.results import ResultWaiter, record_when_settled

        if self._waiter is None:
            self._waiter = ResultWaiter(self.state, self._clock)
        d = record_when_settled(self._waiter.wait(task_id, timeout), self.state.get, task_id)
        return d.addCallback(self._decorate)

    def list(self, state: Optional[str], queue: Optional[str], limit: int,
             offset: int) -> Deferred:
        """Fire with a page of records, most recently updated first."""
        return self.state.list(state, queue, limit, offset).addCallback(
            lambda records: [self._decorate(record) for record in records])

    def cancel(self, task_id: str) -> Deferred:
        """Cancel a task that has not finished."""
        return maybeDeferred(self._cancel, task_id)

    def requeue(self, task_id: str) -> Deferred:
        """Put a failed task back in its queue."""
        return maybeDeferred(self._requeue, task_id)

    def queues(self) -> Deferred:
        """Fire with every known queue and its counts."""
        return maybeDeferred(lambda: [self._queue(name) for name in sorted(self._queues)])

    def pause(self, queue: str) -> Deferred:
        """Mark ``queue`` paused."""
        return maybeDeferred(self._pause, queue, True)

    def resume(self, queue: str) -> Deferred:
        """Mark ``queue`` consumed again."""
        return maybeDeferred(self._pause, queue, False)

    def find(self, task: str, state: Optional[str], queue: Optional[str], limit: int,
             position: int) -> Deferred:
        """Records of one task name, from ``position``."""
        def decorate(found: Any) -> Any:
            records, position = found
            return [self._decorate(r) for r in records], position

        return self.state.find(task, state=state, queue=queue, limit=limit,
                               position=position).addCallback(decorate)

    def overview(self) -> Deferred:
        """Queues, the state store's workers and counts."""
        queues: list = []
        workers: dict = {}
        counts: dict = {}
        self.queues().addCallback(queues.extend)
        self.state.workers().addCallback(workers.update)
        self.state.counts().addCallback(counts.update)
        return succeed({"queues": queues, "workers": workers, "counts": counts})

    def health(self) -> Deferred:
        """Fire with the health flags."""
        return maybeDeferred(lambda: {
            "live": True, "ready": bool(self.ready and self.amqp and self.redis),
            "amqp": bool(self.amqp), "redis": bool(self.redis),
        })

    # -- implementation -------------------------------------------------

    def _now(self) -> float:
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor  # type: ignore[assignment]
        return self._clock.seconds()  # type: ignore[union-attr]

    def _decorate(self, record: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        if record is not None:
            record.update(copy.deepcopy(self._extra.get(record["id"], {})))
        return record

    async def _record(self, task_id: str) -> Dict[str, Any]:
        record = await self.get(task_id)
        if record is None:
            raise TaskNotFound(task_id)
        return record

    async def _add(self, kind: str, task: Optional[str], queue: Optional[str],
                   countdown: Optional[float], eta: Optional[float], name: Optional[str],
                   retry: Optional[dict], published: Dict[str, Any]) -> Dict[str, Any]:
        if task is not None and self.tasks is not None and task not in self.tasks:
            raise UnknownTask(f"task {task!r} is not registered", field="task")
        if countdown is not None and eta is not None:
            raise ConfigurationError("give either countdown or eta, not both")
        if retry:
            try:
                RetryPolicy.from_mapping(retry)
            except ConfigurationError as e:
                e.field = "retry"  # type: ignore[attr-defined]
                raise
        queue = queue or self.default_queue
        if not protocol.QUEUE_RE.fullmatch(queue):
            raise ConfigurationError(f"not a queue name: {queue!r}")
        if name is not None:
            holder = self._names.get(name)
            if holder is not None and await self.state.get(holder) is not None:
                raise TaskAlreadyExists(name, holder)
        now = self._now()
        if countdown is not None:
            eta = now + countdown
        task_id = protocol.new_task_id()
        info = {"queue": queue, "kind": kind, "task": task, "name": name,
                "eta": eta, "created_at": now}
        await self.state.enqueued(task_id, SCHEDULED if eta is not None and eta > now
                                  else QUEUED, info, now)
        if name is not None:
            self._names[name] = task_id
        if kind == "url":
            self._extra[task_id] = {"url": published["url"], "method": published["method"]}
        self._queues.setdefault(queue, False)
        self.published[task_id] = {"kind": kind, "queue": queue, "eta": eta, "name": name,
                                   "retry": dict(retry or {}), **published}
        return await self._record(task_id)

    async def _cancel(self, task_id: str) -> Dict[str, Any]:
        record = await self._record(task_id)
        if record["state"] in FINISHED_STATES:
            raise TaskStateConflict(
                f"task {task_id} is already {record['state']} and cannot be canceled",
                task_id=task_id, state=record["state"])
        await self.state.cancel(task_id, self._now(), "canceled through the API")
        return await self._record(task_id)

    async def _requeue(self, task_id: str) -> Dict[str, Any]:
        record = await self._record(task_id)
        if record["state"] != FAILED:
            raise TaskStateConflict(
                f"task {task_id} is {record['state']}; only failed tasks can be requeued",
                task_id=task_id, state=record["state"])
        await self.state.requeued(task_id, self._now())
        return await self._record(task_id)

    def _pause(self, queue: str, paused: bool) -> Dict[str, Any]:
        if queue not in self._queues:
            raise QueueNotFound(queue)
        self._queues[queue] = paused
        return self._queue(queue)

    def _queue(self, name: str) -> Dict[str, Any]:
        counts = {QUEUED: 0, SCHEDULED: 0, RUNNING: 0, FAILED: 0}
        offset = 0
        while True:
            page = self.state._list(None, name, _LIST_PAGE, offset)
            for record in page:
                if record["state"] in counts:
                    counts[record["state"]] += 1
            if len(page) < _LIST_PAGE:
                break
            offset += _LIST_PAGE
        return {
            "name": name,
            "ready": counts[QUEUED],
            "unacked": counts[RUNNING],
            "delayed": counts[SCHEDULED],
            "errored": counts[FAILED],
            "consumers": 0,
            "paused": self._queues[name],
            "settings": {"retry": RetryPolicy().to_dict()},
        }

