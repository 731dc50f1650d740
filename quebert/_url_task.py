# -*- test-case-name: tests.test_mediator_url -*-
"""
What is particular to a URL task on the mediator's path.

A URL task runs no function of ours: :data:`URL_DEFINITION` is what the
mediator's machinery (retry policy, hooks) sees of it.  Its attempt is a
request, made by the worker's dispatcher (:class:`quebert.dispatch.URLDispatcher`)
with the ``X-Quebert-*`` headers that tell the target which attempt it
serves (:func:`dispatch`, documented in ``docs/url-tasks.rst``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from quebert import protocol
from quebert.protocol import (
    DEFAULT_DISPATCH_DEADLINE,
    H_EXECUTIONS,
    H_PREVIOUS_RESPONSE,
    URL_TASK,
)
from quebert.registry import REACTOR, TaskDefinition

if TYPE_CHECKING:
    from quebert.mediator import Task

__all__ = ["DEFAULT_DISPATCH_DEADLINE", "URL_DEFINITION", "dispatch"]


def _no_callable(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("URL tasks are dispatched, not called")


#: What the mediator's machinery (retry policy, hooks) sees of URL tasks.
URL_DEFINITION = TaskDefinition(name=URL_TASK, fn=_no_callable, executor=REACTOR)


def dispatch(dispatcher: Any, task: Task, deadline: float) -> defer.Deferred:
    """
    Make ``task``'s request with ``dispatcher``, with the ``X-Quebert-*``
    headers, allowed ``deadline`` seconds; fires with its answer.
    """
    # Imported here: the dispatcher (treq) is loaded only by workers that
    # serve URL tasks.
    from quebert.dispatch import URLRequest

    message = task.message
    headers = task.delivery.headers or {}
    extra = {
        "X-Quebert-QueueName": task.queue,
        "X-Quebert-TaskName": message.name or message.id,
        "X-Quebert-TaskRetryCount": str(task.attempt - 1),
        "X-Quebert-TaskExecutionCount": str(protocol.int_header(headers, H_EXECUTIONS)),
        "X-Quebert-TaskETA": f"{message.eta or message.created_at or task.started_at:.6f}",
    }
    previous = protocol.int_header(headers, H_PREVIOUS_RESPONSE)
    if previous:
        extra["X-Quebert-TaskPreviousResponse"] = str(previous)
    request = URLRequest(url=message.url, method=message.method,
                         headers=dict(message.headers), body=message.body)
    return dispatcher.dispatch(request, queue=task.queue, deadline=deadline,
                               extra_headers=extra)
