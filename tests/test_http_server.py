"""The embedded HTTP server of ``serve``: kept-alive connections as OpenIM's Go client uses them,
closed whenever reusing them could mix up requests, and a stop that waits for nothing idle.

The app is the real sidecar, served on loopback by ``make_http_server`` in a thread.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from openim_bizplugin.server import make_http_server, stop_http_server

TOKEN = "test-callback-token-0001"  # conftest's callbacks.token
ONLINE = f"/openim/callback/{TOKEN}/callbackAfterUserOnlineCommand"
CONTINUE = {"actionCode": 0, "errCode": 0, "errMsg": "", "errDlt": "", "nextCode": 0}


def online(seq: int) -> bytes:
    return json.dumps({"callbackCommand": "callbackAfterUserOnlineCommand", "operationID": f"op-{seq}",
                       "platformID": 1, "platform": "IOS", "userID": "u1001", "seq": seq,
                       "isAppBackground": False, "connID": ""}).encode() + b"\n"  # Go's encoder adds one


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class Server:
    """The sidecar app on a real socket; ``entered``/``release`` hold requests to /held in the app."""

    def __init__(self, app: Any, idle_seconds: float) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

        def wsgi(environ: dict, start_response: Any) -> Any:
            if environ["PATH_INFO"] == "/held":
                self.entered.set()
                self.release.wait(10)
                environ["PATH_INFO"] = "/healthz"
            return app.wsgi_app(environ, start_response)

        self.http = make_http_server(wsgi, "127.0.0.1", 0, idle_seconds=idle_seconds)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def connect(self) -> Connection:
        return Connection(socket.create_connection(("127.0.0.1", self.http.port), timeout=10))

    def stop(self) -> None:
        stop_http_server(self.http)
        self.http.server_close()  # waits for the connection threads


class Connection:
    """A raw client socket that reads answers one by one, so requests can be pipelined."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.reader = sock, sock.makefile("rb")

    def makefile(self, *_: Any, **__: Any) -> Any:  # http.client.HTTPResponse reads through this
        return _Shared(self.reader)

    def answer(self) -> http.client.HTTPResponse:
        response = http.client.HTTPResponse(self)  # type: ignore[arg-type]
        response.begin()
        response.body = response.read()  # type: ignore[attr-defined]
        return response

    def closed_by_server(self) -> bool:
        """True when the server ended the connection (end of stream within the socket timeout)."""
        return self.reader.read(1) == b""


class _Shared:
    """The connection's one reader, which a finished answer must not close (the next one reads on)."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reader, name)

    def close(self) -> None:
        pass


@pytest.fixture
def serve(app: Any) -> Iterator[Any]:
    servers: list[Server] = []

    def start(idle_seconds: float = 60.0) -> Server:
        servers.append(Server(app, idle_seconds))
        return servers[-1]

    yield start
    for server in servers:
        server.release.set()
        if server.thread.is_alive():
            server.stop()


def test_callbacks_on_one_kept_alive_connection_are_each_answered_and_stored(serve, store):
    server = serve()
    conn = http.client.HTTPConnection("127.0.0.1", server.http.port, timeout=10)
    conn.connect()
    first_socket = conn.sock
    for seq in (1, 2, 3):
        conn.request("POST", ONLINE, online(seq), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())) == (200, CONTINUE)
        assert response.getheader("Connection") != "close"
    assert conn.sock is first_socket  # never reconnected
    assert len(store.pending_callbacks(10)) == 3


def test_pipelined_requests_are_answered_in_order(serve, store):
    conn = serve().connect()
    conn.sock.sendall(post(ONLINE, online(1)) + b"GET /healthz HTTP/1.1\r\nHost: sidecar\r\n\r\n"
                      + post(ONLINE, online(2)))
    answers = [conn.answer() for _ in range(3)]
    assert [a.status for a in answers] == [200, 200, 200]
    assert [json.loads(a.body) for a in answers] == [CONTINUE, {"status": "ok"}, CONTINUE]
    assert len(store.pending_callbacks(10)) == 2


@pytest.mark.parametrize("request_bytes", [
    # a wrong token is refused before the body is read: the body (here shaped like a request) is
    # never taken for the next request
    post("/openim/callback/wrong-token/callbackAfterUserOnlineCommand",
         b"GET /healthz HTTP/1.1\r\nHost: sidecar\r\n\r\n"),
    post(ONLINE, online(1), extra="Connection: close\r\n"),  # the client asked
    (f"POST {ONLINE} HTTP/1.1\r\nHost: sidecar\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    + f"{len(online(1)):x}\r\n".encode() + online(1) + b"\r\n0\r\n\r\n",  # chunked bodies are not counted
], ids=["unread-body", "client-asks", "chunked"])
def test_a_connection_that_cannot_be_reused_safely_is_closed_after_its_answer(serve, request_bytes):
    conn = serve().connect()
    conn.sock.sendall(request_bytes)
    answer = conn.answer()
    assert answer.status in (200, 404)
    assert answer.getheader("Connection") == "close"
    assert conn.closed_by_server()


def test_an_idle_connection_is_closed_after_the_idle_time(serve):
    conn = serve(idle_seconds=0.2).connect()
    conn.sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: sidecar\r\n\r\n")
    assert conn.answer().status == 200
    assert conn.closed_by_server()  # within the client's 10 s socket timeout


def test_stopping_closes_idle_connections_and_finishes_the_request_in_flight(serve):
    server = serve()
    idle = server.connect()
    idle.sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: sidecar\r\n\r\n")
    assert idle.answer().status == 200
    busy = server.connect()
    busy.sock.sendall(b"GET /held HTTP/1.1\r\nHost: sidecar\r\n\r\n")
    assert server.entered.wait(10)

    stopper = threading.Thread(target=server.stop)
    stopper.start()
    assert idle.closed_by_server()  # at once, not after the 60 s idle time
    server.release.set()
    answer = busy.answer()
    assert (answer.status, answer.getheader("Connection")) == (200, "close")
    assert busy.closed_by_server()
    stopper.join(10)
    assert not stopper.is_alive()
