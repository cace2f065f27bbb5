"""The SQLite store: durable settings, atomic acceptance, shared files."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import subprocess
import sys
import threading

import pytest

from conftest import message
from store_contract import sent_batch
from openim_bizplugin.errors import StorageBusy, StorageUnavailable
from openim_bizplugin.store.base import IdempotencyMismatch, NewMessage, Outcome, ReplayKey
from openim_bizplugin.store.sqlite import _SCHEMA, SCHEMA_VERSION, SqliteStore
from openim_bizplugin.store.sqlite_tracking import RECEIPT_RECIPIENT_SQL


def _new(i: int = 0, *, key: str | None = None, digest: str = "h", targets=("u1", "u2")) -> NewMessage:
    return NewMessage(
        id=f"m{i}", client="crm", type="profile.updated", version=1, mode="notification",
        priority="normal", offline="store", ttl_seconds=60, collapse_key=None, idempotency_key=key,
        request_hash=digest, envelope="{}", delivery={}, target_kind="user", targets=targets,
        created_ms=1_000_000 + i)


def test_messages_sync_fully_and_the_callback_inbox_is_a_separate_file(tmp_path):
    store = SqliteStore(tmp_path / "x.db")
    with store._db.borrow() as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with store._inbox.borrow() as inbox:
        assert inbox.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert inbox.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert (tmp_path / "x-callbacks.db").exists()


def test_the_queue_commits_without_fsync_but_acceptance_always_syncs_fully(tmp_path, monkeypatch):
    store = SqliteStore(tmp_path / "x.db")
    levels = []  # PRAGMA synchronous inside each transaction: 2 = FULL, 1 = NORMAL
    insert = store._insert

    def watched_insert(db, *args):
        levels.append(("accept", db.execute("PRAGMA synchronous").fetchone()[0]))
        return insert(db, *args)

    monkeypatch.setattr(store, "_insert", watched_insert)
    store.accept(_new(1), None, retention_ms=0)
    assert store.lease(1_000_010, 10, 10_000, "w", lambda mid: "op")  # on the same pooled connection
    with store._write_progress() as db:
        levels.append(("queue", db.execute("PRAGMA synchronous").fetchone()[0]))
    store.accept(_new(2), None, retention_ms=0)
    assert levels == [("accept", 2), ("queue", 1), ("accept", 2)]


def test_accept_stores_message_and_recipients_together(tmp_path):
    store = SqliteStore(tmp_path / "x.db")
    accepted = store.accept(_new(), None, retention_ms=10_000)
    assert accepted.created and accepted.answer() == {"id": "m0", "status": "queued", "recipients": 2}
    record = store.get_message("m0")
    assert [(r.target, r.status, r.attempts) for r in record.recipients] == [("u1", "queued", 0), ("u2", "queued", 0)]


def test_replay_and_idempotency_return_the_first_answer(tmp_path):
    store = SqliteStore(tmp_path / "x.db")
    replay = ReplayKey("crm", "v" * 64, 42)
    store.accept(_new(1, key="k"), replay, retention_ms=10_000)
    assert store.replayed(replay).message_id == "m1"
    repeat = store.accept(_new(2, key="k"), None, retention_ms=10_000)
    assert (repeat.message_id, repeat.created) == ("m1", False)
    with pytest.raises(IdempotencyMismatch):
        store.accept(_new(3, key="k", digest="other"), None, retention_ms=10_000)
    assert store.get_message("m2") is None and store.get_message("m3") is None


def test_idempotency_key_is_forgotten_after_retention(tmp_path):
    store = SqliteStore(tmp_path / "x.db")
    store.accept(_new(1, key="k"), None, retention_ms=5)
    assert store.accept(_new(9, key="k"), None, retention_ms=5).created


def test_two_stores_on_one_file_accept_concurrently_without_lock_errors(tmp_path):
    stores = [SqliteStore(tmp_path / "shared.db"), SqliteStore(tmp_path / "shared.db")]
    errors: list[Exception] = []

    def writer(store: SqliteStore, offset: int) -> None:
        try:
            for i in range(100):
                store.accept(_new(offset + i, targets=tuple(f"u{j}" for j in range(5))), None, retention_ms=1)
        except Exception as exc:  # collected: the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(stores[n % 2], n * 1000)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    check = sqlite3.connect(tmp_path / "shared.db")
    assert check.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 400
    assert check.execute("SELECT COUNT(*) FROM recipients").fetchone()[0] == 2000


def _gate_held_by_another_process(db_path):
    """A child process that holds the writers' gate of *db_path* until its stdin closes."""
    script = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
              " fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", script, f"{db_path}-writers"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "held\n"
    return child


