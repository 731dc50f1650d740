# -*- test-case-name: tests.test_bridge_guillotina_live -*-
"""
quebert's Redis state store, from asyncio (redis-py's ``redis.asyncio``).

Records are read and written with the state store's own Lua scripts
(:mod:`quebert.state._redis_scripts`), fed with the operations
:class:`~quebert.state.redis.RedisStateManager` builds
(:mod:`quebert.state._redis_ops`, which needs no txredisapi), so the bridge
cannot drift from the layout the workers use: ``enqueued`` records a task
``queued``/``scheduled`` as quebert's ``Client`` does, ``claim`` takes a
unique name, ``cancel`` is the same atomic write as ``Client.cancel``'s.
Each write names the settled channel (``{prefix}settled:{db}``), to which
the script publishes the ids of the tasks it finished, so that a cancel
from Guillotina wakes whoever waits for that task (``results.py``, and
quebert's ``Client.result`` elsewhere).

The bridge keeps two things of its own, under the same prefix:

``{prefix}guillotina:container:{db_id}/{container_id}``
    a sorted set of the ids of the tasks published from that container,
    scored by publish time.  It decides which tasks a container's
    ``@amqp-tasks`` endpoints show: a task id is never trusted to say
    where it belongs.  Entries older than the state TTL whose record has
    expired are dropped as new tasks are added, a batch at a time
    (``{prefix}guillotina:prune:{db_id}/{container_id}`` remembers where
    the last batch stopped); listing skips ids whose record is gone.
``{prefix}guillotina:job:{task_id}``
    the task's message as JSON (function and arguments, or the request of
    a URL task, and the context), shown to holders of
    ``guillotina.DebugAMQP`` as guillotina_amqp's ``job_data`` was.  It
    expires with the record.  It never holds credentials: the message
    never does.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

from quebert.errors import StateError, TaskAlreadyExists
from quebert.protocol import TaskMessage
from quebert.state import _records, _redis_ops
from quebert.state._redis_scripts import SCRIPTS
from quebert.state.interface import FAILED, HISTORY_LIMIT

#: Ids a container's listing returns at most (newest first).
LIST_LIMIT = 1000
#: Old index entries examined for expiry each time a task is added.
PRUNE_BATCH = 100

# ARGV: index key, task key prefix, id, score, horizon ('' : never prune),
# job key, job JSON, job ttl in ms ('0': no expiry), prune cursor key.
# Each call examines the next PRUNE_BATCH entries older than the horizon,
# from the score the previous call stopped at (the cursor), and starts
# again from the oldest once it reached the horizon: entries that still
# have a record (a task queued for a queue nobody reads, a long countdown)
# never hide the expired ones behind them.
_INDEX_ADD = """
local index, cursor_key = ARGV[1], ARGV[9]
redis.call('ZADD', index, ARGV[4], ARGV[3])
if ARGV[8] == '0' then
  redis.call('SET', ARGV[6], ARGV[7])
else
  redis.call('SET', ARGV[6], ARGV[7], 'PX', ARGV[8])
end
if ARGV[5] == '' then return 0 end
local from = redis.call('GET', cursor_key)
from = from and ('(' .. from) or '-inf'
local old = redis.call('ZRANGEBYSCORE', index, from, '(' .. ARGV[5], 'WITHSCORES',
                       'LIMIT', 0, __BATCH__)
local dropped, last = 0, nil
for i = 1, #old, 2 do
  local id = old[i]
  last = old[i + 1]
  if redis.call('EXISTS', ARGV[2] .. id) == 0 then
    redis.call('ZREM', index, id)
    dropped = dropped + 1
  end
end
if #old < 2 * __BATCH__ then
  redis.call('DEL', cursor_key)
else
  redis.call('SET', cursor_key, last, 'PX', ARGV[10])
