"""Redis retention (the twin of :mod:`.sqlite_retention`).

The queue scripts keep, per message, how many recipients have work left
(``m:<mid>`` field ``active``); the one that ends the last puts the message in
``finished`` or ``finished:dead`` (some recipient failed), scored by when it
finished (:mod:`.redis_scripts`, ``ended``). A sweep step takes the messages
whose retention has passed: the first script call marks one ``deleting`` (from
then on it is gone for every reader) and drops its replay, idempotency and
collapse keys and dead-letter entries; that call and the next ones delete its
recipients, :data:`~.base.SWEEP_CHUNK` at a time from the last, with what the
callback indexes (``smid:``, ``cmid:``, ``conv:``) and the rate limits'
``sent:`` sets knew of them. ``sweeping`` names a message whose recipients are
still being deleted, so a step that died half-way is finished by the next.

Messages stored before this release have no count: a walk over ``m:*`` (a
``SCAN`` of a few hundred keys per step, its cursor in ``sweep:legacy``)
counts each once. The sweep forgets users whose presence reports are all older
than the retention (``presence:<user>`` and their entries in ``users:known``/
``users:online``); the key also expires two hours after its last report, a
backstop in Redis's own time.
"""

from __future__ import annotations

from typing import Any

from .base import SWEEP_CHUNK, Retention, Swept
from .redis_errors import translated

PRESENCE_EXPIRE_MS = 2 * 3_600_000  # key expiry of presence:<user>: a backstop behind the sweep
LEGACY_SCAN = 200  # m:* keys the walk over messages stored before retention looks at per step
LEGACY_DONE = "done"

# ARGV[4..]: finished before (ms), dead letters finished before (ms), recipients to delete at most.
# Returns {messages taken, recipients deleted}.
SWEEP = r"""
local finished_before, dead_before, limit = ARGV[4], ARGV[5], tonumber(ARGV[6])
local taken = 0
local mid = redis.call('ZRANGE', P .. 'sweeping', 0, 0)[1]
if not mid then
  mid = redis.call('ZRANGEBYSCORE', P .. 'finished', '-inf', finished_before, 'LIMIT', 0, 1)[1]
    or redis.call('ZRANGEBYSCORE', P .. 'finished:dead', '-inf', dead_before, 'LIMIT', 0, 1)[1]
  if not mid then return {0, 0} end
  local key = P .. 'm:' .. mid
  local m = redis.call('HMGET', key, 'client', 'idempotency_key', 'replay_key', 'collapse_key', 'type',
                       'recipient_count')
  local function drop_if_ours(k) if redis.call('GET', k) == mid then redis.call('DEL', k) end end
  if not blank(m[3]) then drop_if_ours(P .. 'replay:' .. m[3]) end
  if not blank(m[2]) then drop_if_ours(P .. 'idem:' .. m[1] .. ':' .. m[2]) end
  if not blank(m[4]) then redis.call('ZREM', P .. 'collapse:' .. m[1] .. ':' .. m[4], mid) end
  if m[5] then redis.call('ZREM', P .. 'started:' .. m[5], mid) end
  for _, k in ipairs({'finished', 'finished:dead', 'dead'}) do redis.call('ZREM', P .. k, mid) end
  redis.call('DEL', P .. 'failed:' .. mid, P .. 'mt:' .. mid)
  redis.call('LREM', P .. 'recent', 0, mid)
  redis.call('HSET', key, 'deleting', 1, 'left', tonumber(m[6] or 0))
  redis.call('ZADD', P .. 'sweeping', 0, mid)
  taken = 1
end
local key = P .. 'm:' .. mid
local m = redis.call('HMGET', key, 'left', 'type')
local left = tonumber(m[1] or 0)
local stop = math.max(left - limit, 0)
for seq = left - 1, stop, -1 do
  local member = mid .. ':' .. seq
  local f = redis.call('HMGET', rkey(member), 'kind', 'target', 'server_msg_id', 'client_msg_id',
                       'conversation_id', 'msg_seq', 'sent_ms')
  if f[3] then redis.call('SREM', P .. 'smid:' .. f[3], member) end
  if f[4] then redis.call('SREM', P .. 'cmid:' .. f[4], member) end
  if f[5] then redis.call('SREM', conv_key(f[5], f[6]), member) end
  if f[7] and f[2] and m[2] then
    -- Python's _sent_key counts characters: the bytes of UTF-8 that start one
    local _, chars = string.gsub(f[2], '[^\128-\191]', '')
    redis.call('ZREM', P .. 'sent:' .. f[1] .. ':' .. chars .. ':' .. f[2] .. ':' .. m[2], member)
  end
  redis.call('DEL', rkey(member))
end
if stop == 0 then
  redis.call('DEL', key)
  redis.call('ZREM', P .. 'sweeping', mid)
else
  redis.call('HSET', key, 'left', stop)
end
return {taken, left - stop}
"""

