"""Lua sources of the Redis queue: every multi-key state change is one script.

Redis runs a script atomically, so each one is a transaction: no other
client sees a half-accepted message, and two replicas cannot lease the same
recipient. Every script starts with :data:`PRELUDE`, whose first three
arguments are the same for all of them (key prefix, the event types kept,
a random tag for event ids); a script's own arguments start at ``ARGV[4]``.
Python passes ``''`` for None (Lua tables cannot hold nil).

Keys are built inside the scripts from the prefix, so the backend needs one
Redis (or one primary with replicas), not a Cluster. The layout is described
in :mod:`.redis`.
"""

from __future__ import annotations

PRELUDE = r"""
local P = ARGV[1]
local EVENTS = ARGV[2]
local EVENT_TAG = ARGV[3]
local BAND = 1e13  -- due score = priority rank * BAND + due time in ms

local function rkey(member) return P .. 'r:' .. member end
local function message_of(member) return string.match(member, '^(.*):%d+$') end
local function seq_of(member) return string.match(member, ':(%d+)$') end
local function blank(v) return v == false or v == nil or v == '' end
local function conv_key(conversation, seq) return P .. 'conv:' .. #conversation .. ':' .. conversation .. ':' .. seq end

-- In the due set a member is '<message order:12 hex><seq:8 hex><message id>': ties in due
-- time then go in acceptance order (a counter per message), like SQLite's rowids.
local orders = {}
local function due_member(member)
  local mid, seq = string.match(member, '^(.*):(%d+)$')
  orders[mid] = orders[mid] or redis.call('HGET', P .. 'm:' .. mid, 'order')
  return orders[mid] .. string.format('%08x', tonumber(seq)) .. mid
end
local function member_of(due) return string.sub(due, 21) .. ':' .. tonumber(string.sub(due, 13, 20), 16) end

local function schedule(member, rank, due_ms)
  redis.call('ZADD', P .. 'due', tonumber(rank) * BAND + tonumber(due_ms), due_member(member))
end

-- the recipient has no work left: out of the queue, the expiry index and its user's held set
local function unschedule(member, target)
  redis.call('ZREM', P .. 'due', due_member(member))
  redis.call('ZREM', P .. 'expiry', member)
  redis.call('SREM', P .. 'held:' .. target, member)
end

local function set_or_clear(key, field, value)
  if blank(value) then redis.call('HDEL', key, field) else redis.call('HSET', key, field, value) end
end

-- owner held a lease on a message of type_ until until_ms (leases:<type>, leased_elsewhere)
local function note_lease(type_, owner, until_ms)
  local key = P .. 'leases:' .. type_
  local known = tonumber(redis.call('HGET', key, owner) or 0)
  if known < until_ms then redis.call('HSET', key, owner, until_ms) end
end

local function wants(type_) return string.find(EVENTS, ',' .. type_ .. ',', 1, true) ~= nil end

-- Retention: m:<mid> counts its recipients with work left ('active'); when the last one ends, the
-- message goes into 'finished' (or 'finished:dead' when one failed) scored by when it finished,
-- one period of its rate limit later for a rate-limited type (its sends count until then)
local PERIODS = {second = 1000, minute = 60000, hour = 3600000, day = 86400000}
local function note_finished(mid, now)
  local ok, d = pcall(cjson.decode, redis.call('HGET', P .. 'm:' .. mid, 'delivery') or '')
  local unit = ok and type(d) == 'table' and type(d.rate_limit) == 'string' and string.match(d.rate_limit, '^%d+/(%a+)$')
  local dead = redis.call('EXISTS', P .. 'failed:' .. mid) == 1
  redis.call('ZADD', P .. (dead and 'finished:dead' or 'finished'), tonumber(now) + (PERIODS[unit or ''] or 0), mid)
end

-- one recipient of message mid has no work left
local function ended(mid, now)
  local key = P .. 'm:' .. mid
  -- a message stored before retention has no count: the sweep counts it (redis_retention)
  if redis.call('HEXISTS', key, 'active') == 0 then return end
  if redis.call('HINCRBY', key, 'active', -1) <= 0 then note_finished(mid, now) end
end

-- one subscriber event; seq from a counter, the stream entry id is '<seq>-0'
local function emit(type_, data, now)
  if not wants(type_) then return end
  local seq = redis.call('INCR', P .. 'events:seq')
  redis.call('XADD', P .. 'events', seq .. '-0', 'id', 'evt_' .. EVENT_TAG .. string.format('%012x', seq),
             'type', type_, 'data', data, 'created_ms', now)
end

-- the data of a message event (recipient_data in Python); extra: raw JSON members or ''
local function recipient_json(member, kind, target, extra)
  local mid = message_of(member)
  local m = redis.call('HMGET', P .. 'm:' .. mid, 'type', 'client')
  local who = kind == 'user' and 'user_id' or 'group_id'
  local json = cjson.encode({message_id = mid, type = m[1], client = m[2], [who] = target})
  if extra ~= '' then json = string.sub(json, 1, -2) .. ',' .. extra .. '}' end
  return json
end
"""

