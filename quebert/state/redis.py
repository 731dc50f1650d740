# -*- test-case-name: tests.test_state -*-
"""
The state store in Redis, through txredisapi.

Layout (``{prefix}`` defaults to ``quebert:``):

``{prefix}task:{id}``
    a hash per task: the record's scalar fields as strings (numbers written
    with full precision), ``result``/``error``/``history`` as JSON.
``{prefix}idx:state:{state}``, ``{prefix}idx:queue:{queue}``, ``{prefix}idx:all``
    sorted sets of task ids scored by ``updated_at``, for listing.
``{prefix}idx:expiry``
    sorted set of ``[id, queue]`` JSON members of finished records scored by
    their finish time, so that ids whose hash has expired can be removed
    from the queue and ``all`` indexes, which would otherwise keep every id
    ever written.

Every writer is one Lua script, run with ``EVALSHA`` (``EVAL`` when the
server does not know it yet), so a record and its indexes change together
or not at all.  Finished records get ``PEXPIRE finished_ttl``; each write
also prunes, in bounded steps, index entries of records that have expired.
Reads are scripts too: they return records as JSON text, which txredisapi
cannot mistake for numbers.

The scripts build keys from the prefix, so the store needs a single Redis
server (not a cluster).  Every error is raised as
:class:`quebert.errors.StateError`, and a call that gets no answer within
``timeout`` seconds fails too: with Redis gone a lazy txredisapi connection
would otherwise wait for a reconnection forever.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence
from urllib.parse import parse_qsl, unquote, urlsplit

import txredisapi
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from quebert.errors import ConfigurationError, StateError
from quebert.state import _records
from quebert.state.interface import HISTORY_LIMIT, IStateManager

log = Logger(namespace="quebert.state.redis")

#: How many due entries of ``idx:expiry`` one write examines at most.
PRUNE_BATCH = 50

#: Writes sent in one script call at most; more are split into several.
MAX_BATCH = 500

# Every write goes through this one script, in batches: ARGV[1] prefix,
# ARGV[2] ttl in ms, ARGV[3] history limit, ARGV[4] a JSON array of writes,
# each [kind, id, at, create, set, clear, attempt, entry] with kind 'e'
# (enqueued), 's' (started) or 'f' (finished).  Writes apply in order and the
# whole batch is atomic.
_APPLY = """
local prefix = ARGV[1]
local ttl_ms = tonumber(ARGV[2])
local history_limit = tonumber(ARGV[3])
local ops = cjson.decode(ARGV[4])
local finished = {succeeded = true, failed = true, canceled = true}
local id, key, at, create, set, clear

local function is_null(x)
  return x == nil or x == false or x == cjson.null
end

-- cjson rounds numbers to 14 digits: numbers are formatted by hand
local function json_number(x)
  if is_null(x) then return 'null' end
  return string.format('%.17g', x)
end

local function json_value(x)
  if is_null(x) then return 'null' end
  return cjson.encode(x)
end

local function encode_entry(e)
  return '{"attempt":' .. json_number(e.attempt)
    .. ',"state":' .. json_value(e.state)
    .. ',"worker":' .. json_value(e.worker)
    .. ',"started_at":' .. json_number(e.started_at)
    .. ',"finished_at":' .. json_number(e.finished_at)
    .. ',"error":' .. json_value(e.error)
    .. ',"retry_at":' .. json_number(e.retry_at) .. '}'
end

