# -*- test-case-name: tests.test_worker -*-
"""
The worker as a Twisted service: broker + state + executor + mediator.

(Over 700 lines: it wires every part of a worker from its configuration,
and says at start-up what the configuration implies.)

Stop order matters and ``MultiService`` stops its children all at once, so
``WorkerService.stopService`` drains the mediator first (no new tasks,
running ones get ``shutdown_timeout`` seconds), then flushes pending state
writes, and only then closes the connections.  Tasks still running at that
point stay unacked and the broker redelivers them.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
import signal
import socket
import sys
from typing import Any, Callable, Optional

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ReactorNotRunning
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.reflect import namedAny

from quebert._defer import bounded
from quebert._version import __version__
from quebert.amqp.admin import BrokerAdmin
from quebert.amqp.broker import AMQPBroker
from quebert.amqp.stuck import StuckConsumerCheck
from quebert.amqp.topology import Topology
from quebert.config import WorkerConfig, api_config
from quebert.errors import ConfigurationError
from quebert.executor import Executor
from quebert.exitcodes import (
    EXIT_BROKER_REFUSED,
    EXIT_OK,
    EXIT_REACTOR_STALLED,
    EXIT_SIGNAL_BASE,
    EXIT_STUCK_CONNECTION,
    EXIT_USAGE,
)
from quebert.mediator import Mediator, QueueSettings
from quebert.registry import PROCESS, Registry, default_registry
from quebert.state import MemoryStateManager, RedisStateManager, ResilientStateManager
from quebert.state.redis import connect_redis
from quebert.watchdog import ReactorWatchdog, RedisStallMarker

log = Logger(namespace="quebert.worker")

#: This machine's name, as workers' beats tell the console.
_HOST = socket.gethostname()

#: Seconds between two worker beats in the state store, and how long one lasts.
BEAT_INTERVAL = 1.0
BEAT_TTL = 3.0

#: Allocations of container objects between two young-generation collections
#: (Python's default is 700).
GC_THRESHOLD = 10000


def tune_gc() -> None:
    """
    Make Python's cyclic garbage collector cheaper for a worker process.

    Every task allocates short-lived Deferreds, coroutines and dicts that
    reference counting frees; with the default threshold the collector runs
    every 700 of them and keeps rescanning the whole start-up heap (modules,
    Twisted, pika), which cost about 10 us of CPU per task.  So: freeze what
    exists now (it lives as long as the process anyway) and collect the
    young generation less often.  Garbage cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    threshold = gc.get_threshold()
    if threshold[0] < GC_THRESHOLD:
        gc.set_threshold(GC_THRESHOLD, *threshold[1:])


def exit_after_shutdown(code: int) -> None:
    """
    Make the process exit with ``code`` once twistd has shut down
    (twistd itself always exits 0 after a normal reactor stop).
    """
    def _exit() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)

    atexit.register(_exit)


