"""
Slow URL tasks on the reactor against slow callable tasks in threads.

Run from the repository root::

    .venv/bin/python bench/bench_url.py [--tasks N] [--repeat R]

One worker (``--max-running-tasks 500 --queue bench:500``) drains N URL
tasks whose target, a local twisted.web endpoint, answers after 100 ms;
then N callable tasks that ``time.sleep(0.1)`` in the worker's thread pool,
with the same flags.  It prints tasks/s both ways and their ratio, the
endpoint's peak of concurrent requests, the worker's peak RSS and task
durations.  It needs the local RabbitMQ (``rabbitmqctl`` on the PATH,
guest/guest on 127.0.0.1:5672) and Redis (database 9).  Everything lives in
a fresh vhost, deleted at the end, and under a unique Redis key prefix,
whose keys (and only those) are deleted at the end.  See
``bench/README.rst``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.bench_throughput import (  # noqa: E402
    MiniRedis,
    log,
    peak_rss_kb,
    percentile,
    rabbitmqctl,
)

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
QUEUE = "bench"
#: The worker's --max-running-tasks and the queue's concurrency (prefetch).
MAX_RUNNING = 500
#: What the worker's URL dispatcher gets in its config file: the defaults
#: (100 connections, 10 per host) would be the bottleneck, not the reactor.
DISPATCH = {"max_connections": MAX_RUNNING, "max_connections_per_host": MAX_RUNNING}
#: Thread pool size the worker picks by default: min(max_running_tasks, 50).
DEFAULT_THREADS = min(MAX_RUNNING, 50)

#: name -> (kind, --threads or None)
CONFIGS = {
    "url": ("url", None),
    "thread": ("thread", None),
    "thread-500": ("thread", MAX_RUNNING),
}
LABELS = {
    "url": "URL tasks (treq, on the reactor)",
    "thread": f"callable, sleep, {DEFAULT_THREADS} threads",
    "thread-500": f"callable, sleep, {MAX_RUNNING} threads",
}
DEFAULT_CONFIGS = "url,thread,thread-500"


class RunFailed(Exception):
    """One run could not be measured; the message says why."""


# -- the slow endpoint (run in its own process) -------------------------------


def endpoint_main(argv: list) -> None:
    """
    ``bench_url.py _endpoint``: answer every request to ``/task`` with 200
    after ``--delay`` seconds (``callLater``, never a sleep), counting
    requests and the peak of requests open at once.  ``GET /stats`` returns
    the counters as JSON, ``POST /reset`` zeroes them.  Writes its port to
    ``--port-file`` once listening; runs until SIGTERM.
    """
    parser = argparse.ArgumentParser(prog="bench_url.py _endpoint")
    parser.add_argument("--delay", type=float, required=True)
    parser.add_argument("--port-file", required=True)
    a = parser.parse_args(argv)

    from twisted.internet import reactor
    from twisted.web import resource, server

    stats = {"requests": 0, "open": 0, "peak": 0, "answered": 0, "lost": 0, "connections": 0}

    class Slow(resource.Resource):
        isLeaf = True

        def render(self, request: Any) -> Any:
            if request.path == b"/stats":
                request.setHeader(b"content-type", b"application/json")
                return json.dumps(stats).encode()
            if request.path == b"/reset":
                for key in stats:
                    stats[key] = 0
                return b"{}"
            if request.path != b"/task":
                request.setResponseCode(404)
                return b"not found"
            return self.slow(request)

        def slow(self, request: Any) -> Any:
            stats["requests"] += 1
            stats["open"] += 1
            if stats["open"] > stats["peak"]:
                stats["peak"] = stats["open"]
            done: list = []

            def answer() -> None:
                done.append(True)
                stats["open"] -= 1
                stats["answered"] += 1
                request.setHeader(b"content-type", b"text/plain")
                request.write(b"ok")
                request.finish()

            call = reactor.callLater(a.delay, answer)

            def lost(_: Any) -> None:
                if not done:
                    done.append(True)
                    stats["open"] -= 1
                    stats["lost"] += 1
                    call.cancel()

            request.notifyFinish().addErrback(lost)
            return server.NOT_DONE_YET

    class CountingSite(server.Site):
        noisy = False

        def buildProtocol(self, addr: Any) -> Any:
            stats["connections"] += 1
            return super().buildProtocol(addr)

        def log(self, request: Any) -> None:
            """No access log: it would cost more than the answer."""

    site = CountingSite(Slow())
    # A backlog far above 500 so that a burst of new connections is never
    # dropped (a dropped SYN is retried after a second).
    port = reactor.listenTCP(0, site, backlog=2048, interface="127.0.0.1")
    with open(a.port_file + ".tmp", "w", encoding="ascii") as f:
        f.write(str(port.getHost().port))
    os.replace(a.port_file + ".tmp", a.port_file)
    reactor.run()


# -- processes ----------------------------------------------------------------

#: Every process started and not yet reaped, stopped whatever happens.
LIVE: dict = {}


def spawn(name: str, args: list, log_path: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    with open(log_path, "ab") as out:
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT)
    LIVE[process.pid] = (name, process)
    return process


def kill_now(process: subprocess.Popen, timeout: float = 10.0) -> Optional[int]:
    """SIGTERM, wait (blocking), SIGKILL if it does not go."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    LIVE.pop(process.pid, None)
    return process.returncode


