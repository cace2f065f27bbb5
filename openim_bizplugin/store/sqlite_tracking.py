"""SQLite storage for what happens after sending (SPEC §5–§7).

The callback inbox (OpenIM's webhooks, stored before they are processed),
presence per user and platform, the recipient updates callbacks cause, and the
event outbox for subscribers. Mixed into :class:`.sqlite.SqliteStore`, whose
``_write``/``_read`` it uses; every change and the events it causes commit in
one transaction, so no event is emitted for a change that did not happen.
"""

from __future__ import annotations

import itertools
import json
import secrets
import sqlite3
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from .base import (Answer, CallbackRecord, EventRecord, PresenceState, SubscriberCursor, batch_answers, recipient_data)
from .sqlite_file import SqliteFile

DONE_BATCHES_KEPT = 8  # parsed answers of sent batches kept for callbacks about their users
INBOX_WAL_BYTES = 4 * 1024 * 1024  # the inbox's WAL is folded back and cut once it is this large
FORGET_BATCH = 5_000  # events deleted per write when a subscriber's cursor is forgotten
_RECORD_CALLBACK = "INSERT OR IGNORE INTO callbacks (command, natural_key, body, received_ms) VALUES (?, ?, ?, ?)"


def emit(db: sqlite3.Connection, type_: str, data: dict[str, Any], now_ms: int) -> None:
    """Add one subscriber event (stable id) to the outbox, inside the caller's transaction."""
    db.execute("INSERT INTO events (id, type, data, created_ms) VALUES (?, ?, ?, ?)",
               (f"evt_{secrets.token_hex(12)}", type_, json.dumps(data, ensure_ascii=False), now_ms))


# the user's recipient of a message still waiting for a receipt (found through recipients_target)
RECEIPT_RECIPIENT_SQL = ("SELECT r.seq, m.type, m.client FROM recipients r JOIN messages m ON m.id = r.message_id"
                         " WHERE r.message_id = ? AND r.kind = 'user' AND r.target = ? AND r.receipt IS NULL")