def import_tasks(modules: list[str]) -> None:
    """Import the modules that register tasks, with errors a human can act on."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigurationError(f"cannot import tasks module {name!r}: {e}")
        except Exception as e:
            raise ConfigurationError(f"importing tasks module {name!r} failed: {e!r}")


def apply_legacy_tasks(registry: Registry, legacy_tasks: dict) -> None:
    """
    Declare the config's ``legacy_tasks`` as aliases in ``registry``, once
    the tasks are imported: a legacy name pointing to a task nobody
    registered is a :class:`ConfigurationError` at start-up, not a refused
    message later.
    """
    for old, new in legacy_tasks.items():
        try:
            registry.alias(old, new)
        except ConfigurationError as e:
            raise ConfigurationError(f"legacy_tasks: {e}") from None


def warn_without_tasks(topology: Topology, queues: list) -> None:
    """
    Say what a worker with no registered task does (``--tasks`` forgotten,
    or a worker meant for URL tasks only): it runs URL tasks, and refuses
    every message naming a task, as the mediator refuses an unknown name.
    """
    log.warn(
        "no tasks are registered (pass --tasks MODULE to run call tasks): this worker runs "
        "URL tasks only. A message naming a task (a call task, or a guillotina_amqp body) "
        "is refused as 'not registered in this worker': it is not retried, it is moved "
        "to its queue's errored queue ({errored}) with the reason in its headers, and "
        "its state is recorded 'failed'",
        errored=", ".join(topology.errored_queue(q.name) for q in queues))


def process_pool(config: WorkerConfig, registry: Registry, reactor: Any) -> Any:
    """
    The pool of processes for the ``executor="process"`` tasks of
    ``registry`` (:class:`quebert.process.TaskProcessPool`), or ``None``
    when no registered task runs in one.
    """
    names = [name for name in registry if registry.lookup(name).executor == PROCESS]
    if not names:
        return None
    from quebert.process import TaskProcessPool, default_size

    limit = config.process_memory_limit
    return TaskProcessPool(reactor, config.processes or default_size(), config.tasks,
                           max_tasks_per_child=config.max_tasks_per_child,
                           memory_limit=limit * 2 ** 20 if limit else None, expected=names)


def load_mediator_class(dotted: str) -> type:
    """The Mediator subclass named by ``dotted``."""
    try:
        cls = namedAny(dotted)
    except Exception as e:
        raise ConfigurationError(f"cannot load mediator {dotted!r}: {e}")
    if not (isinstance(cls, type) and issubclass(cls, Mediator)):
        raise ConfigurationError(f"{dotted!r} is not a subclass of quebert.Mediator")
    return cls


def queue_description(settings: QueueSettings) -> dict:
    """A queue's settings as the HTTP API shows them."""
    return {
        "concurrency": settings.concurrency,
        "timeout": settings.timeout,
        "dispatch_deadline": settings.dispatch_deadline,
        "retry": attrs.asdict(settings.retry),
    }


def serve_api(parent: MultiService, config: WorkerConfig, *, reactor: Any, state: Any,
              redis: Any, registry: Registry, queues: list, readiness: list = (),
              metrics: Optional[Callable[[], bytes]] = None,
              connections: Any = None) -> tuple:
    """
    Add the HTTP task API to ``parent``: a :class:`~quebert.Client` of its
    own (publishing and control messages) and the web server, which serves
    ``metrics()`` at ``/metrics`` when given.  Returns ``(client, endpoint
    service)``.
    """
    from quebert.api.resource import make_site
    from quebert.client import Client
    from quebert.service import TaskService

    client = Client(config.amqp_url, reactor=reactor, state=state,
                    exchange=config.exchange, queue_type=config.queue_type,
                    delivery_limit=config.delivery_limit, default_queue=queues[0].name,
                    registry=registry,
                    url_policy=config.dispatch_settings().policy)
    client.broker.setServiceParent(parent)
    settings = {q.name: queue_description(q) for q in queues}
    if redis is not None:
        def redis_ping() -> defer.Deferred:
            return bounded(defer.maybeDeferred(redis.ping), 2.0, reactor)
    else:
        def redis_ping() -> defer.Deferred:
            return defer.succeed(True)  # the memory store is always there
    service = TaskService(client, queues=settings, registry=registry,
                          redis_ping=redis_ping, readiness=list(readiness),
                          connections=connections)
    api = api_config(config)
    if api.open:
        log.warn("the HTTP task API on {interface}:{port} accepts requests without a token "
                 "({access}); keep it on a trusted network", interface=config.http_interface,
                 port=config.http_port, access=api.anonymous)
    site = make_site(service, api, reactor=reactor, metrics=metrics)
    endpoint = TCP4ServerEndpoint(reactor, config.http_port, interface=config.http_interface)
    server = _ApiServer(endpoint, site, reactor, f"{config.http_interface}:{config.http_port}",
                        service)
    server.setServiceParent(parent)
    return client, server


