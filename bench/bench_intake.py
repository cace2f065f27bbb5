#!/usr/bin/env python3
"""Intake throughput: the real sidecar versus a bare Flask endpoint, side by side.

Requirement: signed + validated + stored ``POST /v1/messages`` requests per
second reach at least half the rate of a bare Flask endpoint that only parses
the same JSON, with the sidecar's in-process delivery on (issue 17).

    python bench/bench_intake.py [--seconds 5] [--concurrency 4] [--recipients 5]

Side A is ``openim-bizplugin serve`` (a subprocess, temp config, temp SQLite,
port 0), its background process delivering to a fake OpenIM (a process of its
own) unless ``--delivery-workers 0``. Side B is this script started again with
``--bare-server``: one Flask POST endpoint doing ``json.loads(request.get_data())``
and answering the same 202 JSON, served the way ``serve`` serves the sidecar
(the same HTTP engine, limits, number of processes and per-request log line),
so both sides pay the same HTTP server costs.

The load generator runs ``--concurrency`` workers, each with one keep-alive
connection and one request in flight. It sends, to both sides, the same
``order.status_changed`` v1 body (a fresh ``order_id`` per request, so no
request is a replay) with a fresh signature. Rounds run in the order given by
``--rounds`` (default ``BABAB``, interleaved because a shared machine drifts);
the ratio is mean(A) / mean(B). While B is measured the sidecar's processes
are frozen (SIGSTOP), so the delivery backlog its rounds left does not run
through B's. The CPU the server processes spend per request is printed too:
it is steadier than req/s when other work shares the machine. After the run
the sidecar is killed with SIGKILL and its SQLite file must hold exactly one
message per 202 it answered.

This prints figures; it is not a test and exits 0 unless the run itself broke
(use ``--strict`` to exit 1 when the target is missed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (LISTENING, Child, FakeOpenIMProcess, add_common_options, console_script,  # noqa: E402
                     cpu_seconds, dist_version, dump_profiles, filesystem_of, fsync_ms, generator_cpu_seconds,
                     memory_kb, merged_counts, percentile_ms, post_once, profile_threads, run_senders,
                     serve_like_the_sidecar, sidecar_cmd_argv, sqlite_files, tear_down, usable_cpus,
                     write_sidecar_config)

BENCH = Path(__file__).resolve().parent
PATH = "/v1/messages"
CLIENT_ID = "bench"
SECRET = "bench-secret-0123456789abcdef"
TARGET_RATIO = 0.5


# -- side B: the bare endpoint ---------------------------------------------------------------
def bare_server(recipients: int) -> int:
    """Serve the bare endpoint exactly the way ``openim_bizplugin.web.server.serve`` serves the app."""
    from flask import Flask, jsonify, request

    app = Flask("bare")

    @app.post(PATH)
    def post_message():  # type: ignore[no-untyped-def]
        json.loads(request.get_data())
        return jsonify({"id": "x", "status": "queued", "recipients": recipients}), 202

    return serve_like_the_sidecar(app)


# -- optional: the sidecar under cProfile (all request threads) ------------------------------
def profiled_sidecar(config: str, out: str, clock: str) -> int:
    """Run ``openim-bizplugin serve`` with every connection thread profiled; stats go to *out*.

    cProfile only sees the thread that enables it, so each connection thread
    gets its own profiler (patched in here, not in the package) and the
    profiles are merged when the server stops (SIGTERM). With *clock* "cpu"
    the profiles count the thread's CPU time, so time spent waiting (SQLite
    busy-handler sleeps, fsync, the GIL) drops out; "wall" keeps it.
    """
    from openim_bizplugin.cli import run

    profiles = profile_threads(clock)
    code = run(["serve", "-c", config, "--port", "0"], sys.stdout, sys.stderr)
    dump_profiles(profiles, Path(out), lambda name: "process_request_thread" in name)
    return code


def write_config(directory: Path, db_dir: Path, api_url: str = "http://127.0.0.1:9", delivery_workers: int = 0) -> Path:
    # delivery_workers = 0: intake only, nothing is sent to OpenIM during the benchmark
    return write_sidecar_config(directory / "bench.toml", api_url=api_url, openim_secret="openIM123",
                                admin="imAdmin", callback_token="bench-callback-token-0123456789",
                                storage_url=f"sqlite:///{(db_dir / 'bench.db').as_posix()}",
                                workers=delivery_workers, client=CLIENT_ID, client_secret=SECRET)


# -- the load generator ------------------------------------------------------------------------
@dataclass
class WorkerResult:
    measured: int = 0            # 202 answers to requests started inside the window
    accepted_total: int = 0      # every 202, warm-up included (for the durability check)
    errors: dict = field(default_factory=dict)
    latencies: list = field(default_factory=list)
    last_done: float = 0.0


def body_for(tag: str, n: int, users: list[str]) -> bytes:
    """A realistic order.status_changed v1 body; order_id makes every body unique."""
    return json.dumps({
        "type": "order.status_changed", "version": 1,
        "data": {"order_id": f"SO-{tag}-{n:09d}", "status": "shipped", "previous_status": "paid",
                 "amount": {"value": "129.90", "currency": "EUR"}, "updated_at": "2026-11-26T12:00:00Z"},
        "to": {"users": users},
    }, separators=(",", ":")).encode()


def drive(host: str, port: int, tag: str, recipients: int, start: float, end: float,
          go: float) -> WorkerResult:
    """Send signed requests one at a time from *go* until *end*; measure those started after *start*.

    A failed connection is counted under its exception name and retried
    after a short pause, so a dying server shows up in the table.
    """
    from openim_bizplugin.signing import signature_headers

    first = int(tag.rsplit("w", 1)[1].split("p")[0]) * 1000  # this worker's users (a type's per-recipient
    # rate limit would hold back repeats), among the 10,000 the fake OpenIM of bench_delivery.py knows
    result = WorkerResult()
    conn = HTTPConnection(host, port, timeout=30)
    n = 0
    while time.monotonic() < go:
        time.sleep(0.001)
    while True:
        began = time.monotonic()
        if began >= end:
            break
        n += 1
        body = body_for(tag, n, [f"u{(first + n * recipients + i) % 10_000:05d}" for i in range(recipients)])
        headers = signature_headers(CLIENT_ID, SECRET, "POST", PATH, body)
        headers["Content-Type"] = "application/json"
        answer = post_once(conn, PATH, body, headers, result.errors)
        if answer is None:
            continue
        done = time.monotonic()
        status, payload = answer
        ok = status == 202 and json.loads(payload).get("recipients") == recipients
        if ok:
            result.accepted_total += 1
        elif status == 202:
            result.accepted_total += 1
            result.errors["202-bad-body"] = result.errors.get("202-bad-body", 0) + 1
        else:
            result.errors[status] = result.errors.get(status, 0) + 1
        if began >= start:
            if ok:
                result.measured += 1
                result.latencies.append(done - began)
            result.last_done = done
    conn.close()
    return result


def process_usage(pid: int) -> tuple[int, float]:
    """Open file descriptors of process *pid* and resident MB of it and its children (Linux /proc),
    or (-1, nan)."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1, float("nan")
    return fds, memory_kb(pid).get("VmRSS", 0) / 1024


