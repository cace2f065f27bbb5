"""Storage backends behind one interface (see :mod:`.base`)."""

from __future__ import annotations

from ..config import StorageConfig
from ..errors import ConfigError, StorageUnavailable
from .base import Store
from .sqlite import SqliteStore


def open_store(config: StorageConfig, event_types: frozenset[str] = frozenset()) -> Store:
    """Open the backend named by ``storage.url``; a failure is a config error.

    Only events of *event_types* (what subscribers listen to) are kept in the outbox.
    """
    try:
        return SqliteStore(config.sqlite_path, event_types)
    except StorageUnavailable as exc:
        raise ConfigError(f"storage.url: {exc.detail} ({config.sqlite_path})") from None
