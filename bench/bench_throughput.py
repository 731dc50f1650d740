"""
Throughput, latency and memory of a quebert worker against a bare pika consumer.

Run from the repository root::

    .venv/bin/python bench/bench_throughput.py [--tasks N] [--repeat R]
    .venv/bin/python bench/bench_throughput.py --configs baseline-incr,redis-incr
    .venv/bin/python bench/bench_throughput.py --long 200000    # bench_long.py

Two workloads, each against its own bare consumer measured in the same run:
a no-op task (``baseline``), and issue 16's task that awaits one Redis
``INCR`` on a txredisapi connection of its own (``baseline-incr``).

It needs the local RabbitMQ (``rabbitmqctl`` on the PATH, guest/guest on
127.0.0.1:5672) and Redis (database 9).  Everything lives in a fresh vhost,
deleted at the end, and under a unique Redis key prefix, whose keys (and
only those) are deleted at the end.  ``--profile DIR`` runs the throughput
runs under py-spy and prints the hotspots.  See ``bench/README.rst`` for
what the figures mean and how they are measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Iterator, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pika  # noqa: E402

from quebert import protocol  # noqa: E402
from quebert.amqp.topology import QUEUE_TYPES, Topology  # noqa: E402

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
PY_SPY = os.path.join(os.path.dirname(sys.executable), "py-spy")
QUEUE = "bench"
PREFETCH = 200

#: name -> (kind, registered task, state backend)
CONFIGS = {
    "baseline": ("baseline", "bench.noop", None),
    "baseline-fast": ("baseline", "bench.noop", "fast"),
    "null-async": ("worker", "bench.noop", "null"),
    "memory-async": ("worker", "bench.noop", "memory"),
    "memory-thread": ("worker", "bench.noop_thread", "memory"),
    "redis-async": ("worker", "bench.noop", "redis"),
    "redis-thread": ("worker", "bench.noop_thread", "redis"),
    "redis-retry": ("worker", "bench.fail_once", "redis"),
    # The INCR workload: every task (message) awaits one Redis INCR on a
    # txredisapi connection of its own (bench.bench_tasks.INCR).
    "baseline-incr": ("baseline", "bench.incr", None),
    "null-incr": ("worker", "bench.incr", "null"),
    "redis-incr": ("worker", "bench.incr", "redis"),
    "memory-incr": ("worker", "bench.incr", "memory"),
}
#: Workload of each configuration: "incr" if its task awaits a Redis INCR.
WORKLOADS = {name: "incr" if task == "bench.incr" else "noop"
             for name, (_kind, task, _state) in CONFIGS.items()}
#: The baseline every configuration of a workload is compared with.
BASELINES = {"noop": "baseline", "incr": "baseline-incr"}
#: Opt-in configurations (not in the default list).
OPT_IN = {"redis-retry", "null-incr"}
#: Deliveries a worker handles per task (``bench.fail_once``: the failed
#: first attempt, then its retry); 1 for the others.
HANDLINGS = {"redis-retry": 2}
#: What ``--configs`` runs when not given, per ``--workload``.
DEFAULT_CONFIGS = {
    workload: [name for name in CONFIGS if name not in OPT_IN
               and (workload == "both" or WORKLOADS[name] == workload)]
    for workload in ("noop", "incr", "both")
}
LABELS = {
    "baseline": "baseline: bare pika consumer",
    "baseline-fast": "bare, quebert's decoding (diag.)",
    "null-async": "quebert, no state (diag.), async",
    "memory-async": "quebert, memory state, async def",
    "memory-thread": "quebert, memory state, thread",
    "redis-async": "quebert, redis state, async def",
    "redis-thread": "quebert, redis state, thread",
    "redis-retry": "quebert, redis state, retry once",
    "baseline-incr": "baseline-incr: bare pika + INCR",
    "null-incr": "quebert, no state (diag.), INCR",
    "redis-incr": "quebert, redis state, INCR",
    "memory-incr": "quebert, memory state, INCR",
}
#: The configuration the target is about.
TARGET_CONFIG = "redis-async"
TARGET_RATIO = 0.5
#: Issue 16's targets on the INCR workload (reported, never asserted).
INCR_TARGET_CONFIG = "redis-incr"
INCR_TARGET_RATIO = 0.6
INCR_TARGET_SERVER_RATIO = 1.5
INCR_TARGET_P50_MS = 1.5
INCR_TARGET_P99_MS = 3.0
#: The Redis key the INCR workload increments, under the run's prefix.
INCR_KEY = "bench-incr"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the baseline consumer (run in its own process) ---------------------------


def baseline_consumer(url: str, queue: str, prefetch: int, out: str,
                      fast: bool = False, incr: bool = False) -> None:
    """
    The least a consumer can do on pika's TwistedProtocolConnection: QoS
    ``prefetch``, read the enqueue time from the body, ``basic_ack`` each
    message.  Records with the same :class:`~bench.bench_tasks.Recorder`
    as the worker.  Runs until killed.

    ``incr``: the INCR workload's baseline: for each message, one Redis
    ``INCR`` on the same lazily made txredisapi connection as the worker's
    ``bench.incr`` task (``bench.bench_tasks.INCR``), and the ack once the
    INCR has answered (up to ``prefetch`` INCRs in flight).

    ``fast``: on the connection class quebert uses instead, which decodes
    whole deliveries itself (``quebert.amqp._frames``); a diagnostic, to
    show what that decoding is worth to a bare consumer too.
    """
    if fast:
        from quebert.amqp.connection import _pika_connection_class

        connection_class = _pika_connection_class()
    else:
        from pika.adapters.twisted_connection import TwistedProtocolConnection

        connection_class = TwistedProtocolConnection
    from twisted.internet import defer, reactor
    from twisted.internet import protocol as tprotocol
    from twisted.python.failure import Failure

    from bench.bench_tasks import INCR, Recorder

    recorder = Recorder(out)
    parameters = pika.URLParameters(url)

    def one(message: Any) -> None:
        channel, method, _properties, body = message
        recorder.started(json.loads(body).get("created_at"))
        if incr:
            d = INCR.incr()
            d.addCallback(acked, channel, method.delivery_tag)
            d.addErrback(stop)
            return
        channel.basic_ack(method.delivery_tag)
        recorder.finished()

    def acked(_value: Any, channel: Any, delivery_tag: int) -> None:
        channel.basic_ack(delivery_tag)
        recorder.finished()

    def stop(failure: Failure) -> None:
        print(f"baseline consumer failed: {failure.getErrorMessage()}", file=sys.stderr)
        if reactor.running:
            reactor.stop()

    @defer.inlineCallbacks
    def start():
        creator = tprotocol.ClientCreator(reactor, connection_class, parameters)
        connection = yield creator.connectTCP(parameters.host, parameters.port)
        yield connection.ready
        channel = yield connection.channel()
        yield channel.basic_qos(prefetch_count=prefetch)
        queue_object, _tag = yield channel.basic_consume(queue=queue, auto_ack=False)
        pump(queue_object, one, stop)

    reactor.callWhenRunning(lambda: start().addErrback(stop))
    reactor.run()


# -- helpers ------------------------------------------------------------------


def rabbitmqctl(*args: str) -> str:
    result = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                            timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


class MiniRedis:
    """Just enough RESP to check and delete the benchmark's keys."""

    def __init__(self, host: str, port: int, db: int, password: Optional[str] = None) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.file = self.sock.makefile("rb")
        if password:
            self.call("AUTH", password)
        self.call("SELECT", db)

    def call(self, *args: Any) -> Any:
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            parts += [f"${len(data)}\r\n".encode(), data, b"\r\n"]
        self.sock.sendall(b"".join(parts))
        return self._read()

    def _read(self) -> Any:
        line = self.file.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self.file.read(size + 2)[:-2]
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self._read() for _ in range(size)]
        raise RuntimeError(f"unexpected Redis reply {line!r}")

    def delete_prefixed(self, prefix: str) -> int:
        deleted, cursor = 0, b"0"
        while True:
            cursor, keys = self.call("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)
            if keys:
                deleted += self.call("DEL", *keys)
            if cursor == b"0":
                return deleted

    def close(self) -> None:
        self.sock.close()


def peak_rss_kb(pid: int) -> Optional[int]:
    """VmHWM of ``pid`` in kB (Linux), or None."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


#: ``{"rabbitmq": pid, "redis": pid}``: the servers the benchmark uses, found
#: by their listening port (:func:`find_servers`); empty: every beam.smp and
#: redis-server process counts.
SERVER_PIDS: dict = {}


def listener_pid(port: int) -> Optional[int]:
    """The pid of the local process listening on TCP ``port`` (Linux), or None."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                sockets.add(f"socket:[{fields[9]}]")
    if not sockets:
        return None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") in sockets:
                    return int(entry)
            except OSError:
                continue
    return None


def find_servers(amqp_url: str, redis_host: str, redis_port: int) -> None:
    """
    Fill :data:`SERVER_PIDS` with the local RabbitMQ and Redis the benchmark
    uses, so that other brokers and Redis servers on the machine (a test
    cluster, Sentinel sets, ``rabbitmqctl``'s own beam.smp) do not count.
    """
    SERVER_PIDS.clear()
    parameters = pika.URLParameters(amqp_url)
    for server, host, port in (("rabbitmq", parameters.host, parameters.port),
                               ("redis", redis_host, redis_port)):
        if host in ("127.0.0.1", "localhost", "::1"):
            pid = listener_pid(port)
            if pid is not None:
                SERVER_PIDS[server] = pid


def server_cpu() -> dict:
    """
    CPU seconds used so far by the local RabbitMQ (beam.smp) and Redis
    servers: those of :data:`SERVER_PIDS` when known, else every process of
    those names.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    totals = {"rabbitmq": 0.0, "redis": 0.0}
    names = {"beam.smp": "rabbitmq", "redis-server": "redis"}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        server = names.get(stat[stat.find("(") + 1:stat.rfind(")")])
        if server is None or SERVER_PIDS.get(server, int(entry)) != int(entry):
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        totals[server] += (int(fields[11]) + int(fields[12])) / ticks
    return totals


def pump(queue_object: Any, one: Any, stop: Any) -> None:
    """
    A bare consumer's loop, the same as quebert's consumer: hand each
    delivery of pika's ``queue_object`` to ``one`` while they are there,
    then wait for the next; ``stop(failure)`` when the queue fails.
    """
    from twisted.python.failure import Failure

    while True:
        d = queue_object.get()
        if not d.called:
            d.addCallback(lambda m: (one(m), pump(queue_object, one, stop)))
            d.addErrback(stop)
            return
        box: list = []
        d.addBoth(box.append)
        if isinstance(box[0], Failure):
            stop(box[0])
            return
        one(box[0])


def log_tail(log_path: str) -> str:
    """The end of a worker's log and of its stdout/stderr (``<log>.out``), for errors."""
    text = ""
    for path in (log_path, log_path + ".out"):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text += f.read()[-3000:]
        except OSError:
            pass
    return text


def percentile(values: list, q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q / 100.0 * (len(ordered) - 1)))))
    return ordered[index]