class _WorkerBeat(Service):
    """
    Says in the state store that this worker is alive (every
    ``BEAT_INTERVAL`` seconds, valid ``BEAT_TTL`` seconds), so that a worker
    that gets a redelivered task still ``running`` here can tell a live
    worker that lost its broker connection from a dead one.
    """

    def __init__(self, state: Any, worker_id: str, reactor: Any,
                 describe: Optional[Callable[[], dict]] = None) -> None:
        self.state = state
        self.worker_id = worker_id
        #: What the beat tells the console about this worker (None: nothing).
        self.describe = describe
        self.loop = LoopingCall(self._beat)
        self.loop.clock = reactor
        self._failing = False

    def startService(self) -> None:
        super().startService()
        self.loop.start(BEAT_INTERVAL, now=True)

    def _beat(self) -> defer.Deferred:
        if self.describe is not None:
            d = defer.maybeDeferred(self.state.worker_beat, self.worker_id, BEAT_TTL,
                                    self.describe())
        else:
            d = defer.maybeDeferred(self.state.worker_beat, self.worker_id, BEAT_TTL)

        def done(_: Any) -> None:
            if self._failing:
                log.info("worker beats reach the state store again")
            self._failing = False

        def failed(failure: Any) -> None:
            if not self._failing:
                log.warn("worker beat not written ({error}); retrying every {interval}s",
                         error=failure.getErrorMessage(), interval=BEAT_INTERVAL)
            self._failing = True

        return d.addCallbacks(done, failed)

    def stopService(self) -> Any:
        super().stopService()
        if self.loop.running:
            self.loop.stop()
        d = defer.maybeDeferred(self.state.worker_beat, self.worker_id, 0)
        return bounded(d.addErrback(lambda _: None), 2.0, self.loop.clock)


class _ApiServer(Service):
    """
    Listens for the HTTP API; a port that cannot be had (in use, not
    allowed) is one clear error line and exit code 1, not a traceback.
    """

    def __init__(self, endpoint: Any, factory: Any, reactor: Any, where: str,
                 task_service: Any = None) -> None:
        self.endpoint = endpoint
        self.task_service = task_service
        self.factory = factory
        self.reactor = reactor
        self.where = where
        self.port: Any = None
        self._listening: Optional[defer.Deferred] = None

    def startService(self) -> None:
        super().startService()
        self._listening = self.endpoint.listen(self.factory)
        self._listening.addCallbacks(self._listened, self._failed)

    def _listened(self, port: Any) -> None:
        self.port = port
        log.info("HTTP task API listening on {address}", address=port.getHost())

    def _failed(self, failure: Any) -> None:
        log.critical("cannot serve the HTTP task API on {where}: {error}; stopping with exit "
                     "code {code}", where=self.where, error=failure.getErrorMessage(),
                     code=EXIT_USAGE)
        exit_after_shutdown(EXIT_USAGE)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self.port is not None:
            yield self.port.stopListening()


class _StopSignals:
    """
    SIGTERM/SIGINT handling shared by the worker and ``quebert-api``: the
    first signal goes to the reactor's own handler (a graceful stop), the
    second calls :meth:`_second_stop_signal` (by default: exit at once),
    a third exits on the spot with status ``128 + signum``.  Subclasses set
    ``reactor``, ``_stopping`` (a stop under way for another reason) and
    call :meth:`_install_stop_signals` from ``startService``.
    """

    _what = "quebert"
    _stopping = False
    _stop_signaled = False
    _hard_stop_requested = False

    def _install_stop_signals(self) -> None:
        when_running = getattr(self.reactor, "callWhenRunning", None)
        if when_running is not None:
            # The reactor installs its signal handlers as it starts running.
            when_running(self._wrap_signal_handlers)

    def _wrap_signal_handlers(self) -> None:
        """
        Put a handler in front of the reactor's SIGTERM and SIGINT handlers.
        Left alone when the reactor installed no handlers
        (``installSignalHandlers=False``, not the main thread).
        """
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if not callable(previous) or previous is signal.default_int_handler:
                continue
            signal.signal(signum, lambda n, frame, previous=previous:
                          self._on_stop_signal(previous, n, frame))

    def _on_stop_signal(self, previous: Any, signum: int, frame: Any) -> None:
        # Runs in the main thread wherever it was interrupted, possibly in the
        # middle of a log write: only hand work over to the reactor (the
        # reactor's own handler logs, and a log write from here can collide
        # with the one it interrupted).
        if not (self._stopping or self._stop_signaled):
            self._stop_signaled = True
            self.reactor.callFromThread(previous, signum, None)
        elif not self._hard_stop_requested:
            self._hard_stop_requested = True
            self.reactor.callFromThread(self._second_stop_signal, signum)
        else:
            self._exit_now(signum)

    def _second_stop_signal(self, signum: int) -> None:
        """A second stop signal while stopping: nothing to cut short, exit now."""
        self._exit_now(signum)

    def _exit_now(self, signum: int) -> None:
        code = EXIT_SIGNAL_BASE + signum
        try:
            os.write(2, f"{self._what}: signal {signum} again; exiting at once with "
                        f"status {code}\n".encode())
        finally:
            os._exit(code)


