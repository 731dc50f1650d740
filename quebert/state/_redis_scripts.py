"""
The Lua scripts of :mod:`quebert.state.redis` (data layout: see there).

Every write goes through ``apply``, in batches; ``get`` and ``list`` read
records back as JSON text.  Each script is sent by its SHA1 (``EVALSHA``),
with its source as the fallback when Redis does not know it yet.

(Over 700 lines: it is the Lua source of every script, kept in one module
so that the data layout they share is written and reviewed in one place.)
"""

from __future__ import annotations

import hashlib

#: How many due entries of ``idx:expiry`` one write examines at most.
PRUNE_BATCH = 50

# Every write goes through this one script, in batches: ARGV[1] prefix,
# ARGV[2] ttl in ms, ARGV[3] history limit, ARGV[4] a JSON array of writes,
# ARGV[5] '1' to prune expired index entries too, ARGV[6] the tombstone of
# unique names in ms, ARGV[7] (optional) the channel told which tasks the
# batch settled: one PUBLISH per batch, the ids joined by newlines, for
# those waiting for results (quebert.results).
# Each write is a flat array
#   [kind, id, at, queue, kind, task, name, eta, created_at, ...]
# with the info fields as hash values (null when unknown), followed by
#   'e' (enqueued):  state, and optionally the arguments' JSON text
#   's' (started):   attempt, worker
#   'f' (finished):  attempt, state, result, error, reason, retry_at
#   'n' (enqueued with a unique name): state; refused when the name is held
#   'c' (cancel):    reason
#   'r' (release a name the task holds)
#   'q' (requeued): a failed task goes back to queued, its name live again
#   'p' (pause) / 'u' (unpause): the id field holds a queue name
# where result and error are JSON texts and numbers (attempt, at, eta...)
# strings in their exact hash form: Python encodes each value once, the
# script names the fields.  Writes apply in order and the whole batch is
# atomic.  The answer is the number of expired index entries examined, or,
# when a write has something to say, an array: that number followed by
# pairs of (write's position, answer):
#   's' refused because the task was canceled: 'canceled'
#   's' refused because this attempt or a later one already started: 'duplicate'
#   'n' refused: 'held:' .. id of the task holding the name
#   'c', 'q': the state the task was in ('missing' when there is no record)
_APPLY = """
local prefix = ARGV[1]
-- retention in ms by outcome ('0': forever): 'succeeded,failed,canceled',
-- or one number for all three
local ttls = {}
do
  local a, b, c = string.match(ARGV[2], '^(%d+),(%d+),(%d+)$')
  if a then
    ttls.succeeded, ttls.failed, ttls.canceled = tonumber(a), tonumber(b), tonumber(c)
  else
    local t = tonumber(ARGV[2])
    ttls.succeeded, ttls.failed, ttls.canceled = t, t, t
  end
end
local history_limit = tonumber(ARGV[3])
local ops = cjson.decode(ARGV[4])
local tombstone_ms = tonumber(ARGV[6] or '3600000')
local settled_channel = ARGV[7]
local settled, ns = {}, 0
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
local name_prefix = prefix .. 'name:'
local answers, na = {}, 0
local function answer(position, value)
  answers[na + 1] = position; answers[na + 2] = value; na = na + 2
end
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

-- A history of DERIVED ('{}') holds one entry, the latest attempt's, which
-- the record's own fields describe: attempts, state, worker, started_at,
-- finished_at (updated_at while scheduled), error and retry_at (eta while
-- scheduled).  The common record (one attempt) then keeps every value
-- short, so Redis stores its hash as a listpack, at under half the memory
-- of a hash table, and no write builds or rewrites history text.  A write
-- after which those fields would no longer describe the entry (another
-- attempt, a cancel, a requeue) first writes the entry out as JSON.
-- '{}' because earlier versions read it as an empty history: during a
-- rolling upgrade their readers show no entry, and their writers start a
-- fresh history, rather than failing.
local DERIVED = '{}'

local function derived_text()
  local r = call('HMGET', key, 'attempts', 'state', 'worker', 'started_at', 'finished_at',
                 'error', 'eta', 'updated_at')
  local state = r[2] or 'queued'
  local finished_at, retry_at = r[5], nil
  if state == 'scheduled' then
    finished_at, retry_at = r[8], r[7]
  elseif finished[state] and not finished_at then
    finished_at = r[8]
  end
  local worker = 'null'
  if r[3] then worker = cjson.encode(r[3]) end
  return entry_text(r[1] or '0', '"' .. state .. '"', worker, r[4] or 'null',
    finished_at or 'null', r[6] or 'null', retry_at or 'null')
end

-- the history of the record as JSON text ('[]' when it has none)
local function written_history(raw)
  if raw == DERIVED then return '[' .. derived_text() .. ']' end
  if not raw then return '[]' end
  return raw
end

-- before a write that changes the fields a DERIVED history is read from
local function write_out_history()
  local raw = call('HGET', key, 'history')
  if raw == DERIVED then call('HSET', key, 'history', written_history(raw)) end
end

-- The history (JSON text, or false) with the entry of attempt replaced by
-- the text fresh (replace), or merged with the outcome (state, finished_at,
-- err, retry_at: JSON texts), keeping the latest history_limit entries.
-- Same rule as quebert.state._records.upsert_history.
local function upsert_history(raw, attempt, fresh, replace, state, finished_at, err, retry_at)
  if not raw or raw == '[]' then return '[' .. fresh .. ']' end
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

-- Records written before this layout (they have an 'id' field) were also
-- indexed in idx:all, idx:queue:<queue> and, once finished, idx:expiry
-- ([id, queue] by finish time): their entries there are dropped once
-- their hash has expired, as those versions did.
local function prune_legacy(now)
  local ttl = math.min(ttls.succeeded, ttls.failed, ttls.canceled)
  if ttl <= 0 then ttl = math.max(ttls.succeeded, ttls.failed, ttls.canceled) end
  if ttl <= 0 then return 0 end
  local horizon = tonumber(now) - ttl / 1000
  local expiry = expiry_key
  local due = call('ZRANGEBYSCORE', expiry, '-inf', fmt('%.17g', horizon), 'LIMIT', 0,
                   __PRUNE_BATCH__)
  if #due == 0 then return 0 end
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

-- Drop the finished records whose retention (counted from their finish,
-- the score of their state's index) has passed, with their index entries,
-- at most __PRUNE_BATCH__ per outcome; their hashes' own expiry does the
-- same when no write comes.  The answer: the most entries one index had due.
local function prune(now)
  local most = 0
  for state in pairs(finished) do
    local ttl = ttls[state]
    if ttl > 0 then
      local index = state_key(state)
      local due = call('ZRANGEBYSCORE', index, '-inf', fmt('%.17g', tonumber(now) - ttl / 1000),
                       'LIMIT', 0, __PRUNE_BATCH__)
      local n = #due
      if n > 0 then
        local keys = {}
        for i = 1, n do keys[i] = task_prefix .. due[i] end
        call('DEL', unpack(keys))
        call('ZREM', index, unpack(due))
        if n > most then most = n end
      end
    end
  end
  local legacy = prune_legacy(now)
  if legacy > most then most = legacy end
  return most
end

-- move the id to its state's index and set or clear the expiry; legacy:
-- the record was written by an earlier layout (it has an 'id' field), whose
-- other indexes it leaves now
local function reindex(old_state, old_queue, state, legacy)
  if old_state and old_state ~= state then
    zrem(state_key(old_state), id)
  end
  zadd(state_key(state), at, id)
  if legacy then
    zrem(all_key, id)
    if old_queue then zrem(queue_key(old_queue), id) end
    call('HDEL', key, 'id')
  end
  if finished[state] then
    if old_state ~= state then ns = ns + 1; settled[ns] = id end
    local ttl = ttls[state]
    if ttl > 0 then
      call('PEXPIRE', key, ttl)
    elseif old_state and finished[old_state] then
      call('PERSIST', key)
    end
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
    f[n + 1] = 'created_at'
    if op[9] ~= null then f[n + 2] = op[9] else f[n + 2] = at end
    n = n + 2
    if keep_eta and op[8] ~= null then f[n + 1] = 'eta'; f[n + 2] = op[8]; n = n + 2 end
  end
  return n, queue
end

local function enqueued(op)
  if call('EXISTS', key) == 1 then
    -- a worker started the task before its producer's write arrived: the
    -- record stays as it is, but for the arguments only the producer knows
    if op[11] and op[11] ~= null then call('HSETNX', key, 'arguments', op[11]) end
    return 0
  end
  local state = op[10]
  local f = {'state', state, 'attempts', '0', 'updated_at', at, 'history', '[]'}
  local n, queue = add_info(f, 8, op, true, true)
  if op[11] and op[11] ~= null then f[n + 1] = 'arguments'; f[n + 2] = op[11] end
  call('HSET', key, unpack(f))
  reindex(false, false, state, false)
  return 1
end

-- the unique name of the task starts its tombstone period
local function tombstone(name)
  if name and name ~= null then
    local nk = name_prefix .. name
    if call('GET', nk) == id then call('PEXPIRE', nk, tombstone_ms) end
  end
end

-- a record that is not finished becomes canceled (its finished_at is its
-- updated_at, which no later write of a finished record changes)
local function cancel_record(old_state, old_queue, name, reason, legacy)
  write_out_history()
  call('HSET', key, 'state', 'canceled', 'updated_at', at, 'reason', reason)
  reindex(old_state, old_queue, 'canceled', legacy)
  tombstone(name)
end

local function started(op, position)
  local attempt_s, worker = op[10], op[11]
  local attempt = tonumber(attempt_s)
  local old = call('HMGET', key, 'state', 'queue', 'attempts', 'history', 'cancel_requested',
                   'name', 'id')
  local old_state, old_queue = old[1], old[2]
  if old_state == 'canceled' or (old[5] and not finished[old_state]) then
    -- canceled before this attempt could start: it never runs
    if old_state ~= 'canceled' then
      cancel_record(old_state, old_queue, old[6], 'canceled before attempt ' .. attempt_s
                    .. ' started', old[7])
    end
    answer(position, 'canceled')
    return 0
  end
  if old_state then
    -- A late or replayed 'started' never rewinds a record past this attempt,
    -- and a second copy of the task does not start the same attempt again.
    local old_attempts = tonumber(old[3]) or 0
    if old_attempts > attempt or (old_attempts == attempt
                                  and (outcome[old_state] or old_state == 'running')) then
      answer(position, 'duplicate')
      return 0
    end
  end
  local f = {'state', 'running', 'attempts', attempt_s, 'started_at', at, 'updated_at', at}
  local n, queue = add_info(f, 8, op, not old_state, true)
  if worker ~= null then
    f[n + 1] = 'worker'; f[n + 2] = worker; n = n + 2
  end
  local raw = old[4]
  if not raw or raw == '[]' then
    f[n + 1] = 'history'; f[n + 2] = DERIVED; n = n + 2
  elseif raw ~= DERIVED or (tonumber(old[3]) or 0) ~= attempt then
    -- (from DERIVED: another attempt, so the entry the fields describe is
    -- written out first; a replayed start of the same attempt keeps it)
    local worker_json = 'null'
    if worker ~= null then worker_json = cjson.encode(worker) end
    local fresh = '{"attempt":' .. attempt_s .. ',"state":"running","worker":' .. worker_json
      .. ',"started_at":' .. at .. ',"finished_at":null,"error":null,"retry_at":null}'
    f[n + 1] = 'history'; f[n + 2] = upsert_history(written_history(raw), attempt, fresh, true)
    n = n + 2
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
  reindex(old_state, old_queue, 'running', old[7])
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
  local old = call('HMGET', key, 'state', 'queue', 'attempts', 'history', 'cancel_requested',
                   'name', 'id')
  local old_state, old_queue = old[1], old[2]
  if old[5] and state == 'scheduled' then
    -- a retry of a task whose cancellation was asked for: it ends here
    state = 'canceled'
    if reason == null then reason = 'canceled while attempt ' .. attempt_s .. ' ran' end
  end
  local f = {'state', state, 'updated_at', at}
  local n, queue = add_info(f, 4, op, not old_state, state ~= 'scheduled')
  -- outcome fields: set, or cleared unless the record cannot hold them
  local clear, c = {}, 0
  local dirty = old_state and not clean[old_state]
  -- finished_at is not stored: a finished record's updated_at says it
  if dirty then c = c + 1; clear[c] = 'finished_at' end
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
  local raw = old[4]
  -- the fields describe the entry, unless a retry time outlives its state
  local derivable = state == 'scheduled' or retry_at == 'null'
  local empty = not raw or raw == '[]'
  if derivable and (empty or (raw == DERIVED and (tonumber(old[3]) or 0) == attempt)) then
    if empty then f[n + 1] = 'history'; f[n + 2] = DERIVED; n = n + 2 end
  else
    local state_json = '"' .. state .. '"'
    local fresh = '{"attempt":' .. attempt_s .. ',"state":' .. state_json
      .. ',"worker":null,"started_at":null,"finished_at":' .. at .. ',"error":' .. err
      .. ',"retry_at":' .. retry_at .. '}'
    f[n + 1] = 'history'
    if empty then
      f[n + 2] = '[' .. fresh .. ']'
    else
      f[n + 2] = merge_outcome(written_history(raw), attempt, attempt_s, fresh, state_json, at,
                               err, retry_at)
    end
    n = n + 2
  end
  call('HSET', key, unpack(f))
  if c > 0 then call('HDEL', key, unpack(clear)) end
  reindex(old_state, old_queue, state, old[7])
  if finished[state] then
    if op[7] ~= null then tombstone(op[7]) else tombstone(old[6]) end
  end
  return 1
end

local function enqueued_named(op, position)
  local name = op[7]
  local holder = call('GET', name_prefix .. name)
  if holder and holder ~= id then
    answer(position, 'held:' .. holder)
    return 0
  end
  call('SET', name_prefix .. name, id)
  return enqueued(op)
end

local function cancel(op, position)
  local old = call('HMGET', key, 'state', 'queue', 'name', 'id')
  local old_state = old[1]
  if not old_state then
    answer(position, 'missing')
    return 0
  end
  answer(position, old_state)
  if finished[old_state] then return 0 end
  local reason = op[4]
  if reason == null then reason = 'canceled' end
  call('HSET', key, 'cancel_requested', at)
  if old_state ~= 'running' then
    cancel_record(old_state, old[2], old[3], reason, old[4])
  end
  return 1
end

local function requeued(op, position)
  local old = call('HMGET', key, 'state', 'queue', 'name', 'id')
  local old_state = old[1]
  if not old_state then
    answer(position, 'missing')
    return 0
  end
  answer(position, old_state)
  if old_state ~= 'failed' then return 0 end
  write_out_history()
  call('HSET', key, 'state', 'queued', 'updated_at', at)
  call('HDEL', key, 'finished_at', 'result', 'error', 'reason', 'cancel_requested', 'eta')
  call('PERSIST', key)
  reindex(old_state, old[2], 'queued', old[4])
  if old[3] then
    local nk = name_prefix .. old[3]
    local holder = call('GET', nk)
    if not holder or holder == id then call('SET', nk, id) end
  end
  return 1
end

local function release(op)
  local nk = name_prefix .. op[4]
  if call('GET', nk) == id then call('DEL', nk) end
  return 1
end

local latest = nil
for position, op in ipairs(ops) do
  id = op[2]
  key = task_prefix .. id
  at = op[3]
  local kind = op[1]
  if kind == 's' then
    started(op, position)
  elseif kind == 'f' then
    finish(op)
  elseif kind == 'e' then
    enqueued(op)
  elseif kind == 'n' then
    enqueued_named(op, position)
  elseif kind == 'c' then
    cancel(op, position)
  elseif kind == 'r' then
    release(op)
  elseif kind == 'q' then
    requeued(op, position)
  elseif kind == 'p' then
    call('SADD', prefix .. 'paused', id)
  elseif kind == 'u' then
    call('SREM', prefix .. 'paused', id)
  end
  latest = at
end
apply_changes()
if ns > 0 and settled_channel and settled_channel ~= '' then
  call('PUBLISH', settled_channel, concat(settled, '\\n', 1, ns))
end
-- ARGV[5] '1': prune.  The answer is one integer, the number of expired
-- index entries examined: a reply of one element per write would cost the
-- worker more to parse than the writes cost Redis.
local examined = 0
if latest and ARGV[5] == '1' then examined = prune(latest) end
if na == 0 then return examined end
local reply = {examined}
for i = 1, na do reply[i + 1] = answers[i] end
return reply
""".replace("__PRUNE_BATCH__", str(PRUNE_BATCH))

