# -*- test-case-name: tests.test_api_memory -*-
"""
What the HTTP task API needs from the rest of quebert.

:class:`ITaskService` is the whole contract between the HTTP layer
(:mod:`quebert.api.resource`) and whatever publishes, inspects and cancels
tasks: the worker's own service, a standalone API process, or
:class:`quebert.api.memory.MemoryTaskService` in tests.  The HTTP layer
validates every request before calling it, and turns the
:mod:`quebert.errors` exceptions it raises into HTTP status codes (see
``docs/http-api.rst``); any other exception becomes a generic 500.

Every method returns a ``Deferred``.  Records are the state-store records
described in :mod:`quebert.state.interface`; a URL task's record names it ``task``:
``METHOD scheme://host/path`` (no query string, no credentials).
"""

from __future__ import annotations

from typing import Optional

from zope.interface import Interface


class ITaskService(Interface):
    """The operations behind the HTTP task API."""

    def add_task(
        task: str,
        args: list,
        kwargs: dict,
        *,
        queue: Optional[str] = None,
        countdown: Optional[float] = None,
        eta: Optional[float] = None,
        name: Optional[str] = None,
        retry: Optional[dict] = None,
        timeout: Optional[float] = None,
        context: Optional[dict] = None,
    ):
        """
        Publish a call task; fire with its record once the broker has it.

        At most one of ``countdown`` (seconds from now) and ``eta`` (epoch
        seconds) is given.  ``retry`` holds :data:`quebert.retry.RETRY_FIELDS`
        overrides.  ``context`` (already checked, see
        :func:`quebert.protocol.check_context`) travels with the task; the
        API passes it only when the request has one.  Fails with
        :class:`~quebert.errors.TaskAlreadyExists`
        (``name`` taken), :class:`~quebert.errors.UnknownTask`,
        :class:`~quebert.errors.ConfigurationError` or
        :class:`~quebert.errors.SerializationError` (bad options; a
        ``field`` attribute, when set, names the request field at fault) and
        :class:`~quebert.errors.BrokerError` (broker unavailable).
        """

    def add_url_task(
        url: str,
        *,
        method: str = "POST",
        headers: Optional[dict] = None,
        body: bytes = b"",
        queue: Optional[str] = None,
        countdown: Optional[float] = None,
        eta: Optional[float] = None,
        name: Optional[str] = None,
        retry: Optional[dict] = None,
        dispatch_deadline: Optional[float] = None,
        context: Optional[dict] = None,
    ):
        """
        Publish a URL task (an HTTP request the worker makes); fire with its
        record.  Errors as :meth:`add_task`, plus
        :class:`~quebert.errors.URLRefused` when the dispatch guardrails
        refuse the target (its ``field`` attribute, if set, names ``url``
        or ``body``; ``url`` is assumed otherwise).
        """

    def get(task_id: str):
        """Fire with the record of ``task_id``, or ``None`` when it is unknown."""

    def wait(task_id: str, timeout: float):
        """
        Fire with the record of ``task_id`` once it is finished
        (``succeeded``, ``failed`` or ``canceled``; at once if it is), or
        as it is when ``timeout`` seconds have passed; with ``None`` when
        it is unknown.  Cancelling the Deferred stops waiting.
        """

    def list(state: Optional[str], queue: Optional[str], limit: int, offset: int):
        """
        Fire with up to ``limit`` records, skipping the first ``offset``,
        most recently updated first, optionally only those in ``state``
        and/or ``queue``.
        """

    def cancel(task_id: str):
        """
        Cancel a task; fire with its record (``canceled``, or still
        ``running`` when cancellation was requested from a worker).  Fails
        with :class:`~quebert.errors.TaskNotFound` and
        :class:`~quebert.errors.TaskStateConflict` (already finished).
        """

    def requeue(task_id: str):
        """
        Put a failed task back in its queue; fire with its record.  Fails
        with :class:`~quebert.errors.TaskNotFound` and
        :class:`~quebert.errors.TaskStateConflict` (not failed, or no
        longer in the errored queue).
        """

    def queues():
        """
        Fire with a list of queues, each ``{"name", "ready", "unacked",
        "delayed", "errored", "consumers", "paused", "settings": {...}}``
        (counts may be ``None`` when unknown).
        """

    def pause(queue: str):
        """
        Stop consuming ``queue``; fire with its queue dict.  Fails with
        :class:`~quebert.errors.QueueNotFound`.
        """

    def resume(queue: str):
        """Consume ``queue`` again; fire with its queue dict (as :meth:`pause`)."""

    def find(task: str, state: Optional[str], queue: Optional[str], limit: int,
             position: int):
        """
        Fire with ``(records, next_position)``: records of the task named
        ``task`` (and in ``state``/``queue`` if given), most recently
        updated first, from ``position`` in the index walked;
        ``next_position`` is ``None`` at the end (see
        :meth:`quebert.state.interface.IStateManager.find`).
        """

    def overview():
        """
        Fire with what the console shows: ``{"queues": [queue dicts as
        queues() gives them], "workers": {worker id: its last beat's
        description}, "counts": {state: records}}``.
        """

    def health():
        """
        Fire with ``{"live": True, "ready": bool, "amqp": bool, "redis":
        bool}``; the API answers 200 when ``ready`` and 503 otherwise.
        """
