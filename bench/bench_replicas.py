#!/usr/bin/env python3
"""Scale-out on Redis: delivery throughput with 1, 2 and 4 replicas, SQLite beside it; high-priority latency.

Requirement (issue 5): delivered recipients per second with 1, 2 and 4
replicas on Redis against the fake OpenIM, and SQLite single process, in one
run; high-priority latency under a 10,000-recipient backlog.

    python bench/bench_replicas.py                         # ~4 min on 2 CPUs
    python bench/bench_replicas.py --notify 20000 --custom 100000        # the issue's sizes: ~7 min on 2 CPUs
    python bench/bench_replicas.py --only latency --call-delay 0.1       # one part, a slower OpenIM

The fake OpenIM (:class:`openim_bizplugin.testing.FakeOpenIM`, 10,000
registered users) runs in its own process, started as this script with
``--fake-openim``; it counts calls, error answers and accepted messages
(dropping its call log so its memory stays flat), can hold every message
call for ``delay`` seconds (outside its lock, so calls overlap as they would
on a real OpenIM), and notes when the high-priority test user receives a
message and how many messages it had accepted before. Redis is a
``redis-server`` of this run's own (AOF ``appendfsync always`` by default:
the same promise as SQLite's ``synchronous=FULL``).

Throughput, per store (SQLite with one process; Redis with 1, 2, 4 replicas)
and per workload (``--notify`` recipients in notification mode, as messages
of 50 users: one OpenIM call each; ``--custom`` recipients in custom mode, as
messages of 10,000 users: one ``batch_send_msg`` per ``--batch-size``):

1. a fresh store (a new SQLite file; the Redis database flushed) is filled
   through the real API (``openim-bizplugin serve`` with
   ``delivery.workers = 0``), and that server is stopped;
2. N ``openim-bizplugin worker`` processes (``--workers`` threads each) are
   started together on the store;
3. the clock runs from the moment the *last* of them prints ``delivering
   with`` (the others may have begun already: what they have finished by
   then is not counted) until no recipient has work left (Redis: ``ZCARD
   due``, one O(1) call every ``--poll`` s; SQLite: the store's ``next_due_ms``);
   rate = recipients with work left at the start / seconds.

Afterwards the fake must have accepted every recipient exactly once with no
error answer, and every recipient must read ``sent`` in the store; otherwise a
``PROBLEM`` line and exit code 1. CPU per recipient of the workers (summed),
of ``redis-server`` and of the fake are shown: on a machine with few CPUs
they say more than the rate.

High-priority latency, per store and replica count: the fake holds every
message call ``--call-delay`` s; N ``serve`` replicas (``--workers`` threads
each) get a backlog of ``--backlog`` normal recipients (one notification-mode
message); once OpenIM has taken 100 of them (every worker is holding a lease
of ``--batch-size``), ``--highs`` times one ``"priority": "high"`` message to
one user is posted (through the replicas in turn) and timed from just before
the POST until the fake accepted it; "sends between" is how many backlog
messages the fake accepted in that time. The run ends there: the rest of the
backlog is given back on SIGTERM.

This prints figures; it is not a test and exits 0 unless the run itself broke.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (Child, FakeOpenIMProcess, RedisProcess, add_common_options, console_script,  # noqa: E402
                     cpu_seconds, figure, machine_lines, package_source, tear_down, usable_cpus,
                     write_summary_with_checks)
from bench_delivery import (ADMIN, BATCH, CLIENT_ID, DELIVERING, FAKE_SECRET, LISTENING, NOTIFY, PATH,  # noqa: E402
                            SECRET, TYPE, USERS, user_id, write_config)

SEND_MSG = "/msg/send_msg"
HIGH_USER = "vip00000"       # receives the high-priority messages, nothing else
NOTIFY_USERS = 50            # users per notification-mode message
CUSTOM_USERS = USERS         # users per custom-mode message (10,000: batches of --batch-size)
WARM_DELIVERED = 100         # backlog messages OpenIM takes before the first high message is posted
REDIS_DB = 0


# -- the fake OpenIM, in its own process ---------------------------------------------------------
def fake_openim(users: int) -> int:
    """Serve a counting FakeOpenIM; commands on stdin, one JSON line back for each:

    ``stats`` (what it answered since the last ``stats``, then counting afresh), ``delay S`` (hold
    every message call S seconds), ``count`` (messages accepted since the last ``stats``),
    ``marks`` (the high user's deliveries: time and messages accepted before it; then forgotten).
    """
    from openim_bizplugin.testing import FakeOpenIM

    class BenchFake(FakeOpenIM):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.delay = 0.0
            self.marks: list[dict] = []
            self.reset()

        def reset(self) -> dict:
            previous = getattr(self, "tally", None)
            self.tally = {"calls": Counter(), "errors": Counter(), "delivered": 0}
            self.seen: set[int] = set()
            return previous

        def _respond(self, method, path, headers, raw):  # type: ignore[no-untyped-def]
            if self.delay and path in (NOTIFY, BATCH, SEND_MSG):
                time.sleep(self.delay)  # outside the fake's lock: slow calls overlap, as on a real OpenIM
            return super()._respond(method, path, headers, raw)

        def _handle(self, method, path, operation_id, token, raw):  # type: ignore[no-untyped-def]
            answer = super()._handle(method, path, operation_id, token, raw)  # called under self._lock
            status, body, _ = answer
            self.tally["calls"][path] += 1
            if status != 200 or not body.startswith(b'{"errCode":0,'):
                self.tally["errors"][path] += 1
            for d in self.delivered:
                if d.recv_id == HIGH_USER:
                    self.marks.append({"at": time.time(), "before": self.tally["delivered"]})
                else:
                    envelope = d.data if d.data is not None else d.content.get("data")
                    self.seen.add(hash((d.recv_id, d.group_id, envelope)))
                    self.tally["delivered"] += 1
            self.delivered.clear()
            self.calls.clear()
            return answer

    everyone = [user_id(n) for n in range(users)] + [HIGH_USER]  # online: notifications to offline apps are held
    fake = BenchFake(secret=FAKE_SECRET, admin_user_ids=(ADMIN,), users=everyone, online=everyone)
    fake.start()
    print(f"{LISTENING}{fake.host}:{fake.port}", flush=True)
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        with fake._lock:
            if command == "stats":
                unique = len(fake.seen)
                answer: Any = {**fake.reset(), "unique": unique}
            elif command == "delay":
                fake.delay = float(argument)
                answer = {"delay": fake.delay}
            elif command == "count":
                answer = {"delivered": fake.tally["delivered"]}
            elif command == "marks":
                answer, fake.marks = fake.marks, []
            else:
                answer = {"error": f"unknown command {command!r}"}
        print(json.dumps(answer), flush=True)
    fake.stop()
    return 0


# -- stores ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where the sidecar keeps its work, and how many processes share it."""

    store: str      # "sqlite" | "redis"
    replicas: int

    @property
    def label(self) -> str:
        return f"{'SQLite' if self.store == 'sqlite' else 'Redis'} x{self.replicas}"


class Backend:
    """One fresh store per phase, and the benchmark's own view of it (not through the sidecar)."""

    def __init__(self, target: Target, directory: Path, redis: RedisProcess | None) -> None:
        self.target, self.directory, self.redis = target, directory, redis
        if target.store == "sqlite":
            self.url = f"sqlite:///{(directory / 'bizplugin.db').as_posix()}"
        else:
            import redis as redis_client

            self.url = redis.url(REDIS_DB)
            self.client = redis_client.Redis.from_url(self.url)
            self.client.flushdb()

    def left(self) -> int:
        """Recipients with work left (queued, held, leased)."""
        if self.target.store == "redis":
            return int(self.client.zcard("bizplugin:due"))
        return sum(self._sqlite().queue_depth().values())

    def any_left(self) -> bool:
        if self.target.store == "redis":
            return self.left() > 0
        return self._sqlite().next_due_ms() is not None

    def _sqlite(self):  # type: ignore[no-untyped-def]
        """The SQLite file through the package's store (which knows where work waits), opened once."""
        if not hasattr(self, "_store"):
            from openim_bizplugin.store.sqlite import SqliteStore

            self._store = SqliteStore(self.directory / "bizplugin.db")
        return self._store

    def statuses(self, message_ids: list[str]) -> Counter[str]:
        """Every recipient's status, read through the package's own store class."""
        from openim_bizplugin.config import StorageConfig
        from openim_bizplugin.store import open_store

        path = self.directory / "bizplugin.db" if self.target.store == "sqlite" else None
        store = open_store(StorageConfig(self.url, path))
        try:
            found: Counter[str] = Counter()
            for message_id in message_ids:
                record = store.get_message(message_id)
                found.update(r.status for r in record.recipients) if record else found.update(["missing"])
            return found
        finally:
            store.close()

    def close(self) -> None:
        if hasattr(self, "_store"):
            self._store.close()
        if self.target.store == "redis":
            self.client.close()


def post(session: requests.Session, base_url: str, users: list[str], mode: str, n: int,
         priority: str | None = None) -> str:
    """One signed POST /v1/messages; returns the message id."""
    from openim_bizplugin.signing import signature_headers

    message = {"type": TYPE, "version": 1, "to": {"users": users}, "mode": mode,
               "data": {"order_id": f"SO-{mode}-{n:06d}", "status": "shipped", "previous_status": "paid",
                        "amount": {"value": "129.90", "currency": "EUR"}, "updated_at": "2026-11-26T12:00:00Z"}}
    if priority:
        message["priority"] = priority
    body = json.dumps(message, separators=(",", ":")).encode()
    headers = signature_headers(CLIENT_ID, SECRET, "POST", PATH, body)
    headers["Content-Type"] = "application/json"
    resp = session.post(base_url + PATH, data=body, headers=headers, timeout=120)
    if resp.status_code != 202 or resp.json().get("recipients") != len(users):
        raise SystemExit(f"intake refused message {n}: {resp.status_code} {resp.text[:300]}")
    return resp.json()["id"]


def start_all(name: str, argv: list[list[str]], prefix: str, directory: Path) -> list[Child]:
    """Start every command at once; each is waited for until it announces itself."""
    with ThreadPoolExecutor(len(argv)) as pool:
        futures = [pool.submit(Child.start, f"{name} {n}", args, prefix, directory / f"{name}-{n}.log")
                   for n, args in enumerate(argv)]
    return [future.result() for future in futures]


def stop_all(children: list[Child]) -> None:
    with ThreadPoolExecutor(max(len(children), 1)) as pool:
        list(pool.map(lambda child: child.stop(signal.SIGTERM), children))


# -- throughput ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    name: str
    mode: str
    recipients: int
    users_per_message: int

    def messages(self) -> list[list[str]]:
        """The users of each message: consecutive ids from the fake's 10,000, wrapping round."""
        count = -(-self.recipients // self.users_per_message)
        return [[user_id((k * self.users_per_message + j) % USERS)
                 for j in range(min(self.users_per_message, self.recipients - k * self.users_per_message))]
                for k in range(count)]


@dataclass
class Run:
    target: Target
    workload: Workload
    counted: int = 0              # recipients with work left when the last replica had started
    seconds: float = float("nan")
    startup_spread: float = 0.0   # first to last replica's "delivering with" line
    worker_cpu: float = 0.0
    redis_cpu: float = 0.0
    fake_cpu: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.counted / self.seconds if self.seconds else float("nan")

    def cpu_ms(self, seconds: float) -> float:
        return seconds / self.counted * 1000 if self.counted else float("nan")


def run_throughput(target: Target, workload: Workload, fake: FakeOpenIMProcess, redis: RedisProcess | None,
                   args: argparse.Namespace, work: Path) -> Run:
    directory = work / f"{target.store}-{target.replicas}-{workload.name}"
    directory.mkdir()
    backend = Backend(target, directory, redis)
    run = Run(target, workload)
    try:
        ids = load(backend, workload, fake, directory, args)
        config = write_config(directory / "worker.toml", backend.url, fake.url, args.workers, args.batch_size)
        fake.ask("stats")
        fake_cpu, redis_cpu = fake.cpu(), cpu_seconds(redis.pid) if redis else 0.0
        workers = start_all("worker", [[console_script(), "worker", "-c", str(config)]] * target.replicas,
                            DELIVERING, directory)
        try:
            began = max(w.announced for w in workers)
            run.startup_spread = began - min(w.announced for w in workers)
            run.counted = backend.left()
            cpu = sum(cpu_seconds(w.pid) for w in workers)
            deadline = began + args.timeout
            while backend.any_left():
                dead = [w for w in workers if w.proc.poll() is not None]
                if dead:
                    raise SystemExit(f"a worker exited ({dead[0].proc.returncode}); see {dead[0].log_path}")
                if time.monotonic() > deadline:
                    run.problems.append(f"not done after {args.timeout:g} s")
                    break
                time.sleep(args.poll)
            run.seconds = time.monotonic() - began
            run.worker_cpu = sum(cpu_seconds(w.pid) for w in workers) - cpu
            run.redis_cpu = cpu_seconds(redis.pid) - redis_cpu if redis else 0.0
            run.fake_cpu = fake.cpu() - fake_cpu
        finally:
            stop_all(workers)
        check(run, fake.ask("stats"), backend.statuses(ids), workers)
    finally:
        backend.close()
    return run


def load(backend: Backend, workload: Workload, fake: FakeOpenIMProcess, directory: Path, args: argparse.Namespace) -> list[str]:
    """Accept the workload through the real API with no delivery workers running; the message ids."""
    config = write_config(directory / "serve.toml", backend.url, fake.url, 0, args.batch_size)
    server = Child.start("sidecar (intake)", [console_script(), "serve", "-c", str(config)], LISTENING,
                         directory / "serve.log")
    try:
        with requests.Session() as session:
            return [post(session, f"http://{server.line}", users, workload.mode, n)
                    for n, users in enumerate(workload.messages())]
    finally:
        server.stop(signal.SIGTERM)


def check(run: Run, tally: dict, statuses: Counter[str], workers: list[Child]) -> None:
    want = run.workload.recipients
    errors = sum(tally["errors"].values())
    if tally["delivered"] != want or tally["unique"] != want or errors:
        run.problems.append(f"fake OpenIM accepted {tally['delivered']} messages ({tally['unique']} distinct) "
                            f"for {want} recipients, {errors} error answers")
    if statuses != {"sent": want}:
        run.problems.append(f"recipient statuses {dict(statuses)}")
    for worker in workers:
        noisy = [line for line in worker.log_path.read_text(errors="replace").splitlines()
                 if " WARNING " in line or " ERROR " in line]
        noisy = [line for line in noisy if "redis durability" not in line]  # appendfsync everysec/no is a choice
        if noisy:
            run.problems.append(f"{len(noisy)} warnings/errors in {worker.log_path.name}, first: {noisy[0][:200]}")


# -- high-priority latency ------------------------------------------------------------------------------------
@dataclass
class Latency:
    target: Target
    seconds: list[float] = field(default_factory=list)   # POST -> accepted by OpenIM, per high message
    between: list[int] = field(default_factory=list)     # backlog messages OpenIM accepted meanwhile
    intake: list[float] = field(default_factory=list)    # POST -> 202 (part of the seconds above)
    problems: list[str] = field(default_factory=list)


def run_latency(target: Target, fake: FakeOpenIMProcess, redis: RedisProcess | None, args: argparse.Namespace,
                work: Path) -> Latency:
    directory = work / f"{target.store}-{target.replicas}-latency"
    directory.mkdir()
    backend = Backend(target, directory, redis)
    result = Latency(target)
    config = write_config(directory / "serve.toml", backend.url, fake.url, args.workers, args.batch_size)
    fake.ask("stats")
    fake.ask("marks")
    fake.ask(f"delay {args.call_delay}")
    replicas = start_all("serve", [[console_script(), "serve", "-c", str(config)]] * target.replicas,
                         LISTENING, directory)
    try:
        with requests.Session() as session:
            urls = [f"http://{r.line}" for r in replicas]
            post(session, urls[0], [user_id(n % USERS) for n in range(args.backlog)], "notification", 0)
            wait(lambda: fake.ask("count")["delivered"] >= WARM_DELIVERED, args.timeout,
                 f"OpenIM took {WARM_DELIVERED} backlog messages")
            for k in range(args.highs):
                before = fake.ask("count")["delivered"]
                posted = time.time()  # the fake notes deliveries by the same clock
                post(session, urls[k % len(urls)], [HIGH_USER], "notification", k + 1, priority="high")
                result.intake.append(time.time() - posted)
                marks: list[dict] = []
                wait(lambda: bool(marks.extend(fake.ask("marks")) or marks), args.timeout,
                     f"high message {k + 1} reaches OpenIM")
                result.seconds.append(marks[0]["at"] - posted)
                result.between.append(marks[0]["before"] - before)
                if backend.left() < args.backlog // 2:
                    result.problems.append("the backlog was half gone: use a larger --backlog or --call-delay")
                time.sleep(0.2)
    finally:
        stop_all(replicas)
        fake.ask("delay 0")
        fake.ask("stats")
        backend.close()
    return result


def wait(check_done, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check_done():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting: {what} (after {timeout:g} s)")
        time.sleep(0.005)  # polling the fake over a pipe; 5 ms is the resolution of the figures


# -- reporting ----------------------------------------------------------------------------------------------
def print_context(args: argparse.Namespace, work: Path, fake: FakeOpenIMProcess, redis: RedisProcess | None) -> None:
    print("machine")
    for line in machine_lines(work, ("requests", "redis")):
        print("  " + line)
    import openim_bizplugin

    print(f"  package         openim_bizplugin {package_source(Path(openim_bizplugin.__file__).parent)}")
    if redis:
        print(f"  redis-server    {redis.version()}, AOF appendfsync {redis.fsync} (pid {redis.pid})")
    print(f"  processes       fake OpenIM pid {fake.child.pid} (one call at a time under one lock, gzip on); "
          f"workers, redis-server and the fake\n                  share {usable_cpus()} cpus")
    print(f"run: {args.workers} delivery threads per process, batch_size {args.batch_size}, type {TYPE} v1; "
          f"rates count from the last replica's start to no work left")
    print()


def report(runs: list[Run], latencies: list[Latency], targets: list[Target], args: argparse.Namespace) -> None:
    cols = [t.label for t in targets]
    width = max(11, *(len(c) for c in cols))
    rows: list[tuple[str, dict[Target, str]]] = []
    for name in dict.fromkeys(r.workload.name for r in runs):
        mine = {r.target: r for r in runs if r.workload.name == name}
        base = mine.get(Target("redis", 1))
        label = f"{name} ({next(iter(mine.values())).workload.recipients:,})"
        rows.append((f"{label} rcpt/s", {t: f"{r.rate:,.0f}" for t, r in mine.items()}))
        if base:
            rows.append(("  vs Redis x1", {t: f"{r.rate / base.rate:.2f}x" for t, r in mine.items()}))
        rows.append(("  seconds", {t: f"{r.seconds:.1f}" for t, r in mine.items()}))
        rows.append(("  workers cpu ms/rcpt", {t: f"{r.cpu_ms(r.worker_cpu):.3f}" for t, r in mine.items()}))
        rows.append(("  redis cpu ms/rcpt", {t: f"{r.cpu_ms(r.redis_cpu):.3f}" for t, r in mine.items()
                                             if t.store == "redis"}))
        rows.append(("  fake cpu ms/rcpt", {t: f"{r.cpu_ms(r.fake_cpu):.3f}" for t, r in mine.items()}))
        rows.append(("  start spread s", {t: f"{r.startup_spread:.2f}" for t, r in mine.items() if t.replicas > 1}))
    if latencies:
        label = f"high under {args.backlog:,} backlog"
        by = {lat.target: lat for lat in latencies if lat.seconds}
        rows.append((f"{label}: p50 ms", {t: f"{statistics.median(x.seconds) * 1000:.0f}" for t, x in by.items()}))
        rows.append(("  max ms", {t: f"{max(x.seconds) * 1000:.0f}" for t, x in by.items()}))
        rows.append(("  of which POST -> 202 p50 ms", {t: f"{statistics.median(x.intake) * 1000:.0f}"
                                                       for t, x in by.items()}))
        rows.append(("  in call delays (p50)", {t: f"{statistics.median(x.seconds) / args.call_delay:.1f}"
                                                for t, x in by.items()}))
        rows.append(("  sends between p50", {t: f"{statistics.median(x.between):.0f}" for t, x in by.items()}))
        rows.append(("  sends between max", {t: f"{max(x.between)}" for t, x in by.items()}))
    first = max(len(label) for label, _ in rows)
    print(f"{'':<{first}}  " + "  ".join(f"{c:>{width}}" for c in cols))
    for label, values in rows:
        print(f"{label:<{first}}  " + "  ".join(f"{values.get(t, ''):>{width}}" for t in targets))
    print(f"(notification: messages of {NOTIFY_USERS} users, one send_business_notification per recipient; custom: "
          f"messages of {CUSTOM_USERS:,} users,\n one batch_send_msg per {args.batch_size}; each replica runs "
          f"{args.workers} delivery threads; high: one message to one user with \"priority\": \"high\",\n"
          f" timed from just before its POST until OpenIM took it, {args.highs} times, against a fake holding every "
          f"message call {args.call_delay * 1000:g} ms)")


def summary(path: str, runs: list[Run], latencies: list[Latency], problems: list[tuple[str, str]],
            args: argparse.Namespace) -> None:
    """The key figures as JSON for bench/run (--summary-json): rates against Redis x1, latency in call delays
    (the baseline is one call delay of the fake)."""
    figures = []
    for run in runs:
        base = next((r for r in runs if r.workload == run.workload and r.target == Target("redis", 1)), None)
        figures.append(figure("replicas", f"{run.workload.name} {run.workload.recipients:,}: rcpt/s, {run.target.label}", run.rate, unit="rcpt/s",
                              baseline=base.rate if base else None))
    delay_ms = args.call_delay * 1000
    for lat in latencies:
        if not lat.seconds:
            continue
        p50 = statistics.median(lat.seconds) * 1000
        # A high message that waited behind the queue would see most of the backlog sent first.
        overtook = max(lat.between) < args.backlog // 10
        figures.append(figure("replicas", f"high p50 under {args.backlog:,} backlog, {lat.target.label} "
                              f"(max {max(lat.between)} sent between)", p50, unit="ms",
                              baseline=delay_ms, target="overtakes backlog", passed=overtook))
    sizes = (f"notification {args.notify:,}, custom {args.custom:,}, replicas {args.replicas}"
             f"{'' if args.no_sqlite else ' + SQLite x1'}, backlog {args.backlog:,}, {args.highs} highs, "
             f"call delay {delay_ms:g} ms")
    write_summary_with_checks(path, "replicas", sizes, figures,
                              [f"{where}: {problem}" for where, problem in problems],
                              "each recipient sent exactly once, all 'sent'")


# -- main -----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--notify", type=int, default=10_000, help="recipients in notification mode (default 10,000)")
    p.add_argument("--custom", type=int, default=50_000, help="recipients in custom mode (default 50,000)")
    p.add_argument("--replicas", default="1,2,4", help="Redis replica counts (default 1,2,4)")
    p.add_argument("--no-sqlite", action="store_true", help="leave out the SQLite single process")
    p.add_argument("--workers", type=int, default=4, help="delivery threads per process (default 4)")
    p.add_argument("--batch-size", type=int, default=500, help="delivery.batch_size (default 500)")
    p.add_argument("--backlog", type=int, default=10_000, help="normal recipients queued ahead (default 10,000)")
    p.add_argument("--call-delay", type=float, default=0.05,
                   help="seconds the fake holds each message call in the latency test (default 0.05)")
    p.add_argument("--highs", type=int, default=5, help="high messages timed per store (default 5)")
    p.add_argument("--only", choices=("throughput", "latency"), help="run one part only")
    p.add_argument("--redis-fsync", choices=("always", "everysec", "no"), default="always",
                   help="redis-server's AOF appendfsync (no = no AOF); default always, like SQLite's FULL")
    p.add_argument("--poll", type=float, default=0.02, help="seconds between completion checks (default 0.02)")
    p.add_argument("--timeout", type=float, default=300, help="give up on one phase after this (default 300)")
    add_common_options(p, folder_holds="configs, logs, databases")
    p.add_argument("--fake-openim", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.replica_counts = [int(n) for n in args.replicas.split(",") if n]
    if not args.replica_counts or min(args.replica_counts) < 1 or args.workers < 1 or args.highs < 1:
        p.error("--replicas, --workers and --highs must be positive")
    if args.backlog > USERS:
        p.error(f"--backlog is one message: at most {USERS:,} users")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.fake_openim:
        return fake_openim(USERS)
    sys.stdout.reconfigure(line_buffering=True)
    work = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    targets = ([] if args.no_sqlite else [Target("sqlite", 1)]) + [Target("redis", n) for n in args.replica_counts]
    workloads = [w for w in (Workload("notification", "notification", args.notify, NOTIFY_USERS),
                             Workload("custom", "custom", args.custom, CUSTOM_USERS)) if w.recipients > 0]
    fake = FakeOpenIMProcess(Path(__file__).resolve(), work)
    redis = RedisProcess(work, args.redis_fsync)
    runs: list[Run] = []
    latencies: list[Latency] = []
    problems: list[tuple[str, str]] = []
    began = time.monotonic()
    try:
        print_context(args, work, fake, redis)
        if args.only in (None, "throughput"):
            for workload in workloads:
                for target in targets:
                    run = run_throughput(target, workload, fake, redis, args, work)
                    runs.append(run)
                    print(f"  {workload.name} {target.label}: {run.counted:,} recipients in {run.seconds:.2f} s = "
                          f"{run.rate:,.0f}/s" + (f"  PROBLEM: {'; '.join(run.problems)}" if run.problems else ""),
                          file=sys.stderr)
        if args.only in (None, "latency"):
            for target in targets:
                latency = run_latency(target, fake, redis, args, work)
                latencies.append(latency)
                print(f"  latency {target.label}: " + ", ".join(f"{s * 1000:.0f} ms" for s in latency.seconds)
                      + f"; between {latency.between}", file=sys.stderr)
        print()
        report(runs, latencies, targets, args)
        problems = [(r.target.label + " " + r.workload.name, p) for r in runs for p in r.problems]
        problems += [(lat.target.label + " latency", p) for lat in latencies for p in lat.problems]
        print()
        for where, problem in problems:
            print(f"PROBLEM {where}: {problem}")
        if args.summary_json:
            summary(args.summary_json, runs, latencies, problems, args)
        if runs and not problems:
            print("checks: every throughput run delivered each recipient exactly once (the fake's count, no error "
                  "answers) and every recipient ended 'sent' in the store")
        print(f"\nwhole run {time.monotonic() - began:.0f} s; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")
    finally:
        tear_down(work, args.keep, [fake, redis])
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
