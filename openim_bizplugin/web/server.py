"""``openim-bizplugin serve``: the app on a threaded HTTP server.

SIGTERM and Ctrl-C stop accepting connections and let requests in flight
finish before the process exits.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
from typing import TextIO

from werkzeug.serving import WSGIRequestHandler, make_server

from ..config import Config
from ..openim.client import OpenIMError
from ..services import Services
from .app import create_app

log = logging.getLogger(__name__)


class _RequestHandler(WSGIRequestHandler):
    """Werkzeug's handler, logging through ``logging`` without ANSI colours."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        path = masked_path(self.path)
        log.info('%s "%s %s" %s', self.address_string(), self.command, path, code,
                 extra={"event": "http.access", "remote": self.address_string(), "method": self.command,
                        "path": path, "status": getattr(code, "value", code)})


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


def serve(config: Config, *, host: str | None = None, port: int | None = None,
          announce: TextIO | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code."""
    app = create_app(config)
    services = app.extensions["bizplugin"]
    server = make_server(host or config.server.host, config.server.port if port is None else port,
                         app, threaded=True, request_handler=_RequestHandler)
    server.daemon_threads = False  # let requests in flight finish on shutdown

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %s: shutting down", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    address = f"http://{server.host}:{server.port}"
    log.info("listening on %s", address)
    if announce is not None:
        print(f"listening on {address}", file=announce, flush=True)
    freeze_startup_heap()
    if config.delivery.workers:
        services.start_background()
    try:
        server.serve_forever()
    finally:
        server.server_close()
        services.close()
    return 0


def run_workers(config: Config, announce: TextIO | None = None) -> int:
    """``openim-bizplugin worker``: delivery threads only, no HTTP, until SIGTERM/SIGINT.

    No HTTP means no ``/metrics``: a worker's counters are not scraped (the
    queue depth is, from the shared store, by every ``serve``).
    """
    services = Services.build(config)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    workers = max(config.delivery.workers, 1)
    fetch_admin_token(services)
    freeze_startup_heap()
    services.start_background()
    log.info("delivering with %d workers", workers)
    if announce is not None:
        print(f"delivering with {workers} workers", file=announce, flush=True)
    stopping.wait()
    services.close()
    return 0
