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
FORGET_ABOVE = 100_000  # approvals kept before the ones whose window has passed are dropped


class RecipientThrottle:
    """Applies each type's per-recipient rate limit to a round of items."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store, self.clock = store, clock
        self._approved: dict[tuple[str, str, str], list[int]] = {}  # this process's recent approvals
        self._lock = threading.Lock()
        self._forget_above = FORGET_ABOVE

    def apply(self, items: list[WorkItem], record: Record) -> list[WorkItem]:
        """Record delayed/throttled outcomes; return the items that may go now (in order)."""
        now_ms = int(self.clock() * 1000)
        limited: dict[tuple[str, str, str], list[WorkItem]] = {}  # (kind, type, rate) -> items
        for item in items:
            if text := item.delivery.get("rate_limit"):
                limited.setdefault((item.kind, item.type, text), []).append(item)
        held_back: set[int] = set()
        for (kind, type_, text), group in limited.items():
            limit = RateLimit.parse(text)
            window_ms = limit.period_seconds * 1000
            # one query per round and type, not one per recipient (a Redis round trip each)
            sent_times = self.store.sent_times(kind, list({i.target: None for i in group}), type_,
                                               now_ms - window_ms)
            refused = []
            with self._lock:  # once per group: the approvals are shared by this process's threads
                for item in group:
                    sent = sent_times.get(item.target, [])
                    if not self._approve((kind, item.target, type_), len(sent), limit.count, now_ms, window_ms):
                        refused.append((item, sent))
            for item, sent in refused:
                held_back.add(id(item))
                if item.delivery.get("rate_limit_policy") == "drop":
                    record(item, Outcome.throttled(f"dropped: {item.type} rate limit {limit.text} reached"))
                else:
                    opens_ms = (sent[0] if sent else now_ms) + window_ms
                    record(item, Outcome.deferred(f"delayed: {item.type} rate limit {limit.text}", opens_ms))
        return [item for item in items if id(item) not in held_back]

    def _approve(self, key: tuple[str, str, str], sent: int, count: int, now_ms: int, window_ms: int) -> bool:
        """Take a slot in the window unless the sends recorded, or this process's approvals, fill it
        (the caller holds the lock)."""
        cutoff = now_ms - window_ms
        recent = [t for t in self._approved.get(key, ()) if t > cutoff]
        if max(sent, len(recent)) >= count:
            self._approved[key] = recent
            return False
        recent.append(now_ms)
        self._approved[key] = recent
        if len(self._approved) > self._forget_above:  # forget windows that have passed
            self._approved = {k: v for k, v in self._approved.items() if v and v[-1] > cutoff}
            # rebuilt only once it has doubled again: not on every approval when all are recent
            self._forget_above = max(FORGET_ABOVE, 2 * len(self._approved))
        return True
