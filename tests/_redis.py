# -*- test-case-name: tests.test_state -*-
"""
An isolated Redis for tests.

Each test gets database 9 of the Redis at ``QUEBERT_TEST_REDIS_URL``
(default ``redis://127.0.0.1:6379/9``) and its own key prefix
``quebert-test-<uuid>:``; cleanup deletes only the keys with that prefix,
so tests can share a server with anything else.  Nothing is flushed, and
nothing is skipped: without Redis the test fails and says how to start one.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from quebert._defer import bounded
from quebert.state.redis import connect_redis, parse_redis_url
from tests._proxy import FreezableProxy

REDIS_URL = os.environ.get("QUEBERT_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
#: Seconds to wait for the test Redis to answer a PING.
CONNECT_WAIT = 5.0


@inlineCallbacks
def isolated_redis(testcase: TestCase) -> Deferred:
    """
    Fire with ``(connection, prefix)`` for ``testcase``: a txredisapi
    connection to the test database and the key prefix only this test uses.
    Registers the cleanup (delete the prefix's keys, then disconnect).
    """
    connection = connect_redis(REDIS_URL)
    testcase.addCleanup(connection.disconnect)
    try:
        yield bounded(connection.ping(), CONNECT_WAIT, reactor,
                      lambda: TimeoutError(f"no answer in {CONNECT_WAIT}s"))
    except Exception as e:
        testcase.fail(
            f"The test Redis at {REDIS_URL} is not reachable ({type(e).__name__}: {e}). "
            "Start one with: redis-server --daemonize yes --bind 127.0.0.1 --port 6379 "
            '--save "" --appendonly no (or set QUEBERT_TEST_REDIS_URL).'
        )
    prefix = f"quebert-test-{uuid.uuid4().hex}:"
    testcase.addCleanup(delete_prefixed, connection, prefix)
    return connection, prefix


def through_freezable_proxy(testcase: TestCase, reply_timeout: float) -> tuple:
    """
    ``(proxy, connection)``: a :class:`tests._proxy.FreezableProxy` in front
    of the test Redis and a connection through it with ``reply_timeout``,
    both closed in cleanup.
    """
    parsed = parse_redis_url(REDIS_URL)
    proxy = FreezableProxy(parsed["host"], parsed["port"])
    port = proxy.start(testcase)
    connection = connect_redis(f"redis://{parsed['host']}:{port}/{parsed['db']}",
                               reply_timeout=reply_timeout)
    testcase.addCleanup(connection.disconnect)
    return proxy, connection


@inlineCallbacks
def delete_prefixed(connection: Any, prefix: str) -> Deferred:
    """Delete every key starting with ``prefix`` (SCAN: for test cleanup only)."""
    cursor = 0
    while True:
        cursor, keys = yield connection.scan(cursor, pattern=prefix + "*", count=500)
        if keys:
            yield connection.delete(keys)
        if int(cursor) == 0:
            break


@inlineCallbacks
def dump_prefixed(connection: Any, prefix: str) -> Deferred:
    """
    Fire with every key starting with ``prefix`` and its whole value, one
    line each, as text: what tests search for leaked secrets.
    """
    lines = []
    cursor = 0
    while True:
        cursor, keys = yield connection.scan(cursor, pattern=prefix + "*", count=500)
        for key in keys:
            kind = yield connection.type(key)
            kind = kind.decode() if isinstance(kind, bytes) else kind
            if kind == "hash":
                value = yield connection.hgetall(key)
            elif kind == "zset":
                value = yield connection.zrange(key, 0, -1, withscores=True)
            elif kind == "set":
                value = yield connection.smembers(key)
            elif kind == "list":
                value = yield connection.lrange(key, 0, -1)
            elif kind == "string":
                value = yield connection.get(key)
            else:
                raise AssertionError(f"unexpected Redis type {kind!r} of {key!r}")
            lines.append(f"{key} {kind} {value!r}")
        if int(cursor) == 0:
            return "\n".join(lines)
