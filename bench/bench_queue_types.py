"""
Classic versus quorum queues: the same worker and tasks on both, in one run.

Run from the repository root::

    .venv/bin/python bench/bench_queue_types.py [--tasks N] [--repeat R]

Each configuration of ``bench_throughput.py`` named in ``--configs`` drains
a pre-filled work queue declared as quebert declares it for each queue
type (``bench-classic``, ``bench-quorum``), the worker run with the same
``--queue-type``; the two types of a configuration run back to back, in
alternating order from one repeat to the next.  ``redis-retry`` fails
every task's first attempt, so that every task also passes once through
the delay queues of its type (``quebert.delay.NN`` or
``quebert.qdelay.NN``).  Medians are printed with the ratio quorum /
classic.  Same isolation as ``bench_throughput.py`` (a fresh vhost and a
unique Redis prefix, both removed at the end); it always exits 0, nothing
is asserted.  See ``bench/README.rst``, "Classic versus quorum".
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.bench_tasks import ENV_RETRY_BACKOFF  # noqa: E402
from bench.bench_throughput import (  # noqa: E402
    CONFIGS,
    LABELS,
    PREFETCH,
    Broker,
    _terminate,
    environment,
    log,
    throughput_run,
)
from quebert.amqp.topology import QUEUE_TYPES, Topology  # noqa: E402

DEFAULT_CONFIGS = "baseline,redis-async,redis-retry"
DEFAULT_RETRY_BACKOFF = 0.1


def delay_levels(seconds: float, queue_type: str) -> list:
    """The delay queues a message delayed ``seconds`` waits in, highest first."""
    delay_ms = int(round(seconds * 1000))
    topology = Topology(queue_type=queue_type)
    return [topology.delay_queue(level) for level in reversed(range(delay_ms.bit_length()))
            if delay_ms >> level & 1]


def order(repeat: int, queue_types: list) -> list:
    """The queue types in the order of ``repeat``: alternating, so drift evens out."""
    return list(queue_types) if repeat % 2 == 0 else list(reversed(queue_types))


def summarise(results: list, configs: list, queue_types: list) -> dict:
    """``{config: {queue_type: medians}}`` of the measured runs."""
    summary: dict = {}
    for name in configs:
        for queue_type in queue_types:
            runs = [r for r in results if r["config"] == name
                    and r["queue_type"] == queue_type and "tasks_per_s" in r]
            errors = [r["error"] for r in results if r["config"] == name
                      and r["queue_type"] == queue_type and "error" in r]
            entry: dict = {"runs": len(runs), "errors": errors,
                           "warnings": [r["warning"] for r in runs if "warning" in r]}
            if runs:
                for key in ("tasks_per_s", "cpu_us_per_task", "rabbitmq_us_per_task",
                            "redis_us_per_task", "startup_s", "prefill_per_s",
                            "prefill_rabbitmq_us_per_task"):
                    entry[key] = statistics.median(r[key] for r in runs)
                entry["by_repeat"] = {r["repeat"]: r["tasks_per_s"] for r in runs}
            summary.setdefault(name, {})[queue_type] = entry
    # Filling the queue is the same for every configuration: all runs count.
    for queue_type in queue_types:
        runs = [r for r in results if r["queue_type"] == queue_type and "prefill_per_s" in r]
        summary.setdefault("prefill", {})[queue_type] = {
            key: statistics.median(r[key] for r in runs) if runs else None
            for key in ("prefill_per_s", "prefill_rabbitmq_us_per_task")}
    return summary


def ratios(summary: dict, name: str, first: str, second: str) -> tuple:
    """``(median ratio, [ratio of each repeat])`` of ``second`` over ``first``."""
    a, b = summary[name].get(first, {}), summary[name].get(second, {})
    if not a.get("tasks_per_s") or not b.get("tasks_per_s"):
        return None, []
    paired = [b["by_repeat"][k] / v for k, v in sorted(a["by_repeat"].items())
              if k in b["by_repeat"] and v]
    return b["tasks_per_s"] / a["tasks_per_s"], paired


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(summary: dict, args: argparse.Namespace) -> str:
    first, second = args.queue_types[0], args.queue_types[-1]
    width = 98
    lines = [
        f"quebert {first} versus {second} queues, {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{os.cpu_count()} CPUs: {args.tasks} pre-filled tasks, prefetch {PREFETCH}, "
        f"{args.repeat} repeat(s), medians",
    ]
    if "redis-retry" in args.configs:
        lines.append(f"retry once: every task fails its first attempt and is retried after "
                     f"{args.retry_backoff:g} s, through "
                     + " or ".join(", ".join(delay_levels(args.retry_backoff, t))
                                   for t in args.queue_types))
    lines += [
        "",
        f"{'configuration':<34} {first + '/s':>10} {second + '/s':>10} "
        f"{second + '/' + first:>15}  {'same-repeat ratios':<24}",
        "-" * width,
    ]
    for name in args.configs:
        s = summary[name]
        median, paired = ratios(summary, name, first, second)
        lines.append(
            f"{LABELS[name]:<34} {_fmt(s[first].get('tasks_per_s'), '10.0f'):>10} "
            f"{_fmt(s[second].get('tasks_per_s'), '10.0f'):>10} "
            f"{_fmt(median, '14.2f') + 'x' if median else '-':>15}  "
            f"{', '.join(f'{p:.2f}x' for p in paired):<24}"
        )
    fill = summary["prefill"]
    a, b = fill[first]["prefill_per_s"], fill[second]["prefill_per_s"]
    lines.append(
        f"{'filling the queue (publishes)':<34} {_fmt(a, '10.0f'):>10} {_fmt(b, '10.0f'):>10} "
        f"{_fmt(b / a if a and b else None, '14.2f') + 'x' if a and b else '-':>15}  "
        f"RabbitMQ us/task {_fmt(fill[first]['prefill_rabbitmq_us_per_task'], '.0f')}, "
        f"{_fmt(fill[second]['prefill_rabbitmq_us_per_task'], '.0f')}")
    lines += ["-" * width,
              "tasks/s: draining a pre-filled queue of N tasks, N / (last ack - first task start);"]
    if "redis-retry" in args.configs:
        lines.append("retry once: each task handled twice (the failed attempt, then its retry), "
                     "counted once.")
    lines += [
        "filling: N publishes, not confirmed, from one blocking pika connection until the queue",
        "holds them all (before each run, not counted in its tasks/s), medians of every run.",
        "",
        "CPU us per task (medians): the consumer process, RabbitMQ (beam.smp), Redis",
    ]
    for name in args.configs:
        for queue_type in args.queue_types:
            s = summary[name][queue_type]
            lines.append(
                f"  {name} {queue_type}: consumer {_fmt(s.get('cpu_us_per_task'), '.0f')}, "
                f"RabbitMQ {_fmt(s.get('rabbitmq_us_per_task'), '.0f')}, Redis "
                f"{_fmt(s.get('redis_us_per_task'), '.0f')}; tasks/s per repeat "
                f"{[round(v) for _, v in sorted(s.get('by_repeat', {}).items())]}; "
                f"start-up {_fmt(s.get('startup_s'), '.2f')} s")
    for name in args.configs:
        for queue_type in args.queue_types:
            for warning in summary[name][queue_type]["warnings"]:
                lines.append(f"WARNING {name} {queue_type}: {warning}")
            for error in summary[name][queue_type]["errors"]:
                lines.append(f"ERROR {name} {queue_type}: {error.splitlines()[0]}")
    lines.append("")
    a, b = fill[first]["prefill_rabbitmq_us_per_task"], fill[second]["prefill_rabbitmq_us_per_task"]
    if a and b:
        lines.append(f"RABBITMQ CPU {second}/{first} filling the queue: {b / a:.2f}x "
                     f"({b:.0f} vs {a:.0f} us per task)")
    for name in args.configs:
        median, _ = ratios(summary, name, first, second)
        a = summary[name][first].get("tasks_per_s")
        b = summary[name][second].get("tasks_per_s")
        if median:
            lines.append(f"RATIO {second}/{first} {LABELS[name]}: {median:.2f}x "
                         f"({b:.0f} vs {a:.0f} tasks/s)")
        else:
            lines.append(f"RATIO {second}/{first} {LABELS[name]}: not measured")
    return "\n".join(lines)


def parse_args(argv: list) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10000,
                        help="tasks in the pre-filled queue per run [default: 10000]")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of every configuration and queue type; medians are "
                             "reported [default: 3]")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help=f"comma-separated subset of {', '.join(CONFIGS)} "
                             f"[default: {DEFAULT_CONFIGS}]")
    parser.add_argument("--queue-types", default=",".join(QUEUE_TYPES),
                        help="the two queue types compared, the reference first "
                             "[default: %(default)s]")
    parser.add_argument("--retry-backoff", type=float, default=DEFAULT_RETRY_BACKOFF,
                        help="seconds before the retry of redis-retry's tasks "
                             "[default: %(default)s]")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672",
                        help="RabbitMQ, without a vhost [default: %(default)s]")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9",
                        help="Redis for the redis-state runs [default: %(default)s]")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--keep", action="store_true",
                        help="keep the working directory (worker logs)")
    args = parser.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(args.configs) - set(CONFIGS)
    if unknown or not args.configs:
        parser.error(f"unknown configuration(s): {', '.join(sorted(unknown)) or 'none given'}")
    args.queue_types = [t.strip() for t in args.queue_types.split(",") if t.strip()]
    if len(args.queue_types) != 2 or set(args.queue_types) != set(QUEUE_TYPES):
        parser.error(f"--queue-types takes both of {', '.join(QUEUE_TYPES)}, in either order")
    if args.tasks < 100 or args.repeat < 1:
        parser.error("--tasks must be >= 100 and --repeat >= 1")
    if not 0.001 <= args.retry_backoff <= 60:
        parser.error("--retry-backoff must be between 0.001 and 60 seconds")
    # bench_throughput's arguments that throughput_run reads
    args.profile = None
    return args


def main(argv: Optional[list] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _terminate)
    # The workers read bench.fail_once's backoff from their environment.
    os.environ[ENV_RETRY_BACKOFF] = repr(args.retry_backoff)
    results: list = []
    use_redis = any(CONFIGS[c][2] == "redis" for c in args.configs)
    with environment(args.amqp, args.redis_url, use_redis, args.keep) as env:
        brokers: dict = {}
        try:
            for queue_type in args.queue_types:
                brokers[queue_type] = Broker(env.url, f"bench-{queue_type}", queue_type)
            for repeat in range(args.repeat):
                for name in args.configs:
                    for queue_type in order(repeat, args.queue_types):
                        log(f"{repeat + 1}/{args.repeat}: {name}, {queue_type}")
                        try:
                            r = throughput_run(name, brokers[queue_type], args, env.url,
                                               args.redis_url,
                                               f"{env.prefix}{name}-{queue_type}-{repeat}:",
                                               env.workdir, repeat, env.redis)
                        except Exception as e:
                            log(f"  {name} {queue_type} failed: {e}")
                            results.append({"config": name, "queue_type": queue_type,
                                            "repeat": repeat, "error": str(e)})
                            continue
                        results.append(r)
                        log(f"  {r['tasks_per_s']:.0f} tasks/s (start-up "
                            f"{r['startup_s']:.2f} s)")
        finally:
            for broker in brokers.values():
                broker.close()

    summary = summarise(results, args.configs, args.queue_types)
    print(report(summary, args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "results": results, "summary": summary}, f,
                      indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())

