"""
A small Guillotina application for the bridge's tests (``tests.test_bridge_guillotina_live``).

It uses the tasks of ``tests.guillotina_bridge_tasks``, and registers a container endpoint
``POST @bridge-test-enqueue`` that publishes through ``add_task``, the
decorated task or ``add_url_task`` as its JSON body says,
``POST @bridge-test-result`` that waits for a task's result with
``get_result`` (the value, or a 412 naming the error), a callback
endpoint ``POST @bridge-test-callback`` that only ``quebert.RunTask`` may
call, ``GET @bridge-test-modules`` that says whether a Twisted reactor was
imported (it never should be, in this asyncio process), and an
*operator*: a bearer token ``OPERATOR_TOKEN`` authenticated as a principal
whose role has ``guillotina.ManageAMQP`` but not ``guillotina.DebugAMQP``.
"""

from __future__ import annotations

import sys

from guillotina import configure
from guillotina.auth.users import GuillotinaUser
from guillotina.interfaces import IContainer
from guillotina.response import HTTPPreconditionFailed
from guillotina.utils import get_authenticated_user_id

from quebert.bridge.guillotina import add_task, add_url_task, get_result
from quebert.errors import QuebertError
from tests.guillotina_bridge_tasks import touch

OPERATOR_TOKEN = "operator-token-0123456789abcdef"
OPERATOR_ROLE = "bridge_test.Operator"


class OperatorValidator:
    """Authenticates ``Bearer OPERATOR_TOKEN`` as the ``operator`` principal (tests only)."""

    for_validators = ("bearer",)

    async def validate(self, token):
        if token.get("type") == "bearer" and token.get("token") == OPERATOR_TOKEN:
            return GuillotinaUser(user_id="operator", roles={OPERATOR_ROLE: 1})
        return None


def includeme(root) -> None:
    configure.scan("tests.guillotina_bridge_app")


configure.role(OPERATOR_ROLE, "Operator of the bridge tests", local=False)
configure.grant(permission="guillotina.ManageAMQP", role=OPERATOR_ROLE)


@configure.service(context=IContainer, method="POST", name="@bridge-test-enqueue",
                   permission="guillotina.ModifyContent")
async def enqueue(context, request):
    data = await request.json()
    kind = data.get("kind")
    try:
        if kind == "add_task":
            task_id = await add_task(data.get("task", "bridge_test.plain"),
                                     *data.get("args", []), **data.get("kwargs", {}))
        elif kind == "decorated":
            task_id = await touch(*data.get("args", []), **data.get("kwargs", {}))
        elif kind == "url":
            task_id = await add_url_task(data["path"], method=data.get("method", "POST"),
                                         body=data.get("body", b""),
                                         headers=data.get("headers"))
        else:
            return HTTPPreconditionFailed(content={"reason": f"unknown kind {kind!r}"})
    except QuebertError as e:
        return HTTPPreconditionFailed(content={"reason": str(e), "type": type(e).__name__})
    return {"task_id": task_id, "has_task_id": task_id.task_id == task_id}


@configure.service(context=IContainer, method="POST", name="@bridge-test-result",
                   permission="guillotina.ModifyContent")
async def result(context, request):
    data = await request.json()
    try:
        value = await get_result(data["task_id"], timeout=data.get("timeout"))
    except QuebertError as e:
        return HTTPPreconditionFailed(content={"reason": str(e), "type": type(e).__name__})
    return {"result": value}


@configure.service(context=IContainer, method="POST", name="@bridge-test-callback",
                   permission="quebert.RunTask")
async def callback(context, request):
    return {"user": get_authenticated_user_id(), "body": await request.json()}


@configure.service(context=IContainer, method="GET", name="@bridge-test-modules",
                   permission="guillotina.AccessContent")
async def modules(context, request):
    return {"twisted.internet.reactor": "twisted.internet.reactor" in sys.modules}
