"""
CPU-bound tasks through a worker's threads and through its processes.

Run from the repository root::

    .venv/bin/python bench/bench_processes.py [--tasks N] [--repeat R] [--ms MS]

One real worker (``twistd amqp-worker``, memory state) with as many
threads as processes (``--workers``, default: the number of cores) runs
batches of the same pure-Python loop of about ``--ms`` milliseconds
(default 20), registered twice (``bench/cpu_tasks.py``): ``bench.cpu_thread``
in its thread pool, ``bench.cpu_process`` in its pool of processes.
Batches alternate (threads, processes, threads...) ``--repeat`` times
(default 3) in the same run; each batch is published into the work queue
first, and its rate is its tasks divided by the time from the first task's
start to the last one's end, as the tasks recorded them.  It prints the
median tasks/s of each and the ratio processes/threads, which approaches
the number of cores when the machine has nothing else to do (the GIL lets
the threads use one core).  It needs the local RabbitMQ (``rabbitmqctl`` on
the PATH, guest/guest on 127.0.0.1:5672): a fresh vhost, deleted at the
end.  See ``bench/README.rst``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pika  # noqa: E402

from bench.bench_throughput import Broker, environment, log  # noqa: E402
from bench.cpu_tasks import spin  # noqa: E402
from quebert import protocol  # noqa: E402

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
QUEUE = "bench"
TASKS = {"threads": "bench.cpu_thread", "processes": "bench.cpu_process"}


def steps_for(ms: float) -> int:
    """Loop steps that take about ``ms`` milliseconds on this machine (best of 5)."""
    probe = 100_000
    best = min(_timed(probe) for _ in range(5))
    return max(1000, int(probe * ms / 1000 / best))


def _timed(steps: int) -> float:
    start = time.perf_counter()
    spin(steps)
    return time.perf_counter() - start


def publish(broker: Broker, task_name: str, path: str, steps: int, count: int) -> None:
    """Put ``count`` tasks in the work queue (confirmed by the queue depth)."""
    for _ in range(count):
        message, body = protocol.build(task_name, (path, steps), queue=QUEUE)
        broker.channel.basic_publish(
            "", QUEUE, body,
            pika.BasicProperties(content_type=protocol.CONTENT_TYPE, delivery_mode=2,
                                 message_id=message.id, headers={protocol.H_ATTEMPTS: 0}))


def read_runs(path: str) -> list:
    try:
        with open(path, encoding="ascii") as f:
            lines = [line.split() for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []
    return [(float(start), float(end), int(pid)) for start, end, pid in lines]


def batch(broker: Broker, worker: subprocess.Popen, kind: str, path: str, steps: int,
          count: int, timeout: float = 600.0) -> dict:
    """One batch of ``count`` tasks of ``kind``; its rate from the tasks' own times."""
    publish(broker, TASKS[kind], path, steps, count)
    deadline = time.monotonic() + timeout
    while len(read_runs(path)) < count:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with {worker.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{kind}: {len(read_runs(path))} of {count} tasks ran")
        time.sleep(0.1)
    runs = read_runs(path)
    elapsed = max(end for _, end, _ in runs) - min(start for start, _, _ in runs)
    return {"kind": kind, "tasks": count, "seconds": round(elapsed, 3),
            "tasks_per_s": round(count / elapsed, 2),
            "pids": len({pid for _, _, pid in runs}),
            "task_ms": round(1000 * statistics.median(end - start for start, end, _ in runs),
                             2)}


def start_worker(url: str, workdir: str, workers: int) -> tuple:
    log_path = os.path.join(workdir, "worker.log")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(
        [TWISTD, "--pidfile=", "-n", f"--logfile={log_path}", "amqp-worker",
         "--amqp-url", url, "--state", "memory", "--tasks", "bench.cpu_tasks",
         "--queue", f"{QUEUE}:{4 * workers}", "--queue-type", "classic",
         "--threads", str(workers), "--processes", str(workers), "--beacon-interval", "0"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        text = open(log_path, encoding="utf-8").read() if os.path.exists(log_path) else ""
        if "consuming " in text and "process pool:" in text:
            return process, log_path
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("the worker did not start:\n" + text[-3000:])
        time.sleep(0.1)


def report(results: list, args: argparse.Namespace, steps: int) -> tuple:
    medians = {kind: statistics.median(r["tasks_per_s"] for r in results if r["kind"] == kind)
               for kind in TASKS}
    ratio = medians["processes"] / medians["threads"]
    lines = [f"CPU-bound tasks: a pure-Python loop of {steps} steps (~{args.ms:g} ms), "
             f"{args.tasks} per batch, {args.repeat} batch(es) each, {args.workers} "
             f"threads / {args.workers} processes, {os.cpu_count()} cores"]
    for r in results:
        lines.append(f"  {r['kind']:<9} {r['tasks_per_s']:8.1f} tasks/s  "
                     f"({r['seconds']:.2f} s, task {r['task_ms']:.1f} ms, {r['pids']} pid(s))")
    lines.append(f"threads:   {medians['threads']:.1f} tasks/s (median)")
    lines.append(f"processes: {medians['processes']:.1f} tasks/s (median)")
    lines.append(f"RATIO processes/threads: {ratio:.2f}x (cores: {os.cpu_count()})")
    return "\n".join(lines), medians, ratio


def parse_args(argv: list) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=200, help="tasks per batch [200]")
    parser.add_argument("--repeat", type=int, default=3, help="batches of each kind [3]")
    parser.add_argument("--ms", type=float, default=20.0, help="milliseconds per task [20]")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="threads and processes of the worker [the number of cores]")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--json", help="write the figures to this file")
    return parser.parse_args(argv)


def main(argv: Optional[list] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    steps = steps_for(args.ms)
    log(f"{steps} loop steps for ~{args.ms:g} ms")
    results = []
    with environment(args.amqp_url, "redis://127.0.0.1:6379/9", use_redis=False) as env:
        worker, log_path = start_worker(env.url, env.workdir, args.workers)
        broker = Broker(env.url, QUEUE, "classic")
        try:
            for k in range(args.repeat):
                for kind in TASKS:
                    path = os.path.join(env.workdir, f"{kind}-{k}.runs")
                    results.append(batch(broker, worker, kind, path, steps, args.tasks))
                    log(f"{kind} batch {k + 1}: {results[-1]['tasks_per_s']} tasks/s")
        finally:
            broker.close()
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
    text, medians, ratio = report(results, args, steps)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"steps": steps, "cores": os.cpu_count(), "results": results,
                       "medians": medians, "ratio": ratio}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