def test_a_write_waits_its_turn_behind_another_of_our_processes_and_gives_up_with_503(tmp_path):
    """serve's processes take turns through the gate file, not SQLite's sleeping busy handler."""
    store = SqliteStore(tmp_path / "x.db", lock_wait_seconds=0.3)
    holder = _gate_held_by_another_process(store.path)
    try:
        with pytest.raises(StorageBusy, match="no write could start within 0.3 s") as refused:
            store.accept(_new(1), None, retention_ms=1)
        assert refused.value.headers["Retry-After"] == "1"
        assert store.get_message("m1") is None  # a 503 stores nothing
        late = _in_other_thread_started(lambda: store.accept(_new(2), None, retention_ms=1))
        holder.stdin.close()  # the other process's write ends: this one goes
        assert holder.wait(10) == 0
        late.join(10)
    finally:
        holder.kill()
    assert store.get_message("m2") is not None


def test_background_writes_go_on_past_a_gate_that_stays_shut(tmp_path, monkeypatch):
    """A stuck holder of the gate never stops delivery: past the wait SQLite's own locking decides."""
    monkeypatch.setattr("openim_bizplugin.store.sqlite_file.BUSY_TIMEOUT_MS", 300)
    store = SqliteStore(tmp_path / "x.db")
    holder = _gate_held_by_another_process(store.path)
    try:
        assert store.update_presence("u1", 1, True, 1, 1_000)
    finally:
        holder.kill()
    assert store.presence(["u1"])["u1"].online


def test_writes_are_ungated_where_the_gate_file_cannot_be_made(tmp_path):
    (tmp_path / "x.db-writers").mkdir()  # not a file it can open (a read-only folder is another case)
    store = SqliteStore(tmp_path / "x.db", lock_wait_seconds=0.3)
    assert store.accept(_new(1), None, retention_ms=1).created


def _in_other_thread_started(call) -> threading.Thread:
    thread = threading.Thread(target=call)
    thread.start()
    return thread


def test_failed_write_is_503_and_leaves_nothing_behind(signed, store, tmp_path, config):
    db = sqlite3.connect(config.storage.sqlite_path)
    db.execute("CREATE TRIGGER full_disk BEFORE INSERT ON recipients "
               "BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END")
    db.commit()
    response = signed.post(message())
    assert response.status_code == 503
    assert response.get_json(force=True)["title"].startswith("Storage unavailable")
    assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_a_batch_commits_its_writes_together_and_a_failed_write_alone_is_undone(tmp_path):
    store = SqliteStore(tmp_path / "x.db")
    with sqlite3.connect(store.path) as db:
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON presence WHEN NEW.user_id = 'bad'"
                   " BEGIN SELECT RAISE(ABORT, 'refused'); END")
    outside = sqlite3.connect(store.path)
    with store.batch():
        assert store.update_presence("u1", 1, True, 1, 1_000)
        assert store.presence(["u1"])["u1"].online  # reads inside the batch see its writes
        with pytest.raises(StorageUnavailable, match="refused"):
            store.update_presence("bad", 1, True, 1, 1_000)
        assert store.update_presence("u2", 1, True, 1, 1_000)
        assert outside.execute("SELECT count(*) FROM presence").fetchone() == (0,)  # not committed yet
    assert outside.execute("SELECT user_id FROM presence ORDER BY user_id").fetchall() == [("u1",), ("u2",)]


def test_a_batch_that_raises_commits_nothing(tmp_path):
    store = SqliteStore(tmp_path / "x.db")
    with pytest.raises(RuntimeError), store.batch():
        store.update_presence("u1", 1, True, 1, 1_000)
        raise RuntimeError("crash mid-round")
    assert store.presence(["u1"]) == {}
    assert store.update_presence("u1", 1, True, 1, 1_000)  # the file is usable afterwards


