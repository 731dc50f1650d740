# -*- test-case-name: tests.test_registry -*-
"""
Registered tasks: the only code a message can make a worker run.

``@task`` registers a function under a name (``<module>.<qualname>`` by
default) in the default :class:`Registry`.  Calling the decorated function
enqueues it through the default client and returns a ``Deferred`` firing
with the task's :class:`~quebert.client.TaskInfo`; ``.run(...)`` calls the
original function directly.

A worker imports the modules named by ``--tasks``; a message can only name
a task registered that way, never a dotted path to import.

*Aliases* are further names of a registered task: the dotted paths that
guillotina_amqp producers put in ``func``, or the old name of a renamed
task.  ``@task(aliases=("old.name",))``, :meth:`Registry.alias`, or the
worker's ``legacy_tasks`` config block declare them; a message naming an
alias runs (and is recorded as) the task it points to.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import attrs

from quebert import _default_client
from quebert.errors import ConfigurationError, InvalidMessage, UnknownTask
from quebert.protocol import _NAME_RE, QUEUE_RE
from quebert.retry import RETRY_FIELDS

#: How a task's callable is run: in the worker's thread pool, on the reactor,
#: or in the worker's pool of processes (:mod:`quebert.process`).
THREAD = "thread"
REACTOR = "reactor"
PROCESS = "process"
EXECUTORS = (THREAD, REACTOR, PROCESS)


def _runs_on_reactor(fn: Callable) -> bool:
    """``async def`` and ``inlineCallbacks`` functions run on the reactor."""
    target = inspect.unwrap(fn)
    return inspect.iscoroutinefunction(target) or inspect.isgeneratorfunction(target)


def _check_process_function(fn: Callable[..., Any], name: str) -> None:
    """
    A process task's function runs in a pool child, which registers it by
    importing the same module: it must be a plain function defined at a
    module's top level.  ConfigurationError otherwise.
    """
    if _runs_on_reactor(fn):
        raise ConfigurationError(
            f"task {name!r} is an async def or generator function: it cannot run with "
            "executor='process' (a pool process runs a plain function to its end); use "
            "executor='reactor', or make it a plain function")
    qualname = getattr(fn, "__qualname__", None)
    module = getattr(fn, "__module__", None)
    if not qualname or not module or "<" in qualname:
        what = ("a lambda" if qualname and "<lambda>" in qualname
                else "a function defined inside another function" if qualname
                else f"a {type(fn).__name__}")
        raise ConfigurationError(
            f"task {name!r} is {what}: with executor='process' it must be a function "
            "defined at the top level of a module, which the pool processes import")
    if module == "__main__":
        raise ConfigurationError(
            f"task {name!r} is defined in __main__: with executor='process' it must be "
            "defined in an importable module given to the worker's --tasks")


def _signature(fn: Callable[..., Any]) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _positional_arity(signature: Optional[inspect.Signature]) -> Optional[tuple]:
    """
    ``(min, max)`` positional arguments when any count in that range binds
    without keyword arguments (``max`` None: ``*args``), or None when that
    cannot be told without :meth:`inspect.Signature.bind`.
    """
    if signature is None:
        return None
    low, high = 0, 0
    for param in signature.parameters.values():
        kind = param.kind
        if kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            if high is not None:
                high += 1
            if param.default is param.empty:
                if high is None or low + 1 != high:
                    return None  # a required parameter after an optional one: let bind tell
                low += 1
        elif kind == param.VAR_POSITIONAL:
            high = None
        elif kind == param.KEYWORD_ONLY:
            if param.default is param.empty:
                return None
    return (low, high)


@attrs.frozen
class TaskDefinition:
    """A registered task: its name, callable and default options."""

    name: str
    fn: Callable[..., Any]
    queue: Optional[str] = None
    retry: Mapping[str, Any] = attrs.field(factory=dict)
    timeout: Optional[float] = None
    executor: str = THREAD

    signature: Optional[inspect.Signature] = attrs.field(
        default=attrs.Factory(lambda self: _signature(self.fn), takes_self=True),
        eq=False, repr=False)
    _arity: Optional[tuple] = attrs.field(
        init=False, default=attrs.Factory(lambda self: _positional_arity(self.signature),
                                          takes_self=True),
        eq=False, repr=False)

    def bind(self, args: tuple, kwargs: Mapping[str, Any], task_id: Optional[str] = None) -> None:
        """
        Check that ``args`` and ``kwargs`` fit the function's signature,
        raising :class:`InvalidMessage` naming the mismatch.
        """
        signature = self.signature
        if signature is None:
            return
        arity = self._arity
        if arity is not None and not kwargs and len(args) >= arity[0] and (
                arity[1] is None or len(args) <= arity[1]):
            return  # the common case, without the cost of Signature.bind
        try:
            signature.bind(*args, **kwargs)
        except TypeError as e:
            raise InvalidMessage(
                f"arguments do not fit task {self.name!r}{signature}: {e}",
                field="args",
                task_id=task_id,
            )


class Registry:
    """A name -> :class:`TaskDefinition` map with clear errors."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskDefinition] = {}
        #: alias -> registered name
        self._aliases: dict[str, str] = {}

    def register(
        self,
        fn: Callable[..., Any],
        name: Optional[str] = None,
        *,
        queue: Optional[str] = None,
        timeout: Optional[float] = None,
        executor: Optional[str] = None,
        aliases: Iterable[str] = (),
        **retry: Any,
    ) -> TaskDefinition:
        """
        Register ``fn``; re-registering the same function is harmless.
        ``aliases`` are further names messages may use (see :meth:`alias`).
        """
        name = name or f"{fn.__module__}.{fn.__qualname__}"
        if not _NAME_RE.fullmatch(name):
            raise ConfigurationError(f"{name!r} is not a valid task name")
        if name in self._aliases:
            raise ConfigurationError(
                f"task name {name!r} is already an alias of {self._aliases[name]!r}")
        if isinstance(aliases, str):
            raise ConfigurationError(
                f"aliases of task {name!r} must be a list of names, not the string {aliases!r}")
        if queue is not None and not QUEUE_RE.fullmatch(queue):
            raise ConfigurationError(f"{queue!r} is not a valid queue name")
        unknown = set(retry) - set(RETRY_FIELDS)
        if unknown:
            raise ConfigurationError(
                f"unknown option(s) for task {name!r}: {', '.join(sorted(unknown))}"
            )
        if executor is None:
            executor = REACTOR if _runs_on_reactor(fn) else THREAD
        if executor not in EXECUTORS:
            raise ConfigurationError(
                f"executor must be {THREAD!r}, {REACTOR!r} or {PROCESS!r}, not {executor!r}")
        if executor == PROCESS:
            _check_process_function(fn, name)
        definition = TaskDefinition(
            name=name,
            fn=fn,
            queue=queue,
            retry={k: v for k, v in retry.items() if v is not None},
            timeout=timeout,
            executor=executor,
        )
        existing = self._tasks.get(name)
        if existing is not None and inspect.unwrap(existing.fn) is not inspect.unwrap(fn):
            # Reloading a module registers new function objects for the same
            # code; only a different function under the same name is an error.
            if (existing.fn.__module__, existing.fn.__qualname__) != (
                fn.__module__,
                fn.__qualname__,
            ):
                raise ConfigurationError(
                    f"task name {name!r} is already registered for "
                    f"{existing.fn.__module__}.{existing.fn.__qualname__}"
                )
        self._tasks[name] = definition
        try:
            for old in aliases:
                self.alias(old, name)
        except ConfigurationError:
            if existing is None:
                self.unregister(name)  # all or nothing
            raise
        return definition

    def alias(self, old: str, new: str) -> None:
        """
        Make messages naming ``old`` run the task registered as ``new``
        (an alias of an alias points to its task).  ``old`` must not be a
        registered name itself, nor an alias of another task; declaring the
        same alias again is harmless.  Raises :class:`ConfigurationError`.
        """
        if not isinstance(old, str) or not _NAME_RE.fullmatch(old):
            raise ConfigurationError(f"{old!r} is not a valid task name for an alias")
        target = self._aliases.get(new, new)
        if target not in self._tasks:
            raise ConfigurationError(
                f"cannot make {old!r} an alias of {new!r}: no task is registered as {new!r} "
                "(is its module in --tasks?)")
        if old in self._tasks:
            raise ConfigurationError(
                f"cannot make {old!r} an alias of {target!r}: a task is registered as {old!r}")
        existing = self._aliases.get(old)
        if existing is not None and existing != target:
            raise ConfigurationError(
                f"{old!r} is already an alias of {existing!r}, not of {target!r}")
        self._aliases[old] = target

    @property
    def aliases(self) -> Mapping[str, str]:
        """A copy of the aliases: ``{alias: registered name}``."""
        return dict(self._aliases)

    def get(self, name: str, task_id: Optional[str] = None) -> TaskDefinition:
        """The definition of ``name`` (or of the task it aliases), or :class:`UnknownTask`."""
        try:
            return self._tasks[name]
        except KeyError:
            target = self._aliases.get(name)
            if target is not None:
                return self._tasks[target]
            raise UnknownTask(
                f"task {name!r} is not registered in this worker (is its module in --tasks?)",
                field="task",
                task_id=task_id,
            )

    def lookup(self, name: str) -> Optional[TaskDefinition]:
        """The definition of ``name`` (or of the task it is an alias of), or ``None``."""
        definition = self._tasks.get(name)
        if definition is None and name in self._aliases:
            definition = self._tasks[self._aliases[name]]
        return definition

    def find_function(self, fn: Callable[..., Any]) -> Optional[TaskDefinition]:
        """The definition registered for function ``fn``, or ``None``."""
        for definition in self._tasks.values():
            if definition.fn is fn:
                return definition
        return None

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self):
        return iter(sorted(self._tasks))

    def __len__(self) -> int:
        return len(self._tasks)

    def unregister(self, name: str) -> None:
        """Forget task ``name`` and its aliases."""
        self._tasks.pop(name, None)
        for old in [old for old, target in self._aliases.items() if target == name]:
            del self._aliases[old]