# ARGV[4..]: id, client, idempotency key, request hash, replay key, created_ms,
# retention_ms, priority rank, expires_ms, target kind, collapse key, collapse reason,
# n, n message hash field/value items, then the targets (their index is the seq).
ACCEPT = r"""
local mid, client, idem, digest, replay = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local created, retention = tonumber(ARGV[9]), tonumber(ARGV[10])
local rank, expires, kind = ARGV[11], ARGV[12], ARGV[13]
local collapse, collapse_reason, nfields = ARGV[14], ARGV[15], tonumber(ARGV[16])
if replay ~= '' then
  local earlier = redis.call('GET', P .. 'replay:' .. replay)
  if earlier then return {'repeat', earlier, redis.call('HGET', P .. 'm:' .. earlier, 'recipient_count')} end
end
local idem_key = P .. 'idem:' .. client .. ':' .. idem
if idem ~= '' then
  local earlier = redis.call('GET', idem_key)
  if earlier then
    local m = redis.call('HMGET', P .. 'm:' .. earlier, 'created_ms', 'request_hash', 'recipient_count')
    if m[1] and tonumber(m[1]) > created - retention then
      if m[2] ~= digest then return {'mismatch', earlier} end
      return {'repeat', earlier, m[3]}
    end
  end
end
local fields = {'order', string.format('%012x', redis.call('INCR', P .. 'accepted')), 'active', #ARGV - 16 - nfields}
for i = 17, 16 + nfields do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', P .. 'm:' .. mid, unpack(fields))
local first = 17 + nfields
if collapse ~= '' then
  -- older live messages of this client with the same collapse key stop waiting for these recipients
  local ckey = P .. 'collapse:' .. client .. ':' .. collapse
  for _, older in ipairs(redis.call('ZRANGEBYSCORE', ckey, '(' .. created, '+inf')) do
    if older ~= mid then
      for i = first, #ARGV do
        local seq = redis.call('HGET', P .. 'mt:' .. older, ARGV[i])
        local member = older .. ':' .. tostring(seq)
        local f = seq and redis.call('HMGET', rkey(member), 'kind', 'status') or {}
        if seq and f[1] == kind and (f[2] == 'queued' or f[2] == 'held') then
          redis.call('HSET', rkey(member), 'status', 'skipped', 'reason', collapse_reason)
          unschedule(member, ARGV[i])
          ended(older, created)
        end
      end
    end
  end
  redis.call('ZADD', ckey, expires, mid)
end
for i = first, #ARGV do
  local seq = i - first
  local member = mid .. ':' .. seq
  redis.call('HSET', rkey(member), 'kind', kind, 'target', ARGV[i], 'status', 'queued', 'priority', rank,
             'next_attempt_ms', created, 'expires_ms', expires, 'attempts', 0)
  redis.call('HSET', P .. 'mt:' .. mid, ARGV[i], seq)
  schedule(member, rank, created)
  redis.call('ZADD', P .. 'expiry', expires, member)
end
if replay ~= '' then redis.call('SET', P .. 'replay:' .. replay, mid) end
-- created_ms decides whether a key is still retained; the PX only collects old keys
if idem ~= '' and retention > 0 then redis.call('SET', idem_key, mid, 'PX', retention) end
redis.call('LPUSH', P .. 'recent', mid)  -- the operator page lists the newest messages (up to 1000)
redis.call('LTRIM', P .. 'recent', 0, 999)
return {'created', mid, #ARGV - first + 1}
"""