def test_record_callback_now_refuses_to_wait_for_a_lock_and_writes_nothing(tmp_path):
    store = SqliteStore(tmp_path / "x.db")
    locker = sqlite3.connect(store._inbox.path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # another process is writing the inbox
    with pytest.raises(StorageBusy, match="locked by another process"):
        store.record_callback_now("cmd", "k1", "{}", 1)
    locker.execute("ROLLBACK")
    with store._inbox.write():  # another thread of this process is writing it
        with pytest.raises(StorageBusy, match="in progress"):
            _in_other_thread(lambda: store.record_callback_now("cmd", "k1", "{}", 1))
    assert store.pending_callbacks(10) == []
    assert store.record_callback_now("cmd", "k1", "{}", 1)
    assert not store.record_callback_now("cmd", "k1", "{}", 2)  # a duplicate
    assert [(c.command, c.received_ms) for c in store.pending_callbacks(10)] == [("cmd", 1)]


def _in_other_thread(call):
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(_capture(call)))
    thread.start()
    thread.join(10)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _capture(call):
    try:
        return call()
    except BaseException as exc:  # handed back to the test thread
        return exc


def _fan_out(i: int, users: int, **fields) -> NewMessage:
    return dataclasses.replace(_new(i, targets=tuple(f"u{n}" for n in range(users))), mode="custom", **fields)


def test_a_custom_fan_out_is_leased_in_whole_batches_of_batch_size(tmp_path):
    store = SqliteStore(tmp_path / "x.db", batch_size=2)
    store.accept(_fan_out(1, 5), None, retention_ms=0)
    ops = iter(range(100))
    lease = lambda limit: store.lease(1_000_010, limit, 10_000, "w", lambda mid: f"op{next(ops)}")  # noqa: E731
    first = lease(3)  # a batch is never split: two of them would be 4 > 3
    assert [(i.members, i.operation_id) for i in first] == [([(0, "u0"), (1, "u1")], "op0-0")]
    assert [i.members for i in lease(1)] == [[(2, "u2"), (3, "u3")]]  # the first one goes even when larger
    assert [i.members for i in lease(10)] == [[(4, "u4")]]
    with store._db.borrow() as db:  # nothing per user was written to lease them
        assert db.execute("SELECT DISTINCT status FROM recipients").fetchall() == [("batched",)]


def test_only_custom_fan_outs_to_users_with_nothing_decided_while_waiting_are_batched(tmp_path):
    store = SqliteStore(tmp_path / "x.db")
    plain = [_fan_out(1, 2), _fan_out(2, 1), _fan_out(3, 2, offline="hold"), _fan_out(4, 2, collapse_key="c"),
             _fan_out(5, 2, delivery={"rate_limit": "3/hour"}), _fan_out(6, 2, target_kind="group"), _new(7)]
    for m in plain:
        store.accept(m, None, retention_ms=0)
    with store._db.borrow() as db:
        assert db.execute("SELECT DISTINCT message_id FROM batches").fetchall() == [("m1",), ("m5",)]


def _sent_fan_out(store: SqliteStore) -> None:
    """m1 to u0, u1, u2 of a rate-limited type, sent in one batch at 1_000_020; OpenIM refused u1."""
    store.accept(_fan_out(1, 3, delivery={"rate_limit": "10/hour"}), None, retention_ms=0)
    [batch] = store.lease(1_000_010, 10, 10_000, "w", lambda mid: "op")
    refused = batch.member(*batch.members[1])
    sends = {"u0": ("s0", "c0", 1_000_020), "u2": ("s2", "c2", 1_000_020)}
    store.complete([(refused, Outcome.retry("refused", 1_001_000)), (batch, sent_batch(sends, 1_000_020))],
                   1_000_020)


def test_a_fan_outs_sends_are_listed_per_user_only_once_they_are_counted(tmp_path):
    store = SqliteStore(tmp_path / "x.db")
    _sent_fan_out(store)
    rows = lambda table: store._read(f"SELECT * FROM {table}")  # noqa: E731
    assert rows("batch_sends") == [] and len(rows("batch_sends_pending")) == 1  # a row per call, not per user
    store.settle_batched("m1", ["u2"])  # a callback gives u2 a row of its own (with its sent_ms) first
    assert store.sent_counts("user", ["u0", "u1", "u2"], "profile.updated", 0) == {
        "u0": (1, 1_000_020), "u2": (1, 1_000_020)}  # u1 was refused; u2 counted once
    assert [row[0] for row in rows("batch_sends")] == ["u0"] and rows("batch_sends_pending") == []