-- same rule as quebert.state._records.upsert_history
local function upsert_history(attempt, fields, replace)
  local raw = redis.call('HGET', key, 'history')
  local history = {}
  if raw then history = cjson.decode(raw) end
  local done = false
  for i, entry in ipairs(history) do
    if entry.attempt == attempt then
      if replace then
        history[i] = fields
      else
        for k, v in pairs(fields) do entry[k] = v end
      end
      done = true
      break
    end
    if entry.attempt > attempt then
      table.insert(history, i, fields)
      done = true
      break
    end
  end
  if not done then history[#history + 1] = fields end
  local parts = {}
  for i = math.max(1, #history - history_limit + 1), #history do
    parts[#parts + 1] = encode_entry(history[i])
  end
  redis.call('HSET', key, 'history', '[' .. table.concat(parts, ',') .. ']')
end

-- drop index entries of finished records older than the TTL
local function prune(now)
  if ttl_ms <= 0 then return end
  local horizon = tonumber(now) - ttl_ms / 1000
  local h = string.format('%.17g', horizon)
  for state in pairs(finished) do
    redis.call('ZREMRANGEBYSCORE', prefix .. 'idx:state:' .. state, '-inf', '(' .. h)
  end
  local expiry = prefix .. 'idx:expiry'
  local due = redis.call('ZRANGEBYSCORE', expiry, '-inf', h, 'LIMIT', 0, __PRUNE_BATCH__)
  for _, member in ipairs(due) do
    local m = cjson.decode(member)
    local remaining = redis.call('PTTL', prefix .. 'task:' .. m[1])
    if remaining == -2 then
      redis.call('ZREM', prefix .. 'idx:all', m[1])
      if m[2] then redis.call('ZREM', prefix .. 'idx:queue:' .. m[2], m[1]) end
      for state in pairs(finished) do
        redis.call('ZREM', prefix .. 'idx:state:' .. state, m[1])
      end
      redis.call('ZREM', expiry, member)
    elseif remaining == -1 then
      -- the task was started again: it no longer expires
      redis.call('ZREM', expiry, member)
    else
      -- writers' clocks are ahead of Redis: look again once it has expired
      redis.call('ZADD', expiry, string.format('%.17g', horizon + remaining / 1000 + 1), member)
    end
  end
end

local function hset_all(fields)
  local flat = {}
  for k, v in pairs(fields) do
    flat[#flat + 1] = k
    flat[#flat + 1] = v
  end
  if #flat > 0 then redis.call('HSET', key, unpack(flat)) end
end

local function write_fields()
  hset_all(set)
  if #clear > 0 then redis.call('HDEL', key, unpack(clear)) end
end

-- move the id between indexes and set or clear the expiry
local function reindex(old_state, old_queue)
  local now = redis.call('HMGET', key, 'state', 'queue')
  local state, queue = now[1], now[2]
  if old_state and old_state ~= state then
    redis.call('ZREM', prefix .. 'idx:state:' .. old_state, id)
  end
  redis.call('ZADD', prefix .. 'idx:state:' .. state, at, id)
  if old_queue and old_queue ~= queue then
    redis.call('ZREM', prefix .. 'idx:queue:' .. old_queue, id)
  end
  if queue then redis.call('ZADD', prefix .. 'idx:queue:' .. queue, at, id) end
  redis.call('ZADD', prefix .. 'idx:all', at, id)
  if finished[state] and ttl_ms > 0 then
    redis.call('PEXPIRE', key, ttl_ms)
    local member
    if queue then member = cjson.encode({id, queue}) else member = cjson.encode({id}) end
    redis.call('ZADD', prefix .. 'idx:expiry', at, member)
  elseif old_state and finished[old_state] then
    redis.call('PERSIST', key)
  end
end

-- the record as it was, creating it when missing
local function load()
  local old = redis.call('HMGET', key, 'state', 'queue', 'attempts')
  if old[1] then
    return old[1], old[2], tonumber(old[3]) or 0
  end
  hset_all(create)
  return false, false, 0
end

local function enqueued()
  if redis.call('EXISTS', key) == 1 then return 0 end
  load()
  write_fields()
  reindex(false, false)
  return 1
end

local function started(attempt, entry)
  local old_state, old_queue, old_attempts = load()
  -- A late or replayed 'started' never rewinds a record past this attempt.
  if old_attempts > attempt or (old_attempts == attempt and (old_state == 'scheduled'
      or old_state == 'succeeded' or old_state == 'failed' or old_state == 'canceled')) then
    return 0
  end
  write_fields()
  upsert_history(attempt, entry, true)
  reindex(old_state, old_queue)
  return 1
end

local function finish(attempt, entry)
  local old_state, old_queue, old_attempts = load()
  write_fields()
  if attempt > old_attempts then
    redis.call('HSET', key, 'attempts', string.format('%d', attempt))
  end
  upsert_history(attempt, entry, false)
  reindex(old_state, old_queue)
  return 1
end

local results = {}
local latest = nil
for i, op in ipairs(ops) do
  id = op[2]
  key = prefix .. 'task:' .. id
  at = op[3]
  create, set, clear = op[4], op[5], op[6]
  local kind = op[1]
  if kind == 'e' then
    results[i] = enqueued()
  elseif kind == 's' then
    results[i] = started(op[7], op[8])
  else
    results[i] = finish(op[7], op[8])
  end
  latest = at
end
if latest then prune(latest) end
return results
""".replace("__PRUNE_BATCH__", str(PRUNE_BATCH))

# ARGV: prefix, id
_GET = """
local flat = redis.call('HGETALL', ARGV[1] .. 'task:' .. ARGV[2])
if #flat == 0 then return false end
local record = {}
for i = 1, #flat, 2 do record[flat[i]] = flat[i + 1] end
return cjson.encode(record)
"""

# ARGV: prefix, state or '', queue or '', offset, limit
_LIST = """
local prefix, state, queue = ARGV[1], ARGV[2], ARGV[3]
local offset, limit = tonumber(ARGV[4]), tonumber(ARGV[5])
local index = prefix .. 'idx:all'
local exact = true
if state ~= '' and queue ~= '' then
  -- walk the smaller index, check the other attribute on each record
  local by_state, by_queue = prefix .. 'idx:state:' .. state, prefix .. 'idx:queue:' .. queue
  if redis.call('ZCARD', by_state) <= redis.call('ZCARD', by_queue) then
    index = by_state
  else
    index = by_queue
  end
  exact = false
elseif state ~= '' then
  index = prefix .. 'idx:state:' .. state
elseif queue ~= '' then
  index = prefix .. 'idx:queue:' .. queue
end
local pos, skip = offset, 0
if not exact then pos, skip = 0, offset end
local chunk = math.max(limit, 50)
local out, dead = {}, {}
while #out < limit do
  local ids = redis.call('ZREVRANGE', index, pos, pos + chunk - 1)
  if #ids == 0 then break end
  pos = pos + #ids
  for _, id in ipairs(ids) do
    local flat = redis.call('HGETALL', prefix .. 'task:' .. id)
    if #flat == 0 then
      dead[#dead + 1] = id
    else
      local record = {}
      for i = 1, #flat, 2 do record[flat[i]] = flat[i + 1] end
      if (state == '' or record.state == state) and (queue == '' or record.queue == queue) then
        if skip > 0 then
          skip = skip - 1
        else
          out[#out + 1] = cjson.encode(record)
          if #out == limit then break end
        end
      end
    end
  end
end
-- ids whose hash has expired
for _, id in ipairs(dead) do
  redis.call('ZREM', index, id)
  redis.call('ZREM', prefix .. 'idx:all', id)
end
return out
"""


class _Script:
    """A Lua script and its SHA1, computed once."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()


_SCRIPTS = {
    name: _Script(name, source)
    for name, source in (
        ("apply", _APPLY),
        ("get", _GET),
        ("list", _LIST),
    )
}


def _json(value: Any) -> str:
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def _is_noscript(error: BaseException) -> bool:
    return isinstance(error, txredisapi.ScriptDoesNotExist) or (
        isinstance(error, txredisapi.ResponseError) and str(error).startswith("NOSCRIPT")
    )


@implementer(IStateManager)
class RedisStateManager:
    """
    :class:`IStateManager` in Redis.

    :param redis: a txredisapi connection, lazy connection or pool (see
        :func:`connect_redis`).
    :param prefix: prefix of every key, so that several deployments (or
        test runs) can share a database.
    :param finished_ttl: seconds a finished record is kept (0: forever).
    :param timeout: seconds to wait for an answer before failing with
        :class:`StateError` (``None``: wait forever).
    :param clock: ``IReactorTime`` for the timeout; the global reactor when
        ``None``.
    """

    def __init__(
        self,
        redis: Any,
        prefix: str = "quebert:",
        finished_ttl: float = 86400,
        *,
        timeout: Optional[float] = 5.0,
        clock: Optional[IReactorTime] = None,
    ) -> None:
        if finished_ttl < 0:
            raise ConfigurationError(f"finished_ttl must be >= 0 seconds, not {finished_ttl!r}")
        if timeout is not None and timeout <= 0:
            raise ConfigurationError(f"timeout must be > 0 seconds or None, not {timeout!r}")
        self.redis = redis
        self.prefix = prefix
        self.finished_ttl = finished_ttl
        self.timeout = timeout
        self._clock = clock
        self._ttl_ms = str(max(1, round(finished_ttl * 1000)) if finished_ttl > 0 else 0)
        self._batch: List[list] = []
        self._waiters: List[Deferred] = []
        self._flush_call: Any = None

    # -- IStateManager --------------------------------------------------

    def enqueued(self, task_id: str, state: str, info: Mapping[str, Any], at: float) -> Deferred:
        """Create the record of a task just published, unless it exists."""
        try:
            _records.check_enqueued(task_id, state, info, at)
            record = _records.new_record(task_id, info, at)
            record.update(_records.enqueued_changes(state, at))
            create, _ = _records.encode_fields(record)
            op = ["e", task_id, repr(float(at)), create, {}, [], 0, None]
        except Exception:
            return fail()
        return self._submit(op)

    def started(
        self, task_id: str, attempt: int, worker: str, info: Mapping[str, Any], at: float
    ) -> Deferred:
        """Record that attempt ``attempt`` of the task starts on ``worker``."""
        try:
            _records.check_started(task_id, attempt, worker, info, at)
            changes = _records.info_updates(info)
            changes.update(_records.started_changes(attempt, worker, at))
            entry = _records.started_entry(attempt, worker, at)
            op = self._write_op("s", task_id, at, info, changes, attempt, entry)
        except Exception:
            return fail()
        return self._submit(op)

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
            _records.check_finished(task_id, state, attempt, info, at, error, reason, retry_at)
            changes = _records.info_updates(info)
            changes.update(_records.finished_changes(state, at, result, error, reason, retry_at))
            outcome = _records.outcome_entry(attempt, state, at, error, retry_at)
            op = self._write_op("f", task_id, at, info, changes, attempt, outcome)
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

    # -- implementation -------------------------------------------------

    def _write_op(self, kind: str, task_id: str, at: float, info: Any,
                  changes: Mapping[str, Any], attempt: int, entry: Any) -> list:
        create, _ = _records.encode_fields(_records.new_record(task_id, info, at))
        values, clear = _records.encode_fields(changes)
        return [kind, task_id, repr(float(at)), create, values, clear, attempt, entry]

    def _submit(self, op: list) -> Deferred:
        """
        Queue one write for the next batch.  Writes made in the same reactor
        turn go to Redis as one script call (in order, atomically), which
        costs Redis and this process far less than one call each.
        """
        waiter: Deferred = Deferred()
        self._batch.append(op)
        self._waiters.append(waiter)
        if len(self._batch) >= MAX_BATCH:
            self._flush()
        elif self._flush_call is None:
            self._flush_call = self._get_clock().callLater(0, self._flush)
        return waiter

    def _flush(self) -> None:
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        ops, waiters = self._batch, self._waiters
        self._batch, self._waiters = [], []
        if not ops:
            return
        try:
            payload = _json(ops)
        except Exception:
            # One bad write must not sink the others: send them one by one.
            for op, waiter in zip(ops, waiters):
                self._send([op]).chainDeferred(waiter)
            return
        d = self._run("apply", [self.prefix, self._ttl_ms, str(HISTORY_LIMIT), payload])
        d.addCallbacks(self._applied, self._not_applied, callbackArgs=(waiters,),
                       errbackArgs=(waiters,))

    def _send(self, ops: list) -> Deferred:
        try:
            payload = _json(ops)
        except Exception:
            return fail()
        args = [self.prefix, self._ttl_ms, str(HISTORY_LIMIT), payload]
        return self._run("apply", args).addCallback(lambda _: None)

    @staticmethod
    def _applied(_: Any, waiters: List[Deferred]) -> None:
        for waiter in waiters:
            waiter.callback(None)

    @staticmethod
    def _not_applied(failure: Failure, waiters: List[Deferred]) -> None:
        for waiter in waiters:
            waiter.errback(Failure(failure.value, failure.type, failure.tb))

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

    def _run(self, name: str, args: Sequence[str]) -> Deferred:
        """Run a script: ``EVALSHA``, ``EVAL`` on ``NOSCRIPT``, errors as ``StateError``."""
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
        return self._bounded(d, name).addErrback(self._translate, name)

    def _bounded(self, d: Deferred, name: str) -> Deferred:
        """
        ``d``'s result, or a ``StateError`` after ``timeout`` seconds.

        ``d`` itself is never cancelled: txredisapi cannot take back a
        command waiting for a connection (its queue would later fire the
        cancelled Deferred again).  A late answer is dropped.
        """
        if self.timeout is None:
            return d
        self._get_clock()

        def cancel(_: Deferred) -> None:
            if timer.active():
                timer.cancel()

        result = Deferred(cancel)

        def expire() -> None:
            if not result.called:
                result.errback(
                    StateError(f"Redis did not answer {name} within {self.timeout} seconds")
                )

        timer = self._clock.callLater(self.timeout, expire)  # type: ignore[union-attr]

        def done(outcome: Any) -> None:
            if timer.active():
                timer.cancel()
                if not result.called:
                    if isinstance(outcome, Failure):
                        result.errback(outcome)
                    else:
                        result.callback(outcome)
            # else: too late, the caller has its StateError already

        d.addBoth(done)
        return result

    @staticmethod
    def _translate(failure: Failure, name: str) -> Failure:
        if failure.check(StateError, CancelledError):
            return failure
        error = failure.value
        raise StateError(f"Redis {name} failed: {type(error).__name__}: {error}") from error


# -- connecting --------------------------------------------------------------


def parse_redis_url(url: str) -> Dict[str, Any]:
    """
    ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS) as
    keyword arguments; a ``ConfigurationError`` saying what is wrong otherwise.
    """
    example = "redis://[:password@]host[:port][/db], e.g. redis://127.0.0.1:6379/0"
    if not isinstance(url, str):
        raise ConfigurationError(f"The Redis URL must be a string like {example}, not {url!r}.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigurationError(f"Redis URL {url!r} is not valid ({e}); expected {example}.")
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigurationError(
            f"Redis URL {url!r} must start with redis:// or rediss://; expected {example}."
        )
    if not parts.hostname:
        raise ConfigurationError(f"Redis URL {url!r} names no host; expected {example}.")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ConfigurationError(
            f"Redis URL {url!r} has database {path!r}; it must be a number; expected {example}."
        )
    if parts.query and parse_qsl(parts.query, keep_blank_values=True):
        raise ConfigurationError(
            f"Redis URL {url!r} has options ({parts.query!r}) that quebert does not support."
        )
    return {
        "host": parts.hostname,
        "port": port if port is not None else 6379,
        "db": int(path) if path else 0,
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "tls": parts.scheme == "rediss",
    }


class _TLSEndpoint:
    """TLS over a client endpoint, handing back the wrapped (Redis) protocol."""

    def __init__(self, endpoint: Any, host: str) -> None:
        self._endpoint = endpoint
        self._host = host

    def connect(self, factory: Any) -> Deferred:
        from twisted.internet.ssl import optionsForClientTLS
        from twisted.protocols.tls import TLSMemoryBIOFactory

        wrapper = TLSMemoryBIOFactory(optionsForClientTLS(self._host), True, factory)
        return self._endpoint.connect(wrapper).addCallback(lambda p: p.wrappedProtocol)


def connect_redis(
    url: str,
    reactor: Optional[Any] = None,
    *,
    poolsize: int = 1,
    connect_timeout: float = 5.0,
    reply_timeout: Optional[float] = 30.0,
) -> Any:
    """
    A lazy, reconnecting txredisapi connection to the Redis at ``url``
    (``redis://[:password@]host[:port][/db]``, or ``rediss://`` for TLS).

    It can be used at once: commands wait until it is connected.  One
    connection is the default because Redis runs one command at a time
    anyway, and commands on one connection keep their order, which the
    state writes of a task rely on.  ``reply_timeout`` drops a connection
    whose server stopped answering, so that it is re-established.  Call
    ``disconnect()`` on the result to close it.

    :param reactor: reactor to connect with (the global one when ``None``;
        txredisapi still uses the global reactor for its own timers).
    :raises ConfigurationError: the URL is not a Redis URL.
    """
    options = parse_redis_url(url)
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    factory_class = txredisapi.RedisFactory
    if not hasattr(factory_class, "startConnecting"):  # txredisapi < 1.5
        return txredisapi.lazyConnectionPool(
            options["host"],
            options["port"],
            dbid=options["db"],
            poolsize=poolsize,
            password=options["password"],
            ssl_context_factory=options["tls"],
            connectTimeout=connect_timeout,
            replyTimeout=reply_timeout,
            convertNumbers=False,
        )
    from twisted.internet.endpoints import HostnameEndpoint

    factory = factory_class(
        f"{options['host']}:{options['port']}",
        options["db"],
        poolsize,
        isLazy=True,
        password=options["password"],
        replyTimeout=reply_timeout,
        convertNumbers=False,
        username=options["username"],
    )
    factory.reconnect = True

    def refused(failure: Failure) -> None:
        # a lazy handle has nobody waiting on the factory: say it here
        log.error(
            "Cannot use Redis at {host}:{port}: {error}",
            host=options["host"],
            port=options["port"],
            error=failure.getErrorMessage(),
        )

    factory.deferred.addErrback(refused)
    endpoint: Any = HostnameEndpoint(
        reactor, options["host"], options["port"], timeout=connect_timeout
    )
    if options["tls"]:
        endpoint = _TLSEndpoint(endpoint, options["host"])
    factory.startConnecting(endpoint)
    return factory.handler
