"""
quebert: a Twisted task queue on RabbitMQ.

The public API; everything not re-exported here is internal.

Importing quebert never installs a Twisted reactor: an application picks
its reactor after its imports (``asyncioreactor.install()``), and a
Guillotina process loads the bridge without running Twisted at all.  So
the names below are resolved on first use (PEP 562): ``from quebert import
task`` imports :mod:`quebert.registry` only, and just the names whose
module needs pika's or txredisapi's Twisted adapters (``Client``,
``TaskInfo``, ``get_default_client``, ``set_default_client``) import
those, and with them ``twisted.internet.reactor``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, List

from quebert._version import __version__

if TYPE_CHECKING:
    from quebert.client import Client, TaskInfo, get_default_client, set_default_client
    from quebert.current import CurrentTask, current_task
    from quebert.errors import (
        ConfigurationError,
        DispatchError,
        InvalidMessage,
        InvalidResult,
        ProcessLost,
        QuebertError,
        QueueNotFound,
        ReactorStalled,
        Reject,
        ResultTimeout,
        SerializationError,
        TaskAlreadyExists,
        TaskCanceled,
        TaskFailed,
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

#: Where each public name lives; :func:`__getattr__` imports it from there.
_EXPORTS = {
    "Client": "quebert.client",
    "TaskInfo": "quebert.client",
    "get_default_client": "quebert.client",
    "set_default_client": "quebert.client",
    "CurrentTask": "quebert.current",
    "current_task": "quebert.current",
    "ConfigurationError": "quebert.errors",
    "DispatchError": "quebert.errors",
    "InvalidMessage": "quebert.errors",
    "InvalidResult": "quebert.errors",
    "ProcessLost": "quebert.errors",
    "ResultTimeout": "quebert.errors",
    "TaskCanceled": "quebert.errors",
    "TaskFailed": "quebert.errors",
    "QuebertError": "quebert.errors",
    "QueueNotFound": "quebert.errors",
    "ReactorStalled": "quebert.errors",
    "Reject": "quebert.errors",
    "SerializationError": "quebert.errors",
    "TaskAlreadyExists": "quebert.errors",
    "TaskNotFound": "quebert.errors",
    "TaskStateConflict": "quebert.errors",
    "TaskTimeout": "quebert.errors",
    "UnknownTask": "quebert.errors",
    "URLRefused": "quebert.errors",
    "WorkerLost": "quebert.errors",
    "IBroker": "quebert.interfaces",
    "IStateManager": "quebert.interfaces",
    "DelayOnErrorMediator": "quebert.mediator",
    "Hook": "quebert.mediator",
    "Mediator": "quebert.mediator",
    "QueueSettings": "quebert.mediator",
    "Task": "quebert.mediator",
    "Registry": "quebert.registry",
    "TaskFunction": "quebert.registry",
    "default_registry": "quebert.registry",
    "task": "quebert.registry",
    "RetryPolicy": "quebert.retry",
}

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
    "InvalidResult",
    "Mediator",
    "ProcessLost",
    "QuebertError",
    "QueueNotFound",
    "QueueSettings",
    "ReactorStalled",
    "Reject",
    "Registry",
    "ResultTimeout",
    "RetryPolicy",
    "SerializationError",
    "Task",
    "TaskAlreadyExists",
    "TaskCanceled",
    "TaskFailed",
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'quebert' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
