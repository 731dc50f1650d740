"""
The tasks of the Guillotina example, run by a quebert worker.

Decorated with the bridge's ``@task``: the Guillotina application enqueues
them by calling them (``await send_receipt(...)``), the worker loads this
module with ``--tasks examples.guillotina_app.shop_tasks`` and runs them.
Importing it needs neither Guillotina nor aio-pika, so the worker does not
have to install them.  What the request looked like (database, container,
user) reaches a task as plain data: :func:`quebert.current_task`'s
``context``, never the caller's credentials.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.task import deferLater

from quebert import current_task
from quebert.bridge.guillotina import task

QUEUE = "guillotina-example"


@task(name="shop.send_receipt", queue=QUEUE, max_attempts=3, min_backoff=1)
async def send_receipt(order_id: str, email: str) -> dict:
    """Pretend to e-mail a receipt; the result says for which container and user."""
    context = current_task().context
    return {"order": order_id, "sent_to": email, "db": context.get("db_id"),
            "container": context.get("container_id"), "ordered_by": context.get("user_id")}


@task(name="shop.monthly_report", queue=QUEUE)
async def monthly_report(month: str, seconds: float = 1.0) -> str:
    """A slow task, there to be cancelled."""
    await deferLater(reactor, seconds, lambda: None)
    return f"report for {month}"


@task(name="shop.legacy_cleanup", queue=QUEUE, aliases=("old_shop.tasks.cleanup",))
def legacy_cleanup(days: int) -> dict:
    """
    Still published by an old guillotina_amqp producer under its dotted
    name ``old_shop.tasks.cleanup``: the alias maps it to this task.
    """
    context = current_task().context
    return {"cleaned_days": days, "container": context.get("container_id")}
