"""
quebert: a Twisted task queue on RabbitMQ.

The public API; everything not re-exported here is internal.

Importing quebert never installs a Twisted reactor: an application picks
its reactor after its imports (``asyncioreactor.install()``), and a
Guillotina process loads the bridge without running Twisted at all.  So
the names below are resolved on first use (PEP 562): ``from quebert import
task`` imports :mod:`quebert.registry` (and what the package itself
imports, below: the protocol and its legacy decoder), and just the names whose
module needs pika's or txredisapi's Twisted adapters (``Client``,
``TaskInfo``, ``get_default_client``, ``set_default_client``) import
those, and with them ``twisted.internet.reactor``.

The package also wires two things that lower modules must not import
themselves, since they are built on them (any ``import quebert.x`` runs
this first):

* :mod:`quebert.legacy`, which registers the guillotina_amqp decoder with
  :func:`quebert.protocol.decode`: every process that decodes messages
  then reads that format, whoever imported the protocol;
* the factory of the default client (:mod:`quebert._default_client`),
  which calling a ``@task`` function publishes through: the registry
  looks the client up there, without importing :mod:`quebert.client`
  (which imports the registry).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, List

from quebert import _default_client, legacy  # noqa: F401  (legacy: registers its decoder)
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


def _client_from_environment() -> Any:
    """The default client when none was set: ``Client($QUEBERT_AMQP_URL)``."""
    # Imported on first use: the client module brings pika's and
    # txredisapi's Twisted adapters, which importing quebert must not.
    from quebert.client import client_from_environment

    return client_from_environment()


_default_client.set_factory(_client_from_environment)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'quebert' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
