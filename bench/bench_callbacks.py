#!/usr/bin/env python3
"""Callback intake: the real sidecar versus a bare Flask endpoint under a burst of OpenIM callbacks.

Requirement (issue 4): callback acknowledgements per second and p50/p99
answer latency under a burst of 10,000 callbacks, side by side with a bare
Flask endpoint that returns the same JSON without storing. Target: p99 under
5 ms and at least half the bare endpoint's rate.

    python bench/bench_callbacks.py [--callbacks 10000] [--concurrency 2,8] [--rounds BABA]

Side A is ``openim-bizplugin serve`` (a subprocess: temp config, SQLite in a
temp folder, ``delivery.workers = 1`` so the callback processor and one
delivery thread run beside the HTTP server, ``api_url`` pointing at a
:class:`openim_bizplugin.testing.FakeOpenIM` in this process). Side B is this
script started again with ``--bare-server``: one Flask route
``POST /openim/callback/<token>/<command>`` that checks the token, reads and
parses the body and answers the same "continue" JSON without storing, on the
same werkzeug ``make_server(..., threaded=True)`` with the same one log line
per request.

Each round is a burst of ``--callbacks`` distinct callbacks shaped exactly as
OpenIM main posts them (built with FakeOpenIM's payload builders): mostly
presence (``callbackAfterUserOnlineCommand`` / ``...OfflineCommand`` for 5,000
users on iOS/Android/Web, each user and platform alternating online/offline,
``seq`` = increasing milliseconds), some ``callbackAfterSendSingleMsgCommand``
(a client app's Custom 110 receipt to the sender account, what
``attentionIds: [imAdmin]`` lets through) and some
``callbackAfterMsgSaveDBCommand`` (half the sidecar's own custom sends, half
users' chat: that hook is never filtered). Every callback is a ``POST`` with
the JSON body plus a trailing newline, ``Content-Type: application/json;
charset=utf-8``, an ``operationID`` header (``Operationid`` on the wire, as Go
writes it), ``User-Agent: Go-http-client/1.1`` and, for the three message
hooks, OpenIM's ``?key=`` query. ``--concurrency`` senders (threads of this
process, one request in flight each, default rows 2 and 8: OpenIM runs 2
webhook workers per process and several processes post) share the burst.
Each sender keeps one connection alive, as OpenIM's Go client does, and both
sides are served by ``serve``'s HTTP engine.

Rounds run in the order of ``--rounds`` (default ``BABA``, interleaved because
a shared machine drifts) for each concurrency. After every A round the
benchmark counts the rows the sidecar stored in its inbox file
(``<db>-callbacks.db``, table ``callbacks``: every burst must add exactly
``--callbacks`` rows; those answered while the inbox was busy reach it from a
spool file moments later, so the count waits for them) and polls ``done = 1``
until the processor has applied them all, so the next round starts on a quiet
sidecar. No message is queued during the run, so the message hooks name
messages the sidecar does not have (their handlers look them up and change
nothing); presence is applied for real.

For finding where the time goes: ``--stages`` wraps the stages of an answer
in wall-clock timers (in the sidecar process, set up by this script) and
prints p50/p99 per stage, writer-lock waits and COMMITs by kind of thread;
``--profile DIR`` profiles every sidecar thread with cProfile;
``--delivery-workers 0`` turns the processor off (intake only);
``--worker-process`` moves it to ``openim-bizplugin worker``;
``--switch-interval`` sets the GIL switch interval of both servers.

``--locked N`` adds a phase after the rounds (or instead of them, with
``--rounds ""``): N callbacks posted by 2 senders (OpenIM's two webhook
workers) while this process holds the write lock of the sidecar's main file
and inbox (``BEGIN IMMEDIATE``, another process as far as the sidecar is
concerned); it prints the answer latency, how many callbacks reached the
inbox while the lock was held, and how long after the release until all were
stored and applied.

This prints figures; it is not a test and exits 0 unless the run itself broke
(a missing row, a wrong answer: exit 1). ``--strict`` also exits 1 when a
target is missed.
"""

from __future__ import annotations

import argparse
import hmac
import json
import math
import os
import random
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (LISTENING, Child, add_common_options, console_script, cpu_seconds, dump_profiles,  # noqa: E402
                     figure, generator_cpu_seconds, machine_lines, memory_kb, merged_counts, own_cpu_seconds,
                     package_source, percentile_ms, post_once, print_profile_top, profile_threads, run_senders,
                     serve_like_the_sidecar, sidecar_cmd_argv, sqlite_files, tear_down, write_sidecar_config,
                     write_summary_with_checks)

TOKEN = "bench-callback-token-0123456789abcdef"
PREFIX = f"/openim/callback/{TOKEN}/"
ADMIN = "imAdmin"
FAKE_SECRET = "openIM123"
TARGET_P99_MS = 5.0
TARGET_RATIO = 0.5
USERS = 5_000
CONTINUE = b'{"actionCode":0,"errCode":0,"errMsg":"","errDlt":"","nextCode":0}'
AFTER_SEND, SAVE_DB = "callbackAfterSendSingleMsgCommand", "callbackAfterMsgSaveDBCommand"
# The burst: (share, what). Presence dominates real traffic (every connect, disconnect and a
# re-assertion per connected user every 10-20 min); after-send reaches us only for messages to
# the sender account (attentionIds); afterMsgSaveDB fires for every stored message.
MIX = ((0.80, "presence"), (0.10, "receipt"), (0.05, "saved-own"), (0.05, "saved-chat"))
PLATFORMS = (1, 1, 2, 2, 2, 5)  # iOS, Android, Web, weighted


def user_id(n: int) -> str:
    return f"u{n:05d}"


