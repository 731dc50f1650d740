"""
Look for secrets where quebert keeps things: every message waiting in the
example's queues (work, errored, the shared delay queues) and every Redis
key under the state prefix.  Messages are read without being acked, so they
stay where they are.

    python find_secrets.py AMQP_URL REDIS_URL PREFIX QUEUE SECRET...

Prints one line per finding, then ``N found``.
"""

from __future__ import annotations

import sys

import pika
import redis

from quebert.amqp.topology import LEVELS


def _queues(channel, queue: str) -> list:
    names = [queue, f"{queue}.errored"]
    names += [f"quebert.delay.{n:02d}" for n in range(LEVELS)]
    found = []
    for name in names:
        try:
            channel.queue_declare(queue=name, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            channel = channel.connection.channel()
            continue
        found.append(name)
    return found


def messages(amqp_url: str, queue: str):
    """``(queue, text)`` of every waiting message: body and headers."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        for name in _queues(channel, queue):
            channel = connection.channel()
            while True:
                method, properties, body = channel.basic_get(name, auto_ack=False)
                if method is None:
                    break
                yield name, f"{properties.headers!r} {body!r}"
            channel.close()  # unacked: they go back to their queue
    finally:
        connection.close()


def records(redis_url: str, prefix: str):
    """``(key, text)`` of every key under ``prefix``."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    for key in client.scan_iter(match=prefix + "*", count=500):
        kind = client.type(key)
        if kind == "hash":
            value = client.hgetall(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1)
        elif kind == "set":
            value = client.smembers(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "string":
            value = client.get(key)
        else:
            value = kind
        yield key, repr(value)


def main(amqp_url: str, redis_url: str, prefix: str, queue: str, *secrets: str) -> int:
    found = 0
    places = list(messages(amqp_url, queue)) + list(records(redis_url, prefix))
    for where, text in places:
        for secret in secrets:
            if secret and secret in text:
                found += 1
                print(f"a secret ({secret[:4]}...) in {where}")
    print(f"searched {len(places)} messages and keys")
    print(f"{found} found")
    return found


if __name__ == "__main__":
    sys.exit(1 if main(*sys.argv[1:]) else 0)
