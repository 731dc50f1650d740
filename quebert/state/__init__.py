# -*- test-case-name: tests.test_state -*-
"""
The global view of tasks: one record per task, in Redis or in memory.

:class:`IStateManager` is the contract; :class:`RedisStateManager` and
:class:`MemoryStateManager` implement it, and
:class:`ResilientStateManager` wraps either so that an unreachable store
never stops task execution.
"""

from quebert.state.interface import (
    CANCELED,
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
from quebert.state.memory import MemoryStateManager
from quebert.state.redis import RedisStateManager, connect_redis
from quebert.state.resilient import ResilientStateManager

__all__ = [
    "CANCELED",
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
