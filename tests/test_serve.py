"""``serve`` in production (issue 17): one service of several processes, hard to starve, strict.

Every test runs the real ``openim-bizplugin serve`` as a child process and
talks to it over loopback, with raw sockets where the wire matters. Timings
are bounds a broken server would miss by far (it would hang), never targets.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from e2e_support import (CALLBACK_TOKEN, RunningServer, config_tables, count_rows, running_server, signed_post,
                         wait_for, write_tables)
from openim_bizplugin.signing import signature_headers
from openim_bizplugin.testing import FakeOpenIM

MiB = 1024 * 1024


def body(n: int | str = 0) -> bytes:
    return json.dumps({"type": "profile.updated", "version": 1, "to": {"users": [f"u{n}"]},
                       "data": {"fields": ["nickname"]}}).encode()


def write(tmp_path: Path, *, server: dict[str, Any] | None = None, **tables: dict[str, Any]) -> Path:
    config = config_tables(tmp_path / "bizplugin.db", max_body_bytes=2 * MiB)
    config["server"].update({"workers": 2, **(server or {})})
    for name, keys in tables.items():
        config.setdefault(name, {}).update(keys)
    return write_tables(tmp_path / "config.toml", config)


def port_of(running: RunningServer) -> int:
    return int(running.url.rsplit(":", 1)[1])


def children(pid: int) -> list[int]:
    """The processes whose parent is *pid*."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def tree_rss_mb(pid: int) -> float:
    """Resident memory of *pid* and its children, in MiB."""
    total = 0
    for each in [pid, *children(pid)]:
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{each}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    return total / 1024


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send *data* on a fresh connection, return all that comes back until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(data)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(65536):
                answer += chunk
    return answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# -- processes ------------------------------------------------------------------------------------


def test_serve_runs_its_workers_and_restarts_a_background_process_that_dies(tmp_path):
    with FakeOpenIM(users=["imAdmin", "u1", "u2"], online=["u1", "u2"]) as fake:
        config = write(tmp_path, openim={"api_url": fake.url}, delivery={"workers": 2})
        with running_server(config) as running:
            kids = wait_for("two HTTP processes and a background one",
                            lambda: len(children(running.process.pid)) == 3 and children(running.process.pid))
            assert signed_post(running.url, body(1)).status_code == 202
            wait_for("u1's delivery", lambda: fake.deliveries_to(user="u1"))
            background = [pid for pid in kids if pid in started(running, "background")]
            assert len(background) == 1 and len(started(running, "http")) == 2
            os.kill(background[0], signal.SIGKILL)
            wait_for("a new background process",
                     lambda: len(set(children(running.process.pid)) - set(kids)) == 1)
            assert signed_post(running.url, body(2)).status_code == 202
            wait_for("u2's delivery by the new background process", lambda: fake.deliveries_to(user="u2"))


def started(running: RunningServer, role: str) -> set[int]:
    """The pids of the *role* processes the supervisor says it started."""
    lines = [json.loads(line) for line in running.stderr().splitlines() if line.startswith("{")]
    return {e["pid"] for e in lines if e.get("event") == "serve.child_started" and e["role"] == role}


def test_metrics_show_the_service_totals_whichever_process_answers(tmp_path):
    users = [f"u{n}" for n in range(6)]
    with FakeOpenIM(users=["imAdmin", *users], online=users) as fake:
        config = write(tmp_path, openim={"api_url": fake.url}, delivery={"workers": 1})
        with running_server(config) as running:
            for n in range(6):
                assert signed_post(running.url, body(n)).status_code == 202
            wait_for("six deliveries", lambda: len(fake.delivered) == 6)

            def totals() -> tuple[float, float]:
                text = requests.get(running.url + "/metrics", timeout=10).text  # a new connection each
                accepted = sum(float(v) for v in re.findall(r'^bizplugin_messages_accepted_total\{[^}]*\} (\S+)',
                                                            text, re.M))
                sent = sum(float(v) for v in re.findall(r'^bizplugin_recipients_sent_total\{[^}]*\} (\S+)', text,
                                                        re.M))
                return accepted, sent

            wait_for("the background process's deliveries in /metrics", lambda: totals() == (6, 6))
            assert {totals() for _ in range(20)} == {(6.0, 6.0)}


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_clients_rate_limit_holds_across_processes_and_replicas(tmp_path, replicas):
    db = tmp_path / "shared.db"
    configs = []
    for n in range(replicas):
        folder = tmp_path / f"r{n}"
        folder.mkdir()
        config = config_tables(db)
        config["server"]["workers"] = 2
        config["clients.crm"]["rate_limit"] = "6/minute"
        configs.append(write_tables(folder / "config.toml", config))
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(running_server(c)) for c in configs]
        statuses = [signed_post(servers[n % replicas].url, body(n)).status_code for n in range(24)]
    assert statuses.count(202) == 6 and statuses.count(429) == 18, statuses


# -- slow and half-sent connections -----------------------------------------------------------------