class Broker:
    """
    A blocking pika connection to the benchmark's vhost, for publishing to
    work queue ``queue`` of type ``queue_type``, declared first with the
    arguments quebert gives it (the workers get the same ``--queue-type``).
    """

    def __init__(self, url: str, queue: str = QUEUE, queue_type: str = "classic") -> None:
        self.queue = queue
        self.queue_type = queue_type
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        arguments = Topology(queue_type=queue_type).work_queue_arguments(queue)
        self.channel.queue_declare(queue, durable=True, arguments=arguments or None)

    def depth(self) -> tuple[int, int]:
        ok = self.channel.queue_declare(self.queue, passive=True).method
        return ok.message_count, ok.consumer_count

    def _publish(self, task_name: str) -> None:
        now = time.time()
        message, body = protocol.build(task_name, (now,), queue=self.queue, now=now)
        self.channel.basic_publish(
            "", self.queue, body,
            pika.BasicProperties(content_type=protocol.CONTENT_TYPE, delivery_mode=2,
                                 message_id=message.id, headers={protocol.H_ATTEMPTS: 0}),
        )

    def prefill(self, count: int, task_name: str, timeout: float = 120.0) -> None:
        """Publish ``count`` tasks and wait until the queue holds them all."""
        for _ in range(count):
            self._publish(task_name)
        deadline = time.monotonic() + timeout
        while self.depth()[0] < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"queue holds {self.depth()[0]} of {count} messages")
            self.connection.sleep(0.05)

    def paced(self, count: int, rate: float, task_name: str) -> float:
        """Publish ``count`` tasks at ``rate`` per second; returns the rate achieved."""
        start = time.perf_counter()
        sent = 0
        while sent < count:
            due = min(count, int((time.perf_counter() - start) * rate) + 1)
            while sent < due:
                self._publish(task_name)
                sent += 1
            self.connection.sleep(0.001)
        elapsed = time.perf_counter() - start
        return count / elapsed if elapsed > 0 else float("inf")

    def purge(self) -> None:
        self.channel.queue_purge(self.queue)

    def close(self) -> None:
        try:
            self.connection.close()
        except Exception:
            pass