# ARGV[4..]: now, limit, lease_ms, owner, placeholder operation id, number of priority bands, aging_ms.
# Returns {member, target, kind, attempts, counted, unknown operation id} per leased recipient.
LEASE = r"""
local now, limit, lease_ms = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local owner, placeholder, bands, aging = ARGV[7], ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10])
local SWEEP = 1000
local FIELDS = {'status', 'target', 'kind', 'next_attempt_ms', 'expires_ms', 'attempts', 'operation_id',
                'check_operation_id', 'priority'}

local function load(member)
  local values = redis.call('HMGET', rkey(member), unpack(FIELDS))
  local f = {}
  for i, name in ipairs(FIELDS) do f[name] = values[i] end
  return f
end

local function expire(member, f)
  local reason = 'ttl passed before delivery'
  if f.status == 'sending' then reason = "ttl passed; the last attempt's outcome is unknown"
  elseif f.status == 'held' then reason = 'ttl passed while the user was offline' end
  redis.call('HSET', rkey(member), 'status', 'expired', 'reason', reason)
  redis.call('HDEL', rkey(member), 'lease_owner')
  unschedule(member, f.target)
  ended(message_of(member), now)
  if wants('message.expired') then
    emit('message.expired', recipient_json(member, f.kind, f.target, '"reason":' .. cjson.encode(reason)), now)
  end
end

-- from now on this member's message may be sent: the rate limit's bounds count it (messages_started,
-- and leases:<type> for leased_elsewhere, written once per type below)
local started, leased_types = {}, {}
local function mark_started(mid)
  if started[mid] then return end
  started[mid] = true
  local m = redis.call('HMGET', P .. 'm:' .. mid, 'type', 'expires_ms')
  if not m[1] or not tonumber(m[2]) then return end  -- no usable message hash: its items fail on their own
  redis.call('ZADD', P .. 'started:' .. m[1], 'NX', m[2], mid)
  leased_types[m[1]] = true
end

local function take(member, f, out)
  mark_started(message_of(member))
  -- a member still 'sending' was leased by a worker that vanished: its attempt may have
  -- reached OpenIM, so the next one asks first (unless it never got its operationID)
  local unknown = f.check_operation_id
  if f.status == 'sending' and not blank(f.operation_id) and string.sub(f.operation_id, 1, 1) ~= '~' then
    unknown = f.operation_id
  end
  local counted = f.status ~= 'held'  -- a recheck of a held recipient is not a send attempt
  local attempts = tonumber(f.attempts) + (counted and 1 or 0)
  if f.status == 'held' then redis.call('SREM', P .. 'held:' .. f.target, member) end
  local key = rkey(member)
  redis.call('HSET', key, 'status', 'sending', 'lease_owner', owner, 'next_attempt_ms', now + lease_ms,
             'attempts', attempts, 'operation_id', placeholder)
  set_or_clear(key, 'check_operation_id', unknown)
  schedule(member, f.priority, now + lease_ms)
  out[#out + 1] = {member, f.target, f.kind, attempts, counted and 1 or 0, unknown or ''}
end

-- a recipient whose message hash is gone (evicted, deleted by hand) can never be sent: it leaves
-- the queue failed instead of failing every lease that meets it
local function orphaned(member, due)
  if due then redis.call('ZREM', P .. 'due', due) end
  redis.call('ZREM', P .. 'expiry', member)
  redis.call('HSET', rkey(member), 'status', 'failed', 'reason', 'its message is missing from Redis')
  redis.call('HDEL', rkey(member), 'lease_owner')
end
local function has_message(member)
  local mid = message_of(member)
  orders[mid] = orders[mid] or redis.call('HGET', P .. 'm:' .. mid, 'order')
  return orders[mid] ~= false and orders[mid] ~= nil
end

-- recipients past their TTL that are due end expired instead of being sent late
for _, member in ipairs(redis.call('ZRANGEBYSCORE', P .. 'expiry', '-inf', now, 'LIMIT', 0, SWEEP)) do
  local f = load(member)
  if not has_message(member) then orphaned(member, nil)
  elseif tonumber(f.next_attempt_ms) <= now then expire(member, f) end
end

-- no starvation: due for aging_ms, low counts as normal; for twice that, anything as high
local function promote(from, to, due_before)
  local low = from * BAND
  local found = redis.call('ZRANGEBYSCORE', P .. 'due', low, low + due_before, 'WITHSCORES')
  for i = 1, #found, 2 do
    redis.call('ZREM', P .. 'due', found[i])
    local member = member_of(found[i])
    redis.call('HSET', rkey(member), 'priority', to)
    schedule(member, to, tonumber(found[i + 1]) - low)
  end
end
if bands > 2 and now - aging >= 0 then promote(2, 1, now - aging) end
if bands > 1 and now - 2 * aging >= 0 then promote(1, 0, now - 2 * aging) end

local out = {}
for rank = 0, bands - 1 do
  local low = rank * BAND
  for _ = 1, 100 do  -- again only while expiring made room in this band
    if #out >= limit then break end
    local members = redis.call('ZRANGEBYSCORE', P .. 'due', low, low + now, 'LIMIT', 0, limit - #out)
    local expired = 0
    for _, due in ipairs(members) do
      local member = member_of(due)
      local f = load(member)
      if not has_message(member) then orphaned(member, due); expired = expired + 1
      elseif tonumber(f.expires_ms) <= now then expire(member, f); expired = expired + 1 else take(member, f, out) end
    end
    if expired == 0 then break end
  end
end
for type_ in pairs(leased_types) do note_lease(type_, owner, now + lease_ms) end
return out
"""

