# -*- test-case-name: tests.test_bridge_guillotina_results -*-
"""
Waiting for results from Guillotina: :class:`ResultWaiter`, asyncio's
counterpart of :class:`quebert.results.ResultWaiter`.

Every write of the state store goes through its ``apply`` script, which
publishes the ids of the tasks a batch settled (``succeeded``, ``failed``,
``canceled``) on :attr:`~quebert.bridge.guillotina.state.BridgeState.settled_channel`;
the workers' writes and the bridge's own (a cancel) alike.  A waiter holds
one ``redis.asyncio`` subscription to that channel for the whole process,
however many coroutines wait, and polls nothing: it reads a record

* when a wait starts, if the subscription is up (a task that settled
  before answers at once; one that settles later is published to a
  subscription that already exists);
* when a message names a task somebody waits for;
* for every waited task, each time the subscription is acknowledged
  (the first time, and after each reconnection: anything published while
  it was down is gone, so it is read again).

Whatever order the subscription, the read and the outcome come in, the
outcome is seen.  Records are read in batches (a pipeline of the store's
``get`` script), one batch at a time, so that ten thousand waits settling
together cost one subscription and one more connection, not ten thousand.

The subscription is a connection of its own (a subscribed connection runs
nothing else), from the store's client: for a ``redis+sentinel://`` URL
each new connection goes to the primary the sentinels name.  Lost, it is
made again with a growing delay (up to :data:`MAX_RECONNECT_DELAY`); a
``PING`` after :data:`KEEPALIVE` quiet seconds that gets no answer within
:data:`KEEPALIVE_TIMEOUT` drops a connection that went silent (a server
gone without closing it), so that a wait never hangs on a dead
subscription.

Nothing here imports a Twisted reactor: :mod:`quebert.results` (for
:func:`~quebert.results.outcome`) imports ``twisted.internet.defer`` and
``twisted.logger`` only.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from typing import Any, Dict, List, Optional

from quebert.bridge.guillotina.state import BridgeState
from quebert.errors import ConfigurationError, ResultTimeout, TaskNotFound
from quebert.results import outcome
from quebert.state import _records
from quebert.state.interface import FINISHED_STATES

log = logging.getLogger("quebert.bridge.guillotina")

#: Seconds without any message on the subscription before it is PINGed.
KEEPALIVE = 15.0
#: Seconds a PING may go unanswered before the subscription is dropped.
KEEPALIVE_TIMEOUT = 5.0
#: Seconds before records that could not be read are read again.
REREAD_DELAY = 1.0
#: Seconds between two attempts to subscribe again, at most.
MAX_RECONNECT_DELAY = 10.0
#: Records read in one pipeline.
READ_BATCH = 500


class _Wait:
    """One coroutine's wait for one task."""

    __slots__ = ("task_id", "future", "since", "read", "last_state")

    def __init__(self, task_id: str, future: asyncio.Future, since: int) -> None:
        self.task_id = task_id
        self.future = future
        self.since = since  # reads numbered up to this one began before the wait
        self.read = False  # a read begun after the wait started answered
        self.last_state: Optional[str] = None


