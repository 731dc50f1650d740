# -*- test-case-name: tests.test_process -*-
"""
The worker's pool of task processes, on ampoule.

:class:`TaskProcessPool` runs ``executor="process"`` tasks in a fixed
number of child processes (:mod:`quebert.process.child`), one task per
child at a time.  ampoule starts the children and speaks AMP with them;
this module adds what a task queue needs on top of its ``ProcessPool``:

* **the pool stays full**: a child that ends for any reason (killed, died,
  recycled, idle or busy) is replaced at once;
* **stopping a task kills its child**: a timeout, a cancellation (the
  Deferred of :meth:`TaskProcessPool.run` cancelled) or the memory limit
  sends SIGKILL to the child running it; the attempt fails with
  :class:`~quebert.errors.TaskTimeout` or :class:`~quebert.errors.ProcessLost`
  saying so, or ends cancelled;
* **a child that dies on its own** (a signal, ``os._exit``, the kernel's
  OOM killer) fails its attempt with :class:`~quebert.errors.ProcessLost`
  naming its exit status or signal, which the retry policy retries;
* ``max_tasks_per_child`` recycles a child after that many tasks, and
  ``memory_limit`` (MiB of resident memory, read from ``/proc``) kills a
  child over it while it runs a task (checked every
  ``MEMORY_CHECK_INTERVAL`` seconds) and recycles one found over it after
  a task.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import signal
import sys
import time
from typing import Any, Iterable, Mapping, Optional

from ampoule import pool as ampoule_pool
from ampoule.main import AMPConnector, ProcessStarter
from twisted.internet import defer, error
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from quebert.current import current_task
from quebert.errors import ConfigurationError, ProcessLost, TaskTimeout
from quebert.process.commands import ProcessTasks, RunTask
from quebert.process.remote import remote_exception
from quebert.registry import TaskDefinition

__all__ = ["TaskProcessPool", "default_size"]

log = Logger(namespace="quebert.process")

#: Seconds between two reads of the resident memory of busy children.
MEMORY_CHECK_INTERVAL = 0.5
#: Seconds the children get to answer at start-up, and to exit when stopped.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 5.0
#: Seconds the worker still reads a child's pipes once it exited (its last
#: words), before closing them even if a grandchild holds them open.
PIPE_GRACE = 1.0
#: A child that ends younger than this without having answered anything
#: died starting; after a few in a row, replacements are spaced out.
EARLY_DEATH = 2.0

#: The child's start: what ampoule's process starter runs with ``python -c``.
BOOTSTRAP = "import sys\nfrom quebert.process.child import main\nmain(sys.argv[1:])\n"


def default_size() -> int:
    """The pool size when none is configured: the number of CPU cores."""
    return os.cpu_count() or 1


def resident_memory(pid: int) -> Optional[int]:
    """Resident memory of process ``pid`` in bytes (Linux ``/proc``), or ``None``."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def describe_end(reason: Failure) -> str:
    """How a child ended, for an error message: its exit status or signal."""
    value = reason.value
    signal_number = getattr(value, "signal", None)
    if signal_number:
        try:
            name = signal.Signals(signal_number).name
        except ValueError:
            name = f"signal {signal_number}"
        more = " (out of memory? the kernel's OOM killer sends SIGKILL)" \
            if signal_number == signal.SIGKILL else ""
        return f"was killed by {name}{more}"
    code = getattr(value, "exitCode", None)
    if code is not None:
        return f"exited with status {code}"
    return f"was lost ({reason.getErrorMessage()})"


class _ChildConnector(AMPConnector):
    """
    ampoule's process protocol, with the child's output logged at info
    level under its pid (a task's prints and logs), and its pipes closed as
    soon as the child has exited: a grandchild that inherited them must not
    keep the worker from seeing the end of the child.
    """

    def connectionMade(self) -> None:
        self.pid = self.amp.pid = self.transport.pid
        self.amp.makeConnection(self)

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").rstrip().splitlines():
            log.info("pool process {pid}: {line}", pid=self.pid, line=line)

    def processExited(self, reason: Failure) -> None:
        from twisted.internet import reactor  # (ampoule spawns on the global reactor)

        self.amp.exited()
        self._exited = reactor.callLater(PIPE_GRACE, self._close_pipes)

    def _close_pipes(self) -> None:
        try:
            self.loseConnection()
        except Exception:
            pass

    def processEnded(self, status: Failure) -> None:
        exited = getattr(self, "_exited", None)
        if exited is not None and exited.active():
            exited.cancel()
        self.amp.connectionLost(status)
        if status.check(error.ProcessDone):
            self.finished.callback("")
        else:
            self.finished.errback(status)


