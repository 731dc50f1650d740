"""Which state store a worker builds from its configuration."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from quebert.config import WorkerConfig
from quebert.registry import Registry
from quebert.state import MemoryStateManager, ResilientStateManager
from quebert.state.redis import RedisStateManager
from quebert.worker import WorkerService


class WorkerStateTests(SynchronousTestCase):
    def service(self, **config) -> WorkerService:
        clock = Clock()
        clock.callFromThread = lambda f, *a, **kw: f(*a, **kw)
        service = WorkerService(WorkerConfig(**config), reactor=clock, registry=Registry())
        self.addCleanup(service.executor.stop)
        return service

    def test_memory_state_is_used_directly(self) -> None:
        """The memory store cannot be down: no ResilientStateManager doubles its cost."""
        state = self.service(state="memory").state
        self.assertIsInstance(state, MemoryStateManager)

    def test_redis_state_is_made_resilient(self) -> None:
        """Redis can be down: its writes go through ResilientStateManager."""
        service = self.service(state="redis", redis_url="redis://127.0.0.1:6379/9")
        self.addCleanup(lambda: service._redis.disconnect())
        self.assertIsInstance(service.state, ResilientStateManager)
        self.assertIsInstance(service.state.inner, RedisStateManager)


class WorkerDispatchLogTests(SynchronousTestCase):
    def test_url_dispatcher_logs_at_the_workers_task_log_level(self) -> None:
        """--log-level debug brings back the dispatcher's line per 2xx answer."""
        from twisted.logger import LogLevel

        for name, level in (("debug", LogLevel.debug), ("info", LogLevel.info)):
            clock = Clock()
            service = WorkerService(WorkerConfig(state="memory", log_level=name), reactor=clock,
                                    registry=Registry())
            self.addCleanup(service.executor.stop)
            self.assertEqual(service.dispatcher.task_log_level, level)
