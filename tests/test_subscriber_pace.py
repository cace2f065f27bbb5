"""Each subscriber has its own pace, and every POST a wall-clock deadline (SPEC §7).

The slow subscribers here are real loopback servers on raw sockets: one answers
200 and then trickles its body a byte at a time, one trickles its headers, so
no single read ever waits long enough for ``requests``' per-read timeout.
"""

from __future__ import annotations

import itertools
import select
import socket
import threading
import time

from test_subscribers import (PRESENCE_EVENTS, clock, dispatcher, new_secret, presence,  # noqa: F401 - fixtures
                              receivers)
from openim_bizplugin.config import SubscriberConfig

BODY_TRICKLE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000000\r\n\r\n"
HEADER_TRICKLE = b"HTTP/1.1 200 OK\r\nX-Slow: "


class Trickler:
    """Reads a request, sends *head*, then one byte every *interval* seconds until the client hangs up."""

    def __init__(self, head: bytes, interval: float = 0.05) -> None:
        self.head, self.interval = head, interval
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/hook"
        self.requests, self.hung_up, self.closing = 0, threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            self.requests += 1
            conn.sendall(self.head)
            for _ in itertools.count():
                if self.closing.is_set():
                    return
                readable, _, _ = select.select([conn], [], [], self.interval)
                if readable and not conn.recv(65536):  # the client closed its end
                    self.hung_up.set()
                    return
                try:
                    conn.send(b"a")
                except OSError:
                    self.hung_up.set()
                    return

    def close(self) -> None:
        self.closing.set()
        self.server.close()


def _step_in_thread(d) -> list[int]:
    """Run one round in a thread; returns its result once it is back (waiting at most 20 s)."""
    done: list[int] = []
    worker = threading.Thread(target=lambda: done.append(d.step()), daemon=True)
    worker.start()
    worker.join(20)
    return done


def test_a_200_whose_body_trickles_is_delivered_and_cut_at_the_deadline(dispatcher):
    slow = Trickler(BODY_TRICKLE)
    try:
        d = dispatcher(SubscriberConfig(slow.url, new_secret(), PRESENCE_EVENTS), timeout_seconds=0.5)
        presence(d.store, d.clock, "u1", True)
        assert _step_in_thread(d) == [1]  # the 200 was the answer: the event counts as taken
        assert slow.hung_up.wait(5)  # and the sidecar hung up instead of reading the body for ever
        assert d.store.subscriber_cursor(slow.url).last_error is None
    finally:
        slow.close()


def test_headers_that_trickle_fail_the_post_at_its_deadline(dispatcher):
    slow = Trickler(HEADER_TRICKLE)
    try:
        d = dispatcher(SubscriberConfig(slow.url, new_secret(), PRESENCE_EVENTS), timeout_seconds=0.5)
        presence(d.store, d.clock, "u1", True)
        assert _step_in_thread(d) == [0]
        cursor = d.store.subscriber_cursor(slow.url)
        assert cursor.attempts == 1 and cursor.last_error.startswith("DeadlineExceeded: no answer within 0.5 s")
        assert slow.hung_up.wait(5)
    finally:
        slow.close()


def test_a_slow_subscriber_never_delays_another(dispatcher, receivers):
    slow = Trickler(HEADER_TRICKLE)
    healthy, secret = receivers()
    d = dispatcher(SubscriberConfig(slow.url, new_secret(), PRESENCE_EVENTS),  # served first, in config order
                   SubscriberConfig(healthy.url, secret, PRESENCE_EVENTS), timeout_seconds=30)
    d.start()
    try:
        for user in ("u1", "u2", "u3"):
            presence(d.store, d.clock, user, True)
            d.wake()
        deadline = time.monotonic() + 10
        while len(healthy.taken) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [r.payload["data"]["user_id"] for r in healthy.taken] == ["u1", "u2", "u3"]
        assert slow.requests == 1 and not slow.hung_up.is_set()  # its first POST is still being answered
    finally:
        slow.close()
        d.stop(timeout=5)