def kill_all() -> None:
    for name, process in list(LIVE.values()):
        if process.poll() is None:
            log(f"stopping {name} (pid {process.pid})")
        kill_now(process)


def proc_cpu_s(pid: int) -> Optional[float]:
    """User + system CPU seconds of ``pid`` so far (all threads)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tail(path: str, size: int = 3000) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-size:]
    except OSError:
        return ""


def start_endpoint(workdir: str, delay: float) -> tuple[subprocess.Popen, int, str]:
    port_file = os.path.join(workdir, "endpoint.port")
    log_path = os.path.join(workdir, "endpoint.log")
    process = spawn("endpoint", [sys.executable, os.path.abspath(__file__), "_endpoint",
                                 "--delay", str(delay), "--port-file", port_file], log_path)
    deadline = time.monotonic() + 30
    while not os.path.exists(port_file):
        if process.poll() is not None:
            raise RuntimeError(f"the endpoint exited with {process.returncode}:\n"
                               + tail(log_path))
        if time.monotonic() > deadline:
            raise RuntimeError("the endpoint did not start within 30 s:\n" + tail(log_path))
        time.sleep(0.05)
    with open(port_file, encoding="ascii") as f:
        return process, int(f.read()), log_path


# -- one run (in the driver's reactor) ------------------------------------------


def sleep(reactor: Any, seconds: float) -> Any:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


async def stop_worker(reactor: Any, process: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM (the worker drains and stops), SIGKILL after ``timeout``."""
    if process.poll() is None:
        process.terminate()
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            await sleep(reactor, 0.05)
    return kill_now(process)


async def endpoint_call(path: str, base: str, method: str = "GET") -> dict:
    import treq

    response = await treq.request(method, base + path, persistent=False)
    return await response.json()


async def publish(client: Any, queue: str, kind: str, count: int, url: str,
                  delay: float) -> list:
    """Publish ``count`` tasks (confirmed by the broker); their ids."""
    from twisted.internet import defer

    from bench.url_tasks import sleep as sleep_task

    def one(i: int) -> Any:
        if kind == "url":
            return client.add_url_task(url, body={"n": i}, queue=queue)
        return client.add_task(sleep_task, delay, _queue=queue)

    # The first task alone: while the publisher declares a queue it has not
    # yet declared on its connection, every concurrent publish to it waits on
    # a DeferredLock that is then handed from waiter to waiter recursively;
    # past about 120 waiters that hits Python's recursion limit in the
    # middle of a basic.publish, RabbitMQ closes the connection
    # (unexpected_frame) and the publishes hang.  Once declared, no lock.
    ids: list = [(await one(0)).id]
    for first in range(1, count, 500):
        infos = await defer.gatherResults([one(i) for i in range(first, min(count, first + 500))],
                                          consumeErrors=True)
        ids += [info.id for info in infos]
    return ids


