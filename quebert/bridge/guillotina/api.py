# -*- test-case-name: tests.test_bridge_guillotina -*-
"""
Publishing from Guillotina: ``add_task``, ``@task`` and ``add_url_task``;
waiting for a task's result: ``get_result``.

Shaped like guillotina_amqp's API (``await add_task(func, *args,
**kwargs)``, a ``@task`` whose call enqueues), publishing quebert
messages:

* A task is a function registered in quebert's registry (``@quebert.task``
  or this module's :func:`task`) or a registered name.  Nothing is
  pickled, nothing is imported by name: the worker runs what it
  registered under that name.  Arguments must be JSON; anything else
  raises :class:`~quebert.errors.SerializationError` at the call.
* Within a request on a container, the task id is
  ``task:{db_id}-{container_id}-{uuid4 hex}`` (guillotina_amqp's form,
  characters outside the protocol's id alphabet written ``_xx``) and the
  task is indexed under that container for its ``@amqp-tasks``
  endpoints.  Elsewhere the id is a plain quebert id.
* The request context a task may need travels as plain data in the
  message's ``context`` field: ``db_id``, ``container_id``, ``user_id``
  (the authenticated principal) and ``path`` (the request's object,
  within its container).  Nothing is taken from the request's headers:
  guillotina_amqp copied the caller's ``Authorization`` header into every
  message and its Redis record; quebert never does.  A URL task calling
  back into the application is authenticated by the worker
  (``dispatch.credentials``) with the service token, see ``auth.py``.

This module imports neither Guillotina nor aio-pika until a task is
published, so a module of tasks decorated with :func:`task` can be
imported by workers that do not have them installed.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Callable, Mapping, Optional, Union

from quebert import protocol
from quebert.errors import ConfigurationError
from quebert.registry import Registry, TaskFunction, default_registry
from quebert.registry import task as quebert_task

#: Request headers a URL task may not carry: credentials are the worker's
#: business (``dispatch.credentials``), never the message's.
FORBIDDEN_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})

_NOT_ID = re.compile(r"[^A-Za-z0-9_.\-]")
_ID_LIMIT = 200
_UUID_PART = 33  # "-" and 32 hex digits


class TaskId(str):
    """
    The id of a published task: a ``str``, with ``.task_id`` (itself) for
    code written against guillotina_amqp's ``TaskState``.
    """

    __slots__ = ()

    @property
    def task_id(self) -> str:
        return str(self)


def _id_part(value: str) -> str:
    """``value`` in the id alphabet: other characters as ``_`` and their hex code."""
    return _NOT_ID.sub(lambda m: "".join(f"_{b:02x}" for b in m.group().encode("utf-8")),
                       value)


def container_task_id(db_id: str, container_id: str) -> str:
    """
    A new id ``task:{db_id}-{container_id}-{uuid4 hex}`` (guillotina_amqp's
    form), within the protocol's 200 characters: long database and
    container ids are cut.  The id only helps a human: which container a
    task belongs to is kept in the bridge's index.
    """
    head = f"task:{_id_part(db_id)}-{_id_part(container_id)}"
    return head[:_ID_LIMIT - _UUID_PART] + "-" + uuid.uuid4().hex


def _request_scope() -> dict:
    """
    ``{"db_id", "container_id", "user_id", "path"}`` of the current
    request (keys missing outside a database or container), from
    Guillotina's task variables only.
    """
    from guillotina import task_vars
    from guillotina.utils import get_authenticated_user_id, get_content_path

    scope: dict = {}
    db = task_vars.db.get()
    if db is not None:
        scope["db_id"] = db.id
    container = task_vars.container.get()
    if container is not None and db is not None:
        scope["container_id"] = container.id
    user_id = get_authenticated_user_id()
    if user_id is not None:
        scope["user_id"] = user_id
    request = task_vars.request.get()
    resource = getattr(request, "resource", None) if request is not None else None
    if container is not None and db is not None:
        scope["path"] = get_content_path(resource if resource is not None else container)
    return scope


def _prepare(scope: dict) -> tuple:
    """(task id, container index key or None) for a task published within ``scope``."""
    from quebert.bridge.guillotina.state import container_key

    if "container_id" in scope:
        return (container_task_id(scope["db_id"], scope["container_id"]),
                container_key(scope["db_id"], scope["container_id"]))
    return protocol.new_task_id(), None


def _options(options: dict) -> None:
    stray = [k for k in options if k.startswith("_")]
    if stray:
        raise ConfigurationError(f"unknown task option(s): {', '.join(sorted(stray))} "
                                 "(known: _queue, _name, _countdown, _retry, _timeout)")


def _eta_of(countdown: Any, now: float) -> Optional[float]:
    if countdown is None:
        return None
    if isinstance(countdown, bool) or not isinstance(countdown, (int, float)) or countdown < 0:
        raise ConfigurationError(f"_countdown must be seconds >= 0, not {countdown!r}")
    return now + float(countdown)


def _resolve(func: Union[str, Callable, TaskFunction], registry: Registry) -> tuple:
    """(registered name, definition or None) of ``func``."""
    if isinstance(func, TaskFunction):
        return func.name, func.definition
    if isinstance(func, str):
        return func, registry.lookup(func)
    if callable(func):
        definition = registry.find_function(func)
        if definition is not None:
            return definition.name, definition
        raise ConfigurationError(
            f"{func!r} is not a registered task: decorate it with @quebert.task or "
            "quebert.bridge.guillotina.task (quebert never imports a function by name)")
    raise ConfigurationError(f"expected a task or a task name, not {func!r}")


async def add_task(func: Union[str, Callable, TaskFunction], *args: Any,
                   _queue: Optional[str] = None, _name: Optional[str] = None,
                   _countdown: Optional[float] = None, _retry: Optional[Mapping] = None,
                   _timeout: Optional[float] = None, **kwargs: Any) -> TaskId:
    """
    Publish a call of the registered task ``func`` (a task function or its
    registered name) with ``args`` and ``kwargs``; return its
    :class:`TaskId` once RabbitMQ confirmed it.

    Options: ``_queue`` (default: the task's, else
    ``app_settings["quebert"]["queue"]``), ``_name`` (a unique name, see
    ``docs/protocol.rst``), ``_countdown`` (seconds before it may run),
    ``_retry`` (retry-policy overrides) and ``_timeout`` (seconds per
    attempt).  Raises :class:`~quebert.errors.SerializationError` for
    arguments that are not JSON,
    :class:`~quebert.errors.InvalidMessage` for arguments that do not fit
    a task registered here, :class:`~quebert.errors.ConfigurationError`
    for a function nobody registered or an unknown ``_`` option,
    :class:`~quebert.errors.TaskAlreadyExists` for a name in use and
    :class:`~quebert.errors.BrokerError` when RabbitMQ cannot take it.
    """
    import time

    from quebert.bridge.guillotina.bridge import get_bridge

    _options(kwargs)
    name, definition = _resolve(func, default_registry)
    if definition is not None:
        definition.bind(tuple(args), kwargs)
    bridge = get_bridge()
    queue = _queue or (definition.queue if definition else None) or bridge.settings.queue
    scope = _request_scope()
    task_id, container = _prepare(scope)
    now = time.time()
    message, _ = protocol.build(name, args, kwargs, queue=queue, task_id=task_id,
                                eta=_eta_of(_countdown, now), name=_name,
                                retry=dict(_retry or {}), timeout=_timeout, now=now,
                                context=scope)
    await bridge.send(message, container)
    return TaskId(message.id)


def _callback_target(path_or_url: str, callback_url: Optional[str], scope: dict) -> str:
    """
    The absolute URL of a URL task: absolute URLs as they are; ``/path``
    under ``callback_url``; a relative path under the request's object
    (``{callback_url}/{db}/{container}{path}/{relative}``).  Never the
    request's ``Host`` header, which the caller controls.
    """
    if not isinstance(path_or_url, str) or not path_or_url:
        raise ConfigurationError(f"a URL task needs a URL or a path, not {path_or_url!r}")
    parts = protocol.urlsplit_safe(path_or_url)
    if parts is not None and parts.scheme:
        return path_or_url
    if callback_url is None:
        raise ConfigurationError(
            f"cannot resolve the path {path_or_url!r}: set app_settings[\"quebert\"]"
            "[\"callback_url\"] to this application's base URL as the workers reach it")
    if path_or_url.startswith("/"):
        return callback_url + path_or_url
    if "container_id" not in scope:
        raise ConfigurationError(
            f"the relative path {path_or_url!r} needs a request on a container; "
            "give a path starting with /")
    base = f"{callback_url}/{scope['db_id']}/{scope['container_id']}{scope['path']}"
    return base.rstrip("/") + "/" + path_or_url


async def add_url_task(path_or_url: str, method: str = "POST", body: Any = b"",
                       headers: Optional[Mapping[str, str]] = None, *,
                       queue: Optional[str] = None, countdown: Optional[float] = None,
                       name: Optional[str] = None, retry: Optional[Mapping] = None,
                       dispatch_deadline: Optional[float] = None) -> TaskId:
    """
    Publish a URL task: a worker sends this HTTP request, and any 2xx
    answer is success (``docs/url-tasks.rst``); return its :class:`TaskId`.

    ``path_or_url`` is an absolute ``http(s)`` URL, a path from the
    application's root (``/db/container/@hook``) or a path relative to the
    request's object (``@hook``); paths are resolved against
    ``app_settings["quebert"]["callback_url"]``.  ``body`` is bytes, text
    or a JSON object/array (sent as JSON).  ``headers`` may not hold
    ``Authorization``, ``Proxy-Authorization`` or ``Cookie``
    (:class:`~quebert.errors.ConfigurationError`): a worker adds the
    credentials of a callback URL itself.  The URL is checked against
    quebert's default URL policy (:class:`~quebert.errors.URLRefused`).
    """
    import time

    from quebert.bridge.guillotina.bridge import get_bridge
    from quebert.dispatch import URLPolicy, URLRequest

    headers = dict(headers or {})
    for key in headers:
        if isinstance(key, str) and key.strip().lower() in FORBIDDEN_HEADERS:
            raise ConfigurationError(
                f"a URL task may not carry a {key!r} header: credentials never travel in "
                "a message; the workers add them for the callback URL (their "
                "dispatch.credentials) and app_settings[\"quebert\"][\"service_token\"] "
                "authenticates them here")
    bridge = get_bridge()
    scope = _request_scope()
    url = _callback_target(path_or_url, bridge.settings.callback_url, scope)
    task_id, container = _prepare(scope)
    now = time.time()
    message, _ = protocol.build_url(
        url, method=method, headers=headers, body=body, queue=queue or bridge.settings.queue,
        task_id=task_id, eta=_eta_of(countdown, now), name=name, retry=dict(retry or {}),
        dispatch_deadline=dispatch_deadline, now=now, context=scope)
    URLPolicy().check_request(URLRequest(url=message.url, method=message.method,
                                         headers=message.headers, body=message.body))
    await bridge.send(message, container)
    return TaskId(message.id)


async def get_result(task_id: str, timeout: Optional[float] = None) -> Any:
    """
    Wait for the task ``task_id`` to finish and return its return value
    (JSON, as the worker recorded it), like quebert's ``Client.result``.

    Raises :class:`~quebert.errors.TaskFailed` (the remote error's
    ``type``, ``message`` and ``traceback``, the ``reason``, the
    ``attempts`` made) when it failed for good,
    :class:`~quebert.errors.TaskCanceled` when it was canceled,
    :class:`~quebert.errors.TaskNotFound` when the state store has no
    record of it as the wait starts (an unknown id, or one expired after
    ``state_ttl``), and :class:`~quebert.errors.ResultTimeout` when
    ``timeout`` seconds pass first; the task itself goes on.  A task that
    finished before the call answers at once.

    All the waits of the application share one Redis subscription
    (``docs/guillotina.rst``); nothing polls.  Cancelling the awaiting
    coroutine (the request went away) ends its wait.
    """
    from quebert.bridge.guillotina.bridge import get_bridge

    return await get_bridge().result(task_id, timeout)


class GuillotinaTask(TaskFunction):
    """
    What this module's :func:`task` returns: a registered quebert task
    whose call publishes it from Guillotina (``await fn(*args)`` returns
    the :class:`TaskId`).  ``.run(...)`` and ``.fn`` give the original
    function; a worker runs it like any ``@quebert.task``.
    """

    @property
    def fn(self) -> Callable[..., Any]:
        return self.definition.fn

    async def enqueue(self, *args: Any, **kwargs: Any) -> TaskId:  # type: ignore[override]
        """Publish this task through the Guillotina bridge."""
        return await add_task(self, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.enqueue(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<quebert guillotina task {self.name}>"


def task(fn: Optional[Callable[..., Any]] = None, *, registry: Optional[Registry] = None,
         **options: Any) -> Any:
    """
    ``@quebert.task`` (same options: ``name``, ``queue``, ``timeout``,
    ``executor``, retry fields) for Guillotina code: the function is
    registered in quebert's registry, and calling the result publishes it
    through the bridge::

        @task(queue="emails", max_attempts=5)
        def send_welcome(user_id): ...

        task_id = await send_welcome("alice")   # in a Guillotina request
        send_welcome.run("alice")               # calls the function here

    Only the default registry is supported, since :func:`add_task` resolves
    names there.
    """
    if registry is not None and registry is not default_registry:
        raise ConfigurationError("the Guillotina bridge publishes tasks of the default "
                                 "registry only")

    def decorate(f: Callable[..., Any]) -> GuillotinaTask:
        return GuillotinaTask(quebert_task(f, **options).definition)

    if fn is not None:
        return decorate(fn)
    return decorate
