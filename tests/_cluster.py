# -*- test-case-name: tests.test_cluster -*-
"""
A real 3-node RabbitMQ cluster for trial tests, beside the main node.

``scripts/rabbitmq-cluster.sh`` runs the nodes ``quebert-c1@localhost`` ..
``quebert-c3@localhost`` on AMQP ports 5681-5683 (guest/guest over
loopback); the main node ``rabbit@localhost`` on 5672, which every other
test uses, is never touched.  This module drives that script.

Usage, in a test module::

    from tests._cluster import ClusterTestCase

    class NodeLossTests(ClusterTestCase):
        timeout = 180

        async def test_something(self):
            vhost = self.cluster.make_vhost(self)          # deleted in cleanup
            url1 = self.cluster.url("c1", vhost)            # amqp://...:5681/<vhost>
            ...                                             # declare a quorum queue
            leader = await self.cluster.leader("work", vhost)   # "c2"
            await self.cluster.kill(leader, self)           # kill -9; restarted in cleanup
            ...
            await self.cluster.restart(leader)              # back in the cluster

:class:`ClusterTestCase` (a trial ``TestCase``) starts the shared cluster
in ``setUp`` and exposes it as ``self.cluster``; tests that do not derive
from it call ``cluster = shared_cluster(); cluster.start()`` themselves.

:class:`RabbitCluster`'s API (node arguments are ``"c1"``, ``"c2"``,
``"c3"``, or full node names; methods returning nodes return ``"cN"``):

* :meth:`~RabbitCluster.start` (blocking, for ``setUp``): starts the
  cluster once per process, or again after a test left it (part) down;
  ``SkipTest`` only when rabbitmq-server is not installed: any other
  failure to start fails the test.
* :attr:`~RabbitCluster.urls`, :meth:`~RabbitCluster.url`: AMQP URLs, one
  per node, in node order.
* :meth:`~RabbitCluster.make_vhost` (blocking): a fresh vhost with guest
  permissions, deleted in the test's cleanup.
* Deferred-returning (use ``await``) helpers that never block the reactor:
  :meth:`~RabbitCluster.kill` (``kill -9`` of the node's VM: a real node
  loss; with a test case, the node is restarted in its cleanup whatever
  happens), :meth:`~RabbitCluster.stop_node` (graceful ``rabbitmqctl
  stop``, or ``stop_app`` with ``app_only=True``; also restarted in
  cleanup), :meth:`~RabbitCluster.restart` (start a killed or stopped node
  and wait until it is back in the cluster), :meth:`~RabbitCluster.leader`
  and :meth:`~RabbitCluster.members` of a quorum queue,
  :meth:`~RabbitCluster.running_nodes`, :meth:`~RabbitCluster.queue_counts`
  and :meth:`~RabbitCluster.rabbitmqctl` on any node.
* :meth:`~RabbitCluster.wait_leader` waits for a quorum queue to have a
  leader on a running node (e.g. after its old leader was killed).

The cluster is stopped (and its directory removed) when the Python
process exits, unless ``QUEBERT_CLUSTER_KEEP=1`` (handy to iterate on a
test without paying the ~20 s start each run).  Several processes may use
it at once: each holds a shared ``flock`` on ``<dir>.users`` while it uses
the cluster, and only the last one to exit stops it.  ``.ci/run`` and
``scripts/run-tests.sh`` also stop it when the test run ends, even after
a crash of trial.  ``QUEBERT_CLUSTER_DIR`` moves the cluster's directory
(and with it the lock), as for the script.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import subprocess
import time
import uuid
from typing import Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from tests._worker import sleep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "rabbitmq-cluster.sh")
NODES = ("c1", "c2", "c3")
HOST = "127.0.0.1"
#: AMQP port of node ``cN`` is ``PORT_BASE + N`` (as in the script).
PORT_BASE = int(os.environ.get("QUEBERT_CLUSTER_PORT_BASE", "5680"))
#: rabbitmq-server and rabbitmqctl live in /usr/sbin, not always on PATH.
_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
_ENV = dict(os.environ, PATH=_PATH)


def short(node: str) -> str:
    """``"c2"`` for ``"c2"``, ``"2"``, ``"quebert-c2"`` or ``"quebert-c2@localhost"``."""
    name = node.split("@", 1)[0]
    name = name[len("quebert-"):] if name.startswith("quebert-") else name
    name = name if name.startswith("c") else f"c{name}"
    if name not in NODES:
        raise ValueError(f"not a node of the test cluster: {node!r}")
    return name


def node_name(node: str) -> str:
    """The Erlang node name, ``quebert-c2@localhost``."""
    return f"quebert-{short(node)}@localhost"


def installed() -> bool:
    """Whether rabbitmq-server (and so the cluster script) can run here."""
    return shutil.which("rabbitmq-server", path=_PATH) is not None


class RabbitCluster:
    """The 3-node test cluster of ``scripts/rabbitmq-cluster.sh`` (module docstring)."""

    def __init__(self, script: str = SCRIPT) -> None:
        self.script = script
        self.base = os.environ.get("QUEBERT_CLUSTER_DIR", "/tmp/quebert-rabbit-cluster")
        #: Set once ``start()`` has brought the cluster up in this process,
        #: cleared when a node is killed or stopped and not yet restarted.
        self._up = False
        self._users_fd: Optional[int] = None
        #: Nodes killed or stopped and not restarted yet.
        self.down: set = set()
        self._atexit = False

    # -- AMQP addresses -----------------------------------------------------

    @property
    def urls(self) -> List[str]:
        """``amqp://guest:guest@127.0.0.1:<port>/`` of c1, c2, c3."""
        return [self.url(node) for node in NODES]

    def url(self, node: str, vhost: str = "") -> str:
        """The AMQP URL of ``node`` for ``vhost`` (``""`` is the default vhost ``/``)."""
        port = PORT_BASE + NODES.index(short(node)) + 1
        return f"amqp://guest:guest@{HOST}:{port}/{vhost}"

    # -- blocking: setUp and process exit ------------------------------------

    def _script_sync(self, *args: str, timeout: float = 300) -> str:
        result = subprocess.run(["bash", self.script, *args], capture_output=True, text=True,
                                timeout=timeout, env=_ENV, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmq-cluster.sh {' '.join(args)} failed "
                               f"({result.returncode}):\n{result.stdout}{result.stderr}")
        return result.stdout

    def start(self) -> None:
        """
        Make sure the three nodes run, clustered (blocking; ~20 s the first
        time on 2 cores, nothing once up).  Raises ``SkipTest`` if
        rabbitmq-server is not installed, ``RuntimeError`` if the cluster
        does not come up.
        """
        if self._up and not self.down and self._pids_alive():
            return
        if not installed():
            raise SkipTest("rabbitmq-server is not installed: no RabbitMQ cluster to test on "
                           "(bash scripts/bootstrap.sh installs it)")
        self._use()
        self._script_sync("start")
        self._up = True
        self.down.clear()

    def _pids_alive(self) -> bool:
        """Whether every node's pid file names a live process (cheap, no rabbitmqctl)."""
        for node in NODES:
            try:
                with open(os.path.join(self.base, node, "rabbitmq.pid"), encoding="ascii") as f:
                    os.kill(int(f.read().strip()), 0)
            except (OSError, ValueError):
                return False
        return True

    def _use(self) -> None:
        """Hold a shared lock while this process uses the cluster; stop it at exit."""
        if self._users_fd is None:
            os.makedirs(os.path.dirname(self.base) or "/", exist_ok=True)
            self._users_fd = os.open(self.base + ".users", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._users_fd, fcntl.LOCK_SH)
        if not self._atexit:
            atexit.register(self.stop_at_exit)
            self._atexit = True

    def stop_at_exit(self) -> None:
        """At process exit: stop the cluster unless another process still uses it."""
        if os.environ.get("QUEBERT_CLUSTER_KEEP") == "1" or self._users_fd is None:
            return
        fcntl.flock(self._users_fd, fcntl.LOCK_UN)
        try:
            fcntl.flock(self._users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # another test process still uses the cluster: it stops it
        try:
            self.stop()
        except Exception as e:  # noqa: BLE001 - at exit, say it and go on
            print(f"tests._cluster: stopping the RabbitMQ cluster failed: {e}")
        finally:
            os.close(self._users_fd)
            self._users_fd = None

    def stop(self) -> None:
        """Stop every node and remove the cluster's directory (blocking)."""
        self._up = False
        self._script_sync("stop", timeout=180)

    def make_vhost(self, testcase: TestCase, prefix: str = "quebert-cluster") -> str:
        """
        Create a fresh vhost on the cluster with guest permissions, deleted
        in ``testcase``'s cleanup; return its name.  Blocking: for ``setUp``
        or the start of a test.
        """
        vhost = f"{prefix}-{uuid.uuid4().hex[:12]}"
        node = self._any_up()
        self._ctl_sync(node, "add_vhost", vhost)
        testcase.addCleanup(self._delete_vhost, vhost)
        self._ctl_sync(node, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        return vhost

    def _delete_vhost(self, vhost: str) -> None:
        # Runs after the cleanups that restart killed nodes (registered later).
        self._ctl_sync(self._any_up(), "delete_vhost", vhost)

    def _any_up(self) -> str:
        return next(node for node in NODES if node not in self.down)

    def _ctl_sync(self, node: str, *args: str) -> str:
        result = subprocess.run(["rabbitmqctl", "-q", "-n", node_name(node), *args],
                                capture_output=True, text=True, timeout=120, env=_ENV,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {node_name(node)} {' '.join(args)} failed: "
                               f"{result.stderr.strip()}")
        return result.stdout

    # -- asynchronous: inside tests -------------------------------------------

    @defer.inlineCallbacks
    def _script(self, *args: str):
        out, err, code = yield getProcessOutputAndValue("bash", (self.script, *args), env=_ENV)
        if code != 0:
            raise RuntimeError(f"rabbitmq-cluster.sh {' '.join(args)} failed ({code}):\n"
                               f"{out.decode(errors='replace')}{err.decode(errors='replace')}")
        return out.decode(errors="replace")

    @defer.inlineCallbacks
    def rabbitmqctl(self, node: str, *args: str):
        """Run ``rabbitmqctl -q -n <node> ARGS``; fire with its stdout."""
        out, err, code = yield getProcessOutputAndValue(
            "rabbitmqctl", ("-q", "-n", node_name(node), *args), env=_ENV)
        if code != 0:
            raise RuntimeError(f"rabbitmqctl -n {node_name(node)} {' '.join(args)} failed "
                               f"({code}): {err.decode(errors='replace').strip()}")
        return out.decode(errors="replace")

    def kill(self, node: str, testcase: Optional[TestCase] = None) -> defer.Deferred:
        """
        ``kill -9`` the node's Erlang VM (a real node loss) and fire once it
        is gone.  With ``testcase``, the node is restarted in its cleanup if
        the test has not restarted it.
        """
        return self._take_down(node, testcase, "kill", short(node))

    def stop_node(self, node: str, testcase: Optional[TestCase] = None,
                  app_only: bool = False) -> defer.Deferred:
        """
        Stop the node gracefully: ``rabbitmqctl stop`` (the VM exits) or,
        with ``app_only``, ``stop_app`` (the VM stays).  Restarted in
        ``testcase``'s cleanup like :meth:`kill`.
        """
        args = ("stop-node", short(node)) + (("--app",) if app_only else ())
        return self._take_down(node, testcase, *args)

    @defer.inlineCallbacks
    def _take_down(self, node: str, testcase: Optional[TestCase], *args: str):
        node = short(node)
        if testcase is not None:
            testcase.addCleanup(self._restart_in_cleanup, node)
        self.down.add(node)
        yield self._script(*args)

    def _restart_in_cleanup(self, node: str) -> Optional[defer.Deferred]:
        return self.restart(node) if node in self.down else None

    @defer.inlineCallbacks
    def restart(self, node: str):
        """Start a killed or stopped node and fire once it is back in the cluster."""
        node = short(node)
        yield self._script("restart-node", node)
        self.down.discard(node)

    async def running_nodes(self, node: Optional[str] = None) -> List[str]:
        """The running nodes (``["c1", "c2"]``, sorted) as ``node`` sees them."""
        out = await self.rabbitmqctl(
            node or self._any_up(), "eval",
            'io:format("~s~n", [string:join([atom_to_list(X) || '
            'X <- rabbit_nodes:all_running()], " ")]).')
        return sorted(short(n) for n in out.split("\n", 1)[0].split())

    async def _queue_info(self, vhost: str, *columns: str) -> Dict[str, List[str]]:
        out = await self.rabbitmqctl(self._any_up(), "list_queues", "-p", vhost,
                                     "--no-table-headers", "name", *columns)
        info = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == len(columns) + 1:
                info[parts[0]] = parts[1:]
        return info

    async def leader(self, queue: str, vhost: str = "/") -> Optional[str]:
        """The node leading quorum queue ``queue`` (``"c2"``), None if it has none."""
        info = await self._queue_info(vhost, "leader")
        if queue not in info:
            raise KeyError(f"no queue {queue!r} in vhost {vhost!r}")
        value = info[queue][0].strip()
        return short(value) if value.startswith("quebert-") else None

    async def members(self, queue: str, vhost: str = "/") -> List[str]:
        """The nodes holding a replica of quorum queue ``queue``, sorted."""
        info = await self._queue_info(vhost, "members")
        if queue not in info:
            raise KeyError(f"no queue {queue!r} in vhost {vhost!r}")
        names = info[queue][0].strip("[] ").split(",")
        return sorted(short(n.strip()) for n in names if n.strip())

    async def wait_leader(self, queue: str, vhost: str = "/", timeout: float = 30.0,
                          not_on: Tuple[str, ...] = ()) -> Tuple[str, float]:
        """
        Wait until ``queue`` has a leader on a running node not in
        ``not_on``; return it and the seconds waited.
        """
        began = time.monotonic()
        excluded = {short(n) for n in not_on} | self.down
        last = None
        while True:
            try:
                last = await self.leader(queue, vhost)
            except RuntimeError:
                last = None  # the queried node was busy electing
            if last is not None and last not in excluded:
                return last, time.monotonic() - began
            if time.monotonic() - began > timeout:
                raise AssertionError(f"queue {queue!r} had no leader outside {sorted(excluded)} "
                                     f"after {timeout}s (last seen: {last})")
            await sleep(0.2)

    async def queue_counts(self, vhost: str, queue: Optional[str] = None):
        """
        ``{queue: (ready, unacked)}`` for ``vhost``, as in ``tests._rabbit``
        (quorum queue counts lag by up to a few seconds); with ``queue``,
        that queue's pair.
        """
        info = await self._queue_info(vhost, "messages_ready", "messages_unacknowledged")
        counts = {name: (int(r), int(u)) for name, (r, u) in info.items()
                  if r.isdigit() and u.isdigit()}
        return counts if queue is None else counts.get(queue, (0, 0))


_shared: Optional[RabbitCluster] = None


def shared_cluster() -> RabbitCluster:
    """The process-wide :class:`RabbitCluster` (not started: call ``start()``)."""
    global _shared
    if _shared is None:
        _shared = RabbitCluster()
    return _shared


class ClusterTestCase(TestCase):
    """A trial test case on the shared cluster, started in ``setUp`` as ``self.cluster``."""

    timeout = 180

    def setUp(self) -> None:
        self.cluster = shared_cluster()
        self.cluster.start()
