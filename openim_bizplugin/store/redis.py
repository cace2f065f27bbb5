"""The Redis backend: several sidecar replicas share one Redis.

Same behaviour as :class:`~.sqlite.SqliteStore`, proven by the same contract
tests. Work is leased, then acknowledged (rq's registries, not huey's
delete-on-dequeue): a replica killed mid-send leaves leases that run out,
and another replica takes the work over. Every change of more than one key
is one Lua script (:mod:`.redis_scripts`), so it is atomic. Times are
integer milliseconds. Key layout (prefix ``bizplugin:`` left out)::

    m:<mid>            hash    the message (envelope, delivery settings, counts, times; active: its
                               recipients with work left; deleting/left while the sweep deletes it)
    mt:<mid>           hash    target -> seq, to find a user's recipient for a receipt
    r:<mid>:<seq>      hash    one recipient: status, attempts, lease, outcome, callbacks
    due                zset    every recipient with work left, score rank * 1e13 + due ms:
                               queued -> next attempt, held -> next recheck, sending ->
                               lease expiry; member "<order><seq><mid>" (12 + 8 hex digits,
                               order from the counter "accepted"), so equal due times go
                               in acceptance order; elsewhere a member is "<mid>:<seq>"
    expiry             zset    the same members by TTL end (expires_ms)
    held:<user>        set     members held for an offline user (released by presence)
    replay:<client:value:ts> / idem:<client>:<key>   string -> message id
    collapse:<client>:<key>  zset  message ids with that collapse key, by expires_ms
    sent:<kind>:<n>:<target>:<type>  zset  sent members by sent_ms (per-type rate limits)
    started:<type>     zset    ids of the leased messages of that type by expires_ms (pruned a day after)
    leases:<type>      hash    lease owner -> when its last lease on a message of that type ends
    dead               zset    message ids with failed recipients, by first failure ms
    recent             list    the newest 1,000 message ids, newest first (the operator page)
    failed:<mid>       set     seqs of the failed recipients of a dead letter
    smid:<id> cmid:<id> conv:<n>:<conversation>:<seq>   sets of members, for callbacks
    presence:<user>    hash    platform -> "online:seq:updated_ms"
    users:known users:online   sets of users with a presence report, and of those online
    events             stream  subscriber events, entry id "<seq>-0", seq from events:seq
    cursor:<name>      hash    a subscriber's position; cursors: set of names
    cb:<id> cb:pending cb:done cb:seq cb:seen:<n>:<command>:<key>   the callback inbox
    token:<name>       hash    shared credentials; lock:<name>: SET NX PX locks
    session:<id> failures:<name>   the operator page's sessions and sign-in throttle (redis_sessions)
    finished finished:dead  zset  messages without work left (with failed recipients) by when they
                               finished; sweeping: the one whose recipients are being deleted;
                               sweep:legacy: the SCAN cursor over messages stored before retention

One sorted set holds all work, as SQLite's one ``recipients_due`` index does:
a lease moves a member's score to its lease expiry, so work whose worker died
comes due again by itself, in priority order, and is never deleted until an
outcome is recorded. Nothing here trims work: the event stream is trimmed only
below every subscriber's cursor (keeping the newest EVENTS_KEPT of those), and
the retention sweep deletes only finished messages (:mod:`.redis_retention`).
See ``docs/redis.md``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import redis
import redis.exceptions as rexc
from limits import RateLimitItemPerSecond
from limits.storage import RedisStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from ..errors import StorageUnavailable
from . import redis_retention, redis_scripts, redis_tracking
from .base import (EVENTS_KEPT, PRIORITY_RANK, Accepted, DeadLetter, FailedRecipient, IdempotencyMismatch,
                   MessageRecord, NewMessage, Outcome, PresenceCounts, RecentMessage, RecipientRecord, ReplayKey,
                   WorkItem, recipient_data, stored_message)
from .redis_errors import translated
from .redis_retention import RedisRetentionMixin
from .redis_sessions import RedisSessionsMixin
from .redis_tracking import RedisTrackingMixin

log = logging.getLogger(__name__)

BAND = 10**13  # due score = priority rank * BAND + due time in ms
BANDS = max(PRIORITY_RANK.values()) + 1
BATCH = 500  # outcomes per script call: keeps each script short, Redis serves others between
WAITAOF_TIMEOUT_MS = 5_000
STARTED_KEPT_MS = 86_400_000  # a rate limit's window is a day at most
_MESSAGE_FIELDS = ("client", "type", "version", "mode", "priority", "offline", "envelope", "delivery",
                   "expires_ms", "created_ms", "recipient_count")
_RECIPIENT_FIELDS = ("kind", "target", "status", "attempts", "last_error", "reason", "server_msg_id",
                     "client_msg_id", "sent_ms", "receipt")
_SUMMARY_FIELDS = ("client", "type", "version", "mode", "priority", "offline", "created_ms", "expires_ms",
                   "recipient_count")


def durability_plan(version: str, appendonly: str | None, appendfsync: str | None) -> tuple[bool, str]:
    """(wait for the AOF fsync after each accept, what an accepted message survives)."""
    if appendonly is None:
        return False, "unknown (CONFIG GET refused): check that Redis runs with appendonly yes"
    if appendonly != "yes":
        return False, "no AOF: messages accepted since the last RDB snapshot are lost if Redis stops"
    if appendfsync == "always":
        return False, "AOF fsync always: every accepted message is on disk before the 202"
    major_minor = tuple(int(p) for p in (version.split(".") + ["0", "0"])[:2] if p.isdigit())
    if appendfsync == "everysec" and major_minor >= (7, 2):
        return True, "AOF everysec plus WAITAOF: every accepted message is on disk before the 202"
    return False, (f"AOF appendfsync {appendfsync}: an OS crash or power loss can lose the last second(s)"
                   " of accepted messages (use appendfsync always, or Redis 7.2+ for WAITAOF)")


class RedisStore(RedisTrackingMixin, RedisSessionsMixin, RedisRetentionMixin):
    """Redis implementation of :class:`~openim_bizplugin.store.base.Store`."""

    @translated
    def __init__(self, url: str, event_types: frozenset[str] = frozenset(), *, prefix: str = "bizplugin:",
                 events_kept: int = EVENTS_KEPT) -> None:
        self.url, self.prefix, self.event_types, self.events_kept = url, prefix, event_types, events_kept
        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5,
                                           socket_timeout=30, health_check_interval=30)
        self._limiter = SlidingWindowCounterRateLimiter(RedisStorage(url, key_prefix=prefix + "rate", socket_connect_timeout=5, socket_timeout=30))
        self._scripts = {name: self._redis.register_script(redis_scripts.PRELUDE + source)
                         for name, source in {**redis_scripts.QUEUE, **redis_tracking.SCRIPTS,
                                                **redis_retention.SCRIPTS}.items()}
        self._scripts.update({name: self._redis.register_script(source)
                              for name, source in redis_scripts.STANDALONE.items()})
        self.ping()
        self._wait_aof = self._check_durability()

    @property
    def event_types(self) -> frozenset[str]:
        """What subscribers listen to: only these events are kept in the stream."""
        return self._event_types

    @event_types.setter
    def event_types(self, types: frozenset[str]) -> None:
        self._event_types = frozenset(types)
        self._events_arg = "," + ",".join(sorted(types)) + ","  # as the scripts look types up

    def _check_durability(self) -> bool:
        try:
            version = str(self._redis.info("server").get("redis_version", "0"))
            found = self._redis.config_get("append*")
            appendonly, appendfsync = found.get("appendonly"), found.get("appendfsync")
        except rexc.ResponseError:  # CONFIG disabled (managed Redis)
            version, appendonly, appendfsync = "0", None, None
        wait, self.durability = durability_plan(version, appendonly, appendfsync)
        (log.info if wait or appendfsync == "always" else log.warning)("redis durability: %s", self.durability)
        return wait

    def _k(self, name: str) -> str:
        return self.prefix + name

    def _run(self, name: str, *args: Any, client: Any = None) -> Any:
        """Run a prelude script: prefix, kept event types and an event-id tag come first."""
        return self._scripts[name](args=(self.prefix, self._events_arg, secrets.token_hex(6), *args), client=client)

    # -- intake ---------------------------------------------------------------
    @translated
    def accept(self, message: NewMessage, replay: ReplayKey | None, *, retention_ms: int) -> Accepted:
        args = _accept_args(message, replay.text() if replay else "", retention_ms)
        if self._wait_aof:  # the same connection, so WAITAOF covers this write
            pipe = self._redis.pipeline(transaction=False)
            self._run("accept", *args, client=pipe)
            pipe.execute_command("WAITAOF", 1, 0, WAITAOF_TIMEOUT_MS)
            answer, (fsynced, _) = pipe.execute()
            if answer[0] == "created" and int(fsynced) < 1:
                raise StorageUnavailable("redis did not fsync the message to its AOF in time")
        else:
            answer = self._run("accept", *args)
        if answer[0] == "mismatch":
            raise IdempotencyMismatch(answer[1])
        return Accepted(answer[1], int(answer[2]), created=answer[0] == "created")

    @translated
    def replayed(self, replay: ReplayKey) -> Accepted | None:
        message_id = self._redis.get(self._k(f"replay:{replay.text()}"))
        if message_id is None:
            return None
        count, type_, version, deleting = self._redis.hmget(self._k(f"m:{message_id}"),
                                                           ["recipient_count", "type", "version", "deleting"])
        if count is None or deleting:  # deleted by the retention sweep just now
            return None
        return Accepted(message_id, int(count), created=False, type=type_, version=int(version))

    @translated
    def get_message(self, message_id: str) -> MessageRecord | None:
        m = self._redis.hgetall(self._k(f"m:{message_id}"))
        if not m or "deleting" in m:  # the retention sweep is deleting it: gone
            return None
        pipe = self._redis.pipeline(transaction=False)
        for seq in range(int(m["recipient_count"])):
            pipe.hmget(self._k(f"r:{message_id}:{seq}"), _RECIPIENT_FIELDS)
        recipients = tuple(_recipient(row) for row in pipe.execute())
        return MessageRecord(message_id, m["client"], m["type"], int(m["version"]), m["mode"], m["priority"],
                             m["offline"], int(m["created_ms"]), int(m["expires_ms"]), recipients=recipients)

    # -- delivery queue -------------------------------------------------------
    @translated
    def lease(self, now_ms: int, limit: int, lease_ms: int, owner: str,
              new_operation_id: Callable[[str], str], aging_ms: int = 300_000) -> list[WorkItem]:
        # Two steps: the script takes the work under a placeholder operationID (it cannot
        # call new_operation_id), then each item gets its real one while the lease is ours.
        placeholder = "~" + secrets.token_hex(8)
        rows = self._run("lease", now_ms, limit, max(lease_ms, 1), owner, placeholder, BANDS, aging_ms)
        if not rows:
            return []
        message_ids = list(dict.fromkeys(member.rpartition(":")[0] for member, *_ in rows))
        bases = {message_id: new_operation_id(message_id) for message_id in message_ids}
        operation_ids = [f"{bases[message_id]}-{seq}"
                         for message_id, _, seq in (member.rpartition(":") for member, *_ in rows)]
        pipe = self._redis.pipeline(transaction=False)
        self._run("stamp", owner, placeholder,
                  *(x for (member, *_), op in zip(rows, operation_ids) for x in (member, op)), client=pipe)
        for message_id in message_ids:
            pipe.hmget(self._k(f"m:{message_id}"), _MESSAGE_FIELDS)
        stamped, *found = pipe.execute()
        messages = {mid: _message_fields(values) for mid, values in zip(message_ids, found)}
        return [_work_item(row, op, owner, messages) for row, op, ok in zip(rows, operation_ids, stamped) if ok]

    @translated
    def complete(self, results: list[tuple[WorkItem, Outcome]], now_ms: int) -> int:
        done = 0
        for start in range(0, len(results), BATCH):
            args = [x for item, outcome in results[start:start + BATCH] for x in self._outcome_args(item, outcome)]
            done += int(self._run("complete", now_ms, *args))
        return done

    def _outcome_args(self, item: WorkItem, o: Outcome) -> tuple:
        event_type = f"message.{o.status}"
        data = ""
        if o.status in ("sent", "failed") and event_type in self.event_types:
            extra = ({"server_msg_id": o.server_msg_id, "client_msg_id": o.client_msg_id} if o.status == "sent"
                     else {"error": o.error, "reason": o.reason})
            data = json.dumps(recipient_data(item.message_id, item.type, item.client, item.kind, item.target,
                                             **extra), ensure_ascii=False)
        return (f"{item.message_id}:{item.seq}", item.operation_id, item.lease_owner, o.status, o.error or "",
                o.reason or "", _text(o.next_attempt_ms), o.unknown_operation_id or "", o.server_msg_id or "",
                o.client_msg_id or "", _text(o.sent_ms), _sent_key(item.kind, item.target, item.type),
                int(o.uncounted and item.counted), event_type if data else "", data)

    @translated
    def renew(self, items: list[WorkItem], now_ms: int, lease_ms: int) -> list[WorkItem]:
        if not items:
            return []
        kept = self._run("renew", now_ms, lease_ms,
                         *(x for i in items for x in (f"{i.message_id}:{i.seq}", i.operation_id, i.lease_owner)))
        return [item for item, ok in zip(items, kept) if ok]

    @translated
    def messages_started(self, type_: str, since_ms: int, at_most: int) -> int:
        key = self._k(f"started:{type_}")
        pipe = self._redis.pipeline(transaction=False)
        pipe.zremrangebyscore(key, "-inf", since_ms - STARTED_KEPT_MS)  # no window reaches back that far
        pipe.zcount(key, f"({since_ms}", "+inf")
        return min(pipe.execute()[1], at_most)

    @translated
    def leased_elsewhere(self, type_: str, owner: str, since_ms: int) -> bool:
        key = self._k(f"leases:{type_}")
        leases = {who: int(until) for who, until in self._redis.hgetall(key).items()}
        gone = [who for who, until in leases.items() if until < since_ms - STARTED_KEPT_MS]
        if gone:  # no window reaches back that far
            self._redis.hdel(key, *gone)
        return any(until > since_ms for who, until in leases.items() if who != owner)

    @translated
    def sent_counts(self, kind: str, targets: list[str], type_: str, since_ms: int) -> dict[str, tuple[int, int]]:
        pipe = self._redis.pipeline(transaction=False)  # one round trip for the whole round
        for target in targets:
            key = self._k(_sent_key(kind, target, type_))
            pipe.zcount(key, f"({since_ms}", "+inf")
            pipe.zrangebyscore(key, f"({since_ms}", "+inf", start=0, num=1, withscores=True)
        answers = pipe.execute()
        return {target: (count, int(first[0][1]))
                for target, count, first in zip(targets, answers[::2], answers[1::2]) if count}

    @translated
    def release(self, items: list[WorkItem], now_ms: int) -> int:
        if not items:
            return 0
        return int(self._run("release", now_ms, *(
            x for i in items for x in (f"{i.message_id}:{i.seq}", i.operation_id, i.lease_owner,
                                       int(i.counted)))))

    @translated
    def higher_due(self, rank: int, now_ms: int) -> bool:
        if rank <= 0:
            return False
        pipe = self._redis.pipeline(transaction=False)
        for better in range(rank):
            pipe.zrangebyscore(self._k("due"), better * BAND, better * BAND + now_ms, start=0, num=1)
        return any(pipe.execute())

    @translated
    def next_due_ms(self) -> int | None:
        pipe = self._redis.pipeline(transaction=False)
        for rank in range(BANDS):
            pipe.zrangebyscore(self._k("due"), rank * BAND, (rank + 1) * BAND - 1, start=0, num=1, withscores=True)
        dues = [int(found[0][1]) - rank * BAND for rank, found in enumerate(pipe.execute()) if found]
        return min(dues) if dues else None

    @translated
    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        letters: list[DeadLetter] = []
        start = 0
        while len(letters) < limit:
            page = self._redis.zrevrange(self._k("dead"), start, start + limit - 1, withscores=True)
            if not page:
                break
            start += len(page)
            letters += filter(None, (self._dead_letter(mid, int(created)) for mid, created in page))
        return letters[:limit]

    def _dead_letter(self, message_id: str, created_ms: int) -> DeadLetter | None:
        seqs = self._redis.smembers(self._k(f"failed:{message_id}"))
        if not seqs:  # its failed recipients were acknowledged after all
            return None
        pipe = self._redis.pipeline(transaction=False)
        pipe.hmget(self._k(f"m:{message_id}"), ("client", "type"))
        for seq in seqs:
            pipe.hget(self._k(f"r:{message_id}:{seq}"), "last_error")
        (client, type_), *errors = pipe.execute()
        known = [e for e in errors if e is not None]
        return DeadLetter(message_id, client, type_, len(seqs), max(known) if known else None, created_ms)

    @translated
    def replay_dead_letters(self, message_id: str | None, now_ms: int) -> int:
        ids = [message_id] if message_id else self._redis.zrange(self._k("dead"), 0, -1)
        return sum(int(self._run("replay", mid, now_ms)) for mid in ids)

    # -- for the operator page ------------------------------------------------------------
    @translated
    def queue_depth(self) -> dict[str, int]:
        pipe = self._redis.pipeline(transaction=False)
        for rank in PRIORITY_RANK.values():
            pipe.zcount(self._k("due"), rank * BAND, (rank + 1) * BAND - 1)
        return dict(zip(PRIORITY_RANK, (int(n) for n in pipe.execute())))

    @translated
    def recent_messages(self, limit: int, recipients: int = 50) -> list[RecentMessage]:
        ids = self._redis.lrange(self._k("recent"), 0, limit - 1) if limit > 0 else []  # at most 1,000
        return [found for found in (self._recent(mid, max(recipients, 0)) for mid in ids) if found]

    def _recent(self, message_id: str, shown: int) -> RecentMessage | None:
        *fields, deleting = self._redis.hmget(self._k(f"m:{message_id}"), _SUMMARY_FIELDS + ("deleting",))
        if fields[0] is None or deleting:
            return None
        client, type_, version, mode, priority, offline, created_ms, expires_ms, count = fields
        pipe = self._redis.pipeline(transaction=False)
        for seq in range(int(count)):  # the shown ones in full, of the others only the status
            key = self._k(f"r:{message_id}:{seq}")
            pipe.hmget(key, _RECIPIENT_FIELDS) if seq < shown else pipe.hget(key, "status")
        found = pipe.execute()
        records = tuple(_recipient(row) for row in found[:shown])
        statuses = Counter([r.status for r in records] + found[shown:])
        message = MessageRecord(message_id, client, type_, int(version), mode, priority, offline, int(created_ms),
                                int(expires_ms), recipients=records)
        return RecentMessage(message, int(count), dict(statuses))

    @translated
    def failed_recipients(self, limit: int) -> list[FailedRecipient]:
        failed: list[FailedRecipient] = []
        start = 0
        while len(failed) < limit:
            page = self._redis.zrevrange(self._k("dead"), start, start + 99, withscores=True)
            if not page:
                break
            start += len(page)
            for message_id, failed_ms in page:
                failed += self._failed_of(message_id, int(failed_ms), limit - len(failed))
        return failed[:max(limit, 0)]

    def _failed_of(self, message_id: str, failed_ms: int, limit: int) -> list[FailedRecipient]:
        seqs = sorted(int(seq) for seq in self._redis.smembers(self._k(f"failed:{message_id}")))[:max(limit, 0)]
        pipe = self._redis.pipeline(transaction=False)
        pipe.hmget(self._k(f"m:{message_id}"), ("client", "type"))
        for seq in seqs:
            pipe.hmget(self._k(f"r:{message_id}:{seq}"), _RECIPIENT_FIELDS)
        (client, type_), *rows = pipe.execute()
        return [FailedRecipient(message_id, client, type_, _recipient(row), failed_ms) for row in rows]

    @translated
    def presence_counts(self) -> PresenceCounts:
        pipe = self._redis.pipeline(transaction=False)
        pipe.scard(self._k("users:online")), pipe.scard(self._k("users:known"))
        online, known = pipe.execute()
        return PresenceCounts(int(online), int(known) - int(online))

    # -- shared credentials and locks ----------------------------------------------
    @translated
    def load_token(self, name: str) -> tuple[str, int] | None:
        value, expires_ms = self._redis.hmget(self._k(f"token:{name}"), ("value", "expires_ms"))
        return (value, int(expires_ms)) if value is not None else None

    @translated
    def save_token(self, name: str, token: str, expires_ms: int) -> None:
        self._redis.hset(self._k(f"token:{name}"), mapping={"value": token, "expires_ms": expires_ms})

    @translated
    def try_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        # the lock's expiry is Redis's clock, the same for every replica
        return bool(self._scripts["try_lock"](keys=[self._k(f"lock:{name}")], args=[owner, max(int(ttl_ms), 1)]))

    @translated
    def unlock(self, name: str, owner: str) -> None:
        self._scripts["unlock"](keys=[self._k(f"lock:{name}")], args=[owner])

    def batch(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()  # each write is one atomic script or command already

    @translated
    def ping(self) -> None:
        self._redis.ping()

    @translated
    def take_rate(self, key: str, count: int, period_ms: int, now_ms: int) -> int:
        # the limits library's sliding window counter: the same algorithm as SQLite's, in one Lua script
        item = RateLimitItemPerSecond(count, max(1, period_ms // 1000))
        if self._limiter.hit(item, key):
            return 0
        return max(1, int((self._limiter.get_window_stats(item, key).reset_time - time.time()) * 1000))

    @translated
    def check_writable(self) -> None:
        # refused when Redis is out of memory (noeviction), cannot persist (MISCONF) or is a replica
        self._redis.set(self.prefix + "readyz", "1", px=60_000)

    def close(self) -> None:
        self._redis.close()


def _accept_args(m: NewMessage, replay: str, retention_ms: int) -> tuple:
    """The arguments of the accept script: identity, the message hash's fields, then the targets."""
    fields = {"client": m.client, "type": m.type, "version": m.version, "mode": m.mode, "priority": m.priority,
              "offline": m.offline, "collapse_key": m.collapse_key or "", "idempotency_key": m.idempotency_key or "",
              "request_hash": m.request_hash, "replay_key": replay, "envelope": m.envelope,
              "delivery": json.dumps(m.delivery), "target_kind": m.target_kind, "recipient_count": len(m.targets),
              "created_ms": m.created_ms, "expires_ms": m.expires_ms}
    flat = [item for pair in fields.items() for item in pair]
    collapse_reason = f"replaced by newer message {m.id} (collapse_key {m.collapse_key!r})"
    return (m.id, m.client, m.idempotency_key or "", m.request_hash, replay, m.created_ms, retention_ms,
            PRIORITY_RANK[m.priority], m.expires_ms, m.target_kind, m.collapse_key or "", collapse_reason,
            len(flat), *flat, *m.targets)


