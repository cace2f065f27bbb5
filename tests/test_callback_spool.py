"""Callback answers never wait on our storage (SPEC §6, issue 16 point 3).

OpenIM posts after-callbacks from a queue of 100 with 2 workers per process,
and a full queue blocks OpenIM's own message sending for up to 3 s
(``FakeOpenIM.after_hooks`` models it). So while the store is locked, slow or
down, callbacks are answered at once from this process's spool file, which is
drained into the inbox later and, after a crash, replayed by the next process.

"At once" is asserted by order, not by the clock: every answer is back while
another connection or process still holds the store's write lock (or Redis
is stopped), and nothing of them is in the inbox yet; afterwards each is
stored and applied exactly once. The crash tests use real processes and
SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from conftest import write_config
from e2e_support import CALLBACK_TOKEN, child_env, config_tables, kill9, running_server, write_tables
from openim_bizplugin.callbacks.spool import CallbackSpool, SpoolFull, decode, encode
from openim_bizplugin.config import load_config
from openim_bizplugin.store.sqlite import SqliteStore, inbox_path
from openim_bizplugin.testing import FakeOpenIM
from openim_bizplugin.web.app import create_app
from openim_bizplugin.web.callbacks import CONTINUE
from test_hardening import served

ONLINE = "callbackAfterUserOnlineCommand"
WAIT_SECONDS = 20.0


def wait_until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {WAIT_SECONDS:.0f} s")
        time.sleep(0.02)


@contextmanager
def write_locked(*paths: Path) -> Iterator[list[sqlite3.Connection]]:
    """Another writer holding each SQLite file's write lock (BEGIN IMMEDIATE) until the block ends."""
    lockers = []
    try:
        for path in paths:
            locker = sqlite3.connect(path, timeout=5, isolation_level=None)
            locker.execute("BEGIN IMMEDIATE")
            lockers.append(locker)
        yield lockers
    finally:
        for locker in lockers:
            if locker.in_transaction:
                locker.execute("ROLLBACK")
            locker.close()


def inbox(db: Path) -> list[tuple]:
    """(command, natural_key, done, error) of every callback in the inbox beside *db*."""
    with sqlite3.connect(inbox_path(str(db)), timeout=10) as conn:
        return conn.execute("SELECT command, natural_key, done, error FROM callbacks ORDER BY id").fetchall()


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.spool")) if directory.exists() else []


def presence_of(fake: FakeOpenIM, users: list[str]) -> list[dict]:
    return [fake.user_online(user, 1, seq=1_000 + n) for n, user in enumerate(users)]


def fire(hooks: Any, payloads: list[dict], per_second: float = 200.0) -> None:
    """OpenIM firing after-hooks as its users' traffic comes: *per_second* through one OpenIM process.

    A sidecar that answers within a few milliseconds keeps OpenIM's queue short;
    one whose answers wait on storage fills its 100 slots within a second, and
    from then on every push blocks the OpenIM code that fires the hook.
    """
    for payload in payloads:
        hooks.push(payload["callbackCommand"], payload)
        time.sleep(1 / per_second)  # the traffic model, not a timing of the code under test


# -- the spool file -------------------------------------------------------------------------------


def test_records_round_trip_and_a_damaged_or_unfinished_one_is_not_read(caplog):
    first, second = ("cmd", "k1", '{"a":"line\\nbreak ü"}', 1), ("cmd", "k2", "{}", 2)
    damaged = bytearray(encode(("cmd", "kx", "{}", 3)))
    damaged[-3] ^= 1  # a flipped bit
    chunk = encode(first) + bytes(damaged) + encode(second) + encode(("cmd", "k3", "{}", 4))[:-5]
    records, used = decode(chunk, limit=10)
    assert records == [first, second]
    assert used == len(chunk) - len(encode(("cmd", "k3", "{}", 4))[:-5])  # the unfinished tail waits
    assert "unreadable record was skipped" in caplog.text
    assert decode(chunk, limit=1) == ([first], len(encode(first)))


@pytest.fixture
def sqlite_store(tmp_path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "biz.db")
    yield store
    store.close()


def test_a_locked_inbox_sends_callbacks_to_the_spool_at_once_and_they_are_stored_once(tmp_path, sqlite_store):
    spool = CallbackSpool(tmp_path / "spool", sqlite_store, max_bytes=1 << 20)
    try:
        with write_locked(Path(sqlite_store._inbox.path)) as [locker]:
            kept = [spool.keep(ONLINE, key, "{}", 1) for key in ("k1", "k2", "k1")]
            assert locker.in_transaction  # answered while another writer still held the inbox
        assert kept == ["spooled"] * 3
        spool.drain()  # after the loop's own round, if it was in one: everything is in the inbox
        assert [(command, key, done) for command, key, done, _ in inbox(tmp_path / "biz.db")] == [
            (ONLINE, "k1", 0), (ONLINE, "k2", 0)]
        assert spool.pending_bytes() == 0 and [p.stat().st_size for p in spool_files(tmp_path / "spool")] == [0]
        assert spool.keep(ONLINE, "k3", "{}", 2) == "stored"  # a free inbox takes it directly
    finally:
        spool.close()
    assert spool_files(tmp_path / "spool") == []  # a drained spool leaves nothing behind


