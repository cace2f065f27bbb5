"""Frequency control per type and recipient (``rate_limit`` in ``type.toml``).

"At most 3 per hour per user": before a recipient is sent, the messages of
the same type sent to it within the window are counted (plus the ones this
round already let through). Over the limit, ``rate_limit_policy = "delay"``
puts it back until the window allows (never past the TTL: it expires
instead), and ``"drop"`` ends it ``throttled``. Concurrent workers may let
one message too many through at the edge of a window; the limit is a
courtesy to users, not an accounting rule.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from .catalog import RateLimit
from .store.base import Outcome, Store, WorkItem

Record = Callable[[WorkItem, Outcome], None]


class RecipientThrottle:
    """Applies each type's per-recipient rate limit to a round of items."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store, self.clock = store, clock

    def apply(self, items: list[WorkItem], record: Record) -> list[WorkItem]:
        """Record delayed/throttled outcomes; return the items that may go now."""
        now_ms = int(self.clock() * 1000)
        passed: Counter[tuple[str, str, str]] = Counter()
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
            if len(sent) + passed[key] < limit.count:
                passed[key] += 1
                send_now.append(item)
            elif item.delivery.get("rate_limit_policy") == "drop":
                record(item, Outcome.throttled(f"dropped: {item.type} rate limit {limit.text} reached"))
            else:
                opens_ms = (sent[0] if sent else now_ms) + window_ms
                record(item, Outcome.deferred(f"delayed: {item.type} rate limit {limit.text}", opens_ms))
        return send_now
