"""
No-op tasks and a recording mediator for ``bench/bench_throughput.py``.

The worker under test imports this module (``--tasks bench.bench_tasks``)
and runs with ``--mediator bench.bench_tasks.BenchMediator``.  The baseline
consumer in ``bench_throughput.py`` uses the same :class:`Recorder`, so both
sides pay for exactly the same measurement:

* when the task starts (the baseline: when the message is received), one
  ``time.time()`` and one list append, with the enqueue time of the message
  (and ``time.process_time()`` for the first one of a phase);
* when the message has been acked, one ``time.time()`` and one list append.

``bench.incr`` awaits one Redis ``INCR`` (key ``QUEBERT_BENCH_INCR_KEY``,
Redis ``QUEBERT_BENCH_INCR_URL``) through txredisapi, on a connection of
its own: one lazy connection per process, made on first use and reused
(:data:`INCR`).  The baseline consumer's INCR workload uses the same one.

``bench.tick`` counts its runs and nothing else (no recorder lists that
would grow): ``bench_long.py``'s long run, which reads the worker's
resident memory every ``QUEBERT_BENCH_LONG_STEP`` tasks, written by the
worker itself to ``QUEBERT_BENCH_LONG_OUT``.

``bench.fail_once`` fails its first attempt and succeeds on the retry,
which the default mediator sends through the delay queues after
``RETRY_BACKOFF`` seconds: its worker handles two deliveries per task.

Nothing else is measured in-process.  When a phase has seen as many
completions as the benchmark asked for (it writes the count in
``OUT.K.expect`` before publishing phase ``K``), the recorder writes
``OUT.K.json`` and starts the next phase.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional
from urllib.parse import urlsplit

from twisted.internet.defer import succeed

from quebert import DelayOnErrorMediator, current_task, task

#: Environment variable naming the output prefix (unset: record nothing).
ENV_OUT = "QUEBERT_BENCH_OUT"
#: Environment variable: set to 1 to replace the state manager by :class:`NullState`.
ENV_NULL_STATE = "QUEBERT_BENCH_NULL_STATE"
#: Environment variable: ``bench.fail_once``'s backoff in seconds (default 0.1).
ENV_RETRY_BACKOFF = "QUEBERT_BENCH_RETRY_BACKOFF"
#: Seconds before the retry of ``bench.fail_once``: 100 ms is 1100100 in
#: binary, so each retry waits in three delay levels (64, 32 and 4 ms).
RETRY_BACKOFF = float(os.environ.get(ENV_RETRY_BACKOFF) or 0.1)
#: Environment variables of the INCR workload: the Redis URL
#: (``redis://[:password@]host[:port][/db]``) and the key to increment.
ENV_INCR_URL = "QUEBERT_BENCH_INCR_URL"
ENV_INCR_KEY = "QUEBERT_BENCH_INCR_KEY"
#: Environment variables of the long run: the file the samples go to, and
#: the number of tasks between two samples.
ENV_LONG_OUT = "QUEBERT_BENCH_LONG_OUT"
ENV_LONG_STEP = "QUEBERT_BENCH_LONG_STEP"


class Recorder:
    """Start and completion times, dumped once per phase."""

    def __init__(self, out: Optional[str]) -> None:
        self.out = out
        self.phase = 0
        self.expect: Optional[int] = None
        self.starts: list = []
        self.created: list = []
        self.ends: list = []
        self.cpu = 0.0
        self.times = (0.0, 0.0)

    def started(self, created_at: Any) -> None:
        """A task (message) starts; ``created_at`` is its enqueue time."""
        if not self.starts:
            self.cpu = time.process_time()
            self.times = os.times()[:2]
        self.starts.append(time.time())
        self.created.append(created_at)

    def finished(self) -> None:
        """A task (message) was acked."""
        self.ends.append(time.time())
        if self.out is None:
            return
        if self.expect is None:
            self.expect = self._read_expect()
        if self.expect is not None and len(self.ends) >= self.expect:
            self._dump()

    def _read_expect(self) -> Optional[int]:
        try:
            with open(f"{self.out}.{self.phase}.expect", encoding="ascii") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def _dump(self) -> None:
        cpu = time.process_time() - self.cpu
        user, system = (now - then for now, then in zip(os.times()[:2], self.times))
        starts, created, ends = self.starts, self.created, self.ends
        self.starts, self.created, self.ends = [], [], []
        data = {
            "phase": self.phase,
            "count": len(ends),
            "starts": len(starts),
            "first_start": min(starts) if starts else None,
            "last_end": max(ends),
            "cpu_s": cpu,
            "user_s": user,
            "system_s": system,
            "latencies": [s - c for s, c in zip(starts, created, strict=True) if c is not None],
        }
        path = f"{self.out}.{self.phase}.json"
        with open(path + ".tmp", "w", encoding="ascii") as f:
            json.dump(data, f)
        os.replace(path + ".tmp", path)
        self.phase += 1
        self.expect = None


RECORDER = Recorder(os.environ.get(ENV_OUT))


@task(name="bench.noop")
async def noop(created_at: Optional[float] = None) -> None:
    """A no-op that runs on the reactor."""
    RECORDER.started(created_at)


@task(name="bench.noop_thread")
def noop_thread(created_at: Optional[float] = None) -> None:
    """A no-op that runs in the worker's thread pool."""
    RECORDER.started(created_at)