# ARGV[4..]: now, then message ids stored before retention. Counts each one's recipients with
# work left; one without any is finished now.
COUNT_ACTIVE = r"""
local now = ARGV[4]
local ACTIVE = {queued = true, held = true, sending = true}
for i = 5, #ARGV do
  local mid = ARGV[i]
  local key = P .. 'm:' .. mid
  local m = redis.call('HMGET', key, 'recipient_count', 'active', 'deleting')
  if m[1] and not m[2] and not m[3] then
    local active = 0
    for seq = 0, tonumber(m[1]) - 1 do
      if ACTIVE[redis.call('HGET', rkey(mid .. ':' .. seq), 'status') or ''] then active = active + 1 end
    end
    redis.call('HSET', key, 'active', active)
    if active == 0 then note_finished(mid, now) end
  end
end
return 0
"""

# ARGV[4..]: before (ms), then users. Forgets the users whose every presence report is older.
FORGET_PRESENCE = r"""
local before = tonumber(ARGV[4])
local n = 0
for i = 5, #ARGV do
  local user = ARGV[i]
  local newest = nil
  for _, v in ipairs(redis.call('HVALS', P .. 'presence:' .. user)) do
    local updated = tonumber(string.match(v, ':(%-?%d+)$'))
    if newest == nil or updated > newest then newest = updated end
  end
  if newest == nil or newest < before then
    redis.call('DEL', P .. 'presence:' .. user)
    redis.call('SREM', P .. 'users:known', user)
    redis.call('SREM', P .. 'users:online', user)
    n = n + 1
  end
end
return n
"""

SCRIPTS = {"sweep": SWEEP, "count_active": COUNT_ACTIVE, "forget_presence": FORGET_PRESENCE}


class RedisRetentionMixin:
    """``sweep`` for :class:`.redis.RedisStore`."""

    prefix: str
    _redis: Any  # redis.Redis, provided by RedisStore
    _presence_cursor = 0  # SSCAN cursor over users:known (0: start over)

    def _k(self, name: str) -> str: ...  # provided by RedisStore
    def _run(self, name: str, *args: Any, client: Any = None) -> Any: ...  # provided by RedisStore

    @translated
    def sweep(self, now_ms: int, retention: Retention, budget: int = SWEEP_CHUNK) -> Swept:
        swept = Swept()
        counted_all = self._count_legacy(now_ms)
        while swept.recipients < budget:
            taken, deleted = self._run("sweep", now_ms - retention.finished_ms, now_ms - retention.dead_letter_ms,
                                       min(budget - swept.recipients, SWEEP_CHUNK))
            if not taken and not deleted:
                break
            swept.messages, swept.recipients = swept.messages + int(taken), swept.recipients + int(deleted)
        walked_all = self._forget_presence(now_ms - retention.presence_ms, budget, swept)
        swept.more = bool(swept.messages or swept.recipients) or not (counted_all and walked_all)
        return swept

    def _count_legacy(self, now_ms: int) -> bool:
        """Count the work left of the next messages stored before retention; True when none is left."""
        key = self._k("sweep:legacy")
        cursor = self._redis.get(key) or "0"
        if cursor == LEGACY_DONE:
            return True
        cursor, keys = self._redis.scan(int(cursor), match=self._k("m:*"), count=LEGACY_SCAN)
        message_ids = [k[len(self._k("m:")):] for k in keys]
        if message_ids:
            self._run("count_active", now_ms, *message_ids)
        self._redis.set(key, LEGACY_DONE if int(cursor) == 0 else str(cursor))
        return int(cursor) == 0

    def _forget_presence(self, before_ms: int, budget: int, swept: Swept) -> bool:
        """Drop users from the next *budget* of users:known whose reports are all older than
        *before_ms*; True when the walk over users:known came round."""
        self._presence_cursor, users = self._redis.sscan(self._k("users:known"), self._presence_cursor, count=budget)
        if users:
            swept.presence += int(self._run("forget_presence", before_ms, *users))
        return self._presence_cursor == 0
