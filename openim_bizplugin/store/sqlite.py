"""The embedded SQLite backend.

WAL mode with ``synchronous=FULL`` makes every commit durable before the
sidecar answers; every write runs in a ``BEGIN IMMEDIATE`` transaction and
connections wait (``busy_timeout``) instead of failing, so several server
processes can share one database file (see :mod:`.sqlite_file`).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from .base import (EVENTS_KEPT, PRIORITY_RANK, Accepted, DeadLetter, FailedRecipient, IdempotencyMismatch,
                   MessageRecord, NewMessage, Outcome, PresenceCounts, RecentMessage, RecipientRecord, ReplayKey,
                   WorkItem)
from .sqlite_file import SqliteFile
from .sqlite_tracking import TrackingMixin, recipient_data

SCHEMA_VERSION = 1
EXPIRY_SWEEP_MS = 1_000  # how often a lease also sweeps the whole queue for recipients past their TTL


def inbox_path(path: str) -> str:
    """The callback inbox beside the main file: ``bizplugin.db`` → ``bizplugin-callbacks.db``."""
    stem, dot, suffix = path.rpartition(".")
    return f"{stem}-callbacks.{suffix}" if dot and "/" not in suffix else f"{path}-callbacks"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id              TEXT PRIMARY KEY,
    client          TEXT NOT NULL,
    type            TEXT NOT NULL,
    version         INTEGER NOT NULL,
    mode            TEXT NOT NULL,
    priority        TEXT NOT NULL,
    offline         TEXT NOT NULL,
    collapse_key    TEXT,
    idempotency_key TEXT,
    request_hash    TEXT NOT NULL,
    replay_key      TEXT,
    envelope        TEXT NOT NULL,
    delivery        TEXT NOT NULL,
    recipient_count INTEGER NOT NULL,
    created_ms      INTEGER NOT NULL,
    expires_ms      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_idempotency ON messages (client, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS messages_replay ON messages (replay_key)
    WHERE replay_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_collapse ON messages (client, collapse_key, expires_ms)
    WHERE collapse_key IS NOT NULL;

CREATE TABLE IF NOT EXISTS recipients (
    message_id      TEXT NOT NULL REFERENCES messages (id),
    seq             INTEGER NOT NULL,
    kind            TEXT NOT NULL,
    target          TEXT NOT NULL,
    status          TEXT NOT NULL,
    priority        INTEGER NOT NULL,
    -- when the row is next due: for queued rows the retry time, for sending
    -- rows the end of the lease, so one index finds all work to hand out
    next_attempt_ms INTEGER NOT NULL,
    expires_ms      INTEGER NOT NULL,
    lease_owner     TEXT,
    operation_id    TEXT,
    check_operation_id TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    reason          TEXT,
    server_msg_id   TEXT,
    client_msg_id   TEXT,
    sent_ms         INTEGER,
    receipt         TEXT,
    -- what OpenIM's callbacks told us afterwards
    confirmed_ms    INTEGER,
    pushed_ms       INTEGER,
    conversation_id TEXT,
    msg_seq         INTEGER,
    read_ms         INTEGER,
    PRIMARY KEY (message_id, seq)
);
-- the one partial index over rows with work left (its WHERE must match _DUE below):
-- leasing walks it in order, idle waits probe it, and the expiry sweep reads it
-- alone (expires_ms is in it). A second such index, on expires_ms, doubled the
-- index work of every lease and outcome (bench_delivery).
CREATE INDEX IF NOT EXISTS recipients_due ON recipients (priority, next_attempt_ms, expires_ms)
    WHERE status IN ('queued', 'held', 'sending');

CREATE INDEX IF NOT EXISTS recipients_held ON recipients (target) WHERE status = 'held';
CREATE INDEX IF NOT EXISTS recipients_sent ON recipients (target, sent_ms) WHERE sent_ms IS NOT NULL;
CREATE INDEX IF NOT EXISTS recipients_server_msg ON recipients (server_msg_id) WHERE server_msg_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS recipients_client_msg ON recipients (client_msg_id) WHERE client_msg_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS recipients_conversation ON recipients (conversation_id, msg_seq)
    WHERE conversation_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS dead_letters (
    message_id      TEXT PRIMARY KEY REFERENCES messages (id),
    created_ms      INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS presence (
    user_id         TEXT NOT NULL,
    platform_id     INTEGER NOT NULL,
    online          INTEGER NOT NULL,
    seq             INTEGER NOT NULL,
    updated_ms      INTEGER NOT NULL,
    PRIMARY KEY (user_id, platform_id)
);

CREATE TABLE IF NOT EXISTS events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    type            TEXT NOT NULL,
    data            TEXT NOT NULL,
    created_ms      INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS subscriber_cursors (
    subscriber      TEXT PRIMARY KEY,
    last_seq        INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT
);

CREATE TABLE IF NOT EXISTS shared (
    name            TEXT PRIMARY KEY,
    value           TEXT NOT NULL,
    owner           TEXT,
    expires_ms      INTEGER NOT NULL
);
"""