@pytest.mark.parametrize("stored", ["as OpenIM answered", "as files before it kept the answer"])
def test_a_sent_batch_shows_each_users_ids_from_openims_answer(tmp_path, stored):
    store = SqliteStore(tmp_path / "x.db")
    _sent_fan_out(store)
    if stored != "as OpenIM answered":
        with store._write() as db:
            db.execute("""UPDATE batches SET results = '{"u0":["s0","c0",1000020],"u2":["s2","c2",1000020]}'""")
    ids = lambda: {r.target: (r.status, r.server_msg_id, r.client_msg_id)  # noqa: E731
                   for r in store.get_message("m1").recipients}
    assert ids() == {"u0": ("sent", "s0", "c0"), "u1": ("queued", None, None), "u2": ("sent", "s2", "c2")}
    assert store.settle_batched("m1", ["u2"]) == 1  # a callback gives u2 a row of its own, with its ids
    assert store._read("SELECT status, server_msg_id, client_msg_id FROM recipients WHERE target = 'u2'") == [
        ("sent", "s2", "c2")]
    assert ids()["u2"] == ("sent", "s2", "c2")


def test_pending_fan_out_sends_are_dropped_once_no_rate_limit_window_reaches_them(tmp_path):
    from openim_bizplugin.store.sqlite import PENDING_SENDS_KEPT_MS

    store = SqliteStore(tmp_path / "x.db")
    _sent_fan_out(store)
    store.lease(1_000_020 + PENDING_SENDS_KEPT_MS - 1, 10, 10_000, "w", lambda mid: "op")
    assert len(store._read("SELECT * FROM batch_sends_pending")) == 1
    store.lease(1_000_020 + PENDING_SENDS_KEPT_MS + 1_000, 10, 10_000, "w", lambda mid: "op")  # the sweep
    assert store._read("SELECT * FROM batch_sends_pending") == []


def test_a_batch_whose_users_left_it_is_leased_with_those_still_in_it(tmp_path):
    store = SqliteStore(tmp_path / "x.db", batch_size=3)
    store.accept(_fan_out(1, 6), None, retention_ms=0)
    store.accept(_fan_out(2, 3), None, retention_ms=0)
    [batch] = store.lease(1_000_010, 3, 10_000, "w", lambda mid: "op")
    # u1 is refused by OpenIM and retried on its own; the rest of the batch was sent
    store.complete([(batch.member(1, "u1"), Outcome.retry("refused", 1_000_020)),
                    (batch, sent_batch({"u0": ("s0", "c0", 1), "u2": ("s2", "c2", 1)}, 1_000_011))],
                   1_000_011)
    with store._write() as db:  # as a batch accepted before its users were listed (schema 7)
        db.execute("DELETE FROM batch_targets WHERE batch_id IN (SELECT id FROM batches WHERE message_id = ?)",
                   (_fan_out(2, 3).id,))
    with store._write() as db:  # two users of the second batch of message 1 left it: acknowledged early
        db.execute("UPDATE recipients SET status = 'sent' WHERE message_id = ? AND seq IN (3, 5)",
                   (_fan_out(1, 6).id,))
    leased = store.lease(1_000_030, 10, 10_000, "w", lambda mid: "op2")
    first, second = _fan_out(1, 6).id, _fan_out(2, 3).id
    assert {(i.message_id, i.target, tuple(i.members or ())) for i in leased} == {
        (first, "u1", ()), (first, "u4", ((4, "u4"),)), (second, "u0", ((0, "u0"), (1, "u1"), (2, "u2")))}