def peak_overlap(intervals: list) -> int:
    """Largest number of [start, end) intervals that overlap."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    peak = running = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


async def one_run(reactor: Any, name: str, repeat: int, args: argparse.Namespace,
                  ctx: dict, client: Any, redis: Any) -> dict:
    """Publish N tasks, start one worker, wait until N succeeded in Redis."""
    from quebert.state.redis import RedisStateManager

    kind, threads = CONFIGS[name]
    prefix = f"{ctx['prefix']}{name}-{repeat}:"
    state = RedisStateManager(redis, prefix=prefix, timeout=30.0)
    succeeded_key = f"{prefix}idx:state:succeeded"
    result: dict = {"config": name, "repeat": repeat, "threads": threads or DEFAULT_THREADS}

    # A queue per run: a run that failed leaves nothing behind for the next.
    queue = f"{QUEUE}-{name}-{repeat}"
    ids = await publish(client, queue, kind, args.tasks, ctx["endpoint_url"] + "/task", args.delay)
    await endpoint_call("/reset", ctx["endpoint_url"], "POST")
    log_path = os.path.join(ctx["workdir"], f"worker-{name}-{repeat}.log")
    worker_args = [
        TWISTD, "--pidfile=", "-n", f"--logfile={log_path}", "amqp-worker",
        "--config", ctx["config_path"], "--amqp-url", ctx["url"],
        "--redis-url", args.redis_url, "--state-prefix", prefix,
        "--tasks", "bench.url_tasks", "--queue", f"{queue}:{MAX_RUNNING}",
        "--max-running-tasks", str(MAX_RUNNING), "--log-level", "warn",
    ]
    if threads:
        worker_args += ["--threads", str(threads)]
    endpoint_cpu0 = proc_cpu_s(ctx["endpoint_pid"]) or 0.0
    began = time.time()
    process = spawn(f"worker {name}", worker_args, log_path + ".out")
    cpu_mark: Optional[tuple] = None
    try:
        deadline = time.monotonic() + args.timeout
        while True:
            done = int(await redis.zcard(succeeded_key))
            if done >= args.tasks:
                break
            if done and cpu_mark is None:
                cpu_mark = (done, proc_cpu_s(process.pid))
            if process.poll() is not None:
                raise RunFailed(f"the worker exited with {process.returncode} after {done} of "
                                f"{args.tasks} tasks succeeded:\n{tail(log_path)}")
            if time.monotonic() > deadline:
                counts = {s: int(await redis.zcard(f"{prefix}idx:state:{s}"))
                          for s in ("queued", "running", "retrying", "failed")}
                pool = await endpoint_call("/stats", ctx["endpoint_url"])
                states = ", ".join(f"{k} {v}" for k, v in counts.items())
                raise RunFailed(
                    f"timed out after {args.timeout:.0f} s: {done} of {args.tasks} tasks "
                    f"succeeded in the state store ({states}); endpoint: {pool}; "
                    f"worker log:\n{tail(log_path)}")
            await sleep(reactor, 0.05)
        result["detected_s"] = time.time() - began
        result["peak_rss_kb"] = peak_rss_kb(process.pid)
        cpu_end = proc_cpu_s(process.pid)
        if cpu_mark is not None and cpu_mark[1] is not None and cpu_end is not None:
            result["cpu_us_per_task"] = 1e6 * (cpu_end - cpu_mark[1]) / (args.tasks - cpu_mark[0])
        result["endpoint"] = await endpoint_call("/stats", ctx["endpoint_url"])
        endpoint_cpu = proc_cpu_s(ctx["endpoint_pid"])
        if endpoint_cpu is not None and result["endpoint"]["requests"]:
            result["endpoint_cpu_us_per_request"] = (
                1e6 * (endpoint_cpu - endpoint_cpu0) / result["endpoint"]["requests"])
    finally:
        result["exit_code"] = await stop_worker(reactor, process)
    if result["exit_code"] != 0:
        log(f"worker {name}: exit code {result['exit_code']}\n{tail(log_path, 1500)}")

    # Exact check: every task published is recorded succeeded, once.
    records = await state.list(state="succeeded", limit=args.tasks + 100)
    by_id = {r["id"]: r for r in records if r is not None}
    missing = [i for i in ids if i not in by_id]
    if missing or len(by_id) != len(ids):
        raise RunFailed(f"{len(missing)} published tasks are not recorded succeeded, "
                        f"{len(set(by_id) - set(ids))} unknown records succeeded")
    retried = sum(1 for r in by_id.values() if int(r.get("attempts") or 1) > 1)
    intervals = [(r["started_at"], r["finished_at"]) for r in by_id.values()]
    first_start = min(s for s, _ in intervals)
    last_end = max(e for _, e in intervals)
    drain = last_end - first_start
    durations = [e - s for s, e in intervals]
    result.update({
        "tasks": len(ids),
        "tasks_per_s": len(ids) / drain if drain > 0 else float("inf"),
        "drain_s": drain,
        "startup_s": first_start - began,
        "p50_ms": 1000 * percentile(durations, 50),
        "p99_ms": 1000 * percentile(durations, 99),
        "max_ms": 1000 * max(durations),
        "peak_running": peak_overlap(intervals),
        "retried": retried,
    })
    if retried:
        result["warning"] = f"{retried} tasks needed more than one attempt"
    return result


async def measure(reactor: Any, args: argparse.Namespace, ctx: dict) -> list:
    from quebert.client import Client
    from quebert.state.redis import connect_redis

    client = Client(ctx["url"], reactor=reactor, default_queue=QUEUE)
    redis = connect_redis(args.redis_url, reactor=reactor)
    results: list = []
    try:
        await client.whenConnected(fail_after_failures=3)
        for repeat in range(args.repeat):
            for name in args.configs:
                log(f"run {repeat + 1}/{args.repeat}: {name} ({args.tasks} tasks)")
                try:
                    r = await one_run(reactor, name, repeat, args, ctx, client, redis)
                except RunFailed as e:
                    log(f"  {name} failed: {e}")
                    results.append({"config": name, "repeat": repeat, "error": str(e)})
                    continue
                results.append(r)
                log(f"  {r['tasks_per_s']:.0f} tasks/s, {r['peak_running']} running at peak, "
                    f"endpoint peak {r['endpoint']['peak']}, p50 {r['p50_ms']:.0f} ms, "
                    f"p99 {r['p99_ms']:.0f} ms, peak RSS {(r['peak_rss_kb'] or 0) / 1024:.1f} MB")
    finally:
        await client.close()
        redis.disconnect()
    return results


# -- reporting ------------------------------------------------------------------


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summarise(results: list) -> dict:
    summary: dict = {}
    for name in CONFIGS:
        ok = [r for r in results if r["config"] == name and "tasks_per_s" in r]
        errors = [r["error"] for r in results if r["config"] == name and "error" in r]
        if not ok and not errors:
            continue

        def med(key: str, runs: list = ok) -> Optional[float]:
            values = [r[key] for r in runs if r.get(key) is not None]
            return statistics.median(values) if values else None

        summary[name] = {
            "tasks_per_s": med("tasks_per_s"),
            "all_tasks_per_s": [round(r["tasks_per_s"]) for r in ok],
            "threads": ok[0]["threads"] if ok else None,
            "peak_running": max((r["peak_running"] for r in ok), default=None),
            "endpoint_peak": max((r["endpoint"]["peak"] for r in ok), default=None),
            "endpoint_requests": [r["endpoint"]["requests"] for r in ok],
            "endpoint_connections": [r["endpoint"].get("connections") for r in ok],
            "endpoint_cpu_us": med("endpoint_cpu_us_per_request"),
            "p50_ms": med("p50_ms"),
            "p99_ms": med("p99_ms"),
            "cpu_us_per_task": med("cpu_us_per_task"),
            "startup_s": med("startup_s"),
            "peak_rss_mb": max(((r["peak_rss_kb"] or 0) for r in ok), default=0) / 1024 or None,
            "warnings": [r["warning"] for r in ok if "warning" in r],
            "errors": errors,
        }
    return summary


def report(summary: dict, args: argparse.Namespace) -> str:
    width = 104
    delay_ms = 1000 * args.delay
    lines = [
        f"quebert URL-task benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs: "
        f"{args.tasks} tasks per run, endpoint answers after {delay_ms:.0f} ms,",
        f"one worker: --max-running-tasks {MAX_RUNNING} --queue {QUEUE}-RUN:{MAX_RUNNING}, "
        f"--config dispatch {json.dumps(DISPATCH)} (defaults 100/10 would cap URL tasks);",
        f"{args.repeat} repeat(s), medians",
        "",
        f"{'configuration':<34} {'tasks/s':>8} {'ideal':>6} {'running':>8} {'endpoint':>9} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'CPU us':>7} {'RSS MB':>7}",
        "-" * width,
    ]
    for name in CONFIGS:
        s = summary.get(name)
        if s is None:
            continue
        kind, threads = CONFIGS[name]
        in_flight = MAX_RUNNING if kind == "url" else min(MAX_RUNNING, threads or DEFAULT_THREADS)
        ideal = in_flight / args.delay
        lines.append(
            f"{LABELS[name]:<34} {_fmt(s['tasks_per_s'], '8.0f'):>8} {ideal:6.0f} "
            f"{_fmt(s['peak_running'], 'd'):>8} {_fmt(s['endpoint_peak'], 'd'):>9} "
            f"{_fmt(s['p50_ms'], '7.0f'):>7} {_fmt(s['p99_ms'], '7.0f'):>7} "
            f"{_fmt(s['cpu_us_per_task'], '7.0f'):>7} {_fmt(s['peak_rss_mb'], '7.1f'):>7}")
    lines += [
        "-" * width,
        "tasks/s: N / (last finished_at - first started_at) of the N task records in Redis,",
        "once all N are recorded succeeded.  ideal: tasks that can be in flight / delay.",
        "running: peak of tasks started and not finished at once (records' started_at..",
        "finished_at; a thread task counts from when the worker takes it, thread or not).",
        "endpoint: peak of requests open at once at the endpoint.  p50/p99: task duration,",
        "started_at to finished_at.  CPU us: worker CPU per task while draining.  RSS: VmHWM.",
        "",
    ]
    for name in CONFIGS:
        s = summary.get(name)
        if s is None or not s["all_tasks_per_s"]:
            continue
        spread = s["all_tasks_per_s"]
        lines.append(f"  {name}: tasks/s per repeat {spread} (spread {min(spread)}-{max(spread)})"
                     f"; {s['threads']} threads; start-up {_fmt(s['startup_s'], '.2f')} s")
        if any(s["endpoint_requests"]):
            lines.append(f"    endpoint: requests {s['endpoint_requests']}, TCP connections "
                         f"{s['endpoint_connections']}, CPU "
                         f"{_fmt(s['endpoint_cpu_us'], '.0f')} us per request")
    for name, s in summary.items():
        for warning in s["warnings"]:
            lines.append(f"WARNING {name}: {warning}")
        for error in s["errors"]:
            lines.append(f"ERROR {name}: {error.splitlines()[0]}")
    lines.append("")
    url = (summary.get("url") or {}).get("tasks_per_s")
    for name in ("thread", "thread-500"):
        other = (summary.get(name) or {}).get("tasks_per_s")
        if name not in summary:
            continue
        if url and other:
            lines.append(f"RATIO URL / {LABELS[name]}: {url / other:.1f}x "
                         f"({url:.0f} vs {other:.0f} tasks/s)")
        else:
            lines.append(f"RATIO URL / {LABELS[name]}: not measured")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------


def parse_args(argv: list) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000,
                        help="tasks per run [default: 2000]")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of every configuration; medians and the spread are "
                             "reported [default: 1]")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help=f"comma-separated subset of {', '.join(CONFIGS)} "
                             f"[default: {DEFAULT_CONFIGS}]")
    parser.add_argument("--delay", type=float, default=0.1,
                        help="seconds the endpoint (and the sleeping task) take [default: 0.1]")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds a run may take before it is abandoned [default: 120]")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672",
                        help="RabbitMQ, without a vhost [default: %(default)s]")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9",
                        help="Redis for the task state [default: %(default)s]")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--keep", action="store_true",
                        help="keep the working directory (worker and endpoint logs)")
    args = parser.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configuration(s): {', '.join(sorted(unknown))}")
    if args.tasks < 1 or args.repeat < 1 or args.delay <= 0 or args.timeout <= 0:
        parser.error("--tasks and --repeat must be >= 1, --delay and --timeout > 0")
    return args


def run_reactor(args: argparse.Namespace, ctx: dict) -> list:
    """Run :func:`measure` in the reactor; Ctrl-C or SIGTERM stop it early."""
    from twisted.internet import defer, reactor
    from twisted.python.failure import Failure

    outcome: list = []

    def start() -> None:
        d = defer.ensureDeferred(measure(reactor, args, ctx))
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if not outcome:
        raise SystemExit("interrupted")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_endpoint"]:
        endpoint_main(argv[1:])
        return 0
    args = parse_args(argv)

    from quebert.state.redis import parse_redis_url

    redis_options = parse_redis_url(args.redis_url)
    vhost = f"quebert-bench-{uuid.uuid4().hex[:12]}"
    prefix = f"quebert-bench-{uuid.uuid4().hex[:12]}:"
    workdir = tempfile.mkdtemp(prefix="quebert-bench-url-")
    ctx: dict = {"url": f"{args.amqp.rstrip('/')}/{vhost}", "prefix": prefix,
                 "workdir": workdir, "config_path": os.path.join(workdir, "worker.json")}
    with open(ctx["config_path"], "w", encoding="ascii") as f:
        json.dump({"dispatch": DISPATCH}, f)
    log(f"vhost {vhost}, Redis prefix {prefix} in db {redis_options['db']}, files in {workdir}")
    # Until the reactor runs, SIGTERM unwinds through the finally below; once
    # it runs, its own handler stops it, and the finally runs just the same.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rabbitmqctl("add_vhost", vhost)
    results: list = []
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        endpoint, port, _ = start_endpoint(workdir, args.delay)
        ctx["endpoint_url"] = f"http://127.0.0.1:{port}"
        ctx["endpoint_pid"] = endpoint.pid
        log(f"endpoint on port {port} (pid {endpoint.pid}), answering after "
            f"{1000 * args.delay:.0f} ms")
        results = run_reactor(args, ctx)
    finally:
        kill_all()
        try:
            rabbitmqctl("delete_vhost", vhost)
        except Exception as e:
            log(f"could not delete vhost {vhost}: {e}")
        try:
            redis = MiniRedis(redis_options["host"], redis_options["port"], redis_options["db"],
                              redis_options["password"])
            try:
                log(f"deleted {redis.delete_prefixed(prefix)} Redis keys under {prefix}")
            finally:
                redis.close()
        except Exception as e:
            log(f"could not delete Redis keys under {prefix}: {e}")
        if not args.keep:
            for entry in os.listdir(workdir):
                os.unlink(os.path.join(workdir, entry))
            os.rmdir(workdir)

    summary = summarise(results)
    print(report(summary, args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "dispatch": DISPATCH, "results": results,
                       "summary": summary}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