# The callback inbox lives in a file of its own: OpenIM waits for our answer,
# so its writes must not queue behind message writes, and it is written with
# synchronous=NORMAL (survives a crash of the process, may lose the last
# writes on power loss: OpenIM's own callback queue is in memory and lossy).
_INBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS callbacks (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    command         TEXT NOT NULL,
    natural_key     TEXT NOT NULL,
    body            TEXT NOT NULL,
    received_ms     INTEGER NOT NULL,
    done            INTEGER NOT NULL DEFAULT 0,
    error           TEXT,
    UNIQUE (command, natural_key)
);
CREATE INDEX IF NOT EXISTS callbacks_pending ON callbacks (done, id);
"""


# Rows with work left: queued (maybe for a retry), held for an offline user
# (rechecked now and then), sending (their lease may have run out).
_DUE = "('queued', 'held', 'sending')"
_MESSAGE_COLUMNS = "client, type, version, mode, priority, offline, envelope, delivery, expires_ms"
# Leasing is set-based: one UPDATE per message of the round, over the rowids the due
# index gave, computing attempts and the operationIDs in SQL (SET sees the old row).
_LEASE_SQL = (
    "UPDATE recipients SET status = 'sending', lease_owner = ?, next_attempt_ms = ?,"
    " attempts = attempts + (status != 'held'),"
    # a row still "sending" was leased by a worker that vanished mid-send: its last
    # attempt may have reached OpenIM, so the next one asks first
    " check_operation_id = CASE status WHEN 'sending' THEN operation_id ELSE check_operation_id END,"
    " operation_id = ? || '-' || seq"
    " WHERE rowid IN (SELECT value FROM json_each(?))"
    " RETURNING rowid, seq, kind, target, attempts, operation_id, check_operation_id")


def _work_items(rows: list[tuple], held: set[int], message_id: str, message: tuple, owner: str,
                settings: dict[str, Any]) -> dict[int, WorkItem]:
    """The WorkItems of one message's leased rows, by rowid."""
    client, type_, version, mode, priority, offline, envelope, _delivery, expires_ms = message
    return {rowid: WorkItem(
        # a recheck of a recipient held for an offline user is not a send attempt
        message_id=message_id, seq=seq, kind=kind, target=target, attempts=attempts,
        counted=rowid not in held, operation_id=operation_id, check_operation_id=check_operation_id,
        lease_owner=owner, client=client, type=type_, version=version, mode=mode, priority=priority,
        offline=offline, envelope=envelope, expires_ms=expires_ms, delivery=settings)
        for rowid, seq, kind, target, attempts, operation_id, check_operation_id in rows}


_RECIPIENT_COLUMNS = ("kind, target, status, attempts, last_error, reason, server_msg_id, client_msg_id,"
                      " sent_ms, receipt")


def _recipient_record(row: tuple | list) -> RecipientRecord:
    """A RecipientRecord from the _RECIPIENT_COLUMNS of a row."""
    return RecipientRecord(*row[:9], receipt=json.loads(row[9]) if row[9] else None)


# An outcome is recorded only while this worker still holds the lease of this attempt.
_COMPLETE_SQL = (
    "UPDATE recipients SET status = ?, last_error = ?, reason = ?,"
    " next_attempt_ms = COALESCE(?, next_attempt_ms), check_operation_id = ?,"
    " server_msg_id = COALESCE(?, server_msg_id), client_msg_id = COALESCE(?, client_msg_id),"
    " sent_ms = COALESCE(?, sent_ms), lease_owner = NULL, attempts = attempts - ?"
    " WHERE message_id = ? AND seq = ? AND status = 'sending' AND operation_id = ? AND lease_owner = ?")