class ResultWaiter:
    """
    Waits for tasks to settle, for any number of coroutines of one event
    loop, through one subscription (started by the first wait, on the loop
    it runs in).

    :param state: the bridge's store: its ``redis`` client subscribes, its
        ``get_many`` reads.
    :param keepalive: seconds of silence before the subscription is PINGed.
    :param keepalive_timeout: seconds the PING may take before the
        subscription is dropped and made again.
    """

    def __init__(self, state: BridgeState, *, keepalive: float = KEEPALIVE,
                 keepalive_timeout: float = KEEPALIVE_TIMEOUT) -> None:
        self.state = state
        self.channel = state.settled_channel
        self.keepalive = keepalive
        self.keepalive_timeout = keepalive_timeout
        #: How many times the subscription was acknowledged (the first
        #: time and after each reconnection).
        self.subscriptions = 0
        self._waits: Dict[str, List[_Wait]] = {}
        self._live = False
        self._closed = False
        self._runner: Optional[asyncio.Task] = None
        self._pubsub: Any = None
        self._pending: Dict[str, None] = {}  # ids to read, in order
        self._reader: Optional[asyncio.Task] = None
        self._reads = 0  # batches begun
        self._reread_ids: Dict[str, None] = {}  # ids whose read failed
        self._reread_timer: Optional[asyncio.TimerHandle] = None
        self._ready: Optional[asyncio.Event] = None

    @property
    def waiting(self) -> int:
        """How many waits are pending."""
        return sum(len(waits) for waits in self._waits.values())

    @property
    def subscribed(self) -> bool:
        """Whether the subscription is up (acknowledged, not known to be lost)."""
        return self._live

    async def when_subscribed(self) -> None:
        """Return once the subscription is up (starting it if no wait did)."""
        self._start()
        assert self._ready is not None
        await self._ready.wait()

    async def wait(self, task_id: str, timeout: Optional[float] = None) -> dict:
        """
        ``task_id``'s record once it is ``succeeded``, ``failed`` or
        ``canceled`` (at once if it is already).  Raises
        :class:`~quebert.errors.TaskNotFound` when the store has no record
        of the task when the wait starts, and
        :class:`~quebert.errors.ResultTimeout` when ``timeout`` seconds pass
        first (the task goes on).  Cancelling the awaiting coroutine stops
        the wait.
        """
        if timeout is not None and (isinstance(timeout, bool) or not timeout >= 0):
            raise ConfigurationError(f"timeout must be seconds >= 0 or None, not {timeout!r}")
        if self._closed:
            raise ConfigurationError("the bridge's result waiter is closed")
        _records.check_task_id(task_id)
        task_id = str(task_id)  # a TaskId is a str; keys and messages are plain ones
        loop = asyncio.get_running_loop()
        wait = _Wait(task_id, loop.create_future(), self._reads)
        self._waits.setdefault(task_id, []).append(wait)
        timer = None
        if timeout is not None:
            timer = loop.call_later(timeout, self._expire, wait, timeout)
        self._start()
        if self._live:
            self._read(task_id)
        # else: read once the subscription is acknowledged
        try:
            return await wait.future
        finally:
            if timer is not None:
                timer.cancel()
            self._remove(wait)

    async def result(self, task_id: str, timeout: Optional[float] = None) -> Any:
        """
        :meth:`wait`, then :func:`quebert.results.outcome`: the task's return
        value, or :class:`~quebert.errors.TaskFailed` /
        :class:`~quebert.errors.TaskCanceled`.
        """
        return outcome(await self.wait(task_id, timeout))

    async def close(self) -> None:
        """
        Stop the subscription and the reads; pending waits raise
        ``CancelledError``.  Later waits are refused.
        """
        self._closed = True
        for waits in list(self._waits.values()):
            for wait in waits:
                wait.future.cancel()
        self._waits.clear()
        self._pending.clear()
        self._reread_ids.clear()
        if self._reread_timer is not None:
            self._reread_timer.cancel()
            self._reread_timer = None
        tasks = [t for t in (self._runner, self._reader) if t is not None]
        self._runner = self._reader = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._live = False

    # -- the subscription ------------------------------------------------------

    def _start(self) -> None:
        if self._runner is None and not self._closed:
            self._ready = asyncio.Event()
            self._runner = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        """Subscribe, listen, and subscribe again whenever the subscription is lost."""
        delay = 0.0
        while True:
            pubsub = self.state.redis.pubsub()
            self._pubsub = pubsub
            was_live = self.subscriptions
            try:
                await pubsub.subscribe(self.channel)
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self.subscriptions > was_live:
                    log.info("quebert bridge: Redis subscription for task results lost (%s); "
                             "subscribing again", e)
                    delay = 0.0
                else:
                    log.warning("quebert bridge: cannot subscribe to %s for task results: "
                                "%s: %s", self.channel, type(e).__name__, e)
            finally:
                self._live = False
                self._pubsub = None
                try:
                    await pubsub.aclose()
                except Exception as e:
                    log.debug("closing a lost subscription failed: %s", e)
            delay = min(MAX_RECONNECT_DELAY, max(0.5, delay * 2))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _listen(self, pubsub: Any) -> None:
        """
        Hand messages over until the connection fails or goes silent.  A
        ``subscribe`` acknowledgement comes for the first SUBSCRIBE and
        again when redis-py reconnects on its own (its retries re-subscribe):
        either way everything waited for is read again.
        """
        loop = asyncio.get_running_loop()
        pinged: Optional[float] = None
        while True:
            if pinged is None:
                timeout = self.keepalive
            else:
                timeout = max(0.0, pinged + self.keepalive_timeout - loop.time())
            message = await pubsub.get_message(timeout=timeout)
            if message is None:
                if pinged is not None:
                    raise ConnectionError(
                        f"no answer to a PING within {self.keepalive_timeout:g} s")
                await pubsub.ping()
                pinged = loop.time()
                continue
            pinged = None
            kind = message.get("type")
            if kind == "message":
                self._settled(message.get("data"))
            elif kind == "subscribe":
                self._subscribed()

    def _subscribed(self) -> None:
        self._live = True
        self.subscriptions += 1
        if self._ready is not None:
            self._ready.set()
        for task_id in list(self._waits):
            self._read(task_id)

    def _settled(self, data: Any) -> None:
        if isinstance(data, bytes):
            data = data.decode("utf-8", "replace")
        if not isinstance(data, str):
            return
        waits = self._waits
        for task_id in data.split("\n"):
            if task_id in waits:
                self._read(task_id)

    # -- reading records -------------------------------------------------------

    def _read(self, task_id: str) -> None:
        """Read ``task_id``'s record in a batch begun after this call."""
        self._pending[task_id] = None
        if self._reader is None and not self._closed:
            self._reader = asyncio.ensure_future(self._read_pending())

    async def _read_pending(self) -> None:
        try:
            while self._pending:
                batch = [task_id for task_id in itertools.islice(self._pending, READ_BATCH)]
                for task_id in batch:
                    del self._pending[task_id]
                batch = [task_id for task_id in batch if task_id in self._waits]
                if not batch:
                    continue
                self._reads += 1
                number = self._reads
                try:
                    records = await self.state.get_many(batch)
                except Exception as e:
                    self._read_failed(batch, e)
                    continue
                for task_id, record in zip(batch, records):
                    self._got(task_id, record, number)
        finally:
            self._reader = None

    def _got(self, task_id: str, record: Optional[dict], number: int) -> None:
        waits = self._waits.get(task_id)
        if not waits:
            return
        if record is not None and record.get("state") in FINISHED_STATES:
            del self._waits[task_id]
            for wait in waits:
                if not wait.future.done():
                    wait.future.set_result(record)
            return
        for wait in list(waits):
            if wait.since >= number:
                continue  # this read began before the wait: it says nothing of it
            if record is None and not wait.read:
                waits.remove(wait)
                if not wait.future.done():
                    wait.future.set_exception(TaskNotFound(task_id))
                continue
            wait.read = True
            if record is not None:
                wait.last_state = record.get("state")
        if not waits:
            del self._waits[task_id]

    def _read_failed(self, batch: List[str], error: BaseException) -> None:
        log.warning("quebert bridge: could not read %d task(s) waited for (%s: %s); "
                    "reading them again in %g s", len(batch), type(error).__name__, error,
                    REREAD_DELAY)
        self._reread_ids.update(dict.fromkeys(batch))
        if self._reread_timer is None:
            self._reread_timer = asyncio.get_running_loop().call_later(
                REREAD_DELAY, self._reread)

    def _reread(self) -> None:
        self._reread_timer = None
        ids, self._reread_ids = self._reread_ids, {}
        # Not live: the next acknowledgement of the subscription reads them all.
        if self._live:
            for task_id in ids:
                if task_id in self._waits:
                    self._read(task_id)

    # -- ending waits ----------------------------------------------------------

    def _expire(self, wait: _Wait, timeout: float) -> None:
        if not wait.future.done():
            wait.future.set_exception(ResultTimeout(wait.task_id, timeout, wait.last_state))

    def _remove(self, wait: _Wait) -> None:
        waits = self._waits.get(wait.task_id)
        if waits and wait in waits:
            waits.remove(wait)
            if not waits:
                del self._waits[wait.task_id]