class Run:
    """One process under test: a baseline consumer or a worker."""

    def __init__(self, name: str, url: str, redis_url: str, prefix: str, workdir: str,
                 tag: str, queue: str = QUEUE, queue_type: str = "classic") -> None:
        self.name = name
        self.kind, self.task, self.state = CONFIGS[name]
        self.handlings = HANDLINGS.get(name, 1)
        tag = f"{name}-{queue}-{tag}"
        self.out = os.path.join(workdir, tag)
        self.log_path = os.path.join(workdir, tag + ".log")
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env["QUEBERT_BENCH_OUT"] = self.out
        self.workload = WORKLOADS[name]
        #: The key the INCR workload increments (None: no-op workload).
        self.incr_key: Optional[str] = None
        if self.workload == "incr":
            self.incr_key = prefix + INCR_KEY
            env["QUEBERT_BENCH_INCR_URL"] = redis_url
            env["QUEBERT_BENCH_INCR_KEY"] = self.incr_key
        if self.kind == "baseline":
            args = [sys.executable, os.path.abspath(__file__), "_consume", "--url", url,
                    "--queue", queue, "--prefetch", str(PREFETCH), "--out", self.out]
            if self.state == "fast":
                args.append("--fast")
            if self.workload == "incr":
                args.append("--incr")
        else:
            if self.state == "null":
                env["QUEBERT_BENCH_NULL_STATE"] = "1"
            args = [TWISTD, "--pidfile=", "-n", f"--logfile={self.log_path}", "amqp-worker",
                    "--amqp-url", url, "--state", "redis" if self.state == "redis" else "memory",
                    "--tasks", "bench.bench_tasks",
                    "--mediator", "bench.bench_tasks.BenchMediator",
                    "--queue", f"{queue}:{PREFETCH}", "--max-running-tasks", str(PREFETCH),
                    "--queue-type", queue_type, "--log-level", "warn"]
            if self.state == "redis":
                args += ["--redis-url", redis_url, "--state-prefix", prefix]
        self.args = args
        self.env = env
        self.process: Optional[subprocess.Popen] = None
        self.log_file: Any = None
        self.profile: Optional[str] = None

    def start(self, profile: Optional[str] = None) -> None:
        """Start the process; under ``py-spy record`` writing to ``profile`` if given."""
        self.log_file = open(self.log_path + ".out", "wb")
        args = self.args
        self.profile = profile
        if profile:
            rate = os.environ.get("QUEBERT_BENCH_PY_SPY_RATE", "200")
            args = [PY_SPY, "record", "--nonblocking", "--rate", rate, "--format", "raw",
                    "-o", profile, "--", *args]
        self.process = subprocess.Popen(args, cwd=ROOT, env=self.env,
                                        stdin=subprocess.DEVNULL, stdout=self.log_file,
                                        stderr=subprocess.STDOUT)

    @property
    def pid(self) -> Optional[int]:
        """The pid of the process under test (py-spy's child when profiling)."""
        if self.process is None:
            return None
        if not self.profile:
            return self.process.pid
        for _ in range(100):
            try:
                with open(f"/proc/{self.process.pid}/task/{self.process.pid}/children",
                          encoding="ascii") as f:
                    children = f.read().split()
            except OSError:
                return None
            if children:
                return int(children[0])
            time.sleep(0.05)
        return None

    def expect(self, phase: int, count: int) -> None:
        with open(f"{self.out}.{phase}.expect", "w", encoding="ascii") as f:
            f.write(str(count))

    def wait_phase(self, phase: int, timeout: float) -> dict:
        path = f"{self.out}.{phase}.json"
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n"
                                   + self.log_tail())
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: phase {phase} not done after {timeout:.0f}s\n"
                                   + self.log_tail())
            time.sleep(0.05)
        with open(path, encoding="ascii") as f:
            return json.load(f)

    def log_tail(self) -> str:
        return log_tail(self.log_path)

    def mismatched_queue(self) -> Optional[str]:
        """
        The worker's warning that a queue exists with other arguments than it
        would declare (so the run would not measure the queue type asked
        for), if it logged one at start-up.
        """
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                head = f.read(100000)
        except OSError:
            return None
        for line in head.splitlines():
            if "exists with other arguments" in line:
                return line.strip()
        return None

    def stop(self) -> Optional[int]:
        """SIGTERM, wait; SIGKILL if it does not go.  Returns the exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            pid = self.pid
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
        return process.returncode


# -- one configuration ----------------------------------------------------------


def _wait_consumer(broker: Broker, run: Run, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while broker.depth()[1] < 1:
        if run.process is not None and run.process.poll() is not None:
            raise RuntimeError(f"{run.name} exited with {run.process.returncode}:\n"
                               + run.log_tail())
        if time.monotonic() > deadline:
            raise RuntimeError(f"{run.name} did not consume within {timeout:.0f}s\n"
                               + run.log_tail())
        broker.connection.sleep(0.05)


def _idle(broker: Broker, name: str) -> None:
    ready, consumers = broker.depth()
    if ready or consumers:
        raise RuntimeError(f"queue {broker.queue} not idle before {name}: {ready} ready, "
                           f"{consumers} consumers")


def _finish(run: Run, result: dict, broker: Broker) -> None:
    result["exit_code"] = run.stop()
    if result["exit_code"] not in (0, None):
        log(f"{run.name}: exit code {result['exit_code']}\n{run.log_tail()[-1500:]}")
    if broker.depth()[0]:
        broker.purge()


def _warn(result: dict, warning: str) -> None:
    """Add ``warning`` to the run's (one line; several joined by '; ')."""
    result["warning"] = f"{result['warning']}; {warning}" if "warning" in result else warning


