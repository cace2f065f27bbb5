"""Helpers for end-to-end tests: a temporary config and a real server process.

``write_config`` writes a TOML file shaped like ``config.example.toml``
(two clients, the repository's ``schemas/``, an SQLite file of its own,
port 0); tests change the ``config_tables`` before writing to make the
variants they need. ``running_server`` starts ``openim-bizplugin serve``
as a child process on 127.0.0.1, waits (bounded) for its
``listening on http://127.0.0.1:PORT`` line and stops it with SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import queue
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from openim_bizplugin.signing import signature_headers

REPO = Path(__file__).resolve().parent.parent
SCHEMAS_DIR = REPO / "schemas"
CRM_SECRET = "crm-e2e-secret-0123456789abcdef"
OPS_SECRET = "ops-e2e-secret-fedcba9876543210"
SECRETS = {"crm": CRM_SECRET, "ops": OPS_SECRET}
CALLBACK_TOKEN = "e2e-callback-token-0123456789"
MAX_BODY_BYTES = 4096
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


def command() -> list[str]:
    """The installed console script, preferably the one of this interpreter."""
    beside = Path(sys.executable).parent / "openim-bizplugin"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("openim-bizplugin")
    if found is None:
        raise RuntimeError("the openim-bizplugin console script is not installed (pip install -e .)")
    return [found]


def child_env() -> dict[str, str]:
    """The environment for a child process: no inherited BIZPLUGIN_CONFIG."""
    env = dict(os.environ)
    env.pop("BIZPLUGIN_CONFIG", None)
    return env


def config_tables(db_path: Path, *, schemas_dir: Path = SCHEMAS_DIR,
                  max_body_bytes: int = MAX_BODY_BYTES) -> dict[str, dict[str, Any]]:
    """The config as nested dicts, to be changed by a test and then written."""
    return {
        "server": {"host": "127.0.0.1", "port": 0, "max_body_bytes": max_body_bytes},
        # Nothing listens on port 9; delivery workers are off, so nothing calls it.
        "openim": {"api_url": "http://127.0.0.1:9", "secret": "openIM123", "admin_user_id": "imAdmin",
                   "sender_id": "imAdmin", "timeout_seconds": 2, "version": "main"},  # FakeOpenIM's default
        "callbacks": {"token": CALLBACK_TOKEN},
        "storage": {"url": f"sqlite:///{db_path.resolve()}"},
        "schemas": {"dir": str(schemas_dir.resolve())},
        "delivery": {"workers": 0},
        "clients.crm": {"secrets": [CRM_SECRET],
                        "allowed_types": ["profile.*", "order.status_changed", "action.required"]},
        "clients.ops": {"secrets": [OPS_SECRET], "allowed_types": ["*"]},
    }


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_tables(path: Path, tables: dict[str, dict[str, Any]]) -> Path:
    """Write *tables* (``{"server": {...}, "clients.crm": {...}}``) as TOML."""
    lines = []
    for name, keys in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in keys.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_config(directory: Path, *, db_path: Path | None = None, name: str = "config.toml",
                 **options: Any) -> Path:
    """A ready config file in *directory* (SQLite file ``bizplugin.db`` there by default)."""
    tables = config_tables(db_path or directory / "bizplugin.db", **options)
    return write_tables(directory / name, tables)


def db_path_of(config_path: Path) -> Path:
    """The SQLite file a config written by :func:`write_config` names."""
    url = tomllib.loads(config_path.read_text(encoding="utf-8"))["storage"]["url"]
    return Path(url.removeprefix("sqlite:///"))


def count_rows(db_path: Path, table: str) -> int:
    """Rows in *table* of the SQLite file, read by a connection of our own."""
    assert table in ("messages", "recipients")
    db = sqlite3.connect(db_path, timeout=10)
    try:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        db.close()


@dataclass
class RunningServer:
    """A live ``openim-bizplugin serve`` child process."""

    url: str
    process: subprocess.Popen
    config_path: Path
    stderr_path: Path

    @property
    def db_path(self) -> Path:
        return db_path_of(self.config_path)

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")


def _read_lines(stream: Any, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _wait_for_address(process: subprocess.Popen, lines: queue.Queue, stderr_path: Path) -> str:
    prefix = "listening on "
    deadline = time.monotonic() + START_TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=min(left, 0.5))
        except queue.Empty:
            continue
        if line is None:  # stdout closed: the process is gone
            break
        if line.startswith(prefix + "http://127.0.0.1:"):
            return line[len(prefix):].strip()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=1)
    raise RuntimeError(f"server did not announce its address (exit code {process.poll()}); stderr:\n"
                       + stderr_path.read_text(encoding="utf-8", errors="replace"))


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it does not exit within STOP_TIMEOUT."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)


@contextlib.contextmanager
def running_server(config_path: Path, *, max_open_files: int | None = None) -> Iterator[RunningServer]:
    """Run ``openim-bizplugin serve -c config_path`` while the block runs.

    *max_open_files* lowers the child's RLIMIT_NOFILE, as a small container would.
    """
    stderr_path = config_path.parent / f"{config_path.stem}.stderr.log"

    def limit_files() -> None:
        if max_open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_open_files, max_open_files))

    with stderr_path.open("ab") as stderr:
        process = subprocess.Popen([*command(), "serve", "-c", str(config_path)],
                                   stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
                                   text=True, env=child_env(), preexec_fn=limit_files,
                                   start_new_session=True)  # its children form its own group (kill9)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True)
    reader.start()
    try:
        url = _wait_for_address(process, lines, stderr_path)
        yield RunningServer(url, process, config_path, stderr_path)
    finally:
        stop(process)
        reader.join(timeout=STOP_TIMEOUT)  # ends at EOF, now that the process is gone
        process.stdout.close()



def signed_post(base_url: str, body: bytes, *, client: str = "crm", secret: str | None = None,
                headers: dict[str, str] | None = None, now: float | None = None,
                content_type: str = "application/json", timeout: float = 10,
                idempotency_key: str | None = None) -> requests.Response:
    """POST *body* to /v1/messages as *client*, signed exactly as a sender would (with the
    ``Idempotency-Key`` header the signature covers, when *idempotency_key* is given)."""
    sent = signature_headers(client, secret or SECRETS[client], "POST", "/v1/messages", body, now=now,
                             idempotency_key=idempotency_key)
    sent["Content-Type"] = content_type
    sent.update(headers or {})
    return requests.post(base_url + "/v1/messages", data=body, headers=sent, timeout=timeout)


def signed_get(base_url: str, path: str, *, client: str = "crm", timeout: float = 10) -> requests.Response:
    """GET *path* as *client*."""
    sent = signature_headers(client, SECRETS[client], "GET", path, b"")
    return requests.get(base_url + path, headers=sent, timeout=timeout)


def wait_for(what: str, check: Callable[[], object], seconds: float = 20) -> object:
    """The first true value of *check*, asked every 50 ms for at most *seconds*."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def kill9(process: subprocess.Popen) -> None:
    """SIGKILL the process and, for ``serve`` (a session of its own), every process it started:
    no shutdown code runs, leases and open transactions are left behind."""
    if os.getpgid(process.pid) == process.pid:
        os.killpg(process.pid, signal.SIGKILL)
    else:
        process.kill()
    process.wait(timeout=10)