# ARGV: prefix, worker id, ttl ms ('0': the worker is gone), and optionally
# the worker's description (JSON text) for the console.  The set
# {prefix}workers lists the workers by expiry (ms), so that they can be
# listed without a scan of the keyspace.
_WORKER_BEAT = """
local key = ARGV[1] .. 'worker:' .. ARGV[2]
local listed = ARGV[1] .. 'workers'
if ARGV[3] == '0' then
  redis.call('ZREM', listed, ARGV[2])
  return redis.call('DEL', key)
end
redis.call('SET', key, ARGV[4] or '1', 'PX', ARGV[3])
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('ZADD', listed, now_ms + tonumber(ARGV[3]), ARGV[2])
return 1
"""

# ARGV: prefix.  The descriptions of the workers whose beat still lasts, as
# a flat array of id, JSON text (or '1' for a worker that sent none), ms left.
_WORKERS = """
local listed = ARGV[1] .. 'workers'
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('ZREMRANGEBYSCORE', listed, '-inf', now_ms)
local ids = redis.call('ZRANGE', listed, 0, 999, 'WITHSCORES')
local out = {}
for i = 1, #ids, 2 do
  local value = redis.call('GET', ARGV[1] .. 'worker:' .. ids[i])
  if value then
    out[#out + 1] = ids[i]
    out[#out + 1] = value
    out[#out + 1] = tostring(tonumber(ids[i + 1]) - now_ms)
  end
end
return out
"""

