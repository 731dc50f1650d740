# -*- test-case-name: tests.test_sentinel -*-
"""
A Redis Sentinel set for tests: ``scripts/redis-sentinel.sh`` on ports and
a directory of the tests' own.

:func:`sentinel_set` starts it once per test process (the script's
``start`` is idempotent, and also brings back members a test killed) and
registers an ``atexit`` hook that stops it and removes its directory.  A
test that kills a member calls :func:`restore` in its cleanup, which
restarts what is down and waits until the sentinels could fail over again.
Tests skip only when ``redis-server`` is not installed.

Ports (``QUEBERT_TEST_SENTINEL_DATA_PORTS``, default ``6382 6383``;
``QUEBERT_TEST_SENTINEL_PORTS``, default ``26383 26384 26385``) and the
directory (``QUEBERT_TEST_SENTINEL_DIR``) differ from the script's
defaults, so that a set started by hand is left alone; the main Redis
(6379) is never touched.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import time
from typing import Dict, List, Optional, Tuple

from twisted.trial.unittest import SkipTest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "redis-sentinel.sh")
SERVICE = "quebert-test"
ENV = {
    "QUEBERT_SENTINEL_DIR": os.environ.get("QUEBERT_TEST_SENTINEL_DIR",
                                           "/tmp/quebert-test-redis-sentinel"),
    "QUEBERT_SENTINEL_DATA_PORTS": os.environ.get("QUEBERT_TEST_SENTINEL_DATA_PORTS",
                                                  "6382 6383"),
    "QUEBERT_SENTINEL_PORTS": os.environ.get("QUEBERT_TEST_SENTINEL_PORTS",
                                             "26383 26384 26385"),
    "QUEBERT_SENTINEL_SERVICE": SERVICE,
}
#: Sentinel addresses of the set.
SENTINELS: List[Tuple[str, int]] = [("127.0.0.1", int(p))
                                    for p in ENV["QUEBERT_SENTINEL_PORTS"].split()]
#: The set's Redis URL, database 9 like the other tests.
URL = ("redis+sentinel://" + ",".join(f"{h}:{p}" for h, p in SENTINELS)
       + f"/{SERVICE}/9")
#: Seconds the sentinels refuse a second failover of the service after one
#: (twice the script's failover-timeout of 3 s, and a margin).
FAILOVER_GAP = 7.0

_started = False
_last_failover: Optional[float] = None


def run(*args: str, timeout: float = 60.0) -> str:
    """Run the script with the tests' environment; its output (raises on failure)."""
    done = subprocess.run(["bash", SCRIPT, *args], env=dict(os.environ, **ENV),
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"redis-sentinel.sh {' '.join(args)} failed:\n"
                           f"{done.stdout}{done.stderr}")
    return done.stdout


def cli(port: int, *args: str) -> str:
    """``redis-cli`` against one member of the set."""
    done = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                          capture_output=True, text=True, timeout=10)
    return done.stdout.strip()


def sentinel_set() -> str:
    """Start the set (once per process; ``SkipTest`` without redis-server); its URL."""
    global _started
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        raise SkipTest("redis-server is not installed: no Redis Sentinel set to test with")
    if not _started:
        run("start")
        _started = True
        atexit.register(_stop)
    return URL


def _stop() -> None:
    try:
        run("stop")
    except Exception as e:  # at exit: say it, do not raise
        print(f"tests._sentinel: could not stop the Sentinel set: {e}")


def primary() -> Tuple[str, int]:
    """The primary the first sentinel that answers names."""
    for _host, port in SENTINELS:
        found = cli(port, "sentinel", "get-master-addr-by-name", SERVICE).split()
        if len(found) == 2:
            return found[0], int(found[1])
    raise AssertionError("no sentinel names a primary")


def kill_primary() -> Tuple[str, int]:
    """``kill -9`` the primary (the sentinels' view); its address."""
    global _last_failover
    address = primary()
    run("kill-primary")
    _last_failover = time.monotonic()
    return address


def stop_member(name: str) -> None:
    """Stop one member (``data1``, ``data2``, ``sentinel1``...) until :func:`restore`."""
    port = dict(zip(("data1", "data2"), ENV["QUEBERT_SENTINEL_DATA_PORTS"].split()))[name]
    info = cli(int(port), "info", "server")
    pid = [line.split(":")[1] for line in info.splitlines() if line.startswith("process_id:")]
    if pid:
        os.kill(int(pid[0]), 9)


def replica_of_primary() -> str:
    """The name (``data1``/``data2``) of the data node that is not the primary."""
    ports = ENV["QUEBERT_SENTINEL_DATA_PORTS"].split()
    return "data2" if primary()[1] == int(ports[0]) else "data1"


def _settled() -> bool:
    """Every sentinel sees a primary and one healthy replica in step."""
    for _host, port in SENTINELS:
        master = _pairs(cli(port, "sentinel", "master", SERVICE))
        if master.get("flags") != "master" or master.get("num-slaves") != "1":
            return False
        replicas = cli(port, "sentinel", "replicas", SERVICE).splitlines()
        replica = _pairs("\n".join(replicas))
        if replica.get("flags") != "slave" or replica.get("master-link-status") != "ok":
            return False
    host, port = primary()
    info = cli(port, "info", "replication")
    return "connected_slaves:1" in info


def _pairs(text: str) -> Dict[str, str]:
    lines = text.splitlines()
    return dict(zip(lines[0::2], lines[1::2]))


def restore(timeout: float = 60.0) -> None:
    """
    Restart the members that are down and wait until the set could fail
    over again (a healthy replica; ``FAILOVER_GAP`` since the last failover).
    Blocking: meant for cleanups.
    """
    global _last_failover
    run("start")
    deadline = time.monotonic() + timeout
    while not _settled():
        if time.monotonic() > deadline:
            raise AssertionError("the Sentinel set did not settle:\n" + run("status"))
        time.sleep(0.2)
    if _last_failover is not None:
        left = FAILOVER_GAP - (time.monotonic() - _last_failover)
        if left > 0:
            time.sleep(left)
        _last_failover = None
