"""Redis storage for the operator page's sessions and its sign-in throttle (the twin of
:mod:`.sqlite_sessions`).

``session:<id>`` is a string holding when the session ends; ``failures:<name>``
a hash ``count``/``ends_ms``. Both end by the caller's clock (the injected
``now_ms``, as everywhere in the store) and carry a ``PX`` so Redis drops them
once over. Mixed into :class:`.redis.RedisStore`.
"""

from __future__ import annotations

from typing import Any

from .redis_errors import translated

# KEYS[1]: the counter; ARGV[1]: now_ms, ARGV[2]: window_ms. Starts a new window when the last is over.
COUNT_FAILURE = r"""
local now = tonumber(ARGV[1])
local found = redis.call('HMGET', KEYS[1], 'count', 'ends_ms')
local count, ends = tonumber(found[1]) or 0, tonumber(found[2]) or 0
if ends <= now then count, ends = 0, now + tonumber(ARGV[2]) end
count = count + 1
redis.call('HSET', KEYS[1], 'count', count, 'ends_ms', ends)
redis.call('PEXPIRE', KEYS[1], ends - now)
return count
"""


class RedisSessionsMixin:
    """Operator sessions and failure counts (see :class:`~openim_bizplugin.store.base.Store`)."""

    _redis: Any  # redis.Redis, provided by RedisStore
    _scripts: dict[str, Any]

    def _k(self, name: str) -> str: ...  # provided by RedisStore

    @translated
    def open_session(self, session_id: str, now_ms: int, expires_ms: int) -> None:
        self._redis.set(self._k(f"session:{session_id}"), expires_ms, px=max(expires_ms - now_ms, 1))

    @translated
    def touch_session(self, session_id: str, now_ms: int, expires_ms: int) -> bool:
        key = self._k(f"session:{session_id}")
        ends = self._redis.get(key)
        if ends is None or int(ends) <= now_ms:
            return False
        # XX: a sign-out that deleted it since the GET is not undone
        return bool(self._redis.set(key, expires_ms, px=max(expires_ms - now_ms, 1), xx=True))

    @translated
    def close_session(self, session_id: str) -> None:
        self._redis.delete(self._k(f"session:{session_id}"))

    @translated
    def count_failure(self, name: str, now_ms: int, window_ms: int) -> int:
        if "count_failure" not in self._scripts:
            self._scripts["count_failure"] = self._redis.register_script(COUNT_FAILURE)
        return int(self._scripts["count_failure"](keys=[self._k(f"failures:{name}")], args=[now_ms, window_ms]))

    @translated
    def failures(self, name: str, now_ms: int) -> tuple[int, int]:
        count, ends = self._redis.hmget(self._k(f"failures:{name}"), ("count", "ends_ms"))
        if count is None or int(ends) <= now_ms:
            return 0, now_ms
        return int(count), int(ends)