class IncrClient:
    """
    One txredisapi connection of its own, made on first use and reused, to
    ``INCR`` one key: what the INCR workload's task (and baseline) does.
    """

    def __init__(self, url: Optional[str], key: Optional[str]) -> None:
        self.url = url
        self.key = key
        self.connection: Any = None

    def incr(self) -> Any:
        """A Deferred firing with the key's new value."""
        if self.connection is None:
            self.connection = self._connect()
        return self.connection.incr(self.key)

    def _connect(self) -> Any:
        if not self.url or not self.key:
            raise RuntimeError(f"the INCR workload needs {ENV_INCR_URL} and {ENV_INCR_KEY}")
        import txredisapi  # only the INCR workload pays for importing it

        parts = urlsplit(self.url)
        if parts.scheme != "redis":
            raise RuntimeError(f"the INCR workload takes a redis:// URL, not {self.url!r}")
        return txredisapi.lazyConnection(
            host=parts.hostname or "127.0.0.1", port=parts.port or 6379,
            dbid=int(parts.path.strip("/") or 0), password=parts.password or None,
            reconnect=True)


INCR = IncrClient(os.environ.get(ENV_INCR_URL), os.environ.get(ENV_INCR_KEY))


@task(name="bench.incr")
async def incr(created_at: Optional[float] = None) -> None:
    """Awaits one Redis INCR on its own connection (:data:`INCR`), on the reactor."""
    RECORDER.started(created_at)
    await INCR.incr()


def vm_kb(fields: tuple = ("VmRSS", "VmHWM"), pid: str = "self") -> dict:
    """``{field: kB}`` read from ``/proc/PID/status`` (Linux; empty elsewhere)."""
    values: dict = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in fields:
                    values[name] = int(rest.split()[0])
    except OSError:
        pass
    return values


class Ticker:
    """
    Counts ``bench.tick`` runs; every ``step`` of them appends one line to
    ``out``: count, time, VmRSS kB, VmHWM kB, CPU seconds of the process.
    Keeps nothing per task.
    """

    def __init__(self, out: Optional[str], step: int) -> None:
        self.out = out
        self.step = max(1, step)
        self.count = 0

    def tick(self) -> None:
        self.count += 1
        if self.out is not None and self.count % self.step == 0:
            self.sample()

    def sample(self) -> None:
        vm = vm_kb()
        line = (f"{self.count} {time.time():.3f} {vm.get('VmRSS', 0)} {vm.get('VmHWM', 0)} "
                f"{time.process_time():.3f}\n")
        with open(self.out, "a", encoding="ascii") as f:
            f.write(line)


TICKER = Ticker(os.environ.get(ENV_LONG_OUT), int(os.environ.get(ENV_LONG_STEP) or 100000))


@task(name="bench.tick")
async def tick(created_at: Optional[float] = None) -> None:
    """A no-op that counts itself (the long run), on the reactor."""
    TICKER.tick()


class FailOnce(Exception):
    """The planned failure of ``bench.fail_once``'s first attempt."""


@task(name="bench.fail_once", min_backoff=RETRY_BACKOFF, max_backoff=max(RETRY_BACKOFF, 1.0))
async def fail_once(created_at: Optional[float] = None) -> None:
    """
    Fails its first attempt, succeeds on the retry: every task passes
    through the delay queues once.  Both attempts count as starts.
    """
    RECORDER.started(created_at)
    if current_task().attempt == 1:
        raise FailOnce("first attempt")


class NullState:
    """
    Records nothing, at once: a diagnostic that shows what the mediator
    costs without any state store (not a usable state manager).
    """

    finished_ttl = 0.0

    def enqueued(self, *args: Any, **kwargs: Any):
        return succeed(None)

    def started(self, *args: Any, **kwargs: Any):
        return succeed(None)

    def finished(self, *args: Any, **kwargs: Any):
        return succeed(None)

    def get(self, task_id: str):
        return succeed(None)

    def list(self, *args: Any, **kwargs: Any):
        return succeed([])


class BenchMediator(DelayOnErrorMediator):
    """The default mediator, noting when each delivery's handling is over (acked)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if os.environ.get(ENV_NULL_STATE) == "1":
            self.state = NullState()

    async def handle(self, delivery: Any) -> None:
        try:
            await super().handle(delivery)
        finally:
            RECORDER.finished()