@dataclass
class Round:
    side: str
    requests: int
    seconds: float
    latencies: list
    accepted_total: int
    errors: dict
    server_cpu: float = float("nan")     # CPU seconds of the server process over the whole round
    generator_cpu: float = float("nan")  # CPU seconds of the load generator over the whole round
    all_requests: int = 0                # requests answered over the whole round, warm-up included

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def cpu_per_request(self, cpu: float) -> float:
        """CPU milliseconds per request (warm-up included on both sides of the division)."""
        return cpu / self.all_requests * 1000 if self.all_requests else float("nan")

    def pct(self, q: float) -> float:
        return percentile_ms(self.latencies, q)


def run_round(side: str, server: Child, args: argparse.Namespace, round_no: int) -> Round:
    go = time.monotonic() + 0.3  # let every worker connect first
    start = go + args.warmup
    end = start + args.seconds
    server_cpu, generator_cpu = cpu_seconds(server.proc.pid), generator_cpu_seconds()
    jobs = [(*server.host_port, f"{side}{round_no}w{i}p{os.getpid()}", args.recipients, start, end, go)
            for i in range(args.concurrency)]
    results = run_senders(drive, jobs, args.generator, WorkerResult)
    errors = merged_counts(r.errors for r in results)
    finished = max((r.last_done for r in results), default=end)
    return Round(side, sum(r.measured for r in results), max(finished, end) - start,
                 [x for r in results for x in r.latencies], sum(r.accepted_total for r in results), errors,
                 cpu_seconds(server.proc.pid) - server_cpu, generator_cpu_seconds() - generator_cpu,
                 sum(r.accepted_total + sum(r.errors.values()) for r in results))