def test_slow_headers_do_not_starve_anyone_and_are_cut_off(tmp_path):
    config = write(tmp_path, server={"header_timeout_seconds": 3, "max_connections": 1000})
    with running_server(config) as running:
        port = port_of(running)
        slow = []
        for _ in range(1100):
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            conn.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nX-Biz-Client: crm\r\n")  # never finished
            slow.append(conn)
        try:
            assert requests.get(running.url + "/healthz", timeout=5).status_code == 200
            assert signed_post(running.url, body(), timeout=5).status_code == 202
            for conn in slow[:50]:  # past the header deadline the server hangs up
                assert conn.recv(1) == b""
        finally:
            for conn in slow:
                conn.close()


def _half_sent(port: int, head: bytes, sent: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    with contextlib.suppress(OSError):  # a refusal may close the connection mid-send
        conn.sendall(head + b"x" * sent)
    return conn


def test_half_sent_bodies_cost_bounded_memory_and_unsigned_ones_are_refused_before_the_body(tmp_path):
    config = write(tmp_path, server={"threads": 4})
    with running_server(config) as running:
        port, pid = port_of(running), running.process.pid
        wait_for("two HTTP processes", lambda: len(children(pid)) == 2)
        before = tree_rss_mb(pid)
        unsigned = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" \
                   b"Content-Length: %d\r\n\r\n" % (2 * MiB)
        refused = [_half_sent(port, unsigned, 0) for _ in range(400)]
        for conn in refused:  # answered at once: no body byte was needed
            assert status_of(conn.recv(65536)) == 401
            conn.close()
        token = signature_headers("crm", "not-the-secret-0123456789", "POST", "/v1/messages", b"x")
        signed_looking = (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"X-Biz-Client: crm\r\nX-Biz-Signature: %s\r\nContent-Length: %d\r\n\r\n"
                          % (token["X-Biz-Signature"].encode(), 2 * MiB))
        held = [_half_sent(port, signed_looking, MiB) for _ in range(200)]  # 200 MiB on their way
        try:
            time.sleep(1)
            assert tree_rss_mb(pid) - before < 120, (before, tree_rss_mb(pid))
            assert requests.get(running.url + "/healthz", timeout=5).status_code == 200
            assert signed_post(running.url, body(), timeout=5).status_code == 202
        finally:
            for conn in held:
                conn.close()


def test_sigterm_answers_requests_in_flight_and_exits_with_idle_clients_connected(tmp_path):
    config = write(tmp_path, server={"shutdown_seconds": 10}, storage={"lock_wait_seconds": 5})
    with running_server(config) as running:
        port = port_of(running)
        idle = socket.create_connection(("127.0.0.1", port), timeout=10)  # connected, says nothing
        half = _half_sent(port, b"POST /openim/callback/%s/callbackAfterUserOnlineCommand HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Length: 100\r\n\r\n" % CALLBACK_TOKEN.encode(), 10)
        answers: list[requests.Response] = []
        locker = sqlite3.connect(running.db_path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")  # the request below waits for the write lock: in flight
        sender = threading.Thread(target=lambda: answers.append(signed_post(running.url, body(), timeout=20)))
        sender.start()
        time.sleep(1)
        running.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        locker.execute("COMMIT")
        locker.close()
        sender.join(20)
        running.process.wait(timeout=15)  # not held up by the idle or the half-sent connection
        assert [a.status_code for a in answers] == [202]
        assert idle.recv(1) == b"" and half.recv(1) == b""
        idle.close()
        half.close()
    assert count_rows(running.db_path, "messages") == 1


# -- strict HTTP --------------------------------------------------------------------------------


CALLBACK_HEAD = b"POST /openim/callback/%s/callbackAfterUserOnlineCommand HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize("request_bytes", [  # each would be a 200 "continue" if read leniently
    pytest.param(CALLBACK_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz-evil-framing\r\n{}\r\n0\r\n\r\n",
                 id="bad-chunk-size"),
    pytest.param(CALLBACK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}evil-framing\r\n0\r\n\r\n",
                 id="chunk-not-terminated"),
    pytest.param(CALLBACK_HEAD + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}", id="two-content-lengths"),
    pytest.param(CALLBACK_HEAD + b"X-Evil: a\rb\r\nContent-Length: 2\r\n\r\n{}", id="bare-cr"),
    pytest.param(CALLBACK_HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
                 id="unknown-transfer-coding"),
    pytest.param(CALLBACK_HEAD + b"Transfer-Encoding: evil-coding\r\n\r\n{}", id="unknown-transfer-coding-alone"),
])
def test_malformed_framing_is_a_4xx_problem_and_never_a_traceback(tmp_path, request_bytes):
    with running_server(write(tmp_path)) as running:
        answer = raw_exchange(port_of(running), request_bytes.replace(b"%s", CALLBACK_TOKEN.encode()))
        assert 400 <= status_of(answer) < 500, answer[:300]
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert b"application/problem+json" in head
        assert json.loads(payload)["status"] == status_of(answer)
        assert signed_post(running.url, body()).status_code == 202  # and it keeps serving
    assert "Traceback" not in running.stderr() and "evil" not in running.stderr()


# -- honest under pressure --------------------------------------------------------------------------