# ARGV: prefix, then the states: how many ids each state's index holds
# (records expired since the last pruning included).
_COUNTS = """
local out = {}
for i = 2, #ARGV do
  out[i - 1] = redis.call('ZCARD', ARGV[1] .. 'idx:state:' .. ARGV[i])
end
return out
"""

# ARGV: prefix, worker id
_WORKER_ALIVE = """
local ttl = redis.call('PTTL', ARGV[1] .. 'worker:' .. ARGV[2])
if ttl < 0 then return 0 end
return ttl
"""

# ARGV: prefix
_PAUSED = """
return redis.call('SMEMBERS', ARGV[1] .. 'paused')
"""

# ARGV: prefix, id
_GET = """
local flat = redis.call('HGETALL', ARGV[1] .. 'task:' .. ARGV[2])
if #flat == 0 then return false end
local record = {}
for i = 1, #flat, 2 do record[flat[i]] = flat[i + 1] end
record.id = ARGV[2]
return cjson.encode(record)
"""

# The walk of the readers below: ids from the state's index, or from the
# six state indexes merged, newest first (by updated_at); each index is
# read in chunks as the walk reaches it.  walk(prefix, state, chunk, start)
# gives next (a function giving an id and the key of its index, or nil at
# the end) and how many of the first start entries it skipped already: one
# index starts at rank start at once, a merge has to be walked there.
_WALK = """
local STATES = {'queued', 'scheduled', 'running', 'succeeded', 'failed', 'canceled'}
local function walk(prefix, state, chunk, start)
  local cursors = {}
  local states, skipped = STATES, 0
  if state ~= '' then states, skipped = {state}, start end
  for i, s in ipairs(states) do
    cursors[i] = {key = prefix .. 'idx:state:' .. s, pos = skipped, buf = {}, i = 1, n = 0,
                  done = false}
  end
  local function ready(c)
    if c.i > c.n and not c.done then
      local r = redis.call('ZREVRANGE', c.key, c.pos, c.pos + chunk - 1, 'WITHSCORES')
      c.buf, c.i, c.n = r, 1, #r
      c.pos = c.pos + #r / 2
      if #r < chunk * 2 then c.done = true end
      for j = 2, #r, 2 do r[j] = tonumber(r[j]) end
    end
    return c.i <= c.n
  end
  -- ties: the greater id first, as ZREVRANGE orders one index
  return function()
    local best, bs, bid
    for _, c in ipairs(cursors) do
      if ready(c) then
        local s, cid = c.buf[c.i + 1], c.buf[c.i]
        if not best or s > bs or (s == bs and cid > bid) then best, bs, bid = c, s, cid end
      end
    end
    if not best then return nil end
    local id = best.buf[best.i]
    best.i = best.i + 2
    return id, best.key
  end, skipped
end
"""