def _check_redis(result: dict, redis: Optional[MiniRedis], run: Run, prefix: str,
                 expected: int) -> None:
    if redis is None:
        return
    if run.incr_key is not None:
        # The INCR workload: every task (message) incremented the counter once.
        value = redis.call("GET", run.incr_key)
        counted = int(value) if value is not None else 0
        result["incr_counter"] = counted
        if counted != expected:
            _warn(result, f"the INCR counter is {counted}, expected {expected}")
    if run.state != "redis":
        return
    done = redis.call("ZCARD", f"{prefix}idx:state:succeeded")
    result["redis_succeeded"] = done
    if done != expected:
        _warn(result, f"Redis holds {done} succeeded records, expected {expected}: "
                      "state writes were queued or lost")


def _check_handlings(result: dict, run: Run, data: dict, tasks: int) -> None:
    """Each task started as often as its configuration says (twice: retried once)."""
    expected = tasks * run.handlings
    if data.get("starts", expected) != expected:
        _warn(result, f"{data['starts']} attempts started for {tasks} tasks, "
                      f"expected {expected}")


def throughput_run(name: str, broker: Broker, args: argparse.Namespace, url: str,
                   redis_url: str, prefix: str, workdir: str, repeat: int,
                   redis: Optional[MiniRedis]) -> dict:
    """
    Drain a pre-filled queue of ``args.tasks`` tasks (with ``redis-retry``,
    each of them handled twice: its failed attempt, then its retry).
    """
    _idle(broker, name)
    run = Run(name, url, redis_url, prefix, workdir, f"tp{repeat}", broker.queue,
              broker.queue_type)
    result: dict = {"config": name, "repeat": repeat, "queue_type": broker.queue_type}
    try:
        run.expect(0, args.tasks * run.handlings)
        servers = server_cpu()
        began = time.monotonic()
        broker.prefill(args.tasks, run.task)
        # Not part of the drain: what filling the queue cost (publishes not
        # confirmed, until the queue holds them all), per queue type.
        result["prefill_per_s"] = args.tasks / (time.monotonic() - began)
        result["prefill_rabbitmq_us_per_task"] = (
            1e6 * (server_cpu()["rabbitmq"] - servers["rabbitmq"]) / args.tasks)
        profile = None
        if args.profile:
            profile = os.path.join(args.profile, f"{name}-{repeat}.txt")
            result["profile"] = profile
        servers = server_cpu()
        run.start(profile)
        began = time.time()
        data = run.wait_phase(0, timeout=60 + args.tasks * run.handlings / 50)
        tasks = data["count"] / run.handlings
        drain = data["last_end"] - data["first_start"]
        result["tasks_per_s"] = tasks / drain if drain > 0 else float("inf")
        result["cpu_us_per_task"] = 1e6 * data["cpu_s"] / tasks
        result["user_us_per_task"] = 1e6 * data["user_s"] / tasks
        result["system_us_per_task"] = 1e6 * data["system_s"] / tasks
        for server, seconds in server_cpu().items():
            result[f"{server}_us_per_task"] = 1e6 * (seconds - servers[server]) / tasks
        result["server_us_per_task"] = (result["rabbitmq_us_per_task"]
                                        + result["redis_us_per_task"])
        result["drain_s"] = drain
        result["startup_s"] = data["first_start"] - began
        result["queued_p50_ms"] = 1000 * percentile(data["latencies"], 50)
        result["peak_rss_kb"] = peak_rss_kb(run.pid)
        _check_handlings(result, run, data, args.tasks)
        _check_redis(result, redis, run, prefix, args.tasks)
        mismatch = run.mismatched_queue()
        if mismatch:
            _warn(result, mismatch)
    finally:
        _finish(run, result, broker)
    return result


def latency_run(name: str, broker: Broker, args: argparse.Namespace, url: str,
                redis_url: str, prefix: str, workdir: str, repeat: int, rate: float,
                redis: Optional[MiniRedis]) -> dict:
    """
    Publish at ``rate`` while the consumer runs; enqueue-to-start latency
    (with ``redis-retry``, of both attempts: a retry's includes its backoff).
    """
    _idle(broker, name)
    run = Run(name, url, redis_url, prefix, workdir, f"lat{repeat}-{rate:.0f}", broker.queue,
              broker.queue_type)
    result: dict = {"config": name, "repeat": repeat, "rate": rate,
                    "queue_type": broker.queue_type}
    warmup = max(20, int(rate * 0.5))
    count = max(100, int(rate * args.paced_seconds))
    try:
        run.expect(0, warmup * run.handlings)
        run.start()
        _wait_consumer(broker, run)
        # Warm up (connections, Redis script cache, thread pool), not measured.
        broker.paced(warmup, rate, run.task)
        run.wait_phase(0, timeout=60 + warmup / 50)
        run.expect(1, count * run.handlings)
        result["paced_rate"] = broker.paced(count, rate, run.task)
        data = run.wait_phase(1, timeout=60 + count / 50)
        result["count"] = len(data["latencies"])
        result["p50_ms"] = 1000 * percentile(data["latencies"], 50)
        result["p99_ms"] = 1000 * percentile(data["latencies"], 99)
        result["max_ms"] = 1000 * max(data["latencies"])
        # paced, a consumer batches little: its CPU per task is what loads the machine
        result["cpu_us_per_task"] = 1e6 * (data["user_s"] + data["system_s"]) / data["count"]
        result["peak_rss_kb"] = peak_rss_kb(run.pid)
        if result["paced_rate"] < 0.9 * rate:
            _warn(result, f"the publisher reached only {result['paced_rate']:.0f} of "
                          f"{rate:.0f} messages/s")
        _check_redis(result, redis, run, prefix, warmup + count)
    finally:
        _finish(run, result, broker)
    return result


