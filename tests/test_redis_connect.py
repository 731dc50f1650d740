"""
Connections to Redis (``quebert.state._redis_connect``) are re-established
whatever became of the one before: a reconnection made while Redis does
not answer is dropped and tried again, not given up for good; a server
that refuses the connection's set-up is a configuration error and stops.
"""

from __future__ import annotations

import time
from typing import Any

import txredisapi
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from quebert.state.redis import connect_redis, parse_redis_url
from tests._proxy import FreezableProxy
from tests._redis import REDIS_URL


async def _sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def _ping(redis: Any, timeout: float) -> Any:
    """PING, failed with CancelledError after ``timeout`` seconds unanswered."""
    return await redis.ping().addTimeout(timeout, reactor)


class ReconnectionTests(TestCase):
    timeout = 60

    async def test_a_reconnection_left_unanswered_is_tried_again(self) -> None:
        """
        Redis stops answering with its sockets open (frozen, partitioned)
        for longer than a reconnection takes: the connection is dropped
        after the reply timeout, the reconnection's SELECT is left
        unanswered and dropped too, and once Redis answers again a later
        attempt connects.  txredisapi alone stops reconnecting for good
        when a SELECT fails, whatever the reason.
        """
        parsed = parse_redis_url(REDIS_URL)
        proxy = FreezableProxy(parsed["host"], parsed["port"])
        port = proxy.start(self)
        redis = connect_redis(f"redis://{parsed['host']}:{port}/{parsed['db']}",
                              reply_timeout=0.5)
        self.addCleanup(redis.disconnect)
        self.assertEqual(await _ping(redis, 10), "PONG")

        frozen_at = proxy.freeze()
        with self.assertRaises(txredisapi.TimeoutError):
            await _ping(redis, 10)
        deadline = time.monotonic() + 20
        while len(proxy.closed_by_client(since=frozen_at)) < 2:
            self.assertLess(time.monotonic(), deadline,
                            "the reconnection made while frozen was not dropped")
            await _sleep(0.1)
        proxy.thaw()

        deadline = time.monotonic() + 20
        while True:
            try:
                self.assertEqual(await _ping(redis, 2), "PONG")
                break
            except Exception as error:  # not connected yet: txredisapi waits, or says so
                self.assertLess(time.monotonic(), deadline,
                                f"never connected again after the freeze ({error!r})")
                await _sleep(0.1)

    async def test_a_refused_database_is_not_tried_again(self) -> None:
        """
        A SELECT the server refuses (no such database) is a configuration
        error, not an outage: the connection gives up and says so instead
        of reconnecting in a loop.
        """
        parsed = parse_redis_url(REDIS_URL)
        redis = connect_redis(f"redis://{parsed['host']}:{parsed['port']}/100000")
        self.addCleanup(redis.disconnect)
        deadline = time.monotonic() + 10
        while not redis._factory.stopped:
            self.assertLess(time.monotonic(), deadline, "still reconnecting")
            await _sleep(0.05)
        with self.assertRaises(txredisapi.ConnectionError):
            await _ping(redis, 5)
        self.flushLoggedErrors()
