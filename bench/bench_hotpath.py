"""
The worker's per-task CPU without I/O: pika message -> ``delivery_from`` ->
``DelayOnErrorMediator`` -> executor (an ``async def`` no-op) ->
``ResilientStateManager(RedisStateManager)`` on a fake Redis that answers
every batch at once -> ack on a fake channel.  Deterministic (a ``Clock``,
no sockets), so it measures code changes far more steadily than
``bench_throughput.py`` on a shared machine.

Run from the repository root::

    .venv/bin/python bench/bench_hotpath.py            # 5 runs, us per task
                                                       # (and 5 without a state store)
    .venv/bin/python bench/bench_hotpath.py out.prof   # one cProfile'd run
"""

from __future__ import annotations

import gc
import os
import pstats
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pika.spec import Basic, BasicProperties  # noqa: E402
from twisted.internet import defer  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.logger import LogLevel  # noqa: E402

from bench.bench_tasks import NullState  # noqa: E402
from quebert import protocol  # noqa: E402
from quebert.amqp.consumer import _Acker, delivery_from  # noqa: E402
from quebert.executor import Executor  # noqa: E402
from quebert.mediator import DelayOnErrorMediator, QueueSettings  # noqa: E402
from quebert.registry import Registry  # noqa: E402
from quebert.state.redis import RedisStateManager  # noqa: E402
from quebert.state.resilient import ResilientStateManager  # noqa: E402

PREFETCH = 200


async def noop(created_at=None):
    return None


class FakeRedis:
    def __init__(self):
        self.pending = []

    def evalsha(self, sha, keys, args):
        d = defer.Deferred()
        self.pending.append(d)
        return d


class FakeChannel:
    is_open = True

    def basic_ack(self, tag, multiple=False):
        pass

    def basic_nack(self, tag, multiple=False, requeue=True):
        pass


class Message:
    """pika's ReceivedMessage."""

    __slots__ = ("channel", "method", "properties", "body")


class FakeBroker:
    def consume(self, *args):
        pass


def run(tasks: int = 20000, profile: str = "", null_state: bool = False) -> float:
    """us of CPU per task, delivery to ack."""
    registry = Registry()
    registry.register(noop, name="bench.noop")
    clock = Clock()
    redis = FakeRedis()
    if null_state:
        state = NullState()
    else:
        state = ResilientStateManager(RedisStateManager(redis, prefix="x:", clock=clock),
                                      clock=clock)
    mediator = DelayOnErrorMediator(
        broker=FakeBroker(), state=state, executor=Executor(clock), clock=clock,
        queues=[QueueSettings("bench", PREFETCH)], registry=registry,
        max_running_tasks=PREFETCH, task_log_level=LogLevel.warn)
    channel = FakeChannel()
    acker = _Acker(channel, clock)
    messages = []
    for i in range(tasks):
        now = time.time()
        task, body = protocol.build("bench.noop", (now,), queue="bench", now=now)
        m = Message()
        m.channel = channel
        m.method = Basic.Deliver(consumer_tag="c", delivery_tag=i + 1, redelivered=False,
                                 exchange="", routing_key="bench")
        m.properties = BasicProperties(content_type=protocol.CONTENT_TYPE, delivery_mode=2,
                                       message_id=task.id, headers={protocol.H_ATTEMPTS: 0})
        m.body = body
        messages.append(m)
    gc.collect()
    gc.freeze()

    def drain():
        for start in range(0, tasks, PREFETCH):
            for m in messages[start:start + PREFETCH]:
                mediator.on_delivery(delivery_from("bench", m, acker))
            while mediator._inflight or redis.pending or clock.calls:
                clock.advance(0)
                answered, redis.pending = redis.pending, []
                for d in answered:
                    d.callback(0)

    began = time.process_time()
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.runcall(drain)
        profiler.dump_stats(profile)
    else:
        drain()
    spent = time.process_time() - began
    gc.unfreeze()
    assert mediator.counts["succeeded"] == tasks, mediator.counts
    return spent / tasks * 1e6


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return
    if len(sys.argv) > 1:
        print(f"{run(profile=sys.argv[1]):.1f} us/task (profiled)")
        pstats.Stats(sys.argv[1]).sort_stats("tottime").print_stats(30)
        return
    runs, null = [], []
    for _ in range(5):  # interleaved, so that both see the same machine
        runs.append(run())
        null.append(run(null_state=True))
    runs.sort()
    null.sort()
    print(f"us/task, 5 runs: {', '.join(f'{r:.1f}' for r in runs)}; median {runs[2]:.1f}")
    print(f"without a state store: {', '.join(f'{r:.1f}' for r in null)}; median {null[2]:.1f}")
    print(f"the Redis state path: {runs[2] - null[2]:.1f} us/task")


if __name__ == "__main__":
    main()