# -- reporting ------------------------------------------------------------------


def hotspots(path: str, top: int = 20) -> str:
    """
    The heaviest frames of a ``py-spy record --format raw`` profile: self
    time by frame (file:line), and inclusive time of the functions of
    quebert and txredisapi (the framework's own frames would fill the list).
    """
    own: dict = {}
    inclusive: dict = {}
    total = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = stack.split(";")
            total += count
            own[frames[-1]] = own.get(frames[-1], 0) + count
            seen = set()
            for frame in frames:
                if "quebert/" not in frame and "txredisapi" not in frame:
                    continue
                function = frame.rsplit(":", 1)[0] + ")"
                if function not in seen:
                    seen.add(function)
                    inclusive[function] = inclusive.get(function, 0) + count
    if not total:
        return f"{path}: no samples"
    lines = [f"{path}: {total} samples (start-up included)", "  self time, by frame:"]
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {100 * count / total:5.1f}%  {frame}")
    lines.append("  inclusive time, quebert and txredisapi functions:")
    for function, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {100 * count / total:5.1f}%  {function}")
    return "\n".join(lines)


def summarise(throughput: list, latency: list) -> dict:
    summary: dict = {}
    for name in CONFIGS:
        tp = [r for r in throughput if r["config"] == name and "tasks_per_s" in r]
        lat = [r for r in latency if r["config"] == name and "p50_ms" in r]
        if not tp and not lat:
            continue
        rss = [r["peak_rss_kb"] or 0 for r in tp + lat]
        summary[name] = {
            "tasks_per_s": statistics.median(r["tasks_per_s"] for r in tp) if tp else None,
            "all_tasks_per_s": [round(r["tasks_per_s"]) for r in tp],
            "tasks_per_s_by_repeat": {r["repeat"]: r["tasks_per_s"] for r in tp},
            "startup_s": statistics.median(r["startup_s"] for r in tp) if tp else None,
            "cpu_us_per_task": (statistics.median(r["cpu_us_per_task"] for r in tp)
                                if tp else None),
            "user_us_per_task": (statistics.median(r["user_us_per_task"] for r in tp)
                                 if tp else None),
            "system_us_per_task": (statistics.median(r["system_us_per_task"] for r in tp)
                                   if tp else None),
            "rabbitmq_us_per_task": (statistics.median(r["rabbitmq_us_per_task"] for r in tp)
                                     if tp else None),
            "redis_us_per_task": (statistics.median(r["redis_us_per_task"] for r in tp)
                                  if tp else None),
            "server_us_per_task": (statistics.median(r["server_us_per_task"] for r in tp)
                                   if tp else None),
            "paced_rate": statistics.median(r["paced_rate"] for r in lat) if lat else None,
            "p50_ms": statistics.median(r["p50_ms"] for r in lat) if lat else None,
            "p99_ms": statistics.median(r["p99_ms"] for r in lat) if lat else None,
            "peak_rss_mb": max(rss) / 1024 if rss else None,
            "warnings": [r["warning"] for r in tp + lat if "warning" in r],
            "errors": [r["error"] for r in throughput + latency
                       if r["config"] == name and "error" in r],
        }
    return summary


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    return value / base if value and base else None


