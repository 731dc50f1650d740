"""
An isolated RabbitMQ vhost per test (class), created with ``rabbitmqctl``.

Tests never touch queues they did not create: everything lives in a fresh
vhost that is deleted in cleanup.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from typing import Optional

import pika
from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue

RABBIT_HOST = "127.0.0.1"
RABBIT_PORT = 5672


def _rabbitmqctl_sync(*args: str) -> str:
    result = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                            timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


@defer.inlineCallbacks
def rabbitmqctl(*args: str):
    """Run ``rabbitmqctl -q ARGS`` without blocking the reactor; fire with stdout."""
    out, err, code = yield getProcessOutputAndValue("rabbitmqctl", ("-q", *args))
    if code != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({code}): "
                           f"{err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


def amqp_url_for(vhost: str) -> str:
    return f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{vhost}"


def make_vhost(testcase, prefix: str = "quebert-test") -> str:
    """
    Create a fresh vhost (deleted in ``testcase``'s cleanup) and return
    its AMQP URL.  Synchronous: for ``setUp``/``setUpClass``.
    """
    vhost = f"{prefix}-{uuid.uuid4().hex[:12]}"
    _rabbitmqctl_sync("add_vhost", vhost)
    testcase.addCleanup(_rabbitmqctl_sync, "delete_vhost", vhost)
    _rabbitmqctl_sync("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    return amqp_url_for(vhost)


def vhost_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


@defer.inlineCallbacks
def queue_counts(url: str, queue: Optional[str] = None):
    """``{queue: (ready, unacked)}`` for the vhost of ``url``."""
    out = yield rabbitmqctl("list_queues", "-p", vhost_of(url), "name", "messages_ready",
                            "messages_unacknowledged")
    counts = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[1].isdigit():
            counts[parts[0]] = (int(parts[1]), int(parts[2]))
    return counts if queue is None else counts.get(queue, (0, 0))


async def wait_counts(url: str, queue: str, expected: tuple, timeout: float = 20.0) -> None:
    """
    Wait until ``queue_counts(url, queue)`` is ``expected``: RabbitMQ
    reports a quorum queue's counts to ``list_queues`` every few seconds,
    so they lag behind what the queue holds.
    """
    from tests._worker import sleep

    deadline = time.monotonic() + timeout
    while True:
        counts = await queue_counts(url, queue)
        if counts == expected:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"queue {queue}: counts {counts} after {timeout}s, "
                                 f"expected {expected}")
        await sleep(0.25)


async def wait_empty(url: str, timeout: float = 20.0) -> None:
    """
    Wait until every queue of ``url``'s vhost but the server-named ones
    (a worker's beacon is always in flight) holds nothing, ready or
    unacked; quorum queues' counts lag (see :func:`wait_counts`).
    """
    from tests._worker import sleep

    deadline = time.monotonic() + timeout
    while True:
        left = {q: c for q, c in (await queue_counts(url)).items()
                if c != (0, 0) and not q.startswith("amq.gen-")}
        if not left:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"queues not empty after {timeout}s: {left}")
        await sleep(0.25)


def read_all(url: str, queue: str) -> list:
    """Read (and ack) every message of ``queue``, blocking: ``[(properties, body)]``."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        messages = []
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return messages
            messages.append((properties, body))
    finally:
        connection.close()


def publish_raw(url: str, queue: str, items: list) -> None:
    """Publish ``(body, properties)`` pairs to ``queue`` with confirms, blocking."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for body, properties in items:
            channel.basic_publish("", queue, body, properties, mandatory=True)
    finally:
        connection.close()
