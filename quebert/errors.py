# -*- test-case-name: tests.test_protocol -*-
"""
One exception hierarchy for quebert.

Errors from pika, txredisapi and treq are translated into these at the
adapter boundary, so callers only ever catch ``QuebertError`` subclasses.
Each class says whether retrying could help (``transient``).
"""

from __future__ import annotations

from typing import Optional


class QuebertError(Exception):
    """Base class of every error quebert raises on purpose."""

    #: Whether the same operation may succeed if tried again later.
    transient = False


class ConfigurationError(QuebertError):
    """The worker or client was configured in a way that cannot work."""


class SerializationError(QuebertError, TypeError):
    """A task's arguments (or result) cannot be represented as JSON."""


class InvalidMessage(QuebertError):
    """
    A message taken from a queue cannot be run as a task.

    ``reason`` is a sentence for humans; ``field`` names the offending part
    of the message when there is one; ``task_id`` is set when the message
    was readable enough to carry an id, so the state store can record it.
    """

    def __init__(
        self, reason: str, *, field: Optional[str] = None, task_id: Optional[str] = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.task_id = task_id


class UnknownTask(InvalidMessage):
    """A message names a task that is not registered in this worker."""


class TaskTimeout(QuebertError):
    """A task ran longer than its timeout."""

    transient = True


class WorkerLost(QuebertError):
    """
    An attempt was started but its worker disappeared before finishing it
    (killed, crashed, or stalled and restarted).
    """

    transient = True


class ReactorStalled(WorkerLost):
    """
    An attempt's worker was killed by its reactor-stall watchdog
    (``--auto-kill-timeout``): the reactor did not tick for that long while
    the attempt ran.  ``culprit`` is ``True`` when the attempt's own
    function was on the reactor thread's stack (it blocked the reactor),
    ``False`` when another task's was, ``None`` when the watchdog could not
    tell.
    """

    def __init__(self, attempt: int, stalled_for: float,
                 culprit: Optional[bool] = None) -> None:
        if culprit is None:
            what = f"attempt {attempt} was running when the reactor stalled"
        elif culprit:
            what = f"attempt {attempt} stalled the reactor"
        else:
            what = f"attempt {attempt} was running when another task stalled the reactor"
        super().__init__(f"{what} for {stalled_for:.1f} s (watchdog)")
        self.attempt = attempt
        self.stalled_for = stalled_for
        self.culprit = culprit


class BrokerError(QuebertError):
    """Talking to RabbitMQ failed."""

    transient = True


class PublishError(BrokerError):
    """A publish was not confirmed by the broker."""


class UnroutableError(PublishError):
    """The broker could not route a mandatory publish to any queue."""

    transient = False


class StateError(QuebertError):
    """Talking to the state store failed."""

    transient = True


class Reject(QuebertError):
    """
    Raise from a task to fail it at once: no retry, straight to the errored
    queue with this message as the reason.
    """


class TaskAlreadyExists(QuebertError):
    """
    A task with this unique name is queued, running, or finished within the
    name's tombstone period.  ``task_id`` is the id of the task holding it.
    """

    def __init__(self, name: str, task_id: Optional[str] = None) -> None:
        super().__init__(f"a task named {name!r} already exists"
                         + (f" (task {task_id})" if task_id else ""))
        self.name = name
        self.task_id = task_id


class TaskNotFound(QuebertError):
    """No task with this id is known to the state store."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"no task {task_id!r}")
        self.task_id = task_id


class TaskStateConflict(QuebertError):
    """
    The operation does not apply to the task in its current state (e.g.
    cancelling a task that already succeeded, requeueing one that did not
    fail).  ``state`` is the state it is in.
    """

    def __init__(self, message: str, *, task_id: str, state: Optional[str] = None) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.state = state


class QueueNotFound(QuebertError):
    """No queue of that name is served or known."""

    def __init__(self, queue: str) -> None:
        super().__init__(f"no queue {queue!r}")
        self.queue = queue


class DispatchError(QuebertError):
    """
    A URL task's request failed: a non-2xx answer (``status`` set), a
    connection error or the dispatch deadline passing (``status`` None).

    ``retry_after`` is the delay in seconds the server asked for (429/503
    ``Retry-After``), ``response`` what the attempt history keeps of the
    answer (status, a bounded body prefix, timing).
    """

    transient = True

    def __init__(self, message: str, *, status: Optional[int] = None,
                 retry_after: Optional[float] = None,
                 response: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.response = response or {}


class URLRefused(Reject):
    """
    A URL task's target is refused by the dispatch guardrails (scheme, host
    or network not allowed, request too large).  It is never requested.
    """


class InvalidResult(Reject):
    """
    A task returned a value that cannot be kept as its result: not JSON
    (an object, ``NaN``, a mapping with non-string keys...) or larger than
    the worker's ``max_result_size``.  The attempt fails for good (running
    the task again would return the same kind of value), with this message
    as the reason.
    """


class ProcessLost(QuebertError):
    """
    The worker process running an attempt of a ``executor="process"`` task
    died (a signal, ``os._exit``, out of memory) or was killed by the
    worker (the task's timeout, a cancellation, its memory limit).  The
    message says which; the pool replaces the process.
    """

    transient = True


class TaskFailed(QuebertError):
    """
    What waiting for a task's result raises when the task failed for good:
    the remote error's ``type``, ``message`` and ``traceback`` (strings or
    ``None``), the ``reason`` it failed, the number of ``attempts`` made and
    the whole ``record``.
    """

    def __init__(self, task_id: str, record: dict) -> None:
        error = record.get("error") or {}
        self.task_id = task_id
        self.record = record
        self.type = error.get("type")
        self.message = error.get("message")
        self.traceback = error.get("traceback")
        self.reason = record.get("reason")
        self.attempts = int(record.get("attempts") or 0)
        what = f"{self.type}: {self.message}" if self.type else (self.reason or "failed")
        super().__init__(f"task {task_id} failed after {self.attempts} attempt(s): {what}")


class TaskCanceled(QuebertError):
    """
    What waiting for a task's result raises when the task was canceled;
    ``reason`` says why, ``record`` is the whole record.
    """

    def __init__(self, task_id: str, record: dict) -> None:
        self.task_id = task_id
        self.record = record
        self.reason = record.get("reason")
        super().__init__(f"task {task_id} was canceled"
                         + (f": {self.reason}" if self.reason else ""))


class ResultTimeout(QuebertError, TimeoutError):
    """
    Waiting for a task's result took longer than the ``timeout`` given; the
    task itself goes on.  ``state`` is the state it was last seen in.
    """

    transient = True

    def __init__(self, task_id: str, timeout: float, state: Optional[str] = None) -> None:
        super().__init__(f"task {task_id} did not finish within {timeout:g} s"
                         + (f" (it is {state})" if state else ""))
        self.task_id = task_id
        self.timeout = timeout
        self.state = state