def test_a_file_of_the_previous_schema_gets_the_new_tables(tmp_path):
    path = tmp_path / "old.db"
    version_1 = _SCHEMA.split("CREATE TABLE IF NOT EXISTS batches")[0]  # no batches, no messages.started_ms
    version_1 = version_1.replace(",\n    started_ms      INTEGER", "").replace(" WHERE started_ms IS NOT NULL", "")
    version_1 = version_1.replace("messages_started ON", "messages_alive ON")  # as a version-3 file had it
    assert "started_ms" not in version_1
    with sqlite3.connect(path) as db:
        db.executescript(version_1 + "PRAGMA user_version = 1;")
        db.execute("INSERT INTO messages (id, client, type, version, mode, priority, offline, request_hash,"
                   " envelope, delivery, recipient_count, created_ms, expires_ms) SELECT 'old', client, type,"
                   " version, mode, priority, offline, request_hash, envelope, delivery, 0, created_ms, expires_ms"
                   " FROM (SELECT 'c' AS client, ? AS type, 1 AS version, 'custom' AS mode, 'normal' AS priority,"
                   " 'store' AS offline, 'h' AS request_hash, '{}' AS envelope, '{}' AS delivery,"
                   " 1000000 AS created_ms, 9000000 AS expires_ms)", (_fan_out(1, 3).type,))
    store = SqliteStore(path)
    assert store.messages_started(_fan_out(1, 3).type, 0, 10) == 1  # it may have been sent before the upgrade
    # by a process of before the upgrade, until it expires: this one's approvals do not know those sends
    assert store.leased_elsewhere(_fan_out(1, 3).type, "w", 8_999_999)
    assert not store.leased_elsewhere(_fan_out(1, 3).type, "w", 9_000_000)
    store.accept(_fan_out(1, 3), None, retention_ms=0)
    assert [i.size for i in store.lease(1_000_010, 10, 1_000, "w", lambda mid: "op")] == [3]
    assert store.messages_started(_fan_out(1, 3).type, 0, 10) == 2
    with store._db.borrow() as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 8
        indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "messages_started" in indexes and "messages_alive" not in indexes


def test_a_semicolon_in_a_schema_comment_does_not_end_the_statement(tmp_path):
    from openim_bizplugin.store.sqlite_file import SqliteFile

    schema = "-- one table; then an index\nCREATE TABLE t (a TEXT); CREATE INDEX t_a ON t (a);\n"
    file = SqliteFile(str(tmp_path / "t.db"), synchronous="FULL")
    file.migrate(schema, 1)
    with file.borrow() as db:
        assert db.execute("SELECT name FROM sqlite_master ORDER BY name").fetchall() == [("t",), ("t_a",)]
    file.close()


def test_a_receipt_finds_its_recipient_by_index_not_by_reading_the_whole_message(tmp_path):
    store = SqliteStore(tmp_path / "x.db")
    with store._db.borrow() as db:
        plan = db.execute(f"EXPLAIN QUERY PLAN {RECEIPT_RECIPIENT_SQL}", ("m1", "u1")).fetchall()
    assert any("recipients_target (message_id=? AND target=?)" in row[-1] for row in plan), plan


def test_a_closed_store_keeps_no_file_open(tmp_path):
    def open_here() -> list[str]:
        paths = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                paths.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:  # closed meanwhile
                pass
        return [path for path in paths if path.startswith(str(tmp_path))]

    store = SqliteStore(tmp_path / "s.db")
    store.accept(_new(1), None, retention_ms=1)
    assert any(path.endswith("s.db-writers") for path in open_here())
    store.close()
    assert open_here() == []


def test_forgetting_a_subscriber_deletes_its_backlog_in_short_writes(tmp_path, monkeypatch):
    monkeypatch.setattr("openim_bizplugin.store.sqlite_tracking.FORGET_BATCH", 3)
    store = SqliteStore(tmp_path / "x.db", event_types=frozenset({"user.online"}), events_kept=0)
    store.subscriber_cursor("gone")
    for n in range(10):
        store.update_presence(f"u{n}", 1, True, 1, 1_000)
    writes = []
    write = store._write
    store._write = lambda *a, **k: (writes.append(1), write(*a, **k))[1]
    assert store.forget_subscriber("gone")
    assert store.events_after(0, 100) == []
    assert len(writes) == 1 + 4  # the cursor, then 3 + 3 + 3 + 1 events


def test_a_message_to_more_users_than_one_insert_holds_stores_each_in_order(tmp_path):
    store = SqliteStore(tmp_path / "x.db")
    users = tuple(f"u{n}" for n in range(250))  # three INSERT statements of up to 100 rows
    assert store.accept(_new(targets=users), None, retention_ms=1).recipients == 250
    with store._db.borrow() as db:
        rows = db.execute("SELECT seq, target, status FROM recipients WHERE message_id = 'm0' ORDER BY seq").fetchall()
    assert rows == [(n, f"u{n}", "queued") for n in range(250)]
