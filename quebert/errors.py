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
