# -*- test-case-name: tests.test_process -*-
"""
The child side of the process pool: one task at a time, registered tasks only.

A child is started by the worker's pool (:mod:`quebert.process.pool`) with
the worker's pid and its ``--tasks`` modules.  It first makes sure it will
not outlive the worker (Linux ``PR_SET_PDEATHSIG``: the kernel sends it
SIGKILL when the worker dies, even by ``kill -9``; and it exits as soon as
its AMP pipe to the worker closes), ignores SIGINT (a Ctrl-C in a terminal
reaches the whole process group; the worker decides when its children
stop), imports the same task modules as the worker, so that the same names
are registered, and answers :class:`~quebert.process.commands.RunTask`
calls on its pipe.

A task runs on the child's main thread, blocking the child's reactor until
it returns: one task per child at a time, which is what lets the worker
kill the child to stop the task.  Only a task registered with
``executor="process"`` runs, looked up by name in the child's registry;
nothing is ever imported by a name a message gave.
"""

from __future__ import annotations

import contextvars
import ctypes
import importlib
import inspect
import json
import os
import signal
import sys
import traceback
import types
from typing import Any, Optional, Sequence

from ampoule.child import AMPChild
from twisted.internet import defer

from quebert.current import CurrentTask, running_task
from quebert.process.commands import ProcessTasks, RunTask
from quebert.registry import PROCESS, Registry, default_registry

#: ``prctl`` option: the signal the kernel sends this process when its parent dies.
PR_SET_PDEATHSIG = 1
#: Exit status of a child whose worker was gone before it could watch it,
#: and of a child that could not import the worker's task modules.
EXIT_ORPHAN = 70
EXIT_IMPORT = 71
#: The longest traceback text sent back, in characters (its end is kept).
TRACEBACK_LIMIT = 8000


def die_with_parent(parent_pid: int) -> bool:
    """
    Ask the kernel to SIGKILL this process when ``parent_pid`` dies; exit at
    once if it is already gone (it died before the request was made).
    Returns whether the request could be made (Linux only).
    """
    asked = False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        asked = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (AttributeError, OSError):
        pass  # not Linux: the child still exits when its pipe to the worker closes
    if os.getppid() != parent_pid:
        os._exit(EXIT_ORPHAN)
    return asked


def error_outcome(exc: BaseException, tb: Optional[str] = None) -> dict:
    """The ``{"error": ...}`` outcome describing ``exc``."""
    cls = type(exc)
    if tb is None:
        tb = "".join(traceback.format_exception(cls, exc, exc.__traceback__))
    try:
        message = str(exc)
    except Exception:
        message = f"<unprintable {cls.__qualname__}>"
    return {"error": {"module": cls.__module__, "qualname": cls.__qualname__,
                      "message": message, "traceback": tb[-TRACEBACK_LIMIT:]}}


def current_from(data: Optional[dict]) -> Optional[CurrentTask]:
    """The :class:`~quebert.current.CurrentTask` sent with a call, or ``None``."""
    if not data:
        return None
    return CurrentTask(id=data["id"], name=data["name"], queue=data["queue"],
                       attempt=data["attempt"],
                       context=types.MappingProxyType(dict(data.get("context") or {})),
                       unique_name=data.get("unique_name"), origin=data.get("origin", "quebert"))


def run_task(registry: Registry, name: str, args: Sequence[Any], kwargs: dict,
             current: Optional[dict]) -> bytes:
    """
    Run registered process task ``name`` here and now; the outcome as JSON
    bytes.  Never raises: the task's error, an unknown name or a result
    that is not JSON is an ``{"error": ...}`` outcome.
    """
    from quebert.errors import InvalidResult, UnknownTask

    definition = registry.lookup(name)
    if definition is None or definition.executor != PROCESS:
        what = "not registered" if definition is None else (
            f"registered with executor={definition.executor!r}, not 'process',")
        exc = UnknownTask(f"task {name!r} is {what} in this pool process "
                          "(is its module in the worker's --tasks?)", field="task")
        return json.dumps(error_outcome(exc, tb="")).encode()
    context = contextvars.Context()
    try:
        result = context.run(_call, definition, tuple(args), kwargs, current_from(current))
    except BaseException as e:
        return json.dumps(error_outcome(e)).encode()
    try:
        return json.dumps({"result": result}, separators=(",", ":"),
                          allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as e:
        exc = InvalidResult(f"task {name!r} returned a {type(result).__name__} that is not "
                            f"JSON: {e}")
        return json.dumps(error_outcome(exc, tb="")).encode()


def _call(definition: Any, args: tuple, kwargs: dict, current: Optional[CurrentTask]) -> Any:
    if current is not None:
        running_task.set(current)
    result = definition.fn(*args, **kwargs)
    if inspect.isawaitable(result) or isinstance(result, defer.Deferred):
        if inspect.iscoroutine(result):
            result.close()
        raise TypeError(f"task {definition.name!r} returned {type(result).__name__} in a "
                        "pool process; a process task is a plain function (register it "
                        "with executor='reactor' instead)")
    return result


class TaskChild(AMPChild):
    """
    The AMP end of one pool child.  Built by :func:`main` with the
    worker's pid and its task modules (a JSON list), both as strings.
    """

    def __init__(self, parent_pid: str, tasks: str) -> None:
        super().__init__()
        self.registry = default_registry
        for module in json.loads(tasks):
            try:
                importlib.import_module(module)
            except BaseException:
                sys.stderr.write(f"pool process {os.getpid()}: importing tasks module "
                                 f"{module!r} failed:\n{traceback.format_exc()}")
                sys.stderr.flush()
                os._exit(EXIT_IMPORT)

    @RunTask.responder
    def run(self, call: int, name: str, args: list, kwargs: dict,
            current: Optional[dict]) -> dict:
        return {"outcome": run_task(self.registry, name, args, kwargs, current)}

    @ProcessTasks.responder
    def process_tasks(self) -> dict:
        names = sorted(n for n in self.registry if self.registry.lookup(n).executor == PROCESS)
        return {"names": names, "pid": os.getpid()}


def main(argv: Sequence[str]) -> None:
    """
    A child's life: ``argv`` is the worker's pid, its task modules (JSON),
    a reactor name and the dotted name of the AMP child class, as ampoule's
    process starter passes them.  The reactor is the platform's default
    (importing ampoule installs it).
    """
    parent_pid, tasks, _reactor_name, child_path = argv[-4:]
    die_with_parent(int(parent_pid))
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from twisted import logger

    levels = logger.LogLevelFilterPredicate(defaultLogLevel=logger.LogLevel.info)
    for namespace in ("twisted.protocols.amp", "twisted.internet.base", "ampoule"):
        # a line per child start and stop from each: the worker logs what matters
        levels.setLogLevelForNamespace(namespace, logger.LogLevel.warn)
    observer = logger.FilteringLogObserver(logger.textFileLogObserver(sys.stderr), [levels])
    logger.globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    from ampoule.main import FROM_CHILD, TO_CHILD
    from twisted.internet import reactor, stdio
    from twisted.python import reflect

    child = reflect.namedAny(child_path)(parent_pid, tasks)
    stdio.StandardIO(child, TO_CHILD, FROM_CHILD)
    # No signal handlers: SIGTERM ends a child at once, whatever it runs.
    reactor.run(installSignalHandlers=False)
