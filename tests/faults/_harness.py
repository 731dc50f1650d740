"""
The fault suite's harness: one :class:`FaultCase` per scenario.

A scenario is a small ``test_*.py`` module with one ``FaultCase``
subclass.  The base class gives it, per test:

* a fresh RabbitMQ vhost (``self.url``) and a fresh Redis key prefix in
  database 9 (``self.prefix``, ``self.state``, ``self.client``);
* :meth:`FaultCase.worker`: a real ``twistd -n amqp-worker`` process on the
  scenario's tasks (:mod:`tests.faults.tasks`), killed in cleanup;
* :meth:`FaultCase.publish`: a batch of tasks, published concurrently
  with confirms, each recording every run of it in ``self.runs``;
* :meth:`FaultCase.wait_done`, :meth:`FaultCase.tally` and
  :meth:`FaultCase.assert_queues`: the checks every scenario ends with
  (every task ``succeeded`` in the state store, runs per task counted
  exactly, duplicates bounded by what was in flight, nothing left in a
  work, delay or errored queue but what is expected);
* with ``on_cluster = True``, all that on the 3-node RabbitMQ test cluster
  (:mod:`tests._cluster`) instead of the main node: ``self.cluster``,
  ``self.vhost``, ``self.url`` the vhost's URLs on c1, c2, c3
  (comma-separated, as ``--amqp-url`` takes them), :meth:`FaultCase.node_urls`
  for another order, queue counts read from the cluster, and helpers to
  follow quorum queue leaders, replicas and which node each worker's
  connections use;
* ``self.row``: the scenario's line of the summary table, written as JSON
  to ``$QUEBERT_FAULTS_SUMMARY_DIR`` (default ``faults-summary/`` in
  trial's temporary directory) when the test ends, passed or not.
  ``python -m tests.faults.report`` prints the table.
"""

from __future__ import annotations

import collections
import json
import os
import re
import time
import uuid
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple
from urllib.parse import urlsplit

import attrs
from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from quebert import Client
from quebert.state import RedisStateManager, connect_redis
from quebert.state.interface import SUCCEEDED
from tests import _cluster
from tests._cluster import NODES, shared_cluster
from tests._rabbit import make_vhost, rabbitmqctl, vhost_of
from tests._worker import WorkerProcess, sleep, wait_for

