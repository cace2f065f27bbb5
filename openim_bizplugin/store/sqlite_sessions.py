"""SQLite storage for the operator page's sessions and its sign-in throttle.

Rows of the ``shared`` table (``session:<id>`` and ``failures:<name>``, the
end of their life in ``expires_ms``), so every process and replica on the
file sees the same sessions and counts: signing out in one ends the session
in all. Mixed into :class:`.sqlite.SqliteStore`, whose ``_write``/``_read``
it uses.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

# the rows of one kind are a range of the primary key: ';' sorts right after ':'
_FORGET_ENDED = "DELETE FROM shared WHERE name >= ? AND name < ? AND expires_ms <= ?"


class SessionsMixin:
    """Operator sessions and failure counts (see :class:`~openim_bizplugin.store.base.Store`)."""

    _write: Callable[..., AbstractContextManager[sqlite3.Connection]]
    _read: Callable[..., list[Any]]

    def open_session(self, session_id: str, now_ms: int, expires_ms: int) -> None:
        with self._write() as db:
            db.execute(_FORGET_ENDED, ("session:", "session;", now_ms))
            db.execute("INSERT OR REPLACE INTO shared (name, value, expires_ms) VALUES (?, '', ?)",
                       (f"session:{session_id}", expires_ms))

    def touch_session(self, session_id: str, now_ms: int, expires_ms: int) -> bool:
        with self._write() as db:
            return db.execute("UPDATE shared SET expires_ms = ? WHERE name = ? AND expires_ms > ?",
                              (expires_ms, f"session:{session_id}", now_ms)).rowcount == 1

    def close_session(self, session_id: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM shared WHERE name = ?", (f"session:{session_id}",))

    def count_failure(self, name: str, now_ms: int, window_ms: int) -> int:
        with self._write() as db:
            db.execute(_FORGET_ENDED, ("failures:", "failures;", now_ms))  # this one's ended window too
            db.execute("INSERT INTO shared (name, value, expires_ms) VALUES (?, '1', ?)"
                       " ON CONFLICT (name) DO UPDATE SET value = CAST(value AS INTEGER) + 1",
                       (f"failures:{name}", now_ms + window_ms))
            return int(db.execute("SELECT value FROM shared WHERE name = ?", (f"failures:{name}",)).fetchone()[0])

    def failures(self, name: str, now_ms: int) -> tuple[int, int]:
        rows = self._read("SELECT value, expires_ms FROM shared WHERE name = ? AND expires_ms > ?",
                          (f"failures:{name}", now_ms))
        return (int(rows[0][0]), rows[0][1]) if rows else (0, now_ms)
