"""
The state store contract: one record per task, written atomically.

A record is a JSON-ready ``dict``::

    {
      "id": "5f0c...",
      "state": "queued" | "scheduled" | "running" | "succeeded" | "failed" | "canceled",
      "queue": "default", "kind": "call", "task": "app.tasks.add", "name": None,
      "attempts": 2,                 # attempts started so far
      "created_at": 1767225590.0, "updated_at": ..., "eta": None or epoch,
      "started_at": ... or None,     # start of the latest attempt
      "finished_at": ... or None,    # set for succeeded/failed/canceled
      "worker": "host:pid" or None,  # worker of the latest attempt
      "result": <JSON value> or None,
      "error": {"type": ..., "message": ..., "traceback": ...} or None,
      "reason": "sentence" or None,  # why it failed / was canceled
      "cancel_requested": epoch or None,  # when a cancel was asked for
      "history": [                   # the latest HISTORY_LIMIT attempts, oldest first
        {"attempt": 1, "state": "scheduled", "worker": ..., "started_at": ...,
         "finished_at": ..., "error": {...} or None, "retry_at": ... or None},
      ],
      # only on a record whose task was running when the reactor-stall
      # watchdog killed its worker (the latest such stall):
      "stalled": {"attempt": 2, "at": epoch, "for": seconds, "culprit": True/False/None},
    }

``info`` mappings passed to the writers carry task metadata (``queue``,
``kind``, ``task``, ``name``, ``eta``, ``created_at``); a writer creates the
record when it does not exist yet, so any write may be the first one a
task gets (producers without a state store, messages from other
languages).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from zope.interface import Attribute, Interface

QUEUED = "queued"
SCHEDULED = "scheduled"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELED = "canceled"

#: What ``started`` fires with for an attempt that had already started
#: (or a later one): not a state, the answer that the caller holds a
#: second copy of the task.
DUPLICATE = "duplicate"

STATES = (QUEUED, SCHEDULED, RUNNING, SUCCEEDED, FAILED, CANCELED)
#: States after which a record expires (after the finished TTL).
FINISHED_STATES = frozenset({SUCCEEDED, FAILED, CANCELED})
#: States ``finished`` may record.
OUTCOME_STATES = frozenset({SCHEDULED, SUCCEEDED, FAILED, CANCELED})

HISTORY_LIMIT = 20
INFO_FIELDS = ("queue", "kind", "task", "name", "eta", "created_at")


class IStateManager(Interface):
    """
    Where the global view of tasks lives.  Every method returns a
    ``Deferred``; writers fire with ``None`` once the write is durable in
    the store.
    """

    finished_ttl = Attribute("Seconds a finished record is kept (0: forever).")

    def enqueued(task_id: str, state: str, info: Mapping[str, Any], at: float):
        """
        Record a task a producer just published: ``state`` is ``queued``
        or ``scheduled`` (it has an ETA).  Does nothing to a record that
        already exists, so a late producer write never rewinds a task a
        worker has already advanced.
        """

    def started(task_id: str, attempt: int, worker: str, info: Mapping[str, Any], at: float):
        """
        Attempt number ``attempt`` (1-based) starts on ``worker``: state
        ``running``, ``attempts = attempt``, ``started_at = at``, and a new
        history entry.  Atomic: a crash leaves either all or nothing.

        Fires with ``None``, or with ``CANCELED`` when the task was
        canceled (or its cancellation asked for while a previous attempt
        ran): then nothing starts, the record ends ``canceled`` and the
        caller must not run the task; or with ``DUPLICATE`` when the record
        shows this attempt (or a later one) started already: nothing is
        written, and the caller holds a second copy of the task, which it
        must settle from the record rather than run.  (A store that cannot
        answer at once, such as a Redis store in an outage, fires with
        ``None`` and writes later; a late ``started`` never rewinds a
        record.)
        """

    def claim(task_id: str, state: str, info: Mapping[str, Any], at: float):
        """
        ``enqueued`` for a task with a unique name ``info["name"]``, atomic
        with taking the name: fails with
        :class:`~quebert.errors.TaskAlreadyExists` when another task holds
        it.  A name is held while its task is live and for
        ``name_tombstone`` seconds after it finished.
        """

    def release_name(task_id: str, name: str, at: float):
        """Free ``name`` if ``task_id`` holds it (its task was never published)."""

    def cancel(task_id: str, at: float, reason: Optional[str] = None):
        """
        Cancel a task.  Fires with the state it was in, or ``None`` when no
        record exists.  ``queued`` and ``scheduled`` tasks become
        ``canceled`` at once; a ``running`` one gets ``cancel_requested``
        and ends ``canceled`` when its attempt is recorded (unless it
        succeeded or failed for good meanwhile); finished tasks are left
        as they are.
        """

    def finished(
        task_id: str,
        state: str,
        attempt: int,
        info: Mapping[str, Any],
        at: float,
        result: Any = None,
        error: Optional[Mapping[str, Any]] = None,
        reason: Optional[str] = None,
        retry_at: Optional[float] = None,
    ):
        """
        Attempt ``attempt`` ended in ``state`` (one of ``OUTCOME_STATES``).

        ``scheduled`` means a retry at ``retry_at`` (stored as ``eta``);
        the terminal states set ``finished_at`` and make the record expire
        after ``finished_ttl``.  The history entry of that attempt gets the
        outcome (one is added when the attempt never started, e.g. a
        message refused before running).  ``attempts`` becomes
        ``max(attempts, attempt)``.
        """

    def requeued(task_id: str, at: float):
        """
        A ``failed`` task was put back in its queue: ``queued`` again, its
        outcome fields cleared, attempts and history kept, its unique name
        live again.  Fires with the state it was in (``None``: no record);
        any other state is left alone.
        """

    def set_paused(queue: str, paused: bool):
        """Remember that ``queue`` is paused (or resumed), for workers started later too."""

    def worker_beat(worker: str, ttl: float, description=None):
        """
        ``worker`` (``host:pid``) is alive for ``ttl`` more seconds; 0 says
        it stopped.  Workers beat every few seconds, so that a worker that
        meets a redelivered task still ``running`` elsewhere can tell a
        dead worker from a live one that lost its broker connection.
        """

    def workers():
        """
        Fire with ``{worker: description}`` for the workers whose beat still
        lasts: what each last beat described (host, pid, queues, counts...,
        ``{}`` when it sent nothing) plus ``expires_in`` seconds.  For the
        console; a store may leave it out.
        """

    def find(task: str, state: Optional[str] = None, queue: Optional[str] = None,
             limit: int = 100, position: int = 0):
        """
        Fire with ``(records, next_position)``: records of task name
        ``task`` (and ``state``/``queue`` if given), most recently updated
        first, from ``position`` in the index walked, a bounded number of
        index entries examined per call (a page may be short);
        ``next_position`` is ``None`` at the end.  For the console, may be
        left out.
        """

    def counts():
        """Fire with ``{state: number of records}``; for the console, may be left out."""

    def worker_alive(worker: str):
        """Fire with the seconds ``worker``'s last beat still lasts (0: it is gone)."""

    def paused_queues():
        """Fire with the set of paused queue names."""

    def get(task_id: str):
        """Fire with the record (see module docstring) or ``None``."""

    def list(state: Optional[str] = None, queue: Optional[str] = None, limit: int = 100,
             offset: int = 0):
        """
        Fire with up to ``limit`` records, most recently updated first,
        optionally only those in ``state`` and/or ``queue``.  Uses indexes,
        never a scan of the keyspace.
        """


class ISettledFeed(Interface):
    """
    What a state store that can tell waiters about settled tasks provides
    (:class:`~quebert.results.ResultWaiter` needs it): the Redis store
    through pub/sub, the memory store in process.
    """

    def watch_settled(on_settled, on_subscribed):
        """
        Start telling ``on_settled(ids)`` the ids of tasks that reached a
        finished state (``succeeded``, ``failed``, ``canceled``) from now
        on, and ``on_subscribed()`` each time the feed is (re)established,
        after which anything settled while it was down must be read again.
        Returns a watch with ``when_ready()`` (a Deferred firing once the
        feed is live) and ``stop()`` (a Deferred firing once it is closed).
        """
