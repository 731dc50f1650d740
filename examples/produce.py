"""
Enqueue the example tasks of ``examples/med.py``.

    python -m examples.produce [--amqp-url URL] [--redis-url URL]

Prints each task id; watch the worker's log to see them succeed, retry
and fail, and ``quebert status ID`` to read their state.
"""

from __future__ import annotations

import argparse

from twisted.internet import defer, task

from examples import med
from quebert import Client
from quebert.state import RedisStateManager, connect_redis


async def produce(reactor, amqp_url: str, redis_url: str, prefix: str = "quebert:") -> None:
    redis = connect_redis(redis_url, reactor=reactor)
    client = Client(amqp_url, reactor=reactor, state=RedisStateManager(redis, prefix=prefix))
    try:
        infos = [
            await med.add.enqueue(2, 3, _client=client),
            await med.greet.enqueue("quebert", _client=client),
            await med.flaky.enqueue("demo", failures=2, _client=client),
            await med.always_fails.enqueue(_client=client),
            await med.slow.enqueue(0.5, _client=client),
            await client.add_task(med.add, 40, 2, _countdown=3),
        ]
        for info in infos:
            print(f"{info.id}  {info.task:<28} queue={info.queue}"
                  + (f" eta={info.eta:.0f}" if info.eta else ""))
    finally:
        await client.close()
        await redis.disconnect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", default="quebert:", help="state key prefix")
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(
        produce(reactor, args.amqp_url, args.redis_url, args.prefix)))


if __name__ == "__main__":
    main()