def _paired(summary: dict, name: str, base: str) -> list:
    """``name``'s tasks/s over ``base``'s, repeat by repeat (runs one after the other)."""
    mine = (summary.get(name) or {}).get("tasks_per_s_by_repeat", {})
    theirs = (summary.get(base) or {}).get("tasks_per_s_by_repeat", {})
    return [mine[k] / v for k, v in sorted(theirs.items()) if k in mine and v]


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(summary: dict, args: argparse.Namespace, rates: dict) -> str:
    width = 113
    lines = [
        f"quebert throughput benchmark, {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{os.cpu_count()} CPUs: {args.tasks} pre-filled tasks, prefetch {PREFETCH}, "
        f"{args.queue_type} queues, {args.repeat} repeat(s), medians",
        "",
        f"{'configuration':<34} {'tasks/s':>8} {'ratio':>6} {'CPU us':>7} {'srv us':>7} "
        f"{'srv x':>6} {'paced/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'RSS MB':>7}",
        "-" * width,
    ]
    titles = {"noop": "no-op task; ratios to baseline",
              "incr": "one Redis INCR per task; ratios to baseline-incr"}
    for workload in ("noop", "incr"):
        names = [n for n in CONFIGS if WORKLOADS[n] == workload and n in summary]
        if not names:
            continue
        base = summary.get(BASELINES[workload]) or {}
        lines.append(f"  {titles[workload]}")
        for name in names:
            s = summary[name]
            ratio = _ratio(s["tasks_per_s"], base.get("tasks_per_s"))
            srv_ratio = _ratio(s["server_us_per_task"], base.get("server_us_per_task"))
            lines.append(
                f"{LABELS[name]:<34} {_fmt(s['tasks_per_s'], '8.0f'):>8} "
                f"{_fmt(ratio, '.2f') + 'x' if ratio else '-':>6} "
                f"{_fmt(s['cpu_us_per_task'], '7.0f'):>7} "
                f"{_fmt(s['server_us_per_task'], '7.0f'):>7} "
                f"{_fmt(srv_ratio, '.2f') + 'x' if srv_ratio else '-':>6} "
                f"{_fmt(s['paced_rate'], '8.0f'):>8} {_fmt(s['p50_ms'], '7.2f'):>7} "
                f"{_fmt(s['p99_ms'], '7.2f'):>7} {_fmt(s['peak_rss_mb'], '7.1f'):>7}"
            )
    paced = ", ".join(f"{w} {_fmt(r, '.0f')}/s" for w, r in rates.items() if r)
    lines += [
        "-" * width,
        "tasks/s: draining a pre-filled queue, from the first task start to the last ack;",
        "ratio: tasks/s over the workload's baseline's.  CPU us: CPU time of the consumer",
        "process per task while draining.  srv us: CPU of RabbitMQ + Redis per task over",
        "the same drain; srv x: over the workload's baseline's.  p50/p99: enqueue",
        "(created_at) to task start while one publisher sends at a common rate per",
        f"workload ({paced or 'not measured'}: {args.paced_fraction:.0%} of the slowest",
        "configuration's tasks/s, so that no consumer is saturated).  Peak RSS: VmHWM.",
    ]
    lines.append("")
    for name in CONFIGS:
        s = summary.get(name)
        if s is not None:
            lines.append(f"  {name}: tasks/s per repeat {s['all_tasks_per_s']}; CPU us/task: "
                         f"consumer user {_fmt(s['user_us_per_task'], '.0f')} + system "
                         f"{_fmt(s['system_us_per_task'], '.0f')}, RabbitMQ "
                         f"{_fmt(s['rabbitmq_us_per_task'], '.0f')}, Redis "
                         f"{_fmt(s['redis_us_per_task'], '.0f')}; start-up "
                         f"{_fmt(s['startup_s'], '.2f')} s")
    # The load of a shared machine drifts: the ratio of runs made one after
    # the other (same repeat) shows how much of the spread is drift.
    for name, base in ((TARGET_CONFIG, "baseline"), (INCR_TARGET_CONFIG, "baseline-incr"),
                       ("memory-incr", "baseline-incr")):
        paired = _paired(summary, name, base)
        if paired:
            lines.append(f"  {name} / {base} of the same repeat: "
                         f"{', '.join(f'{p:.2f}x' for p in paired)} "
                         f"(median {statistics.median(paired):.2f}x)")
    for name, s in summary.items():
        for warning in s["warnings"]:
            lines.append(f"WARNING {name}: {warning}")
        for error in s["errors"]:
            lines.append(f"ERROR {name}: {error.splitlines()[0]}")
    lines.append("")
    if any(WORKLOADS[n] == "noop" for n in summary):
        base = (summary.get("baseline") or {}).get("tasks_per_s")
        target = summary.get(TARGET_CONFIG) or {}
        if base and target.get("tasks_per_s"):
            ratio = target["tasks_per_s"] / base
            lines.append(f"TARGET {LABELS[TARGET_CONFIG]} >= {TARGET_RATIO}x baseline: "
                         f"{_verdict(ratio >= TARGET_RATIO)} "
                         f"({ratio:.2f}x: {target['tasks_per_s']:.0f} vs {base:.0f} tasks/s)")
        else:
            lines.append(f"TARGET {LABELS[TARGET_CONFIG]} >= {TARGET_RATIO}x baseline: "
                         "not measured")
    if any(WORKLOADS[n] == "incr" for n in summary):
        lines += incr_targets(summary, rates.get("incr"))
    return "\n".join(lines)


def curve_report(curve: list, configs: list) -> str:
    """
    Latency against the paced rate (``--latency-curve``): p50 / p99 ms of
    every configuration at each rate (medians of the repeats), and the
    highest rate at which each keeps within the INCR target's figures.
    """
    rates = sorted({r["rate"] for r in curve})
    names = [n for n in configs if any(r["config"] == n for r in curve)]
    width = 11 + 15 * len(names)
    lines = ["latency (enqueue to start) against the paced rate: p50 / p99 ms, medians",
             f"{'rate /s':>9}  " + "".join(f"{n:>15}" for n in names), "-" * width]
    within: dict = {}
    for rate in rates:
        cells = []
        for name in names:
            runs = [r for r in curve if r["rate"] == rate and r["config"] == name
                    and "p50_ms" in r]
            if not runs:
                cells.append(f"{'-':>15}")
                continue
            p50 = statistics.median(r["p50_ms"] for r in runs)
            p99 = statistics.median(r["p99_ms"] for r in runs)
            cells.append(f"{p50:>7.2f} /{p99:>6.2f}")
            if p50 <= INCR_TARGET_P50_MS and p99 <= INCR_TARGET_P99_MS:
                within.setdefault(name, []).append(rate)
        lines.append(f"{rate:>9.0f}  " + "".join(cells))
    lines.append("-" * width)
    for name in names:
        kept = within.get(name, [])
        # the highest rate below which every measured rate kept within the figures
        highest = None
        for rate in rates:
            if rate not in kept:
                break
            highest = rate
        lines.append(f"  {name}: p50 <= {INCR_TARGET_P50_MS} ms and p99 <= "
                     f"{INCR_TARGET_P99_MS} ms up to "
                     f"{f'{highest:.0f}/s' if highest else 'none of these rates'}")
    return "\n".join(lines)


