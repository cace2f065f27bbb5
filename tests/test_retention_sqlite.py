"""SQLite retention: nothing of a swept message stays, and the files stop growing.

The contract (``store_contract.py``) says what is deleted when, on every backend;
these tests look inside the SQLite files: rows left behind, a sweep cut short by a
restart, a file of the previous release, free pages and WAL files.
"""

from __future__ import annotations

import re
import sqlite3

from store_contract import DAY, RETENTION, T0, answered, new, swept_all
from openim_bizplugin.store.base import ReplayKey, Swept
from openim_bizplugin.store.sqlite import _SCHEMA, SqliteStore
from openim_bizplugin.store.sqlite_file import WAL_SIZE_LIMIT
from openim_bizplugin.store.sqlite_tracking import INBOX_WAL_BYTES

GLOBAL_TABLES = {"shared", "type_leases", "subscriber_cursors", "events", "sqlite_sequence", "presence"}


def _rows_per_table(store: SqliteStore) -> dict[str, int]:
    with store._db.borrow() as db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {name: db.execute(f"SELECT COUNT(*) FROM {name}").fetchone()[0] for name in tables}


def _deliver(store: SqliteStore, now: int) -> None:
    """Send everything due."""
    while items := store.lease(now, 1_000, 10_000, "w", lambda mid: "op", aging_ms=DAY):
        store.complete(answered(items, now), now)


def test_a_swept_message_leaves_no_row_behind(tmp_path):
    store = SqliteStore(tmp_path / "x.db", frozenset({"message.sent"}), batch_size=2)
    limited = {"persistent": True, "rate_limit": "5/minute"}
    store.accept(new("m1", "u1", "u2", "u3", mode="custom", key="k", delivery=limited), ReplayKey("crm", "v", 1),
                 retention_ms=DAY)
    store.accept(new("m2", "u1", "u2"), None, retention_ms=DAY)
    _deliver(store, T0 + 1)
    store.sent_counts("user", ["u1"], "profile.updated", T0)  # lists the fan-out's sends in batch_sends
    assert _rows_per_table(store)["batch_sends"] == 3
    swept_all(store, T0 + 1)
    assert swept_all(store, T0 + 1 + DAY + 60_000) == Swept(messages=2, recipients=5)
    left = {table: n for table, n in _rows_per_table(store).items() if n and table not in GLOBAL_TABLES}
    assert left == {}
    store.close()


def test_a_sweep_cut_short_goes_on_after_a_restart(tmp_path):
    store = SqliteStore(tmp_path / "x.db")
    store.accept(new("big", *(f"u{n}" for n in range(5))), None, retention_ms=0)
    _deliver(store, T0 + 1)
    swept_all(store, T0 + 1)
    assert store.sweep(T0 + 1 + DAY, RETENTION, 2).recipients == 2
    store.close()  # the process ends half-way through the message's recipients

    again = SqliteStore(tmp_path / "x.db")
    assert again.get_message("big") is None
    assert swept_all(again, T0 + 1 + DAY) == Swept(recipients=3)
    assert _rows_per_table(again)["recipients"] == 0
    again.close()


def _previous_release_file(path) -> None:
    """A file as the previous release (schema 7, no auto-vacuum) left it: one message sent, one waiting."""
    schema = re.sub(r"started_ms      INTEGER,.*?DEFAULT 0", "started_ms      INTEGER", _SCHEMA, flags=re.DOTALL)
    schema = schema.split("-- the retention sweep:")[0] + "CREATE TABLE IF NOT EXISTS recipients" + \
        schema.split("CREATE TABLE IF NOT EXISTS recipients", 1)[1]
    assert "finished_ms" not in schema and "sweeping" not in schema
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript("PRAGMA journal_mode = WAL;" + schema + "PRAGMA user_version = 7;")
    for mid, status in (("done", "sent"), ("waiting", "queued")):
        db.execute("INSERT INTO messages (id, client, type, version, mode, priority, offline, request_hash, envelope,"
                   " delivery, recipient_count, created_ms, expires_ms) VALUES (?, 'crm', 't', 1, 'notification',"
                   " 'normal', 'store', 'h', '{}', '{}', 1, ?, ?)", (mid, T0, T0 + DAY))
        db.execute("INSERT INTO recipients (message_id, seq, kind, target, status, priority, next_attempt_ms,"
                   " expires_ms) VALUES (?, 0, 'user', 'u1', ?, 1, ?, ?)", (mid, status, T0, T0 + DAY))
    assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    db.close()