def _outcome_row(item: WorkItem, outcome: Outcome) -> tuple:
    return (outcome.status, outcome.error, outcome.reason, outcome.next_attempt_ms, outcome.unknown_operation_id,
            outcome.server_msg_id, outcome.client_msg_id, outcome.sent_ms,
            int(outcome.uncounted and item.counted), item.message_id, item.seq, item.operation_id, item.lease_owner)


class SqliteStore(TrackingMixin):
    """SQLite implementation of :class:`~openim_bizplugin.store.base.Store`."""

    def __init__(self, path: str | Path, event_types: frozenset[str] = frozenset(),
                 events_kept: int = EVENTS_KEPT) -> None:
        self.path = str(path)
        self.event_types, self.events_kept = event_types, events_kept
        self._db = SqliteFile(self.path, synchronous="FULL")
        # no automatic checkpoints on the inbox: they ran inside whichever commit crossed the
        # threshold, often a callback's while OpenIM waited (up to 157 ms measured)
        self._inbox = SqliteFile(inbox_path(self.path), synchronous="NORMAL", autocheckpoint=False)
        self._db.migrate(_SCHEMA, SCHEMA_VERSION)
        self._inbox.migrate(_INBOX_SCHEMA, SCHEMA_VERSION)
        self._write, self._read = self._db.write, self._db.read
        self._swept_ms = 0  # when this process last swept the queue for expired recipients

    # -- the Store interface ------------------------------------------------
    def accept(self, message: NewMessage, replay: ReplayKey | None, *, retention_ms: int) -> Accepted:
        with self._write() as db:
            earlier = self._earlier(db, message, replay, retention_ms)
            if earlier is not None:
                return earlier
            self._insert(db, message, replay)
        return Accepted(message.id, len(message.targets), created=True)

    def _earlier(self, db: sqlite3.Connection, message: NewMessage, replay: ReplayKey | None,
                 retention_ms: int) -> Accepted | None:
        if replay is not None:
            row = db.execute("SELECT id, recipient_count FROM messages WHERE replay_key = ?",
                             (replay.text(),)).fetchone()
            if row:
                return Accepted(row[0], row[1], created=False)
        if message.idempotency_key is None:
            return None
        row = db.execute(
            "SELECT id, recipient_count, request_hash FROM messages"
            " WHERE client = ? AND idempotency_key = ? AND created_ms > ?"
            " ORDER BY created_ms DESC LIMIT 1",
            (message.client, message.idempotency_key, message.created_ms - retention_ms),
        ).fetchone()
        if row is None:
            return None
        if row[2] != message.request_hash:
            raise IdempotencyMismatch(row[0])
        return Accepted(row[0], row[1], created=False)

    def _insert(self, db: sqlite3.Connection, m: NewMessage, replay: ReplayKey | None) -> None:
        db.execute(
            "INSERT INTO messages (id, client, type, version, mode, priority, offline, collapse_key,"
            " idempotency_key, request_hash, replay_key, envelope, delivery, recipient_count,"
            " created_ms, expires_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (m.id, m.client, m.type, m.version, m.mode, m.priority, m.offline, m.collapse_key,
             m.idempotency_key, m.request_hash, replay.text() if replay else None, m.envelope,
             json.dumps(m.delivery), len(m.targets), m.created_ms, m.expires_ms),
        )
        if m.collapse_key:
            self._collapse(db, m)
        rank = PRIORITY_RANK[m.priority]
        db.executemany(
            "INSERT INTO recipients (message_id, seq, kind, target, status, priority, next_attempt_ms,"
            " expires_ms) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?)",
            ((m.id, seq, m.target_kind, target, rank, m.created_ms, m.expires_ms)
             for seq, target in enumerate(m.targets)),
        )

    @staticmethod
    def _collapse(db: sqlite3.Connection, m: NewMessage) -> None:
        """Older messages of this client with the same collapse key stop waiting for these recipients."""
        targets = set(m.targets)
        older = db.execute("SELECT id FROM messages WHERE client = ? AND collapse_key = ? AND expires_ms > ?"
                           " AND id != ?", (m.client, m.collapse_key, m.created_ms, m.id)).fetchall()
        reason = f"replaced by newer message {m.id} (collapse_key {m.collapse_key!r})"
        for (message_id,) in older:
            waiting = db.execute("SELECT seq, target FROM recipients WHERE message_id = ? AND kind = ?"
                                 " AND status IN ('queued', 'held')", (message_id, m.target_kind)).fetchall()
            db.executemany("UPDATE recipients SET status = 'skipped', reason = ? WHERE message_id = ? AND seq = ?"
                           " AND status IN ('queued', 'held')",
                           [(reason, message_id, seq) for seq, target in waiting if target in targets])

    def replayed(self, replay: ReplayKey) -> Accepted | None:
        rows = self._read("SELECT id, recipient_count, type, version FROM messages WHERE replay_key = ?",
                          (replay.text(),))
        return Accepted(*rows[0][:2], created=False, type=rows[0][2], version=rows[0][3]) if rows else None

    def get_message(self, message_id: str) -> MessageRecord | None:
        rows = self._read(
            "SELECT id, client, type, version, mode, priority, offline, created_ms, expires_ms"
            " FROM messages WHERE id = ?", (message_id,))
        if not rows:
            return None
        recipients = self._read(
            "SELECT kind, target, status, attempts, last_error, reason, server_msg_id, client_msg_id,"
            " sent_ms, receipt FROM recipients WHERE message_id = ? ORDER BY seq", (message_id,))
        return MessageRecord(*rows[0], recipients=tuple(
            RecipientRecord(*r[:9], receipt=json.loads(r[9]) if r[9] else None) for r in recipients))

    # -- delivery queue -------------------------------------------------------
    def lease(self, now_ms: int, limit: int, lease_ms: int, owner: str,
              new_operation_id: Callable[[str], str], aging_ms: int = 300_000) -> list[WorkItem]:
        with self._write() as db:
            if now_ms - self._swept_ms >= EXPIRY_SWEEP_MS:
                self._expire_due(db, now_ms)
                self._swept_ms = now_ms
            # no starvation: due for aging_ms, low counts as normal; for twice that, anything as high
            db.execute(f"UPDATE recipients SET priority = 1 WHERE status IN {_DUE} AND priority = 2"
                       " AND next_attempt_ms <= ?", (now_ms - aging_ms,))
            db.execute(f"UPDATE recipients SET priority = 0 WHERE status IN {_DUE} AND priority = 1"
                       " AND next_attempt_ms <= ?", (now_ms - 2 * aging_ms,))
            due = db.execute(f"SELECT rowid, message_id, status, expires_ms FROM recipients WHERE status IN {_DUE}"
                             " AND next_attempt_ms <= ? ORDER BY priority, next_attempt_ms LIMIT ?",
                             (now_ms, limit)).fetchall()
            if any(expires_ms <= now_ms for *_, expires_ms in due):  # past the TTL since the last sweep
                self._expire_due(db, now_ms, [rowid for rowid, *_, expires_ms in due if expires_ms <= now_ms])
                due = [row for row in due if row[3] > now_ms]
            by_message: dict[str, list[int]] = {}
            for rowid, message_id, *_ in due:
                by_message.setdefault(message_id, []).append(rowid)
            held = {rowid for rowid, _mid, status, _expires in due if status == "held"}
            leased: dict[int, WorkItem] = {}
            for message_id, rowids in by_message.items():
                message = db.execute(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,)).fetchone()
                rows = db.execute(_LEASE_SQL, (owner, now_ms + lease_ms, new_operation_id(message_id),
                                               json.dumps(rowids))).fetchall()
                leased.update(_work_items(rows, held, message_id, message, owner, json.loads(message[7])))
        return [leased[rowid] for rowid, *_ in due]

    def _expire_due(self, db: sqlite3.Connection, now_ms: int, rowids: list[int] | None = None) -> None:
        """Due recipients past their TTL (all, or those of *rowids*) end ``expired``, never sent late."""
        among = "" if rowids is None else " AND r.rowid IN (SELECT value FROM json_each(?))"
        rows = db.execute(
            "SELECT r.rowid, r.message_id, r.seq, r.kind, r.target, r.status, m.type, m.client"
            " FROM recipients r JOIN messages m ON m.id = r.message_id"
            f" WHERE r.status IN {_DUE} AND r.next_attempt_ms <= ? AND r.expires_ms <= ?{among}",
            (now_ms, now_ms) + (() if rowids is None else (json.dumps(rowids),))).fetchall()
        for rowid, message_id, seq, kind, target, status, type_, client in rows:
            reason = ("ttl passed; the last attempt's outcome is unknown" if status == "sending"
                      else "ttl passed while the user was offline" if status == "held"
                      else "ttl passed before delivery")
            db.execute("UPDATE recipients SET status = 'expired', lease_owner = NULL, reason = ? WHERE rowid = ?",
                       (reason, rowid))
            self._emit(db, "message.expired", recipient_data(message_id, type_, client, kind, target, reason=reason),
                 now_ms)

    def complete(self, results: list[tuple[WorkItem, Outcome]], now_ms: int) -> int:
        done = 0
        with self._write() as db:
            # outcomes with no dead letter or event to add go in one executemany (batches of 500)
            plain = [_outcome_row(i, o) for i, o in results if not self._has_effects(o)]
            if plain:
                done += db.executemany(_COMPLETE_SQL, plain).rowcount
            for item, outcome in results:
                if self._has_effects(outcome) and db.execute(_COMPLETE_SQL, _outcome_row(item, outcome)).rowcount:
                    done += 1
                    self._after_outcome(db, item, outcome, now_ms)
        return done

    def _has_effects(self, outcome: Outcome) -> bool:
        return outcome.status == "failed" or f"message.{outcome.status}" in self.event_types

    def _after_outcome(self, db: sqlite3.Connection, item: WorkItem, outcome: Outcome, now_ms: int) -> None:
        data = recipient_data(item.message_id, item.type, item.client, item.kind, item.target)
        if outcome.status == "sent":
            self._emit(db, "message.sent", {**data, "server_msg_id": outcome.server_msg_id,
                                      "client_msg_id": outcome.client_msg_id}, now_ms)
        elif outcome.status == "failed":
            db.execute("INSERT OR IGNORE INTO dead_letters (message_id, created_ms) VALUES (?, ?)",
                       (item.message_id, now_ms))
            self._emit(db, "message.failed", {**data, "error": outcome.error, "reason": outcome.reason}, now_ms)

    def renew(self, items: list[WorkItem], now_ms: int, lease_ms: int) -> list[WorkItem]:
        held = []
        with self._write() as db:
            for item in items:
                if db.execute("UPDATE recipients SET next_attempt_ms = ? WHERE message_id = ? AND seq = ?"
                              " AND status = 'sending' AND operation_id = ? AND lease_owner = ?",
                              (now_ms + lease_ms, item.message_id, item.seq, item.operation_id,
                               item.lease_owner)).rowcount:
                    held.append(item)
        return held

    def sent_times(self, kind: str, targets: list[str], type_: str, since_ms: int) -> dict[str, list[int]]:
        rows = self._read("SELECT r.target, r.sent_ms FROM recipients r JOIN messages m ON m.id = r.message_id"
                          " WHERE r.target IN (SELECT value FROM json_each(?)) AND r.sent_ms IS NOT NULL"
                          " AND r.sent_ms > ? AND r.kind = ? AND m.type = ? ORDER BY r.sent_ms",
                          (json.dumps(targets), since_ms, kind, type_))
        found: dict[str, list[int]] = {}
        for target, sent_ms in rows:
            found.setdefault(target, []).append(sent_ms)
        return found

    def release(self, items: list[WorkItem], now_ms: int) -> int:
        with self._write() as db:
            return db.executemany(
                "UPDATE recipients SET status = 'queued', next_attempt_ms = ?, attempts = ?, lease_owner = NULL"
                " WHERE message_id = ? AND seq = ? AND status = 'sending' AND operation_id = ? AND lease_owner = ?",
                [(now_ms, item.attempts - item.counted, item.message_id, item.seq, item.operation_id,
                  item.lease_owner) for item in items]).rowcount

    def higher_due(self, rank: int, now_ms: int) -> bool:
        return any(self._read(f"SELECT 1 FROM recipients WHERE status IN {_DUE} AND priority = ?"
                              " AND next_attempt_ms <= ? LIMIT 1", (better, now_ms))
                   for better in range(rank))

    def next_due_ms(self) -> int | None:
        # one index probe per priority rank (recipients_due is ordered by priority first)
        rows = self._read("SELECT MIN(due) FROM (" + " UNION ALL ".join(
            f"SELECT MIN(next_attempt_ms) AS due FROM recipients WHERE status IN {_DUE} AND priority = {rank}"
            for rank in sorted(set(PRIORITY_RANK.values()))) + ")")
        return rows[0][0]

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        rows = self._read(
            "SELECT d.message_id, m.client, m.type, COUNT(r.seq), MAX(r.last_error), d.created_ms"
            " FROM dead_letters d JOIN messages m ON m.id = d.message_id"
            " JOIN recipients r ON r.message_id = d.message_id AND r.status = 'failed'"
            " GROUP BY d.message_id ORDER BY d.created_ms DESC LIMIT ?", (limit,))
        return [DeadLetter(*row) for row in rows]

    def replay_dead_letters(self, message_id: str | None, now_ms: int) -> int:
        where, params = ("WHERE message_id = ?", (message_id,)) if message_id else ("", ())
        with self._write() as db:
            ids = [row[0] for row in db.execute(f"SELECT message_id FROM dead_letters {where}", params)]
            replayed = 0
            for mid in ids:
                replayed += db.execute(
                    "UPDATE recipients SET status = 'queued', attempts = 0, next_attempt_ms = ?,"
                    " reason = NULL, check_operation_id = NULL WHERE message_id = ? AND status = 'failed'",
                    (now_ms, mid)).rowcount
                db.execute("DELETE FROM dead_letters WHERE message_id = ?", (mid,))
        return replayed

    # -- for the operator page ------------------------------------------------------------
    def queue_depth(self) -> dict[str, int]:
        counts = dict(self._read(f"SELECT priority, COUNT(*) FROM recipients WHERE status IN {_DUE}"
                                 " GROUP BY priority"))  # counted on the partial index recipients_due
        return {name: counts.get(rank, 0) for name, rank in PRIORITY_RANK.items()}

    def recent_messages(self, limit: int, recipients: int = 50) -> list[RecentMessage]:
        # the rowid is the acceptance order: the newest are found without a scan
        rows = self._read(
            "SELECT id, client, type, version, mode, priority, offline, created_ms, expires_ms, recipient_count"
            " FROM messages ORDER BY rowid DESC LIMIT ?", (max(limit, 0),))
        recent = []
        for *fields, count in rows:
            shown = self._read(f"SELECT {_RECIPIENT_COLUMNS} FROM recipients WHERE message_id = ?"
                               " ORDER BY seq LIMIT ?", (fields[0], max(recipients, 0)))
            counts = self._read("SELECT status, COUNT(*) FROM recipients WHERE message_id = ? GROUP BY status",
                                (fields[0],))
            record = MessageRecord(*fields, recipients=tuple(_recipient_record(r) for r in shown))
            recent.append(RecentMessage(record, count, dict(counts)))
        return recent

    def failed_recipients(self, limit: int) -> list[FailedRecipient]:
        rows = self._read(
            f"SELECT d.message_id, m.client, m.type, d.created_ms, {_RECIPIENT_COLUMNS}"
            " FROM dead_letters d JOIN messages m ON m.id = d.message_id"
            " JOIN recipients ON recipients.message_id = d.message_id AND recipients.status = 'failed'"
            " ORDER BY d.created_ms DESC, recipients.seq LIMIT ?", (max(limit, 0),))
        return [FailedRecipient(mid, client, type_, _recipient_record(rest), failed_ms)
                for mid, client, type_, failed_ms, *rest in rows]

    def presence_counts(self) -> PresenceCounts:
        [(online, known)] = self._read("SELECT COALESCE(SUM(up), 0), COUNT(*) FROM"
                                       " (SELECT MAX(online) AS up FROM presence GROUP BY user_id)")
        return PresenceCounts(online, known - online)

    # -- shared credentials and locks ----------------------------------------------
    def load_token(self, name: str) -> tuple[str, int] | None:
        rows = self._read("SELECT value, expires_ms FROM shared WHERE name = ?", (f"token:{name}",))
        return (rows[0][0], rows[0][1]) if rows else None

    def save_token(self, name: str, token: str, expires_ms: int) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO shared (name, value, expires_ms) VALUES (?, ?, ?)",
                       (f"token:{name}", token, expires_ms))

    def try_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        now_ms = int(time.time() * 1000)  # lock expiry is wall-clock across processes
        with self._write() as db:
            row = db.execute("SELECT owner, expires_ms FROM shared WHERE name = ?", (f"lock:{name}",)).fetchone()
            if row and row[0] != owner and row[1] > now_ms:
                return False
            db.execute("INSERT OR REPLACE INTO shared (name, value, owner, expires_ms) VALUES (?, '', ?, ?)",
                       (f"lock:{name}", owner, now_ms + ttl_ms))
        return True

    def unlock(self, name: str, owner: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM shared WHERE name = ? AND owner = ?", (f"lock:{name}", owner))

    def batch(self) -> AbstractContextManager[None]:
        return self._db.batch()

    def ping(self) -> None:
        self._read("SELECT 1")

    def close(self) -> None:
        self._db.close()
        self._inbox.close()