end
return dropped
""".replace("__BATCH__", str(PRUNE_BATCH))

# ARGV: index key, task key prefix, limit.  Ids newest first, skipping those
# whose record is gone (never removed here: a task's index entry is written
# before its record, and a listing must not race it).
_INDEX_LIST = """
local index, task_prefix, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out, pos = {}, 0
while #out < limit do
  local ids = redis.call('ZREVRANGE', index, pos, pos + 199)
  if #ids == 0 then break end
  pos = pos + #ids
  for _, id in ipairs(ids) do
    if redis.call('EXISTS', task_prefix .. id) == 1 then
      out[#out + 1] = id
      if #out == limit then break end
    end
  end
end
return out
"""


def settled_channel_name(prefix: str, db: Optional[int]) -> str:
    """
    The channel the state store with ``prefix`` in database ``db`` publishes
    settled task ids to: :func:`quebert.state.redis.settled_channel_name`'s
    name (Redis channels are server-wide, so the database is in it), written
    again here because importing :mod:`quebert.state.redis` installs a
    Twisted reactor, which a Guillotina process must not have.
    """
    return f"{prefix}settled:{db or 0}"


def container_key(db_id: str, container_id: str) -> str:
    """What names a container in the bridge's keys: ``{db_id}/{container_id}``."""
    return f"{db_id}/{container_id}"


class BridgeState:
    """
    The state store, as the bridge uses it.

    :param redis: a ``redis.asyncio.Redis`` client with ``decode_responses=True``.
    :param prefix: the workers' state prefix (``--state-prefix``).
    :param finished_ttl: seconds finished records are kept (0: forever),
        whatever their outcome; ``None``: the defaults by outcome.
    :param retention: seconds by outcome that differ from that (the
        workers' ``state.retention``).
    :param name_tombstone: seconds a unique name stays taken after its task finished.
    """

    def __init__(self, redis: Any, prefix: str = "quebert:",
                 finished_ttl: Optional[float] = None, name_tombstone: float = 3600,
                 retention: Optional[Mapping[str, float]] = None) -> None:
        self.redis = redis
        self.prefix = prefix
        kept = _records.retention(finished_ttl, retention)
        #: The longest retention (0: some outcome is kept forever).
        self.finished_ttl = _records.longest(kept)
        self._ttl_ms = ",".join(
            str(max(1, round(kept[state] * 1000)) if kept[state] > 0 else 0)
            for state in ("succeeded", "failed", "canceled"))
        self._longest_ms = str(max(1, round(self.finished_ttl * 1000))
                               if self.finished_ttl > 0 else 0)
        self._tombstone_ms = str(max(1, round(name_tombstone * 1000)))
        self._apply = redis.register_script(SCRIPTS["apply"].source)
        self._get = redis.register_script(SCRIPTS["get"].source)
        self._index_add = redis.register_script(_INDEX_ADD)
        self._index_list = redis.register_script(_INDEX_LIST)
        self._sentinel: Any = None  # from_url with a Sentinel URL: closed with the store
        #: The pub/sub channel the ``apply`` script tells which tasks a write
        #: settled: the workers' writes and the bridge's own (a cancel) alike,
        #: so that :mod:`~quebert.bridge.guillotina.results` hears of both.
        pool = getattr(redis, "connection_pool", None)  # none on a stand-in client
        self.settled_channel = settled_channel_name(
            prefix, pool.connection_kwargs.get("db") if pool is not None else None)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> BridgeState:
        """
        A store on a new ``redis.asyncio`` client for ``url``: a Redis URL as
        the workers take it, ``redis+sentinel://`` included (redis-py's
        ``Sentinel(...).master_for(service)``, which asks the sentinels for
        the primary on every new connection).  The bridge does not ``WAIT``
        for replicas: what it writes (a task's first record) the worker that
        runs the task writes again.
        """
        import redis.asyncio

        parsed = _redis_ops.parse_redis_url(url)
        if not parsed.get("sentinels"):
            return cls(redis.asyncio.from_url(url, decode_responses=True), **options)
        from redis.asyncio.sentinel import Sentinel

        sentinel = Sentinel(
            parsed["sentinels"],
            sentinel_kwargs={"password": parsed["sentinel_password"], "socket_timeout": 5.0},
            socket_timeout=30.0, socket_connect_timeout=5.0)
        client = sentinel.master_for(
            parsed["service"], db=parsed["db"], username=parsed["username"],
            password=parsed["password"], decode_responses=True)
        state = cls(client, **options)
        state._sentinel = sentinel
        return state

    async def close(self) -> None:
        """Close the client (and, through Sentinel, the sentinels' clients)."""
        await self.redis.aclose()
        sentinel, self._sentinel = self._sentinel, None
        if sentinel is not None:
            for client in sentinel.sentinels:
                await client.aclose()

    # -- quebert's records --------------------------------------------------

    async def _run(self, script: Any, args: list, what: str) -> Any:
        try:
            return await script(keys=[], args=args)
        except Exception as e:
            raise StateError(f"Redis {what} failed: {type(e).__name__}: {e}") from e

    async def _write(self, ops: list, what: str) -> dict:
        """Apply ``ops`` in one atomic script call; ``{position: answer}``."""
        reply = await self._run(self._apply, [
            self.prefix, self._ttl_ms, str(HISTORY_LIMIT),
            json.dumps(ops, separators=(",", ":"), allow_nan=False), "0", self._tombstone_ms,
            self.settled_channel,
        ], what)
        return _redis_ops.answers(reply)

    async def enqueued(self, message: TaskMessage, state: str, at: float) -> None:
        """Record a task just published as ``state`` (queued or scheduled), unless it exists."""
        await self._write([_redis_ops.op_enqueued(
            message.id, state, _records.info_with_arguments(message), at)], "enqueued")

    async def claim(self, message: TaskMessage, state: str, at: float) -> None:
        """``enqueued`` for a named task: :class:`TaskAlreadyExists` when the name is taken."""
        answers = await self._write([_redis_ops.op_claim(
            message.id, state, _records.info_with_arguments(message), at)], "claim")
        answer = answers.get(1)
        if answer and answer.startswith("held:"):
            raise TaskAlreadyExists(message.name, answer[5:])

    async def unclaim(self, message: TaskMessage, at: float, reason: str) -> None:
        """The publish of a named task failed: record it ``failed`` and free its name."""
        await self._write([
            _redis_ops.op_finished(message.id, FAILED, 0, message.info(), at, reason=reason),
            _redis_ops.op_release(message.id, message.name, at),
        ], "unclaim")

    async def cancel(self, task_id: str, at: float, reason: str) -> Optional[str]:
        """
        The state store's cancel: the state the task was in (``None``: no
        record); a queued or scheduled task becomes ``canceled``, a running
        one is marked for its worker.
        """
        answers = await self._write([_redis_ops.op_cancel(task_id, at, reason)], "cancel")
        old = answers.get(1)
        return None if old in (None, "missing") else old

    async def get(self, task_id: str) -> Optional[dict]:
        """The task's record, as ``quebert status`` shows it; ``None`` when there is none."""
        _records.check_task_id(task_id)
        text = await self._run(self._get, [self.prefix, task_id], "get")
        if text is None:
            return None
        return _records.decode_record(json.loads(text))

    async def get_many(self, task_ids: list) -> list:
        """
        The records of ``task_ids`` (``None`` for those without one), in
        order: :meth:`get` for many ids in one round trip (a pipeline), so
        that thousands of waits settling together cost a few requests on one
        connection rather than a connection each.
        """
        for task_id in task_ids:
            _records.check_task_id(task_id)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for task_id in task_ids:
                    await self._get(keys=[], args=[self.prefix, task_id], client=pipe)
                texts = await pipe.execute()
        except Exception as e:
            raise StateError(f"Redis get failed: {type(e).__name__}: {e}") from e
        return [None if text is None else _records.decode_record(json.loads(text))
                for text in texts]

    # -- the bridge's own keys ------------------------------------------------

    def _index_key(self, container: str) -> str:
        return f"{self.prefix}guillotina:container:{container}"

    def _prune_key(self, container: str) -> str:
        return f"{self.prefix}guillotina:prune:{container}"

    def _job_key(self, task_id: str) -> str:
        return f"{self.prefix}guillotina:job:{task_id}"

    async def index(self, container: str, task_id: str, at: float, job: dict,
                    keep: float = 0.0) -> None:
        """
        Add ``task_id`` to ``container``'s index and keep its ``job`` (the
        message, for debugging) as long as its record is likely to live:
        the state TTL plus ``keep`` seconds (its delay).
        """
        horizon = repr(at - self.finished_ttl) if self.finished_ttl > 0 else ""
        ttl_ms = str(round((self.finished_ttl + keep) * 1000)) if self.finished_ttl > 0 else "0"
        await self._run(self._index_add, [
            self._index_key(container), f"{self.prefix}task:", task_id, repr(at), horizon,
            self._job_key(task_id), json.dumps(job, separators=(",", ":")), ttl_ms,
            self._prune_key(container), self._longest_ms,
        ], "index")

    async def list(self, container: str, limit: int = LIST_LIMIT) -> list:
        """Ids of ``container``'s tasks whose record exists, newest first."""
        return list(await self._run(self._index_list, [
            self._index_key(container), f"{self.prefix}task:", str(limit)], "list"))

    async def belongs(self, container: str, task_id: str) -> bool:
        """Whether ``task_id`` was published from ``container``."""
        try:
            score = await self.redis.zscore(self._index_key(container), task_id)
        except Exception as e:
            raise StateError(f"Redis zscore failed: {type(e).__name__}: {e}") from e
        return score is not None

    async def job(self, task_id: str) -> Optional[dict]:
        """The message the bridge kept for ``task_id``, or ``None``."""
        try:
            text = await self.redis.get(self._job_key(task_id))
        except Exception as e:
            raise StateError(f"Redis get failed: {type(e).__name__}: {e}") from e
        return None if text is None else json.loads(text)
