# -*- test-case-name: tests.test_state -*-
"""
The state store in Redis, through txredisapi.

Layout (``{prefix}`` defaults to ``quebert:``):

``{prefix}task:{id}``
    a hash per task: the record's scalar fields as strings (numbers written
    with full precision), ``result``/``error``/``history`` as JSON, except
    that while the task has run one attempt, ``history`` is ``{}``: its one
    entry is what the record's fields say (earlier versions read ``{}`` as
    an empty history, so a rolling upgrade degrades, never fails).  Neither
    the id (it is in the key) nor ``finished_at`` (a finished record's
    ``updated_at``, which no later write changes) is stored.  The hash of
    a task run once then holds only short values, which Redis keeps as a
    listpack.  Records written with a JSON history are read and updated as
    they are.
``{prefix}idx:state:{state}``
    a sorted set per state of the ids of its records, scored by
    ``updated_at``: the one index a record is in.  Counts are their sizes;
    a list by state walks one, every other list the six merged (newest
    first), checking the queue or task name on each record; the finished
    states' indexes are also the expiry schedule, since their scores are
    finish times.

About 500 bytes a finished record: the hash and one index entry (half of
what the earlier layout took, which also indexed every id in
``{prefix}idx:all``, ``{prefix}idx:queue:{queue}`` and, once finished,
``{prefix}idx:expiry``).  Records that layout wrote leave those indexes
when they are next written or have expired (``prune_legacy`` in the
script), so an upgrade needs no migration.

Every writer is one Lua script, run with ``EVALSHA`` (``EVAL`` when the
server does not know it yet), so a record and its indexes change together
or not at all.  Writes are sent in batches, one script call each.
Finished records get ``PEXPIRE`` their outcome's retention
(:attr:`RedisStateManager.retention`); the batches also prune, in bounded
steps, the records whose retention has passed and their index entries
(once a second of write time, or every batch while some are left over).
Reads are scripts too: they return records as JSON text, which txredisapi
cannot mistake for numbers.

The scripts build keys from the prefix, so the store needs a single Redis
server (not a cluster).  Every error is raised as
:class:`quebert.errors.StateError`, and a call that gets no answer within
``timeout`` seconds fails too: with Redis gone a lazy txredisapi connection
would otherwise wait for a reconnection forever.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Sequence

import txredisapi
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from quebert._defer import bounded
from quebert.errors import ConfigurationError, StateError, TaskAlreadyExists
from quebert.state import _records, _redis_ops, _redis_wire

# connect_redis, parse_redis_url and the rest keep being importable from here
from quebert.state._redis_connect import (  # noqa: F401
    RECONNECT_MAX_DELAY,
    SENTINEL_DISCOVERY_TIMEOUT,
    SentinelHandler,
    _options_of,
    connect_redis,
)
from quebert.state._redis_ops import answers as _answers
from quebert.state._redis_ops import parse_redis_url  # noqa: F401
from quebert.state._redis_scripts import PRUNE_BATCH
from quebert.state._redis_scripts import SCRIPTS as _SCRIPTS
from quebert.state.interface import HISTORY_LIMIT, ISettledFeed, IStateManager

log = Logger(namespace="quebert.state.redis")

#: Index entries one ``find`` examines at most.
FIND_BUDGET = 10_000

#: Seconds of write time between two prunings, unless one left work undone.
PRUNE_INTERVAL = 1.0



#: While WAIT times out (no replica in step), batches skip it, and one
#: batch per this many seconds probes again.
WAIT_PROBE_INTERVAL = 5.0

#: The probe's WAIT timeout, in seconds, at most.
WAIT_PROBE_TIMEOUT = 0.05

#: Writes sent in one script call at most; more are split into several.
MAX_BATCH = 500

#: Batches on their way at most; later writes wait for one to be answered
#: and then go together, so that the busier the store, the larger (and
#: cheaper per write) the batches.
MAX_SENDING = 1

#: ... except that a ``started`` write, which its task waits for, does not
#: wait behind a batch of others: a batch holding one goes while fewer
#: than this many are on their way.  (One connection, so Redis still
#: applies the batches in the order they were sent.)
MAX_SENDING_STARTED = 2

#: Seconds a batch of nothing but outcomes (``finished`` writes) waits for
#: company before it goes.  Nobody is waiting on an outcome but its ack,
#: so at paced rates the outcome of one task rides in the script call that
#: starts the next one (which goes at the end of its reactor turn, taking
#: every write queued so far): one Redis round trip, one write and one
#: wake-up a task instead of two, which is most of what Redis state costs
#: a worker between bursts.  Under load nothing changes (batches are full
#: and a ``started`` write is always due); an idle worker's last outcome
#: is written this much later.
SETTLE_LINGER = 0.002

_json = _redis_ops.json_encode
_float_repr = float.__repr__


def _is_noscript(error: BaseException) -> bool:
    return isinstance(error, txredisapi.ScriptDoesNotExist) or (
        isinstance(error, txredisapi.ResponseError) and str(error).startswith("NOSCRIPT")
    )


@implementer(IStateManager, ISettledFeed)
class RedisStateManager:
    """
    :class:`IStateManager` in Redis.

    :param redis: a txredisapi connection, lazy connection or pool (see
        :func:`connect_redis`).
    :param prefix: prefix of every key, so that several deployments (or
        test runs) can share a database.
    :param finished_ttl: seconds a finished record is kept (0: forever),
        whatever its outcome; ``None``: ``DEFAULT_RETENTION`` (succeeded
        records an hour, failed and canceled ones a week).
    :param retention: seconds by outcome (``succeeded``, ``failed``,
        ``canceled``) that differ from that: see :attr:`retention`.  The
        retention a record gets is the one of whoever writes its outcome
        (workers, or a cancel through the CLI or the API): give them the
        same.
    :param timeout: seconds to wait for an answer before failing with
        :class:`StateError` (``None``: wait forever).
    :param clock: ``IReactorTime`` for the timeout; the global reactor when
        ``None``.
    :param wait_replicas: replicas that must acknowledge a batch of writes
        that settle tasks (every write but ``started``) before its callers
        are answered: ``WAIT wait_replicas wait_timeout`` on the same
        connection, one per batch.  ``None``: what the connection says
        (:func:`connect_redis` with a ``redis+sentinel://`` URL: its
        ``wait`` option, 1 by default; otherwise 0, no ``WAIT``).
    :param wait_timeout: seconds ``WAIT`` may take (``None``: the
        connection's, or 0.5).

    A ``WAIT`` that times out does not fail the writes (they are on the
    primary; failing them would stop the state store whenever the replica
    is down): it is logged, counted in ``wait_timeouts``, and later batches
    skip ``WAIT`` except for a short probe every ``WAIT_PROBE_INTERVAL``
    seconds, until one is acknowledged again.  When the connection was
    re-established between a batch and its ``WAIT`` (a failover: the batch
    may have been on the lost primary only), the batch fails with
    :class:`StateError`, so that :class:`ResilientStateManager` writes it
    again to the new primary.
    """

    def __init__(
        self,
        redis: Any,
        prefix: str = "quebert:",
        finished_ttl: Optional[float] = None,
        *,
        timeout: Optional[float] = 5.0,
        clock: Optional[IReactorTime] = None,
        name_tombstone: float = 3600,
        wait_replicas: Optional[int] = None,
        wait_timeout: Optional[float] = None,
        retention: Optional[Mapping[str, float]] = None,
    ) -> None:
        try:
            kept = _records.retention(finished_ttl, retention)
        except ValueError as e:
            raise ConfigurationError(str(e)) from None
        if timeout is not None and timeout <= 0:
            raise ConfigurationError(f"timeout must be > 0 seconds or None, not {timeout!r}")
        self.redis = redis
        self.prefix = prefix
        #: The longest retention (0: some outcome is kept forever).
        self.finished_ttl = _records.longest(kept)
        self.timeout = timeout
        self._clock = clock
        if name_tombstone < 0:
            raise ConfigurationError(
                f"name_tombstone must be >= 0 seconds, not {name_tombstone!r}")
        self.name_tombstone = name_tombstone
        #: Seconds a finished record is kept, by outcome (0: forever).
        self.retention: Dict[str, float] = kept
        self._ttl_ms = ",".join(
            str(max(1, round(kept[state] * 1000)) if kept[state] > 0 else 0)
            for state in ("succeeded", "failed", "canceled"))
        self._tombstone_ms = str(max(1, round(name_tombstone * 1000)))
        self._batch: List[list] = []
        self._waiters: List[Any] = []
        self._starts = False  # the batch holds a ``started`` write
        self._flush_call: Any = None
        self._lingering = False  # _flush_call waits SETTLE_LINGER (outcomes only)
        self._sending = 0  # batches sent and not answered yet
        self._held_since: Optional[float] = None  # first write held behind them
        self._pruned_at: Optional[float] = None  # write time of the last pruning
        self._prune_more = False  # it left expired entries
        if wait_replicas is None:
            wait_replicas = redis.wait_replicas if isinstance(redis, SentinelHandler) else 0
        if wait_timeout is None:
            wait_timeout = (redis.wait_timeout if isinstance(redis, SentinelHandler)
                            else _redis_ops.DEFAULT_WAIT_TIMEOUT)
        if wait_replicas < 0:
            raise ConfigurationError(f"wait_replicas must be >= 0, not {wait_replicas!r}")
        if not wait_timeout > 0:
            raise ConfigurationError(f"wait_timeout must be > 0 seconds, not {wait_timeout!r}")
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        options = _options_of(redis)
        #: The pub/sub channel told the ids of the tasks each batch settled
        #: (Redis channels are server-wide: the database is in the name).
        self.settled_channel = settled_channel_name(
            prefix, options["db"] if options else None)
        self._subscription: Any = None
        #: WAITs that got fewer acknowledgements than ``wait_replicas``.
        self.wait_timeouts = 0
        self._wait_degraded = False  # the last WAIT timed out
        self._wait_probed_at = 0.0  # when a degraded store last tried WAIT
        self._sender: Optional[_redis_wire.Sender] = None
        self._apply_call = _redis_wire.PreparedCall(
            ["EVALSHA", _SCRIPTS["apply"].sha, "0", prefix, self._ttl_ms, str(HISTORY_LIMIT)],
            [self._tombstone_ms, self.settled_channel])

    # -- IStateManager --------------------------------------------------

    def enqueued(self, task_id: str, state: str, info: Mapping[str, Any], at: float) -> Deferred:
        """Create the record of a task just published, unless it exists."""
        try:
            op = self._op_enqueued(task_id, state, info, at)
        except Exception:
            return fail()
        return self._submit(op)

    def started(
        self, task_id: str, attempt: int, worker: str, info: Mapping[str, Any], at: float
    ) -> Deferred:
        """Record that attempt ``attempt`` of the task starts on ``worker``."""
        try:
            op = self._op_started(task_id, attempt, worker, info, at)
        except Exception:
            return fail()
        return self._submit(op)

    def claim(self, task_id: str, state: str, info: Mapping[str, Any], at: float) -> Deferred:
        """
        ``enqueued`` for a task with a unique name (``info["name"]``): fails
        with :class:`TaskAlreadyExists` when another task holds the name.
        """
        try:
            op = self._op_claim(task_id, state, info, at)
        except Exception:
            return fail()
        name = info["name"]

        def check(answer: Any) -> None:
            if isinstance(answer, str) and answer.startswith("held:"):
                raise TaskAlreadyExists(name, answer[5:])

        return self._submit(op).addCallback(check)

    def release_name(self, task_id: str, name: str, at: float) -> Deferred:
        """Free ``name`` if ``task_id`` holds it (its publish failed)."""
        try:
            op = self._op_release(task_id, name, at)
        except Exception:
            return fail()
        return self._submit(op).addCallback(lambda _: None)

    def cancel(self, task_id: str, at: float, reason: Optional[str] = None) -> Deferred:
        """
        Cancel a task: fires with the state it was in (``None`` when there
        is no record).  ``queued``/``scheduled`` become ``canceled``; a
        ``running`` task is marked, and whatever records its attempt next
        ends it ``canceled``; a finished task is left alone.
        """
        try:
            op = self._op_cancel(task_id, at, reason)
        except Exception:
            return fail()
        return self._submit(op).addCallback(lambda old: None if old == "missing" else old)

    def requeued(self, task_id: str, at: float) -> Deferred:
        """
        A ``failed`` task was put back in its queue: it becomes ``queued``
        again (attempts and history kept).  Fires with the state it was in
        (``None``: no record); only a failed task is changed.
        """
        try:
            op = _redis_ops.op_requeued(task_id, at)
        except Exception:
            return fail()
        return self._submit(op).addCallback(lambda old: None if old == "missing" else old)

    def set_paused(self, queue: str, paused: bool) -> Deferred:
        """Remember that ``queue`` is paused (or not) for every worker, even later ones."""
        try:
            _records.check_task_id(queue)
            op = ["p" if paused else "u", queue,
                  _float_repr(float(self._get_clock().seconds()))]
        except Exception:
            return fail()
        return self._submit(op).addCallback(lambda _: None)

    def find(self, task: str, state: Optional[str] = None, queue: Optional[str] = None,
             limit: int = 100, position: int = 0, budget: int = FIND_BUDGET) -> Deferred:
        """
        Fire with ``(records, next_position)``: up to ``limit`` records of
        task ``task`` (optionally also in ``state``/``queue``), most recently
        updated first, from ``position`` in the index walked; at most
        ``budget`` index entries are examined per call, so that a rare name
        among many records costs Redis a bounded time.  ``next_position`` is
        where to go on from, ``None`` at the end.
        """
        try:
            _records.check_list(state, queue, limit, position)
            if not isinstance(task, str) or not task:
                raise ValueError(f"task must be a non-empty str, not {task!r}")
        except Exception:
            return fail()
        args = [self.prefix, task, state or "", queue or "", str(position), str(limit),
                str(max(1, budget))]

        def decode(reply: Any) -> Any:
            position = int(reply[0])
            return ([self._decode(text) for text in reply[1:]],
                    None if position < 0 else position)

        return self._run("find", args).addCallback(decode)

    def worker_beat(self, worker: str, ttl: float,
                    description: Optional[Mapping[str, Any]] = None) -> Deferred:
        """
        ``worker`` is alive for ``ttl`` more seconds (0: it is gone);
        ``description`` is what the console shows of it (JSON-ready).
        """
        ms = str(max(1, round(ttl * 1000))) if ttl > 0 else "0"
        args = [self.prefix, worker, ms]
        if description is not None and ttl > 0:
            try:
                args.append(json.dumps(description, separators=(",", ":"), allow_nan=False))
            except Exception:
                return fail()
        return self._run("worker_beat", args).addCallback(lambda _: None)

    def workers(self) -> Deferred:
        """
        Fire with the live workers, by id: each beat's ``description``
        (``{}`` for a worker that sent none) with ``expires_in``, the
        seconds its last beat still lasts.
        """
        def decode(flat: Any) -> Dict[str, Any]:
            found: Dict[str, Any] = {}
            for i in range(0, len(flat or ()) - 2, 3):
                worker, raw, left = (_text(v) for v in flat[i:i + 3])
                try:
                    description = json.loads(raw) if raw != "1" else {}
                except ValueError:
                    description = {}
                if not isinstance(description, dict):
                    description = {}
                description["expires_in"] = max(int(left), 0) / 1000.0
                found[worker] = description
            return found

        return self._run("workers", [self.prefix]).addCallback(decode)

    def counts(self) -> Deferred:
        """Fire with ``{state: number of records}`` (expired ones until pruned included)."""
        from quebert.state.interface import STATES

        return self._run("counts", [self.prefix, *STATES]).addCallback(
            lambda numbers: dict(zip(STATES, (int(n) for n in numbers))))

    def worker_alive(self, worker: str) -> Deferred:
        """Fire with the seconds ``worker``'s last beat still lasts (0: it is gone)."""
        return self._run("worker_alive", [self.prefix, worker]).addCallback(
            lambda ms: max(int(ms), 0) / 1000.0)

    def paused_queues(self) -> Deferred:
        """Fire with the set of paused queue names."""
        return self._run("paused", [self.prefix]).addCallback(
            lambda names: {n.decode() if isinstance(n, bytes) else str(n) for n in names or ()})

    def finished(
        self,
        task_id: str,
        state: str,
        attempt: int,
        info: Mapping[str, Any],
        at: float,
        result: Any = None,
        error: Optional[Mapping[str, Any]] = None,
        reason: Optional[str] = None,
        retry_at: Optional[float] = None,
    ) -> Deferred:
        """Record the outcome of attempt ``attempt``."""
        try:
            op = self._op_finished(task_id, state, attempt, info, at, result, error, reason,
                                   retry_at)
        except Exception:
            return fail()
        return self._submit(op)

    def get(self, task_id: str) -> Deferred:
        """Fire with the record, or ``None``."""
        try:
            _records.check_task_id(task_id)
        except Exception:
            return fail()
        return self._run("get", [self.prefix, task_id]).addCallback(self._decode)

    def list(
        self,
        state: Optional[str] = None,
        queue: Optional[str] = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Deferred:
        """
        Fire with up to ``limit`` records, most recently updated first.

        With one filter (or none) the page starts at rank ``offset`` of the
        index; ids of expired records met on the way are skipped and
        removed, so a page may start a little later than it would have once
        they are gone.  With both filters, the smaller of the two indexes is
        walked and the other attribute checked on each record.
        """
        try:
            _records.check_list(state, queue, limit, offset)
        except Exception:
            return fail()
        args = [self.prefix, state or "", queue or "", str(offset), str(limit)]
        return self._run("list", args).addCallback(
            lambda found: [self._decode(text) for text in found or ()]
        )

    # -- ISettledFeed ---------------------------------------------------

    def watch_settled(self, on_settled: Any, on_subscribed: Any) -> Any:
        """
        Subscribe to :attr:`settled_channel` on a connection of its own
        (:class:`~quebert.state._redis_pubsub.SettledSubscription`), which
        follows reconnections and Sentinel failovers.

        :raises ConfigurationError: the store's connection was not made by
            :func:`connect_redis`, so there is no URL to subscribe with.
        """
        options = _options_of(self.redis)
        if options is None:
            raise ConfigurationError(
                "waiting for task results needs a Redis connection made by "
                "quebert.state.redis.connect_redis (its URL is used for the subscription)")
        from quebert.state._redis_pubsub import SettledSubscription

        watch = SettledSubscription(options, self.settled_channel, on_settled, on_subscribed,
                                    reactor=self._clock)
        watch.start()
        return watch

    # -- implementation -------------------------------------------------

    # The writes as script operations (see quebert.state._redis_ops, which
    # the Guillotina bridge uses too).  ResilientStateManager keeps these
    # rather than the arguments, and hands them to _submit().
    _op_enqueued = staticmethod(_redis_ops.op_enqueued)
    _op_claim = staticmethod(_redis_ops.op_claim)
    _op_release = staticmethod(_redis_ops.op_release)
    _op_cancel = staticmethod(_redis_ops.op_cancel)
    _op_started = staticmethod(_redis_ops.op_started)
    _op_finished = staticmethod(_redis_ops.op_finished)

    def _submit(self, op: list, waiter: Any = None, linger: bool = True) -> Any:
        """
        Queue one write for the next batch, which is sent at the end of
        this reactor turn or, while a batch is on its way, as soon as that
        one is answered: one script call then carries every write made in
        the meantime (in order, atomically), which costs Redis and this
        process far less than one call each, and adds no round trip.

        ``waiter`` gets ``callback(None)`` or ``errback(failure)`` once the
        batch is applied; by default a new ``Deferred``, which is returned.
        ``linger``: an outcome may wait ``SETTLE_LINGER`` for company (not
        when replaying writes one at a time, see ResilientStateManager).
        """
        if waiter is None:
            waiter = Deferred()
        self._batch.append(op)
        self._waiters.append(waiter)
        if len(self._batch) >= MAX_BATCH:
            self._flush()
        elif self._sending >= (MAX_SENDING_STARTED if op[0] == "s" or self._starts
                               else MAX_SENDING):
            if self._held_since is None:
                self._held_since = self._get_clock().seconds()
        elif self._flush_call is None:
            self._lingering = linger and op[0] == "f"
            self._flush_call = self._get_clock().callLater(
                SETTLE_LINGER if self._lingering else 0, self._flush)
        elif self._lingering and (op[0] != "f" or not linger):
            self._lingering = False
            self._flush_call.reset(0)
        if op[0] == "s":
            self._starts = True
        return waiter

    def _flush(self) -> None:
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        self._lingering = False
        ops, waiters = self._batch, self._waiters
        self._batch, self._waiters = [], []
        self._starts = False
        held_since, self._held_since = self._held_since, None
        if not ops:
            return
        timeout = self.timeout
        if held_since is not None and timeout is not None:
            # the writes have waited already: their timeout runs from submission
            timeout -= self._get_clock().seconds() - held_since
            if timeout <= 0:
                self._not_applied(Failure(StateError(
                    f"Redis did not answer apply within {self.timeout} seconds")), waiters)
                return
        try:
            payload = _json(ops)
        except Exception:
            # One bad write must not sink the others: send them one by one.
            for op, waiter in zip(ops, waiters):
                self._send([op]).addCallbacks(waiter.callback, waiter.errback)
            return
        latest = float(ops[-1][2])
        prune = (self._prune_more or self._pruned_at is None
                 or abs(latest - self._pruned_at) >= PRUNE_INTERVAL)
        if prune:
            self._pruned_at = latest
        self._sending += 1
        d = self._apply(payload, prune, timeout)
        if self.wait_replicas:
            wait_ms = self._wait_ms(ops)
            if wait_ms:
                # a task waiting for its started write does not wait for the
                # replicas too (started writes never do), whatever rides along
                d.addCallback(self._started_applied, ops, waiters)
                d.addCallback(self._replicate, wait_ms)
        d.addCallbacks(self._applied, self._not_applied, callbackArgs=(waiters, prune),
                       errbackArgs=(waiters,))
        d.addBoth(self._sent)

    def _apply(self, payload: str, prune: bool, timeout: Optional[float]) -> Deferred:
        """
        Run the ``apply`` script on the batch ``payload``: written straight
        to the connection when it is up (see :mod:`._redis_wire`), else
        through txredisapi, which waits for it.
        """
        protocol = _redis_wire.connected(self.redis)
        if protocol is None:
            return self._run("apply", self._apply_args(payload, prune), timeout)
        if self._sender is None:
            self._sender = _redis_wire.Sender(self._get_clock())
        d = self._sender.send(protocol, self._apply_call.command(payload, prune))
        d.addCallback(self._apply_reply, payload, prune)
        return self._bounded(d, "apply", timeout).addErrback(self._translate, "apply")

    def _apply_args(self, payload: str, prune: bool) -> List[str]:
        return [self.prefix, self._ttl_ms, str(HISTORY_LIMIT), payload, "1" if prune else "0",
                self._tombstone_ms, self.settled_channel]

    def _apply_reply(self, reply: Any, payload: str, prune: bool) -> Any:
        if isinstance(reply, Exception):
            if _is_noscript(reply):
                # not loaded (a new or restarted Redis): nothing was applied
                return self.redis.eval(_SCRIPTS["apply"].source, [],
                                       self._apply_args(payload, prune))
            raise reply
        return reply

    def _generation(self) -> Optional[int]:
        """Connections the Sentinel handler has made so far (``None``: not known)."""
        if isinstance(self.redis, SentinelHandler):
            return self.redis.generation
        return None

    def _wait_ms(self, ops: List[list]) -> int:
        """
        The ``WAIT`` timeout for a batch, in ms; 0 for no ``WAIT``: the
        batch holds only ``started`` writes (nothing settles on them), or
        ``WAIT`` keeps timing out and the next probe is not due.
        """
        for op in ops:
            if op[0] != "s":
                break
        else:
            return 0
        timeout = self.wait_timeout
        if self._wait_degraded:
            now = self._get_clock().seconds()
            if now - self._wait_probed_at < WAIT_PROBE_INTERVAL:
                return 0
            self._wait_probed_at = now
            timeout = min(timeout, WAIT_PROBE_TIMEOUT)
        return max(1, round(timeout * 1000))

    def _replicate(self, reply: Any, wait_ms: int) -> Deferred:
        """
        ``WAIT`` for the batch just applied (answered ``reply``, which is
        then the batch's result), unless the connection that answered was
        replaced before ``WAIT`` was answered: ``WAIT`` counts the writes of
        its own connection only, so it would vouch for nothing.
        """
        generation = self._generation()  # the connection that answered apply
        try:
            d = self.redis.execute_command("WAIT", str(self.wait_replicas), str(wait_ms))
        except Exception:
            d = fail()
        timeout = (self.timeout + wait_ms / 1000) if self.timeout is not None else None
        d = self._bounded(d, "WAIT", timeout).addErrback(self._translate, "WAIT")

        def waited(acknowledged: Any) -> Any:
            if generation is not None and self._generation() != generation:
                raise StateError(
                    "the Redis connection was re-established between a write and its WAIT"
                    " (a failover?): the write may be lost with the old primary")
            if int(acknowledged) >= self.wait_replicas:
                if self._wait_degraded:
                    self._wait_degraded = False
                    log.info("Redis replicas acknowledge state writes again")
                return reply
            self.wait_timeouts += 1
            if not self._wait_degraded:
                self._wait_degraded = True
                self._wait_probed_at = self._get_clock().seconds()
                log.warn(
                    "Redis WAIT: {acknowledged} of {wanted} replicas acknowledged state writes"
                    " within {ms} ms; they are on the primary only, and would be lost if it"
                    " failed now.  Writes no longer wait for replicas until one answers a"
                    " probe (every {interval:g} s)",
                    acknowledged=int(acknowledged), wanted=self.wait_replicas, ms=wait_ms,
                    interval=WAIT_PROBE_INTERVAL)
            return reply

        return d.addCallback(waited)

    def _sent(self, _: Any) -> None:
        """A batch is answered (or timed out): send the writes held meanwhile."""
        self._sending -= 1
        if self._batch and self._sending < (MAX_SENDING_STARTED if self._starts
                                            else MAX_SENDING):
            self._flush()

    def _send(self, ops: list) -> Deferred:
        try:
            payload = _json(ops)
        except Exception:
            return fail()
        return self._run("apply", self._apply_args(payload, False)).addCallback(
            lambda reply: _answers(reply).get(1))

    @staticmethod
    def _started_applied(results: Any, ops: List[list], waiters: List[Any]) -> Any:
        """Answer the batch's ``started`` writes now; their places in ``waiters`` become None."""
        answers = None
        for position, op in enumerate(ops):
            if op[0] == "s" and waiters[position] is not None:
                if answers is None:
                    answers = _answers(results)
                waiter, waiters[position] = waiters[position], None
                _answer(waiter, answers.get(position + 1) if answers else None)
        return results

    def _applied(self, results: Any, waiters: List[Any], pruned: bool = False) -> None:
        answers = _answers(results)
        if pruned:
            # a full step of pruning: there may be more, go on with the next batch
            try:
                examined = results if isinstance(results, int) else results[0]
                self._prune_more = int(examined) >= PRUNE_BATCH
            except Exception:
                self._prune_more = False
        for position, waiter in enumerate(waiters, 1):
            if waiter is not None:  # (None: answered already, _started_applied)
                _answer(waiter, answers.get(position) if answers else None)

    @staticmethod
    def _not_applied(failure: Failure, waiters: List[Any]) -> None:
        for waiter in waiters:
            if waiter is None:
                continue  # answered already (_started_applied)
            try:
                waiter.errback(Failure(failure.value, failure.type, failure.tb))
            except Exception:
                log.failure("state write errback failed")

    def _get_clock(self) -> Any:
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor  # type: ignore[assignment]
        return self._clock

    @staticmethod
    def _decode(text: Optional[str]) -> Optional[Dict[str, Any]]:
        if text is None:
            return None
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return _records.decode_record(json.loads(text))

    def _run(self, name: str, args: Sequence[str], timeout: Optional[float] = None) -> Deferred:
        """
        Run a script: ``EVALSHA``, ``EVAL`` on ``NOSCRIPT``, errors as
        ``StateError``, ``timeout`` (by default ``self.timeout``) bounding it.
        """
        script = _SCRIPTS[name]

        def noscript(failure: Failure) -> Any:
            if _is_noscript(failure.value):
                return self.redis.eval(script.source, [], list(args))
            return failure

        try:
            d = self.redis.evalsha(script.sha, [], list(args))
        except Exception:
            d = fail()
        d.addErrback(noscript)
        return self._bounded(d, name, timeout).addErrback(self._translate, name)

    def _bounded(self, d: Deferred, name: str, timeout: Optional[float] = None) -> Deferred:
        """
        ``d``'s result, or a ``StateError`` after ``timeout`` seconds.

        ``d`` itself is never cancelled: txredisapi cannot take back a
        command waiting for a connection (its queue would later fire the
        cancelled Deferred again).  A late answer is dropped.
        """
        if self.timeout is None:
            return d
        if timeout is None:
            timeout = self.timeout
        return bounded(d, timeout, self._get_clock(), lambda: StateError(
            f"Redis did not answer {name} within {self.timeout} seconds"))

    @staticmethod
    def _translate(failure: Failure, name: str) -> Failure:
        if failure.check(StateError, CancelledError):
            return failure
        error = failure.value
        raise StateError(f"Redis {name} failed: {type(error).__name__}: {error}") from error


def _answer(waiter: Any, value: Any) -> None:
    """Fire one write's waiter; a caller's failing callback is logged, not spread."""
    try:
        waiter.callback(value)
    except Exception:
        log.failure("state write callback failed")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def settled_channel_name(prefix: str, db: Optional[int]) -> str:
    """The channel a store with ``prefix`` in database ``db`` publishes settled ids to."""
    return f"{prefix}settled:{db or 0}"
