"""``BizClient`` retries against a real ``serve`` that answers late and restarts mid-send.

The test holds SQLite's write lock, so ``serve`` cannot store the first try
before the client's timeout; then it lets go (``serve`` stores that try and
answers nobody), restarts ``serve`` on the same port, and the client's tries
meet first a closed port, then the new process. The message is stored once:
every try carries the idempotency key the client generated.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

from e2e_support import CRM_SECRET, config_tables, count_rows, running_server, stop, write_tables
from openim_bizplugin.client import BizClient
from redis_server import free_port

WAIT_LIMIT = 15.0


def wait_for_rows(db_path: Path, count: int) -> None:
    """Until the messages table holds *count* rows (bounded; the caller asserts what it needs)."""
    deadline = time.monotonic() + WAIT_LIMIT
    while count_rows(db_path, "messages") < count and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_send_through_a_late_answer_and_a_restart_is_stored_once(tmp_path: Path) -> None:
    db_path = tmp_path / "bizplugin.db"
    tables = config_tables(db_path)
    tables["server"]["port"] = free_port()  # the restarted serve must answer at the same address
    config = write_tables(tmp_path / "config.toml", tables)
    waits: list[float] = []
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(running_server(config))]
        lock = sqlite3.connect(db_path, isolation_level=None, timeout=10)
        stack.callback(lock.close)
        lock.execute("BEGIN IMMEDIATE")  # serve's writes wait for this, past the client's timeout

        def between_tries(seconds: float) -> None:
            waits.append(seconds)
            if len(waits) == 1:  # try 1 timed out while serve waited for the lock
                lock.execute("ROLLBACK")
                wait_for_rows(db_path, 1)  # serve stored try 1 after all, and answered nobody
                stop(servers[-1].process)  # a deploy restarts it
            else:  # try 2 found nobody listening
                servers.append(stack.enter_context(running_server(config)))

        client = BizClient(servers[0].url, "crm", CRM_SECRET, timeout=1.0, max_tries=3, sleep=between_tries)
        answer = client.send("profile.updated", 1, {"fields": ["nickname"]}, users=["u1"])
        assert len(waits) == 2 and len(servers) == 2
        assert count_rows(db_path, "messages") == 1
        assert client.status(answer["id"])["recipients"][0]["user_id"] == "u1"  # the stored one's id
