#!/usr/bin/env python3
"""Delivery throughput: the sidecar's workers versus a plain requests loop, against the same fake OpenIM.

Requirement (issue 3): end-to-end delivered recipients per second against
the fake OpenIM, side by side in one run with a plain ``requests.Session``
loop calling the same fake directly with the same payloads. Target: the
sidecar reaches at least 80% of the direct loop's rate while adding
durability; a fan-out of one message to 10,000 users completes, with memory
that stays flat as the queue grows (peak RSS for 1k, 10k and 100k queued
recipients).

    python bench/bench_delivery.py [--workers 4] [--batch-size 500] [--only NAME,...]

The fake OpenIM (:class:`openim_bizplugin.testing.FakeOpenIM`, 10,000
registered users) runs in its own process, started as this script with
``--fake-openim``, so its CPU is not counted against either side's GIL; it
counts calls, request bytes, errors and accepted messages (and forgets its
call log, so its memory stays flat) and reports them between phases.

Each scenario runs two phases against that one fake:

``direct``   ``--workers`` threads in this process, each with its own
             ``requests.Session`` (keep-alive), fetch an admin token once and
             then send exactly what the sidecar sends: one
             ``/msg/send_business_notification`` per recipient in notification
             mode, one ``/msg/batch_send_msg`` per ``--batch-size`` users of a
             message in custom mode, with the same envelope string, key,
             reliabilityLevel, content and offline-push fields, checking
             ``errCode`` (and ``results``) of every answer. Nothing is stored.
``sidecar``  a fresh SQLite file is filled through the real API
             (``openim-bizplugin serve`` with ``delivery.workers = 0``: signed
             ``POST /v1/messages``, stored, nothing sent), the server is
             stopped, and ``openim-bizplugin worker`` (``--workers`` threads)
             is started on that file. The clock runs from the worker's
             ``delivering with N workers`` line until no recipient is in an
             active status, polled every ``--poll`` s through the store's
             ``next_due_ms`` (one index probe per priority and table). Its
             process start-up is shown apart.

The pair runs ``--repeat`` times (default 2, interleaved: direct, sidecar,
direct, sidecar, because a shared machine drifts); each pair's sidecar file
is filled before its direct phase, so that only the worker's start-up
separates the two timed phases. rate = recipients /
seconds; the ratio is mean(sidecar) / mean(direct) for the same scenario.
After each phase the fake must have accepted every recipient exactly once
with no error answers, and after the sidecar phase every recipient row must
be ``sent``; a mismatch is printed and makes the exit code 1. The memory
series is the worker's peak resident set (``VmHWM`` from /proc) for 1k, 10k
and 100k queued recipients in custom mode (100k in notification mode would
take minutes: one OpenIM call per recipient). CPU milliseconds per recipient
of the sending process (this script for direct, the worker after start-up for
the sidecar) and of the fake are printed too: they are steadier than rates on
a shared machine.

``--profile DIR`` runs each worker with every delivery thread under cProfile
(merged per round into ``DIR/<scenario>[-N].prof``) and prints the top
functions; the figures of such a run are not representative.

This prints figures; it is not a test and exits 0 unless the run itself broke
(use ``--strict`` to exit 1 when the target is missed).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import secrets
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (LISTENING, Child, FakeOpenIMProcess, add_common_options, console_script,  # noqa: E402
                     cpu_seconds, dump_profiles, figure, machine_lines, memory_kb, own_cpu_seconds, package_source,
                     profile_threads, tear_down, write_sidecar_config, write_summary_with_checks)

TARGET_RATIO = 0.8
# bench/run's bar for "memory stays flat": worker peak-RSS bytes per extra queued recipient, 10k -> 100k.
# Below what one object per queued recipient would cost; bounded caches (SQLite's page cache per
# pooled connection) also show up here, spread over the 90,000 extra recipients.
RSS_GROWTH_TARGET = 500
CLIENT_ID = "bench"
SECRET = "bench-secret-0123456789abcdef"
FAKE_SECRET = "openIM123"
ADMIN = "imAdmin"
TYPE = "order.status_changed"      # notification by default, persistent (reliabilityLevel 2), push texts
PATH = "/v1/messages"
DELIVERING = "delivering with "
USERS = 10_000
NOTIFY = "/msg/send_business_notification"
BATCH = "/msg/batch_send_msg"


@dataclass(frozen=True)
class Scenario:
    name: str
    mode: str          # "notification" | "custom"
    messages: int
    users: int         # per message
    memory: bool = False   # part of the RSS series
    direct: bool = True    # compared with the direct loop (1,000 recipients are two calls: too short to time)

    @property
    def recipients(self) -> int:
        return self.messages * self.users

    def users_of(self, k: int) -> list[str]:
        """The users of message *k*: consecutive ids from the fake's 10,000, wrapping round."""
        return [user_id((k * self.users + j) % USERS) for j in range(self.users)]

    def data_of(self, k: int) -> dict:
        return {"order_id": f"SO-{self.name}-{k:06d}", "status": "shipped", "previous_status": "paid",
                "amount": {"value": "129.90", "currency": "EUR"}, "updated_at": "2026-11-26T12:00:00Z"}

    def describe(self) -> str:
        return f"{self.messages} x {self.users:,}"