def incr_targets(summary: dict, rate: Optional[float]) -> list:
    """Issue 16's targets on the INCR workload, PASS or FAIL (reported, not asserted)."""
    base = summary.get("baseline-incr") or {}
    redis = summary.get(INCR_TARGET_CONFIG) or {}
    memory = summary.get("memory-incr") or {}
    lines = []
    label = f"TARGET {INCR_TARGET_CONFIG}"
    ratio = _ratio(redis.get("tasks_per_s"), base.get("tasks_per_s"))
    if ratio:
        lines.append(f"{label} drain >= {INCR_TARGET_RATIO}x baseline-incr: "
                     f"{_verdict(ratio >= INCR_TARGET_RATIO)} ({ratio:.2f}x: "
                     f"{redis['tasks_per_s']:.0f} vs {base['tasks_per_s']:.0f} tasks/s)")
    else:
        lines.append(f"{label} drain >= {INCR_TARGET_RATIO}x baseline-incr: not measured")
    ratio = _ratio(redis.get("server_us_per_task"), base.get("server_us_per_task"))
    if ratio:
        lines.append(f"{label} RabbitMQ + Redis CPU per task <= {INCR_TARGET_SERVER_RATIO}x "
                     f"baseline-incr's: {_verdict(ratio <= INCR_TARGET_SERVER_RATIO)} "
                     f"({ratio:.2f}x: {redis['server_us_per_task']:.0f} vs "
                     f"{base['server_us_per_task']:.0f} us)")
    else:
        lines.append(f"{label} RabbitMQ + Redis CPU per task <= {INCR_TARGET_SERVER_RATIO}x "
                     "baseline-incr's: not measured")
    if redis.get("p50_ms") is not None:
        ok = redis["p50_ms"] <= INCR_TARGET_P50_MS and redis["p99_ms"] <= INCR_TARGET_P99_MS
        lines.append(f"{label} latency p50 <= {INCR_TARGET_P50_MS} ms and p99 <= "
                     f"{INCR_TARGET_P99_MS} ms at {_fmt(rate, '.0f')}/s: {_verdict(ok)} "
                     f"(p50 {redis['p50_ms']:.2f} ms, p99 {redis['p99_ms']:.2f} ms; "
                     f"baseline-incr {_fmt(base.get('p50_ms'), '.2f')} / "
                     f"{_fmt(base.get('p99_ms'), '.2f')} ms)")
    else:
        lines.append(f"{label} latency p50 <= {INCR_TARGET_P50_MS} ms and p99 <= "
                     f"{INCR_TARGET_P99_MS} ms at half load: not measured")
    if memory.get("tasks_per_s") and redis.get("tasks_per_s"):
        ratio = memory["tasks_per_s"] / redis["tasks_per_s"]
        lines.append(f"TARGET memory-incr faster than {INCR_TARGET_CONFIG}: "
                     f"{_verdict(ratio > 1)} ({ratio:.2f}x: {memory['tasks_per_s']:.0f} vs "
                     f"{redis['tasks_per_s']:.0f} tasks/s)")
    else:
        lines.append(f"TARGET memory-incr faster than {INCR_TARGET_CONFIG}: not measured")
    return lines


# -- main -------------------------------------------------------------------------


def parse_args(argv: list) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10000,
                        help="tasks in the pre-filled queue per run [default: 10000]")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of every configuration; medians are reported [default: 3]")
    parser.add_argument("--paced-seconds", type=float, default=2.0,
                        help="seconds of paced publishing per run [default: 2]")
    parser.add_argument("--paced-fraction", type=float, default=0.5,
                        help="paced rate as a fraction of the slowest configuration's "
                             "throughput [default: 0.5]")
    parser.add_argument("--paced-rate", type=float,
                        help="paced rate in messages/s (overrides --paced-fraction)")
    parser.add_argument("--configs",
                        help=f"comma-separated subset of {', '.join(CONFIGS)}; the "
                             "baseline of each workload in it always runs [default: those "
                             f"of --workload but {' and '.join(sorted(OPT_IN))}]")
    parser.add_argument("--workload", choices=sorted(DEFAULT_CONFIGS), default="both",
                        help="without --configs: the no-op task's configurations, the INCR "
                             "task's (one Redis INCR per task), or both [default: both]")
    parser.add_argument("--long", type=int, metavar="N",
                        help="instead: the long run of bench_long.py (flat memory over N "
                             "tasks drained; its options: bench_long.py --help)")
    parser.add_argument("--queue-type", choices=QUEUE_TYPES, default="classic",
                        help="type of the work queue, declared as quebert declares it, and "
                             "the workers' --queue-type [default: classic, as the figures "
                             "in bench/README.rst; bench_queue_types.py compares both]")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672",
                        help="RabbitMQ, without a vhost [default: %(default)s]")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9",
                        help="Redis for the redis-state runs [default: %(default)s]")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--profile", metavar="DIR",
                        help="run the throughput runs under 'py-spy record' (pip install "
                             "py-spy into the venv), write the profiles to DIR, print the "
                             "hotspots and skip the latency runs; figures are perturbed")
    parser.add_argument("--latency-curve", metavar="RATES",
                        help="also measure latency at each of these comma-separated rates "
                             "(messages/s), every configuration, and print the curve: "
                             "where each meets the latency target")
    parser.add_argument("--no-latency", action="store_true",
                        help="skip the paced latency runs (quicker A/B comparisons)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the working directory (worker logs)")
    args = parser.parse_args(argv)
    if args.configs is None:
        args.configs = list(DEFAULT_CONFIGS[args.workload])
    else:
        args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configuration(s): {', '.join(sorted(unknown))}")
    # Each workload's baseline runs first in every repeat; the workloads run
    # one after the other (no-op, then INCR).
    ordered = []
    for workload in ("noop", "incr"):
        names = [c for c in args.configs if WORKLOADS[c] == workload]
        if names:
            base = BASELINES[workload]
            ordered += [base] + [c for c in dict.fromkeys(names) if c != base]
    args.configs = ordered
    try:
        args.latency_curve = sorted(float(r) for r in (args.latency_curve or "").split(",")
                                    if r.strip())
    except ValueError:
        parser.error("--latency-curve takes rates in messages/s: 1000,2000,4000")
    if any(r <= 0 for r in args.latency_curve):
        parser.error("--latency-curve rates must be > 0")
    if args.tasks < 100 or args.repeat < 1:
        parser.error("--tasks must be >= 100 and --repeat >= 1")
    if args.profile:
        if not os.path.exists(PY_SPY):
            parser.error(f"--profile needs {PY_SPY}: {sys.executable} -m pip install py-spy")
        os.makedirs(args.profile, exist_ok=True)
    return args


def consume_main(argv: list) -> None:
    parser = argparse.ArgumentParser(prog="bench_throughput.py _consume")
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--prefetch", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--incr", action="store_true")
    a = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    baseline_consumer(a.url, a.queue, a.prefetch, a.out, a.fast, a.incr)


def _long_argv(argv: list) -> Optional[list]:
    """``--long N [options]``: bench_long.py's arguments (``--tasks N``), else None."""
    for i, arg in enumerate(argv):
        if arg == "--long" and i + 1 < len(argv):
            return ["--tasks", argv[i + 1], *argv[:i], *argv[i + 2:]]
        if arg.startswith("--long="):
            return ["--tasks", arg.split("=", 1)[1], *argv[:i], *argv[i + 1:]]
    return None


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


