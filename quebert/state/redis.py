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
or not at all.  Writes are sent in batches, one script call each.
Finished records get ``PEXPIRE finished_ttl``; the batches also prune, in
bounded steps, index entries of records that have expired (once a second
of write time, or every batch while expired entries are left over).
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

#: Seconds of write time between two prunings, unless one left work undone.
PRUNE_INTERVAL = 1.0

#: Writes sent in one script call at most; more are split into several.
MAX_BATCH = 500

#: Batches on their way at most; later writes wait for one to be answered
#: and then go together, so that the busier the store, the larger (and
#: cheaper per write) the batches.
MAX_SENDING = 1

# Every write goes through this one script, in batches: ARGV[1] prefix,
# ARGV[2] ttl in ms, ARGV[3] history limit, ARGV[4] a JSON array of writes,
# ARGV[5] '1' to prune expired index entries too.
# Each write is a flat array
#   [kind, id, at, queue, kind, task, name, eta, created_at, ...]
# with the info fields as hash values (null when unknown), followed by
#   'e' (enqueued):  state
#   's' (started):   attempt, worker
#   'f' (finished):  attempt, state, result, error, reason, retry_at
# where result and error are JSON texts and numbers (attempt, at, eta...)
# strings in their exact hash form: Python encodes each value once, the
# script names the fields.  Writes apply in order and the whole batch is
# atomic.  The answer is one 0/1 per write (0: nothing to do), then the
# number of expired index entries examined.
_APPLY = """
local prefix = ARGV[1]
local ttl_ms = tonumber(ARGV[2])
local history_limit = tonumber(ARGV[3])
local ops = cjson.decode(ARGV[4])
local null = cjson.null
local call, fmt, concat = redis.call, string.format, table.concat
local find, sub = string.find, string.sub
local finished = {succeeded = true, failed = true, canceled = true}
local outcome = {scheduled = true, succeeded = true, failed = true, canceled = true}
-- states whose records hold no finished_at, result, error or reason
local clean = {queued = true, running = true}
local id, key, at
local all_key, expiry_key = prefix .. 'idx:all', prefix .. 'idx:expiry'
local task_prefix = prefix .. 'task:'
-- index key names, made once per script call
local state_keys, queue_keys = {}, {}
local function state_key(state)
  local k = state_keys[state]
  if not k then k = prefix .. 'idx:state:' .. state; state_keys[state] = k end
  return k
end
local function queue_key(queue)
  local k = queue_keys[queue]
  if not k then k = prefix .. 'idx:queue:' .. queue; queue_keys[queue] = k end
  return k
end

-- Index changes wait until the writes are done, then go in one ZADD and
-- one ZREM per index: each command a script runs has a high fixed cost.
-- changes[index][member] is the member's final score, or false to remove it.
local changes = {}
local function zadd(index, score, member)
  local t = changes[index]
  if not t then t = {}; changes[index] = t end
  t[member] = score
end
local function zrem(index, member)
  local t = changes[index]
  if not t then t = {}; changes[index] = t end
  t[member] = false
end
local function apply_changes()
  for index, t in pairs(changes) do
    local adds, na, rems, nr = {}, 0, {}, 0
    for member, score in pairs(t) do
      if score then
        adds[na + 1] = score; adds[na + 2] = member; na = na + 2
      else
        nr = nr + 1; rems[nr] = member
      end
    end
    for i = 1, na, 1000 do call('ZADD', index, unpack(adds, i, math.min(i + 999, na))) end
    for i = 1, nr, 1000 do call('ZREM', index, unpack(rems, i, math.min(i + 999, nr))) end
  end
  changes = {}
end

-- history entries decoded by cjson, written back with exact numbers
-- (cjson rounds numbers to 14 digits)
local function json_number(x)
  if x == nil or x == false or x == null then return 'null' end
  return fmt('%.17g', x)
end

local function json_value(x)
  if x == nil or x == false or x == null then return 'null' end
  return cjson.encode(x)
end

local function entry_text(attempt, state, worker, started_at, finished_at, err, retry_at)
  return '{"attempt":' .. attempt .. ',"state":' .. state .. ',"worker":' .. worker
    .. ',"started_at":' .. started_at .. ',"finished_at":' .. finished_at
    .. ',"error":' .. err .. ',"retry_at":' .. retry_at .. '}'
end

local function encode_entry(e)
  return entry_text(json_number(e.attempt), json_value(e.state), json_value(e.worker),
    json_number(e.started_at), json_number(e.finished_at), json_value(e.error),
    json_number(e.retry_at))
end

-- The history (JSON text, or false) with the entry of attempt replaced by
-- the text fresh (replace), or merged with the outcome (state, finished_at,
-- err, retry_at: JSON texts), keeping the latest history_limit entries.
-- Same rule as quebert.state._records.upsert_history.
local function upsert_history(raw, attempt, fresh, replace, state, finished_at, err, retry_at)
  if not raw or raw == '[]' or raw == '{}' then return '[' .. fresh .. ']' end
  local history = cjson.decode(raw)
  local parts = {}
  local done = false
  for _, entry in ipairs(history) do
    if done then
      parts[#parts + 1] = encode_entry(entry)
    elseif entry.attempt == attempt then
      if replace then
        parts[#parts + 1] = fresh
      else
        parts[#parts + 1] = entry_text(json_number(entry.attempt), state, json_value(entry.worker),
          json_number(entry.started_at), finished_at, err, retry_at)
      end
      done = true
    elseif entry.attempt > attempt then
      parts[#parts + 1] = fresh
      parts[#parts + 1] = encode_entry(entry)
      done = true
    else
      parts[#parts + 1] = encode_entry(entry)
    end
  end
  if not done then parts[#parts + 1] = fresh end
  if #parts > history_limit then
    return '[' .. concat(parts, ',', #parts - history_limit + 1, #parts) .. ']'
  end
  return '[' .. concat(parts, ',') .. ']'
end

-- drop index entries of finished records older than the TTL
local function prune(now)
  if ttl_ms <= 0 then return 0 end
  local horizon = tonumber(now) - ttl_ms / 1000
  local h = fmt('%.17g', horizon)
  local expiry = expiry_key
  local due = call('ZRANGEBYSCORE', expiry, '-inf', h, 'LIMIT', 0, __PRUNE_BATCH__)
  if #due == 0 then return 0 end
  for state in pairs(finished) do
    call('ZREMRANGEBYSCORE', state_key(state), '-inf', '(' .. h)
  end
  for _, member in ipairs(due) do
    local m = cjson.decode(member)
    local remaining = call('PTTL', task_prefix .. m[1])
    if remaining == -2 then
      zrem(all_key, m[1])
      if m[2] then zrem(queue_key(m[2]), m[1]) end
      for state in pairs(finished) do
        zrem(state_key(state), m[1])
      end
      zrem(expiry, member)
    elseif remaining == -1 then
      -- the task was started again: it no longer expires
      zrem(expiry, member)
    else
      -- writers' clocks are ahead of Redis: look again once it has expired
      zadd(expiry, fmt('%.17g', horizon + remaining / 1000 + 1), member)
    end
  end
  apply_changes()
  return #due
end

-- move the id between indexes and set or clear the expiry
local function reindex(old_state, old_queue, state, queue)
  if old_state and old_state ~= state then
    zrem(state_key(old_state), id)
  end
  zadd(state_key(state), at, id)
  if old_queue and old_queue ~= queue then
    zrem(queue_key(old_queue), id)
  end
  if queue then zadd(queue_key(queue), at, id) end
  zadd(all_key, at, id)
  if finished[state] and ttl_ms > 0 then
    call('PEXPIRE', key, ttl_ms)
    local member
    if queue then member = cjson.encode({id, queue}) else member = cjson.encode({id}) end
    zadd(expiry_key, at, member)
  elseif old_state and finished[old_state] then
    call('PERSIST', key)
  end
end

-- Fields to set go in f (name, value, ...), n of them so far: the info
-- fields a write sets on any record, then those only a new record gets.
-- Returns n and the queue the write names.
local function add_info(f, n, op, created, keep_eta)
  local queue = op[4]
  if queue ~= null then f[n + 1] = 'queue'; f[n + 2] = queue; n = n + 2 else queue = nil end
  if op[5] ~= null then f[n + 1] = 'kind'; f[n + 2] = op[5]; n = n + 2 end
  if op[6] ~= null then f[n + 1] = 'task'; f[n + 2] = op[6]; n = n + 2 end
  if op[7] ~= null then f[n + 1] = 'name'; f[n + 2] = op[7]; n = n + 2 end
  if created then
    f[n + 1] = 'id'; f[n + 2] = id
    f[n + 3] = 'created_at'
    if op[9] ~= null then f[n + 4] = op[9] else f[n + 4] = at end
    n = n + 4
    if keep_eta and op[8] ~= null then f[n + 1] = 'eta'; f[n + 2] = op[8]; n = n + 2 end
  end
  return n, queue
end

local function enqueued(op)
  if call('EXISTS', key) == 1 then return 0 end
  local state = op[10]
  local f = {'state', state, 'attempts', '0', 'updated_at', at, 'history', '[]'}
  local _, queue = add_info(f, 8, op, true, true)
  call('HSET', key, unpack(f))
  reindex(false, false, state, queue)
  return 1
end

local function started(op)
  local attempt_s, worker = op[10], op[11]
  local attempt = tonumber(attempt_s)
  local old = call('HMGET', key, 'state', 'queue', 'attempts', 'history')
  local old_state, old_queue = old[1], old[2]
  if old_state then
    -- A late or replayed 'started' never rewinds a record past this attempt.
    local old_attempts = tonumber(old[3]) or 0
    if old_attempts > attempt or (old_attempts == attempt and outcome[old_state]) then
      return 0
    end
  end
  local f = {'state', 'running', 'attempts', attempt_s, 'started_at', at, 'updated_at', at}
  local n, queue = add_info(f, 8, op, not old_state, true)
  local worker_json = 'null'
  if worker ~= null then
    f[n + 1] = 'worker'; f[n + 2] = worker; n = n + 2
    worker_json = cjson.encode(worker)
  end
  local fresh = '{"attempt":' .. attempt_s .. ',"state":"running","worker":' .. worker_json
    .. ',"started_at":' .. at .. ',"finished_at":null,"error":null,"retry_at":null}'
  local raw = old[4]
  f[n + 1] = 'history'
  if not raw or raw == '[]' or raw == '{}' then
    f[n + 2] = '[' .. fresh .. ']'
  else
    f[n + 2] = upsert_history(raw, attempt, fresh, true)
  end
  call('HSET', key, unpack(f))
  if old_state then
    -- the outcome of a previous attempt no longer describes the task
    if not clean[old_state] then
      if worker == null then
        call('HDEL', key, 'finished_at', 'result', 'error', 'reason', 'worker')
      else
        call('HDEL', key, 'finished_at', 'result', 'error', 'reason')
      end
    elseif worker == null then
      call('HDEL', key, 'worker')
    end
  end
  reindex(old_state, old_queue, 'running', queue or old_queue)
  return 1
end

-- The history raw (JSON text) with the outcome merged into the entry of
-- attempt: its last entry, as this script writes entries, is changed in
-- place; any other case goes through upsert_history.
local function merge_outcome(raw, attempt, attempt_s, fresh, state_json, finished_at, err,
                             retry_at)
  local p = find(raw, '{"attempt":' .. attempt_s .. ',"state":', 1, true)
  if p and not find(raw, '{"attempt":', p + 1, true) then
    -- JSON strings cannot hold these markers (their quotes are escaped)
    local w = find(raw, ',"worker":', p, true)
    local e = w and find(raw, ',"finished_at":', w, true)
    if e then
      return sub(raw, 1, p - 1) .. '{"attempt":' .. attempt_s .. ',"state":' .. state_json
        .. sub(raw, w, e - 1) .. ',"finished_at":' .. finished_at .. ',"error":' .. err
        .. ',"retry_at":' .. retry_at .. '}]'
    end
  end
  return upsert_history(raw, attempt, fresh, false, state_json, finished_at, err, retry_at)
end

local function finish(op)
  local attempt_s, state, result, err = op[10], op[11], op[12], op[13]
  local reason, retry_at = op[14], op[15]
  local attempt = tonumber(attempt_s)
  local old = call('HMGET', key, 'state', 'queue', 'attempts', 'history')
  local old_state, old_queue = old[1], old[2]
  local f = {'state', state, 'updated_at', at}
  local n, queue = add_info(f, 4, op, not old_state, state ~= 'scheduled')
  -- outcome fields: set, or cleared unless the record cannot hold them
  local clear, c = {}, 0
  local dirty = old_state and not clean[old_state]
  if finished[state] then
    f[n + 1] = 'finished_at'; f[n + 2] = at; n = n + 2
  elseif dirty then
    c = c + 1; clear[c] = 'finished_at'
  end
  if result ~= null then
    f[n + 1] = 'result'; f[n + 2] = result; n = n + 2
  elseif dirty then
    c = c + 1; clear[c] = 'result'
  end
  if err ~= null then
    f[n + 1] = 'error'; f[n + 2] = err; n = n + 2
  else
    err = 'null'
    if dirty then c = c + 1; clear[c] = 'error' end
  end
  if reason ~= null then
    f[n + 1] = 'reason'; f[n + 2] = reason; n = n + 2
  elseif dirty then
    c = c + 1; clear[c] = 'reason'
  end
  if state == 'scheduled' then
    if retry_at ~= null then
      f[n + 1] = 'eta'; f[n + 2] = retry_at; n = n + 2
    elseif old_state then
      c = c + 1; clear[c] = 'eta'
    end
  end
  if retry_at == null then retry_at = 'null' end
  if not old_state or attempt > (tonumber(old[3]) or 0) then
    f[n + 1] = 'attempts'; f[n + 2] = attempt_s; n = n + 2
  end
  local state_json = '"' .. state .. '"'
  local fresh = '{"attempt":' .. attempt_s .. ',"state":' .. state_json
    .. ',"worker":null,"started_at":null,"finished_at":' .. at .. ',"error":' .. err
    .. ',"retry_at":' .. retry_at .. '}'
  local raw = old[4]
  f[n + 1] = 'history'
  if not raw or raw == '[]' or raw == '{}' then
    f[n + 2] = '[' .. fresh .. ']'
  else
    f[n + 2] = merge_outcome(raw, attempt, attempt_s, fresh, state_json, at, err, retry_at)
  end
  call('HSET', key, unpack(f))
  if c > 0 then call('HDEL', key, unpack(clear)) end
  reindex(old_state, old_queue, state, queue or old_queue)
  return 1
end

local results = {}
local latest = nil
for i, op in ipairs(ops) do
  id = op[2]
  key = task_prefix .. id
  at = op[3]
  local kind = op[1]
  if kind == 's' then
    results[i] = started(op)
  elseif kind == 'f' then
    results[i] = finish(op)
  else
    results[i] = enqueued(op)
  end
  latest = at
end
apply_changes()
-- ARGV[5] '1': prune; the answer ends with the number of entries examined
local examined = 0
if latest and ARGV[5] == '1' then examined = prune(latest) end
results[#results + 1] = examined
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


_json = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
_float_repr = float.__repr__


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
        self._waiters: List[Any] = []
        self._flush_call: Any = None
        self._sending = 0  # batches sent and not answered yet
        self._held_since: Optional[float] = None  # first write held behind them
        self._pruned_at: Optional[float] = None  # write time of the last pruning
        self._prune_more = False  # it left expired entries

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

    # -- implementation -------------------------------------------------

    # The writes as script operations (see _APPLY): checked, normalised and
    # encoded once, immutable.  ResilientStateManager keeps these rather than
    # the arguments, and hands them to _submit().

    @staticmethod
    def _op_enqueued(task_id: str, state: str, info: Mapping[str, Any], at: float) -> list:
        _records.check_enqueued(task_id, state, info, at)
        return ["e", task_id, _float_repr(float(at)), *_records.info_strings(info), state]

    @staticmethod
    def _op_started(
        task_id: str, attempt: int, worker: str, info: Mapping[str, Any], at: float
    ) -> list:
        _records.check_started(task_id, attempt, worker, info, at)
        return ["s", task_id, _float_repr(float(at)), *_records.info_strings(info), str(attempt),
                _records.text(worker, _records.MESSAGE_LIMIT)]

    @staticmethod
    def _op_finished(
        task_id: str,
        state: str,
        attempt: int,
        info: Mapping[str, Any],
        at: float,
        result: Any = None,
        error: Optional[Mapping[str, Any]] = None,
        reason: Optional[str] = None,
        retry_at: Optional[float] = None,
    ) -> list:
        _records.check_finished(task_id, state, attempt, info, at, error, reason, retry_at)
        return [
            "f", task_id, _float_repr(float(at)), *_records.info_strings(info), str(attempt),
            state,
            None if result is None else _records.to_json(result),
            None if error is None else _json(_records.normalize_error(error)),
            _records.text(reason, _records.MESSAGE_LIMIT),
            None if retry_at is None else _float_repr(float(retry_at)),
        ]

    def _submit(self, op: list, waiter: Any = None) -> Any:
        """
        Queue one write for the next batch, which is sent at the end of
        this reactor turn or, while a batch is on its way, as soon as that
        one is answered: one script call then carries every write made in
        the meantime (in order, atomically), which costs Redis and this
        process far less than one call each, and adds no round trip.

        ``waiter`` gets ``callback(None)`` or ``errback(failure)`` once the
        batch is applied; by default a new ``Deferred``, which is returned.
        """
        if waiter is None:
            waiter = Deferred()
        self._batch.append(op)
        self._waiters.append(waiter)
        if len(self._batch) >= MAX_BATCH:
            self._flush()
        elif self._sending >= MAX_SENDING:
            if self._held_since is None:
                self._held_since = self._get_clock().seconds()
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
        d = self._run("apply", [self.prefix, self._ttl_ms, str(HISTORY_LIMIT), payload,
                                "1" if prune else "0"], timeout)
        d.addCallbacks(self._applied, self._not_applied, callbackArgs=(waiters, prune),
                       errbackArgs=(waiters,))
        d.addBoth(self._sent)

    def _sent(self, _: Any) -> None:
        """A batch is answered (or timed out): send the writes held meanwhile."""
        self._sending -= 1
        if self._batch and self._sending < MAX_SENDING:
            self._flush()

    def _send(self, ops: list) -> Deferred:
        try:
            payload = _json(ops)
        except Exception:
            return fail()
        args = [self.prefix, self._ttl_ms, str(HISTORY_LIMIT), payload, "0"]
        return self._run("apply", args).addCallback(lambda _: None)

    def _applied(self, results: Any, waiters: List[Any], pruned: bool = False) -> None:
        if pruned:
            # a full step of pruning: there may be more, go on with the next batch
            try:
                self._prune_more = int(results[-1]) >= PRUNE_BATCH
            except Exception:
                self._prune_more = False
        for waiter in waiters:
            try:
                waiter.callback(None)
            except Exception:
                log.failure("state write callback failed")

    @staticmethod
    def _not_applied(failure: Failure, waiters: List[Any]) -> None:
        for waiter in waiters:
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

        timer = self._clock.callLater(timeout, expire)  # type: ignore[union-attr]

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
