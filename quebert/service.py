# -*- test-case-name: tests.test_api_live -*-
"""
The task service behind the HTTP API: a :class:`~quebert.Client` (to
publish, cancel, requeue, pause) and the state store (to read), as one
:class:`~quebert.api.interfaces.ITaskService`.

It runs in the worker (``twistd amqp-worker --http-port``) or on its own
(``twistd quebert-api``).  Queue depths come from two places, named in
``docs/http-api.rst``: ``ready`` and ``consumers`` from RabbitMQ (a
passive declare), ``errored`` from the errored queue the same way, and
``unacked`` (tasks running) and ``delayed`` (tasks waiting for a retry or
an ETA) from the state store's indexes, because AMQP does not report
unacked counts and the delay queues are shared by every work queue.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from quebert.api.interfaces import ITaskService
from quebert.client import Client
from quebert.errors import QueueNotFound, UnknownTask
from quebert.registry import Registry
from quebert.results import record_when_settled
from quebert.state.interface import RUNNING, SCHEDULED

log = Logger(namespace="quebert.service")

#: Most records counted per state and queue for ``unacked``/``delayed``.
COUNT_LIMIT = 1000


@implementer(ITaskService)
class TaskService:
    """
    :param client: publishes; must have a state store.
    :param queues: ``{name: settings dict}`` of the queues to report (the
        worker's queues and their settings); other queues exist too, but
        only these are listed by ``GET /queues``.
    :param registry: when it holds tasks, call tasks must name one of them.
    :param readiness: extra ``() -> bool`` checks (e.g. the worker's own
        AMQP consumer connection) for ``/health``.
    :param connections: ``() -> AMQP connections`` whose broker node
        ``/health`` names (the client's own are always named).
    """

    def __init__(self, client: Client, *, queues: dict, registry: Optional[Registry] = None,
                 redis_ping: Any = None, readiness: Iterable[Any] = (),
                 connections: Any = None) -> None:
        if client.state is None:
            raise ValueError("the task service needs a Client with a state store")
        self.client = client
        self.state = client.state
        self.queue_settings = dict(queues)
        self.registry = registry
        self.redis_ping = redis_ping
        self.readiness = list(readiness)
        self.connections = connections or (lambda: ())

    # -- tasks ------------------------------------------------------------------

    def add_task(self, task: str, args: list, kwargs: dict, *, queue: Optional[str] = None,
                 countdown: Optional[float] = None, eta: Optional[float] = None,
                 name: Optional[str] = None, retry: Optional[dict] = None,
                 timeout: Optional[float] = None,
                 context: Optional[dict] = None) -> defer.Deferred:
        return defer.ensureDeferred(self._add_task(task, args, kwargs, queue, countdown, eta,
                                                   name, retry, timeout, context))

    async def _add_task(self, task: str, args: list, kwargs: dict, queue: Optional[str],
                        countdown: Optional[float], eta: Optional[float], name: Optional[str],
                        retry: Optional[dict], timeout: Optional[float],
                        context: Optional[dict]) -> dict:
        if self.registry is not None and len(self.registry):
            definition = self.registry.lookup(task)
            if definition is None:
                raise UnknownTask(f"task {task!r} is not registered", field="task")
            definition.bind(tuple(args), kwargs)
        info = await self.client.add_task(task, *args, _queue=queue, _countdown=countdown,
                                          _eta=eta, _name=name, _retry=retry,
                                          _timeout=timeout, _context=context, **kwargs)
        return await self._record_of(info)

    def add_url_task(self, url: str, *, method: str = "POST", headers: Optional[dict] = None,
                     body: bytes = b"", queue: Optional[str] = None,
                     countdown: Optional[float] = None, eta: Optional[float] = None,
                     name: Optional[str] = None, retry: Optional[dict] = None,
                     dispatch_deadline: Optional[float] = None,
                     context: Optional[dict] = None) -> defer.Deferred:
        return defer.ensureDeferred(self._add_url_task(
            url, method, headers, body, queue, countdown, eta, name, retry, dispatch_deadline,
            context))

    async def _add_url_task(self, url: str, method: str, headers: Optional[dict], body: bytes,
                            queue: Optional[str], countdown: Optional[float],
                            eta: Optional[float], name: Optional[str], retry: Optional[dict],
                            dispatch_deadline: Optional[float],
                            context: Optional[dict]) -> dict:
        info = await self.client.add_url_task(
            url, method=method, headers=headers, body=body, queue=queue, countdown=countdown,
            eta=eta, name=name, retry=retry, dispatch_deadline=dispatch_deadline,
            context=context)
        return await self._record_of(info)

    async def _record_of(self, info: Any) -> dict:
        try:
            record = await self.state.get(info.id)
        except Exception as e:
            log.warn("task {task_id} published but its record cannot be read: {error}",
                     task_id=info.id, error=e)
            record = None
        if record is None:
            # Published; the record could not be written or read back.
            record = {"id": info.id, "state": "scheduled" if info.eta else "queued",
                      "queue": info.queue, "task": info.task, "name": info.name,
                      "eta": info.eta, "attempts": 0, "history": []}
        return record

    def get(self, task_id: str) -> defer.Deferred:
        return self.state.get(task_id)

    def wait(self, task_id: str, timeout: float) -> defer.Deferred:
        """The record once the task finished, or as it is after ``timeout`` seconds."""
        return record_when_settled(self.client.wait(task_id, timeout), self.state.get, task_id)

    def find(self, task: str, state: Optional[str], queue: Optional[str], limit: int,
             position: int) -> defer.Deferred:
        return self.state.find(task, state=state, queue=queue, limit=limit, position=position)

    def overview(self) -> defer.Deferred:
        return defer.ensureDeferred(self._overview())

    async def _overview(self) -> dict:
        workers: dict = {}
        counts: dict = {}
        try:
            workers = await self.state.workers()
            counts = await self.state.counts()
        except Exception as e:
            log.warn("workers and counts cannot be read: {error}", error=e)
        return {"queues": await self._queues(), "workers": workers, "counts": counts}

    def list(self, state: Optional[str], queue: Optional[str], limit: int,
             offset: int) -> defer.Deferred:
        return self.state.list(state=state, queue=queue, limit=limit, offset=offset)

    def cancel(self, task_id: str) -> defer.Deferred:
        return defer.ensureDeferred(self.client.cancel(task_id, "canceled through the API"))

    def requeue(self, task_id: str) -> defer.Deferred:
        return defer.ensureDeferred(self.client.requeue(task_id))

    # -- queues -----------------------------------------------------------------

    def queues(self) -> defer.Deferred:
        return defer.ensureDeferred(self._queues())

    async def _queues(self) -> list:
        paused = await self._paused()
        return [await self._queue(name, paused) for name in sorted(self.queue_settings)]

    async def _paused(self) -> set:
        try:
            return set(await self.state.paused_queues())
        except Exception as e:
            log.warn("paused queues cannot be read: {error}", error=e)
            return set()

    async def _count(self, state: str, queue: str) -> Optional[int]:
        try:
            return len(await self.state.list(state=state, queue=queue, limit=COUNT_LIMIT))
        except Exception:
            return None

    async def _depth(self, queue: str) -> tuple:
        try:
            return await self.client.admin.depth(queue) or (None, None)
        except Exception as e:
            log.warn("depth of queue {queue} cannot be read: {error}", queue=queue, error=e)
            return (None, None)

    async def _queue(self, name: str, paused: set) -> dict:
        ready, consumers = await self._depth(name)
        errored, _ = await self._depth(self.client.topology.errored_queue(name))
        return {
            "name": name,
            "ready": ready,
            "unacked": await self._count(RUNNING, name),
            "delayed": await self._count(SCHEDULED, name),
            "errored": errored,
            "consumers": consumers,
            "paused": name in paused,
            "settings": self.queue_settings[name],
        }

    def _known(self, queue: str) -> None:
        if queue not in self.queue_settings:
            raise QueueNotFound(queue)

    def pause(self, queue: str) -> defer.Deferred:
        return defer.ensureDeferred(self._pause(queue, True))

    def resume(self, queue: str) -> defer.Deferred:
        return defer.ensureDeferred(self._pause(queue, False))

    async def _pause(self, queue: str, paused: bool) -> dict:
        self._known(queue)
        if paused:
            await self.client.pause(queue)
        else:
            await self.client.resume(queue)
        return await self._queue(queue, await self._paused())

    # -- health -------------------------------------------------------------------

    def health(self) -> defer.Deferred:
        return defer.ensureDeferred(self._health())

    async def _health(self) -> dict:
        amqp = all(c.current is not None and c.current.is_open
                   for c in self.client.broker.connections()) and all(
            check() for check in self.readiness)
        redis = False
        if self.redis_ping is not None:
            try:
                await self.redis_ping()
                redis = True
            except Exception:
                redis = False
        nodes = {c.connection_name: c.connected_node
                 for c in [*self.connections(), *self.client.broker.connections()]}
        return {"live": True, "ready": amqp and redis, "amqp": amqp, "redis": redis,
                "nodes": nodes}
