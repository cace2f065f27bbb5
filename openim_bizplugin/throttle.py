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
            for item, sent in self._refused(kind, type_, group, sent_times, limit.count, now_ms, window_ms):
                held_back.add(id(item))
                if item.delivery.get("rate_limit_policy") == "drop":
                    record(item, Outcome.throttled(f"dropped: {item.type} rate limit {limit.text} reached"))
                else:
                    opens_ms = (sent[0] if sent else now_ms) + window_ms
                    record(item, Outcome.deferred(f"delayed: {item.type} rate limit {limit.text}", opens_ms))
        return [item for item in items if id(item) not in held_back] if held_back else items

    def _refused(self, kind: str, type_: str, group: list[WorkItem], sent_times: dict[str, list[int]],
                 count: int, now_ms: int, window_ms: int) -> list[tuple[WorkItem, list[int]]]:
        """Take a slot in the window for each item of *group* unless the sends recorded, or this
        process's approvals, fill it; returns the items refused, with their recorded send times.
        Runs per recipient in a round: kept to plain loops (bench_delivery, custom mode)."""
        cutoff = now_ms - window_ms
        refused = []
        with self._lock:  # once per group: the approvals are shared by this process's threads
            approved = self._approved
            for item in group:
                key = (kind, item.target, type_)
                recent = approved.get(key)
                recent = [t for t in recent if t > cutoff] if recent else []
                sent = sent_times.get(item.target, ())
                if len(sent) >= count or len(recent) >= count:
                    refused.append((item, list(sent)))
                else:
                    recent.append(now_ms)
                approved[key] = recent
            if len(approved) > self._forget_above:  # forget windows that have passed
                self._approved = {k: v for k, v in approved.items() if v and v[-1] > cutoff}
                # rebuilt only once it has doubled again: not on every round when all are recent
                self._forget_above = max(FORGET_ABOVE, 2 * len(self._approved))
        return refused