def _sent_key(kind: str, target: str, type_: str) -> str:
    """The sorted set of sends of one type to one recipient, by sent_ms."""
    return f"sent:{kind}:{len(target)}:{target}:{type_}"


def _text(value: int | None) -> str:
    return "" if value is None else str(int(value))


def _int(value: str | None) -> int | None:
    return None if value is None else int(value)


def _recipient(row: list[str | None]) -> RecipientRecord:
    kind, target, status, attempts, last_error, reason, server_msg_id, client_msg_id, sent_ms, receipt = row
    return RecipientRecord(kind, target, status, int(attempts), last_error, reason, server_msg_id, client_msg_id,
                           _int(sent_ms), json.loads(receipt) if receipt else None)


def _message_fields(values: list[str | None]) -> dict[str, Any]:
    """A leased message's fields: delivery parsed once per message (its items share it, as with
    SQLite), and ``defect`` set when the hash is missing or malformed (stored_message)."""
    fields = dict(zip(_MESSAGE_FIELDS, values))
    row = None if fields["client"] is None else tuple(fields[name] for name in _MESSAGE_FIELDS[:9])
    row, fields["delivery"], fields["defect"] = stored_message(row)
    fields.update(zip(_MESSAGE_FIELDS[:7], row[:7]))
    for name in ("version", "expires_ms"):
        fields[name] = _int(fields[name]) if str(fields[name] or "").isdigit() else 0
    return fields


def _work_item(row: list, operation_id: str, owner: str, messages: dict[str, dict[str, Any]]) -> WorkItem:
    member, target, kind, attempts, counted, unknown = row
    message_id, _, seq = member.rpartition(":")
    m = messages[message_id]
    return WorkItem(
        message_id=message_id, seq=int(seq), kind=kind, target=target, attempts=int(attempts),
        counted=bool(counted), operation_id=operation_id, check_operation_id=unknown or None, lease_owner=owner,
        client=m["client"], type=m["type"], version=m["version"], mode=m["mode"], priority=m["priority"],
        offline=m["offline"], envelope=m["envelope"], delivery=m["delivery"], expires_ms=m["expires_ms"],
        defect=m["defect"])
