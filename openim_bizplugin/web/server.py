"""``openim-bizplugin serve``: one service of several processes, and ``worker``.

``serve`` binds the listening socket, then forks and supervises its children:

- ``[server] workers`` HTTP processes (default: the CPU count), each running
  the app on the production engine of :mod:`.httpserver` on the shared socket;
- one background process (when ``delivery.workers > 0``): delivery, callback
  processing and subscriber events, as the ``worker`` command runs them.

A child that dies is started again (after a pause that grows while it keeps
dying). The HTTP children wake the background process through a pipe when
they store a message or a callback, so work starts at once, not at its next
poll. Counters are shared through prometheus_client's multiprocess files, so
``/metrics`` answers the totals of the whole service whichever process takes
the scrape. SIGTERM or SIGINT stops the service: every child drains (HTTP:
requests in flight are answered, idle connections closed; background: rounds
in flight end and unsent leases are given back) and the supervisor exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import logging
import os
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TextIO

from flask import Flask

from .. import counters
from ..config import Config
from ..errors import BizError, PayloadTooLarge
from ..openim.client import OpenIMError
from ..services import Services
from . import httpserver
from .app import create_app

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RESTART_PAUSE_SECONDS = (0.5, 30.0)  # a dead child is started again after this, doubling while it keeps dying
HEALTHY_SECONDS = 30.0  # a child that lived this long starts again after the shortest pause
WAKE_DELIVERY, WAKE_CALLBACKS = b"d", b"c"


def masked_path(path: str) -> str:
    """The request path for logs: no query, and the callback token (a secret) masked."""
    path = path.split("?", 1)[0]
    prefix = "/openim/callback/"
    if path.startswith(prefix):
        _token, _, command = path[len(prefix):].partition("/")
        return f"{prefix}***/{command}"
    return path


def freeze_startup_heap() -> None:
    """Keep what start-up made (modules, schemas, the app) out of the collector's full passes.

    Those objects live as long as the process, yet every full pass walked them
    all while holding the GIL: ~20 ms per pass in a worker, in the middle of
    delivery rounds and callback answers. Now a pass walks what was made since.
    """
    gc.collect()
    gc.freeze()


def fetch_admin_token(services: Services) -> None:
    """Obtain OpenIM's admin token before delivering: a wrong secret or an unreachable OpenIM
    shows in the log at start-up, and the first round does not wait for the token."""
    try:
        services.openim.admin_token()
    except OpenIMError as exc:
        log.warning("no OpenIM admin token yet, the workers keep trying: %s", exc,
                    extra={"event": "openim.token_unavailable"})


def request_gate(services: Services) -> httpserver.Gate:
    """What the engine refuses as soon as a request's headers are in, before its body is read:
    a ``/v1`` request without a known client or a well-formed signature token, or whose
    announced body is over ``server.max_body_bytes``."""
    limit = services.config.server.max_body_bytes

    def gate(method: str, path: str, headers: Mapping[str, str]) -> BizError | None:
        if not path.startswith("/v1/"):
            return None
        try:
            services.verifier.check_headers(headers.get("X_BIZ_CLIENT"), headers.get("X_BIZ_SIGNATURE"))
        except BizError as exc:
            return exc
        length = headers.get("CONTENT_LENGTH", "")
        if length.isdigit() and int(length) > limit:
            return PayloadTooLarge(f"body of {int(length)} bytes is over the limit of {limit} bytes")
        return None
    return gate


def engine_limits(config: Config) -> httpserver.Limits:
    s = config.server
    # the engine buffers more than max_body_bytes: the callback endpoint answers OpenIM itself for a
    # body a little over it, and /v1 refuses an announced one at the gate
    return httpserver.Limits(s.threads, s.max_connections, s.header_timeout_seconds, s.body_timeout_seconds,
                             s.keepalive_seconds, s.shutdown_seconds, s.max_body_bytes * 4 + 65536)


@contextlib.contextmanager
def serving(app: Flask, host: str = "127.0.0.1") -> Iterator[int]:
    """*app* on the production engine, in a thread of this process, on a free port of *host*
    (tests, a quick look); yields the port."""
    services: Services = app.extensions["bizplugin"]
    sock = listening_socket(host, 0)
    engine = httpserver.build(app, sock, engine_limits(services.config), request_gate(services), masked_path)
    stopped = threading.Event()
    thread = threading.Thread(target=httpserver.run, args=(engine, stopped.is_set), daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stopped.set()
        thread.join(services.config.server.shutdown_seconds + 5)
        sock.close()


# -- the children -----------------------------------------------------------------------------
class _Stop:
    """Set by SIGTERM/SIGINT in a child process."""

    def __init__(self) -> None:
        self.flag = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.set)

    def set(self, *_: object) -> None:
        self.flag = True

    def __call__(self) -> bool:
        return self.flag


def _wake_through(services: Services, fd: int) -> None:
    """Make the engine's and the callback processor's wake() reach the background process."""
    def send(byte: bytes) -> Callable[[], None]:
        def wake() -> None:
            with contextlib.suppress(BlockingIOError):  # a full pipe: the background polls anyway
                os.write(fd, byte)
        return wake
    services.engine.loop.wake = send(WAKE_DELIVERY)  # type: ignore[method-assign]
    services.callbacks.loop.wake = send(WAKE_CALLBACKS)  # type: ignore[method-assign]


def _http_child(config: Config, sock: socket.socket, wake_fd: int | None, ready_fd: int) -> int:
    stop = _Stop()
    app = create_app(config)
    services: Services = app.extensions["bizplugin"]
    if wake_fd is not None:
        _wake_through(services, wake_fd)
    engine = httpserver.build(app, sock, engine_limits(config), request_gate(services), masked_path)
    freeze_startup_heap()
    os.write(ready_fd, b"r")
    try:
        httpserver.run(engine, stop)
    finally:
        services.close()
    return 0


def _relay_wakes(services: Services, fd: int) -> None:
    """In the background process: wake the loops the HTTP processes ask for."""
    def relay() -> None:
        while True:
            try:
                data = os.read(fd, 512)
            except OSError:
                return
            if not data:
                return
            if WAKE_DELIVERY in data:
                services.engine.wake()
            if WAKE_CALLBACKS in data:
                services.callbacks.wake()
    threading.Thread(target=relay, name="wake-relay", daemon=True).start()


def run_workers(config: Config, announce: TextIO | None = None, *, wake_fd: int | None = None) -> int:
    """``openim-bizplugin worker`` (and the background process of ``serve``): delivery,
    callback processing and subscriber events, no HTTP, until SIGTERM/SIGINT.

    Under ``serve`` its counters are scraped through the HTTP processes; the
    ``worker`` command has no ``/metrics`` (the queue depth is read from the
    shared store by every ``serve``).
    """
    stop = _Stop()
    services = Services.build(config)
    if wake_fd is not None:
        counters.install(services)
        _relay_wakes(services, wake_fd)
    workers = max(config.delivery.workers, 1)
    fetch_admin_token(services)
    freeze_startup_heap()
    services.start_background()
    log.info("delivering with %d workers", workers)
    if announce is not None:
        print(f"delivering with {workers} workers", file=announce, flush=True)
    while not stop():
        time.sleep(0.1)
    services.close()
    return 0


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this child when the supervisor dies (kill -9 included)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before that took effect
        os.kill(os.getpid(), signal.SIGTERM)


# -- the supervisor ---------------------------------------------------------------------------
class Supervisor:
    """Forks the children of ``serve``, starts again those that die, stops them all on SIGTERM."""

    def __init__(self, config: Config, sock: socket.socket) -> None:
        self.config, self.sock = config, sock
        self.roles = ["http"] * config.server.worker_count + (["background"] if config.delivery.workers else [])
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (slot, started)
        self.pauses = [RESTART_PAUSE_SECONDS[0]] * len(self.roles)
        self.due: dict[int, float] = {}  # slot -> when to start it again
        self.stopping = False
        self.ready_read, self.ready_write = os.pipe()  # an HTTP child writes a byte once it accepts connections
        self.wake_read, self.wake_write = os.pipe() if "background" in self.roles else (None, None)
        if self.wake_write is not None:
            os.set_blocking(self.wake_write, False)

    def start(self, timeout: float = 60.0) -> None:
        """Start every child; return once the HTTP ones accept connections (or *timeout* passed)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._stop)
        for slot in range(len(self.roles)):
            self._spawn(slot)
        waiting, deadline = self.roles.count("http"), time.monotonic() + timeout
        while waiting > 0 and not self.stopping and time.monotonic() < deadline:
            if select.select([self.ready_read], [], [], 0.1)[0]:
                waiting -= len(os.read(self.ready_read, 64))
            self._reap()

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT, then stop every child; returns the exit code."""
        while not self.stopping:
            self._reap()
            now = time.monotonic()
            for slot, when in list(self.due.items()):
                if when <= now:
                    del self.due[slot]
                    self._spawn(slot)
            time.sleep(0.1)
        return self._stop_children()

    def _stop(self, *_: object) -> None:
        self.stopping = True

    def _spawn(self, slot: int) -> None:
        role, parent = self.roles[slot], os.getpid()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # the child installs its own first
        pid = os.fork()
        if pid == 0:
            os._exit(self._child(role, parent, blocked))
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.children[pid] = (slot, time.monotonic())
        log.info("started %s process %d", role, pid, extra={"event": "serve.child_started", "role": role,
                                                           "pid": pid})

    def _child(self, role: str, parent: int, blocked: set) -> int:
        code = 1
        try:
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            _die_with_parent(parent)
            if role == "http":
                if self.wake_read is not None:
                    os.close(self.wake_read)
                runner: Callable[[], int] = lambda: _http_child(self.config, self.sock, self.wake_write,
                                                                self.ready_write)
            else:
                self.sock.close()
                runner = lambda: run_workers(self.config, wake_fd=self.wake_read)
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            code = runner()
        except BaseException:
            log.exception("%s process failed", role)
        finally:
            logging.shutdown()
        return code

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot, started = self.children.pop(pid)
            lived = time.monotonic() - started
            self.pauses[slot] = RESTART_PAUSE_SECONDS[0] if lived > HEALTHY_SECONDS else min(
                self.pauses[slot] * 2, RESTART_PAUSE_SECONDS[1])
            self.due[slot] = time.monotonic() + self.pauses[slot]
            log.error("%s process %d ended (%s); starting another in %.1f s", self.roles[slot], pid,
                      _exit_text(status), self.pauses[slot],
                      extra={"event": "serve.child_died", "role": self.roles[slot], "pid": pid})

    def _stop_children(self) -> int:
        log.info("stopping: %d processes drain", len(self.children), extra={"event": "serve.stopping"})
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.shutdown_seconds + 5
        while self.children and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                pid, _status = os.waitpid(-1, os.WNOHANG)
                if pid:
                    self.children.pop(pid, None)
                    continue
            time.sleep(0.05)
        for pid in self.children:  # still there after the grace period
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        return 0


def _exit_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def listening_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """The socket every HTTP process accepts on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BizError(f"cannot listen on {host}:{port}: {exc.strerror or errno.errorcode.get(exc.errno)}") from None
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def serve(config: Config, *, host: str | None = None, port: int | None = None,
          announce: TextIO | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code."""
    metrics_dir = tempfile.mkdtemp(prefix="bizplugin-metrics-")
    try:
        counters.share_across_processes(metrics_dir)
        create_app(config).extensions["bizplugin"].close()  # a config or store problem stops us here
        sock = listening_socket(host or config.server.host, config.server.port if port is None else port)
        shown_host, shown_port = sock.getsockname()[:2]
        address = f"http://{shown_host}:{shown_port}"
        supervisor = Supervisor(config, sock)
        supervisor.start()
        log.info("listening on %s with %d HTTP processes", address, config.server.worker_count,
                 extra={"event": "serve.listening", "workers": config.server.worker_count})
        if announce is not None:
            print(f"listening on {address}", file=announce, flush=True)
        return supervisor.run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
