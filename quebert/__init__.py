"""
quebert: a Twisted task queue on RabbitMQ.

The public API; everything not re-exported here is internal.
"""

from quebert._version import __version__
from quebert.client import Client, TaskInfo, get_default_client, set_default_client
from quebert.errors import (
    ConfigurationError,
    InvalidMessage,
    QuebertError,
    ReactorStalled,
    SerializationError,
    TaskTimeout,
    UnknownTask,
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
    "DelayOnErrorMediator",
    "Hook",
    "IBroker",
    "IStateManager",
    "InvalidMessage",
    "Mediator",
    "QuebertError",
    "QueueSettings",
    "ReactorStalled",
    "Registry",
    "RetryPolicy",
    "SerializationError",
    "Task",
    "TaskFunction",
    "TaskInfo",
    "TaskTimeout",
    "UnknownTask",
    "WorkerLost",
    "default_registry",
    "get_default_client",
    "set_default_client",
    "task",
]
