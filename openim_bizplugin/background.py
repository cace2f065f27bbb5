"""Background loops: a ``step()`` run over and over in threads of this process.

Delivery, callback processing and subscriber events each have a ``step()``
that does one round and says how much it did; this runs it until stopped,
pausing when a round found nothing (a ``wake()`` cuts the pause short).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)
IDLE_POLL_SECONDS = 1.0


class BackgroundLoop:
    """Runs *step* in threads until :meth:`stop`; errors never end the loop.

    With *gather_seconds*, a thread that was woken, or whose round did less
    than *full_round*, waits that long before its next round, so work that
    arrives in a trickle is done in rounds of many (each round has a fixed
    cost: a transaction, a commit) instead of one round per item.
    """

    def __init__(self, name: str, step: Callable[[], int],
                 idle_seconds: Callable[[], float] = lambda: IDLE_POLL_SECONDS, *,
                 gather_seconds: float = 0.0, full_round: int = 0) -> None:
        self.name, self.step, self.idle_seconds = name, step, idle_seconds
        self.gather_seconds, self.full_round = gather_seconds, full_round
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called: rounds should end early."""
        return self._stop.is_set()

    def wake(self) -> None:
        """There is new work: let an idle thread look now instead of after its pause."""
        self._wake.set()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                done = self.step()
                if done and done >= self.full_round:
                    continue
                pause = 0.0 if done else self.idle_seconds()
            except Exception:
                log.exception("%s round failed; trying again after a pause", self.name)
                done, pause = 0, IDLE_POLL_SECONDS
            if not done:
                self._wake.wait(min(max(pause, 0.0), IDLE_POLL_SECONDS))
                self._wake.clear()
            if self.gather_seconds:
                self._stop.wait(self.gather_seconds)

    def start(self, threads: int = 1) -> None:
        for n in range(threads):
            thread = threading.Thread(target=self.run, name=f"{self.name}-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the rounds in flight; waits at most *timeout* seconds in all."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()
