"""The HTTP engine of ``serve``: waitress, strict and hard to starve.

waitress reads every connection in one I/O thread (asyncore) and hands a
request to a request thread only once it has arrived whole, buffering bodies
past ``inbuf_overflow`` in a temporary file. A slow or half-sent connection
therefore costs a buffer, never a thread, and its memory is bounded (see
docs/deployment.md for the measurements that chose it). On top of waitress:

- deadlines: the headers must arrive within ``header_timeout_seconds`` and the
  whole request within ``body_timeout_seconds`` of its first byte (waitress
  itself only closes connections idle for ``channel_timeout``);
- a *gate* looks at each request as soon as its headers are in, before a byte
  of its body is buffered, and may refuse it (``/v1`` without a known client
  or with a malformed signature token, a body announced over the limit);
- every answer the engine gives itself is problem JSON, and an unknown
  ``Transfer-Encoding`` is a 400 (waitress says 501), like any other framing
  error: nothing malformed ever reaches the app or its error log;
- :func:`run` stops gracefully: no new connections, idle and half-sent ones
  closed at once, requests in flight answered within ``shutdown_seconds``.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher
from waitress.utilities import Error

from ..errors import BizError, PayloadTooLarge, problem
from .wire import LOGGED

log = logging.getLogger(__name__)
# waitress reports a queue of requests waiting for a thread at WARNING on every request: noise under load
logging.getLogger("waitress.queue").setLevel(logging.ERROR)

Gate = Callable[[str, str, Mapping[str, str]], "BizError | None"]
IN_MEMORY_BODY = 128 * 1024  # a body past this is buffered in a temporary file, not in memory
LOOP_SECONDS = 0.25  # how often the I/O loop looks at the stop flag


class MalformedRequest(BizError):
    status, slug, title = 400, "bad-request", "Malformed HTTP request"


class HeadersTooLarge(BizError):
    status, slug, title = 431, "headers-too-large", "Request header fields too large"


@dataclass(frozen=True)
class Limits:
    """What one engine allows; see ``[server]`` in config.example.toml."""

    threads: int
    max_connections: int
    header_timeout_seconds: float
    body_timeout_seconds: float
    keepalive_seconds: float
    shutdown_seconds: float
    max_body_bytes: int  # the engine buffers bodies up to this (decoded); the app may check a smaller limit


class _Problem(Error):
    """A waitress error answer rendered as an RFC 9457 problem document."""

    def __init__(self, exc: BizError) -> None:
        super().__init__(exc.detail)
        self.exc, self.code, self.reason = exc, exc.status, HTTPStatus(exc.status).phrase

    def to_response(self, ident: str | None = None) -> tuple[str, list[tuple[str, str]], bytes]:
        headers = [("Content-Type", "application/problem+json"), *self.exc.headers.items()]
        return f"{self.code} {self.reason}", headers, json.dumps(problem(self.exc)).encode()


def _translated(error: Error, limit: int) -> _Problem:
    """waitress's own error answers as problem documents (its 501 for a transfer coding too)."""
    if error.code == 413:
        return _Problem(PayloadTooLarge(f"body is over the limit of {limit} bytes"))
    if error.code == 431:
        return _Problem(HeadersTooLarge("request headers are over the limit"))
    return _Problem(MalformedRequest(f"malformed request: {str(error.body)[:200]}"))


class _Parser(HTTPRequestParser):
    """waitress's parser, plus the gate, the decoded body limit and problem answers."""

    gate: Gate = staticmethod(lambda method, path, headers: None)  # type: ignore[assignment]
    body_limit = 0
    gated = False

    def received(self, data: bytes) -> int:
        consumed = super().received(data)
        if self.error is not None:
            if not isinstance(self.error, _Problem):
                self.error = _translated(self.error, self.body_limit)
        elif self.headers_finished and not self.gated:
            self.gated = True  # the headers are in; no body byte has been buffered yet
            refusal = self.gate(self.command, self.path, self.headers)
            if refusal is not None:
                self._refuse(refusal)
        elif self.body_rcv is not None and len(self.body_rcv) > self.body_limit:  # chunked, decoded
            self._refuse(PayloadTooLarge(f"body is over the limit of {self.body_limit} bytes"))
        return consumed

    def _refuse(self, exc: BizError) -> None:
        self.error, self.completed, self.expect_continue = _Problem(exc), True, False


