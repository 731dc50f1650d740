"""
Flat memory over a long run: a quebert worker's resident memory from
100,000 to 1,000,000 tasks drained.

Run from the repository root (not in CI: a million tasks take minutes)::

    .venv/bin/python bench/bench_long.py                  # 1,000,000 tasks
    .venv/bin/python bench/bench_long.py --tasks 200000   # a quick check
    .venv/bin/python bench/bench_throughput.py --long 200000   # the same

One worker (``twistd amqp-worker``, Redis state with a short retention,
``--config`` with ``state.ttl``, so that Redis does not fill; the default
mediator; prefetch 200) runs ``bench.tick``, a no-op that counts itself and,
every ``--step`` tasks, appends its own ``VmRSS`` and ``VmHWM`` (from
``/proc/self/status``) and CPU time to a file: nothing is kept per task.
Meanwhile this process keeps the queue topped up (between ``--backlog``/2
and ``--backlog`` ready messages), publishing ``--tasks`` in all, and reads
the samples as they come.  It prints one row per sample and the growth of
``VmRSS`` from ``--from`` tasks (default 100,000) to the last sample,
against the target (under 10%: reported, never asserted; it always exits 0).

Same isolation as ``bench_throughput.py``: a fresh vhost, deleted at the
end; Redis state under a unique prefix in database 9, whose keys (and only
those) are deleted at the end; the worker is stopped whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.bench_throughput import (  # noqa: E402
    PREFETCH,
    QUEUE,
    TWISTD,
    Broker,
    Environment,
    environment,
    log,
    log_tail,
)
from quebert.amqp.topology import QUEUE_TYPES  # noqa: E402

TASK = "bench.tick"
#: The target: VmRSS grows less than this fraction from ``--from`` to the end.
TARGET_GROWTH = 0.10


def parse_args(argv: Optional[list]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_long.py",
                                     description=__doc__.strip().splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000000,
                        help="tasks drained in all [default: 1000000]")
    parser.add_argument("--step", type=int, default=100000,
                        help="tasks between two memory samples [default: 100000]")
    parser.add_argument("--from", dest="from_tasks", type=int, default=100000,
                        help="the sample the growth is measured from [default: 100000]")
    parser.add_argument("--backlog", type=int, default=20000,
                        help="ready messages the queue is topped up to [default: 20000]")
    parser.add_argument("--state-ttl", type=float, default=5.0,
                        help="seconds finished records are kept in Redis (the worker's "
                             "state.ttl) [default: 5]")
    parser.add_argument("--queue-type", choices=QUEUE_TYPES, default="classic",
                        help="type of the work queue [default: classic]")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672",
                        help="RabbitMQ, without a vhost [default: %(default)s]")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9",
                        help="Redis for the state [default: %(default)s]")
    parser.add_argument("--json", help="also write the samples to this file")
    parser.add_argument("--keep", action="store_true",
                        help="keep the working directory (worker log, samples)")
    args = parser.parse_args(argv)
    if args.step < 1000 or args.tasks < args.step:
        parser.error("--step must be >= 1000 and --tasks >= --step")
    if args.backlog < 2 * PREFETCH:
        parser.error(f"--backlog must be >= {2 * PREFETCH}")
    return args


class Worker:
    """The worker under test, counting its ``bench.tick`` tasks."""

    def __init__(self, env: Environment, args: argparse.Namespace) -> None:
        self.samples_path = os.path.join(env.workdir, "long.samples")
        self.log_path = os.path.join(env.workdir, "long-worker.log")
        config = os.path.join(env.workdir, "long-config.json")
        with open(config, "w", encoding="ascii") as f:
            json.dump({"state": {"ttl": args.state_ttl}}, f)
        self.args = [TWISTD, "--pidfile=", "-n", f"--logfile={self.log_path}", "amqp-worker",
                     "--config", config, "--amqp-url", env.url,
                     "--state", "redis", "--redis-url", args.redis_url,
                     "--state-prefix", env.prefix,
                     "--tasks", "bench.bench_tasks", "--queue", f"{QUEUE}:{PREFETCH}",
                     "--max-running-tasks", str(PREFETCH), "--queue-type", args.queue_type,
                     "--log-level", "warn"]
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = ROOT + os.pathsep + self.env.get("PYTHONPATH", "")
        self.env["QUEBERT_BENCH_LONG_OUT"] = self.samples_path
        self.env["QUEBERT_BENCH_LONG_STEP"] = str(args.step)
        self.process: Optional[subprocess.Popen] = None
        self.out: Any = None
        self._read = 0

    def start(self) -> None:
        self.out = open(self.log_path + ".out", "wb")
        self.process = subprocess.Popen(self.args, cwd=ROOT, env=self.env,
                                        stdin=subprocess.DEVNULL, stdout=self.out,
                                        stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def new_samples(self) -> list:
        """The samples written since the last call: dicts of count, time, kB, CPU s."""
        try:
            with open(self.samples_path, encoding="ascii") as f:
                f.seek(self._read)
                text = f.read()
        except OSError:
            return []
        complete = text[:text.rfind("\n") + 1]
        self._read += len(complete)
        samples = []
        for line in complete.splitlines():
            count, at, rss, hwm, cpu = line.split()
            samples.append({"tasks": int(count), "time": float(at), "rss_kb": int(rss),
                            "hwm_kb": int(hwm), "cpu_s": float(cpu)})
        return samples

    def log_tail(self) -> str:
        return log_tail(self.log_path)

    def stop(self) -> Optional[int]:
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if self.out is not None:
            self.out.close()
            self.out = None
        return process.returncode


def redis_figures(env: Environment) -> dict:
    """The records the worker's prefix holds, and the whole Redis server's memory."""
    if env.redis is None:
        return {}
    figures = {"records": env.redis.call("ZCARD", f"{env.prefix}idx:state:succeeded")}
    info = env.redis.call("INFO", "memory") or b""
    for line in info.decode("ascii", "replace").splitlines():
        if line.startswith("used_memory:"):
            figures["redis_used_mb"] = int(line.split(":", 1)[1]) / 1e6
    return figures


def long_run(args: argparse.Namespace, env: Environment, broker: Broker) -> dict:
    """Feed the worker ``args.tasks`` tasks, collecting its samples."""
    worker = Worker(env, args)
    result: dict = {"tasks": args.tasks, "samples": []}
    published = 0
    stall = 120 + args.step / 100
    try:
        worker.start()
        deadline = time.monotonic() + 60
        while broker.depth()[1] < 1:
            if not worker.alive() or time.monotonic() > deadline:
                raise RuntimeError("the worker did not start consuming:\n" + worker.log_tail())
            broker.connection.sleep(0.05)
        began = time.time()
        last_progress = time.monotonic()
        while True:
            sent = 0
            if published < args.tasks:
                ready = broker.depth()[0]
                if ready < args.backlog // 2:
                    # at most a few seconds' worth at a time, so samples are read on time
                    for _ in range(min(args.backlog - ready, args.tasks - published, 5000)):
                        broker._publish(TASK)
                        sent += 1
                    published += sent
            for sample in worker.new_samples():
                sample.update(redis_figures(env))
                sample["published"] = published
                result["samples"].append(sample)
                last_progress = time.monotonic()
                log(f"  {sample['tasks']} tasks: VmRSS {sample['rss_kb'] / 1024:.1f} MB, "
                    f"{sample.get('records', '-')} records in Redis")
            if result["samples"] and result["samples"][-1]["tasks"] >= args.tasks:
                break
            if not worker.alive():
                raise RuntimeError(f"the worker exited with {worker.process.returncode}:\n"
                                   + worker.log_tail())
            if time.monotonic() - last_progress > stall:
                raise RuntimeError(f"no sample for {stall:.0f} s ({published} published):\n"
                                   + worker.log_tail())
            if not sent:
                broker.connection.sleep(0.05)
        result["began"] = began
    except Exception as e:
        log(f"long run failed: {e}")
        result["error"] = str(e)
    finally:
        result["exit_code"] = worker.stop()
        if broker.depth()[0]:
            broker.purge()
    return result


def growth(samples: list, from_tasks: int) -> Optional[tuple]:
    """(first sample, last sample, VmRSS growth) from the sample at ``from_tasks``."""
    if len(samples) < 2:
        return None
    first = next((s for s in samples if s["tasks"] >= from_tasks), samples[0])
    last = samples[-1]
    if first is last:
        first = samples[0]
    return first, last, (last["rss_kb"] - first["rss_kb"]) / first["rss_kb"]


def report(result: dict, args: argparse.Namespace) -> str:
    samples = result["samples"]
    lines = [
        f"quebert long run, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs: "
        f"{args.tasks} no-op tasks ({TASK}), Redis state kept {args.state_ttl:g} s, "
        f"prefetch {PREFETCH}, {args.queue_type} queue topped up to {args.backlog} ready",
        "",
        f"{'tasks drained':>13} {'VmRSS MB':>9} {'vs first':>9} {'VmHWM MB':>9} "
        f"{'tasks/s':>8} {'CPU us':>7} {'records':>8} {'Redis MB':>9}",
        "-" * 80,
    ]
    previous: Optional[dict] = None
    for s in samples:
        rate = cpu = None
        if previous is not None and s["time"] > previous["time"]:
            rate = (s["tasks"] - previous["tasks"]) / (s["time"] - previous["time"])
            cpu = 1e6 * (s["cpu_s"] - previous["cpu_s"]) / (s["tasks"] - previous["tasks"])
        vs = 100.0 * (s["rss_kb"] - samples[0]["rss_kb"]) / samples[0]["rss_kb"]
        lines.append(
            f"{s['tasks']:>13} {s['rss_kb'] / 1024:>9.1f} {vs:>+8.1f}% "
            f"{s['hwm_kb'] / 1024:>9.1f} {'-' if rate is None else f'{rate:.0f}':>8} "
            f"{'-' if cpu is None else f'{cpu:.0f}':>7} {s.get('records', '-'):>8} "
            f"{s.get('redis_used_mb', 0):>9.1f}")
        previous = s
    lines += [
        "-" * 80,
        "VmRSS / VmHWM: the worker's, read by itself from /proc/self/status when that many",
        "tasks had started; tasks/s and CPU us (the worker's, per task) since the sample",
        "before; records: succeeded records of the worker's prefix still indexed in Redis",
        "(retention --state-ttl); Redis MB: used_memory of the whole Redis server.",
        "",
    ]
    if result.get("error"):
        lines.append(f"ERROR: {result['error'].splitlines()[0]}")
    g = growth(samples, args.from_tasks)
    label = f"TARGET worker VmRSS grows < {TARGET_GROWTH:.0%}"
    if g is None:
        lines.append(f"{label}: not measured (fewer than two samples)")
    else:
        first, last, fraction = g
        lines.append(f"{label} from {first['tasks']} to {last['tasks']} tasks drained: "
                     f"{'PASS' if fraction < TARGET_GROWTH else 'FAIL'} ({fraction:+.1%}: "
                     f"{first['rss_kb'] / 1024:.1f} -> {last['rss_kb'] / 1024:.1f} MB)")
    return "\n".join(lines)


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Optional[list] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _terminate)
    with environment(args.amqp, args.redis_url, True, args.keep) as env:
        broker = Broker(env.url, QUEUE, args.queue_type)
        try:
            log(f"long run: {args.tasks} tasks, a sample every {args.step}")
            result = long_run(args, env, broker)
        finally:
            broker.close()
    print(report(result, args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), **result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
