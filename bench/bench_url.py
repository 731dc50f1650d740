"""
URL tasks against a bare pika+treq consumer, at 100 and 500 in flight.

Run from the repository root::

    .venv/bin/python bench/bench_url.py [--tasks N] [--repeat R] [--profile DIR]

The workload (issue 16): N URL tasks (default 10,000), each a POST to a
local twisted.web endpoint that answers 200 after 100 ms, drained by

- ``bare-F``: a bare consumer (``bench_url.py _bare``) on pika's
  ``TwistedProtocolConnection``, prefetch F, that POSTs each message's URL
  with treq (one ``HTTPClient`` on a persistent ``HTTPConnectionPool``
  keeping F connections to the host), reads the answer's body and acks
  after it;
- ``url-F``: one quebert worker with Redis state (``--max-running-tasks F
  --queue Q:F``, its dispatcher told in its config file to allow 500
  connections, 500 to one host: explicit, whatever the defaults are);

for F = 100 and 500, alternating within every repeat.  It prints each
system's drain rate and worker CPU per task, and quebert's ratios to the
bare consumer *measured in the same run*, with the targets beside
(reported, never asserted).  ``--configs`` adds the thread-pool
comparison (``thread``, ``thread-500``: callable tasks that sleep 100 ms).
``--profile DIR`` runs the quebert workers under ``py-spy record`` and
prints their hotspots (CPU figures are then distorted).  It needs the
local RabbitMQ (``rabbitmqctl`` on the PATH, guest/guest on
127.0.0.1:5672) and Redis (database 9).  Everything lives in a fresh vhost,
deleted at the end, and under a unique Redis key prefix, whose keys (and
only those) are deleted at the end.  See ``bench/README.rst``.
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
    pump,
    rabbitmqctl,
)

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
QUEUE = "bench"
#: The most tasks in flight of any configuration.
MAX_RUNNING = 500
#: What the worker's URL dispatcher gets in its config file, whatever its
#: defaults: room for 500 requests at once, all to the one endpoint.
DISPATCH = {"max_connections": MAX_RUNNING, "max_connections_per_host": MAX_RUNNING}
#: Thread pool size the worker picks by default: min(max_running_tasks, 50).
DEFAULT_THREADS = min(MAX_RUNNING, 50)

#: name -> (kind, tasks in flight (prefetch, --max-running-tasks), --threads or None)
CONFIGS = {
    "bare-100": ("bare", 100, None),
    "url-100": ("url", 100, None),
    "bare-500": ("bare", 500, None),
    "url-500": ("url", 500, None),
    "thread": ("thread", MAX_RUNNING, None),
    "thread-500": ("thread", MAX_RUNNING, MAX_RUNNING),
}
LABELS = {
    "bare-100": "bare pika+treq, 100 in flight",
    "url-100": "quebert URL, redis, 100 in flight",
    "bare-500": "bare pika+treq, 500 in flight",
    "url-500": "quebert URL, redis, 500 in flight",
    "thread": f"callable, sleep, {DEFAULT_THREADS} threads",
    "thread-500": f"callable, sleep, {MAX_RUNNING} threads",
}
DEFAULT_CONFIGS = "bare-100,url-100,bare-500,url-500"
#: Targets of issue 16 (printed beside the ratios, never asserted):
#: quebert's drain rate at least this ratio of the bare consumer's...
TARGET_RATE = 0.85
#: ...and its worker CPU per task at most this ratio of the bare consumer's.
TARGET_CPU = 1.10
PY_SPY = os.path.join(os.path.dirname(sys.executable), "py-spy")


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


# -- the bare consumer (run in its own process) -------------------------------


def bare_main(argv: list) -> None:
    """
    ``bench_url.py _bare``: the baseline.  A pika ``TwistedProtocolConnection``
    consumer, QoS ``--prefetch``, that decodes each quebert URL message
    (``json.loads``), POSTs its body to its URL with its headers through one
    treq ``HTTPClient`` on a persistent pool keeping ``--prefetch``
    connections to a host, reads the whole answer (``treq.content``) and
    acks; a non-2xx answer or an error is nacked back to the queue (never
    happens here; counted).  After ``--count`` acks it writes to ``--out``
    the time of the first delivery and of the last ack, and its CPU time at
    the first and the last ack; it runs until SIGTERM.
    """
    parser = argparse.ArgumentParser(prog="bench_url.py _bare")
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--prefetch", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--out", required=True)
    a = parser.parse_args(argv)

    import base64

    import pika
    import treq
    from pika.adapters.twisted_connection import TwistedProtocolConnection
    from twisted.internet import defer, reactor
    from twisted.internet import protocol as tprotocol
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = a.prefetch
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))
    figures = {"acked": 0, "nacked": 0, "first_start": None, "last_end": None,
               "cpu_first": None, "cpu_end": None}

    def cpu() -> float:
        t = os.times()
        return t.user + t.system

    async def one(channel: Any, method: Any, body: bytes) -> None:
        if figures["first_start"] is None:
            figures["first_start"] = time.time()
        ok = False
        try:
            task = json.loads(body)
            data = task.get("body") or ""
            data = (base64.b64decode(data) if task.get("body_encoding") == "base64"
                    else data.encode("utf-8"))
            response = await client.request(task.get("method") or "POST", task["url"],
                                            headers=task.get("headers") or {}, data=data)
            await treq.content(response)
            ok = 200 <= response.code < 300
        except Exception as e:
            print(f"bare consumer: {e!r}", file=sys.stderr)
        if not ok:
            figures["nacked"] += 1
            channel.basic_nack(method.delivery_tag, requeue=True)
            return
        channel.basic_ack(method.delivery_tag)
        figures["acked"] += 1
        if figures["acked"] == 1:
            figures["cpu_first"] = cpu()
        if figures["acked"] == a.count:
            figures["last_end"] = time.time()
            figures["cpu_end"] = cpu()
            with open(a.out + ".tmp", "w", encoding="ascii") as f:
                json.dump(figures, f)
            os.replace(a.out + ".tmp", a.out)

    def start_one(message: Any) -> None:
        channel, method, _properties, body = message
        defer.ensureDeferred(one(channel, method, body))

    def stop(failure: Any) -> None:
        print(f"bare consumer failed: {failure.getErrorMessage()}", file=sys.stderr)
        if reactor.running:
            reactor.stop()

    async def start() -> None:
        parameters = pika.URLParameters(a.amqp_url)
        creator = tprotocol.ClientCreator(reactor, TwistedProtocolConnection, parameters)
        connection = await creator.connectTCP(parameters.host, parameters.port)
        await connection.ready
        channel = await connection.channel()
        await channel.basic_qos(prefetch_count=a.prefetch)
        queue_object, _tag = await channel.basic_consume(queue=a.queue, auto_ack=False)
        pump(queue_object, start_one, stop)

    reactor.callWhenRunning(lambda: defer.ensureDeferred(start()).addErrback(stop))
    reactor.run()


# -- the HTTP client alone (``bench_url.py clients``) ----------------------------

#: client -> what sends one POST and reads its answer, in :func:`client_main`.
CLIENTS = ("treq", "agent", "quebert")


def client_main(argv: list) -> None:
    """
    ``bench_url.py _client``: send ``--requests`` POSTs to ``--url``,
    ``--concurrency`` at a time, through one ``--client``, and print its CPU
    per request (after one warm-up round) as JSON:

    - ``treq``: one treq ``HTTPClient`` on a persistent pool (the bare
      consumer's), ``treq.content``;
    - ``agent``: Twisted's ``Agent`` on a persistent pool, ``readBody``:
      the floor under both;
    - ``quebert``: ``URLDispatcher.dispatch`` (default policy, limits raised
      to the concurrency) with the ``X-Quebert-*`` headers a worker adds,
      and ``to_record()`` of the result.
    """
    parser = argparse.ArgumentParser(prog="bench_url.py _client")
    parser.add_argument("--client", choices=CLIENTS, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    a = parser.parse_args(argv)

    import treq
    from twisted.internet import defer, reactor
    from twisted.web.client import Agent, HTTPConnectionPool, readBody
    from twisted.web.http_headers import Headers

    from quebert.dispatch import URLDispatcher, URLRequest
    from quebert.dispatch.dispatcher import _BytesProducer

    body = b'{"n": 1}'
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = a.concurrency
    if a.client == "treq":
        client = treq.client.HTTPClient(Agent(reactor, pool=pool))

        async def one(i: int) -> None:
            response = await client.request("POST", a.url, data=body,
                                            headers={"Content-Type": "application/json"})
            await treq.content(response)
    elif a.client == "agent":
        agent = Agent(reactor, pool=pool)

        async def one(i: int) -> None:
            response = await agent.request(
                b"POST", a.url.encode("ascii"),
                Headers({b"Content-Type": [b"application/json"]}), _BytesProducer(body))
            await readBody(response)
    else:
        dispatcher = URLDispatcher(reactor, max_connections=a.concurrency,
                                   max_connections_per_host=a.concurrency)

        async def one(i: int) -> None:
            request = URLRequest(url=a.url, method="POST", body=body,
                                 headers={"Content-Type": "application/json"})
            result = await dispatcher.dispatch(request, queue="q", deadline=600.0, extra_headers={
                "X-Quebert-QueueName": "q", "X-Quebert-TaskName": f"t{i}",
                "X-Quebert-TaskRetryCount": "0", "X-Quebert-TaskExecutionCount": "0",
                "X-Quebert-TaskETA": "1767225600.000000"})
            result.to_record()

    out: dict = {}

    async def run() -> None:
        await defer.gatherResults([defer.ensureDeferred(one(i))
                                   for i in range(a.concurrency)])
        slots = defer.DeferredSemaphore(a.concurrency)
        t0, c0 = time.monotonic(), os.times()
        await defer.gatherResults([slots.run(lambda i=i: defer.ensureDeferred(one(i)))
                                   for i in range(a.requests)])
        t1, c1 = time.monotonic(), os.times()
        cpu = (c1.user + c1.system) - (c0.user + c0.system)
        out.update(client=a.client, cpu_us=1e6 * cpu / a.requests,
                   per_s=a.requests / (t1 - t0))

    d = defer.ensureDeferred(run())
    d.addErrback(lambda f: out.update(error=f.getErrorMessage()))
    d.addBoth(lambda _: reactor.stop())
    reactor.run()
    print(json.dumps(out))


def clients_main(argv: list) -> int:
    """
    ``bench_url.py clients``: the HTTP client alone, without RabbitMQ or
    Redis: CPU per request of treq (the bare consumer's client), Twisted's
    Agent and quebert's dispatcher, each in a process of its own against an
    endpoint answering after 1 ms, interleaved, medians of ``--repeat``.
    """
    parser = argparse.ArgumentParser(prog="bench_url.py clients",
                                     description=clients_main.__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    a = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="quebert-bench-clients-")
    figures: dict = {c: [] for c in CLIENTS}
    try:
        endpoint, port, _ = start_endpoint(workdir, 0.001)
        url = f"http://127.0.0.1:{port}/task"
        for repeat in range(a.repeat):
            for client in CLIENTS:
                env = dict(os.environ)
                env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
                done = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "_client", "--client", client,
                     "--url", url, "--requests", str(a.requests),
                     "--concurrency", str(a.concurrency)],
                    cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
                lines = done.stdout.strip().splitlines()
                result = json.loads(lines[-1]) if lines else {"error": done.stderr[-500:]}
                if "error" in result:
                    log(f"{client}: {result['error']}")
                    continue
                figures[client].append(result["cpu_us"])
                log(f"run {repeat + 1}/{a.repeat} {client}: {result['cpu_us']:.0f} us CPU "
                    f"per request, {result['per_s']:.0f} requests/s")
    finally:
        kill_all()
        for entry in os.listdir(workdir):
            os.unlink(os.path.join(workdir, entry))
        os.rmdir(workdir)
    print(f"HTTP clients alone: {a.requests} POSTs, {a.concurrency} at a time, endpoint "
          f"answering after 1 ms; CPU us per request, median of {a.repeat}:")
    floor = _median(figures["agent"])
    for client in CLIENTS:
        value = _median(figures[client])
        extra = f" ({value - floor:+.0f} over Agent)" if value and floor else ""
        runs = [round(v) for v in figures[client]]
        print(f"  {client:<8} {_fmt(value, '6.0f')}{extra}   per run {runs}")
    return 0


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


async def stop_worker(reactor: Any, process: subprocess.Popen, timeout: float = 30.0,
                      pid: Optional[int] = None) -> int:
    """
    SIGTERM (the worker drains and stops), SIGKILL after ``timeout``.  ``pid``:
    the worker's, when ``process`` is py-spy's (which then writes its profile).
    """
    if process.poll() is None:
        if pid is not None and pid != process.pid:
            os.kill(pid, signal.SIGTERM)
        else:
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
    """Publish N tasks, start the consumer, wait until it is done with all N."""
    kind, in_flight, threads = CONFIGS[name]
    result: dict = {"config": name, "repeat": repeat, "in_flight": in_flight,
                    "threads": threads or DEFAULT_THREADS}
    # A queue per run: a run that failed leaves nothing behind for the next.
    queue = f"{QUEUE}-{name}-{repeat}"
    ids = await publish(client, queue, "thread" if kind == "thread" else "url", args.tasks,
                        ctx["endpoint_url"] + "/task", args.delay)
    await endpoint_call("/reset", ctx["endpoint_url"], "POST")
    if kind == "bare":
        await bare_run(reactor, name, repeat, args, ctx, queue, in_flight, result)
    else:
        await worker_run(reactor, name, repeat, args, ctx, queue, in_flight, threads, ids,
                         redis, result)
    return result


async def watch_cpu(reactor: Any, args: argparse.Namespace, ctx: dict, pid: int,
                    process: subprocess.Popen, done: Any, describe: Any,
                    progress: Any = None) -> dict:
    """
    Poll every 50 ms until ``await done()`` is true: the process's CPU time
    when the endpoint has first answered (the mark, with how many answers
    then; ``await progress()`` instead of the answers when given) and when
    it is done, the same way for every system.
    """
    marks: dict = {}
    deadline = time.monotonic() + args.timeout
    while True:
        if await done():
            marks["cpu_end"] = proc_cpu_s(pid)
            marks["peak_rss_kb"] = peak_rss_kb(pid)
            return marks
        if "cpu_mark" not in marks:
            if progress is not None:
                answered = await progress()
            else:
                answered = (await endpoint_call("/stats", ctx["endpoint_url"]))["answered"]
            if answered:
                marks["cpu_mark"] = proc_cpu_s(pid)
                marks["answered_mark"] = answered
        if process.poll() is not None:
            raise RunFailed(f"the process exited with {process.returncode}: "
                            f"{await describe()}")
        if time.monotonic() > deadline:
            raise RunFailed(f"timed out after {args.timeout:.0f} s: {await describe()}")
        await sleep(reactor, 0.05)


def cpu_per_task(result: dict, marks: dict, tasks: int) -> None:
    if marks.get("cpu_mark") is not None and marks.get("cpu_end") is not None \
            and tasks > marks["answered_mark"]:
        result["cpu_us_per_task"] = (1e6 * (marks["cpu_end"] - marks["cpu_mark"])
                                     / (tasks - marks["answered_mark"]))


async def endpoint_figures(ctx: dict, result: dict, endpoint_cpu0: float) -> None:
    result["endpoint"] = await endpoint_call("/stats", ctx["endpoint_url"])
    endpoint_cpu = proc_cpu_s(ctx["endpoint_pid"])
    if endpoint_cpu is not None and result["endpoint"]["requests"]:
        result["endpoint_cpu_us_per_request"] = (
            1e6 * (endpoint_cpu - endpoint_cpu0) / result["endpoint"]["requests"])


async def bare_run(reactor: Any, name: str, repeat: int, args: argparse.Namespace, ctx: dict,
                   queue: str, in_flight: int, result: dict) -> None:
    """The bare consumer drains the queue; its own figures, read from its file."""
    out = os.path.join(ctx["workdir"], f"bare-{name}-{repeat}.json")
    log_path = os.path.join(ctx["workdir"], f"bare-{name}-{repeat}.log")
    endpoint_cpu0 = proc_cpu_s(ctx["endpoint_pid"]) or 0.0
    began = time.time()
    process = spawn(f"bare consumer {name}", [
        sys.executable, os.path.abspath(__file__), "_bare", "--amqp-url", ctx["url"],
        "--queue", queue, "--prefetch", str(in_flight), "--count", str(args.tasks),
        "--out", out], log_path)

    async def done() -> bool:
        return os.path.exists(out)

    async def describe() -> str:
        pool = await endpoint_call("/stats", ctx["endpoint_url"])
        return f"endpoint: {pool}; log:\n{tail(log_path)}"

    try:
        marks = await watch_cpu(reactor, args, ctx, process.pid, process, done, describe)
        await endpoint_figures(ctx, result, endpoint_cpu0)
    finally:
        result["exit_code"] = kill_now(process)
    with open(out, encoding="ascii") as f:
        own = json.load(f)
    drain = own["last_end"] - own["first_start"]
    result.update({
        "tasks": args.tasks,
        "tasks_per_s": args.tasks / drain if drain > 0 else float("inf"),
        "drain_s": drain,
        "startup_s": own["first_start"] - began,
        "peak_rss_kb": marks.get("peak_rss_kb"),
        "retried": own["nacked"],
        # The consumer's own reading, from its first ack (a cross-check).
        "cpu_us_per_task_own": 1e6 * (own["cpu_end"] - own["cpu_first"]) / (args.tasks - 1),
    })
    cpu_per_task(result, marks, args.tasks)
    if own["nacked"]:
        result["warning"] = f"{own['nacked']} deliveries were nacked (non-2xx or error)"


async def worker_run(reactor: Any, name: str, repeat: int, args: argparse.Namespace,
                     ctx: dict, queue: str, in_flight: int, threads: Optional[int], ids: list,
                     redis: Any, result: dict) -> None:
    """One quebert worker drains the queue; figures from its N records in Redis."""
    from quebert.state.redis import RedisStateManager

    prefix = f"{ctx['prefix']}{name}-{repeat}:"
    state = RedisStateManager(redis, prefix=prefix, timeout=30.0)
    succeeded_key = f"{prefix}idx:state:succeeded"
    log_path = os.path.join(ctx["workdir"], f"worker-{name}-{repeat}.log")
    worker_args = [
        TWISTD, "--pidfile=", "-n", f"--logfile={log_path}", "amqp-worker",
        "--config", ctx["config_path"], "--amqp-url", ctx["url"],
        "--redis-url", args.redis_url, "--state-prefix", prefix,
        "--tasks", "bench.url_tasks", "--queue", f"{queue}:{in_flight}",
        "--max-running-tasks", str(in_flight), "--log-level", "warn",
    ]
    if threads:
        worker_args += ["--threads", str(threads)]
    profile = None
    if args.profile and CONFIGS[name][0] == "url":
        profile = os.path.join(args.profile, f"{name}-{repeat}.txt")
        result["profile"] = profile
        worker_args = [PY_SPY, "record", "--nonblocking", "--format", "raw", "--rate", "100",
                       "-o", profile,
                       "--", *worker_args]
    endpoint_cpu0 = proc_cpu_s(ctx["endpoint_pid"]) or 0.0
    began = time.time()
    process = spawn(f"worker {name}", worker_args, log_path + ".out")
    pid = process.pid
    if profile:
        pid = await child_pid(reactor, process)

    async def succeeded() -> int:
        return int(await redis.zcard(succeeded_key))

    async def done() -> bool:
        return await succeeded() >= args.tasks

    async def describe() -> str:
        counts = {s: int(await redis.zcard(f"{prefix}idx:state:{s}"))
                  for s in ("queued", "running", "scheduled", "succeeded", "failed")}
        pool = await endpoint_call("/stats", ctx["endpoint_url"])
        states = ", ".join(f"{k} {v}" for k, v in counts.items())
        return (f"of {args.tasks} tasks: {states}; endpoint: {pool}; worker log:\n"
                f"{tail(log_path)}{tail(log_path + '.out')}")

    try:
        # Thread tasks never reach the endpoint: their mark is the first succeeded.
        marks = await watch_cpu(reactor, args, ctx, pid, process, done, describe,
                                succeeded if CONFIGS[name][0] == "thread" else None)
        result["detected_s"] = time.time() - began
        await endpoint_figures(ctx, result, endpoint_cpu0)
    finally:
        result["exit_code"] = await stop_worker(reactor, process, pid=pid)
    if result["exit_code"] != 0:
        log(f"worker {name}: exit code {result['exit_code']}\n{tail(log_path, 1500)}")
    result["peak_rss_kb"] = marks.get("peak_rss_kb")
    cpu_per_task(result, marks, args.tasks)

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


async def child_pid(reactor: Any, process: subprocess.Popen, timeout: float = 10.0) -> int:
    """The pid of py-spy's child (the worker), once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{process.pid}/task/{process.pid}/children",
                      encoding="ascii") as f:
                children = f.read().split()
        except OSError:
            children = []
        if children:
            return int(children[0])
        await sleep(reactor, 0.02)
    raise RunFailed("py-spy started no worker process")


async def measure(reactor: Any, args: argparse.Namespace, ctx: dict) -> list:
    from quebert.client import Client
    from quebert.state.redis import connect_redis

    client = Client(ctx["url"], reactor=reactor, default_queue=QUEUE)
    redis = connect_redis(args.redis_url, reactor=reactor)
    results: list = []
    try:
        await client.whenConnected(fail_after_failures=3)
        for repeat in range(args.repeat):
            # Alternate: every other repeat runs the configurations backwards,
            # so that a drift of the machine's load favours neither system.
            order = args.configs if repeat % 2 == 0 else list(reversed(args.configs))
            for name in order:
                log(f"run {repeat + 1}/{args.repeat}: {name} ({args.tasks} tasks)")
                try:
                    r = await one_run(reactor, name, repeat, args, ctx, client, redis)
                except RunFailed as e:
                    log(f"  {name} failed: {e}")
                    results.append({"config": name, "repeat": repeat, "error": str(e)})
                    continue
                results.append(r)
                log(f"  {r['tasks_per_s']:.0f} tasks/s, CPU "
                    f"{_fmt(r.get('cpu_us_per_task'), '.0f')} us/task, endpoint peak "
                    f"{r['endpoint']['peak']}, peak RSS {(r['peak_rss_kb'] or 0) / 1024:.1f} MB")
    finally:
        await client.close()
        redis.disconnect()
    return results


# -- reporting ------------------------------------------------------------------


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _median(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(results: list) -> dict:
    summary: dict = {}
    for name in CONFIGS:
        ok = [r for r in results if r["config"] == name and "tasks_per_s" in r]
        errors = [r["error"] for r in results if r["config"] == name and "error" in r]
        if not ok and not errors:
            continue

        def med(key: str, runs: list = ok) -> Optional[float]:
            return _median([r.get(key) for r in runs])

        summary[name] = {
            "in_flight": CONFIGS[name][1],
            "tasks_per_s": med("tasks_per_s"),
            "all_tasks_per_s": [round(r["tasks_per_s"]) for r in ok],
            "all_cpu_us": [round(r["cpu_us_per_task"]) for r in ok
                           if r.get("cpu_us_per_task") is not None],
            "threads": ok[0]["threads"] if ok else None,
            "peak_running": max((r["peak_running"] for r in ok if "peak_running" in r),
                                default=None),
            "endpoint_peak": max((r["endpoint"]["peak"] for r in ok), default=None),
            "endpoint_requests": [r["endpoint"]["requests"] for r in ok],
            "endpoint_connections": [r["endpoint"].get("connections") for r in ok],
            "endpoint_cpu_us": med("endpoint_cpu_us_per_request"),
            "p50_ms": med("p50_ms"),
            "p99_ms": med("p99_ms"),
            "cpu_us_per_task": med("cpu_us_per_task"),
            "cpu_us_per_task_own": med("cpu_us_per_task_own"),
            "startup_s": med("startup_s"),
            "peak_rss_mb": max(((r["peak_rss_kb"] or 0) for r in ok), default=0) / 1024 or None,
            "warnings": [r["warning"] for r in ok if "warning" in r],
            "errors": errors,
        }
    ratios: dict = {}
    for in_flight in sorted({f for kind, f, _ in CONFIGS.values() if kind == "bare"}):
        bare, url = f"bare-{in_flight}", f"url-{in_flight}"
        if bare not in summary or url not in summary:
            continue
        by_repeat = {}
        for r in results:
            if "tasks_per_s" in r and r["config"] in (bare, url):
                by_repeat.setdefault(r["repeat"], {})[r["config"]] = r
        rate, cpu = [], []
        for pair in by_repeat.values():
            if len(pair) != 2:
                continue
            rate.append(pair[url]["tasks_per_s"] / pair[bare]["tasks_per_s"])
            if pair[url].get("cpu_us_per_task") and pair[bare].get("cpu_us_per_task"):
                cpu.append(pair[url]["cpu_us_per_task"] / pair[bare]["cpu_us_per_task"])
        ratios[in_flight] = {"rate": _median(rate), "cpu": _median(cpu),
                             "all_rate": [round(x, 2) for x in rate],
                             "all_cpu": [round(x, 2) for x in cpu]}
    summary["ratios"] = ratios
    return summary


def report(summary: dict, args: argparse.Namespace) -> str:
    width = 110
    delay_ms = 1000 * args.delay
    lines = [
        f"quebert URL-task benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs: "
        f"{args.tasks} tasks per run, POST to an endpoint answering after {delay_ms:.0f} ms;",
        f"quebert: one worker, Redis state, --max-running-tasks F --queue Q:F, --config "
        f"dispatch {json.dumps(DISPATCH)};",
        "bare: pika TwistedProtocolConnection, prefetch F, treq POST (persistent pool, F per "
        "host), body read, ack;",
        f"{args.repeat} repeat(s), medians" + (" (UNDER py-spy: CPU figures distorted)"
                                              if args.profile else ""),
        "",
        f"{'configuration':<36} {'tasks/s':>8} {'ideal':>6} {'running':>8} {'endpoint':>9} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'CPU us':>7} {'RSS MB':>7}",
        "-" * width,
    ]
    for name in CONFIGS:
        s = summary.get(name)
        if s is None:
            continue
        kind, in_flight, threads = CONFIGS[name]
        if kind == "thread":
            in_flight = min(in_flight, threads or DEFAULT_THREADS)
        ideal = in_flight / args.delay
        lines.append(
            f"{LABELS[name]:<36} {_fmt(s['tasks_per_s'], '8.0f'):>8} {ideal:6.0f} "
            f"{_fmt(s['peak_running'], 'd'):>8} {_fmt(s['endpoint_peak'], 'd'):>9} "
            f"{_fmt(s['p50_ms'], '7.0f'):>7} {_fmt(s['p99_ms'], '7.0f'):>7} "
            f"{_fmt(s['cpu_us_per_task'], '7.0f'):>7} {_fmt(s['peak_rss_mb'], '7.1f'):>7}")
    lines += [
        "-" * width,
        "tasks/s: N / drain time: quebert, last finished_at - first started_at of its N records",
        "in Redis; bare, its first delivery to its N-th ack.  ideal: tasks in flight / delay.",
        "running: peak of quebert tasks started and not finished at once.  endpoint: peak of",
        "requests open at once.  p50/p99: quebert task duration.  CPU us: the consumer's CPU",
        "from the endpoint's first answer to the N-th task done, per task after that (polled",
        "every 50 ms, the same way for both).  RSS: VmHWM.",
        "",
    ]
    for name in CONFIGS:
        s = summary.get(name)
        if s is None or not s["all_tasks_per_s"]:
            continue
        spread = s["all_tasks_per_s"]
        lines.append(f"  {name}: tasks/s per repeat {spread}, CPU us per task {s['all_cpu_us']}"
                     f"; start-up {_fmt(s['startup_s'], '.2f')} s")
        if s.get("cpu_us_per_task_own") is not None:
            lines.append(f"    (its own reading of CPU from its first ack: "
                         f"{s['cpu_us_per_task_own']:.0f} us per task)")
        if any(s["endpoint_requests"]):
            lines.append(f"    endpoint: requests {s['endpoint_requests']}, TCP connections "
                         f"{s['endpoint_connections']}, CPU "
                         f"{_fmt(s['endpoint_cpu_us'], '.0f')} us per request")
    for name, s in summary.items():
        if name == "ratios":
            continue
        for warning in s["warnings"]:
            lines.append(f"WARNING {name}: {warning}")
        for error in s["errors"]:
            lines.append(f"ERROR {name}: {error.splitlines()[0]}")
    lines.append("")
    for in_flight, r in summary.get("ratios", {}).items():
        lines.append(
            f"RATIO quebert/bare at {in_flight} in flight: drain rate "
            f"{_fmt(r['rate'], '.2f')}x (target >= {TARGET_RATE:.2f}x; per repeat "
            f"{r['all_rate']}), worker CPU per task {_fmt(r['cpu'], '.2f')}x (target <= "
            f"{TARGET_CPU:.2f}x; per repeat {r['all_cpu']})")
    url = (summary.get("url-500") or {}).get("tasks_per_s")
    for name in ("thread", "thread-500"):
        other = (summary.get(name) or {}).get("tasks_per_s")
        if name in summary and url and other:
            lines.append(f"RATIO URL (500 in flight) / {LABELS[name]}: {url / other:.1f}x "
                         f"({url:.0f} vs {other:.0f} tasks/s)")
    return "\n".join(lines)


def hotspots_report(results: list) -> str:
    from bench.bench_throughput import hotspots

    out = []
    for r in results:
        if r.get("profile") and os.path.exists(r["profile"]):
            out.append(hotspots(r["profile"]))
    return "\n\n".join(out)


# -- main -------------------------------------------------------------------------


def parse_args(argv: list) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10000,
                        help="tasks per run [default: 10000]")
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
    parser.add_argument("--profile", metavar="DIR",
                        help="run the quebert URL workers under 'py-spy record --nonblocking' (raw "
                             "format, 100 Hz), write the profiles to DIR and print their hotspots; "
                             "the CPU figures are then distorted")
    args = parser.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configuration(s): {', '.join(sorted(unknown))}")
    if args.tasks < 1 or args.repeat < 1 or args.delay <= 0 or args.timeout <= 0:
        parser.error("--tasks and --repeat must be >= 1, --delay and --timeout > 0")
    if args.profile:
        if not os.path.exists(PY_SPY):
            parser.error(f"--profile needs {PY_SPY}: {sys.executable} -m pip install py-spy")
        os.makedirs(args.profile, exist_ok=True)
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
    if argv[:1] == ["_bare"]:
        bare_main(argv[1:])
        return 0
    if argv[:1] == ["_client"]:
        client_main(argv[1:])
        return 0
    if argv[:1] == ["clients"]:
        return clients_main(argv[1:])
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
    if args.profile:
        print()
        print(hotspots_report(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "dispatch": DISPATCH, "results": results,
                       "summary": summary}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