# ARGV: prefix, state or '', queue or '', offset, limit, budget.  Records
# newest first: the state's index (all of them merged without a state) is
# walked from rank offset; with a queue, each record's queue is checked, at
# most budget entries examined.  Ids whose hash has expired are skipped and
# removed from their index.
_LIST = _WALK + """
local prefix, state, queue = ARGV[1], ARGV[2], ARGV[3]
local offset, limit, budget = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6] or '100000')
local out, dead = {}, {}
local next_id, skipped
if queue == '' then
  next_id, skipped = walk(prefix, state, math.max(limit + (state == '' and offset or 0), 50),
                         offset)
else
  next_id, skipped = walk(prefix, state, 200, 0)
end
local skip = offset - skipped
local examined = 0
while #out < limit and examined < budget do
  local id, index = next_id()
  if not id then break end
  examined = examined + 1
  local flat = redis.call('HGETALL', prefix .. 'task:' .. id)
  if #flat == 0 then
    dead[#dead + 1] = {index, id}
  else
    local record = {}
    for i = 1, #flat, 2 do record[flat[i]] = flat[i + 1] end
    if queue == '' or record.queue == queue then
      if skip > 0 then
        skip = skip - 1
      else
        record.id = id
        out[#out + 1] = cjson.encode(record)
      end
    end
  end
end
-- ids whose hash has expired
for _, d in ipairs(dead) do redis.call('ZREM', d[1], d[2]) end
return out
"""


