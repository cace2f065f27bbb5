"""The API rate limit per client (``[clients.<id>] rate_limit = "50/second"``).

A sliding window counter: the requests of the current window plus those of
the previous one, weighted by how much of it still overlaps the last period,
may not pass ``count``. Over it the caller gets 429 with ``Retry-After``. The
counts live in the store (:meth:`~openim_bizplugin.store.base.Store.take_rate`),
so the limit holds for the whole service: every process of ``serve`` and every
replica sharing the SQLite file or the Redis database.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

from .catalog.registry import RateLimit
from .errors import RateLimited
from .store.base import Store


class ClientRateLimiter:
    """Checks each client's requests against its configured rate, counted in *store*."""

    def __init__(self, limits: Mapping[str, str | None], store: Store,
                 clock: Callable[[], float] = time.time) -> None:
        self.clock, self.store = clock, store
        self._limits = {client: RateLimit.parse(text) for client, text in limits.items() if text}

    def check(self, client_id: str) -> None:
        """Count a request of *client_id*, or raise RateLimited (429, Retry-After) when it is over its rate."""
        limit = self._limits.get(client_id)
        if limit is None:
            return
        wait_ms = self.store.take_rate(f"client:{client_id}", limit.count, int(limit.period_seconds * 1000),
                                       int(self.clock() * 1000))
        if wait_ms:
            raise RateLimited(f"client {client_id!r} is over its rate limit of {limit.text}",
                              headers={"Retry-After": str(max(1, math.ceil(wait_ms / 1000)))})