# -- side B: the bare endpoint ----------------------------------------------------------------------
def bare_server() -> int:
    """Serve the bare callback endpoint exactly the way ``openim_bizplugin.web.server.serve`` serves the app."""
    from flask import Flask, Response, request

    from openim_bizplugin.web.server import masked_path

    app = Flask("bare")

    @app.post("/openim/callback/<token>/<command>")
    def receive(token: str, command: str) -> Response:
        if not hmac.compare_digest(token.encode(), TOKEN.encode()):
            return Response(b"{}", status=404, mimetype="application/json")
        json.loads(request.get_data())
        return Response(CONTINUE, status=200, mimetype="application/json")

    return serve_like_the_sidecar(app, masked_path)


# -- optional: the sidecar under cProfile (request threads and background loops) ----------------
def profiled_sidecar(config: str, out_dir: str, clock: str) -> int:
    """``openim-bizplugin serve`` with every thread profiled; on SIGTERM the profiles are merged into
    ``requests.prof`` (connection threads), ``processor.prof`` (the callback processor) and
    ``other.prof`` (delivery, ...) in *out_dir*."""
    from openim_bizplugin.cli import run

    profiles = profile_threads(clock)
    code = run(["serve", "-c", config, "--port", "0"], sys.stdout, sys.stderr)
    out = Path(out_dir)
    requests = dump_profiles(profiles, out / "requests.prof", lambda n: "process_request_thread" in n)
    processor = dump_profiles(profiles, out / "processor.prof", lambda n: n.startswith("callbacks-"))
    other = dump_profiles(profiles, out / "other.prof",
                          lambda n: "process_request_thread" not in n and not n.startswith("callbacks-"))
    print(f"profiled threads: {requests} connection, {processor} processor, {other} other", file=sys.stderr)
    return code