# -- context and reporting -----------------------------------------------------------------------
def print_context(args: argparse.Namespace, db_dir: Path) -> None:
    print("machine")
    print(f"  cpus            {os.cpu_count()} (usable by this process: {usable_cpus()}); "
          "servers and load generator share them")
    print(f"  python          {platform.python_version()} ({platform.python_implementation()})")
    print(f"  flask/werkzeug  {dist_version('flask')} / {dist_version('werkzeug')}")
    print(f"  sqlite          {sqlite3.sqlite_version}; journal_mode=WAL, synchronous=FULL "
          "(every 202 waits for an fsync of the WAL)")
    print(f"  load average    {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min) at start")
    print(f"  database dir    {db_dir} ({filesystem_of(db_dir)}; median fsync {fsync_ms(db_dir):.3f} ms)")
    print(f"run: {args.seconds:g} s per round after {args.warmup:g} s warm-up, rounds {args.rounds}, "
          f"concurrency {args.concurrency} ({args.generator}s, one request in flight each), "
          f"{args.recipients} recipients per message")
    print()


def report(rounds: list[Round]) -> float:
    print(f"{'side':<26} {'requests':>9} {'seconds':>8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'srv cpu':>8} {'gen cpu':>8}  errors")
    names = {"A": "A sidecar (sign+validate+store)", "B": "B bare Flask (json.loads)"}
    for r in rounds:
        errors = ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "-"
        print(f"{names[r.side][:26]:<26} {r.requests:>9} {r.seconds:>8.2f} {r.rate:>9.1f} "
              f"{r.pct(0.50):>8.2f} {r.pct(0.99):>8.2f} {r.cpu_per_request(r.server_cpu):>8.3f} "
              f"{r.cpu_per_request(r.generator_cpu):>8.3f}  {errors}")
    print("(srv cpu / gen cpu: CPU ms per request used by the server process / by the load generator)")
    a = [r.rate for r in rounds if r.side == "A"]
    b = [r.rate for r in rounds if r.side == "B"]
    if not a or not b:
        print("\nratio: needs at least one A and one B round")
        return float("nan")
    ratio = statistics.mean(a) / statistics.mean(b)
    verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
    print(f"\nA/B = {statistics.mean(a):.1f} / {statistics.mean(b):.1f} req/s = {ratio:.2f}   "
          f"target >= {TARGET_RATIO:.2f}: {verdict}")
    cpu_a = statistics.mean(r.cpu_per_request(r.server_cpu) for r in rounds if r.side == "A")
    cpu_b = statistics.mean(r.cpu_per_request(r.server_cpu) for r in rounds if r.side == "B")
    print(f"server CPU per request: B {cpu_b:.3f} ms / A {cpu_a:.3f} ms = "
          f"{cpu_b / cpu_a if cpu_a > 0 else float('nan'):.2f} "
          "(the rate ratio to expect when both servers are CPU-bound)")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end "
          "(compare with the start: other work on the machine skews req/s more than CPU/request)")
    return ratio