class _Starter(ProcessStarter):
    connectorFactory = _ChildConnector


class _Child(amp.AMP):
    """The worker's end of one child's AMP connection."""

    def __init__(self, owner: TaskProcessPool) -> None:
        super().__init__()
        self.owner = owner
        #: The child's pid (kept after it ended, for the messages about it).
        self.pid: Optional[int] = None
        self.answered = False
        self.ended = False
        self.started_at = time.monotonic()

    def makeConnection(self, transport: Any) -> None:
        # (AMP's own logs a line per connection made and lost: one per child)
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def kill(self) -> None:
        """SIGKILL the child (nothing if it is gone already)."""
        try:
            self.transport.signalProcess(signal.SIGKILL)
        except (error.ProcessExitedAlready, AttributeError, OSError):
            pass

    def callRemote(self, command: Any, **kwargs: Any) -> defer.Deferred:
        if command is RunTask:
            call = self.owner._calls.get(kwargs["call"])
            if call is None or call.outer.called:
                return defer.fail(defer.CancelledError("the call ended before it was sent"))
            call.sent(self)
        d = super().callRemote(command, **kwargs)
        if not self.answered:
            d.addCallback(self._answered)
        return d

    def exited(self) -> None:
        """The process is gone (its pipes may not be): give it no more work."""
        pool = self.owner._pool
        if pool is not None:
            pool.ready.discard(self)

    def _answered(self, result: Any) -> Any:
        self.answered = True
        return result

    def connectionLost(self, reason: Any) -> None:
        self.ended = True
        self.owner._child_ended(self, reason)
        amp.BinaryBoxProtocol.connectionLost(self, reason)  # fails the call it was running


