"""Crash soak: repeated ``kill -9`` of sidecar servers under load; prints what was lost.

Two ``openim-bizplugin serve`` processes share one SQLite file (WAL,
synchronous=FULL, BEGIN IMMEDIATE) and deliver to a fake OpenIM running in
this process. Load generator threads post signed messages to both. Every
cycle one server is killed with SIGKILL at a random moment and restarted.
At the end a server drains everything, and the figures compare what was
answered 202 with what the file holds and with what OpenIM received:

- accepted-but-lost: 202 answers whose message is not in the file (must be 0)
- undelivered: stored recipients that never reached OpenIM (must be 0)
- duplicates per 1,000 deliveries, by mode (notification calls in flight at
  a kill may repeat: OpenIM gives no check for them; custom send_msg is
  checked with check_msg_is_send_success before a re-send)
- "database is locked" lines in any server's log (must be 0)

    python bench/soak_crash.py [--cycles 200] [--senders 4]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import catalogue_without_rate_limits, console_script, write_sidecar_config  # noqa: E402

from openim_bizplugin.signing import signature_headers  # noqa: E402
from openim_bizplugin.testing import FakeOpenIM  # noqa: E402

SECRET = "soak-client-secret-0123456789"
USERS = [f"u{i}" for i in range(5000)]  # enough that no type's per-user rate limit is reached


def write_config(folder: Path, openim_url: str) -> Path:
    # the shipped catalogue without per-recipient rate limits: delayed sends would
    # keep the drain waiting for the next window instead of measuring crashes
    catalogue = catalogue_without_rate_limits(folder)
    return write_sidecar_config(folder / "soak.toml", api_url=openim_url, openim_secret="openIM123", admin="imAdmin",
                                callback_token="soak-callback-token-0123456789",
                                storage_url=f"sqlite:///{folder / 'soak.db'}", workers=2, client="soak",
                                client_secret=SECRET, schemas=catalogue,
                                extra={"openim": {"timeout_seconds": 1},
                                       "delivery": {"lease_seconds": 2, "backoff_base_seconds": 0.05,
                                                    "backoff_max_seconds": 0.5, "max_attempts": 50}})


class Server:
    """One ``serve`` process; restartable, killable."""

    def __init__(self, name: str, config: Path, logs: Path) -> None:
        self.name, self.config, self.logs = name, config, logs
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.generation = itertools.count()

    def start(self) -> None:
        log = (self.logs / f"{self.name}-{next(self.generation)}.log").open("wb")
        self.proc = subprocess.Popen([console_script(), "serve", "-c", str(self.config)],
                                     stdout=subprocess.PIPE, stderr=log, text=True,
                                     start_new_session=True)  # kill() takes all of its processes
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            raise SystemExit(f"{self.name} did not start: {line!r}")
        self.url = line.split()[-1]

    def kill(self) -> None:
        if self.proc:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Load:
    """Sender threads posting messages to whichever server answers."""

    def __init__(self, servers: list[Server], senders: int) -> None:
        self.servers, self.accepted, self.errors = servers, [], Counter()
        self.pause = 0.02
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(n,), daemon=True) for n in range(senders)]

    def run(self, n: int) -> None:
        session, counter = requests.Session(), itertools.count()
        rng = random.Random(n)
        while not self.stop.is_set():
            i = next(counter)
            custom = rng.random() < 0.5
            body = {"type": "action.required" if custom else "order.status_changed", "version": 1,
                    "data": {"action": "verify_identity", "title": f"t{n}-{i}", "body": "b",
                             "deep_link": "app://x"} if custom else
                    {"order_id": f"SO-{n}-{i}", "status": "paid", "updated_at": "2026-11-26T12:00:00Z"},
                    "to": {"users": rng.sample(USERS, rng.choice((1, 1, 3)))}}
            raw = json.dumps(body).encode()
            server = self.servers[rng.randrange(len(self.servers))]
            headers = signature_headers("soak", SECRET, "POST", "/v1/messages", raw)
            headers["Content-Type"] = "application/json"
            try:
                answer = session.post(server.url + "/v1/messages", data=raw, headers=headers, timeout=5)
            except requests.RequestException:
                self.errors["connection"] += 1  # the server was killed: never answered, so not accepted
                time.sleep(0.02)
                continue
            with self.lock:
                if answer.status_code == 202:
                    self.accepted.append(answer.json()["id"])
                else:
                    self.errors[answer.status_code] += 1
            time.sleep(self.pause)  # a steady load, not a flood: this measures crashes, not throughput


def envelope_id(delivery) -> str:
    text = delivery.data if delivery.content_type == 2001 else delivery.content["data"]
    return json.loads(text)["id"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--senders", type=int, default=4)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bizplugin-soak-"))
    started = time.monotonic()
    with FakeOpenIM(users=USERS + ["imAdmin"], online=USERS) as fake:
        config = write_config(folder, fake.url)
        servers = [Server("a", config, folder), Server("b", config, folder)]
        try:
            for server in servers:
                server.start()
            load = Load(servers, args.senders)
            for thread in load.threads:
                thread.start()
            rng = random.Random(42)
            for cycle in range(args.cycles):
                time.sleep(rng.uniform(0.1, 0.6))
                victim = servers[cycle % 2]
                victim.kill()
                victim.start()
            load.stop.set()
            for thread in load.threads:
                thread.join(10)
            drain_started = time.monotonic()
            drained = drain(folder / "soak.db")
            print(f"drained in {time.monotonic() - drain_started:.0f} s", flush=True)
        finally:  # never leave servers behind, whatever happened
            for server in servers:
                server.kill()
        report(args, folder, load, fake, drained, time.monotonic() - started)
    return 0


def drain(db: Path, seconds: float = 900) -> bool:
    from openim_bizplugin.store.sqlite import SqliteStore

    deadline = time.monotonic() + seconds
    store = SqliteStore(db)
    try:
        while time.monotonic() < deadline:
            if store.next_due_ms() is None:  # nothing queued, held or being sent
                return True
            time.sleep(0.2)
        return False
    finally:
        store.close()


def report(args, folder: Path, load: Load, fake, drained: bool, seconds: float) -> None:
    with sqlite3.connect(folder / "soak.db", timeout=30) as conn:
        stored = {row[0] for row in conn.execute("SELECT id FROM messages")}
        rows = conn.execute("SELECT r.message_id, r.target, r.status, m.mode FROM recipient_states r"
                            " JOIN messages m ON m.id = r.message_id").fetchall()
    accepted = set(load.accepted)
    lost = accepted - stored
    delivered = Counter((envelope_id(d), d.recv_id) for d in fake.delivered)
    mode_of = {(mid, target): mode for mid, target, _status, mode in rows}
    undelivered = [key for key in mode_of if key[0] in accepted and delivered[key] == 0]
    dupes = Counter(mode_of.get(key, "?") for key, n in delivered.items() for _ in range(n - 1))
    by_mode = Counter(mode_of.get(key, "?") for key in delivered)
    locked = sum(path.read_text(errors="replace").count("database is locked") for path in folder.glob("*.log"))
    print(f"crash soak: {args.cycles} kill -9 cycles in {seconds:.0f} s, two servers on one SQLite file, "
          f"{args.senders} senders; everything drained afterwards: {drained}")
    print(f"  202 answers                 {len(accepted):>8}")
    print(f"  stored messages             {len(stored):>8}   (answers without a 202: {dict(load.errors)})")
    print(f"  accepted-but-lost           {len(lost):>8}   (must be 0)")
    print(f"  recipients delivered        {len(delivered):>8} of {len(mode_of)}; undelivered: {len(undelivered)}")
    for mode in ("notification", "custom"):
        total = by_mode[mode] or 1
        print(f"  duplicates, {mode:<13}   {dupes[mode]:>8}   ({1000 * dupes[mode] / total:.2f} per 1,000)")
    print(f"  'database is locked' lines  {locked:>8}   (must be 0)")
    print(f"  logs and database in {folder}")


if __name__ == "__main__":
    sys.exit(main())
