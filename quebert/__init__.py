"""
quebert: a Twisted task queue on RabbitMQ.

The public API; everything not re-exported here is internal.
"""

from quebert._version import __version__
from quebert.client import Client, TaskInfo, get_default_client, set_default_client
from quebert.current import CurrentTask, current_task
from quebert.errors import (
    ConfigurationError,
    DispatchError,
    InvalidMessage,
    QuebertError,
    QueueNotFound,
    ReactorStalled,
    Reject,
    SerializationError,
    TaskAlreadyExists,
    TaskNotFound,
    TaskStateConflict,
    TaskTimeout,
    UnknownTask,
    URLRefused,
    WorkerLost,
)
from quebert.interfaces import IBroker, IStateManager
from quebert.mediator import DelayOnErrorMediator, Hook, Mediator, QueueSettings, Task
from quebert.registry import Registry, TaskFunction, default_registry, task
from quebert.retry import RetryPolicy

__all__ = [
    "__version__",
    "Client",
    "ConfigurationError",
    "CurrentTask",
    "DelayOnErrorMediator",
    "DispatchError",
    "Hook",
    "IBroker",
    "IStateManager",
    "InvalidMessage",
    "Mediator",
    "QuebertError",
    "QueueNotFound",
    "QueueSettings",
    "ReactorStalled",
    "Reject",
    "Registry",
    "RetryPolicy",
    "SerializationError",
    "Task",
    "TaskAlreadyExists",
    "TaskFunction",
    "TaskInfo",
    "TaskNotFound",
    "TaskStateConflict",
    "TaskTimeout",
    "URLRefused",
    "UnknownTask",
    "WorkerLost",
    "current_task",
    "default_registry",
    "get_default_client",
    "set_default_client",
    "task",
]