# ARGV: prefix, task name, state or '', queue or '', position, limit, budget.
# Records of one task name, newest first: the state's index (all of them
# merged without a state) is walked from position, at most budget entries
# examined, each record's task (and queue) checked.  The answer is the
# position to go on from (-1: the end of the walk), then the records as
# JSON text.
_FIND = _WALK + """
local prefix, task, state, queue = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local pos, limit, budget = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local next_id, skipped = walk(prefix, state, math.min(200, pos + budget), pos)
for _ = skipped + 1, pos do
  if not next_id() then break end
end
local out, n, examined, ended = {}, 0, 0, false
while n < limit and examined < budget do
  local id = next_id()
  if not id then ended = true; break end
  pos = pos + 1
  examined = examined + 1
  local key = prefix .. 'task:' .. id
  local f = redis.call('HMGET', key, 'task', 'queue')
  if f[1] == task and (queue == '' or f[2] == queue) then
    local flat = redis.call('HGETALL', key)
    local record = {}
    for i = 1, #flat, 2 do record[flat[i]] = flat[i + 1] end
    record.id = id
    n = n + 1
    out[n + 1] = cjson.encode(record)
  end
end
if ended then out[1] = -1 else out[1] = pos end
return out
"""


class _Script:
    """A Lua script and its SHA1, computed once."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()


SCRIPTS = {
    name: _Script(name, source)
    for name, source in (
        ("apply", _APPLY),
        ("get", _GET),
        ("list", _LIST),
        ("find", _FIND),
        ("paused", _PAUSED),
        ("worker_beat", _WORKER_BEAT),
        ("workers", _WORKERS),
        ("counts", _COUNTS),
        ("worker_alive", _WORKER_ALIVE),
    )
}
