"""Redis errors translated at one boundary (as httpx's ``map_httpcore_exceptions``).

A connection that fails, a server that is loading, read-only (a replica) or
out of memory becomes :class:`~openim_bizplugin.errors.StorageUnavailable`
(a 503, and a ConfigError at start-up). Other Redis errors are bugs in our
commands and propagate as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import redis.exceptions as rexc

from ..errors import StorageUnavailable

UNAVAILABLE = (rexc.ConnectionError, rexc.TimeoutError, rexc.ReadOnlyError, rexc.OutOfMemoryError,
               rexc.MasterDownError)
F = TypeVar("F", bound=Callable[..., Any])


def translated(method: F) -> F:
    """Wrap a store method so that an unreachable Redis raises StorageUnavailable."""
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except UNAVAILABLE as exc:
            raise StorageUnavailable(f"redis: {exc}") from exc
    return wrapper  # type: ignore[return-value]
