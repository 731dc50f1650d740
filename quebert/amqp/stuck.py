# -*- test-case-name: tests.test_beacon -*-
"""
"Connected but not consuming": a consumer the broker stopped serving.

The beacon (:mod:`quebert.amqp.beacon`) proves that a connection delivers;
it cannot prove that each consumer on it still gets messages (a consumer
lost in a quorum leader change, a channel the broker stopped serving).
:class:`StuckConsumerCheck` looks, every ``period`` seconds, for a queue
that

* the worker consumes (not paused, consumer registered),
* could take more (the consumer has fewer unacked deliveries than its
  prefetch, and the worker runs fewer tasks than its maximum),
* has received nothing for ``timeout`` seconds,
* and yet has ready messages in RabbitMQ (a passive ``queue.declare`` on a
  throwaway channel), seen on two checks in a row with nothing received
  in between (a message published just as we look is not a stuck
  consumer).

Such a consumer is logged with the figures and re-subscribed: cancelled,
and consumed again on a fresh channel (:meth:`QueueConsumer.resubscribe`).
Until it receives something again (or its queue has nothing ready, or it
stops consuming), it counts as stuck: :meth:`StuckConsumerCheck.healthy`
is false, and the worker's ``/health`` says it is not ready.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from quebert._defer import bounded

log = Logger(namespace="quebert.amqp.stuck")

#: Seconds the passive declare may take before the check skips a round.
DEPTH_WAIT = 10.0


def default_period(timeout: float) -> float:
    """How often to look, for a given ``timeout``."""
    return min(max(timeout / 4.0, 0.05), 15.0)


class StuckConsumerCheck(Service):
    """
    :param consumers: ``{queue: QueueConsumer}`` (read on every check).
    :param depth: ``depth(queue)`` fires with ``(ready, consumers)`` or
        ``None`` (see :meth:`quebert.amqp.admin.BrokerAdmin.depth`).
    :param has_capacity: ``() -> bool``, whether the worker could run one
        more task.
    """

    def __init__(self, consumers: Mapping[str, Any], depth: Callable[[str], Any],
                 has_capacity: Callable[[], bool], timeout: float, *, clock: Any,
                 period: Optional[float] = None) -> None:
        if timeout <= 0:
            raise ValueError("the stuck consumer timeout must be > 0")
        self.consumers = consumers
        self.depth = depth
        self.has_capacity = has_capacity
        self.timeout = float(timeout)
        self.period = period if period is not None else default_period(self.timeout)
        self.clock = clock
        self.resubscribes = 0
        #: queues re-subscribed because stuck -> their delivery count then;
        #: a queue leaves once it received something (or is no longer stuck)
        self.stuck: dict[str, int] = {}
        #: queue -> (first time seen stuck-looking, deliveries count then)
        self._suspect: dict[str, tuple] = {}
        self._busy = False
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        if not self._loop.running:
            self._loop.start(self.period, now=False)

    def stopService(self):
        if self._loop.running:
            self._loop.stop()
        return super().stopService()

    def check(self) -> None:
        """One round over every consumer (skipped while the last one still runs)."""
        if self._busy:
            return
        self._busy = True
        d = defer.ensureDeferred(self._check_all())
        d.addErrback(lambda f: log.failure("stuck consumer check failed", f))

        def done(_: Any) -> None:
            self._busy = False

        d.addBoth(done)

    def healthy(self) -> bool:
        """False while a consumer re-subscribed as stuck has received nothing since."""
        return not self.stuck

    async def _check_all(self) -> None:
        for queue in [q for q in self.stuck if q not in self.consumers]:
            del self.stuck[queue]
        for queue, consumer in sorted(self.consumers.items()):
            try:
                await self._check_one(queue, consumer)
            except Exception as e:
                log.warn("stuck consumer check of {queue} failed: {error}", queue=queue,
                         error=e)

    def _idle(self, consumer: Any, now: float) -> Optional[float]:
        """Seconds ``consumer`` could have received something and did not, or None."""
        if consumer.paused or not consumer.consuming:
            return None
        since = max(consumer.last_delivery_at or 0.0, consumer.consuming_since or 0.0)
        idle = now - since
        if idle < self.timeout:
            return None
        if consumer.unacked >= consumer.prefetch or not self.has_capacity():
            return None
        return idle

    async def _check_one(self, queue: str, consumer: Any) -> None:
        reap = getattr(consumer, "reap_retired", None)
        if reap is not None:
            reap()
        now = self.clock.seconds()
        deliveries = consumer.deliveries
        if queue in self.stuck and (deliveries != self.stuck[queue] or consumer.paused
                                    or not consumer.consuming):
            del self.stuck[queue]
            log.info("consumer of {queue} receives again", queue=queue)
        if self._idle(consumer, now) is None:
            self._suspect.pop(queue, None)
            return
        try:
            depth = await bounded(defer.maybeDeferred(self.depth, queue), DEPTH_WAIT,
                                  self.clock,
                                  lambda: TimeoutError(f"no answer in {DEPTH_WAIT}s"))
        except Exception as e:
            log.info("stuck consumer check: depth of {queue} unknown ({error})", queue=queue,
                     error=e)
            return
        now = self.clock.seconds()
        idle = self._idle(consumer, now)
        if depth and depth[0] <= 0:
            self.stuck.pop(queue, None)  # nothing to receive: not stuck
        if idle is None or consumer.deliveries != deliveries or not depth or depth[0] <= 0:
            self._suspect.pop(queue, None)
            return
        ready, consumer_count = depth
        first = self._suspect.get(queue)
        if first is None or first[1] != deliveries:
            # Seen once: look again next round before acting.
            self._suspect[queue] = (now, deliveries)
            return
        del self._suspect[queue]
        self.resubscribes += 1
        log.warn(
            "consumer of {queue} looks stuck: nothing received for {idle:.1f}s (limit "
            "{timeout}s) while {ready} message(s) are ready (seen for {seen:.1f}s), "
            "{unacked} unacked of prefetch {prefetch}, {consumers} consumer(s) on the "
            "queue; re-subscribing on a fresh channel",
            queue=queue, idle=idle, timeout=self.timeout, ready=ready, seen=now - first[0],
            unacked=consumer.unacked, prefetch=consumer.prefetch, consumers=consumer_count)
        self.stuck[queue] = consumer.deliveries
        await consumer.resubscribe()