def durability(db: Path, accepted: int, recipients: int) -> tuple[bool, int]:
    """Print the check; (ok, messages in the file)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            messages = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
            rows = conn.execute("SELECT count(*) FROM recipients").fetchone()[0]
        conn.close()
    except sqlite3.Error as exc:
        print(f"durability: sidecar answered 202 x {accepted}; cannot read {db}: {exc}: MISMATCH")
        return False, -1
    ok = messages == accepted and rows == accepted * recipients
    print(f"durability: sidecar answered 202 x {accepted}; after SIGKILL the database holds "
          f"{messages} messages and {rows} recipient rows (expected {accepted * recipients}): "
          f"{'OK' if ok else 'MISMATCH'}")
    return ok, messages


def write_summary(path: str, args: argparse.Namespace, rounds: list[Round], accepted: int, stored: int,
                  durable: bool) -> None:
    """The key figures as JSON for bench/run (--summary-json)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import figure
    from _common import write_summary as write

    def mean(values: list[float]) -> float:
        return statistics.mean(values) if values else float("nan")

    a, b = [r for r in rounds if r.side == "A"], [r for r in rounds if r.side == "B"]
    rate_a, rate_b = mean([r.rate for r in a]), mean([r.rate for r in b])
    ratio = rate_a / rate_b if b and rate_b else float("nan")
    cpu_a = mean([r.cpu_per_request(r.server_cpu) for r in a])
    cpu_b = mean([r.cpu_per_request(r.server_cpu) for r in b])
    figures = [
        figure("intake", "req/s sidecar vs bare Flask", rate_a, unit="req/s", baseline=rate_b, ratio=ratio,
               target=f">= {TARGET_RATIO:.2f}", passed=ratio >= TARGET_RATIO if a and b else None),
        figure("intake", "server CPU per request, sidecar vs bare", cpu_a, unit="ms", baseline=cpu_b),
        figure("intake", "p99 latency sidecar vs bare", mean([r.pct(0.99) for r in a]), unit="ms",
               baseline=mean([r.pct(0.99) for r in b])),
        figure("intake", "202s stored after SIGKILL", stored, unit="msgs", baseline=accepted, target="all",
               passed=durable),
    ]
    sizes = (f"{args.seconds:g} s rounds {args.rounds}, concurrency {args.concurrency}, "
             f"{args.recipients} recipients")
    write(path, "intake", sizes, figures, [] if durable else ["durability check: MISMATCH"])