# ARGV[4..]: owner, placeholder, then (member, operation id) pairs. Returns 1/0 per pair.
STAMP = r"""
local out = {}
for i = 6, #ARGV, 2 do
  local key = rkey(ARGV[i])
  local f = redis.call('HMGET', key, 'lease_owner', 'operation_id')
  if f[1] == ARGV[4] and f[2] == ARGV[5] then
    redis.call('HSET', key, 'operation_id', ARGV[i + 1])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

COMPLETE_FIELDS = 15
# ARGV[4..]: now, then per outcome: member, operation id, owner, status, error, reason,
# next_attempt_ms, unknown operation id, server_msg_id, client_msg_id, sent_ms, sent index key,
# uncount (1: nothing was sent, this lease is no attempt), event type, event data.
COMPLETE = r"""
local now = tonumber(ARGV[4])
local WAITING = {queued = true, held = true}
local done = 0
for i = 5, #ARGV, 15 do
  local member, status = ARGV[i], ARGV[i + 3]
  local key = rkey(member)
  local f = redis.call('HMGET', key, 'status', 'operation_id', 'lease_owner', 'target', 'kind', 'priority',
                       'next_attempt_ms')
  -- recorded only while this worker still holds the lease of this attempt
  if f[1] == 'sending' and f[2] == ARGV[i + 1] and f[3] == ARGV[i + 2] then
    local due = ARGV[i + 6] ~= '' and ARGV[i + 6] or f[7]
    redis.call('HSET', key, 'status', status, 'next_attempt_ms', due)
    redis.call('HDEL', key, 'lease_owner')
    set_or_clear(key, 'last_error', ARGV[i + 4])
    set_or_clear(key, 'reason', ARGV[i + 5])
    set_or_clear(key, 'check_operation_id', ARGV[i + 7])
    if ARGV[i + 8] ~= '' then
      redis.call('HSET', key, 'server_msg_id', ARGV[i + 8])
      redis.call('SADD', P .. 'smid:' .. ARGV[i + 8], member)
    end
    if ARGV[i + 9] ~= '' then
      redis.call('HSET', key, 'client_msg_id', ARGV[i + 9])
      redis.call('SADD', P .. 'cmid:' .. ARGV[i + 9], member)
    end
    if ARGV[i + 10] ~= '' then
      redis.call('HSET', key, 'sent_ms', ARGV[i + 10])
      redis.call('ZADD', P .. ARGV[i + 11], ARGV[i + 10], member)  -- for rate limits per type and recipient
    end
    if ARGV[i + 12] == '1' then redis.call('HINCRBY', key, 'attempts', -1) end
    if WAITING[status] then
      schedule(member, f[6], due)
      if status == 'held' and f[5] == 'user' then redis.call('SADD', P .. 'held:' .. f[4], member) end
    else
      unschedule(member, f[4])
    end
    if status == 'failed' then
      redis.call('ZADD', P .. 'dead', 'NX', now, message_of(member))
      redis.call('SADD', P .. 'failed:' .. message_of(member), seq_of(member))
    end
    if ARGV[i + 13] ~= '' then emit(ARGV[i + 13], ARGV[i + 14], now) end
    if not WAITING[status] then ended(message_of(member), now) end
    done = done + 1
  end
