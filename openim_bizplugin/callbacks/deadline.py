"""HTTP POSTs that end by a wall-clock deadline.

``requests``' timeout bounds the connect and each read, not the whole answer: a
subscriber that answers 200 and then trickles its body a byte at a time held
the dispatcher for 87 s with a 10 s timeout. Here a watchdog timer cuts the
connection in use once the deadline has passed (it shuts its socket down), so
the blocked read returns at once. The adapter remembers the connections it
opened for that; each :class:`DeadlineSession` serves one subscriber, one POST
at a time, so cutting all of them cuts exactly the late one.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import requests
from requests.adapters import HTTPAdapter

T = TypeVar("T")


class DeadlineExceeded(Exception):
    """No complete answer came before the deadline; the connection was cut."""


class _CuttableAdapter(HTTPAdapter):
    """An adapter whose pools record each connection they open, so :meth:`cut` can reach them."""

    def __init__(self) -> None:
        self.opened: weakref.WeakSet[Any] = weakref.WeakSet()
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        _record_connections(self.poolmanager, self.opened)

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        _record_connections(manager, self.opened)
        return manager

    def cut(self) -> None:
        """Shut down the socket of every connection opened here (an idle one is reopened later)."""
        for connection in list(self.opened):
            sock = getattr(connection, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _record_connections(manager: Any, opened: weakref.WeakSet[Any]) -> None:
    """Make *manager*'s pools add every connection they open to *opened*."""
    def recording(pool_class: type) -> type:
        def _new_conn(pool: Any) -> Any:
            connection = pool_class._new_conn(pool)
            opened.add(connection)
            return connection
        return type(pool_class.__name__, (pool_class,), {"_new_conn": _new_conn})

    manager.pool_classes_by_scheme = {scheme: recording(pool_class)
                                      for scheme, pool_class in manager.pool_classes_by_scheme.items()}


class DeadlineSession:
    """A ``requests`` session whose POST, answer included, ends within its deadline."""

    def __init__(self) -> None:
        self.session = requests.Session()
        self._adapter = _CuttableAdapter()
        for prefix in ("http://", "https://"):
            self.session.mount(prefix, self._adapter)

    def post(self, url: str, deadline_seconds: float, read: Callable[[requests.Response], T], **kwargs: Any) -> T:
        """POST to *url* and return ``read(response)``; raises DeadlineExceeded when the answer is not
        there by *deadline_seconds* (a late body, once the status has come, only ends *read* early),
        or requests' own errors."""
        late = threading.Event()

        def cut() -> None:
            late.set()
            self._adapter.cut()

        watchdog = threading.Timer(deadline_seconds, cut)
        watchdog.daemon = True
        watchdog.start()
        try:
            response = self.session.post(url, stream=True, **kwargs)
            if late.is_set():  # cut while the headers came (http.client takes the cut for their end)
                response.close()
                raise DeadlineExceeded(f"no answer within {deadline_seconds:g} s")
            try:
                return read(response)
            finally:
                response.close()
        except requests.RequestException:
            if late.is_set():
                raise DeadlineExceeded(f"no answer within {deadline_seconds:g} s") from None
            raise
        finally:
            watchdog.cancel()

    def close(self) -> None:
        self.session.close()