class TrackingMixin:
    """Callback inbox, presence, receipts and the event outbox."""

    _inbox: SqliteFile  # the callback inbox file, provided by SqliteStore
    event_types: frozenset[str] = frozenset()  # what subscribers listen to; others are not kept
    events_kept: int  # events every subscriber received that stay anyway (a look back)

    def _emit(self, db: sqlite3.Connection, type_: str, data: dict[str, Any], now_ms: int) -> None:
        if type_ in self.event_types:
            emit(db, type_, data, now_ms)

    def _write(self) -> AbstractContextManager[sqlite3.Connection]: ...  # provided by SqliteStore
    def _read(self, sql: str, params: tuple = ()) -> list[tuple]: ...  # provided by SqliteStore

    # -- callback inbox ----------------------------------------------------------
    def record_callback(self, command: str, natural_key: str, body: str, received_ms: int) -> bool:
        with self._inbox.write() as db:
            return db.execute(_RECORD_CALLBACK, (command, natural_key, body, received_ms)).rowcount == 1

    def record_callbacks(self, callbacks: Sequence[tuple[str, str, str, int]]) -> int:
        with self._inbox.write() as db:
            return sum(db.execute(_RECORD_CALLBACK, callback).rowcount for callback in callbacks)

    def record_callback_now(self, command: str, natural_key: str, body: str, received_ms: int,
                            wait_seconds: float = 0.0) -> bool:
        return self._inbox.execute_now(_RECORD_CALLBACK, (command, natural_key, body, received_ms), wait_seconds) == 1

    def pending_callbacks(self, limit: int) -> list[CallbackRecord]:
        rows = self._inbox.read("SELECT id, command, body, received_ms FROM callbacks WHERE done = 0"
                                " ORDER BY id LIMIT ?", (limit,))
        return [CallbackRecord(*row) for row in rows]

    def finish_callbacks(self, results: list[tuple[int, str | None]]) -> None:
        # one transaction per round: a lock taken per callback made OpenIM's answers wait (bench_callbacks)
        with self._inbox.write() as db:
            db.executemany("UPDATE callbacks SET done = 1, error = ? WHERE id = ?",
                           [(error, callback_id) for callback_id, error in results])
        # here, off the answer path, and not every round: each checkpoint copied the round's
        # pages back into the file (~1 ms a round in a burst); every commit appends its pages
        # (~20 KB for a small callback), so a few MB come together in a second of a burst
        if self._inbox.wal_bytes() > INBOX_WAL_BYTES:
            self._inbox.truncate_wal()

    def prune_callbacks(self, before_ms: int, limit: int) -> int:
        # ids follow arrival: the oldest processed ones come first on callbacks_pending (done, id),
        # so the work is bounded by *limit* however many recent ones there are
        rows = self._inbox.read("SELECT id, received_ms FROM callbacks WHERE done = 1 ORDER BY id LIMIT ?",
                                (limit,))
        old = list(itertools.takewhile(lambda row: row[1] < before_ms, rows))
        if not old:
            return 0
        with self._inbox.write() as db:
            return db.execute("DELETE FROM callbacks WHERE done = 1 AND id <= ? AND received_ms < ?",
                              (old[-1][0], before_ms)).rowcount

    # -- what callbacks tell about sent messages ---------------------------------------
    def settle_batched(self, message_id: str, user_ids: list[str]) -> int:
        rows = self._read(
            "SELECT r.rowid, r.target, m.type, b.id, b.attempts, b.reason, b.sent_ms, b.results FROM recipients r"
            " JOIN messages m ON m.id = r.message_id"
            " JOIN batches b ON b.message_id = r.message_id AND r.seq BETWEEN b.first_seq AND b.last_seq"
            " WHERE r.message_id = ? AND r.target IN (SELECT value FROM json_each(?)) AND r.status = 'batched'"
            " AND b.status = 'done'", (message_id, json.dumps(user_ids)))
        if not rows:
            return 0
        with self._write() as db:
            for rowid, target, type_, batch_id, attempts, reason, sent_ms, stored in rows:
                server_msg_id, client_msg_id, send_time = self._done_batch_answers(batch_id, stored).get(
                    target, (None, None, None))
                if db.execute("UPDATE recipients SET status = 'sent', attempts = ?, reason = ?, server_msg_id = ?,"
                              " client_msg_id = ?, sent_ms = ? WHERE rowid = ? AND status = 'batched'",
                              (attempts, reason, server_msg_id, client_msg_id, send_time or sent_ms, rowid)).rowcount:
                    # the row's sent_ms now counts for rate limits (recipients_sent): not twice
                    db.execute("DELETE FROM batch_sends WHERE target = ? AND type = ? AND sent_ms = ? AND batch_id = ?",
                               (target, type_, sent_ms, batch_id))
        return len(rows)

    def confirm_sent(self, server_msg_id: str, now_ms: int) -> int:
        with self._write() as db:
            return db.execute("UPDATE recipients SET confirmed_ms = COALESCE(confirmed_ms, ?)"
                              " WHERE server_msg_id = ?", (now_ms, server_msg_id)).rowcount

    def record_saved_seq(self, server_msg_id: str, conversation_id: str, msg_seq: int) -> int:
        with self._write() as db:
            return db.execute("UPDATE recipients SET conversation_id = ?, msg_seq = ? WHERE server_msg_id = ?",
                              (conversation_id, msg_seq, server_msg_id)).rowcount

    def mark_pushed(self, client_msg_id: str, kind: str, targets: list[str], now_ms: int) -> int:
        with self._write() as db:
            return db.execute("UPDATE recipients SET pushed_ms = COALESCE(pushed_ms, ?) WHERE client_msg_id = ?"
                              " AND kind = ? AND target IN (SELECT value FROM json_each(?))",
                              (now_ms, client_msg_id, kind, json.dumps(targets))).rowcount

    def mark_read(self, conversation_id: str, seqs: list[int], reader: str, now_ms: int) -> int:
        """Sent user recipients in *conversation_id* whose seq *reader* read become ``read``."""
        # one JSON parameter, not one "?" per seq: a read of 300,000 seqs was "too many SQL variables"
        with self._write() as db:
            rows = db.execute(
                "SELECT r.message_id, r.seq, r.target, m.type, m.client FROM recipients r"
                " JOIN messages m ON m.id = r.message_id"
                " WHERE r.conversation_id = ? AND r.msg_seq IN (SELECT value FROM json_each(?)) AND r.kind = 'user'"
                " AND r.target = ? AND r.status = 'sent'", (conversation_id, json.dumps(seqs), reader)).fetchall()
            for message_id, seq, target, type_, client in rows:
                db.execute("UPDATE recipients SET status = 'read', read_ms = ? WHERE message_id = ? AND seq = ?",
                           (now_ms, message_id, seq))
                self._emit(db, "message.read", recipient_data(message_id, type_, client, "user", target), now_ms)
        return len(rows)

    def _done_batch_answers(self, batch_id: int, stored: str | None) -> dict[str, Answer]:
        """A done batch's answers (never changed once done), kept for the last few batches asked
        about: the callbacks about a fan-out's users come together, and reading a 500-user answer
        costs ~0.5 ms."""
        with self._answers_lock:
            found = self._answers.get(batch_id)
        if found is None:
            found = batch_answers(stored)
            with self._answers_lock:
                self._answers[batch_id] = found
                while len(self._answers) > DONE_BATCHES_KEPT:
                    self._answers.popitem(last=False)
        return found

    def acknowledge(self, message_id: str, user_id: str, receipt: dict[str, Any], now_ms: int) -> bool:
        """Record a client receipt on the user's recipient of *message_id* (first receipt wins)."""
        self.settle_batched(message_id, [user_id])  # keeps OpenIM's answer when its batch was sent
        with self._write() as db:
            row = db.execute(RECEIPT_RECIPIENT_SQL, (message_id, user_id)).fetchone()
            if row is None:
                return False
            db.execute("UPDATE recipients SET status = 'acknowledged', receipt = ? WHERE message_id = ? AND seq = ?",
                       (json.dumps(receipt, ensure_ascii=False), message_id, row[0]))
            self._emit(db, "receipt.received",
                 recipient_data(message_id, row[1], row[2], "user", user_id, receipt=receipt), now_ms)
        return True

    # -- presence --------------------------------------------------------------------------
    def update_presence(self, user_id: str, platform_id: int, online: bool, seq: int, now_ms: int) -> bool:
        """Apply a level report unless a newer one (by OpenIM's seq) is known.

        When the user as a whole comes online, recipients held for them are
        due at once, at high priority; a change of the user's state emits
        ``user.online`` / ``user.offline``. Returns whether anything changed.
        """
        with self._write() as db:
            # one read of the user's platforms (a handful) and one write: 80% of a callback burst
            platforms = {platform: (bool(up), known_seq) for platform, up, known_seq in db.execute(
                "SELECT platform_id, online, seq FROM presence WHERE user_id = ?", (user_id,))}
            if platform_id in platforms and platforms[platform_id][1] >= seq:
                return False
            was_online = any(up for up, _ in platforms.values())
            platforms[platform_id] = (online, seq)
            is_online = any(up for up, _ in platforms.values())
            db.execute("INSERT OR REPLACE INTO presence (user_id, platform_id, online, seq, updated_ms)"
                       " VALUES (?, ?, ?, ?, ?)", (user_id, platform_id, int(online), seq, now_ms))
            if is_online and not was_online:
                db.execute("UPDATE recipients SET next_attempt_ms = ?, priority = 0"
                           " WHERE target = ? AND status = 'held' AND kind = 'user'", (now_ms, user_id))
            if is_online != was_online:
                self._emit(db, "user.online" if is_online else "user.offline",
                     {"user_id": user_id, "platform_id": platform_id}, now_ms)
            return True

    def presence(self, user_ids: list[str]) -> dict[str, PresenceState]:
        """What callbacks last said of each user (absent when nothing is known)."""
        if not user_ids:
            return {}
        rows = self._read("SELECT user_id, MAX(online), MAX(updated_ms) FROM presence"
                          " WHERE user_id IN (SELECT value FROM json_each(?)) GROUP BY user_id", (json.dumps(user_ids),))
        return {user: PresenceState(bool(online), updated) for user, online, updated in rows}

    # -- event outbox --------------------------------------------------------------------------
    def events_after(self, seq: int, limit: int) -> list[EventRecord]:
        rows = self._read("SELECT seq, id, type, data, created_ms FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                          (seq, limit))
        return [EventRecord(s, i, t, json.loads(d), c) for s, i, t, d, c in rows]

    def subscriber_cursor(self, subscriber: str) -> SubscriberCursor:
        """Where *subscriber* stands; a new one starts after the newest event."""
        rows = self._read("SELECT last_seq, attempts, next_attempt_ms, last_error FROM subscriber_cursors"
                          " WHERE subscriber = ?", (subscriber,))
        if rows:  # the common case reads only: idle loops ask every second
            return SubscriberCursor(subscriber, *rows[0])
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO subscriber_cursors (subscriber, last_seq)"
                       " SELECT ?, COALESCE(MAX(seq), 0) FROM events", (subscriber,))
            row = db.execute("SELECT last_seq, attempts, next_attempt_ms, last_error FROM subscriber_cursors"
                             " WHERE subscriber = ?", (subscriber,)).fetchone()
        return SubscriberCursor(subscriber, *row)

    def save_subscriber_cursor(self, cursor: SubscriberCursor) -> None:
        """Store the position; events every subscriber has passed are deleted, but the newest
        ``events_kept`` of them, and never an event some subscriber still waits for."""
        with self._write() as db:
            db.execute("UPDATE subscriber_cursors SET last_seq = ?, attempts = ?, next_attempt_ms = ?, last_error = ?"
                       " WHERE subscriber = ?",
                       (cursor.last_seq, cursor.attempts, cursor.next_attempt_ms, cursor.last_error, cursor.subscriber))
            db.execute("DELETE FROM events WHERE seq <= (SELECT MIN(last_seq) FROM subscriber_cursors) - ?",
                       (self.events_kept,))

    def subscriber_names(self) -> list[str]:
        return [name for (name,) in self._read("SELECT subscriber FROM subscriber_cursors ORDER BY subscriber", ())]

    def forget_subscriber(self, subscriber: str) -> bool:
        with self._write() as db:
            if db.execute("DELETE FROM subscriber_cursors WHERE subscriber = ?", (subscriber,)).rowcount == 0:
                return False
            below = db.execute("SELECT COALESCE((SELECT MIN(last_seq) FROM subscriber_cursors),"
                               " (SELECT MAX(seq) FROM events), 0) - ?", (self.events_kept,)).fetchone()[0]
        # what only it waited for, in short writes: months of events may stand behind it
        while True:
            with self._write() as db:
                if db.execute("DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE seq <= ?"
                              " ORDER BY seq LIMIT ?)", (below, FORGET_BATCH)).rowcount < FORGET_BATCH:
                    return True
