"""SQLite retention (SPEC §2 ``[retention]``): finished messages and old presence go.

A sweep step first deletes messages whose retention has passed, then walks the
messages not known to be finished yet, a few at a time, and notes those that have
no work left (``messages.finished_ms``; ``dead`` when some recipient failed). A
dead-letter replay clears the note. Deleting a message is one short transaction
that removes the message row, its batches and dead-letter entry (from then on it
is gone for every reader) and lists it in ``sweeping``; its recipient rows
follow in transactions of :data:`~.base.SWEEP_CHUNK` rows, so no transaction
holds the write lock for long, however large the fan-out. A crash in between
leaves the ``sweeping`` entry, and the next step goes on where it stopped.

Files stop growing: SQLite reuses the pages freed here, new files use incremental
auto-vacuum (so a step can hand spare pages back to the file system), and WAL
files are cut back to ``journal_size_limit`` after a checkpoint (see
:mod:`.sqlite_file`).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from contextlib import AbstractContextManager

from .base import SWEEP_CHUNK, Retention, Swept, rate_period_ms
from .sqlite_file import SqliteFile

log = logging.getLogger(__name__)
# an older file this small is rewritten with incremental auto-vacuum at start-up (about a second)
VACUUM_AT_START_BYTES = 64 * 1024 * 1024
# what a message walk reads per transaction at most, besides the recipients budget
WALK_MESSAGES = 200
# a recipient with work left, or a batch of them (its users wait as 'batched' rows)
_ACTIVE_SQL = ("SELECT EXISTS (SELECT 1 FROM recipients WHERE message_id = ?1 AND status IN ('queued', 'held', 'sending'))"
               " OR EXISTS (SELECT 1 FROM batches WHERE message_id = ?1 AND status IN ('queued', 'sending'))")
_FAILED_SQL = "SELECT EXISTS (SELECT 1 FROM recipients WHERE message_id = ? AND status = 'failed')"
_DUE_FOR_DELETION = ("SELECT id FROM messages WHERE finished_ms IS NOT NULL AND dead = 0 AND finished_ms <= ?"
                     " UNION ALL SELECT id FROM messages WHERE finished_ms IS NOT NULL AND dead = 1"
                     " AND finished_ms <= ? LIMIT 1")


class RetentionMixin:
    """``sweep`` for :class:`.sqlite.SqliteStore`."""

    _walked_to = 0  # rowid of the last message the walk for finished ones checked (0: start over)

    def _write_progress(self) -> AbstractContextManager[sqlite3.Connection]: ...  # provided by SqliteStore
    def _read(self, sql: str, params: tuple = ()) -> list[tuple]: ...  # provided by SqliteStore
    def files(self) -> tuple[SqliteFile, SqliteFile]: ...  # provided by SqliteStore

    def sweep(self, now_ms: int, retention: Retention, budget: int = SWEEP_CHUNK) -> Swept:
        swept = self._delete_finished(now_ms, retention, budget)
        walked_all = swept.recipients >= budget or self._note_finished(now_ms, budget)
        if walked_all:
            swept.presence = self._forget_presence(now_ms - retention.presence_ms, budget)
        swept.more = bool(swept.messages or swept.recipients) or not walked_all or swept.presence >= budget
        if not swept.more:  # a quiet moment: fold the WAL files back and return spare pages
            for file in self.files():
                file.checkpoint()
                file.release_free_pages()
        return swept

    # -- noting what finished ---------------------------------------------------------------
    def _note_finished(self, now_ms: int, budget: int) -> bool:
        """Check the next unfinished messages (about *budget* recipients' worth) for work left;
        those without any are noted finished now. True when the walk reached the newest."""
        with self._write_progress() as db:  # inside the transaction: a replay cannot slip in between
            rows = db.execute("SELECT rowid, id, recipient_count, delivery FROM messages WHERE finished_ms IS NULL"
                              " AND rowid > ? ORDER BY rowid LIMIT ?", (self._walked_to, WALK_MESSAGES)).fetchall()
            read = 0  # recipient rows read: a message with work left is usually told by its first
            for rowid, message_id, count, delivery in rows:
                if read >= budget:
                    return False
                self._walked_to = rowid
                if db.execute(_ACTIVE_SQL, (message_id,)).fetchone()[0]:
                    read += 1
                    continue
                read += count  # all of them, twice at most
                dead = db.execute(_FAILED_SQL, (message_id,)).fetchone()[0]
                db.execute("UPDATE messages SET finished_ms = ?, dead = ? WHERE rowid = ?",
                           (now_ms + rate_period_ms(_settings(delivery)), dead, rowid))
        if len(rows) == WALK_MESSAGES:
            return False
        self._walked_to = 0
        return True

    # -- deleting what is past its retention ----------------------------------------------------
    def _delete_finished(self, now_ms: int, retention: Retention, budget: int) -> Swept:
        swept = Swept()
        while swept.recipients < budget:
            sweeping = self._read("SELECT message_id, type, batch_ids FROM sweeping LIMIT 1")
            if sweeping:
                swept.recipients += self._delete_recipients(*sweeping[0], budget - swept.recipients)
                continue
            due = self._read(_DUE_FOR_DELETION, (now_ms - retention.finished_ms, now_ms - retention.dead_letter_ms))
            if not due or not self._detach(due[0][0], now_ms, retention):
                break
            swept.messages += 1
        return swept

    def _detach(self, message_id: str, now_ms: int, retention: Retention) -> bool:
        """Delete the message row and everything but its recipients, in one transaction; its
        recipients are listed in ``sweeping``. False when it is no longer due (replayed)."""
        with self._write_progress() as db:
            gone = db.execute("DELETE FROM messages WHERE id = ? AND finished_ms <= CASE dead WHEN 0 THEN ? ELSE ? END"
                              " RETURNING type", (message_id, now_ms - retention.finished_ms,
                                                  now_ms - retention.dead_letter_ms)).fetchone()
            if gone is None:
                return False
            batch_ids = json.dumps([batch_id for (batch_id,) in db.execute(
                "DELETE FROM batches WHERE message_id = ? RETURNING id", (message_id,))])
            db.execute("DELETE FROM batch_targets WHERE batch_id IN (SELECT value FROM json_each(?))", (batch_ids,))
            db.execute("DELETE FROM batch_sends_pending WHERE type = ? AND batch_id IN (SELECT value FROM json_each(?))",
                       (gone[0], batch_ids))
            db.execute("DELETE FROM dead_letters WHERE message_id = ?", (message_id,))
            db.execute("INSERT OR REPLACE INTO sweeping (message_id, type, batch_ids) VALUES (?, ?, ?)",
                       (message_id, gone[0], batch_ids))
        return True

    def _delete_recipients(self, message_id: str, type_: str, batch_ids: str, limit: int) -> int:
        """Up to *limit* (at most SWEEP_CHUNK) recipient rows of a detached message, and what rate
        limits knew of its batches' sends; the last of them ends its ``sweeping`` entry."""
        limit = max(1, min(limit, SWEEP_CHUNK))
        with self._write_progress() as db:
            targets = [target for (target,) in db.execute(
                "DELETE FROM recipients WHERE rowid IN (SELECT rowid FROM recipients WHERE message_id = ? LIMIT ?)"
                " RETURNING target", (message_id, limit))]
            if targets and batch_ids != "[]":
                db.execute("DELETE FROM batch_sends WHERE target IN (SELECT value FROM json_each(?)) AND type = ?"
                           " AND batch_id IN (SELECT value FROM json_each(?))", (json.dumps(targets), type_, batch_ids))
            if len(targets) < limit:
                db.execute("DELETE FROM sweeping WHERE message_id = ?", (message_id,))
        return len(targets)

    def _forget_presence(self, before_ms: int, limit: int) -> int:
        """Users none of whose presence reports is newer than *before_ms* (found without the write
        lock, on the primary key); returns how many were forgotten."""
        old = self._read("SELECT user_id FROM presence GROUP BY user_id HAVING MAX(updated_ms) < ? LIMIT ?",
                         (before_ms, limit))
        forgotten = 0
        if old:
            with self._write_progress() as db:
                for (user,) in old:
                    if not db.execute("SELECT 1 FROM presence WHERE user_id = ? AND updated_ms >= ?",
                                      (user, before_ms)).fetchone():  # no report came in meanwhile
                        forgotten += db.execute("DELETE FROM presence WHERE user_id = ?", (user,)).rowcount > 0
        return forgotten


def adopt_incremental_vacuum(file: SqliteFile) -> None:
    """Give a file made before this release incremental auto-vacuum: a small one at once, a
    larger one when the operator runs ``openim-bizplugin vacuum`` (without it the file still
    reuses the pages the sweep frees, it only never shrinks)."""
    if file.incremental:
        return
    size = os.path.getsize(file.path)
    if size > VACUUM_AT_START_BYTES:
        log.warning("%s (%d MB) was made without incremental auto-vacuum: it will not shrink after a sweep;"
                    " run `openim-bizplugin vacuum` once while the sidecar is stopped", file.path, size // 2**20,
                    extra={"event": "storage.vacuum_needed"})
        return
    file.vacuum()
    log.info("%s rewritten with incremental auto-vacuum (%d KB)", file.path, size // 1024,
             extra={"event": "storage.vacuumed"})


def _settings(delivery: str) -> object:
    """A message's stored delivery settings, or None when the row holds no JSON object."""
    try:
        return json.loads(delivery)
    except (TypeError, ValueError):
        return None