end
return done
"""

# ARGV[4..]: now, lease_ms, then (member, operation id, owner) triples. Returns 1/0 per triple.
RENEW = r"""
local until_ms = tonumber(ARGV[4]) + tonumber(ARGV[5])
local out = {}
for i = 6, #ARGV, 3 do
  local key = rkey(ARGV[i])
  local f = redis.call('HMGET', key, 'status', 'operation_id', 'lease_owner', 'priority')
  if f[1] == 'sending' and f[2] == ARGV[i + 1] and f[3] == ARGV[i + 2] then
    redis.call('HSET', key, 'next_attempt_ms', until_ms)
    schedule(ARGV[i], f[4], until_ms)
    note_lease(redis.call('HGET', P .. 'm:' .. message_of(ARGV[i]), 'type'), f[3], until_ms)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# ARGV[4..]: now, then (member, operation id, owner, counted 1/0) quads. Returns how many were given back.
RELEASE = r"""
local now = tonumber(ARGV[4])
local n = 0
for i = 5, #ARGV, 4 do
  local key = rkey(ARGV[i])
  local f = redis.call('HMGET', key, 'status', 'operation_id', 'lease_owner', 'priority', 'attempts')
  if f[1] == 'sending' and f[2] == ARGV[i + 1] and f[3] == ARGV[i + 2] then
    redis.call('HSET', key, 'status', 'queued', 'next_attempt_ms', now,
               'attempts', tonumber(f[5]) - tonumber(ARGV[i + 3]))
    redis.call('HDEL', key, 'lease_owner')
    schedule(ARGV[i], f[4], now)
    n = n + 1
  end
end
return n
"""

# ARGV[4..]: message id, now. Queues the failed recipients of one dead letter again.
REPLAY = r"""
local mid, now = ARGV[4], tonumber(ARGV[5])
if not redis.call('ZSCORE', P .. 'dead', mid) then return 0 end
local n = 0
for _, seq in ipairs(redis.call('SMEMBERS', P .. 'failed:' .. mid)) do
  local member = mid .. ':' .. seq
  local key = rkey(member)
  local f = redis.call('HMGET', key, 'status', 'priority', 'expires_ms')
  if f[1] == 'failed' then
    redis.call('HSET', key, 'status', 'queued', 'attempts', 0, 'next_attempt_ms', now)
    redis.call('HDEL', key, 'reason', 'check_operation_id')
    schedule(member, f[2], now)
    redis.call('ZADD', P .. 'expiry', f[3], member)
    n = n + 1
  end
end
redis.call('DEL', P .. 'failed:' .. mid)
redis.call('ZREM', P .. 'dead', mid)
if n > 0 and redis.call('HEXISTS', P .. 'm:' .. mid, 'active') == 1 then  -- work again: not finished
  redis.call('HINCRBY', P .. 'm:' .. mid, 'active', n)
  redis.call('ZREM', P .. 'finished', mid)
  redis.call('ZREM', P .. 'finished:dead', mid)
end
return n
"""

# KEYS[1]: the lock; ARGV[1]: owner, ARGV[2]: ttl_ms. Taken when free or already ours (then renewed).
TRY_LOCK = r"""
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS[1]: the lock; ARGV[1]: owner. Released only by its holder.
UNLOCK = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""

# run after PRELUDE; the tracking scripts (callbacks, presence, events) are in .redis_tracking
QUEUE = {"accept": ACCEPT, "lease": LEASE, "stamp": STAMP, "complete": COMPLETE, "renew": RENEW,
         "release": RELEASE, "replay": REPLAY}
STANDALONE = {"try_lock": TRY_LOCK, "unlock": UNLOCK}