class _AmpoulePool(ampoule_pool.ProcessPool):
    """
    ampoule's pool with one task per child, children replaced by the owner
    (:meth:`TaskProcessPool._top_up`) rather than on demand, and a child
    retired after a task when the owner says so (``max_tasks_per_child``,
    over the memory limit).
    """

    def __init__(self, owner: TaskProcessPool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.owner = owner

    def _addProcess(self, child: _Child, finished: defer.Deferred) -> None:
        # ampoule's logs an error for every child that ends by a signal: the
        # owner says why instead (it knows when it killed the child itself).
        self.processes.add(child)
        self.ready.add(child)
        finished.addBoth(lambda _: self._pruneProcess(child))
        self._finishCallbacks[child] = finished
        self._lastUsage[child] = time.time()
        self._calls[child] = 0
        self._catchUp()

    def dumpStats(self) -> None:
        """(ampoule logs its settings, the children's environment included: not here.)"""

    def doWork(self, command: Any, **kwargs: Any) -> defer.Deferred:
        if self.ready:
            return self._cb_doWork(command, **kwargs)
        d = defer.Deferred()
        self._queue.append((ampoule_pool.count(), (d, command, kwargs)))
        return d

    def _catchUp(self) -> None:
        while self._queue and self.ready:
            _, (d, command, kwargs) = ampoule_pool.pop(self._queue)
            call = self.owner._calls.get(kwargs.get("call"))
            if call is None or call.outer.called:
                continue  # cancelled while it waited for a child
            self._cb_doWork(command, **kwargs).chainDeferred(d)

    def _cb_doWork(self, command: Any, _timeout: Any = None, _deadline: Any = None,
                   **kwargs: Any) -> defer.Deferred:
        child = self.ready.pop()
        self.busy.add(child)
        self._calls[child] = self._calls.get(child, 0) + 1
        d = defer.maybeDeferred(child.callRemote, command, **kwargs)
        return d.addBoth(self._returned, child)

    def _returned(self, result: Any, child: _Child) -> Any:
        self.busy.discard(child)
        self._lastUsage[child] = time.time()
        if child not in self.processes:
            return result
        if isinstance(result, Failure) and result.check(error.ProcessDone,
                                                       error.ProcessTerminated,
                                                       error.ConnectionLost,
                                                       error.ConnectionDone):
            return result  # ending: the owner replaces it
        retire = self.owner._retire_reason(child, self._calls.get(child, 0))
        if retire:
            self.processes.discard(child)
            self.owner._retiring(child, retire)
            self.stopAWorker(child)
        else:
            self.ready.add(child)
            self._catchUp()
        return result


class _Call:
    """One task call through the pool: what stops it, and how it ended."""

    def __init__(self, owner: TaskProcessPool, number: int, definition: TaskDefinition,
                 timeout: Optional[float]) -> None:
        self.owner = owner
        self.number = number
        self.definition = definition
        self.timeout = timeout
        self.child: Optional[_Child] = None
        self.timer: Any = None
        self.outer: defer.Deferred = defer.Deferred(self._cancel)

    def sent(self, child: _Child) -> None:
        """A child took the call: the timeout starts now."""
        self.child = child
        if self.timeout:
            self.timer = self.owner.reactor.callLater(self.timeout, self._expire)

    def _expire(self) -> None:
        self.timer = None
        if self.outer.called:
            return
        pid = self._kill("timeout")
        self.outer.errback(TaskTimeout(
            f"task {self.definition.name!r} timed out after {self.timeout:g}s; its process "
            f"(pid {pid}) was killed"))

    def over_memory(self, rss: int) -> None:
        if self.outer.called:
            return
        pid = self._kill("memory")
        self.outer.errback(ProcessLost(
            f"task {self.definition.name!r} went over the memory limit of "
            f"{self.owner.memory_limit // 2 ** 20} MiB ({rss // 2 ** 20} MiB resident); its "
            f"process (pid {pid}) was killed"))

    def _cancel(self, outer: defer.Deferred) -> None:
        if self.child is not None:
            self._kill("canceled")
        self.owner._calls.pop(self.number, None)

    def _kill(self, why: str) -> Optional[int]:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        child = self.child
        if child is None:
            return None
        self.owner._killing(child, why)
        child.kill()
        return child.pid

    def done(self, result: Any) -> None:
        """The pool's answer: the outcome, or how the child ended."""
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.owner._calls.pop(self.number, None)
        if self.outer.called or self.owner.stopping:
            # (at a stop, a task still running is left like a thread task
            # still running: unsettled, unacked, delivered again)
            return
        if isinstance(result, Failure):
            if result.check(error.ProcessDone, error.ProcessTerminated, error.ConnectionLost,
                            error.ConnectionDone):
                pid = self.child.pid if self.child is not None else "?"
                self.outer.errback(ProcessLost(
                    f"the pool process (pid {pid}) running task {self.definition.name!r} "
                    f"{describe_end(result)}"))
            else:
                self.outer.errback(result)
            return
        outcome = result["outcome"]
        if "error" in outcome:
            self.outer.errback(remote_exception(outcome["error"]))
        else:
            self.outer.callback(outcome.get("result"))


class TaskProcessPool:
    """
    ``size`` child processes running ``executor="process"`` tasks.

    ``tasks`` are the worker's task modules (each child imports them);
    ``max_tasks_per_child`` (0: never) recycles a child after that many
    tasks; ``memory_limit`` (bytes of resident memory, ``None``: none)
    kills a child over it (read every ``memory_check_interval`` seconds
    while it runs a task, and after each task).
    """

    def __init__(self, reactor: Any, size: int, tasks: Iterable[str], *,
                 max_tasks_per_child: int = 0, memory_limit: Optional[int] = None,
                 memory_check_interval: float = MEMORY_CHECK_INTERVAL,
                 expected: Iterable[str] = (), env: Optional[Mapping[str, str]] = None) -> None:
        if size < 1:
            raise ConfigurationError(f"the process pool needs at least 1 process, not {size}")
        if memory_limit is not None and resident_memory(os.getpid()) is None:
            raise ConfigurationError("a process memory limit needs Linux's /proc to read "
                                     "the resident memory of the pool's processes")
        self.reactor = reactor
        self.size = size
        self.tasks = list(tasks)
        self.max_tasks_per_child = max_tasks_per_child
        self.memory_limit = memory_limit
        self.memory_check_interval = memory_check_interval
        #: Names of the process tasks the worker routes here (each child must have them).
        self.expected = sorted(expected)
        self.env = dict(os.environ if env is None else env)
        self._calls: dict[int, _Call] = {}
        self._numbers = itertools.count(1)
        self._pool: Optional[_AmpoulePool] = None
        self._kill_reasons: dict[_Child, str] = {}
        self._memory_check: Optional[LoopingCall] = None
        self.stopping = False
        self._early_deaths = 0
        #: Children that ended, by reason (timeout, canceled, memory, died,
        #: recycled, memory_recycled): each was replaced while the pool ran.
        self.ended = collections.Counter()

    # -- figures -------------------------------------------------------------

    @property
    def children(self) -> int:
        """Children alive now, and not on their way out."""
        if self._pool is None:
            return 0
        return sum(1 for child in self._pool.processes if not child.ended)

    @property
    def busy(self) -> int:
        """Children running a task now."""
        return len(self._pool.busy) if self._pool is not None else 0

    def pids(self) -> list[int]:
        """The pids of the children alive now."""
        if self._pool is None:
            return []
        return sorted(c.pid for c in self._pool.processes if c.pid is not None and not c.ended)

    # -- life ----------------------------------------------------------------

    def start(self) -> defer.Deferred:
        """
        Start the children; the Deferred fires once each answered with the
        process tasks it registered, or fails with
        :class:`~quebert.errors.ConfigurationError` when one lacks a task
        the worker expects or cannot start.
        """
        path = os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p)
        env = dict(self.env, PYTHONPATH=path)
        starter = _Starter(bootstrap=BOOTSTRAP, env=env, packages=("twisted", "quebert"))
        self._pool = _AmpoulePool(
            self, ampChild=_child_class(), ampParent=lambda: _Child(self), min=self.size,
            max=self.size, maxIdle=3600, recycleAfter=0, starter=starter,
            ampChildArgs=(str(os.getpid()), json.dumps(self.tasks)))
        self._pool.start()
        if self.memory_limit is not None:
            self._memory_check = LoopingCall(self._check_memory)
            self._memory_check.clock = self.reactor
            self._memory_check.start(self.memory_check_interval, now=False)
        log.info("process pool: {size} process(es){recycle}{memory}, pids {pids}",
                 size=self.size, pids=self.pids(),
                 recycle=f", recycled after {self.max_tasks_per_child} task(s)"
                 if self.max_tasks_per_child else "",
                 memory=f", {self.memory_limit // 2 ** 20} MiB resident memory at most"
                 if self.memory_limit else "")
        return defer.ensureDeferred(self._check_children())

    async def _check_children(self) -> None:
        answers = []
        for child in list(self._pool.processes):
            d = child.callRemote(ProcessTasks)
            d.addTimeout(START_TIMEOUT, self.reactor)
            answers.append(d)
        try:
            results = await defer.gatherResults(answers, consumeErrors=True)
        except defer.FirstError as e:
            failure = e.subFailure
            reason = (describe_end(failure) if failure.check(error.ProcessTerminated,
                                                               error.ProcessDone)
                      else failure.getErrorMessage() or failure.type.__name__)
            raise ConfigurationError(
                f"a pool process could not start: it {reason} (its output is in the log "
                "above)") from None
        for answer in results:
            missing = sorted(set(self.expected) - set(answer["names"]))
            if missing:
                raise ConfigurationError(
                    f"pool process {answer['pid']} does not register process task(s) "
                    f"{', '.join(missing)} after importing the task modules "
                    f"{', '.join(self.tasks) or '(none)'}: register process tasks at module "
                    "level, with @task, in a module given to --tasks")
            if self.memory_limit is not None:
                rss = resident_memory(answer["pid"]) or 0
                if rss >= self.memory_limit:
                    raise ConfigurationError(
                        f"the process memory limit ({self.memory_limit // 2 ** 20} MiB) is "
                        f"below what an idle pool process uses ({rss // 2 ** 20} MiB)")

    def stop(self, timeout: float = STOP_TIMEOUT) -> defer.Deferred:
        """
        Stop every child: a busy one is killed (the worker gave up on its
        task already: it stays unacked and the broker delivers it again),
        an idle one is asked to exit and killed after ``timeout`` seconds.
        """
        self.stopping = True
        pool = self._pool
        if pool is None:
            return defer.succeed(None)
        if self._memory_check is not None and self._memory_check.running:
            self._memory_check.stop()
        # (children being recycled are no longer in pool.processes, but
        # still have their end to wait for)
        children = list(pool._finishCallbacks)
        for child in list(pool.busy):
            child.kill()
        ended = list(pool._finishCallbacks.values())
        pool.stop()

        def kill_the_rest(_: Any) -> None:
            for child in children:
                child.kill()

        waiting = defer.DeferredList(ended, consumeErrors=True)
        waiting.addTimeout(timeout, self.reactor)
        return waiting.addBoth(kill_the_rest)

    # -- calls ---------------------------------------------------------------

    def run(self, definition: TaskDefinition, args: tuple, kwargs: Mapping[str, Any],
            timeout: Optional[float] = None) -> defer.Deferred:
        """
        Run ``definition`` in a child; fires with its result or fails with
        its error.  Cancelling the Deferred kills the child running it.
        """
        if self._pool is None or self.stopping:
            return defer.fail(ProcessLost("the process pool is not running"))
        try:
            task = current_task()
        except RuntimeError:
            current = None
        else:
            current = {"id": task.id, "name": task.name, "queue": task.queue,
                       "attempt": task.attempt, "context": dict(task.context),
                       "unique_name": task.unique_name, "origin": task.origin}
        number = next(self._numbers)
        call = _Call(self, number, definition, timeout)
        self._calls[number] = call
        d = self._pool.doWork(RunTask, call=number, name=definition.name, args=list(args),
                              kwargs=dict(kwargs), current=current)
        d.addBoth(call.done)
        return call.outer

    # -- children ------------------------------------------------------------

    def _killing(self, child: _Child, why: str) -> None:
        if child not in self._kill_reasons:
            self._kill_reasons[child] = why
            log.info("killing pool process {pid} ({why}); it will be replaced", pid=child.pid,
                     why={"timeout": "its task timed out", "canceled": "its task was canceled",
                          "memory": "over the memory limit"}.get(why, why))

    def _retire_reason(self, child: _Child, tasks_run: int) -> Optional[str]:
        if self.stopping:
            return None
        if self.max_tasks_per_child and tasks_run >= self.max_tasks_per_child:
            return "recycled"
        if self.memory_limit is not None and child.pid is not None:
            rss = resident_memory(child.pid)
            if rss is not None and rss > self.memory_limit:
                return "memory_recycled"
        return None

    def _retiring(self, child: _Child, why: str) -> None:
        self._kill_reasons.setdefault(child, why)
        log.info("pool process {pid} is replaced ({why})", pid=child.pid,
                 why="after its task, over the memory limit" if why == "memory_recycled"
                 else f"after {self.max_tasks_per_child} task(s)")

    def _child_ended(self, child: _Child, reason: Any) -> None:
        why = self._kill_reasons.pop(child, None)
        if self.stopping:
            return
        if why is None:
            why = "died"
            if isinstance(reason, Failure):
                log.warn("pool process {pid} {how}; replacing it", pid=child.pid,
                         how=describe_end(reason))
        self.ended[why] += 1
        delay = 0.0
        if why == "died" and not child.answered and (
                time.monotonic() - child.started_at < EARLY_DEATH):
            self._early_deaths += 1
            if self._early_deaths > 2:
                delay = min(5.0, 0.25 * 2 ** (self._early_deaths - 3))
                log.warn("pool processes die as they start; the next one starts in "
                         "{delay:.2f}s", delay=delay)
        else:
            self._early_deaths = 0
        self.reactor.callLater(delay, self._top_up)

    def _top_up(self) -> None:
        pool = self._pool
        if pool is None or self.stopping or pool.finished:
            return
        while len(pool.processes) < self.size:
            pool.startAWorker()

    def _check_memory(self) -> None:
        for call in list(self._calls.values()):
            child = call.child
            if child is None or call.outer.called or child.pid is None:
                continue
            rss = resident_memory(child.pid)
            if rss is not None and rss > self.memory_limit:
                log.warn("pool process {pid} uses {rss} MiB running task {task}, over the "
                         "limit of {limit} MiB; killing it", pid=child.pid,
                         rss=rss // 2 ** 20, task=call.definition.name,
                         limit=self.memory_limit // 2 ** 20)
                call.over_memory(rss)


def _child_class() -> type:
    from quebert.process.child import TaskChild

    return TaskChild
