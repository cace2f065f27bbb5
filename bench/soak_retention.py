"""Retention soak: sustained load with one-minute retention; prints the files' sizes over time.

One ``openim-bizplugin serve`` process on SQLite delivers to a fake OpenIM run in
this process, with ``[retention] finished_seconds = dead_letter_seconds = 60``,
``sweep_seconds = 10`` and ``callbacks.retention_seconds = 60``. Sender threads
post messages (notifications to one user, custom fan-outs to 3 and to 50 users,
a tenth to unknown users: dead letters) and OpenIM's callbacks about them
(after-send, saved-to-DB with a seq, reads, presence reports, and every tenth a
callback padded to 60 KB, as the issue's inbox WAL measured). Every 30 s a line
gives the sizes of the main file, the callback inbox and their WAL files, the
rows kept, and the server's resident memory. With retention at work the sizes
are flat once the first minute's messages start to go (warm-up).

    python bench/soak_retention.py [--minutes 11] [--rate 8] [--keep]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
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
from _common import catalogue_without_rate_limits, console_script, memory_kb  # noqa: E402

from openim_bizplugin.signing import signature_headers  # noqa: E402
from openim_bizplugin.testing import FakeOpenIM  # noqa: E402

SECRET = "soak-client-secret-0123456789"
TOKEN = "soak-callback-token-0123456789"
USERS = [f"u{i}" for i in range(2000)]
PAD = "x" * 60_000


def write_config(folder: Path, openim_url: str) -> Path:
    # the shipped catalogue without rate limits: a rate-limited type's messages stay one period
    # of their limit (an hour and more) past their finish, longer than this soak
    catalogue = catalogue_without_rate_limits(folder)
    path = folder / "soak.toml"
    path.write_text(f"""
[server]
host = "127.0.0.1"
port = 0
idempotency_retention_seconds = 60  # no longer than the retention below
[openim]
api_url = "{openim_url}"
secret = "openIM123"
admin_user_id = "imAdmin"
sender_id = "imAdmin"
timeout_seconds = 2
[callbacks]
token = "{TOKEN}"
retention_seconds = 60
[storage]
url = "sqlite:///{folder / 'soak.db'}"
[schemas]
dir = "{catalogue}"
[delivery]
workers = 2
max_attempts = 2
backoff_base_seconds = 0.2
backoff_max_seconds = 1
[retention]
finished_seconds = 60
dead_letter_seconds = 60
sweep_seconds = 10
[clients.soak]
secrets = ["{SECRET}"]
allowed_types = ["*"]
""")
    return path


class Load:
    """Threads posting messages and OpenIM's callbacks about what was delivered, at a steady pace."""

    def __init__(self, url: str, fake: FakeOpenIM, rate: float) -> None:
        self.url, self.fake, self.interval = url, fake, 1 / rate
        self.counts: Counter[str] = Counter()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.seen = 0  # deliveries of the fake already answered with callbacks
        self.threads = [threading.Thread(target=self.messages, daemon=True),
                        threading.Thread(target=self.callbacks, daemon=True)]

    def messages(self) -> None:
        session, rng, n = requests.Session(), random.Random(1), 0
        while not self.stop.wait(self.interval):
            n += 1
            size = rng.choice((1, 1, 3, 50))
            users = rng.sample(USERS, size) if n % 10 else [f"ghost{n}"]  # unknown user: a dead letter
            custom = size > 1
            body = {"type": "action.required" if custom else "order.status_changed", "version": 1,
                    "data": {"action": "verify_identity", "title": f"t{n}", "body": "b", "deep_link": "app://x"}
                    if custom else {"order_id": f"SO-{n}", "status": "paid", "updated_at": "2026-11-26T12:00:00Z"},
                    "to": {"users": users}}
            raw = json.dumps(body).encode()
            headers = {**signature_headers("soak", SECRET, "POST", "/v1/messages", raw),
                       "Content-Type": "application/json"}
            try:
                status = session.post(self.url + "/v1/messages", data=raw, headers=headers, timeout=10).status_code
            except requests.RequestException:
                status = "error"
            with self.lock:
                self.counts[f"messages {status}"] += 1

    def callbacks(self) -> None:
        session, rng, seq = requests.Session(), random.Random(2), 0
        hook = f"{self.url}/openim/callback/{TOKEN}"
        while not self.stop.wait(0.05):
            fresh = self.fake.delivered[self.seen:]
            self.seen += len(fresh)
            for delivery in fresh:
                seq += 1
                saved = self.fake.after_msg_save_db(delivery, seq)
                if seq % 10 == 0:
                    saved["ex"] = PAD  # a large callback: what grew the inbox's WAL
                posts = [("callbackAfterSendSingleMsgCommand", self.fake.after_send_single_msg(delivery)),
                         ("callbackAfterMsgSaveDBCommand", saved)]
                if delivery.recv_id and rng.random() < 0.5:
                    conversation = "si_" + "_".join(sorted((delivery.send_id, delivery.recv_id)))
                    posts.append(("callbackAfterSingleMsgReadCommand",
                                  self.fake.single_msg_read(delivery.recv_id, conversation, [seq])))
                user = rng.choice(USERS)
                posts.append(("callbackAfterUserOnlineCommand", self.fake.user_online(user)))
                for command, payload in posts:
                    try:
                        session.post(f"{hook}/{command}", json=payload, timeout=10)
                    except requests.RequestException:
                        pass
                with self.lock:
                    self.counts["callbacks"] += len(posts)
                if self.stop.is_set():
                    return


