"""Retry timing, one pure function shared by delivery and subscriber dispatch."""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_seconds(attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2^(attempt-1)))."""
    return rand() * min(cap, base * 2 ** max(attempt - 1, 0))