def test_a_spool_is_bounded_by_segments_deleted_once_drained(tmp_path, sqlite_store):
    spool = CallbackSpool(tmp_path / "spool", sqlite_store, max_bytes=64 * 1024)  # segments of 16 KiB
    body = json.dumps({"pad": "x" * 1000})
    try:
        with write_locked(Path(sqlite_store._inbox.path)):
            kept = 0
            with pytest.raises(SpoolFull):
                while True:
                    spool.append((ONLINE, f"k{kept}", body, 1))
                    kept += 1
            files = spool_files(tmp_path / "spool")
            assert len(files) == 4 and sum(p.stat().st_size for p in files) <= 64 * 1024
        spool.drain()
        assert len(inbox(tmp_path / "biz.db")) == kept
        assert [p.stat().st_size for p in spool_files(tmp_path / "spool")] == [0]  # only the current one, empty
        spool.append((ONLINE, "again", body, 2))  # room again
    finally:
        spool.close()


CHILD = textwrap.dedent("""\
    import sys
    from openim_bizplugin.callbacks.spool import CallbackSpool
    from openim_bizplugin.store.sqlite import SqliteStore
    store = SqliteStore(sys.argv[1])
    spool = CallbackSpool(sys.argv[2], store, max_bytes=1 << 20)
    print("ready", flush=True)
    sys.stdin.readline()  # the test now holds the inbox's write lock
    print(" ".join(spool.keep("callbackAfterUserOnlineCommand", f"k{n}", "{}", n) for n in range(5)), flush=True)
    sys.stdin.readline()  # killed here
    """)


def test_the_spool_of_a_killed_process_is_replayed_by_another_and_deleted(tmp_path, sqlite_store):
    db, directory = tmp_path / "biz.db", tmp_path / "spool"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(db), str(directory)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=child_env())
    spool = CallbackSpool(directory, sqlite_store, max_bytes=1 << 20)
    try:
        assert child.stdout.readline() == "ready\n"
        with write_locked(Path(sqlite_store._inbox.path)):
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline().split() == ["spooled"] * 5
            assert spool.adopt() == 0  # its process is alive (and holds the file's lock)
            child.kill()  # SIGKILL right after answering, the inbox still locked
            child.wait(10)
        [orphan] = spool_files(directory)
        with orphan.open("ab") as torn:  # a write cut short by the kill: never answered
            torn.write(encode((ONLINE, "k-torn", "{}", 9))[:-7])
        assert spool.adopt() == 5
        assert [key for _, key, _, _ in inbox(db)] == [f"k{n}" for n in range(5)]
        assert spool_files(directory) == [] and spool.adopt() == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        spool.close()


def test_a_forked_process_spools_to_a_file_of_its_own(tmp_path, sqlite_store):
    spool = CallbackSpool(tmp_path / "spool", sqlite_store, max_bytes=1 << 20)
    try:
        with write_locked(Path(sqlite_store._inbox.path)):
            spool.append((ONLINE, "parent", "{}", 1))
            pid = os.fork()  # as gunicorn forks its workers from an app built before
            if pid == 0:
                try:
                    spool.append((ONLINE, "child", "{}", 2))
                finally:
                    os._exit(0)
            assert os.waitpid(pid, 0)[1] == 0
            names = [p.name for p in spool_files(tmp_path / "spool")]
            assert len(names) == 2 and sum(f"-{pid}-" in name for name in names) == 1
        spool.drain()  # its own, and (the first round of a process) the files of processes that ended
        assert sorted(key for _, key, _, _ in inbox(tmp_path / "biz.db")) == ["child", "parent"]
        assert [f"-{pid}-" in p.name for p in spool_files(tmp_path / "spool")] == [False]
    finally:
        spool.close()


# -- through HTTP, with OpenIM's after-hook queue -----------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeOpenIM]:
    with FakeOpenIM() as im:
        yield im


def test_openim_is_not_slowed_while_another_writer_holds_the_store(app, store, fake):
    services = app.extensions["bizplugin"]
    users = [f"u{n:03d}" for n in range(150)]  # more than OpenIM's 100 slots and 2 workers hold
    with served(app) as port, write_locked(Path(store.path), Path(store._inbox.path)) as lockers:
        hooks = fake.after_hooks(f"http://127.0.0.1:{port}/openim/callback/test-callback-token-0001")
        fire(hooks, presence_of(fake, users))  # users connecting: OpenIM's gateway fires the hook
        assert hooks.join()
        # OpenIM never waited for a slot: no answer waited on the locked store
        assert (hooks.blocked, hooks.dropped) == (0, 0)
        assert [(r.status, r.reply) for r in hooks.results] == [(200, CONTINUE)] * 150
        assert all(locker.in_transaction for locker in lockers) and inbox(Path(store.path)) == []
    services.spool.drain()
    while services.callbacks.step():
        pass
    stored = inbox(Path(store.path))
    assert len(stored) == 150 and all(done == 1 and error is None for *_, done, error in stored)
    assert sorted(services.store.presence(users)) == users