class _Channel(HTTPChannel):
    """A connection; remembers when the request being read began (the deadlines)."""

    parser_class = _Parser
    started = 0.0

    def received(self, data: bytes) -> bool:
        if self.request is None and data:
            self.started = time.monotonic()
        return super().received(data)

    @property
    def busy(self) -> bool:
        """A request of this connection is being answered, or its answer is still being sent."""
        return bool(self.requests) or self.total_outbufs_len > 0


class _Server(TcpWSGIServer):
    """waitress's server on an inherited listening socket, with request deadlines."""

    channel_class = _Channel
    limits: Limits

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # idle connections (channel_timeout)
        monotonic = time.monotonic()
        for channel in list(self.active_channels.values()):
            request = channel.request
            if request is None or channel.requests:
                continue
            limit = (self.limits.body_timeout_seconds if request.headers_finished
                     else self.limits.header_timeout_seconds)
            if monotonic - channel.started > limit:
                channel.will_close = True  # too slow: closed without an answer


def _access_logged(app: Callable, mask: Callable[[str], str]) -> Callable:
    """The WSGI *app*, logging one ``http.access`` line per answered request the app did not log itself."""
    def logged(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        def start(status: str, headers: list, exc_info: Any = None) -> Callable:
            if environ.get(LOGGED):
                return start_response(status, headers, exc_info)
            code = int(status[:3])
            path = mask(environ.get("PATH_INFO", ""))
            remote, method = environ.get("REMOTE_ADDR", "-"), environ.get("REQUEST_METHOD", "-")
            log.info('%s "%s %s" %s', remote, method, path, code, extra={
                "event": "http.access", "remote": remote, "method": method, "path": path, "status": code})
            return start_response(status, headers, exc_info)
        return app(environ, start)
    return logged


def build(app: Callable, sock: socket.socket, limits: Limits, gate: Gate,
          mask: Callable[[str], str]) -> _Server:
    """An engine serving *app* on the listening socket *sock* (not started: see :func:`run`)."""
    adj = Adjustments(
        threads=limits.threads, connection_limit=limits.max_connections, asyncore_use_poll=True,
        channel_timeout=max(1, round(limits.keepalive_seconds)), cleanup_interval=1,
        max_request_body_size=limits.max_body_bytes * 2 + 65536,  # raw bytes, chunk framing included
        inbuf_overflow=IN_MEMORY_BODY, ident="openim-bizplugin", expose_tracebacks=False)
    parser = type("Parser", (_Parser,), {"gate": staticmethod(gate), "body_limit": limits.max_body_bytes})
    channel = type("Channel", (_Channel,), {"parser_class": parser})
    server_class = type("Server", (_Server,), {"channel_class": channel, "limits": limits})
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(limits.threads)
    return server_class(_access_logged(app, mask), {}, True, sock, dispatcher=dispatcher, adj=adj,
                        bind_socket=False, sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()))


def run(server: _Server, stopping: Callable[[], bool]) -> None:
    """Serve until *stopping()* says so, then stop gracefully (see the module's docstring)."""
    socket_map = server._map
    while not stopping():
        wasyncore.loop(timeout=LOOP_SECONDS, use_poll=True, map=socket_map, count=1)
    server.accepting = False  # no poll on the listening socket any more: others take new connections
    deadline = time.monotonic() + server.limits.shutdown_seconds
    while time.monotonic() < deadline:
        channels = [c for c in socket_map.values() if isinstance(c, _Channel)]
        for channel in channels:
            if not channel.busy:
                channel.will_close = True  # idle, or still sending its request: not in flight
        if not any(channel.busy for channel in channels) and not server.task_dispatcher.queue:
            break
        wasyncore.loop(timeout=0.05, use_poll=True, map=socket_map, count=1)
    server.task_dispatcher.shutdown(cancel_pending=True, timeout=max(0.0, deadline - time.monotonic()))
    wasyncore.close_all(socket_map)
