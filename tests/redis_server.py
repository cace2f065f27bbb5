"""A real ``redis-server`` for the tests, on a free loopback port, without persistence.

Started once per test session by the fixtures that need it; skipped (with
the reason) only where ``redis-server`` is not installed. ``.ci/run``
installs it, so CI runs every Redis test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

START_SECONDS = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process; ``url`` names database 0."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("BIZPLUGIN_REQUIRE_REDIS"):  # CI: a missing server is a failure, not a skip
                pytest.fail("redis-server is not installed, and BIZPLUGIN_REQUIRE_REDIS is set")
            pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does)")
        for _ in range(3):  # another process may take the free port first
            self.port = free_port()
            self.process = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.folder), "--protected-mode", "yes"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._answers():
                return self
            self.stop()
        raise RuntimeError("redis-server did not start")

    def _answers(self) -> bool:
        """Wait (bounded) until the server accepts connections, or has exited."""
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline and self.process and self.process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return True
            except OSError:
                time.sleep(0.02)  # waiting for a process to start, not timing the code under test
        return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
