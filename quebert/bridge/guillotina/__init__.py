"""
Guillotina add-on: Guillotina 7 applications publish tasks to quebert workers.

Install the extra (``pip install quebert[guillotina]``) and load it as an
application::

    {"applications": ["quebert.bridge.guillotina"],
     "quebert": {"amqp_url": "amqp://...", "redis_url": "redis://...",
                 "callback_url": "http://guillotina.internal:8080",
                 "service_token": "..."}}

It connects to RabbitMQ (aio-pika, publisher confirms) and Redis
(redis-py) from Guillotina's loop at start-up and closes them at shutdown;
Twisted runs only in the workers.  It offers guillotina_amqp's API
(:func:`add_task`, :func:`task`, plus :func:`add_url_task`), waits for
results (:func:`get_result`, one Redis subscription per process), the
``@amqp-tasks`` endpoints on containers, guillotina_amqp's permissions and
a service-token validator for the workers' callbacks.  Keys of
``app_settings["quebert"]`` and their defaults: :data:`~.settings.DEFAULTS`.

Modules: ``settings`` (the checked settings), ``publisher`` (aio-pika),
``state`` (Redis: quebert's records, the per-container index), ``bridge``
(publish, cancel and wait, the running instance), ``api`` (the
publishing functions and ``get_result``), ``results`` (the waits on one
subscription), ``services``, ``permissions``, ``auth``, ``subscribers``.
"""

from quebert.bridge.guillotina.api import (
    FORBIDDEN_HEADERS,
    GuillotinaTask,
    TaskId,
    add_task,
    add_url_task,
    get_result,
    task,
)
from quebert.bridge.guillotina.settings import DEFAULTS

__all__ = [
    "FORBIDDEN_HEADERS",
    "GuillotinaTask",
    "TaskId",
    "add_task",
    "add_url_task",
    "app_settings",
    "get_result",
    "includeme",
    "task",
]

#: Guillotina merges these with the application's settings, key by key.
app_settings = {"quebert": dict(DEFAULTS)}


def includeme(root) -> None:
    """Register the permissions, the endpoints and the start-up/shutdown subscribers."""
    from guillotina import configure

    configure.scan("quebert.bridge.guillotina.permissions")
    configure.scan("quebert.bridge.guillotina.services")
    configure.scan("quebert.bridge.guillotina.subscribers")
