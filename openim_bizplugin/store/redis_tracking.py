"""Redis storage for what happens after sending (the twin of :mod:`.sqlite_tracking`).

The callback inbox, presence per user and platform, the recipient updates
callbacks cause, and the event outbox for subscribers. Each change and the
events it causes are one Lua script, so no event is emitted for a change that
did not happen. Mixed into :class:`.redis.RedisStore`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..errors import StorageBusy
from .base import CallbackRecord, EventRecord, PresenceState, SubscriberCursor
from .redis_errors import translated
from .redis_retention import PRESENCE_EXPIRE_MS

READ_SEQS_PER_CALL = 5_000

# Lua, run after redis_scripts.PRELUDE (whose helpers they use); a script's own arguments start at ARGV[4].

# ARGV[4..]: command, natural key, body, received_ms. Returns the new id, or 0 for a duplicate.
RECORD_CALLBACK = r"""
local command = ARGV[4]
if not redis.call('SET', P .. 'cb:seen:' .. #command .. ':' .. command .. ':' .. ARGV[5], 1, 'NX') then return 0 end
local id = redis.call('INCR', P .. 'cb:seq')
redis.call('HSET', P .. 'cb:' .. id, 'command', command, 'key', ARGV[5], 'body', ARGV[6], 'received_ms', ARGV[7],
           'done', 0)
redis.call('ZADD', P .. 'cb:pending', id, id)
return id
"""

# ARGV[4..]: before_ms, limit. Forgets processed callbacks (body and dedupe key) received before
# before_ms, oldest first (cb:done is ordered by id, that is by arrival); returns how many.
PRUNE_CALLBACKS = r"""
local n = 0
for _, id in ipairs(redis.call('ZRANGE', P .. 'cb:done', 0, tonumber(ARGV[5]) - 1)) do
  local f = redis.call('HMGET', P .. 'cb:' .. id, 'received_ms', 'command', 'key')
  if f[1] and tonumber(f[1]) >= tonumber(ARGV[4]) then break end
  if f[2] and f[3] then redis.call('DEL', P .. 'cb:seen:' .. #f[2] .. ':' .. f[2] .. ':' .. f[3]) end
  redis.call('DEL', P .. 'cb:' .. id)
  redis.call('ZREM', P .. 'cb:done', id)
  n = n + 1
end
return n
"""

# ARGV[4..]: client_msg_id, kind, now, then the targets. Sets pushed_ms once on those recipients of the
# clientMsgID (one batch_send_msg gives all its users the same one).
MARK_PUSHED = r"""
local targets, n = {}, 0
for i = 7, #ARGV do targets[ARGV[i]] = true end
for _, member in ipairs(redis.call('SMEMBERS', P .. 'cmid:' .. ARGV[4])) do
  local key = rkey(member)
  local f = redis.call('HMGET', key, 'kind', 'target')
  if f[1] == ARGV[5] and targets[f[2]] then
    redis.call('HSETNX', key, 'pushed_ms', ARGV[6])
    n = n + 1
  end
end
return n
"""

# ARGV[4..]: index key suffix ('smid:<id>'), field, now. Sets the field once per recipient.
STAMP_ONCE = r"""
local members = redis.call('SMEMBERS', P .. ARGV[4])
for _, member in ipairs(members) do redis.call('HSETNX', rkey(member), ARGV[5], ARGV[6]) end
return #members
"""

# ARGV[4..]: server_msg_id, conversation id, msg seq.
SAVED_SEQ = r"""
local members = redis.call('SMEMBERS', P .. 'smid:' .. ARGV[4])
for _, member in ipairs(members) do
  local key = rkey(member)
  local old = redis.call('HMGET', key, 'conversation_id', 'msg_seq')
  if old[1] then redis.call('SREM', conv_key(old[1], old[2]), member) end
  redis.call('HSET', key, 'conversation_id', ARGV[5], 'msg_seq', ARGV[6])
  redis.call('SADD', conv_key(ARGV[5], ARGV[6]), member)
end
return #members
"""

# ARGV[4..]: conversation id, reader, now, then the seqs read.
MARK_READ = r"""
local conversation, reader, now = ARGV[4], ARGV[5], ARGV[6]
local n = 0
for i = 7, #ARGV do
  for _, member in ipairs(redis.call('SMEMBERS', conv_key(conversation, ARGV[i]))) do
    local key = rkey(member)
    local f = redis.call('HMGET', key, 'kind', 'target', 'status')
    if f[1] == 'user' and f[2] == reader and f[3] == 'sent' then
      redis.call('HSET', key, 'status', 'read', 'read_ms', now)
      if wants('message.read') then emit('message.read', recipient_json(member, 'user', reader, ''), now) end
      n = n + 1
    end
  end
end
return n
"""

# ARGV[4..]: message id, user id, receipt JSON, now. The first receipt wins.
ACKNOWLEDGE = r"""
local mid, user, receipt, now = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local seq = redis.call('HGET', P .. 'mt:' .. mid, user)
if not seq then return 0 end
local member = mid .. ':' .. seq
local key = rkey(member)
local f = redis.call('HMGET', key, 'kind', 'receipt', 'status')
if f[1] ~= 'user' or f[2] then return 0 end
redis.call('HSET', key, 'status', 'acknowledged', 'receipt', receipt)
if f[3] == 'queued' or f[3] == 'held' or f[3] == 'sending' then unschedule(member, user); ended(mid, now) end
if f[3] == 'failed' then redis.call('SREM', P .. 'failed:' .. mid, seq) end
if wants('receipt.received') then
  emit('receipt.received', recipient_json(member, 'user', user, '"receipt":' .. receipt), now)
end
return 1
"""

# ARGV[4..]: user id, platform id, online 1/0, seq, now, key expiry (ms). Values are 'online:seq:updated_ms'.
PRESENCE = r"""
local user, platform, online, seq, now = ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]
local key = P .. 'presence:' .. user
local function user_online()
  for _, v in ipairs(redis.call('HVALS', key)) do
    if string.sub(v, 1, 1) == '1' then return true end
  end
  return false
end
local old = redis.call('HGET', key, platform)
if old and tonumber(string.match(old, '^%d:(%-?%d+):')) >= seq then return 0 end
local was = user_online()
redis.call('HSET', key, platform, online .. ':' .. ARGV[7] .. ':' .. now)
redis.call('PEXPIRE', key, ARGV[9])  -- a backstop: the retention sweep forgets old reports first
local is = user_online()
redis.call('SADD', P .. 'users:known', user)  -- counted on the operator page
if is then redis.call('SADD', P .. 'users:online', user) else redis.call('SREM', P .. 'users:online', user) end
if is and not was then  -- recipients held for this user are due at once, at the best priority
  for _, member in ipairs(redis.call('SMEMBERS', P .. 'held:' .. user)) do
    if redis.call('HGET', rkey(member), 'status') == 'held' then
      redis.call('HSET', rkey(member), 'next_attempt_ms', now, 'priority', 0)
      schedule(member, 0, now)
    end
  end
end
if is ~= was then
  emit(is and 'user.online' or 'user.offline', cjson.encode({user_id = user, platform_id = tonumber(platform)}), now)
end
return 1
"""

# ARGV[4..]: subscriber. A new cursor starts after the newest event.
OPEN_CURSOR = r"""
local key = P .. 'cursor:' .. ARGV[4]
if redis.call('EXISTS', key) == 0 then
  redis.call('HSET', key, 'last_seq', tonumber(redis.call('GET', P .. 'events:seq') or '0'), 'attempts', 0,
             'next_attempt_ms', 0)
  redis.call('SADD', P .. 'cursors', ARGV[4])
end
return redis.call('HMGET', key, 'last_seq', 'attempts', 'next_attempt_ms', 'last_error')
"""

# Events every subscriber has passed can go (but the newest *kept* of them stay for a look back):
# trim below the lowest cursor, never more; with no cursor left, below the newest event.
TRIM_EVENTS = r"""
local function trim_events(kept)
  local lowest = nil
  for _, name in ipairs(redis.call('SMEMBERS', P .. 'cursors')) do
    local seq = tonumber(redis.call('HGET', P .. 'cursor:' .. name, 'last_seq') or '0')
    if lowest == nil or seq < lowest then lowest = seq end
  end
  lowest = lowest or tonumber(redis.call('GET', P .. 'events:seq') or '0')
  local below = lowest - kept + 1
  if below > 1 then redis.call('XTRIM', P .. 'events', 'MINID', below .. '-0') end
end
"""

# ARGV[4..]: subscriber, last seq, attempts, next_attempt_ms, last error, delivered events to keep.
SAVE_CURSOR = TRIM_EVENTS + r"""
local key = P .. 'cursor:' .. ARGV[4]
if redis.call('EXISTS', key) == 0 then return 0 end
redis.call('HSET', key, 'last_seq', ARGV[5], 'attempts', ARGV[6], 'next_attempt_ms', ARGV[7])
set_or_clear(key, 'last_error', ARGV[8])
trim_events(tonumber(ARGV[9]))
return 1
"""

# ARGV[4..]: subscriber, delivered events to keep. What only it still waited for can go.
FORGET_CURSOR = TRIM_EVENTS + r"""
if redis.call('SREM', P .. 'cursors', ARGV[4]) == 0 then return 0 end
redis.call('DEL', P .. 'cursor:' .. ARGV[4])
trim_events(tonumber(ARGV[5]))
return 1
"""

SCRIPTS = {"record_callback": RECORD_CALLBACK, "prune_callbacks": PRUNE_CALLBACKS, "stamp_once": STAMP_ONCE,
           "mark_pushed": MARK_PUSHED, "saved_seq": SAVED_SEQ, "mark_read": MARK_READ, "acknowledge": ACKNOWLEDGE, "presence": PRESENCE,
           "open_cursor": OPEN_CURSOR, "save_cursor": SAVE_CURSOR, "forget_cursor": FORGET_CURSOR}


class RedisTrackingMixin:
    """Callback inbox, presence, receipts and the event outbox."""

    prefix: str
    events_kept: int  # events every subscriber received that stay in the stream anyway
    _redis: Any  # redis.Redis, provided by RedisStore

    def _k(self, name: str) -> str: ...  # provided by RedisStore
    def _run(self, name: str, *args: Any, client: Any = None) -> Any: ...  # provided by RedisStore

    # -- callback inbox ----------------------------------------------------------
    @translated
    def record_callback(self, command: str, natural_key: str, body: str, received_ms: int) -> bool:
        return bool(self._run("record_callback", command, natural_key, body, received_ms))

    @translated
    def record_callbacks(self, callbacks: Sequence[tuple[str, str, str, int]]) -> int:
        pipe = self._redis.pipeline(transaction=False)  # one round trip; each script is atomic on its own
        for callback in callbacks:
            self._run("record_callback", *callback, client=pipe)
        return sum(1 for new_id in pipe.execute() if int(new_id))

    def record_callback_now(self, command: str, natural_key: str, body: str, received_ms: int,
                            wait_seconds: float = 0.0) -> bool:
        # a Redis call cannot tell beforehand whether it will wait (socket timeout 30 s, a failover, a
        # slow AOF fsync): every callback goes through the spool, drained in pipelined batches
        raise StorageBusy("Redis callback writes always go through the spool")

    @translated
    def pending_callbacks(self, limit: int) -> list[CallbackRecord]:
        if limit <= 0:
            return []
        ids = self._redis.zrange(self._k("cb:pending"), 0, limit - 1)
        pipe = self._redis.pipeline(transaction=False)
        for callback_id in ids:
            pipe.hmget(self._k(f"cb:{callback_id}"), ("command", "body", "received_ms"))
        return [CallbackRecord(int(callback_id), command, body, int(received_ms))
                for callback_id, (command, body, received_ms) in zip(ids, pipe.execute())]

    @translated
    def finish_callbacks(self, results: list[tuple[int, str | None]]) -> None:
        pipe = self._redis.pipeline(transaction=True)
        for callback_id, error in results:
            key = self._k(f"cb:{callback_id}")
            pipe.hset(key, "done", 1)
            pipe.hset(key, "error", error) if error is not None else pipe.hdel(key, "error")
            pipe.zrem(self._k("cb:pending"), callback_id)
            pipe.zadd(self._k("cb:done"), {callback_id: callback_id})
        pipe.execute()

    @translated
    def prune_callbacks(self, before_ms: int, limit: int) -> int:
        return int(self._run("prune_callbacks", before_ms, limit)) if limit > 0 else 0

    # -- what callbacks tell about sent messages ---------------------------------------
    def settle_batched(self, message_id: str, user_ids: list[str]) -> int:
        return 0  # Redis keeps every recipient's state on its own hash: nothing is batched

    @translated
    def confirm_sent(self, server_msg_id: str, now_ms: int) -> int:
        return int(self._run("stamp_once", f"smid:{server_msg_id}", "confirmed_ms", now_ms))

    @translated
    def record_saved_seq(self, server_msg_id: str, conversation_id: str, msg_seq: int) -> int:
        return int(self._run("saved_seq", server_msg_id, conversation_id, int(msg_seq)))

    @translated
    def mark_pushed(self, client_msg_id: str, kind: str, targets: list[str], now_ms: int) -> int:
        if not targets:
            return 0
        return int(self._run("mark_pushed", client_msg_id, kind, now_ms, *targets))

    @translated
    def mark_read(self, conversation_id: str, seqs: list[int], reader: str, now_ms: int) -> int:
        """Sent user recipients in *conversation_id* whose seq *reader* read become ``read``."""
        seqs = [int(s) for s in seqs]
        # a script call per few thousand seqs: each one is short, however many a read names
        return sum(int(self._run("mark_read", conversation_id, reader, now_ms, *seqs[start:start + READ_SEQS_PER_CALL]))
                   for start in range(0, len(seqs), READ_SEQS_PER_CALL))

    @translated
    def acknowledge(self, message_id: str, user_id: str, receipt: dict[str, Any], now_ms: int) -> bool:
        """Record a client receipt on the user's recipient of *message_id* (first receipt wins)."""
        return bool(self._run("acknowledge", message_id, user_id, json.dumps(receipt, ensure_ascii=False), now_ms))

    # -- presence --------------------------------------------------------------------------
    @translated
    def update_presence(self, user_id: str, platform_id: int, online: bool, seq: int, now_ms: int) -> bool:
        """Apply a level report unless a newer one (by OpenIM's seq) is known; see SqliteStore."""
        return bool(self._run("presence", user_id, int(platform_id), int(online), int(seq), now_ms,
                              PRESENCE_EXPIRE_MS))

    @translated
    def presence(self, user_ids: list[str]) -> dict[str, PresenceState]:
        """What callbacks last said of each user (absent when nothing is known)."""
        pipe = self._redis.pipeline(transaction=False)
        for user in user_ids:
            pipe.hvals(self._k(f"presence:{user}"))
        known = {}
        for user, values in zip(user_ids, pipe.execute()):
            if values:
                reports = [v.split(":") for v in values]
                known[user] = PresenceState(any(r[0] == "1" for r in reports), max(int(r[2]) for r in reports))
        return known

    # -- event outbox --------------------------------------------------------------------------
    @translated
    def events_after(self, seq: int, limit: int) -> list[EventRecord]:
        if limit <= 0:
            return []
        entries = self._redis.xrange(self._k("events"), f"{int(seq) + 1}-0", "+", count=limit)
        return [EventRecord(int(entry_id.partition("-")[0]), f["id"], f["type"], json.loads(f["data"]),
                            int(f["created_ms"])) for entry_id, f in entries]

    @translated
    def subscriber_cursor(self, subscriber: str) -> SubscriberCursor:
        """Where *subscriber* stands; a new one starts after the newest event."""
        last_seq, attempts, next_attempt_ms, last_error = self._run("open_cursor", subscriber)
        return SubscriberCursor(subscriber, int(last_seq), int(attempts), int(next_attempt_ms), last_error)

    @translated
    def save_subscriber_cursor(self, cursor: SubscriberCursor) -> None:
        """Store the position; events every subscriber has passed are trimmed, but the newest
        ``events_kept`` of them, and never an event some subscriber still waits for."""
        self._run("save_cursor", cursor.subscriber, cursor.last_seq, cursor.attempts, cursor.next_attempt_ms,
                  cursor.last_error or "", self.events_kept)

    @translated
    def subscriber_names(self) -> list[str]:
        return sorted(self._redis.smembers(self._k("cursors")))

    @translated
    def forget_subscriber(self, subscriber: str) -> bool:
        return self._run("forget_cursor", subscriber, self.events_kept) == 1

