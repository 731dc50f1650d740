"""
What quebert 0.1 declared on the broker with its default settings
(classic queues), written out literally, so that the upgrade tests keep
testing against the release that is deployed even when today's topology
code changes.  Blocking pika: run it in a thread.
"""

from __future__ import annotations

import json
import time
import uuid

import pika

LEVELS = 32
EXCHANGE = "quebert"
ERRORED_TTL_MS = 7 * 24 * 3600 * 1000


def declare(channel, queues: list[str]) -> None:
    """quebert 0.1's ``declare_delays`` and ``declare_queue`` for ``queues``."""
    channel.exchange_declare(f"{EXCHANGE}.control", "fanout", durable=True)
    channel.exchange_declare(EXCHANGE, "direct", durable=True)
    deliver = f"{EXCHANGE}.delay.deliver"
    channel.exchange_declare(deliver, "topic", durable=True)
    for level in range(LEVELS):
        channel.exchange_declare(f"{EXCHANGE}.delay.{level:02d}", "topic", durable=True)
    for level in range(LEVELS):
        name = f"{EXCHANGE}.delay.{level:02d}"
        prefix = "*." * (LEVELS - 1 - level)
        lower = f"{EXCHANGE}.delay.{level - 1:02d}" if level else deliver
        channel.queue_declare(name, durable=True, arguments={
            "x-message-ttl": 2**level, "x-dead-letter-exchange": lower})
        channel.queue_bind(name, name, routing_key=prefix + "1.#")
        channel.exchange_bind(destination=lower, source=name, routing_key=prefix + "0.#")
    for queue in queues:
        channel.queue_declare(queue, durable=True, arguments={})
        channel.queue_bind(queue, EXCHANGE, routing_key=queue)
        channel.queue_bind(queue, deliver, routing_key="*." * LEVELS + queue)
        channel.queue_declare(f"{queue}.errored", durable=True,
                              arguments={"x-message-ttl": ERRORED_TTL_MS})


def body(task: str, *args, delay: float = 0.0) -> tuple[str, bytes]:
    """``(id, body)`` of a version-1 call message, as 0.1's Client wrote it."""
    task_id = uuid.uuid4().hex
    now = time.time()
    message = {"version": 1, "id": task_id, "kind": "call", "task": task,
               "args": list(args), "kwargs": {}, "created_at": now}
    if delay:
        message["eta"] = now + delay
    return task_id, json.dumps(message).encode()


def publish(channel, queue: str, task_id: str, payload: bytes, delay_ms: int = 0) -> None:
    """Publish as 0.1 did: straight to the main exchange, or into its delay levels."""
    properties = pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                      message_id=task_id, headers={})
    if delay_ms:
        key = ".".join(list(format(delay_ms, f"0{LEVELS}b")) + [queue])
        exchange = f"{EXCHANGE}.delay.{delay_ms.bit_length() - 1:02d}"
    else:
        exchange, key = EXCHANGE, queue
    channel.basic_publish(exchange, key, payload, properties, mandatory=True)
