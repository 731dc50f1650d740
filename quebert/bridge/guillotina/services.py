# -*- test-case-name: tests.test_bridge_guillotina_live -*-
"""
The ``@amqp-tasks`` endpoints of a container, as guillotina_amqp had them.

``GET @amqp-tasks``
    the ids of the tasks published from this container, newest first (at
    most :data:`~quebert.bridge.guillotina.state.LIST_LIMIT`), those
    whose record expired left out.
``GET @amqp-tasks/{task_id}``
    the task's quebert state record (as ``quebert status`` shows it); with
    ``guillotina.DebugAMQP``, also ``job_data``: the message (arguments,
    or the request of a URL task, and the context).
``DELETE @amqp-tasks/{task_id}``
    cancel the task as ``quebert cancel`` does; answers its record.  A
    task that already succeeded or failed is left alone: ``409``.

All three need ``guillotina.ManageAMQP``, as in guillotina_amqp 3 (a
record holds results and tracebacks: not for every reader of the
container), and only that: they are declared ``allow_access`` so that
Guillotina's traversal does not also ask for ``guillotina.AccessContent``
(which ``guillotina.Manager`` does not have).  A task id that was not
published from this container is ``404 {"reason": "Task not found"}``,
like an unknown one: membership is read from the bridge's per-container
index, never from the id's text.
"""

from __future__ import annotations

from guillotina import configure
from guillotina.interfaces import IContainer
from guillotina.response import HTTPConflict, HTTPNotFound, HTTPServiceUnavailable
from guillotina.utils import get_current_db, get_security_policy

from quebert.bridge.guillotina.bridge import get_bridge
from quebert.bridge.guillotina.permissions import DEBUG_AMQP, MANAGE_AMQP
from quebert.bridge.guillotina.state import container_key
from quebert.errors import QuebertError
from quebert.state.interface import CANCELED, FINISHED_STATES


def _not_found() -> HTTPNotFound:
    return HTTPNotFound(content={"reason": "Task not found"})


def _unavailable(error: Exception) -> HTTPServiceUnavailable:
    return HTTPServiceUnavailable(content={"reason": f"quebert is not reachable: {error}"})


def _container(context) -> str:
    return container_key(get_current_db().id, context.id)


@configure.service(context=IContainer, method="GET", name="@amqp-tasks",
                   permission=MANAGE_AMQP, allow_access=True,
                   summary="Ids of this container's quebert tasks")
async def list_tasks(context, request):
    try:
        return await get_bridge().state.list(_container(context))
    except QuebertError as e:
        return _unavailable(e)


@configure.service(context=IContainer, method="GET", name="@amqp-tasks/{task_id}",
                   permission=MANAGE_AMQP, allow_access=True,
                   summary="State of one of this container's tasks")
async def info_task(context, request):
    task_id = request.matchdict["task_id"]
    state = get_bridge().state
    try:
        if not await state.belongs(_container(context), task_id):
            return _not_found()
        record = await state.get(task_id)
        if record is None:
            return _not_found()
        if get_security_policy().check_permission(DEBUG_AMQP, context):
            record["job_data"] = await state.job(task_id)
    except QuebertError as e:
        return _unavailable(e)
    return record


@configure.service(context=IContainer, method="DELETE", name="@amqp-tasks/{task_id}",
                   permission=MANAGE_AMQP, allow_access=True,
                   summary="Cancel one of this container's tasks")
async def cancel_task(context, request):
    task_id = request.matchdict["task_id"]
    bridge = get_bridge()
    try:
        if not await bridge.state.belongs(_container(context), task_id):
            return _not_found()
        old = await bridge.cancel(task_id, "canceled through @amqp-tasks")
        if old is None:
            return _not_found()
        record = await bridge.state.get(task_id)
    except QuebertError as e:
        return _unavailable(e)
    if old in FINISHED_STATES and old != CANCELED:
        return HTTPConflict(content={"reason": f"Task already {old}", "state": old,
                                     "task": record})
    return record
