"""Frequency control per type and recipient (``rate_limit`` in ``type.toml``).

"At most 3 per hour per user": before a recipient is sent, the messages of
the same type sent to it within the window are counted (plus the ones this
round already let through). Over the limit, ``rate_limit_policy = "delay"``
puts it back until the window allows (never past the TTL: it expires
instead), and ``"drop"`` ends it ``throttled``. Delivery threads of one
process share their approvals (what one thread let through is not yet
"sent" when the next one counts); separate processes only see each other's
sends, so each may let a few too many through at the edge of a window.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .catalog import RateLimit
from .store.base import Outcome, Store, WorkItem

Record = Callable[[WorkItem, Outcome], None]


class RecipientThrottle:
    """Applies each type's per-recipient rate limit to a round of items."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store, self.clock = store, clock
        self._approved: dict[tuple[str, str, str], list[int]] = {}  # this process's recent approvals
        self._lock = threading.Lock()

    def apply(self, items: list[WorkItem], record: Record) -> list[WorkItem]:
        """Record delayed/throttled outcomes; return the items that may go now."""
        now_ms = int(self.clock() * 1000)
        send_now = []
        for item in items:
            text = item.delivery.get("rate_limit")
            if not text:
                send_now.append(item)
                continue
            limit = RateLimit.parse(text)
            key = (item.kind, item.target, item.type)
            window_ms = limit.period_seconds * 1000
            sent = self.store.sent_times(item.kind, item.target, item.type, now_ms - window_ms)
            if self._approve(key, len(sent), limit.count, now_ms, window_ms):
                send_now.append(item)
            elif item.delivery.get("rate_limit_policy") == "drop":
                record(item, Outcome.throttled(f"dropped: {item.type} rate limit {limit.text} reached"))
            else:
                opens_ms = (sent[0] if sent else now_ms) + window_ms
                record(item, Outcome.deferred(f"delayed: {item.type} rate limit {limit.text}", opens_ms))
        return send_now

    def _approve(self, key: tuple[str, str, str], sent: int, count: int, now_ms: int, window_ms: int) -> bool:
        """Take a slot in the window unless the sends recorded, or this process's approvals, fill it."""
        with self._lock:
            recent = [t for t in self._approved.get(key, ()) if t > now_ms - window_ms]
            if max(sent, len(recent)) >= count:
                self._approved[key] = recent
                return False
            self._approved[key] = recent + [now_ms]
            if len(self._approved) > 100_000:  # forget windows that have passed
                self._approved = {k: v for k, v in self._approved.items() if v and v[-1] > now_ms - window_ms}
            return True