class ApiService(_StopSignals, MultiService):
    """
    ``twistd quebert-api``: the HTTP task API alone, without running tasks.
    A second SIGTERM/SIGINT while it stops exits at once (status 128 + N).
    """

    _what = "quebert-api"

    def __init__(self, config: WorkerConfig, *, reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        if config.http_port is None:
            raise ConfigurationError("quebert-api needs --http-port (or api.port in --config)")
        self.reactor = reactor
        import_tasks(config.tasks)
        if len(default_registry):  # (without tasks, any call task name is accepted)
            apply_legacy_tasks(default_registry, config.legacy_tasks)
        self._redis = None
        if config.state == "redis":
            self._redis = connect_redis(config.redis_url, reactor=reactor)
            state = RedisStateManager(self._redis, prefix=config.state_prefix,
                                      retention=config.retention(),
                                      name_tombstone=config.name_tombstone)
        else:
            raise ConfigurationError("quebert-api reads task state from Redis; "
                                     "--state memory is only for a worker serving its own API")
        self.state = state
        dispatch = config.dispatch_settings()
        queues = [q if q.dispatch_deadline else attrs.evolve(
            q, dispatch_deadline=dispatch.dispatch_deadline) for q in config.queue_settings()]
        self.client, self.api_service = serve_api(
            self, config, reactor=reactor, state=state, redis=self._redis,
            registry=default_registry, queues=queues)

    def startService(self) -> None:
        super().startService()
        self._install_stop_signals()

    @defer.inlineCallbacks
    def stopService(self):
        self._stopping = True
        yield super().stopService()
        if self._redis is not None:
            try:
                yield self._redis.disconnect()
            except Exception:
                pass
        # a graceful stop exits 0 (see WorkerService.stopService)
        if getattr(self.reactor, "_exitSignal", None) is not None:
            self.reactor._exitSignal = None


class WorkerService(_StopSignals, MultiService):
    """A complete worker, ready to be run by ``twistd`` or embedded."""

    _what = "quebert worker"

    def __init__(self, config: WorkerConfig, *, reactor: Any = None,
                 registry: Optional[Registry] = None, state: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.config = config
        self.reactor = reactor
        dispatch = config.dispatch_settings()
        # Service tokens first: a missing one stops the worker before it connects.
        credentials = dispatch.load_credentials()
        import_tasks(config.tasks)
        mediator_class = load_mediator_class(config.mediator)
        registry = registry if registry is not None else default_registry
        apply_legacy_tasks(registry, config.legacy_tasks)

        topology = Topology(exchange=config.exchange, queue_type=config.queue_type,
                            errored_ttl_ms=config.errored_ttl_ms,
                            existing_queues=config.existing_queues(),
                            delivery_limit=config.delivery_limit)
        if not len(registry):
            warn_without_tasks(topology, config.queue_settings())
        self.broker = AMQPBroker(config.amqp_url, topology, reactor=reactor,
                                 beacon_interval=config.beacon_interval,
                                 on_stuck=self._stuck_connection)
        self.broker.setServiceParent(self)
        self.exit_code = EXIT_OK
        for connection in self.broker.connections():
            connection.on_fatal = self._broker_refused

        self._redis = None
        if state is None:
            if config.state == "memory":
                # in process: it cannot be down, so it needs no ResilientStateManager
                # (which would double its cost per task)
                state = MemoryStateManager(retention=config.retention(), clock=reactor,
                                           name_tombstone=config.name_tombstone)
            elif config.state == "redis":
                self._redis = connect_redis(config.redis_url, reactor=reactor)
                state = ResilientStateManager(
                    RedisStateManager(self._redis, prefix=config.state_prefix,
                                      retention=config.retention(),
                                      name_tombstone=config.name_tombstone),
                    clock=reactor)
            else:
                raise ConfigurationError(
                    f"state backend must be 'redis' or 'memory', not {config.state!r}")
        self.state = state

        threads = config.threads or min(config.max_running_tasks, 50)
        self.executor = Executor(reactor, max_threads=threads,
                                 processes=process_pool(config, registry, reactor))
        try:
            level = LogLevel.levelWithName(config.log_level)
        except Exception:
            raise ConfigurationError(f"unknown log level {config.log_level!r}")
        unreachable = config.unreachable_running_tasks()
        if unreachable:
            log.warn("{sentence}", sentence=unreachable)
        concurrency, where = config.concurrency()
        self.dispatcher = dispatch.dispatcher(reactor, credentials=credentials,
                                              concurrency=concurrency, task_log_level=level)
        for sentence in dispatch.capped_concurrency(concurrency, where):
            log.warn("{sentence}", sentence=sentence)
        queues = [q if q.dispatch_deadline else attrs.evolve(
            q, dispatch_deadline=dispatch.dispatch_deadline) for q in config.queue_settings()]
        self.mediator = mediator_class(
            broker=self.broker, state=self.state, executor=self.executor, clock=reactor,
            queues=queues, registry=registry,
            max_running_tasks=config.max_running_tasks,
            max_message_size=config.max_message_size, task_log_level=level,
            max_result_size=config.max_result_size,
            dispatcher=self.dispatcher,
        )
        self.mediator.start()
        if hasattr(self.state, "worker_beat"):
            _WorkerBeat(self.state, self.mediator.worker_id, reactor,
                        describe=self.describe).setServiceParent(self)
        self.started_at = reactor.seconds()
        self.watchdog = None
        if config.auto_kill_timeout:
            self._setup_watchdog(config)
        self.stuck_check: Optional[StuckConsumerCheck] = None
        if config.stuck_consumer_timeout > 0:
            admin = BrokerAdmin(self.broker.consuming, topology)
            self.stuck_check = StuckConsumerCheck(
                self.broker.consumers, admin.depth, self.mediator.has_capacity,
                config.stuck_consumer_timeout, clock=reactor)
            self.stuck_check.setServiceParent(self)
        self.client = None
        self.api_port = None
        #: Prometheus metrics (:class:`quebert.metrics.WorkerMetrics`), served with the API.
        self.metrics = None
        if config.http_port is not None:
            self._setup_api(config, queues, registry, topology)

    def describe(self) -> dict:
        """
        What this worker's beat tells the console (``quebert/api/console.py``):
        where it runs, what it serves, how busy it is, its broker node, and
        its per-queue counts of attempts started and ended.
        """
        mediator = self.mediator
        consuming = self.broker.consuming
        description = {
            "host": _HOST,
            "pid": os.getpid(),
            "version": __version__,
            "started_at": self.started_at,
            "beat_at": self.reactor.seconds(),
            "queues": sorted(mediator.queues),
            "running": len(mediator._inflight),
            "capacity": mediator.max_running_tasks,
            "node": getattr(consuming, "connected_node", None),
            "counts": mediator.stats.per_queue(),
        }
        pool = getattr(self.executor, "processes", None)
        if pool is not None:
            description["processes"] = {"size": pool.size, "busy": pool.busy}
        return description

    def _setup_watchdog(self, config: WorkerConfig) -> None:
        """The reactor-stall watchdog (``--auto-kill-timeout``)."""
        marker = None
        if self._redis is not None:
            marker = RedisStallMarker(config.redis_url, config.state_prefix)
        self.watchdog = ReactorWatchdog(
            config.auto_kill_timeout, clock=self.reactor, running=lambda: self.mediator.running,
            marker=marker, exit_code=EXIT_REACTOR_STALLED)
        self.watchdog.setServiceParent(self)

    def _setup_api(self, config: WorkerConfig, queues: list, registry: Registry,
                   topology: Topology) -> None:
        """The HTTP task API, on a Client of its own (publishing and control)."""
        from quebert.metrics import WorkerMetrics

        consuming = self.broker.consuming
        self.metrics = WorkerMetrics(self.mediator, self.state, self.broker.connections)
        self.client, self.api_service = serve_api(
            self, config, reactor=self.reactor, state=self.state, redis=self._redis,
            registry=registry, queues=queues,
            readiness=[lambda: consuming.current is not None and consuming.current.is_open,
                       lambda: not any(b.gave_up for b in self.broker.beacons),
                       lambda: self.stuck_check is None or self.stuck_check.healthy()],
            metrics=self.metrics.exposition, connections=self.broker.connections)

    def _broker_refused(self, failure) -> None:
        if self.exit_code != EXIT_OK:
            return
        self.exit_code = EXIT_BROKER_REFUSED
        log.critical(
            "RabbitMQ refused this worker's setup for good ({error}); check permissions and "
            "that existing queues were declared with the same arguments (queue type, TTLs); "
            "a work queue another system declared (guillotina_amqp's, say) is used as it is "
            "with \"existing\": true in its entry of the config's \"queues\". "
            "Stopping with exit code {code}.",
            error=failure.getErrorMessage(), code=self.exit_code,
        )
        exit_after_shutdown(self.exit_code)
        if self.reactor.running:
            self.reactor.stop()

    def _process_pool_failed(self, failure: Any) -> None:
        """The pool processes cannot run the tasks: stop with exit code 1."""
        if self.exit_code != EXIT_OK:
            return
        self.exit_code = EXIT_USAGE
        log.critical("the process pool cannot run this worker's process tasks: {error}. "
                     "Stopping with exit code {code}.", error=failure.getErrorMessage(),
                     code=self.exit_code)
        exit_after_shutdown(self.exit_code)
        if self.reactor.running:
            try:
                self.reactor.stop()
            except ReactorNotRunning:
                pass
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def _stuck_connection(self, beacon: Any) -> None:
        if self.exit_code != EXIT_OK:
            return
        self.exit_code = EXIT_STUCK_CONNECTION
        log.critical(
            "the AMQP {name} connection is stuck and reconnecting did not help (no beacon "
            "back, interval {interval}s). Stopping with exit code {code} so that the "
            "supervisor restarts the worker.",
            name=beacon.name, interval=beacon.interval, code=self.exit_code,
        )
        exit_after_shutdown(self.exit_code)
        if self.reactor.running:
            try:
                self.reactor.stop()
            except ReactorNotRunning:
                pass  # already shutting down; the exit code still applies

    @property
    def http_port(self) -> Optional[int]:
        """The port the HTTP API listens on, once listening."""
        port = getattr(getattr(self, "api_service", None), "port", None)
        return port.getHost().port if port is not None else None

    def startService(self) -> None:
        self._apply_paused()
        log.info(
            "quebert worker {worker} starting: queues {queues}, max {max} running tasks, "
            "{threads} threads, state {state}, {count} registered task(s)",
            worker=self.mediator.worker_id,
            queues=", ".join(f"{q.name}:{q.concurrency}" for q in self.config.queue_settings()),
            max=self.config.max_running_tasks, threads=self.executor.max_threads,
            state=self.config.state, count=len(self.mediator.registry),
        )
        self.executor.start().addErrback(self._process_pool_failed)
        super().startService()
        self._install_stop_signals()
        ready = self.broker.publishing.whenReady()
        ready.addCallback(lambda protocol: defer.ensureDeferred(
            self._report_other_delays(protocol)))
        ready.addErrback(lambda _: None)  # stopped before it connected

    async def _report_other_delays(self, protocol: Any) -> None:
        """Say once whether tasks still wait in the other queue type's delay levels."""
        topology = self.broker.topology
        try:
            waiting = await topology.waiting_in_other_delays(protocol)
        except Exception as e:
            log.warn("could not look into the delay queues of the other queue type: {error}",
                     error=e)
            return
        if waiting:
            log.warn(
                "{count} task(s) still wait in {levels} {kind} delay queue(s) of an earlier "
                "deployment; they reach their work queues by themselves (at most their "
                "longest delay); 'quebert drop-old-delays' deletes those queues once empty",
                count=sum(waiting.values()), levels=len(waiting),
                kind="quorum" if topology.queue_type == "classic" else "classic")

    def _second_stop_signal(self, signum: int) -> None:
        self._hard_stop(signum)

    def _hard_stop(self, signum: int) -> None:
        """
        A second stop signal: end the drain now.  Running tasks are left
        unacked (the consumer channels close, the broker requeues them) and
        the stop goes on with short waits; the process then dies of
        ``signum`` (unless it already had another exit status to report).
        """
        self._hard_stop_requested = True
        log.warn("signal {signal} during the graceful stop: stopping now; {count} running "
                 "task(s) are left unacked for redelivery: {ids}", signal=signum,
                 count=len(self.mediator.running), ids=sorted(self.mediator.running))
        if self.exit_code == EXIT_OK:
            self.reactor._exitSignal = signum
        self.mediator.end_drain()

    def _apply_paused(self) -> None:
        """Queues paused through the API before this worker started stay paused."""
        paused_queues = getattr(self.state, "paused_queues", None)
        if paused_queues is None:
            return
        # Nothing is consumed until the store said which queues are paused.
        for consumer in self.broker.consumers.values():
            consumer.paused = True

        def apply(paused: set) -> None:
            for name, consumer in sorted(self.broker.consumers.items()):
                if name in paused:
                    log.info("queue {queue} is paused; not consuming it until it is resumed",
                             queue=name)
                else:
                    consumer.resume()

        def unknown(failure) -> None:
            log.warn("paused queues cannot be read ({error}); consuming every queue",
                     error=failure.getErrorMessage())
            for consumer in self.broker.consumers.values():
                consumer.resume()

        bounded(defer.maybeDeferred(paused_queues), 5.0, self.reactor).addCallbacks(
            apply, unknown)

    @defer.inlineCallbacks
    def stopService(self):
        self._stopping = True
        log.info("quebert worker stopping: draining (send the signal again to stop at once)")
        left = yield defer.ensureDeferred(self.mediator.drain(self.config.shutdown_timeout))
        self.broker.close_consumers()
        # after a second signal, every wait is short
        wait = 1.0 if self._hard_stop_requested else 5.0
        try:
            yield bounded(self.dispatcher.close(), wait, self.reactor)
        except Exception as e:
            log.warn("closing the URL dispatcher: {error}", error=e)
        flush = getattr(self.state, "flush", None)
        if flush is not None:
            try:
                yield bounded(flush(), wait, self.reactor)
            except Exception as e:
                log.warn("flushing the state writes: {error}", error=e)
        stop = getattr(self.state, "stop", None)
        if stop is not None:
            stop()
        yield super().stopService()
        if self._redis is not None:
            try:
                yield self._redis.disconnect()
            except Exception:
                pass
        yield self.executor.stop(join=left == 0)
        # twistd re-raises the signal that stopped the reactor once it
        # returns, so a drained worker would exit -15; a graceful stop exits 0.
        # After a second signal, it dies of that signal (EXIT_SIGNAL_BASE).
        if (self.exit_code == EXIT_OK and not self._hard_stop_requested
                and getattr(self.reactor, "_exitSignal", None) is not None):
            self.reactor._exitSignal = None
        log.info("quebert worker stopped ({counts})", counts=dict(self.mediator.counts))