def test_a_full_spool_answers_and_drops_and_says_so(tmp_path, clock, fake, caplog):
    app = create_app(load_config(write_config(tmp_path, {
        "callbacks": {"token": "test-callback-token-0001", "spool_max_bytes": 65536}})), clock=clock)
    client = app.test_client()
    services = app.extensions["bizplugin"]
    store = services.store
    bodies = [dict(payload, pad="x" * 2000) for payload in presence_of(fake, [f"u{n}" for n in range(60)])]
    with write_locked(Path(store._inbox.path)):
        answers = [client.post(f"/openim/callback/test-callback-token-0001/{ONLINE}", json=body) for body in bodies]
    assert all(a.status_code == 200 and a.get_json() == CONTINUE for a in answers)
    text = client.get("/metrics").get_data(as_text=True)
    spooled, full = counted(text, "spooled"), counted(text, "spool-full")
    assert spooled + full == 60 and 0 < spooled < 60  # 64 KiB hold some 2 KiB callbacks, not all
    assert "is full" in caplog.text
    services.spool.drain()
    assert len(inbox(Path(store.path))) == spooled  # what was answered "spooled" is kept, the rest dropped
    services.close()


def counted(text: str, result: str) -> int:
    line = f'bizplugin_callbacks_received_total{{command="{ONLINE}",result="{result}"}} '
    return int(float(next((row[len(line):] for row in text.splitlines() if row.startswith(line)), "0")))


# -- Redis: a Redis call cannot tell beforehand that it will wait ------------------------------------


def test_callbacks_are_answered_while_redis_is_stopped_and_applied_when_it_is_back(tmp_path, clock, fake):
    from redis_server import RedisServer

    server = RedisServer(tmp_path).start()
    app = create_app(load_config(write_config(tmp_path, {
        "storage": {"url": server.url}, "callbacks": {"token": "test-callback-token-0001",
                                                       "spool_dir": str(tmp_path / "spool")}})), clock=clock)
    services = app.extensions["bizplugin"]
    users = [f"r{n:03d}" for n in range(120)]
    try:
        with served(app) as port:
            hooks = fake.after_hooks(f"http://127.0.0.1:{port}/openim/callback/test-callback-token-0001")
            os.kill(server.process.pid, signal.SIGSTOP)  # Redis hangs: every call waits for its socket timeout
            try:
                fire(hooks, presence_of(fake, users))
                assert hooks.join()
                assert (hooks.blocked, hooks.dropped) == (0, 0)
                assert [(r.status, r.reply) for r in hooks.results] == [(200, CONTINUE)] * 120
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
        services.spool.drain()
        while services.callbacks.step():
            pass
        assert sorted(services.store.presence(users)) == users
        assert services.store.pending_callbacks(10) == []
    finally:
        services.close()
        server.stop()


# -- a real sidecar killed with SIGKILL ----------------------------------------------------------------


def test_a_sidecar_killed_right_after_answering_loses_no_callback(tmp_path, fake):
    db = tmp_path / "bizplugin.db"
    tables = config_tables(db)
    tables["openim"]["api_url"] = fake.url
    config = write_tables(tmp_path / "config.toml", tables)  # delivery.workers = 0: nothing is applied
    users = [f"k{n:03d}" for n in range(40)]
    with running_server(config) as sidecar:
        url = f"{sidecar.url}/openim/callback/{CALLBACK_TOKEN}"
        with write_locked(db, Path(inbox_path(str(db)))):
            answers = [fake.post_callback(url, ONLINE, payload) for payload in presence_of(fake, users)]
            kill9(sidecar.process)  # SIGKILL to every process of serve right after the last answer,
            # the store still locked
    assert answers == [(200, CONTINUE)] * 40
    assert inbox(db) == []  # none was in the store when the process died
    tables["delivery"] = {"workers": 1}  # the next start replays the dead process's spool and applies it
    write_tables(config, tables)
    with running_server(config) as sidecar:
        wait_until(lambda: len(inbox(db)) == 40 and all(done for _, _, done, _ in inbox(db)),
                   "the spooled callbacks applied after the restart")
        metrics = requests.get(f"{sidecar.url}/metrics", timeout=10).text
    assert sorted(key for _, key, _, _ in inbox(db)) == sorted(
        json.dumps([u, 1, 1_000 + n, "online"], separators=(",", ":")) for n, u in enumerate(users))
    applied = f'bizplugin_callbacks_processed_total{{command="{ONLINE}",result="applied"}} 40.0'
    assert applied in metrics  # each applied once
    assert spool_files(tmp_path / "bizplugin-spool") == []
