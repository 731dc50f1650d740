"""
Enqueue the example tasks of ``examples/med.py``.

    python -m examples.produce [--amqp-url URL] [--redis-url URL] [--wait]

Prints each task id; watch the worker's log to see them succeed, retry
and fail, and ``quebert status ID`` to read their state.  With ``--wait``
it then waits for each task's outcome (``TaskInfo.result``) and prints it.
"""

from __future__ import annotations

import argparse
import os

from twisted.internet import defer, task

from examples import med
from quebert import Client, QuebertError
from quebert.state import RedisStateManager, connect_redis


async def produce(reactor, amqp_url: str, redis_url: str, prefix: str = "quebert:",
                  wait: bool = False) -> None:
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
        if wait:
            for info in infos:
                try:
                    outcome = f"= {await info.result(timeout=60)!r}"
                except QuebertError as e:  # TaskFailed, TaskCanceled, ResultTimeout
                    outcome = f"{type(e).__name__}: {e}"
                print(f"result {info.id}  {info.task:<28} {outcome}")
    finally:
        await client.close()
        await redis.disconnect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    env = os.environ.get
    parser.add_argument("--amqp-url",
                        default=env("QUEBERT_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
                        help="RabbitMQ URL [env QUEBERT_AMQP_URL]")
    parser.add_argument("--redis-url", default=env("QUEBERT_REDIS_URL", "redis://127.0.0.1:6379/0"),
                        help="Redis URL of the task state [env QUEBERT_REDIS_URL]")
    parser.add_argument("--prefix", default=env("QUEBERT_PREFIX", "quebert:"),
                        help="state key prefix [env QUEBERT_PREFIX]")
    parser.add_argument("--wait", action="store_true",
                        help="then wait for every task's outcome and print it")
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(
        produce(reactor, args.amqp_url, args.redis_url, args.prefix, args.wait)))


if __name__ == "__main__":
    main()