#: The registry ``@task`` uses unless told otherwise.
default_registry = Registry()


class TaskFunction:
    """
    What ``@task`` returns: calling it enqueues the task.

    ``.run(*args, **kwargs)`` calls the original function directly;
    ``.enqueue(*args, _client=None, **kwargs)`` enqueues through a given
    client (or the default one).
    """

    def __init__(self, definition: TaskDefinition) -> None:
        self.definition = definition
        self.name = definition.name
        self.__wrapped__ = definition.fn
        self.__doc__ = definition.fn.__doc__
        self.__name__ = getattr(definition.fn, "__name__", definition.name)
        self.__qualname__ = getattr(definition.fn, "__qualname__", definition.name)
        self.__module__ = definition.fn.__module__

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Call the task's function in this process, now."""
        return self.definition.fn(*args, **kwargs)

    def enqueue(self, *args: Any, _client: Any = None, **kwargs: Any):
        """Publish this task; returns a ``Deferred`` of its ``TaskInfo``."""
        client = _client if _client is not None else _default_client.get_client()
        return client.add_task(self.name, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any):
        return self.enqueue(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<quebert task {self.name}>"


def task(
    fn: Optional[Callable[..., Any]] = None,
    *,
    name: Optional[str] = None,
    queue: Optional[str] = None,
    timeout: Optional[float] = None,
    executor: Optional[str] = None,
    registry: Optional[Registry] = None,
    max_attempts: Optional[int] = None,
    max_retry_duration: Optional[float] = None,
    min_backoff: Optional[float] = None,
    max_backoff: Optional[float] = None,
    max_doublings: Optional[int] = None,
    jitter: Optional[float] = None,
    aliases: Iterable[str] = (),
) -> Union[TaskFunction, Callable[[Callable[..., Any]], TaskFunction]]:
    """
    Register a function as a task, with or without options::

        @task
        def add(x, y): ...

        @task(queue="high", max_attempts=10, min_backoff=5)
        async def fetch(url): ...

        @task(name="search.reindex", aliases=("guillotina_app.tasks.reindex",))
        async def reindex(path): ...

    ``aliases`` are further names messages may use, such as the dotted
    path a guillotina_amqp producer puts in ``func`` (see
    :meth:`Registry.alias`).

    ``async def`` and ``inlineCallbacks`` functions run on the reactor;
    other functions run in the worker's thread pool unless
    ``executor="reactor"`` says they return a Deferred, or
    ``executor="process"`` sends them to the worker's pool of processes
    (CPU-bound work; a timeout or a cancellation kills the process): a
    plain function defined at a module's top level, whose arguments and
    result are JSON.
    """

    def decorate(f: Callable[..., Any]) -> TaskFunction:
        definition = (registry if registry is not None else default_registry).register(
            f,
            name,
            queue=queue,
            timeout=timeout,
            executor=executor,
            max_attempts=max_attempts,
            max_retry_duration=max_retry_duration,
            min_backoff=min_backoff,
            max_backoff=max_backoff,
            max_doublings=max_doublings,
            jitter=jitter,
            aliases=aliases,
        )
        return TaskFunction(definition)

    if fn is not None:
        return decorate(fn)
    return decorate