class Environment:
    """What a benchmark runs in: its vhost's URL, Redis prefix, files, Redis."""

    def __init__(self, url: str, vhost: str, prefix: str, workdir: str,
                 redis: Optional[MiniRedis]) -> None:
        self.url = url
        self.vhost = vhost
        self.prefix = prefix
        self.workdir = workdir
        self.redis = redis


@contextlib.contextmanager
def environment(amqp: str, redis_url: str, use_redis: bool = True,
                keep: bool = False) -> Iterator[Environment]:
    """
    A fresh vhost ``quebert-bench-<random>`` (guest may use it), a unique
    Redis prefix (and a connection to that Redis if ``use_redis``) and a
    working directory; at the end, whatever happens, the vhost is deleted,
    the keys under the prefix (only those) too, and the directory unless
    ``keep``.
    """
    from quebert.state.redis import parse_redis_url

    redis_options = parse_redis_url(redis_url)
    vhost = f"quebert-bench-{uuid.uuid4().hex[:12]}"
    prefix = f"quebert-bench-{uuid.uuid4().hex[:12]}:"
    workdir = tempfile.mkdtemp(prefix="quebert-bench-")
    redis = None
    log(f"vhost {vhost}, Redis prefix {prefix} in db {redis_options['db']}, files in {workdir}")
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        if use_redis:
            if redis_options.get("sentinels"):  # redis+sentinel://: the primary, now
                from quebert.watchdog import RedisStallMarker

                host, port = RedisStallMarker(redis_url, prefix)._primary(lambda: 5.0)
            else:
                host, port = redis_options["host"], redis_options["port"]
            redis = MiniRedis(host, port, redis_options["db"], redis_options["password"])
            find_servers(amqp, host, port)
        else:
            find_servers(amqp, "", 0)
        log(f"CPU counted for the servers: {SERVER_PIDS or 'every beam.smp and redis-server'}")
        yield Environment(f"{amqp.rstrip('/')}/{vhost}", vhost, prefix, workdir, redis)
    finally:
        try:
            rabbitmqctl("delete_vhost", vhost)
        except Exception as e:
            log(f"could not delete vhost {vhost}: {e}")
        if redis is not None:
            try:
                deleted = redis.delete_prefixed(prefix)
                log(f"deleted {deleted} Redis keys under {prefix}")
            except Exception as e:
                log(f"could not delete Redis keys under {prefix}: {e}")
            redis.close()
        if not keep:
            for entry in os.listdir(workdir):
                os.unlink(os.path.join(workdir, entry))
            os.rmdir(workdir)


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_consume"]:
        consume_main(argv[1:])
        return 0
    long_argv = _long_argv(argv)
    if long_argv is not None:
        from bench import bench_long

        return bench_long.main(long_argv)
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)

    throughput: list = []
    latency: list = []
    #: The latency runs of --latency-curve.
    curve: list = []
    #: Paced rate of the latency runs, per workload.
    rates: dict = {}
    use_redis = any(CONFIGS[c][2] == "redis" or WORKLOADS[c] == "incr" for c in args.configs)
    with environment(args.amqp, args.redis_url, use_redis, args.keep) as env:
        broker = None
        try:
            broker = Broker(env.url, QUEUE, args.queue_type)

            def attempt(results: list, what: str, fn: Any, name: str, repeat: int,
                        *extra: Any) -> Optional[dict]:
                log(f"{what} {repeat + 1}/{args.repeat}: {name}")
                try:
                    r = fn(name, broker, args, env.url, args.redis_url,
                           f"{env.prefix}{what}-{name}-{repeat}:", env.workdir, repeat,
                           *extra, env.redis)
                except Exception as e:
                    log(f"  {name} failed: {e}")
                    results.append({"config": name, "repeat": repeat, "error": str(e)})
                    return None
                results.append(r)
                return r

            for repeat in range(args.repeat):
                for name in args.configs:
                    r = attempt(throughput, "throughput", throughput_run, name, repeat)
                    if r is not None:
                        log(f"  {r['tasks_per_s']:.0f} tasks/s (start-up {r['startup_s']:.2f} "
                            f"s, peak RSS {(r['peak_rss_kb'] or 0) / 1024:.1f} MB)")
            for workload in dict.fromkeys(WORKLOADS[c] for c in args.configs):
                measured = {r["config"] for r in throughput
                            if "tasks_per_s" in r and WORKLOADS[r["config"]] == workload}
                if args.paced_rate:
                    rates[workload] = args.paced_rate
                elif measured:
                    slowest = min(statistics.median(r["tasks_per_s"] for r in throughput
                                                    if r["config"] == c and "tasks_per_s" in r)
                                  for c in measured)
                    rates[workload] = slowest * args.paced_fraction
            if rates and not args.profile and not args.no_latency:
                for repeat in range(args.repeat):
                    for name in args.configs:
                        rate = rates.get(WORKLOADS[name])
                        if not rate:
                            continue
                        r = attempt(latency, "latency", latency_run, name, repeat, rate)
                        if r is not None:
                            log(f"  {r['paced_rate']:.0f}/s: p50 {r['p50_ms']:.2f} ms, "
                                f"p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.1f} ms, "
                                f"CPU {r['cpu_us_per_task']:.0f} us/task")
            for rate in [] if args.profile else args.latency_curve:
                for repeat in range(args.repeat):
                    for name in args.configs:
                        r = attempt(curve, f"curve{rate:.0f}", latency_run, name, repeat, rate)
                        if r is not None:
                            log(f"  {r['paced_rate']:.0f}/s: p50 {r['p50_ms']:.2f} ms, "
                                f"p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.1f} ms, "
                                f"CPU {r['cpu_us_per_task']:.0f} us/task")
        finally:
            if broker is not None:
                broker.close()

    summary = summarise(throughput, latency)
    text = report(summary, args, rates)
    if curve:
        text += "\n\n" + curve_report(curve, args.configs)
    print(text)
    for r in throughput:
        if r.get("profile") and os.path.exists(r["profile"]):
            print()
            print(hotspots(r["profile"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "rates": rates, "throughput": throughput,
                       "latency": latency, "curve": curve, "summary": summary}, f,
                      indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
