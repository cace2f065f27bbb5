"""The API rate limit per client (``[clients.<id>] rate_limit = "50/second"``).

A token bucket per client: ``count`` requests may come at once, refilled
evenly over the period. Over it the caller gets 429 with ``Retry-After``. The
buckets live in this process, so each replica enforces the limit on its own
share of the traffic.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping

from .catalog.registry import RateLimit
from .errors import RateLimited


class _Bucket:
    def __init__(self, limit: RateLimit, now: float) -> None:
        self.capacity = float(limit.count)
        self.per_second = limit.count / limit.period_seconds
        self.tokens, self.updated = self.capacity, now

    def take(self, now: float) -> float:
        """0 when a request may go now, else the seconds until one may."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.per_second)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.per_second


class ClientRateLimiter:
    """Checks each client's requests against its configured rate."""

    def __init__(self, limits: Mapping[str, str | None], clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._limits = {client: RateLimit.parse(text) for client, text in limits.items() if text}
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def check(self, client_id: str) -> None:
        """Raise RateLimited (429, Retry-After) when *client_id* is over its rate."""
        limit = self._limits.get(client_id)
        if limit is None:
            return
        with self._lock:
            now = self.clock()
            bucket = self._buckets.setdefault(client_id, _Bucket(limit, now))
            wait = bucket.take(now)
        if wait:
            retry_after = max(1, math.ceil(wait))
            raise RateLimited(f"client {client_id!r} is over its rate limit of {limit.text}",
                              headers={"Retry-After": str(retry_after)})