def test_a_locked_database_answers_503_with_retry_after_in_time_and_stores_nothing(tmp_path):
    config = write(tmp_path, storage={"lock_wait_seconds": 1})
    with running_server(config) as running:
        locker = sqlite3.connect(running.db_path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        answers: list[requests.Response] = []
        senders = [threading.Thread(target=lambda n=n: answers.append(signed_post(running.url, body(n), timeout=8)))
                   for n in range(6)]
        try:
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join(15)
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert [a.status_code for a in answers] == [503] * 6  # none timed out (8 s) waiting
        assert all(int(a.headers["Retry-After"]) >= 1 for a in answers)
        assert count_rows(running.db_path, "messages") == 0
        assert signed_post(running.url, body("after")).status_code == 202


def test_readyz_is_not_ready_while_the_database_refuses_writes(tmp_path):
    with FakeOpenIM(users=["imAdmin"]) as fake, running_server(write(tmp_path, openim={"api_url": fake.url})) as running:
        assert requests.get(running.url + "/readyz", timeout=10).status_code == 200
        db = sqlite3.connect(running.db_path)  # every write fails as on a full disk (SELECT 1 still answers)
        db.execute("CREATE TRIGGER full BEFORE INSERT ON shared BEGIN SELECT RAISE(ABORT, 'database or disk is full');"
                   " END")
        db.execute("CREATE TRIGGER full2 BEFORE UPDATE ON shared BEGIN SELECT RAISE(ABORT, 'database or disk is full');"
                   " END")
        db.commit()
        ready = requests.get(running.url + "/readyz", timeout=10)
        assert ready.status_code == 503 and "disk is full" in ready.json()["checks"]["storage"]
        db.execute("DROP TRIGGER full")
        db.execute("DROP TRIGGER full2")
        db.commit()
        db.close()
        assert requests.get(running.url + "/readyz", timeout=10).status_code == 200


def test_redis_store_is_not_writable_when_redis_refuses_writes(tmp_path):
    from redis_server import RedisServer

    from openim_bizplugin.errors import StorageUnavailable
    from openim_bizplugin.store.redis import RedisStore

    server = RedisServer(tmp_path).start()
    try:
        store = RedisStore(server.url)
        store.check_writable()
        store._redis.config_set("maxmemory-policy", "noeviction")
        store._redis.config_set("maxmemory", "1")  # out of memory: Redis refuses every write
        with pytest.raises(StorageUnavailable):
            store.check_writable()
        store._redis.config_set("maxmemory", "0")
        store.check_writable()
        store.close()
    finally:
        server.stop()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_the_rate_limit_is_counted_in_the_store_for_everyone_sharing_it(tmp_path, backend):
    from redis_server import RedisServer

    from openim_bizplugin.store.redis import RedisStore
    from openim_bizplugin.store.sqlite import SqliteStore

    server = RedisServer(tmp_path).start() if backend == "redis" else None
    try:
        def open_one() -> Any:
            return RedisStore(server.url) if server else SqliteStore(tmp_path / "shared.db")

        one, two = open_one(), open_one()  # two processes, or two replicas
        now = int(time.time() * 1000)
        taken = [(one if n % 2 else two).take_rate("client:crm", 5, 60_000, now + n) for n in range(12)]
        assert taken[:5] == [0] * 5 and all(0 < wait <= 120_000 for wait in taken[5:]), taken
        assert one.take_rate("client:ops", 5, 60_000, now) == 0  # each key has its own count
        one.close()
        two.close()
    finally:
        if server:
            server.stop()


def test_sigterm_reaches_the_background_process_which_gives_its_leases_back(tmp_path):
    users = [f"u{n}" for n in range(30)]
    with FakeOpenIM(users=["imAdmin", *users], online=users) as fake:
        config = write(tmp_path, openim={"api_url": fake.url}, delivery={"workers": 1, "lease_seconds": 600})
        fake.delay_next("/msg/send_business_notification", 2, times=100)  # a slow OpenIM: a long round
        with running_server(config) as running:
            raw = json.dumps({"type": "profile.updated", "version": 1, "to": {"users": users},
                              "data": {"fields": ["nickname"]}}).encode()
            assert signed_post(running.url, raw).status_code == 202
            wait_for("the first send in flight", lambda: fake.calls_to("/msg/send_business_notification"))
            running.process.send_signal(signal.SIGTERM)
            running.process.wait(timeout=20)
        db = sqlite3.connect(running.db_path)
        statuses = dict(db.execute("SELECT status, COUNT(*) FROM recipients GROUP BY status").fetchall())
        db.close()
    # leased for 600 s, yet none is left 'sending': the round in flight ended, the rest was given back
    assert "sending" not in statuses and statuses.get("queued", 0) >= 25, statuses


def test_workers_default_to_the_cpu_count(tmp_path):
    from openim_bizplugin.config import load_config

    config = config_tables(tmp_path / "x.db")
    assert load_config(write_tables(tmp_path / "a.toml", config)).server.worker_count == os.cpu_count()
    config["server"]["workers"] = 3
    assert load_config(write_tables(tmp_path / "b.toml", config)).server.worker_count == 3