# -- main -------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per round (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each round (default 1)")
    p.add_argument("--concurrency", type=int, default=4, help="connections sending at once (default 4)")
    p.add_argument("--recipients", type=int, default=5, help="users per message (default 5)")
    p.add_argument("--rounds", default="BABAB", help="order of rounds, A=sidecar B=bare (default BABAB)")
    p.add_argument("--generator", choices=("thread", "process"), default="thread",
                   help="load generator workers: threads of this process or processes (default thread)")
    p.add_argument("--delivery-workers", type=int, default=4,
                   help="the sidecar's [delivery] workers, sending to a fake OpenIM in a process of its own, as "
                        "serve does by default (default 4; 0: intake only, nothing is sent)")
    add_common_options(p, db_files="SQLite file", profile_metavar="OUT.prof",
                       profile_help="run the sidecar under cProfile (all request threads) and write stats here; "
                                    "the figures of such a run are not representative",
                       folder_holds="config, logs, database", strict_when="the target ratio is missed")
    p.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profiled-sidecar", nargs=3, metavar=("CONFIG", "OUT", "CLOCK"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not set(args.rounds) <= {"A", "B"} or not args.rounds:
        p.error("--rounds takes letters A and B, e.g. BAB")
    if args.concurrency < 1 or args.recipients < 1 or args.seconds <= 0:
        p.error("--concurrency, --recipients and --seconds must be positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.bare_server:
        return bare_server(args.recipients)
    if args.profiled_sidecar:
        return profiled_sidecar(*args.profiled_sidecar)

    sys.stdout.reconfigure(line_buffering=True)  # keep the table and the progress lines in order
    work = Path(tempfile.mkdtemp(prefix="bench-intake-"))
    db_dir = Path(args.db_dir).resolve() if args.db_dir else work
    db_dir.mkdir(parents=True, exist_ok=True)
    fake = FakeOpenIMProcess(BENCH / "bench_delivery.py", work) if args.delivery_workers else None
    config = write_config(work, db_dir, fake.url if fake else "http://127.0.0.1:9", args.delivery_workers)
    db = db_dir / "bench.db"
    if db.exists():
        raise SystemExit(f"{db} exists already; the durability check needs a fresh database")
    print_context(args, db_dir)

    if args.profile:
        sidecar_argv = [sys.executable, str(Path(__file__).resolve()), "--profiled-sidecar", str(config),
                        str(Path(args.profile).resolve()), args.profile_clock]
    elif args.sidecar_cmd:
        sidecar_argv = sidecar_cmd_argv(args.sidecar_cmd, config)
    else:
        sidecar_argv = [console_script(), "serve", "-c", str(config)]
    servers: dict[str, Child] = {}
    try:
        servers["B"] = Child.start("bare server", [sys.executable, str(Path(__file__).resolve()), "--bare-server",
                                                   "--recipients", str(args.recipients)], LISTENING,
                                   work / "bare.log", cwd=work)
        servers["A"] = Child.start("sidecar", sidecar_argv, LISTENING, work / "sidecar.log", cwd=work)
        usage_before = process_usage(servers["A"].proc.pid)
        rounds = []
        for i, side in enumerate(args.rounds):
            # the sidecar's background (a delivery backlog, above all) would run through B's rounds and
            # slow B down: frozen, it goes on where it was when A's next round starts
            frozen = servers["A"] if side == "B" else None
            if frozen:
                frozen.pause()
            try:
                rounds.append(run_round(side, servers[side], args, i))
            finally:
                if frozen:
                    frozen.resume()
            print(f"  round {i + 1}/{len(args.rounds)} {side}: {rounds[-1].rate:.1f} req/s", file=sys.stderr)
        print()
        ratio = report(rounds)
        accepted = sum(r.accepted_total for r in rounds if r.side == "A")
        usage_after = process_usage(servers["A"].proc.pid)
        served = sum(r.all_requests for r in rounds if r.side == "A")
        print(f"sidecar process: open fds {usage_before[0]} -> {usage_after[0]}, resident "
              f"{usage_before[1]:.0f} -> {usage_after[1]:.0f} MB after {served} requests "
              "(steady growth per request is a leak)")
        if args.profile:
            servers["A"].stop(signal.SIGTERM)  # a clean stop writes the profile
            print(f"profile written to {args.profile} (python -m pstats {args.profile})")
        else:
            servers["A"].stop(signal.SIGKILL)  # only what was committed before answering survives
        durable, stored = durability(db, accepted, args.recipients) if "A" in args.rounds else (True, 0)
        if args.summary_json:
            write_summary(args.summary_json, args, rounds, accepted, stored, durable)
    finally:
        if fake:
            print(f"fake OpenIM: {fake.stats()['delivered']} recipients delivered")
            fake.stop()
        tear_down(work, args.keep, servers.values(), sqlite_files(db))
    if not durable:
        return 1
    return 1 if args.strict and not ratio >= TARGET_RATIO else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
