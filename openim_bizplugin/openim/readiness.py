"""Is OpenIM able to work with the sidecar right now? Asked of OpenIM itself, cheaply and with bounds.

An admin token lives 90 days, so holding one proves nothing about OpenIM now:
it may be down, or its secret may have changed. The check makes one admin
call, ``/user/account_check`` of the sender account, which OpenIM answers only
after its own token check has passed (and, after a token refresh, its secret
check too). ``/readyz`` and ``doctor`` use it:

- at most one check runs at a time per process, and its answer is reused for
  ``max_age_seconds`` (a few seconds), so probes never pile calls on OpenIM;
- a caller waits at most ``wait_seconds`` and otherwise hears "no answer",
  while the check in flight goes on (bounded by the client's own timeout).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .client import OpenIMClient, OpenIMError

MAX_AGE_SECONDS = 2.0
WAIT_SECONDS = 3.0


@dataclass(frozen=True)
class OpenIMStatus:
    """The answer of one check: ``ok``, and else why not in one line."""

    ok: bool
    detail: str  # "ok", or what went wrong
    sender_registered: bool | None = None  # None: OpenIM did not answer


class OpenIMReadiness:
    """Checks OpenIM through *client* as the admin, for the sender account *sender_id*."""

    def __init__(self, client: OpenIMClient, sender_id: str, *, max_age_seconds: float = MAX_AGE_SECONDS,
                 wait_seconds: float = WAIT_SECONDS, clock: Callable[[], float] = time.time) -> None:
        self.client, self.sender_id = client, sender_id
        self.max_age_seconds, self.wait_seconds, self._clock = max_age_seconds, wait_seconds, clock
        self._lock = threading.Lock()
        self._last: tuple[float, OpenIMStatus] | None = None
        self._running: threading.Event | None = None

    def check(self) -> OpenIMStatus:
        """OpenIM's state as of at most ``max_age_seconds`` ago, within ``wait_seconds``."""
        with self._lock:
            if self._last is not None and 0 <= self._clock() - self._last[0] <= self.max_age_seconds:
                return self._last[1]
            done = self._running
            if done is None:  # no check in flight: start one
                done = self._running = threading.Event()
                threading.Thread(target=self._run, args=(done,), name="openim-readiness", daemon=True).start()
        if done.wait(self.wait_seconds):
            with self._lock:
                if self._last is not None:
                    return self._last[1]
        return OpenIMStatus(False, f"no answer from OpenIM within {self.wait_seconds:g} s")

    def _run(self, done: threading.Event) -> None:
        try:
            status = self._probe()
        except Exception as exc:  # never leave a waiting caller without an answer
            status = OpenIMStatus(False, f"unexpected error: {type(exc).__name__}")
        with self._lock:
            self._last, self._running = (self._clock(), status), None
        done.set()

    def _probe(self) -> OpenIMStatus:
        try:
            registered = self.client.account_check([self.sender_id]).get(self.sender_id, False)
        except OpenIMError as exc:
            why = "OpenIM refuses the admin token: " if exc.token_refused else ""
            return OpenIMStatus(False, f"{why}{exc}")
        return OpenIMStatus(True, "ok", registered)
