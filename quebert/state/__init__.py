# -*- test-case-name: tests.test_state -*-
"""
The global view of tasks: one record per task, in Redis or in memory.

:class:`IStateManager` is the contract; :class:`RedisStateManager` and
:class:`MemoryStateManager` implement it, and
:class:`ResilientStateManager` wraps either so that an unreachable store
never stops task execution.

The managers are imported on first use (PEP 562): ``quebert.state.redis``
imports txredisapi, which imports ``twisted.internet.reactor``, and
importing quebert must not install a reactor (see ``docs/api.rst``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, List

from quebert.state.interface import (
    CANCELED,
    DUPLICATE,
    FAILED,
    FINISHED_STATES,
    HISTORY_LIMIT,
    INFO_FIELDS,
    OUTCOME_STATES,
    QUEUED,
    RUNNING,
    SCHEDULED,
    STATES,
    SUCCEEDED,
    IStateManager,
)

if TYPE_CHECKING:
    from quebert.state.memory import MemoryStateManager
    from quebert.state.redis import RedisStateManager, connect_redis
    from quebert.state.resilient import ResilientStateManager

_EXPORTS = {
    "MemoryStateManager": "quebert.state.memory",
    "RedisStateManager": "quebert.state.redis",
    "connect_redis": "quebert.state.redis",
    "ResilientStateManager": "quebert.state.resilient",
}

__all__ = [
    "CANCELED",
    "DUPLICATE",
    "FAILED",
    "FINISHED_STATES",
    "HISTORY_LIMIT",
    "INFO_FIELDS",
    "OUTCOME_STATES",
    "QUEUED",
    "RUNNING",
    "SCHEDULED",
    "STATES",
    "SUCCEEDED",
    "IStateManager",
    "MemoryStateManager",
    "RedisStateManager",
    "ResilientStateManager",
    "connect_redis",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'quebert.state' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
