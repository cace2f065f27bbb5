"""The retention sweep (SPEC §2 ``[retention]``): finished data does not pile up for ever.

Every ``retention.sweep_seconds`` one process of the deployment (a shared lock,
held for that long, picks it) deletes what the store says is past its
retention (:meth:`~.store.base.Store.sweep`), in steps of a few short
transactions. Between two steps it pauses as long as the last one took, so the
sweep holds the write lock at most about half the time, and it stops after half
a period: a backlog (the first sweep of a file kept for months) is worked off
over several periods while intake, delivery and callbacks go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .background import BackgroundLoop
from .config import Config
from .counters import DISCARD, Metrics
from .errors import StorageUnavailable
from .store.base import Retention, Store, Swept

log = logging.getLogger(__name__)
LOCK = "retention"


def retention_of(config: Config) -> Retention:
    """The store's retention settings from ``[retention]``."""
    return Retention(finished_ms=config.retention.finished_seconds * 1000,
                     dead_letter_ms=config.retention.dead_letter_seconds * 1000)


class RetentionSweeper:
    """Runs the sweep every ``sweep_seconds``; ``step()`` is one sweep when it is due."""

    def __init__(self, config: Config, store: Store, clock: Callable[[], float] = time.time, *,
                 owner: str = "sweeper", pause: Callable[[float], None] = time.sleep) -> None:
        self.store, self.clock, self.owner, self.pause = store, clock, owner, pause
        self.retention = retention_of(config)
        self.period = config.retention.sweep_seconds
        self.metrics: Metrics = DISCARD  # the app's, once metrics.install() hands it over
        self.loop = BackgroundLoop("retention", self.step)
        self._next = 0.0  # when this process may sweep again (at once after start-up)

    def step(self) -> int:
        """Sweep if a period has passed and no other process swept in it; returns 0 (the loop's
        polls are cheap: a clock read)."""
        now = self.clock()
        if now < self._next:
            return 0
        self._next = now + self.period
        try:
            # not released afterwards: the other processes skip this period
            if self.store.try_lock(LOCK, self.owner, self.period * 1000):
                self._count(self.sweep())
        except StorageUnavailable as exc:
            log.warning("retention sweep left for the next period: %s", exc, extra={"event": "retention.failed"})
        return 0

    def sweep(self) -> Swept:
        """Delete what is past its retention, step by step, for at most half a period."""
        total, stop_at = Swept(), time.monotonic() + self.period / 2
        while True:
            started = time.monotonic()
            swept = self.store.sweep(int(self.clock() * 1000), self.retention)
            total.messages += swept.messages
            total.recipients += swept.recipients
            total.presence += swept.presence
            if not swept.more or self.loop.stopping or time.monotonic() >= stop_at:
                return total
            self.pause(time.monotonic() - started)  # let the others write between two steps

    def _count(self, swept: Swept) -> None:
        for what in ("messages", "recipients", "presence"):
            self.metrics.deleted(what, getattr(swept, what))
        if swept.messages or swept.presence:
            log.info("retention: deleted %d messages (%d recipients) and the presence of %d users",
                     swept.messages, swept.recipients, swept.presence,
                     extra={"event": "retention.swept", "messages": swept.messages, "recipients": swept.recipients})

    def start(self) -> None:
        """Sweep in a background thread of this process."""
        self.loop.start(1)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the step in flight (the next sweep goes on where this one stopped)."""
        self.loop.stop(timeout)
