"""
Publish one task exactly as an unmodified guillotina_amqp producer does.

guillotina_amqp publishes to a direct durable exchange (``guillotina`` by
default; here the workers' exchange) with the queue name as routing key,
a JSON body with ``func``, ``args``, ``kwargs``, ``task_id``,
``req_data`` (the caller's URL, method, headers, and its user, with the
``Authorization`` header), ``db_id`` and ``container_id``, and no content
type, no headers.  A quebert worker runs it: ``func`` is looked up in its
registry (``old_shop.tasks.cleanup`` is an alias of
``shop.legacy_cleanup``), ``req_data`` is dropped, credentials and all.

    python legacy_producer.py AMQP_URL EXCHANGE QUEUE    # prints the task id
"""

from __future__ import annotations

import json
import sys
import uuid

import pika

#: What the caller's request carried; the worker must keep none of it.
CALLER_AUTHORIZATION = "Basic cm9vdDpzZWNyZXQtb2YtdGhlLWNhbGxlcg=="


def main(amqp_url: str, exchange: str, queue: str) -> str:
    task_id = f"task:db-shop-{uuid.uuid4().hex}"
    body = {
        "func": "old_shop.tasks.cleanup",
        "args": [30],
        "kwargs": {},
        "task_id": task_id,
        "db_id": "db",
        "container_id": "shop",
        "req_data": {
            "url": "http://127.0.0.1:8080/db/shop/@cleanup?verbose=1",
            "method": "POST",
            "headers": {"Authorization": CALLER_AUTHORIZATION, "Accept": "*/*"},
            "user": {"id": "root", "roles": {"guillotina.Manager": 1}, "groups": [],
                     "Authorization": CALLER_AUTHORIZATION},
        },
    }
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.exchange_declare(exchange=exchange, exchange_type="direct", durable=True)
        channel.basic_publish(exchange=exchange, routing_key=queue, body=json.dumps(body),
                              properties=pika.BasicProperties(delivery_mode=2),
                              mandatory=True)
    finally:
        connection.close()
    return task_id


if __name__ == "__main__":
    print(main(*sys.argv[1:4]))