# -- optional: the sidecar with timers around the stages of an answer ---------------------------
def timed_sidecar(config: str, out: str) -> int:
    """``openim-bizplugin serve`` with wall-clock timers around each stage of a callback answer; the
    durations (seconds, per stage) are written to *out* as JSON when the server stops (SIGTERM).

    The timers are wrappers set up here, in the benchmark's process, not in the
    package: the accept-to-thread hand-off, the whole connection thread, the
    WSGI call, ``take_callback``, ``record_callback``, the wait for and the hold
    of each SQLite file's writer lock, and every ``COMMIT`` (where WAL
    checkpoints happen) — each split by the kind of thread (a connection, the
    callback processor, a delivery thread).
    """
    import socketserver
    import sqlite3 as sqlite

    from werkzeug.serving import WSGIRequestHandler

    from openim_bizplugin.cli import run
    from openim_bizplugin.store import sqlite_file
    from openim_bizplugin.store.sqlite import SqliteStore
    from openim_bizplugin.web import callbacks as callbacks_module
    from openim_bizplugin.web.server import _RequestHandler

    stages: dict[str, list[float]] = {}
    clock = time.perf_counter

    def note(stage: str, seconds: float) -> None:
        stages.setdefault(stage, []).append(seconds)

    def kind() -> str:
        name = threading.current_thread().name
        if "process_request_thread" in name:
            return "conn"
        if name.startswith("callbacks-"):
            return "processor"
        return "inbox-writer" if name.startswith("callback-inbox") else name.split("-")[0]

    def timed(stage: str, fn):  # type: ignore[no-untyped-def]
        def wrapper(*a, **kw):  # type: ignore[no-untyped-def]
            began = clock()
            try:
                return fn(*a, **kw)
            finally:
                note(stage, clock() - began)
        return wrapper

    handed: dict[int, float] = {}
    process_request, process_request_thread = (socketserver.ThreadingMixIn.process_request,
                                               socketserver.ThreadingMixIn.process_request_thread)

    def process_request_timed(self, request, client_address):  # type: ignore[no-untyped-def]
        handed[id(request)] = clock()
        return process_request(self, request, client_address)

    def process_request_thread_timed(self, request, client_address):  # type: ignore[no-untyped-def]
        began = clock()
        note("1 accept -> connection thread runs", began - handed.pop(id(request), began))
        try:
            return process_request_thread(self, request, client_address)
        finally:
            note("2 connection thread (parse, app, answer, close)", clock() - began)

    socketserver.ThreadingMixIn.process_request = process_request_timed  # type: ignore[method-assign]
    socketserver.ThreadingMixIn.process_request_thread = process_request_thread_timed  # type: ignore[method-assign]
    WSGIRequestHandler.run_wsgi = timed("3 run_wsgi (app + writing the answer)", WSGIRequestHandler.run_wsgi)
    _RequestHandler.log_request = timed("7 access log line", _RequestHandler.log_request)
    callbacks_module.take_callback = timed("4 take_callback (parse, key, store, wake)", callbacks_module.take_callback)
    SqliteStore.record_callback = timed("5 record_callback (inbox transaction, pool)", SqliteStore.record_callback)
    SqliteStore.record_callback_now = timed("5 record_callback_now (inbox insert, request thread)",
                                            SqliteStore.record_callback_now)

    class TimedLock:
        def __init__(self, name: str) -> None:
            self.name, self.lock, self.taken = name, threading.Lock(), 0.0

        def __enter__(self) -> None:
            began = clock()
            self.lock.acquire()
            self.taken = clock()
            note(f"6 {self.name} writer lock wait [{kind()}]", self.taken - began)

        def __exit__(self, *exc: object) -> None:
            self.release()

        def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:  # as execute_now takes it
            began = clock()
            if not self.lock.acquire(blocking, timeout):
                return False
            self.taken = clock()
            note(f"6 {self.name} writer lock wait [{kind()}]", self.taken - began)
            return True

        def release(self) -> None:
            held = clock() - self.taken
            self.lock.release()
            note(f"6 {self.name} writer lock held [{kind()}]", held)

    init = sqlite_file.SqliteFile.__init__

    def init_timed(self, path: str, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        init(self, path, *args, **kwargs)
        self._writer = TimedLock("inbox" if path.endswith("-callbacks.db") else "main")

    class TimedConnection(sqlite_file._Connection):
        file = "?"

        def execute(self, sql, *params):  # type: ignore[no-untyped-def, override]
            if sql != "COMMIT":
                return super().execute(sql, *params)
            began = clock()
            try:
                return super().execute(sql, *params)
            finally:
                note(f"8 {self.file} COMMIT [{kind()}]", clock() - began)

    connect = sqlite.connect

    def connect_timed(path, *a, **kw):  # type: ignore[no-untyped-def]
        kw["factory"] = TimedConnection  # the package's connection class, with a timed COMMIT
        db = connect(path, *a, **kw)
        db.file = "inbox" if str(path).endswith("-callbacks.db") else "main"
        return db

    sqlite_file.SqliteFile.__init__ = init_timed  # type: ignore[method-assign]
    sqlite_file.sqlite3 = type(sys)("sqlite3_timed")  # the module's view of sqlite3, with a timed connect
    sqlite_file.sqlite3.__dict__.update({k: getattr(sqlite, k) for k in dir(sqlite) if not k.startswith("__")})
    sqlite_file.sqlite3.connect = connect_timed
    code = run(["serve", "-c", config, "--port", "0"], sys.stdout, sys.stderr)
    Path(out).write_text(json.dumps(stages))
    return code


def print_stages(path: Path, answered: int) -> None:
    """The stage timings of a ``--stages`` run: count, p50, p99, max and the sum per answered callback."""
    if not path.exists():
        print(f"  (no stage timings written: {path})")
        return
    stages = json.loads(path.read_text())
    print(f"\nwhere an answer's time goes (sidecar wall-clock timers, {answered} callbacks answered, warm-up "
          "included; [conn] = connection threads):")
    print(f"  {'stage':<58} {'count':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'ms/answer':>10}")
    for stage in sorted(stages):
        values = stages[stage]
        print(f"  {stage:<58} {len(values):>7} {percentile_ms(values, 0.5):>8.3f} {percentile_ms(values, 0.99):>8.3f}"
              f" {max(values) * 1000:>8.2f} {sum(values) * 1000 / max(answered, 1):>10.3f}")


def write_config(work: Path, db: Path, api_url: str, workers: int, name: str = "bench.toml") -> Path:
    # workers >= 1: the callback processor (and delivery threads) run beside the HTTP server
    return write_sidecar_config(work / name, api_url=api_url, openim_secret=FAKE_SECRET, admin=ADMIN,
                                callback_token=TOKEN, storage_url=f"sqlite:///{db.as_posix()}", workers=workers,
                                client="bench", client_secret="bench-secret-0123456789abcdef")


def inbox_of(db: Path) -> Path:
    """The sidecar's callback inbox beside its main file: ``bench.db`` -> ``bench-callbacks.db``."""
    return db.with_name(f"{db.stem}-callbacks{db.suffix}")


# -- the burst ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """One callback exactly as it goes over the wire."""

    command: str
    target: str        # path and query
    body: bytes
    headers: dict


class BurstMaker:
    """Builds bursts of distinct callbacks with FakeOpenIM's payload builders.

    Presence keeps a state per user and platform (each report flips it) and a
    clock that only moves forward, so ``seq`` grows across the whole run as
    OpenIM's ``time.Now().UnixMilli()`` does; message hooks get fresh
    serverMsgIDs, so no callback of the run repeats another (the sidecar would
    answer a repeat without storing it).
    """

    def __init__(self, fake, seed: int = 7) -> None:  # type: ignore[no-untyped-def]
        from openim_bizplugin.openim.fake import KEYED_CALLBACKS, _callback_key, _go_json, _with_query

        self.fake, self.rng = fake, random.Random(seed)
        self._go_json, self._key, self._with_query, self._keyed = _go_json, _callback_key, _with_query, KEYED_CALLBACKS
        self.online: dict[tuple[str, int], bool] = {}
        self.seq_ms = int(time.time() * 1000)
        self.chat_seq: dict[str, int] = {}
        self.operations = 0
        self.kinds = [kind for _share, kind in MIX]
        self.weights = [share for share, _kind in MIX]

    def burst(self, n: int) -> list[Call]:
        return [self.one(kind) for kind in self.rng.choices(self.kinds, self.weights, k=n)]

    def one(self, kind: str) -> Call:
        from openim_bizplugin.openim.fake import Delivery

        fake, rng = self.fake, self.rng
        self.seq_ms += 1
        if kind == "presence":
            key = (user_id(rng.randrange(USERS)), rng.choice(PLATFORMS))
            online = not self.online.get(key, False)
            self.online[key] = online
            payload = (fake.user_online(key[0], key[1], seq=self.seq_ms) if online
                       else fake.user_offline(key[0], key[1], seq=self.seq_ms))
            return self.call(payload["callbackCommand"], payload, payload["operationID"])
        if kind == "receipt":  # a client app answers one of the sidecar's messages
            receipt = {"id": f"msg_{rng.getrandbits(64):016x}", "status": "done"}
            delivery = fake.receipt_message(user_id(rng.randrange(USERS)), ADMIN, receipt)
            fake.delivered.clear()
            return self.call(AFTER_SEND, fake.after_send_single_msg(delivery), delivery.operation_id)
        now = self.seq_ms
        if kind == "saved-own":  # one of the sidecar's custom-mode sends, stored by msgtransfer
            envelope = self._go_json({"type": "order.status_changed", "version": 1,
                                      "id": f"msg_{rng.getrandbits(64):016x}",
                                      "data": {"order_id": f"SO-{rng.getrandbits(32)}", "status": "shipped"}})
            delivery = Delivery(endpoint="/msg/send_msg", session_type=1, content_type=110, send_id=ADMIN,
                                recv_id=user_id(rng.randrange(USERS)),
                                content={"data": envelope, "description": "order.status_changed", "extension": ""},
                                operation_id=f"bizplugin-{now}-{self.operations:04d}", server_msg_id=self.msg_id(),
                                client_msg_id=self.msg_id(), send_time=now, create_time=now, msg_from=200,
                                sender_platform_id=10, sender_nickname="System", status=1)
        else:  # a user's chat message: afterMsgSaveDB is not filtered by attentionIds
            a, b = rng.sample(range(USERS), 2)
            delivery = Delivery(endpoint="ws", session_type=1, content_type=101, send_id=user_id(a),
                                recv_id=user_id(b), content={"content": "see you at 6"},
                                operation_id=f"{now}-{rng.getrandbits(32):08x}", server_msg_id=self.msg_id(),
                                client_msg_id=self.msg_id(), send_time=now, create_time=now - 3, msg_from=100,
                                sender_platform_id=rng.choice(PLATFORMS), sender_nickname=f"User {a}", status=1)
        self.operations += 1
        conversation = "si_" + "_".join(sorted((delivery.send_id, delivery.recv_id)))
        seq = self.chat_seq[conversation] = self.chat_seq.get(conversation, 0) + 1
        return self.call(SAVE_DB, fake.after_msg_save_db(delivery, seq), delivery.operation_id)

    def msg_id(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    def call(self, command: str, payload: dict, operation_id: str) -> Call:
        """What OpenIM's webhook client sends (FakeOpenIM.post_callback, without its per-call Session)."""
        target = PREFIX + command
        if command in self._keyed:
            target = self._with_query(target, "key", self._key(payload))
        headers = {"User-Agent": "Go-http-client/1.1", "Operationid": operation_id,
                   "Content-Type": "application/json; charset=utf-8", "Accept-Encoding": "gzip"}
        return Call(command, target, (self._go_json(payload) + "\n").encode(), headers)


# -- the load generator -------------------------------------------------------------------------------
@dataclass
class SenderResult:
    ok: int = 0
    errors: dict = field(default_factory=dict)
    latencies: list = field(default_factory=list)
    first_began: float = float("inf")
    last_done: float = 0.0


def send(host: str, port: int, calls: list[Call], go: float) -> SenderResult:
    """Post *calls* one after the other (from *go*); an answer counts when it is 200 with the continue JSON."""
    result = SenderResult()
    conn = HTTPConnection(host, port, timeout=30)
    while time.monotonic() < go:
        time.sleep(0.0005)
    for call in calls:
        began = time.monotonic()
        answer = post_once(conn, call.target, call.body, call.headers, result.errors)
        if answer is None:
            continue
        done = time.monotonic()
        result.first_began = min(result.first_began, began)
        result.last_done = done
        status, payload = answer
        if status == 200 and payload == CONTINUE:
            result.ok += 1
            result.latencies.append(done - began)
        else:
            name = f"{status}" if status != 200 else "200-other-body"
            result.errors[name] = result.errors.get(name, 0) + 1
    conn.close()
    return result


def post_all(host: str, port: int, calls: list[Call], concurrency: int, generator: str) -> list[SenderResult]:
    """Share *calls* among *concurrency* senders (round robin) and post them all at once."""
    go = time.monotonic() + 0.2
    jobs = [(host, port, calls[i::concurrency], go) for i in range(concurrency)]
    return run_senders(send, jobs, generator, SenderResult)


# -- one round ----------------------------------------------------------------------------------------
@dataclass
class Round:
    side: str
    concurrency: int
    callbacks: int
    ok: int
    seconds: float
    latencies: list
    errors: dict
    server_cpu: float              # CPU seconds of the server process during the burst
    generator_cpu: float           # CPU seconds of this process (and forked senders) during the burst
    stored: int = -1               # A: rows the inbox gained
    done_at_end: int = -1          # A: of those, applied when the last answer came back
    drain_seconds: float = float("nan")   # A: from the last answer until every row is done
    drain_cpu: float = float("nan")       # A: server CPU seconds during the drain
    failed: int = -1               # A: rows the processor marked with an error
    burst_began: float = 0.0

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return percentile_ms(self.latencies, q)

    @property
    def max_ms(self) -> float:
        return max(self.latencies, default=float("nan")) * 1000


class Inbox:
    """Read-only looks at the sidecar's callback inbox (a second connection; WAL lets it read beside the writer)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, isolation_level=None)

    def counts(self) -> tuple[int, int, int]:
        """(rows, done, failed)."""
        rows, done, failed = self.db.execute(
            "SELECT count(*), coalesce(sum(done), 0), count(error) FROM callbacks").fetchone()
        return rows, done, failed

    def pending(self) -> int:
        return self.db.execute("SELECT count(*) FROM callbacks WHERE done = 0").fetchone()[0]

    def close(self) -> None:
        self.db.close()


def run_round(side: str, child: Child, calls: list[Call], args: argparse.Namespace, concurrency: int,
              inbox: Inbox | None, worker: Child | None = None) -> Round:
    """One burst; for the sidecar, *inbox* is checked and drained, and a separate *worker*'s CPU is counted."""
    host, port = child.host_port
    pids = [child.pid] + ([worker.pid] if worker else [])

    def server_cpu_now() -> float:
        return sum(cpu_seconds(pid) for pid in pids)

    before = inbox.counts() if inbox else (0, 0, 0)
    server_cpu, generator_cpu = server_cpu_now(), generator_cpu_seconds()
    results = post_all(host, port, calls, concurrency, args.generator)
    ended = time.monotonic()
    server_cpu, generator_cpu = server_cpu_now() - server_cpu, generator_cpu_seconds() - generator_cpu
    errors = merged_counts(r.errors for r in results)
    began = min(r.first_began for r in results)
    finished = max(r.last_done for r in results)
    result = Round(side, concurrency, len(calls), sum(r.ok for r in results), finished - began,
                   [x for r in results for x in r.latencies], errors, server_cpu, generator_cpu,
                   burst_began=began)
    if inbox is not None:
        rows, done, _ = inbox.counts()
        result.done_at_end = done - before[1]
        # a callback answered while the inbox's lock was taken is in a spool file, drained moments later
        deadline = ended + args.drain_timeout
        while rows - before[0] < len(calls) and time.monotonic() < deadline:
            time.sleep(args.poll)
            rows = inbox.counts()[0]
        result.stored = rows - before[0]
        if not args.delivery_workers:  # no processor: nothing will be applied
            return result
        cpu_before = server_cpu_now()
        deadline = ended + args.drain_timeout
        while inbox.pending() and time.monotonic() < deadline:
            time.sleep(args.poll)
        result.drain_seconds = time.monotonic() - ended if not inbox.pending() else float("inf")
        result.drain_cpu = server_cpu_now() - cpu_before
        result.failed = inbox.counts()[2] - before[2]
    return result


# -- answers while another process holds the store's write lock --------------------------------------
@dataclass
class LockedRun:
    callbacks: int
    ok: int
    latencies: list
    errors: dict
    stored_while_locked: int       # rows the inbox gained before the lock was released (expected: 0)
    stored: int                    # rows it gained in all (expected: callbacks)
    stored_seconds: float          # from the release until the inbox held every callback
    applied_seconds: float         # from the release until the processor had applied them all


def locked_round(child: Child, calls: list[Call], db: Path, inbox: Inbox, args: argparse.Namespace) -> LockedRun:
    """Post *calls* with 2 senders (OpenIM's two webhook workers) while this process holds the write lock of
    the sidecar's main file and inbox; then release it and time how long until the inbox holds them all and
    the processor has applied them."""
    host, port = child.host_port
    rows_before = inbox.counts()[0]
    lockers = [sqlite3.connect(path, timeout=30, isolation_level=None) for path in (db, inbox_of(db))]
    try:
        for locker in lockers:
            locker.execute("BEGIN IMMEDIATE")
        results = post_all(host, port, calls, 2, args.generator)
        stored_while_locked = inbox.counts()[0] - rows_before
    finally:
        for locker in lockers:
            if locker.in_transaction:
                locker.execute("ROLLBACK")
            locker.close()
    released = time.monotonic()
    deadline = released + args.drain_timeout
    stored_seconds = applied_seconds = float("inf")
    while time.monotonic() < deadline:
        rows, done, _ = inbox.counts()
        now = time.monotonic() - released
        if rows - rows_before >= len(calls) and stored_seconds == float("inf"):
            stored_seconds = now
        if stored_seconds != float("inf") and (done == rows or not args.delivery_workers):
            applied_seconds = now if args.delivery_workers else float("nan")
            break
        time.sleep(args.poll)
    errors: dict = {}
    for r in results:
        for k, v in r.errors.items():
            errors[k] = errors.get(k, 0) + v
    return LockedRun(len(calls), sum(r.ok for r in results), [x for r in results for x in r.latencies], errors,
                     stored_while_locked, inbox.counts()[0] - rows_before, stored_seconds, applied_seconds)


def print_locked(run: LockedRun, args: argparse.Namespace) -> None:
    errors = ", ".join(f"{k}: {v}" for k, v in run.errors.items()) or "none"
    print(f"\nwhile this process held the write lock of the sidecar's main file and inbox (BEGIN IMMEDIATE): "
          f"{run.callbacks} callbacks, 2 senders")
    print(f"  answered {run.ok}/{run.callbacks} with the continue JSON before the lock was released; errors: {errors}")
    print(f"  answer latency p50 {percentile_ms(run.latencies, 0.5):.2f} ms, p99 {percentile_ms(run.latencies, 0.99):.2f}"
          f" ms, max {max(run.latencies, default=float('nan')) * 1000:.1f} ms")
    print(f"  in the inbox while locked: {run.stored_while_locked}; after the release: {run.stored} stored, all in "
          f"{run.stored_seconds:.2f} s" + (f", applied in {run.applied_seconds:.2f} s" if args.delivery_workers
                                           else " (processor off)"))


def locked_figures(run: LockedRun, rounds: list[Round]) -> list[dict]:
    free = [x for r in rounds if r.side == "A" and r.concurrency == 2 for x in r.latencies]
    lost = run.callbacks - run.stored
    return [figure("callbacks", "p99 answer while the store is locked, 2 senders (baseline: unlocked p99)",
                   percentile_ms(run.latencies, 0.99), unit="ms", baseline=percentile_ms(free, 0.99) if free else None),
            figure("callbacks", "stored after the lock was released", run.stored_seconds, unit="s"),
            figure("callbacks checks", "callbacks answered while locked and not stored after", lost,
                   unit="callbacks", target="0", passed=lost == 0 and run.ok == run.callbacks)]


# -- reporting -----------------------------------------------------------------------------------------
NAMES = {"A": "A sidecar (store)", "B": "B bare Flask"}


def print_context(args: argparse.Namespace, work: Path, db_dir: Path, fake_url: str) -> None:
    import openim_bizplugin

    processor = ("OFF (intake only)" if not args.delivery_workers
                 else "in a separate `openim-bizplugin worker` process" if args.worker_process
                 else "on, in the serving process")
    print("machine")
    for line in machine_lines(db_dir, ("flask", "werkzeug")):
        print("  " + line)
    print(f"  package         openim_bizplugin {package_source(Path(openim_bizplugin.__file__).parent)}")
    print(f"  sidecar         inbox <db>-callbacks.db journal_mode=WAL synchronous=NORMAL (no fsync per answer); "
          "main file synchronous=FULL\n"
          f"                  delivery.workers = {args.delivery_workers}, callback processor "
          f"{processor}; api_url = FakeOpenIM {fake_url} (in this process)")
    mix = ", ".join(f"{share:.0%} {kind}" for share, kind in MIX)
    print(f"run: bursts of {args.callbacks:,} distinct callbacks ({mix}), rounds {args.rounds} for each "
          f"concurrency {', '.join(map(str, args.concurrency))}\n"
          f"     ({args.generator}s of this process, one callback in flight each; werkzeug closes every "
          f"connection: one TCP connection per callback on both sides); {args.warmup} callbacks of warm-up "
          "per side, not counted;\n"
          f"     GIL switch interval in both servers {(args.switch_interval or sys.getswitchinterval()) * 1000:g} ms"
          + ("" if args.switch_interval else " (Python's default)"))
    print()


def report(rounds: list[Round]) -> bool:
    print(f"{'conc':>4} {'side':<18} {'acks':>7} {'seconds':>8} {'acks/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'max ms':>7} {'srv cpu':>8} {'gen cpu':>8}  errors")
    for r in rounds:
        errors = ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "-"
        print(f"{r.concurrency:>4} {NAMES[r.side]:<18} {r.ok:>7} {r.seconds:>8.2f} {r.rate:>8.0f} "
              f"{r.pct(0.50):>7.2f} {r.pct(0.99):>7.2f} {r.max_ms:>7.1f} {r.server_cpu / r.callbacks * 1000:>8.3f} "
              f"{r.generator_cpu / r.callbacks * 1000:>8.3f}  {errors}")
    print("(srv cpu / gen cpu: CPU ms per callback of the server process / of the senders, during the burst;\n"
          " the sidecar's includes whatever its processor applied meanwhile, in a --worker-process too)")
    print()
    passed = True
    for conc in sorted({r.concurrency for r in rounds}):
        a = [r for r in rounds if r.concurrency == conc and r.side == "A"]
        b = [r for r in rounds if r.concurrency == conc and r.side == "B"]
        if not a or not b:
            print(f"concurrency {conc}: needs at least one A and one B round")
            continue
        rate_a, rate_b = statistics.mean(r.rate for r in a), statistics.mean(r.rate for r in b)
        lat_a = [x for r in a for x in r.latencies]
        lat_b = [x for r in b for x in r.latencies]
        p99_a, p99_b = percentile_ms(lat_a, 0.99), percentile_ms(lat_b, 0.99)
        ratio = rate_a / rate_b if rate_b else float("nan")
        ok_p99, ok_ratio = p99_a < TARGET_P99_MS, ratio >= TARGET_RATIO
        passed = passed and ok_p99 and ok_ratio
        print(f"concurrency {conc}: A/B rate = {rate_a:.0f} / {rate_b:.0f} acks/s = {ratio:.2f}  "
              f"target >= {TARGET_RATIO:.2f}: {'PASS' if ok_ratio else 'FAIL'};  "
              f"A p99 = {p99_a:.2f} ms (B {p99_b:.2f} ms, A p50 {percentile_ms(lat_a, 0.5):.2f} ms)  "
              f"target < {TARGET_P99_MS:g} ms: {'PASS' if ok_p99 else 'FAIL'}")
        cpu_a = statistics.mean(r.server_cpu / r.callbacks for r in a) * 1000
        cpu_b = statistics.mean(r.server_cpu / r.callbacks for r in b) * 1000
        print(f"    server CPU per callback during the burst: A {cpu_a:.3f} ms, B {cpu_b:.3f} ms "
              f"(B/A = {cpu_b / cpu_a if cpu_a else float('nan'):.2f}); Little's law: {conc} in flight at "
              f"B's rate means a mean wait of {conc / rate_b * 1000:.2f} ms even for the bare endpoint")
    return passed


def report_storage(rounds: list[Round], expected: int, warmup: int, inbox: Inbox | None, locked: int = 0) -> bool:
    a = [r for r in rounds if r.side == "A"]
    if not a or inbox is None:
        return True
    print()
    print(f"{'conc':>4} {'stored':>8} {'applied by end of burst':>24} {'drain after burst s':>20} "
          f"{'applied/s overall':>18} {'drain cpu ms/cb':>16} {'errors':>7}")
    good = True
    processing = not math.isnan(a[0].drain_seconds)
    for r in a:
        overall = r.callbacks / (r.seconds + r.drain_seconds) if r.drain_seconds != float("inf") else 0.0
        print(f"{r.concurrency:>4} {r.stored:>8} {r.done_at_end:>24} {r.drain_seconds:>20.2f} {overall:>18.0f} "
              f"{r.drain_cpu / r.callbacks * 1000:>16.3f} {r.failed if r.failed >= 0 else '-':>7}")
        good = good and r.stored == expected and (not processing or (r.drain_seconds != float("inf")
                                                                      and r.failed == 0))
    rows, done, failed = inbox.counts()
    total = expected * len(a) + warmup + locked
    good = good and rows == total and (not processing or (done == rows and not failed))
    print(f"inbox: {rows} rows (expected {total}: {len(a)} bursts x {expected} + {warmup} warm-up"
          + (f" + {locked} posted while locked" if locked else "")
          + f"), {done} done, {failed} with a processing error: {'OK' if good else 'MISMATCH'}"
          + ("" if processing else " (processor off: only the rows are checked)"))
    print("(applied/s overall = callbacks / (burst seconds + drain seconds): the processor's pace while and after "
          "intake runs;\n drain cpu = server CPU per callback after the burst, i.e. processor work)")
    return good


def summary(path: str, args: argparse.Namespace, rounds: list[Round], stored_ok: bool, answers_ok: bool,
            locked: LockedRun | None = None) -> None:
    """The key figures as JSON for bench/run (--summary-json)."""
    figures = locked_figures(locked, rounds) if locked else []
    for conc in sorted({r.concurrency for r in rounds}):
        a = [r for r in rounds if r.concurrency == conc and r.side == "A"]
        b = [r for r in rounds if r.concurrency == conc and r.side == "B"]
        if not a or not b:
            continue
        rate_a, rate_b = statistics.mean(r.rate for r in a), statistics.mean(r.rate for r in b)
        p99_a = percentile_ms([x for r in a for x in r.latencies], 0.99)
        p99_b = percentile_ms([x for r in b for x in r.latencies], 0.99)
        figures.append(figure("callbacks", f"acks/s vs bare Flask, {conc} senders", rate_a, unit="acks/s",
                              baseline=rate_b, target=f">= {TARGET_RATIO:.2f}",
                              passed=bool(rate_b) and rate_a / rate_b >= TARGET_RATIO))
        figures.append(figure("callbacks", f"p99 answer, {conc} senders (baseline: bare p99)", p99_a, unit="ms",
                              baseline=p99_b, target=f"< {TARGET_P99_MS:g} ms", passed=p99_a < TARGET_P99_MS))
    a = [r for r in rounds if r.side == "A"]
    if a and args.delivery_workers:
        figures.append(figure("callbacks", "processor drain after a burst (max)", max(r.drain_seconds for r in a),
                              unit="s"))
    problems = ([] if stored_ok else ["inbox rows or processing: MISMATCH"]) + \
               ([] if answers_ok else ["some callbacks were not answered 200 with the continue JSON"])
    sizes = (f"bursts of {args.callbacks:,}, senders {','.join(map(str, args.concurrency))}, rounds {args.rounds}, "
             f"warm-up {args.warmup}")
    write_summary_with_checks(path, "callbacks", sizes, figures, problems,
                              "every callback answered, stored once, applied")


# -- main -------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--callbacks", type=int, default=10_000, help="callbacks per burst (default 10000)")
    p.add_argument("--concurrency", default="2,8", help="comma-separated sender counts, one table row set "
                                                         "each (default 2,8)")
    p.add_argument("--rounds", default="BABA", help="order of bursts per concurrency, A=sidecar B=bare "
                                                   "(default BABA)")
    p.add_argument("--warmup", type=int, default=300, help="callbacks sent to each side first, not counted "
                                                          "(default 300)")
    p.add_argument("--generator", choices=("thread", "process"), default="thread",
                   help="senders: threads of this process (default) or forked processes")
    p.add_argument("--poll", type=float, default=0.02, help="seconds between drain checks (default 0.02)")
    p.add_argument("--drain-timeout", type=float, default=300, help="give up waiting for the processor after "
                                                                     "this many seconds (default 300)")
    p.add_argument("--delivery-workers", type=int, default=1,
                   help="the sidecar's delivery.workers (default 1); 0 runs intake only, without the callback "
                        "processor, to see what the processor costs the answers (nothing is drained then)")
    p.add_argument("--worker-process", action="store_true",
                   help="serve with delivery.workers = 0 and run the callback processor (and delivery) in "
                        "`openim-bizplugin worker`, a second process on the same SQLite files")
    p.add_argument("--stages", action="store_true",
                   help="run the sidecar with wall-clock timers around the stages of an answer (wrappers set up "
                        "by this script, not package code) and print p50/p99 per stage")
    p.add_argument("--locked", type=int, default=0, metavar="N",
                   help="also post N callbacks while this process holds the sidecar's store write lock, and "
                        "print their answer latency and how long until they are stored (default 0: off)")
    add_common_options(p, db_files="SQLite files",
                       profile_help="run the sidecar with every thread under cProfile; writes DIR/requests.prof, "
                                    "DIR/processor.prof, DIR/other.prof (figures of such a run are not "
                                    "representative)",
                       folder_holds="config, logs, databases", strict_when="a target is missed")
    p.add_argument("--switch-interval", type=float, metavar="SECONDS",
                   help="sys.setswitchinterval() in both servers (default: Python's 0.005): how long a thread "
                        "that wants the GIL waits before the running thread is made to let go")
    p.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sidecar", metavar="CONFIG", help=argparse.SUPPRESS)
    p.add_argument("--timed-sidecar", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--profiled-sidecar", nargs=3, metavar=("CONFIG", "OUT", "CLOCK"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        p.error("--concurrency takes numbers, e.g. 2,8")
    if (not args.rounds and not args.locked) or not set(args.rounds) <= {"A", "B"}:
        p.error("--rounds takes letters A and B, e.g. BABA")
    if args.callbacks < 1 or min(args.concurrency) < 1 or args.warmup < 0 or args.delivery_workers < 0 \
            or args.locked < 0:
        p.error("--callbacks and --concurrency must be positive")
    if args.worker_process and not args.delivery_workers:
        p.error("--worker-process needs --delivery-workers of at least 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if args.sidecar:
        from openim_bizplugin.cli import run

        return run(["serve", "-c", args.sidecar, "--port", "0"], sys.stdout, sys.stderr)
    if args.timed_sidecar:
        return timed_sidecar(*args.timed_sidecar)
    if args.bare_server:
        return bare_server()
    if args.profiled_sidecar:
        return profiled_sidecar(*args.profiled_sidecar)

    from openim_bizplugin.testing import FakeOpenIM

    sys.stdout.reconfigure(line_buffering=True)
    work = Path(tempfile.mkdtemp(prefix="bench-callbacks-"))
    db_dir = Path(args.db_dir).resolve() if args.db_dir else work
    db_dir.mkdir(parents=True, exist_ok=True)
    db = db_dir / "bench.db"
    if db.exists() or inbox_of(db).exists():
        raise SystemExit(f"{db} (or its inbox) exists already; the storage check needs fresh files")
    fake = FakeOpenIM(secret=FAKE_SECRET, admin_user_ids=(ADMIN,), users=[user_id(n) for n in range(USERS)]).start()
    config = write_config(work, db, fake.url, 0 if args.worker_process else args.delivery_workers)
    maker = BurstMaker(fake)
    began = time.monotonic()
    print_context(args, work, db_dir, fake.url)
    bursts = {(conc, i): maker.burst(args.callbacks) for conc in args.concurrency
              for i, side in enumerate(args.rounds)}
    warm = {side: maker.burst(args.warmup) for side in "AB"}
    calls_per_command: dict[str, int] = {}
    for calls in bursts.values():
        for call in calls:
            calls_per_command[call.command] = calls_per_command.get(call.command, 0) + 1
    sizes = [len(c.body) for calls in bursts.values() for c in calls]
    if bursts:  # none with --rounds "" (only --locked)
        print(f"burst content ({len(bursts)} bursts): "
              + ", ".join(f"{k.removeprefix('callback').removesuffix('Command')} {v / len(bursts):.0f}"
                          for k, v in sorted(calls_per_command.items(), key=lambda kv: -kv[1]))
              + f" per burst; body {statistics.mean(sizes):.0f} bytes on average")

    me = [sys.executable, str(Path(__file__).resolve())]
    interval = ["--switch-interval", str(args.switch_interval)] if args.switch_interval else []
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        sidecar_argv = [*me, *interval, "--profiled-sidecar", str(config), str(Path(args.profile).resolve()),
                        args.profile_clock]
    elif args.stages:
        sidecar_argv = [*me, *interval, "--timed-sidecar", str(config), str(work / "stages.json")]
    elif args.sidecar_cmd:
        sidecar_argv = sidecar_cmd_argv(args.sidecar_cmd, config)
    elif args.switch_interval:
        sidecar_argv = [*me, *interval, "--sidecar", str(config)]
    else:
        sidecar_argv = [console_script(), "serve", "-c", str(config)]
    children: dict[str, Child] = {}
    inbox: Inbox | None = None
    rounds: list[Round] = []
    ok = True
    try:
        if "B" in args.rounds:
            children["B"] = Child.start("bare server", [*me, *interval, "--bare-server"], LISTENING,
                                        work / "bare.log", cwd=work)
        children["A"] = Child.start("sidecar", sidecar_argv, LISTENING, work / "sidecar.log", cwd=work)
        if args.worker_process:  # the processor (and delivery) in a process of its own, on the same files
            worker_config = write_config(work, db, fake.url, args.delivery_workers, "worker.toml")
            children["W"] = Child.start("worker", [console_script(), "worker", "-c", str(worker_config)],
                                        "delivering with ", work / "worker.log", cwd=work)
        inbox = Inbox(inbox_of(db))
        memory_before = memory_kb(children["A"].pid)

        def sidecar_checks(side: str) -> tuple[Inbox | None, Child | None]:
            return (inbox, children.get("W")) if side == "A" else (None, None)

        for side in "BA":  # warm-up: imports, first connections, SQLite pages
            if args.warmup and side in children:
                run_round(side, children[side], warm[side], args, 2, *sidecar_checks(side))
        for conc in args.concurrency:
            for i, side in enumerate(args.rounds):
                r = run_round(side, children[side], bursts[(conc, i)], args, conc, *sidecar_checks(side))
                rounds.append(r)
                drained = (f", processor drained {r.drain_seconds:.2f} s later"
                           if side == "A" and args.delivery_workers else "")
                print(f"  concurrency {conc} round {i + 1}/{len(args.rounds)} {side}: {r.rate:.0f} acks/s, "
                      f"p99 {r.pct(0.99):.2f} ms{drained}", file=sys.stderr)
        locked = None
        if args.locked:
            locked = locked_round(children["A"], maker.burst(args.locked), db, inbox, args)
            print_locked(locked, args)
        memory_after = memory_kb(children["A"].pid)
        print()
        passed = report(rounds)
        stored_ok = report_storage(rounds, args.callbacks, args.warmup, inbox, args.locked)
        answers_ok = all(r.ok == r.callbacks and not r.errors for r in rounds)
        ok = stored_ok and answers_ok
        if not answers_ok:
            print("PROBLEM: some callbacks were not answered 200 with the continue JSON (see errors above)")
        if args.summary_json:
            summary(args.summary_json, args, rounds, stored_ok, answers_ok, locked)
        print(f"\nsidecar process: resident {memory_before.get('VmRSS', 0) / 1024:.0f} -> "
              f"{memory_after.get('VmRSS', 0) / 1024:.0f} MB (peak {memory_after.get('VmHWM', 0) / 1024:.0f} MB) "
              f"after {sum(r.callbacks for r in rounds if r.side == 'A') + args.warmup} callbacks")
        print(f"calls the sidecar made to the fake OpenIM: {len(fake.calls)} "
              f"({', '.join(sorted({c.endpoint for c in fake.calls})) or 'none'})")
        log_text = children["A"].log_path.read_text(errors="replace")
        noisy = [line for line in log_text.splitlines() if " WARNING " in line or " ERROR " in line]
        print(f"sidecar log: {len(noisy)} warnings/errors" + (f", first: {noisy[0][:200]}" if noisy else ""))
        if args.stages:
            children["A"].stop(signal.SIGTERM)
            print_stages(work / "stages.json", sum(r.ok for r in rounds if r.side == "A") + args.warmup)
        if args.profile:
            children["A"].stop(signal.SIGTERM)
            for name, title in (("requests", "sidecar connection threads"), ("processor", "callback processor")):
                print_profile_top(Path(args.profile) / f"{name}.prof", title)
        print(f"\nwhole run {time.monotonic() - began:.0f} s; own CPU {own_cpu_seconds():.1f} s; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")
    finally:
        if inbox is not None:
            inbox.close()
        tear_down(work, args.keep, [*children.values(), fake], [*sqlite_files(db), *sqlite_files(inbox_of(db))])
    if not ok:
        return 1
    return 1 if args.strict and not passed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