REDIS_URL = os.environ.get("QUEBERT_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
TASKS_MODULE = "tests.faults.tasks"
#: Where each scenario's summary row goes (one JSON file per scenario).
SUMMARY_DIR_ENV = "QUEBERT_FAULTS_SUMMARY_DIR"
PUBLISH_CONCURRENCY = 64


def summary_dir() -> str:
    """The directory of summary rows (trial runs tests in its temp directory)."""
    return os.path.abspath(os.environ.get(SUMMARY_DIR_ENV) or "faults-summary")


@attrs.frozen
class Run:
    """One run of a task, as its worker recorded it."""

    i: int
    pid: int
    at: float


class Runs:
    """The runs recorded by :func:`tests.faults.tasks.record_run` in one file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> List[Run]:
        try:
            with open(self.path, encoding="ascii") as f:
                text = f.read()
        except FileNotFoundError:
            return []
        runs = []
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n"):
                break  # a write still in progress
            i, pid, at = line.split()
            runs.append(Run(int(i), int(pid), float(at)))
        return runs

    def __len__(self) -> int:
        return len(self.read())

    def counts(self) -> collections.Counter:
        return collections.Counter(r.i for r in self.read())

    def pids(self) -> collections.Counter:
        return collections.Counter(r.pid for r in self.read())

    def first_after(self, at: float, pid: Optional[int] = None) -> Optional[float]:
        """When the first run after ``at`` (by ``pid``, if given) was recorded."""
        times = [r.at for r in self.read() if r.at > at and (pid is None or r.pid == pid)]
        return min(times) if times else None

    def largest_gap(self, start: float, end: float) -> float:
        """The longest stretch in ``[start, end]`` without a recorded run."""
        times = sorted(r.at for r in self.read() if start <= r.at <= end)
        points = [start, *times, end]
        return max(b - a for a, b in zip(points, points[1:]))


@attrs.define
class Tally:
    """Runs and records of a batch, compared with what was expected."""

    tasks: int
    succeeded: int
    #: Tasks that ran fewer times than expected (or never).
    lost: List[int]
    #: Extra runs per task, beyond what was expected.
    duplicates: Dict[int, int]
    #: Runs of task numbers that were never meant to run.
    strays: Dict[int, int]
    #: Attempts in the state store beyond the expected count, summed.
    extra_attempts: int
    #: Tasks whose record counts fewer attempts than it really ran.
    undercounted: List[int]

    @property
    def duplicate_runs(self) -> int:
        return sum(self.duplicates.values())


class Supervisor:
    """
    The test as process supervisor: each call restarts the workers that
    died, noting when and how (``deaths``: (time, exit status)) and the
    restarted processes (``restarts``: (time, pid)).
    """

    def __init__(self, workers: Iterable[WorkerProcess]) -> None:
        self.workers = list(workers)
        self.deaths: List[tuple] = []
        self.restarts: List[tuple] = []

    async def __call__(self) -> None:
        for worker in self.workers:
            if not worker.alive:
                self.deaths.append((time.time(), worker.process.returncode))
                worker.start()
                self.restarts.append((time.time(), worker.process.pid))
                await worker.ready()

    def slowest_recovery(self, runs: Runs) -> Optional[float]:
        """Seconds from the slowest restart to that worker's first task run."""
        recovery = []
        for at, pid in self.restarts:
            after = runs.first_after(at, pid=pid)
            if after is not None:
                recovery.append(after - at)
        return max(recovery) if recovery else None


class FaultCase(TestCase):
    """Base class of one fault scenario (see the module docstring)."""

    timeout = 300
    #: Short name: the summary table's first column and the row's file name.
    scenario = "unnamed"
    #: One line saying what the fault is.
    fault = ""
    #: ``--queue-type`` of the scenario's workers and client; ``None``: the
    #: default (quorum), with no flag.
    queue_type: Optional[str] = None
    #: Run on the 3-node test cluster (``tests/_cluster.py``, started in
    #: ``setUp`` if it is not up; skipped where rabbitmq-server is not
    #: installed) instead of the main RabbitMQ node.
    on_cluster = False
    #: ``rabbit`` application settings given to every node of the cluster
    #: (in ``setUp``, and by :meth:`restart_node` to a restarted node).
    #: RabbitMQ's at-least-once dead-lettering waits this long (default 2
    #: minutes) before it sends again a message whose target queue did not
    #: confirm it, e.g. because that queue's leader was lost meanwhile: a
    #: retry moving between two delay levels at that moment was held that
    #: long, or several times that long (docs/reliability.rst, "node-loss").
    cluster_settings: Mapping[str, int] = {
        "dead_letter_worker_publisher_confirm_timeout": 5000}

    def setUp(self) -> None:
        self._began = time.monotonic()
        self.row: Dict[str, Any] = {
            "scenario": self.scenario, "fault": self.fault, "test": self.id(),
            "status": "error", "tasks": None, "succeeded": None, "duplicates": None,
            "duplicate_bound": None, "lost": None, "recovery_s": None,
            "recovery_bound_s": None, "recovery": "", "duration_s": None, "notes": "",
            "extra_attempts": None, "forks": None,
            "finished_at": None,
        }
        self.addCleanup(self._write_row)  # first registered: runs last
        #: The test cluster (``on_cluster``), else ``None``.
        self.cluster: Optional[_cluster.RabbitCluster] = None
        self.url = self._make_vhost()
        self.vhost = vhost_of(self.url.split(",")[0])
        self.prefix = f"quebert-fault-{uuid.uuid4().hex[:12]}:"
        self.redis = connect_redis(REDIS_URL)
        self.state = RedisStateManager(self.redis, prefix=self.prefix)
        self.client = self.make_client(self.state)
        self.addCleanup(lambda: defer.ensureDeferred(self._cleanup()))
        self.runs = Runs(os.path.abspath(self.mktemp()))
        #: Task number -> (sent, confirmed) times of its publish.
        self.published: Dict[int, Tuple[float, float]] = {}

    def _make_vhost(self) -> str:
        """A fresh vhost (deleted in cleanup); its URL, or its URLs on c1, c2, c3."""
        if not self.on_cluster:
            return make_vhost(self, prefix="quebert-fault")
        self.cluster = shared_cluster()
        began = time.monotonic()
        try:
            self.cluster.start()
        except SkipTest:
            self.row.update(status="skipped", notes="rabbitmq-server is not installed")
            raise
        #: Seconds ``setUp`` waited for the cluster to start (0 if it was up).
        self.cluster_start_s = time.monotonic() - began
        for node in NODES:
            self.cluster._ctl_sync(node, "eval", self._settings_expression())
        vhost = self.cluster.make_vhost(self, prefix="quebert-fault")
        return ",".join(self.cluster.url(node, vhost) for node in NODES)

    def _settings_expression(self) -> str:
        """Erlang that applies ``cluster_settings`` to a node."""
        return " ".join(f"ok = application:set_env(rabbit, {key}, {int(value)})."
                        for key, value in self.cluster_settings.items()) or "ok."

    def make_client(self, state: Any) -> Client:
        """A client of the scenario's vhost, queue type and ``state`` store."""
        return Client(self.url, state=state,
                      **({"queue_type": self.queue_type} if self.queue_type else {}))

    async def _cleanup(self) -> None:
        await self.client.close()
        cursor = 0
        while True:
            cursor, keys = await self.redis.scan(cursor, self.prefix + "*", 1000)
            if keys:
                await self.redis.delete(*keys)
            if int(cursor) == 0:
                break
        await self.redis.disconnect()

    def _write_row(self) -> None:
        self.row["duration_s"] = round(time.monotonic() - self._began, 1)
        self.row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        directory = summary_dir()
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"{self.scenario}.json"), "w") as f:
            json.dump(self.row, f, indent=1)
        print(f"\n[faults] {format_row(self.row)}")

    # -- building blocks ---------------------------------------------------

    def worker(self, name: str = "worker", *, queues: Iterable[str] = ("default:20",),
               redis_url: str = REDIS_URL, amqp_url: Optional[str] = None,
               extra: Iterable[str] = (),
               tasks: Iterable[str] = (TASKS_MODULE,)) -> WorkerProcess:
        """A worker process (not started) on the fault tasks; killed in cleanup."""
        return WorkerProcess(self, amqp_url or self.url, redis_url, self.prefix,
                             tasks=tuple(tasks), queues=queues,
                             extra=(*(("--queue-type", self.queue_type) if self.queue_type
                                      else ()), *extra), name=name)

    async def publish(self, count: int, task: str = "faults.mark", *, start: int = 0,
                      options: Callable[[int], Mapping[str, Any]] = lambda i: {},
                      per_second: Optional[float] = None) -> Dict[int, str]:
        """
        Publish tasks ``start .. start+count-1`` as ``task(self.runs.path, i,
        **options(i))``, with confirms, concurrently; return ``{i: task id}``.
        With ``per_second``, the publishes start at that pace (a producer
        that keeps publishing through a fault) instead of all at once.
        ``self.published[i]`` is ``(sent, confirmed)``, wall-clock times.
        """
        sem = defer.DeferredSemaphore(PUBLISH_CONCURRENCY)
        numbers = list(range(start, start + count))
        began = time.monotonic()

        async def one(i: int) -> Any:
            sent = time.time()
            info = await sem.run(self.client.add_task, task, self.runs.path, i, **options(i))
            self.published[i] = (sent, time.time())
            return info

        calls = []
        for n, i in enumerate(numbers):
            if per_second:
                ahead = began + n / per_second - time.monotonic()
                if ahead > 0:
                    await sleep(ahead)
            calls.append(defer.ensureDeferred(one(i)))
        infos = await defer.gatherResults(calls, consumeErrors=True)
        return {i: info.id for i, info in zip(numbers, infos)}

    async def until_failed(self, supervise: Supervisor, what: str,
                           timeout: float = 60.0) -> None:
        """Keep supervising until a task of this test is ``failed``."""
        async def failed() -> bool:
            await supervise()  # the failing task may still be killing workers
            return bool(await self.count_in("failed"))

        await until(failed, timeout, what)

    async def count_in(self, state: str) -> int:
        """How many of this test's tasks the state store lists as ``state``."""
        return int(await self.redis.zcard(f"{self.prefix}idx:state:{state}"))

    async def wait_done(self, ids: Mapping[int, str], *, timeout: float = 120.0,
                        workers: Iterable[WorkerProcess] = (),
                        supervise: Optional[Callable[[], Any]] = None,
                        state: str = SUCCEEDED) -> Dict[int, dict]:
        """
        Wait until the state store lists at least ``len(ids)`` tasks as
        ``state``, then return every record of ``ids``.  Fails at once if a
        worker of ``workers`` dies (unless ``supervise``, called at every
        poll, restarts it).
        """
        workers = list(workers)

        async def done() -> bool:
            if supervise is not None:
                await defer.ensureDeferred(supervise())
            for w in workers:
                if not w.alive:
                    raise AssertionError(f"a worker died (exit {w.process.returncode}):\n"
                                         + w.log()[-3000:])
            return await self.count_in(state) >= len(ids)

        try:
            await wait_for(done, timeout, interval=0.25,
                           what=f"{len(ids)} tasks to be {state}")
        except AssertionError:
            # Say which tasks are behind, and where they stand.
            records = await self.records(ids)
            behind = [i for i, r in records.items() if (r or {}).get("state") != state]
            print(f"[faults] {len(behind)} task(s) not {state}: {behind[:20]}")
            try:
                left = {q: c for q, c in (await self.queue_counts()).items() if any(c)}
                print(f"[faults] queues (ready, unacked, held for dead-lettering): {left}")
            except Exception as e:  # noqa: BLE001 - evidence only
                print(f"[faults] queue counts unavailable: {e}")
            self._evidence(Tally(tasks=len(ids), succeeded=len(ids) - len(behind),
                                 lost=behind, duplicates={}, strays={}, extra_attempts=0,
                                 undercounted=[]), records)
            raise
        return await self.records(ids)

    async def records(self, ids: Mapping[int, str]) -> Dict[int, dict]:
        sem = defer.DeferredSemaphore(32)
        numbers = list(ids)
        found = await defer.gatherResults([sem.run(self.state.get, ids[i]) for i in numbers],
                                          consumeErrors=True)
        return dict(zip(numbers, found))

    def tally(self, records: Mapping[int, Optional[dict]],
              expected: Mapping[int, int]) -> Tally:
        """
        Compare the runs recorded in ``self.runs`` and the state records
        with ``expected`` (runs per task number; also its attempt count).
        """
        counts = self.runs.counts()
        lost = sorted(i for i, n in expected.items() if counts[i] < n)
        duplicates = {i: counts[i] - n for i, n in expected.items() if counts[i] > n}
        # negative numbers mark the scenario's own special tasks (the poison)
        strays = {i: n for i, n in counts.items() if i not in expected and i >= 0}
        succeeded = sum(1 for i in expected
                        if records.get(i) is not None and records[i]["state"] == SUCCEEDED)
        extra = sum(max(0, int(records[i]["attempts"]) - n) for i, n in expected.items()
                    if records.get(i) is not None)
        undercounted = sorted(i for i in expected if records.get(i) is not None
                              and int(records[i]["attempts"]) < counts[i])
        return Tally(tasks=len(expected), succeeded=succeeded, lost=lost,
                     duplicates=duplicates, strays=strays, extra_attempts=extra,
                     undercounted=undercounted)

    def check(self, tally: Tally, *, duplicate_bound: int,
              attempt_bound: Optional[int] = None, allow_forks: bool = False,
              records: Optional[Mapping[int, Optional[dict]]] = None) -> None:
        """
        The assertions every scenario makes about its batch, after filling
        in the summary row: every task succeeded, none lost, none ran that
        should not have, at most ``duplicate_bound`` duplicate runs, at
        most ``attempt_bound`` (default: ``duplicate_bound``) attempts
        counted beyond the expected ones, and (unless ``allow_forks``) no
        record counting fewer attempts than its task really ran: that
        happens when one task became two messages that both ran the same
        attempt (a *fork*; see docs/reliability.rst).  Anomalous tasks are
        printed with their records (pass ``records``) as evidence.
        """
        self.row.update(tasks=tally.tasks, succeeded=tally.succeeded,
                        duplicates=tally.duplicate_runs, duplicate_bound=duplicate_bound,
                        lost=len(tally.lost), extra_attempts=tally.extra_attempts,
                        forks=len(tally.undercounted))
        if tally.duplicates:
            print(f"\n[faults] {self.scenario}: {tally.duplicate_runs} duplicate run(s), "
                  f"tasks {sorted(tally.duplicates)[:40]}")
        if tally.undercounted:
            print(f"\n[faults] {self.scenario}: {len(tally.undercounted)} task(s) ran more "
                  f"times than their record counts attempts (forked): "
                  f"{tally.undercounted[:40]}")
        self._evidence(tally, records)
        self.assertEqual(tally.lost, [], "tasks lost (ran fewer times than expected)")
        self.assertEqual(tally.strays, {}, "runs of tasks that should never have run")
        self.assertEqual(tally.succeeded, tally.tasks, "every task must end succeeded")
        self.assertLessEqual(tally.duplicate_runs, duplicate_bound,
                             f"more duplicate runs than tasks in flight: {tally.duplicates}")
        if attempt_bound is None:
            attempt_bound = duplicate_bound
        self.assertLessEqual(tally.extra_attempts, attempt_bound,
                             "more attempts recorded than the fault can explain")
        if not allow_forks:
            self.assertEqual(tally.undercounted, [],
                             "records counting fewer attempts than runs (forked tasks)")

    def _evidence(self, tally: Tally, records: Optional[Mapping[int, Optional[dict]]]) -> None:
        """Print the runs and records of anomalous tasks (at most 10)."""
        if records is None:
            return
        odd = sorted(set(tally.lost) | set(tally.duplicates) | set(tally.undercounted))[:10]
        if not odd:
            return
        runs = collections.defaultdict(list)
        for r in self.runs.read():
            runs[r.i].append(f"pid {r.pid} at {r.at:.3f}")
        for i in odd:
            record = records.get(i) or {}
            history = [(h.get("attempt"), h.get("state"), h.get("worker"),
                        (h.get("error") or {}).get("type")) for h in record.get("history") or []]
            print(f"[faults]   task {i} id {record.get('id')}: {record.get('state')}, "
                  f"attempts {record.get('attempts')}; runs {runs[i]}; history {history}")

    async def assert_queues(self, expected: Optional[Mapping[str, tuple]] = None,
                            timeout: float = 20.0, steady: float = 0.0) -> Dict[str, tuple]:
        """
        Wait until every queue of the vhost (work, delay levels, errored)
        is empty but ``expected`` (``{queue: (ready, unacked)}``), and no
        quorum queue still holds a message for dead-lettering (see
        :meth:`queue_counts`); fail with the counts otherwise.  The
        workers' own server-named queues (``amq.gen-*``: control and
        liveness beacons, one beacon always in flight) are not tasks and
        are left out.

        ``steady``: seconds the queues must stay that way, for a message
        that may still be on its way (a copy parked in a delay queue, which
        quorum queues' counts show seconds late).
        """
        expected = dict(expected or {})
        seen: Dict[str, tuple] = {}
        held: Dict[str, int] = {}
        since: List[float] = []

        async def settled() -> bool:
            counts = await self.queue_counts()
            seen.clear()
            seen.update({q: (r, u) for q, (r, u, _) in counts.items()
                         if (r, u) != (0, 0) and not q.startswith("amq.gen-")})
            held.clear()
            held.update({q: h for q, (_, _, h) in counts.items() if h})
            if seen != expected or held:
                since.clear()
                return False
            if not since:
                since.append(time.monotonic())
            return time.monotonic() - since[0] >= steady

        try:
            await wait_for(settled, timeout + steady, interval=0.5,
                           what="queues to settle")
        except AssertionError:
            self.fail(f"queues left with messages {seen}, expected {expected}"
                      + (f"; held for dead-lettering: {held}" if held else ""))
        return seen

    async def queue_counts(self) -> Dict[str, Tuple[int, int, int]]:
        """
        ``{queue: (ready, unacked, held)}`` of the vhost (from the cluster
        when on it).  ``held``: messages a quorum queue keeps while it
        dead-letters them *at least once* (an expired delay-level message on
        its way to the next level), counted in ``messages`` but neither
        ready nor unacked; RabbitMQ holds them until the target queue
        confirms, which can take minutes when that queue lost its leader
        (docs/reliability.rst, "node-loss").  Quorum counts lag a few seconds.
        """
        args = ("list_queues", "-p", self.vhost, "--no-table-headers", "name", "messages",
                "messages_ready", "messages_unacknowledged")
        if self.cluster is not None:
            out = await self.cluster.rabbitmqctl(self.up_node(), *args)
        else:
            out = await rabbitmqctl(*args)
        counts = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 4 and all(p.isdigit() for p in parts[1:]):
                total, ready, unacked = (int(p) for p in parts[1:])
                counts[parts[0]] = (ready, unacked, max(0, total - ready - unacked))
        return counts

    async def held(self) -> int:
        """Messages the vhost's quorum queues hold for dead-lettering (see :meth:`queue_counts`)."""
        return sum(h for _, _, h in (await self.queue_counts()).values())

    def recovered(self, seconds: Optional[float], bound: float, what: str) -> None:
        """Record (and check) a recovery time: seconds from fault end to ``what``."""
        self.row.update(recovery_s=None if seconds is None else round(seconds, 2),
                        recovery_bound_s=bound, recovery=what)
        self.assertIsNotNone(seconds, f"never recovered: {what}")
        self.assertLessEqual(seconds, bound, f"recovery too slow: {what}")

    def passed(self, notes: str = "") -> None:
        """The scenario's last line: its row says it passed."""
        self.row["status"] = "passed"
        if notes:
            self.row["notes"] = notes

    async def stop_workers(self, *workers: WorkerProcess) -> None:
        """SIGTERM every worker still running; each must exit 0."""
        for w in workers:
            if w.alive:
                self.assertEqual(await w.stop(), 0, w.log()[-3000:])

    # -- on the cluster (``on_cluster``) -----------------------------------

    def node_urls(self, *nodes: str) -> str:
        """
        The vhost's URLs on the cluster's ``nodes`` (``"c2", "c3", "c1"``),
        comma-separated in that order: an ``--amqp-url`` that connects to
        the first node that answers.
        """
        assert self.cluster is not None, "on_cluster scenarios only"
        return ",".join(self.cluster.url(node, self.vhost) for node in nodes)

    def worker_nodes(self, worker: WorkerProcess, connection: str = "consumer") -> List[str]:
        """
        The nodes (``"c2"``) on which ``worker``'s ``connection``
        (``consumer`` or ``publisher``) was made ready, one per connection,
        oldest first, read from its log.
        """
        assert self.cluster is not None, "on_cluster scenarios only"
        ports = {urlsplit(self.cluster.url(node)).port: node for node in NODES}
        found = re.findall(rf"AMQP quebert-{connection} connection ready "
                           rf"\(127\.0\.0\.1:(\d+)/", worker.log())
        return [ports.get(int(port), port) for port in found]

    async def restart_node(self, node: str) -> float:
        """
        Start ``node`` (killed or stopped), wait until it is back in the
        cluster and give it ``cluster_settings``; the seconds it took.
        """
        began = time.monotonic()
        await self.cluster.restart(node)
        await self.cluster.rabbitmqctl(node, "eval", self._settings_expression())
        return time.monotonic() - began

    def up_node(self) -> str:
        """A node of the cluster that is not down (killed or stopped by the test)."""
        assert self.cluster is not None, "on_cluster scenarios only"
        return next(node for node in NODES if node not in self.cluster.down)

    async def quorum_queues(self) -> Dict[str, Dict[str, Any]]:
        """
        The vhost's quorum queues: ``{name: {"leader": "c1" or None,
        "members": [...], "online": [...]}}`` (nodes as ``"cN"``, sorted).
        """
        out = await self.cluster.rabbitmqctl(self.up_node(), "list_queues", "-p", self.vhost,
                                             "--no-table-headers", "name", "type", "leader",
                                             "members", "online")
        queues = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) != 5 or parts[1] != "quorum":
                continue
            nodes = [sorted(re.findall(r"quebert-(c\d)@", field)) for field in parts[2:]]
            queues[parts[0]] = {"leader": nodes[0][0] if nodes[0] else None,
                                "members": nodes[1], "online": nodes[2]}
        return queues

    async def wait_leaders(self, not_on: str, timeout: float = 60.0) -> float:
        """
        Wait until every quorum queue of the vhost has a leader, none on
        ``not_on`` (a node just lost); the seconds waited.
        """
        began = time.monotonic()
        seen: Dict[str, Any] = {}

        async def elected() -> bool:
            try:
                queues = await self.quorum_queues()
            except RuntimeError:  # the queried node was busy electing
                return False
            seen.clear()
            seen.update({q: i["leader"] for q, i in queues.items()
                         if i["leader"] in (None, not_on)})
            return bool(queues) and not seen

        try:
            await wait_for(elected, timeout, interval=0.2,
                           what=f"new quorum queue leaders off {not_on}")
        except AssertionError:
            self.fail(f"quorum queues without a leader off {not_on} after {timeout}s: {seen}")
        return time.monotonic() - began

    async def quorum_status(self, queue: str) -> Dict[str, Dict[str, Any]]:
        """
        ``rabbitmq-queues quorum_status`` of ``queue``: ``{node: {"state":
        "leader"/"follower"/..., "log": log index, "commit": commit index}}``.
        """
        out, err, code = await getProcessOutputAndValue(
            "rabbitmq-queues", ("-q", "-n", _cluster.node_name(self.up_node()), "quorum_status",
                                queue, "--vhost", self.vhost, "--formatter", "json"),
            env=_cluster._ENV)
        if code != 0:
            raise RuntimeError(f"rabbitmq-queues quorum_status {queue} failed ({code}): "
                               f"{err.decode(errors='replace').strip()}")
        status = {}
        for member in json.loads(out):
            node = _cluster.short(member["Node Name"])
            status[node] = {"state": member.get("Raft State"),
                            "log": int(member.get("Log Index") or 0),
                            "commit": int(member.get("Commit Index") or 0)}
        return status

    async def wait_in_sync(self, node: str, busy: Iterable[str] = ("default",),
                           timeout: float = 60.0) -> float:
        """
        Wait until ``node`` (back after a restart) has an online replica of
        every quorum queue of the vhost, and its replicas of the ``busy``
        queues have caught up: their commit index reached the leader's at
        the moment the replica was online.  The seconds waited.
        """
        began = time.monotonic()
        seen: Dict[str, Any] = {}

        async def online() -> bool:
            try:
                queues = await self.quorum_queues()
            except RuntimeError:
                return False
            seen.clear()
            seen.update({q: i for q, i in queues.items()
                         if node not in i["online"] or i["leader"] is None})
            return bool(queues) and not seen

        try:
            await wait_for(online, timeout, interval=0.5, what=f"{node}'s replicas online")
        except AssertionError:
            self.fail(f"{node}'s quorum replicas not online after {timeout}s: {seen}")
        for queue in busy:
            leaders: List[int] = []

            async def led(queue: str = queue, leaders: List[int] = leaders) -> bool:
                status = await self.quorum_status(queue)
                leaders.extend(s["commit"] for s in status.values() if s["state"] == "leader")
                return bool(leaders)

            left = max(1.0, timeout - (time.monotonic() - began))
            await wait_for(led, left, interval=0.5, what=f"a leader of {queue}")
            target = leaders[0]

            async def caught_up(queue: str = queue, target: int = target) -> bool:
                mine = (await self.quorum_status(queue)).get(node)
                return mine is not None and mine["commit"] >= target

            left = max(1.0, timeout - (time.monotonic() - began))
            await wait_for(caught_up, left, interval=0.5,
                           what=f"{node}'s replica of {queue} to reach commit index {target}")
        return time.monotonic() - began


def format_row(row: Mapping[str, Any]) -> str:
    """One summary row as a line of text."""
    def num(key: str) -> str:
        value = row.get(key)
        return "-" if value is None else str(value)

    recovery = "-" if row.get("recovery_s") is None else f"{row['recovery_s']:.2f}s"
    return (f"{row['scenario']}: {row['status']}, {num('tasks')} tasks, "
            f"{num('succeeded')} succeeded, {num('duplicates')} duplicate run(s) "
            f"(bound {num('duplicate_bound')}), {num('lost')} lost, recovery {recovery} "
            f"(bound {num('recovery_bound_s')}s: {row.get('recovery') or '-'}), "
            f"{num('duration_s')}s")


async def until(predicate: Callable[[], Any], timeout: float, what: str,
                interval: float = 0.05) -> float:
    """:func:`wait_for` that returns the wall-clock time the predicate came true."""
    await wait_for(predicate, timeout, interval=interval, what=what)
    return time.time()

