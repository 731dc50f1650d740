# -*- test-case-name: tests.test_current -*-
"""
:func:`current_task`: what a running task may know about itself.

A task function sometimes needs its own id (to log it, to name what it
writes) or the context it was enqueued with (the Guillotina bridge puts
the database, container and user there) without taking them as arguments.
The mediator sets a :class:`contextvars.ContextVar` to the running
:class:`~quebert.mediator.Task` before the attempt starts; the executor
runs ``async def`` and Deferred-returning functions in that context on the
reactor and carries a copy of it into the thread of a thread task.  Only
the ``Task`` is stored (no object is built per task on the hot path);
:func:`current_task` builds the small frozen view when asked.
"""

from __future__ import annotations

import contextvars
import types
from typing import Any, Mapping, Optional

import attrs

__all__ = ["CurrentTask", "current_task"]

#: The running call task (a :class:`quebert.mediator.Task`).  Set by the
#: mediator once per attempt, in the delivery's own context; in a process
#: pool child, set to the :class:`CurrentTask` the worker sent with the call.
running_task: contextvars.ContextVar[Any] = contextvars.ContextVar("quebert.running_task")


@attrs.frozen
class CurrentTask:
    """The running task, as its function sees it.  A snapshot: read-only."""

    #: The task id.
    id: str
    #: The registered name the task runs under (an alias resolved).
    name: str
    #: The work queue it was consumed from.
    queue: str
    #: This attempt's number, 1 for the first.
    attempt: int
    #: Plain data about where it was enqueued from (the message's
    #: ``context``), read-only; empty when the producer gave none.
    context: Mapping[str, Any]
    #: The optional unique name it was enqueued with.
    unique_name: Optional[str] = None
    #: ``"quebert"``, or ``"guillotina"`` for a guillotina_amqp message.
    origin: str = "quebert"


def current_task() -> CurrentTask:
    """
    The task being run, when called from its function: in an ``async def``
    or ``inlineCallbacks`` task, in a thread task, in a process task (in
    its pool process), or in the code a
    Deferred-returning task runs before it returns (a callback the reactor
    fires later runs outside the task: read it first).  Also from hooks
    that run after it started.

    Raises :class:`RuntimeError` anywhere else.
    """
    task = running_task.get(None)
    if task is None:
        raise RuntimeError(
            "quebert.current_task() was called outside a running task: call it from a "
            "task function while a worker runs it (in a thread task, from the task's own "
            "thread)")
    if isinstance(task, CurrentTask):
        return task  # in a process pool child (quebert.process.child)
    message = task.message
    return CurrentTask(id=task.id, name=task.name, queue=task.queue, attempt=task.attempt,
                       context=types.MappingProxyType(message.context),
                       unique_name=message.name, origin=message.origin)
