"""Storage backends behind one interface (see :mod:`.base`)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from ..config import StorageConfig
from ..errors import ConfigError, StorageUnavailable
from .base import Store
from .sqlite import MAX_BATCH, SqliteStore


def open_store(config: StorageConfig, event_types: frozenset[str] = frozenset(),
               batch_size: int = MAX_BATCH) -> Store:
    """Open the backend named by ``storage.url``; a failure is a config error.

    Only events of *event_types* (what subscribers listen to) are kept in the outbox;
    *batch_size* is ``delivery.batch_size``, the users of one ``batch_send_msg``.
    """
    if config.url.startswith(("redis://", "rediss://")):
        from .redis import RedisStore  # the Redis client is loaded only when it is used

        try:
            return RedisStore(config.url, event_types)
        except StorageUnavailable as exc:
            raise ConfigError(f"storage.url: {exc.detail} ({shown_url(config.url)})") from None
    try:
        return SqliteStore(config.sqlite_path, event_types, batch_size=batch_size,
                           lock_wait_seconds=config.lock_wait_seconds)
    except StorageUnavailable as exc:
        raise ConfigError(f"storage.url: {exc.detail} ({config.sqlite_path})") from None


def shown_url(url: str) -> str:
    """*url* without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