def sizes(folder: Path) -> dict[str, int]:
    """Bytes of each SQLite file and its WAL (0 when absent)."""
    names = ("soak.db", "soak.db-wal", "soak-callbacks.db", "soak-callbacks.db-wal")
    return {name: (folder / name).stat().st_size if (folder / name).exists() else 0 for name in names}


def rows(folder: Path) -> tuple[int, int, int]:
    """(messages, recipients, callbacks) kept right now."""
    with sqlite3.connect(f"file:{folder / 'soak.db'}?mode=ro", uri=True, timeout=10) as main:
        messages = main.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        recipients = main.execute("SELECT COUNT(*) FROM recipients").fetchone()[0]
    with sqlite3.connect(f"file:{folder / 'soak-callbacks.db'}?mode=ro", uri=True, timeout=10) as inbox:
        callbacks = inbox.execute("SELECT COUNT(*) FROM callbacks").fetchone()[0]
    return messages, recipients, callbacks


def deleted(url: str) -> dict[str, float]:
    """bizplugin_retention_deleted_total by what, from the server's /metrics."""
    found = {}
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("bizplugin_retention_deleted_total{"):
            what = line.split('what="', 1)[1].split('"', 1)[0]
            found[what] = float(line.rsplit(" ", 1)[1])
    return found


def mb(n: int) -> str:
    return f"{n / 2**20:7.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=11)
    parser.add_argument("--rate", type=float, default=8, help="messages per second")
    parser.add_argument("--keep", action="store_true", help="keep the files (default: removed at the end)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bizplugin-retention-soak-"))
    with FakeOpenIM(users=USERS + ["imAdmin"]) as fake:
        config = write_config(folder, fake.url)
        log = (folder / "serve.log").open("wb")
        server = subprocess.Popen([console_script(), "serve", "-c", str(config), "--log-level", "warning"],
                                  stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            line = server.stdout.readline()
            if not line.startswith("listening on "):
                raise SystemExit(f"the server did not start: {line!r}")
            load = Load(line.split()[-1], fake, args.rate)
            for thread in load.threads:
                thread.start()
            report(args, folder, load, server.pid)
            load.stop.set()
            for thread in load.threads:
                thread.join(30)
            print(f"  retention deleted: {deleted(load.url)}; load: {dict(load.counts)}")
        finally:
            server.terminate()
            server.wait(30)
    if args.keep:
        print(f"  files in {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def report(args: argparse.Namespace, folder: Path, load: Load, pid: int) -> None:
    print(f"retention soak: {args.minutes:g} min at {args.rate:g} messages/s (1, 3 or 50 users each) with their"
          " callbacks; finished_seconds = dead_letter_seconds = 60, sweep_seconds = 10")
    print("   time   main MB  main-wal   inbox MB inbox-wal   messages recipients callbacks   RSS MB")
    started, samples = time.monotonic(), []
    while (elapsed := time.monotonic() - started) < args.minutes * 60:
        time.sleep(min(30, args.minutes * 60 - elapsed))
        found, kept, rss = sizes(folder), rows(folder), memory_kb(pid).get("VmRSS", 0) * 1024
        samples.append((time.monotonic() - started, found, kept, rss))
        print(f"  {samples[-1][0] / 60:5.1f}m  {mb(found['soak.db'])}  {mb(found['soak.db-wal'])}   "
              f"{mb(found['soak-callbacks.db'])}  {mb(found['soak-callbacks.db-wal'])}   "
              f"{kept[0]:8d} {kept[1]:10d} {kept[2]:9d}  {mb(rss)}", flush=True)
    warm = [s for s in samples if s[0] >= 180]  # after warm-up: three retention periods
    if warm:
        for name in ("soak.db", "soak-callbacks.db"):
            low, high = min(s[1][name] for s in warm), max(s[1][name] for s in warm)
            print(f"  {name} after warm-up: {mb(low).strip()} to {mb(high).strip()} MB"
                  f" (last {mb(warm[-1][1][name]).strip()} MB)")


if __name__ == "__main__":
    sys.exit(main())
