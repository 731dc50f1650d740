"""
The Guillotina application of the example: a shop that queues work for
quebert workers.

Loaded with ``"applications": ["quebert.bridge.guillotina",
"examples.guillotina_app.shop_app"]``.  Endpoints on containers:

``POST @orders`` ``{"order_id": ..., "email": ...}``
    Queues a call task (``shop.send_receipt``) and a URL task that calls
    back into this application (``POST @order-shipped``).  Answers both
    task ids.
``POST @order-shipped``
    The callback: only the workers may call it (permission
    ``quebert.RunTask``, held by the service principal the workers'
    service token authenticates as).
``POST @reports`` ``{"month": ..., "countdown": ...}``
    Queues ``shop.monthly_report``, to be cancelled with
    ``DELETE @amqp-tasks/{id}``.

The bridge adds ``@amqp-tasks`` (list, read, cancel) itself.
"""

from __future__ import annotations

import json

from guillotina import configure
from guillotina.interfaces import IContainer
from guillotina.response import HTTPPreconditionFailed
from guillotina.utils import get_authenticated_user_id

from examples.guillotina_app.shop_tasks import monthly_report, send_receipt
from quebert.bridge.guillotina import add_url_task


def includeme(root) -> None:
    configure.scan("examples.guillotina_app.shop_app")


@configure.service(context=IContainer, method="POST", name="@orders",
                   permission="guillotina.ModifyContent")
async def create_order(context, request):
    data = await request.json()
    order_id, email = data.get("order_id"), data.get("email")
    if not isinstance(order_id, str) or not isinstance(email, str):
        return HTTPPreconditionFailed(content={"reason": "order_id and email are strings"})
    receipt = await send_receipt(order_id, email)
    shipping = await add_url_task("@order-shipped", body=json.dumps({"order_id": order_id}),
                                  headers={"Content-Type": "application/json"})
    return {"receipt_task": receipt, "shipping_task": shipping}


@configure.service(context=IContainer, method="POST", name="@order-shipped",
                   permission="quebert.RunTask")
async def order_shipped(context, request):
    data = await request.json()
    return {"shipped": data.get("order_id"), "container": context.id,
            "called_by": get_authenticated_user_id()}


@configure.service(context=IContainer, method="POST", name="@reports",
                   permission="guillotina.ModifyContent")
async def create_report(context, request):
    data = await request.json()
    task_id = await monthly_report(data.get("month", "2026-11"),
                                   _countdown=float(data.get("countdown", 60)))
    return {"report_task": task_id}
