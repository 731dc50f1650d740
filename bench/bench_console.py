"""
What the console's reads cost with many records in Redis.

Fills a fresh key prefix of the local Redis (database 9) with ``--records``
finished tasks (100,000 by default: 10 task names, 4 queues, 1 in 100
failed, one rare name), then times each read the console makes, against
the cheapest read there is (one record by id) in the same run: a page of
the newest tasks, a deep page, a page by state and by queue, a task-name
search (a common name, and a rare one whose search stops at its budget of
examined entries), the counts per state and the workers.  Prints medians
in milliseconds and the ratio to the baseline; deletes its keys at the end.

    .venv/bin/python bench/bench_console.py [--records N] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from twisted.internet import defer, task  # noqa: E402

from quebert.state.redis import RedisStateManager, connect_redis  # noqa: E402

REDIS_URL = os.environ.get("QUEBERT_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
NAMES = [f"app.task{i}" for i in range(10)]
QUEUES = ["default", "emails", "reports", "low"]


async def fill(store: RedisStateManager, records: int) -> None:
    now = time.time()
    pending = []
    for i in range(records):
        name = "app.rare" if i == records // 2 else NAMES[i % len(NAMES)]
        info = {"queue": QUEUES[i % len(QUEUES)], "kind": "call", "task": name,
                "name": None, "eta": None, "created_at": now}
        task_id = f"t{i:07d}"
        pending.append(store.started(task_id, 1, "bench:1", info, now))
        if i % 100 == 0:
            pending.append(store.finished(task_id, "failed", 1, info, now, reason="bench"))
        else:
            pending.append(store.finished(task_id, "succeeded", 1, info, now, result=i))
        if len(pending) >= 4000:
            await defer.gatherResults(pending)
            pending = []
    await defer.gatherResults(pending)


async def timed(call, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def main(reactor, records: int, repeat: int) -> None:
    redis = connect_redis(REDIS_URL)
    prefix = f"quebert-bench-console-{uuid.uuid4().hex[:8]}:"
    store = RedisStateManager(redis, prefix=prefix, timeout=60)
    try:
        started = time.perf_counter()
        await fill(store, records)
        print(f"{records} finished records written in {time.perf_counter() - started:.1f} s "
              f"(prefix {prefix})")
        reads = [
            ("one record by id (baseline)", lambda: store.get(f"t{records // 3:07d}")),
            ("newest 50", lambda: store.list(limit=50)),
            (f"50 from offset {records // 2}", lambda: store.list(limit=50,
                                                                offset=records // 2)),
            ("50 failed", lambda: store.list(state="failed", limit=50)),
            ("50 of one queue", lambda: store.list(queue="emails", limit=50)),
            ("50 failed of one queue", lambda: store.list(state="failed", queue="emails",
                                                          limit=50)),
            ("50 by a common task name", lambda: store.find("app.task3", limit=50)),
            ("a rare task name (one budget)", lambda: store.find("app.rare", limit=50)),
            ("counts per state", store.counts),
            ("workers", store.workers),
        ]
        baseline = None
        print(f"{'read':<34}{'median ms':>10}{'x baseline':>12}")
        for name, call in reads:
            ms = await timed(call, repeat)
            baseline = baseline or ms
            print(f"{name:<34}{ms:>10.2f}{ms / baseline:>12.1f}")
        found, position = await store.find("app.rare", limit=50)
        print(f"(the rare name's first page: {len(found)} record(s), next position "
              f"{position}: the search goes on from there)")
    finally:
        cursor = 0
        while True:
            cursor, keys = await redis.scan(cursor, pattern=prefix + "*", count=2000)
            if keys:
                await redis.delete(keys)
            if int(cursor) == 0:
                break
        await redis.disconnect()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    options = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, options.records,
                                                         options.repeat)))
