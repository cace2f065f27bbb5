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
import gc
import logging
import os
import shutil
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
from .supervisor import Runner, Stop, Supervisor, listening_socket

log = logging.getLogger(__name__)
WAKE_DELIVERY, WAKE_CALLBACKS = b"d", b"c"
BACKGROUND_NICENESS = 10  # the background process's scheduling priority below the HTTP processes


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
    # the engine buffers more than either body limit: the callback endpoint answers OpenIM "continue"
    # itself for a callback over [callbacks] max_body_bytes, and /v1 refuses an announced one at the gate
    buffered = max(s.max_body_bytes, config.callback_max_body_bytes) * 4 + 65536
    return httpserver.Limits(s.threads, s.max_connections, s.header_timeout_seconds, s.body_timeout_seconds,
                             s.keepalive_seconds, s.shutdown_seconds, buffered)


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
def _wake_through(services: Services, fd: int) -> None:
    """Make the engine's and the callback processor's wake() reach the background process."""
    def send(byte: bytes) -> Callable[[], None]:
        def wake() -> None:
            with contextlib.suppress(BlockingIOError):  # a full pipe: the background polls anyway
                os.write(fd, byte)
        return wake
    services.engine.loop.wake = send(WAKE_DELIVERY)  # type: ignore[method-assign]
    services.callbacks.loop.wake = send(WAKE_CALLBACKS)  # type: ignore[method-assign]


def _run_engine(app: Flask | Callable, sock: socket.socket, limits: httpserver.Limits, gate: httpserver.Gate,
                stop: Stop, ready_fd: int) -> None:
    engine = httpserver.build(app, sock, limits, gate, masked_path)
    freeze_startup_heap()
    os.write(ready_fd, b"r")
    httpserver.run(engine, stop)


def _http_runner(config: Config, sock: socket.socket, wake: tuple[int, int] | None) -> Runner:
    def run(stop: Stop, ready_fd: int) -> int:
        app = create_app(config)
        services: Services = app.extensions["bizplugin"]
        if wake is not None:
            os.close(wake[0])
            _wake_through(services, wake[1])
        try:
            _run_engine(app, sock, engine_limits(config), request_gate(services), stop, ready_fd)
        finally:
            services.close()
        return 0
    return run


def _background_runner(config: Config, sock: socket.socket, wake: tuple[int, int]) -> Runner:
    def run(stop: Stop, _ready_fd: int) -> int:
        sock.close()
        os.close(wake[1])
        # when CPU is short, answering requests (callers, and OpenIM waiting on its callbacks)
        # comes first; the queue is durable and drains once the HTTP processes idle
        os.nice(BACKGROUND_NICENESS)
        return run_workers(config, wake_fd=wake[0], stop=stop)
    return run


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


def run_workers(config: Config, announce: TextIO | None = None, *, wake_fd: int | None = None,
                stop: Callable[[], bool] | None = None) -> int:
    """``openim-bizplugin worker`` (and the background process of ``serve``): delivery,
    callback processing and subscriber events, no HTTP, until SIGTERM/SIGINT.

    Under ``serve`` its counters are scraped through the HTTP processes; the
    ``worker`` command has no ``/metrics`` (the queue depth is read from the
    shared store by every ``serve``).
    """
    stop = stop or Stop()
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
    services.close()  # rounds in flight end; leases not attempted are given back
    return 0


def serve(config: Config, *, host: str | None = None, port: int | None = None,
          announce: TextIO | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code."""
    metrics_dir = tempfile.mkdtemp(prefix="bizplugin-metrics-")
    try:
        counters.share_across_processes(metrics_dir)
        create_app(config).extensions["bizplugin"].close()  # a config or store problem stops us here
        sock = listening_socket(host or config.server.host, config.server.port if port is None else port)
        wake = None
        if config.delivery.workers:
            wake = os.pipe()
            os.set_blocking(wake[1], False)
        children = [("http", _http_runner(config, sock, wake))] * config.server.worker_count
        if wake is not None:
            children.append(("background", _background_runner(config, sock, wake)))
        return _supervise(sock, children, config.server.shutdown_seconds, announce)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def serve_app(app: Callable, *, workers: int, limits: httpserver.Limits, host: str = "127.0.0.1", port: int = 0,
              announce: TextIO | None = None) -> int:
    """Any WSGI *app* on serve's engine and processes, without a background process or the
    gate: what the benchmarks compare the sidecar with."""
    sock = listening_socket(host, port)

    def run(stop: Stop, ready_fd: int) -> int:
        _run_engine(app, sock, limits, lambda *_: None, stop, ready_fd)
        return 0
    return _supervise(sock, [("http", run)] * workers, limits.shutdown_seconds, announce)


def _supervise(sock: socket.socket, children: list[tuple[str, Runner]], shutdown_seconds: float,
               announce: TextIO | None) -> int:
    supervisor = Supervisor(children, shutdown_seconds)
    supervisor.start()
    shown_host, shown_port = sock.getsockname()[:2]
    address = f"http://{shown_host}:{shown_port}"
    workers = sum(role == "http" for role, _ in children)
    log.info("listening on %s with %d HTTP processes", address, workers,
             extra={"event": "serve.listening", "workers": workers})
    if announce is not None:
        print(f"listening on {address}", file=announce, flush=True)
    return supervisor.run()
