# -*- test-case-name: tests.test_executor -*-
"""
Running a task's callable without ever blocking the reactor.

Plain functions run in a bounded thread pool; ``async def``,
``inlineCallbacks`` and other Deferred-returning callables (registered with
``executor="reactor"``) run on the reactor.  A per-task timeout cancels a
reactor task's Deferred; a thread cannot be interrupted, so a timed-out
thread task is reported failed at once and its eventual result discarded
(it keeps its thread until it returns, which bounds the pool's damage to
the tasks that overran).

Context variables (:func:`quebert.current_task` among them) reach every
task: reactor tasks run in the caller's context, and a thread task runs in
a copy of it taken when it is submitted (Twisted's thread pool does not
carry ``contextvars`` into its threads by itself).

Functions registered with ``executor="process"`` go to the worker's pool
of processes (:class:`quebert.process.TaskProcessPool`), where a timeout
or a cancellation kills the process running them.
"""

from __future__ import annotations

import contextvars
import inspect
import threading
import types
from typing import Any, Mapping, Optional

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from quebert.errors import ConfigurationError, TaskTimeout
from quebert.registry import PROCESS, REACTOR, TaskDefinition


class _DaemonThreadPool(ThreadPool):
    """A thread stuck in a task must not keep the process from exiting."""

    def threadFactory(self, *args: Any, **kwargs: Any) -> threading.Thread:  # type: ignore
        thread = threading.Thread(*args, **kwargs)
        thread.daemon = True
        return thread


class Executor:
    """Runs task callables; one per worker."""

    def __init__(self, reactor: Any, max_threads: int = 10, processes: Any = None) -> None:
        self.reactor = reactor
        self.pool = _DaemonThreadPool(minthreads=0, maxthreads=max(1, max_threads),
                                      name="quebert-tasks")
        self.max_threads = max_threads
        #: The pool of processes for ``executor="process"`` tasks
        #: (:class:`quebert.process.TaskProcessPool`), or ``None``.
        self.processes = processes

    def start(self) -> defer.Deferred:
        """
        Start the thread pool, and the process pool if any: the Deferred
        fires once its processes are ready (or fails with why they are not).
        """
        self.pool.start()
        if self.processes is not None:
            return self.processes.start()
        return defer.succeed(None)

    def stop(self, join: bool = True) -> defer.Deferred:
        """
        Stop the pools; ``join=False`` leaves stuck threads behind.  The
        Deferred fires once the pool processes are gone.
        """
        if self.pool.started:
            if join:
                self.pool.stop()
            else:
                self.pool.joined = True
                self.pool.started = False
        if self.processes is not None:
            return self.processes.stop()
        return defer.succeed(None)

    def run(self, definition: TaskDefinition, args: tuple, kwargs: Mapping[str, Any],
            timeout: Optional[float] = None) -> defer.Deferred:
        """Fire with the callable's result, or fail with its error."""
        if definition.executor == PROCESS:
            if self.processes is None:
                return defer.fail(ConfigurationError(
                    f"task {definition.name!r} runs with executor='process' but this worker "
                    "has no process pool"))
            return self.processes.run(definition, args, kwargs, timeout)
        if definition.executor == REACTOR:
            d = _run_on_reactor(definition, args, dict(kwargs))
            if timeout and not d.called:
                d.addTimeout(timeout, self.reactor, onTimeoutCancel=_timed_out(definition,
                                                                                timeout))
            return d
        run_in_context = contextvars.copy_context().run
        if not timeout:
            return deferToThreadPool(self.reactor, self.pool, run_in_context, _call_in_thread,
                                     definition, args, dict(kwargs))
        race = _Race(self.reactor, definition, timeout)
        d = deferToThreadPool(self.reactor, self.pool, run_in_context, race.call_in_thread,
                              args, dict(kwargs))
        return race.follow(d)


def _run_on_reactor(definition: TaskDefinition, args: tuple, kwargs: dict) -> defer.Deferred:
    """
    ``maybeDeferred`` of the callable, with a fast path for coroutines: the
    coroutine is driven at once, in a context of its own, and only put
    under a Deferred-driven trampoline if it actually waits for something.
    """
    try:
        result = definition.fn(*args, **kwargs)
    except BaseException:
        return defer.fail()
    if type(result) is types.CoroutineType:
        context = contextvars.copy_context()
        try:
            yielded = context.run(result.send, None)
        except StopIteration as stop:
            return defer.succeed(stop.value)
        except BaseException:
            return defer.fail()
        return defer.Deferred.fromCoroutine(_resume(result, yielded, context))
    if isinstance(result, defer.Deferred):
        return result
    if isinstance(result, defer.Failure):
        return defer.fail(result)
    if inspect.isawaitable(result):
        return defer.ensureDeferred(result)
    return defer.succeed(result)


@types.coroutine
def _resume(coro: Any, yielded: Any, context: contextvars.Context) -> Any:
    """
    The rest of a coroutine that was started by hand and suspended on
    ``yielded``: what it awaits is handed to Twisted's trampoline as is (so
    cancelling the Deferred cancels what the coroutine waits on, and the
    error is thrown into it), every step runs in ``context``.
    """
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:
            try:
                yielded = context.run(coro.throw, e)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = context.run(coro.send, sent)
            except StopIteration as stop:
                return stop.value


def _call_in_thread(definition: TaskDefinition, args: tuple, kwargs: dict) -> Any:
    result = definition.fn(*args, **kwargs)
    if inspect.iscoroutine(result):
        result.close()
        raise TypeError(
            f"task {definition.name!r} returned a coroutine from a thread; "
            "define it with 'async def' or register it with executor='reactor'"
        )
    if isinstance(result, defer.Deferred):
        raise TypeError(
            f"task {definition.name!r} returned a Deferred from a thread; "
            "register it with executor='reactor'"
        )
    return result


def _timed_out(definition: TaskDefinition, timeout: float):
    def convert(result: Any, seconds: float) -> Any:
        if isinstance(result, defer.Failure) and result.check(defer.CancelledError):
            raise TaskTimeout(f"task {definition.name!r} timed out after {timeout:g}s")
        return result

    return convert


class _Race:
    """
    A thread task against its timeout.  The clock starts when a thread
    picks the task up (not while it waits for a free thread); after the
    timeout the task is reported failed and its eventual result ignored.
    """

    def __init__(self, reactor: Any, definition: TaskDefinition, timeout: float) -> None:
        self.reactor = reactor
        self.definition = definition
        self.timeout = timeout
        self.outer: defer.Deferred = defer.Deferred()
        self.timer: Any = None

    def call_in_thread(self, args: tuple, kwargs: dict) -> Any:
        self.reactor.callFromThread(self._start_clock)
        return _call_in_thread(self.definition, args, kwargs)

    def _start_clock(self) -> None:
        if not self.outer.called:
            self.timer = self.reactor.callLater(self.timeout, self._expire)

    def _expire(self) -> None:
        if not self.outer.called:
            self.outer.errback(TaskTimeout(
                f"task {self.definition.name!r} timed out after {self.timeout:g}s "
                "(its thread keeps running until the function returns)"
            ))

    def follow(self, d: defer.Deferred) -> defer.Deferred:
        def finished(result: Any) -> None:
            if self.timer is not None and self.timer.active():
                self.timer.cancel()
            if not self.outer.called:
                if isinstance(result, defer.Failure):
                    self.outer.errback(result)
                else:
                    self.outer.callback(result)

        d.addBoth(finished)
        return self.outer
