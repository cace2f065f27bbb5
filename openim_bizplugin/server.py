"""``openim-bizplugin serve``: the app on a threaded HTTP server.

Connections are kept alive between requests (HTTP/1.1), as OpenIM's Go
webhook client expects: a new connection and thread per callback was most
of the cost of an answer. SIGTERM and Ctrl-C stop accepting connections,
close the idle ones and let requests in flight finish before the process
exits.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from typing import Any, TextIO

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from .app import create_app
from .config import Config

log = logging.getLogger(__name__)
IDLE_SECONDS = 60.0  # a kept-alive connection closes after this long without a request (nginx: 75 s)


class _Body:
    """A request body of known length that counts what the app read of it."""

    def __init__(self, stream: Any, length: int) -> None:
        self._stream, self.remaining = stream, length

    def read(self, size: int = -1) -> bytes:
        size = self.remaining if size is None or size < 0 else min(size, self.remaining)
        data = self._stream.read(size) if size else b""
        self.remaining -= len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        size = self.remaining if size is None or size < 0 else min(size, self.remaining)
        data = self._stream.readline(size) if size else b""
        self.remaining -= len(data)
        return data


class _Drained:
    """Stands in for the socket's reader once an answer keeps its connection: werkzeug reads and
    discards whatever follows every answer (meant for unread bodies), which here is the next request."""

    @staticmethod
    def read(size: int = -1) -> bytes:
        return b""

    @staticmethod
    def close() -> None:
        pass


class _Connections:
    """The server's connections waiting for their next request, so that shutdown can close them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: set[socket.socket] = set()
        self.closing = False

    def waiting(self, connection: socket.socket) -> None:
        with self._lock:
            if self.closing:
                _close_input(connection)
            else:
                self._idle.add(connection)

    def busy(self, connection: socket.socket) -> bool:
        """A request line arrived; False when shutdown closed the connection meanwhile."""
        with self._lock:
            if connection not in self._idle:
                return False
            self._idle.discard(connection)
            return True

    def close_idle(self) -> None:
        with self._lock:
            self.closing = True
            for connection in self._idle:
                _close_input(connection)
            self._idle.clear()


def _close_input(connection: socket.socket) -> None:
    try:  # the handler's readline returns at once: the connection ends with nothing half answered
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class RequestHandler(WSGIRequestHandler):
    """Werkzeug's handler with keep-alive, logging through ``logging`` without ANSI colours.

    Werkzeug closes every connection after one answer because ``http.server``
    cannot skip a body the app left unread. This handler counts what the app
    read, and keeps the connection only when the body was read to its end
    (or there was none): anything else (an unread or chunked body, the client
    asking to close, shutdown) still ends with ``Connection: close``.
    """

    server: BaseWSGIServer
    timeout = IDLE_SECONDS  # also bounds a request that stalls mid-way
    # headers and body go out in separate writes: without this, a kept-alive client's delayed
    # ACK holds the body back for ~40 ms (Nagle)
    disable_nagle_algorithm = True
    _body: _Body | None = None

    def handle_one_request(self) -> None:
        self.rfile = self._reader()
        self.server.connections.waiting(self.connection)  # type: ignore[attr-defined]
        super().handle_one_request()

    def finish(self) -> None:
        self.rfile = self._reader()
        super().finish()

    def _reader(self) -> Any:
        return self.__dict__.pop("_socket_reader", None) or self.rfile

    def parse_request(self) -> bool:
        if not self.server.connections.busy(self.connection):  # type: ignore[attr-defined]
            self.close_connection = True
            return False
        self._body, self.environ = None, None  # nothing of the previous request on this connection
        return super().parse_request()

    def make_environ(self) -> Any:
        environ = super().make_environ()
        length = environ.get("CONTENT_LENGTH", "")
        if "wsgi.input_terminated" not in environ and length.isdigit():  # chunked bodies are not counted
            environ["wsgi.input"] = self._body = _Body(environ["wsgi.input"], int(length))
        return environ

    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() == "connection" and value.lower() == "close" and self._reusable():
            self._socket_reader, self.rfile = self.rfile, _Drained()
            return  # werkzeug's unconditional "Connection: close"
        super().send_header(keyword, value)

    def _reusable(self) -> bool:
        environ = getattr(self, "environ", None)
        if not environ:  # an error answered before the app ran (a malformed request line...)
            return False
        read_to_end = (self._body.remaining == 0 if self._body is not None
                       else "wsgi.input_terminated" not in environ and not environ.get("CONTENT_LENGTH"))
        return (read_to_end and not self.close_connection and self.request_version == "HTTP/1.1"
                and not self.server.connections.closing)  # type: ignore[attr-defined]

    def log_error(self, format: str, *args: Any) -> None:
        if format.startswith("Request timed out"):  # an idle kept-alive connection: nothing went wrong
            log.debug("%s: connection closed after %.0f s without a request", self.address_string(), self.timeout)
            return
        super().log_error(format, *args)

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


def make_http_server(app: Any, host: str, port: int, *, idle_seconds: float = IDLE_SECONDS,
                     handler: type[RequestHandler] = RequestHandler) -> BaseWSGIServer:
    """The threaded keep-alive server ``serve`` runs *app* on (benchmarks serve a bare app on it too).

    Stop it with :func:`stop_http_server` from another thread."""
    handler = type(handler.__name__, (handler,), {"timeout": idle_seconds})
    server = make_server(host, port, app, threaded=True, request_handler=handler)
    server.daemon_threads = False  # let requests in flight finish on shutdown
    server.connections = _Connections()  # type: ignore[attr-defined]
    return server


def stop_http_server(server: BaseWSGIServer) -> None:
    """Stop accepting, close idle connections; ``serve_forever`` then returns and ``server_close``
    waits for the requests in flight."""
    server.shutdown()
    server.connections.close_idle()  # type: ignore[attr-defined]


def serve(config: Config, *, host: str | None = None, port: int | None = None,
          announce: TextIO | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code."""
    app = create_app(config)
    services = app.extensions["bizplugin"]
    server = make_http_server(app, host or config.server.host, config.server.port if port is None else port)

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %s: shutting down", signum)
        threading.Thread(target=stop_http_server, args=(server,), daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    address = f"http://{server.host}:{server.port}"
    log.info("listening on %s", address)
    if announce is not None:
        print(f"listening on {address}", file=announce, flush=True)
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
    from .services import Services

    services = Services.build(config)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    workers = max(config.delivery.workers, 1)
    services.start_background()
    log.info("delivering with %d workers", workers)
    if announce is not None:
        print(f"delivering with {workers} workers", file=announce, flush=True)
    stopping.wait()
    services.close()
    return 0
