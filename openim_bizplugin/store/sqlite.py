"""The embedded SQLite backend.

WAL mode with ``synchronous=FULL`` makes every commit durable before the
sidecar answers; every write runs in a ``BEGIN IMMEDIATE`` transaction and
connections wait (``busy_timeout``) instead of failing, so several server
processes can share one database file. Each thread has its own connection.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from ..errors import StorageUnavailable
from .base import (PRIORITY_RANK, Accepted, IdempotencyMismatch, MessageRecord, NewMessage,
                   RecipientRecord, ReplayKey)

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30_000

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

CREATE TABLE IF NOT EXISTS recipients (
    message_id      TEXT NOT NULL REFERENCES messages (id),
    seq             INTEGER NOT NULL,
    kind            TEXT NOT NULL,
    target          TEXT NOT NULL,
    status          TEXT NOT NULL,
    priority        INTEGER NOT NULL,
    next_attempt_ms INTEGER NOT NULL,
    lease_until_ms  INTEGER,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    reason          TEXT,
    server_msg_id   TEXT,
    client_msg_id   TEXT,
    sent_ms         INTEGER,
    receipt         TEXT,
    PRIMARY KEY (message_id, seq)
);
CREATE INDEX IF NOT EXISTS recipients_queue ON recipients (status, priority, next_attempt_ms);
"""


class SqliteStore:
    """SQLite implementation of :class:`~openim_bizplugin.store.base.Store`."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._migrate()

    # -- connections ------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                     isolation_level=None, check_same_thread=False)
                db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = FULL")
            except sqlite3.Error as exc:
                raise StorageUnavailable(f"cannot open the database: {exc}") from exc
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; any SQLite failure becomes a 503."""
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise StorageUnavailable(f"the database rejected the write: {exc}") from exc

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        try:
            return self._connection().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"the database cannot be read: {exc}") from exc

    def _migrate(self) -> None:
        with self._write() as db:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                raise StorageUnavailable(
                    f"database schema version {version} is newer than this release understands")

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
        rank = PRIORITY_RANK[m.priority]
        db.executemany(
            "INSERT INTO recipients (message_id, seq, kind, target, status, priority, next_attempt_ms)"
            " VALUES (?, ?, ?, ?, 'queued', ?, ?)",
            ((m.id, seq, m.target_kind, target, rank, m.created_ms) for seq, target in enumerate(m.targets)),
        )

    def replayed(self, replay: ReplayKey) -> Accepted | None:
        rows = self._read("SELECT id, recipient_count FROM messages WHERE replay_key = ?", (replay.text(),))
        return Accepted(rows[0][0], rows[0][1], created=False) if rows else None

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

    def ping(self) -> None:
        self._read("SELECT 1")

    def close(self) -> None:
        with self._lock:
            for db in self._connections:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
            self._connections.clear()
        self._local = threading.local()