SCENARIOS = (
    Scenario("notify-many", "notification", 200, 20),
    Scenario("notify-fanout", "notification", 1, 10_000),
    Scenario("custom-many", "custom", 100, 100),
    Scenario("custom-1k", "custom", 1, 1_000, memory=True, direct=False),
    Scenario("custom-fanout", "custom", 1, 10_000, memory=True),
    Scenario("custom-100k", "custom", 10, 10_000, memory=True),
)


def user_id(n: int) -> str:
    return f"u{n:05d}"


# -- the fake OpenIM, in its own process ---------------------------------------------------------
def fake_openim(users: int) -> int:
    """Serve a counting FakeOpenIM; each ``stats`` line on stdin answers one JSON line and resets."""
    from openim_bizplugin.testing import FakeOpenIM

    class CountingFake(FakeOpenIM):
        """Counts what it answers and keeps no call log (so its memory stays flat over 100k+ calls)."""

        def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(**kwargs)
            self.reset()

        def reset(self) -> dict:
            previous = getattr(self, "tally", None)
            self.tally = {"calls": defaultdict(int), "bytes": defaultdict(int), "errors": defaultdict(int),
                          "delivered": 0}
            self.seen: set[int] = set()
            return previous

        def _handle(self, method, path, operation_id, token, raw):  # type: ignore[no-untyped-def]
            answer = super()._handle(method, path, operation_id, token, raw)  # called under self._lock
            status, body, _ = answer
            tally = self.tally
            tally["calls"][path] += 1
            tally["bytes"][path] += len(raw)
            if status != 200 or not body.startswith(b'{"errCode":0,'):
                tally["errors"][path] += 1
            for d in self.delivered:  # one (recipient, envelope) pair per message OpenIM accepted
                self.seen.add(hash((d.recv_id, d.group_id, d.data if d.data is not None else d.content.get("data"))))
            tally["delivered"] += len(self.delivered)
            self.delivered.clear()
            self.calls.clear()
            return answer

    everyone = [user_id(n) for n in range(users)]  # online: persistent notifications to offline apps are held
    fake = CountingFake(secret=FAKE_SECRET, admin_user_ids=(ADMIN,), users=everyone, online=everyone)
    fake.start()
    print(f"{LISTENING}{fake.host}:{fake.port}", flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            with fake._lock:
                unique = len(fake.seen)
                tally = fake.reset()
            print(json.dumps({**tally, "unique": unique}), flush=True)
    fake.stop()
    return 0


# -- one phase's figures -------------------------------------------------------------------------------
@dataclass
class Phase:
    scenario: Scenario
    side: str                 # "direct" | "sidecar"
    seconds: float
    client_cpu: float         # CPU s of the sending process during the phase (after start-up)
    fake_cpu: float           # CPU s of the fake during the phase
    fake: dict                # the fake's tally for the phase
    problems: list = field(default_factory=list)
    startup: float = float("nan")     # sidecar: spawn -> "delivering with" line
    rss_start_kb: int = 0             # sidecar: resident right after start-up
    rss_peak_kb: int = 0              # sidecar: VmHWM at the end
    db_mb: float = float("nan")

    @property
    def rate(self) -> float:
        return self.scenario.recipients / self.seconds if self.seconds else 0.0

    @property
    def calls(self) -> int:
        return sum(self.fake["calls"].values())

    def cpu_ms(self, seconds: float) -> float:
        return seconds / self.scenario.recipients * 1000

    def mean_bytes(self, endpoint: str) -> float:
        calls = self.fake["calls"].get(endpoint, 0)
        return self.fake["bytes"].get(endpoint, 0) / calls if calls else float("nan")

    def check_fake(self) -> None:
        """The fake must have accepted every recipient once and answered no call with an error."""
        want = self.scenario.recipients
        errors = sum(self.fake["errors"].values())
        if self.fake["delivered"] != want or self.fake["unique"] != want or errors:
            self.problems.append(f"fake OpenIM accepted {self.fake['delivered']} messages ({self.fake['unique']} "
                                 f"distinct) for {want} recipients, {errors} error answers")


# -- direct: a plain requests loop -------------------------------------------------------------------
def envelope(message_id: str, scenario: Scenario, k: int, now_ms: int) -> str:
    """The client-facing envelope string the sidecar builds at intake (SPEC §5)."""
    return json.dumps({"id": message_id, "type": TYPE, "v": 1, "ts": now_ms, "from": CLIENT_ID,
                       "priority": "normal", "data": scenario.data_of(k)}, separators=(",", ":"), ensure_ascii=False)


def push_info() -> dict:
    """order.status_changed's push texts (schemas/order.status_changed/type.toml)."""
    return {"title": "Order update", "desc": "One of your orders has changed.", "ex": "", "iOSPushSound": "",
            "iOSBadgeCount": False, "signalInfo": ""}


def direct_units(scenario: Scenario, batch_size: int) -> list[tuple[str, str, str, list[str]]]:
    """(endpoint, message id, envelope, users) per OpenIM call, in the order the sidecar's leases take them."""
    units = []
    now_ms = int(time.time() * 1000)
    for k in range(scenario.messages):
        message_id = f"{now_ms:012x}{secrets.token_hex(10)}"
        env = envelope(message_id, scenario, k, now_ms)
        users = scenario.users_of(k)
        if scenario.mode == "notification":
            units += [(NOTIFY, message_id, env, [u]) for u in users]
        else:
            units += [(BATCH, message_id, env, users[i:i + batch_size]) for i in range(0, len(users), batch_size)]
    return units


def body_for(endpoint: str, env: str, users: list[str]) -> dict:
    """The body the sidecar's OpenIM client builds for this call."""
    if endpoint == NOTIFY:
        return {"sendUserID": ADMIN, "key": TYPE, "data": env, "sendMsg": False, "reliabilityLevel": 2,
                "recvUserID": users[0]}
    return {"sendID": ADMIN, "senderPlatformID": 10, "content": {"data": env, "description": TYPE, "extension": ""},
            "contentType": 110, "isOnlineOnly": False, "notOfflinePush": False, "offlinePushInfo": push_info(),
            "sessionType": 1, "isSendAll": False, "recvIDs": users}


def run_direct(scenario: Scenario, fake: FakeOpenIMProcess, args: argparse.Namespace) -> Phase:
    answer = requests.post(fake.url + "/auth/get_admin_token", json={"secret": FAKE_SECRET, "userID": ADMIN},
                           headers={"operationID": f"bench-token-{secrets.token_hex(4)}"}, timeout=10).json()
    token = answer["data"]["token"]
    work: queue.SimpleQueue = queue.SimpleQueue()
    for unit in direct_units(scenario, args.batch_size):
        work.put(unit)
    go = threading.Event()
    failures: list[str] = []

    def loop(n: int) -> None:
        session = requests.Session()
        go.wait()
        while True:
            try:
                endpoint, message_id, env, users = work.get_nowait()
            except queue.Empty:
                break
            operation_id = f"bench-{message_id}-{users[0]}-{int(time.time() * 1000)}-{secrets.token_hex(4)}"
            try:
                resp = session.post(fake.url + endpoint, json=body_for(endpoint, env, users),
                                    headers={"operationID": operation_id, "token": token}, timeout=(5, 10))
                got = resp.json()
                ok = resp.status_code == 200 and got.get("errCode") == 0
                if ok and endpoint == BATCH:
                    ok = len((got.get("data") or {}).get("results") or ()) == len(users)
            except (requests.RequestException, ValueError) as exc:
                got, ok = repr(exc), False
            if not ok:
                failures.append(f"{endpoint}: {str(got)[:200]}")
        session.close()

    threads = [threading.Thread(target=loop, args=(n,), name=f"direct-{n}") for n in range(args.workers)]
    for t in threads:
        t.start()
    fake.stats()  # start counting here
    cpu, fake_cpu, began = own_cpu_seconds(), fake.cpu(), time.monotonic()
    go.set()
    for t in threads:
        t.join()
    seconds = time.monotonic() - began
    phase = Phase(scenario, "direct", seconds, own_cpu_seconds() - cpu, fake.cpu() - fake_cpu, fake.stats())
    phase.check_fake()
    if failures:
        phase.problems.append(f"{len(failures)} failed calls, first: {failures[0]}")
    return phase


# -- the sidecar: intake, then `openim-bizplugin worker` ----------------------------------------------
def write_config(path: Path, storage_url: str, api_url: str, workers: int, batch_size: int) -> Path:
    """The sidecar's config for this script and bench_replicas.py (SQLite or Redis storage)."""
    return write_sidecar_config(path, api_url=api_url, openim_secret=FAKE_SECRET, admin=ADMIN,
                                callback_token="bench-callback-token-0123456789", storage_url=storage_url,
                                workers=workers, client=CLIENT_ID, client_secret=SECRET,
                                extra={"server": {"max_recipients": USERS}, "delivery": {"batch_size": batch_size}})


def load(scenario: Scenario, config: Path, directory: Path) -> None:
    """Accept the scenario's messages through the real API, with no delivery workers running."""
    from openim_bizplugin.signing import signature_headers

    server = Child.start("sidecar (intake)", [console_script(), "serve", "-c", str(config)], LISTENING,
                         directory / "serve.log")
    try:
        with requests.Session() as session:
            for k in range(scenario.messages):
                body = json.dumps({"type": TYPE, "version": 1, "data": scenario.data_of(k),
                                   "to": {"users": scenario.users_of(k)}, "mode": scenario.mode},
                                  separators=(",", ":")).encode()
                headers = signature_headers(CLIENT_ID, SECRET, "POST", PATH, body)
                headers["Content-Type"] = "application/json"
                resp = session.post(f"http://{server.line}{PATH}", data=body, headers=headers, timeout=120)
                if resp.status_code != 202 or resp.json().get("recipients") != scenario.users:
                    raise SystemExit(f"intake refused message {k} of {scenario.name}: {resp.status_code} "
                                     f"{resp.text[:300]}")
    finally:
        server.stop(signal.SIGTERM)


def worker_argv(config: Path, profile: Path | None, clock: str) -> list[str]:
    if profile is None:
        return [console_script(), "worker", "-c", str(config)]
    return [sys.executable, str(Path(__file__).resolve()), "--profiled-worker", str(config), str(profile), clock]


def prepare_sidecar(scenario: Scenario, fake: FakeOpenIMProcess, args: argparse.Namespace, work: Path) -> Path:
    """A folder with the scenario's messages accepted into a fresh SQLite file, and the worker's config."""
    rounds = len(list(work.glob(f"{scenario.name}*"))) + 1
    directory = work / (scenario.name if rounds == 1 else f"{scenario.name}-{rounds}")
    directory.mkdir()
    storage_url = f"sqlite:///{(directory / 'bizplugin.db').as_posix()}"
    load(scenario, write_config(directory / "serve.toml", storage_url, fake.url, 0, args.batch_size), directory)
    write_config(directory / "worker.toml", storage_url, fake.url, args.workers, args.batch_size)
    return directory


def run_sidecar(scenario: Scenario, fake: FakeOpenIMProcess, args: argparse.Namespace, directory: Path) -> Phase:
    """``openim-bizplugin worker`` on a folder made by :func:`prepare_sidecar`, timed until nothing is left."""
    from openim_bizplugin.store.sqlite import SqliteStore

    db = directory / "bizplugin.db"
    config = directory / "worker.toml"
    profile = Path(args.profile) / f"{directory.name}.prof" if args.profile else None
    poll = sqlite3.connect(db, timeout=30)
    store = SqliteStore(db)
    queued = poll.execute("SELECT count(*) FROM recipient_states WHERE status = 'queued'").fetchone()[0]
    problems = [] if queued == scenario.recipients else [f"{queued} recipients queued, not {scenario.recipients}"]

    fake.stats()
    fake_cpu = fake.cpu()
    worker = Child.start("worker", worker_argv(config, profile, args.profile_clock), DELIVERING,
                         directory / "worker.log")
    try:
        cpu, rss_start = cpu_seconds(worker.pid), memory_kb(worker.pid).get("VmRSS", 0)
        deadline = worker.announced + args.timeout
        while store.next_due_ms() is not None:  # work left: queued, held or being sent
            if worker.proc.poll() is not None:
                raise SystemExit(f"the worker exited ({worker.proc.returncode}); see {worker.log_path}")
            if time.monotonic() > deadline:
                problems.append(f"not done after {args.timeout:g} s")
                break
            time.sleep(args.poll)
        finished = time.monotonic()
        cpu, peak = cpu_seconds(worker.pid) - cpu, memory_kb(worker.pid).get("VmHWM", 0)
        fake_cpu = fake.cpu() - fake_cpu
    finally:
        worker.stop(signal.SIGTERM)
    phase = Phase(scenario, "sidecar", finished - worker.announced, cpu, fake_cpu, fake.stats(), problems,
                  startup=worker.announced - worker.spawned, rss_start_kb=rss_start, rss_peak_kb=peak,
                  db_mb=sum(p.stat().st_size for p in directory.glob("bizplugin.db*")) / 2**20)
    statuses = dict(poll.execute("SELECT status, count(*) FROM recipient_states GROUP BY status").fetchall())
    poll.close()
    store.close()
    if statuses != {"sent": scenario.recipients}:
        phase.problems.append(f"recipient statuses {statuses}")
    phase.check_fake()
    noisy = [line for line in worker.log_path.read_text(errors="replace").splitlines()
             if " WARNING " in line or " ERROR " in line]
    if noisy:
        phase.problems.append(f"{len(noisy)} warnings/errors in {worker.log_path.name}, first: {noisy[0][:200]}")
    if profile is not None:
        print_profile(profile, scenario)
    return phase


# -- optional: the worker under cProfile (every delivery thread) ------------------------------------------
def profiled_worker(config: str, out: str, clock: str) -> int:
    """``openim-bizplugin worker`` with every thread it starts profiled (see
    ``_common.profile_threads``); merged stats go to *out* when it stops."""
    from openim_bizplugin.cli import run

    profiles = profile_threads(clock)
    code = run(["worker", "-c", config], sys.stdout, sys.stderr)
    dump_profiles(profiles, Path(out))
    print(f"profiled threads: {', '.join(name for name, _ in profiles)}", file=sys.stderr)
    return code


def print_profile(path: Path, scenario: Scenario, top: int = 15) -> None:
    import io
    import pstats

    if not path.exists():
        print(f"  (no profile written for {scenario.name})")
        return
    text = io.StringIO()
    pstats.Stats(str(path), stream=text).sort_stats("tottime").print_stats(top)
    lines = [line for line in text.getvalue().splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    print(f"\nprofile of {scenario.name} ({path}), top {top} by own time:")
    for line in lines[start - 1 if start else 0:]:
        print("  " + line[:160])


# -- reporting ---------------------------------------------------------------------------------------------
def print_context(args: argparse.Namespace, work: Path, fake: FakeOpenIMProcess) -> None:
    print("machine")
    for line in machine_lines(work, ("requests", "urllib3")):
        print("  " + line)
    import openim_bizplugin

    print(f"  package         openim_bizplugin {package_source(Path(openim_bizplugin.__file__).parent)}")
    print(f"  processes       fake OpenIM pid {fake.child.pid} (its own process: FakeOpenIM answers one call at "
          "a time under one lock, gzip on);\n"
          f"                  the direct loop (threads of this script), the sidecar worker and the fake all "
          "share these cpus")
    print(f"run: {args.workers} sending threads on both sides (delivery.workers), batch_size {args.batch_size}, "
          f"type {TYPE} v1 (persistent: reliabilityLevel 2; custom via \"mode\": \"custom\"),\n"
          f"     sidecar SQLite WAL synchronous=FULL, poll every {args.poll * 1000:g} ms; each scenario "
          f"runs {' '.join(args.sides * args.repeat)}")
    print()


def mean_rate(phases: list[Phase]) -> float:
    return sum(p.rate for p in phases) / len(phases)


def report(phases: list[Phase]) -> bool:
    """Print the tables; True when every compared scenario reaches the target ratio."""
    print(f"{'scenario':<14} {'mode':<12} {'messages x users':>16} {'side':<8} {'calls':>6} {'seconds':>8} "
          f"{'rcpt/s':>9} {'ratio':>6} {'target':>6} {'cpu ms/rcpt':>11} {'fake ms/rcpt':>12}")
    passed = True
    by_name: dict[str, dict[str, list[Phase]]] = defaultdict(lambda: defaultdict(list))
    for p in phases:
        by_name[p.scenario.name][p.side].append(p)
    for name, sides in by_name.items():
        rows = sides["direct"] + sides["sidecar"]
        for p in rows:
            ratio, verdict = "", ""
            if p is rows[-1] and sides["direct"] and sides["sidecar"]:
                value = mean_rate(sides["sidecar"]) / mean_rate(sides["direct"])
                ratio, verdict = f"{value:.2f}", "PASS" if value >= TARGET_RATIO else "FAIL"
                passed = passed and value >= TARGET_RATIO
            print(f"{name:<14} {p.scenario.mode:<12} {p.scenario.describe():>16} {p.side:<8} {p.calls:>6} "
                  f"{p.seconds:>8.2f} {p.rate:>9,.0f} {ratio:>6} {verdict:>6} {p.cpu_ms(p.client_cpu):>11.3f} "
                  f"{p.cpu_ms(p.fake_cpu):>12.3f}")
    print(f"(ratio = sidecar / direct recipients per second (means of the rounds), target >= {TARGET_RATIO:.2f};\n"
          " calls = HTTP calls the fake answered, the sidecar's include one /auth/get_admin_token;\n"
          " cpu ms/rcpt = CPU per recipient of the sending process: this script's direct loop, or the worker\n"
          " process after start-up; fake ms/rcpt = CPU per recipient of the fake OpenIM process)")
    startups = [p.startup for p in phases if p.side == "sidecar"]
    if startups:
        print(f"worker start-up (spawn to 'delivering with' line, not in the seconds above): "
              f"{min(startups):.2f}-{max(startups):.2f} s")
    print()
    print("payloads: mean request body bytes per OpenIM call, direct / sidecar")
    for name, sides in by_name.items():
        if sides["direct"] and sides["sidecar"]:
            direct, sidecar = sides["direct"][0], sides["sidecar"][0]
            endpoint = NOTIFY if direct.scenario.mode == "notification" else BATCH
            print(f"  {name:<14} {endpoint:<33} {direct.mean_bytes(endpoint):>9,.0f} / "
                  f"{sidecar.mean_bytes(endpoint):,.0f}")
    memory = [p for p in phases if p.side == "sidecar"]
    if memory:
        print()
        print("worker memory (resident set of `openim-bizplugin worker`)")
        print(f"  {'scenario':<14} {'mode':<12} {'queued':>9} {'after start-up':>15} {'peak (VmHWM)':>13} "
              f"{'growth':>8} {'db files':>9}")
        for p in sorted(memory, key=lambda p: (not p.scenario.memory, p.scenario.recipients)):
            print(f"  {p.scenario.name:<14} {p.scenario.mode:<12} {p.scenario.recipients:>9,} "
                  f"{p.rss_start_kb / 1024:>12.1f} MB {p.rss_peak_kb / 1024:>10.1f} MB "
                  f"{(p.rss_peak_kb - p.rss_start_kb) / 1024:>+5.1f} MB {p.db_mb:>6.1f} MB")
        peaks: dict[int, int] = {}
        for p in memory:
            if p.scenario.memory:
                peaks[p.scenario.recipients] = max(peaks.get(p.scenario.recipients, 0), p.rss_peak_kb)
        points = sorted(peaks.items())
        for (low, low_kb), (high, high_kb) in zip(points, points[1:]):
            print(f"  peak RSS {low:>7,} -> {high:>7,} queued: {low_kb / 1024:.1f} -> {high_kb / 1024:.1f} MB, "
                  f"{(high_kb - low_kb) * 1024 / (high - low):.0f} bytes per extra queued recipient")
    problems = [(p, problem) for p in phases for problem in p.problems]
    print()
    if problems:
        for p, problem in problems:
            print(f"PROBLEM {p.scenario.name} {p.side}: {problem}")
    else:
        print("checks: every phase delivered each recipient exactly once (fake OpenIM's count, no error answers); "
              "every sidecar recipient row ended 'sent'")
    return passed


def summary(path: str, args: argparse.Namespace, phases: list[Phase]) -> None:
    """The key figures as JSON for bench/run (--summary-json)."""
    figures = []
    by_name: dict[str, dict[str, list[Phase]]] = defaultdict(lambda: defaultdict(list))
    for p in phases:
        by_name[p.scenario.name][p.side].append(p)
    for name, sides in by_name.items():
        scenario = (sides["direct"] + sides["sidecar"])[0].scenario
        label = f"delivery {name}"
        if sides["direct"] and sides["sidecar"]:
            rate, base = mean_rate(sides["sidecar"]), mean_rate(sides["direct"])
            figures.append(figure(label, f"{scenario.mode} {scenario.describe()}: rcpt/s vs direct loop", rate,
                                  unit="rcpt/s", baseline=base, target=f">= {TARGET_RATIO:.2f}",
                                  passed=rate / base >= TARGET_RATIO))
        if scenario.messages == 1 and scenario.users == USERS and sides["sidecar"]:
            done = sides["sidecar"]
            figures.append(figure(label, f"fan-out 1 x {USERS:,} ({scenario.mode}) completes",
                                  max(p.seconds for p in done), unit="s", target="all sent once",
                                  passed=not any(p.problems for p in done)))
    peaks: dict[int, int] = {}
    for p in phases:
        if p.side == "sidecar" and p.scenario.memory:
            peaks[p.scenario.recipients] = max(peaks.get(p.scenario.recipients, 0), p.rss_peak_kb)
    points = sorted(peaks.items())
    for (low, low_kb), (high, high_kb) in zip(points, points[1:]):
        growth = (high_kb - low_kb) * 1024 / (high - low)
        final = high == points[-1][0] and low >= USERS
        figures.append(figure("delivery memory", f"worker peak RSS {low // 1000}k -> {high // 1000}k queued: "
                              f"growth per rcpt ({low_kb / 1024:.0f} -> {high_kb / 1024:.0f} MB)", growth,
                              unit="B/rcpt", target=f"< {RSS_GROWTH_TARGET} B/rcpt" if final else "",
                              passed=growth < RSS_GROWTH_TARGET if final else None))
    problems = [f"{p.scenario.name} {p.side}: {problem}" for p in phases for problem in p.problems]
    sizes = (f"{', '.join(f'{s.name} {s.describe()}' for s in args.scenarios)}; "
             f"{'/'.join(args.sides)} x{args.repeat}, {args.workers} workers")
    write_summary_with_checks(path, "delivery", sizes, figures, problems,
                              "each recipient sent exactly once, rows 'sent'")


# -- main ---------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=4, help="sending threads on both sides (default 4)")
    p.add_argument("--batch-size", type=int, default=500, help="delivery.batch_size (default 500)")
    p.add_argument("--only", help="comma-separated scenario names (default: all of "
                                  + ", ".join(s.name for s in SCENARIOS) + ")")
    p.add_argument("--sides", default="direct,sidecar", help="which sides to run (default direct,sidecar)")
    p.add_argument("--repeat", type=int, default=2,
                   help="run each scenario's direct + sidecar pair this many times, interleaved (default 2); "
                        "the ratio uses mean rates")
    p.add_argument("--poll", type=float, default=0.005,
                   help="seconds between completion checks (default 0.005: a custom-mode phase lasts ~0.25 s)")
    p.add_argument("--timeout", type=float, default=300, help="give up on one sidecar phase after this (default 300)")
    add_common_options(p, profile_help="profile every worker (all delivery threads) into DIR/<name>.prof",
                       folder_holds="configs, logs, databases", strict_when="a scenario misses the target ratio")
    p.add_argument("--fake-openim", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profiled-worker", nargs=3, metavar=("CONFIG", "OUT", "CLOCK"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = {s.name for s in SCENARIOS}
    args.scenarios = [s for s in SCENARIOS if not args.only or s.name in args.only.split(",")]
    if args.only and not set(args.only.split(",")) <= names:
        p.error(f"--only takes names from {', '.join(sorted(names))}")
    args.sides = args.sides.split(",")
    if not set(args.sides) <= {"direct", "sidecar"}:
        p.error("--sides takes direct and/or sidecar")
    if args.repeat < 1 or args.workers < 1 or not 1 <= args.batch_size <= 1000:
        p.error("--repeat and --workers must be positive, --batch-size 1..1000")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.fake_openim:
        return fake_openim(USERS)
    if args.profiled_worker:
        return profiled_worker(*args.profiled_worker)

    sys.stdout.reconfigure(line_buffering=True)
    work = Path(tempfile.mkdtemp(prefix="bench-delivery-"))
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    fake = FakeOpenIMProcess(Path(__file__).resolve(), work)
    phases: list[Phase] = []
    began = time.monotonic()
    try:
        print_context(args, work, fake)
        for scenario in args.scenarios:
            for _ in range(args.repeat):
                # the sidecar's messages are accepted first, so that its phase follows the direct one
                # within a second (the worker's start-up): a shared machine's drift then hits both alike
                prepared = prepare_sidecar(scenario, fake, args, work) if "sidecar" in args.sides else None
                for side in args.sides:
                    if side == "direct" and not scenario.direct:
                        continue
                    if side == "direct":
                        phase = run_direct(scenario, fake, args)
                    else:
                        assert prepared is not None
                        phase = run_sidecar(scenario, fake, args, prepared)
                    phases.append(phase)
                    print(f"  {scenario.name} {side}: {scenario.recipients:,} recipients in {phase.seconds:.2f} s = "
                          f"{phase.rate:,.0f}/s" + (f"  PROBLEM: {'; '.join(phase.problems)}" if phase.problems
                                                    else ""), file=sys.stderr)
        print()
        passed = report(phases)
        if args.summary_json:
            summary(args.summary_json, args, phases)
        print(f"\nwhole run {time.monotonic() - began:.0f} s; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")
    finally:
        tear_down(work, args.keep, [fake])
    if any(p.problems for p in phases):
        return 1
    return 1 if args.strict and not passed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