def test_a_file_of_the_previous_release_is_swept_and_gets_incremental_auto_vacuum(tmp_path):
    _previous_release_file(tmp_path / "x.db")
    upgraded = SqliteStore(tmp_path / "x.db")
    assert upgraded._db.incremental  # a small file is rewritten at start-up
    swept_all(upgraded, T0 + 5)  # the walk finds the older message finished
    assert swept_all(upgraded, T0 + 5 + DAY) == Swept(messages=1, recipients=1)
    assert upgraded.get_message("done") is None and upgraded.get_message("waiting") is not None
    upgraded.close()


def test_pages_freed_by_a_sweep_go_back_to_the_file_system(tmp_path):
    store = SqliteStore(tmp_path / "x.db")
    for n in range(4):
        store.accept(new(f"m{n}", *(f"user-{n}-{i:05d}" for i in range(2_000))), None, retention_ms=0)
        _deliver(store, T0 + 1)
    swept_all(store, T0 + 1)
    with store._db.borrow() as db:
        full = db.execute("PRAGMA page_count").fetchone()[0]
    assert swept_all(store, T0 + 1 + DAY).recipients == 8_000
    swept_all(store, T0 + 1 + DAY)  # quiet steps hand spare pages back, a bounded number each
    with store._db.borrow() as db:
        assert db.execute("PRAGMA page_count").fetchone()[0] < full // 2
    store.close()


def test_the_callback_inbox_wal_is_cut_back_after_a_burst_of_large_callbacks(tmp_path):
    store = SqliteStore(tmp_path / "x.db")
    body = '{"pad": "%s"}' % ("x" * 60_000)
    for n in range(300):  # 18 MB of callbacks, stored as OpenIM posts them
        store.record_callback("callbackAfterSendSingleMsgCommand", f"k{n}", body, T0)
    assert store._inbox.wal_bytes() > 2 * INBOX_WAL_BYTES
    store.finish_callbacks([(c.id, None) for c in store.pending_callbacks(1_000)])
    assert store._inbox.wal_bytes() == 0  # folded back into the file and cut
    assert store.prune_callbacks(T0 + 1, 1_000) == 300
    swept_all(store, T0 + 1)  # a quiet sweep checkpoints both files ...
    store.record_callback("callbackAfterSendSingleMsgCommand", "next", "{}", T0 + 2)
    assert store._inbox.wal_bytes() <= WAL_SIZE_LIMIT  # ... and the next commit cuts the WAL back
    store.close()


def test_the_vacuum_command_rewrites_both_files_with_incremental_auto_vacuum(tmp_path):
    import io

    from conftest import write_config
    from openim_bizplugin.cli import run

    path = write_config(tmp_path, {"storage": {"url": "sqlite:///bizplugin.db"}})
    _previous_release_file(tmp_path / "bizplugin.db")
    out, err = io.StringIO(), io.StringIO()
    assert run(["vacuum", "-c", str(path)], out, err) == 0, err.getvalue()
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == [str(tmp_path / "bizplugin.db"),
                                                      str(tmp_path / "bizplugin-callbacks.db")]
    assert all(line.endswith("incremental auto-vacuum") for line in lines)
    with sqlite3.connect(tmp_path / "bizplugin.db") as db:
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    redis_config = write_config(tmp_path, {"storage": {"url": "redis://127.0.0.1:1/0"}})
    assert run(["vacuum", "-c", str(redis_config)], out, err) == 1
    assert err.getvalue().strip() == "openim-bizplugin: vacuum is for SQLite storage (Redis gives memory back by itself)"
