"""OpenIM's webhook callbacks: ``POST /openim/callback/<token>/<callbackCommand>`` (SPEC §6).

OpenIM appends the command to the ``url`` of its ``webhooks.yml``, so that
url is ``http://HOST:PORT/openim/callback/<token>``. The recipe is
warehouse's: authenticate (the unguessable token, compared in constant
time), deduplicate on a natural key, store, and only then process — in
:class:`~.callback_handlers.CallbackProcessor`, not here. The endpoint is
WSGI middleware in front of the Flask app (:class:`CallbackEndpoint`), not a
Flask view: it is the one hot path that OpenIM drives in bursts.

Whatever happens after the token check, OpenIM gets its "continue" JSON with
HTTP 200 at once: OpenIM's after-callbacks wait in a queue of 100 with two
workers and are dropped after 3 s, and its before-callbacks *block* sending
on any failure (it ignores ``failedContinue``), so a slow or failing answer
here would lose events or stop chat. Unknown commands are understood and
ignored (zulip's rule), not stored. A body over ``callbacks.max_body_bytes``
(OpenIM's are a few KB) is answered "continue" as well and not stored: a 413
would stop the user's message on a before-callback, and OpenIM never retries
an after-callback, so refusing it only costs chat (it is logged and counted
``too-large``).

"At once" holds while storage stalls too: the inbox write gets
:data:`INBOX_WAIT_SECONDS` (see :class:`InboxWriter`).
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from werkzeug.exceptions import ClientDisconnected
from werkzeug.wsgi import get_content_length, get_input_stream

from ..callbacks.processing import HANDLERS, natural_key
from ..errors import PayloadTooLarge, StorageBusy, StorageUnavailable
from ..services import Services
from . import metrics
from .wire import read_body

log = logging.getLogger(__name__)

PREFIX = "/openim/callback/"
CONTINUE = {"actionCode": 0, "errCode": 0, "errMsg": "", "errDlt": "", "nextCode": 0}
_CONTINUE_BODY = json.dumps(CONTINUE, separators=(",", ":")).encode()
_CONTINUE_LENGTH = str(len(_CONTINUE_BODY))


def _fields(command: str, operation_id: str | None) -> dict[str, Any]:
    """The structured log fields of a received callback (both come from the request: kept short)."""
    return {"event": "callback.received", "callback": command[:80],
            "operation_id": (operation_id or "")[:128] or None}


def take_callback(services: Services, command: str, body: bytes, operation_id: str | None,
                  writer: InboxWriter) -> str:
    """Store one callback for processing (through *writer*, bounded); never raises.

    ``stored``, ``duplicate`` (seen before), ``ignored`` (a command we do not
    handle), ``unparseable`` (not a JSON object) or ``failed`` (storage).
    """
    try:
        text = body.decode("utf-8")
        payload: Any = json.loads(text)
    except (ValueError, RecursionError):  # bad UTF-8, bad JSON, or nested too deep to parse
        log.warning("callback %s (operationID %s): body is not JSON; ignored", command[:80], operation_id,
                    extra=_fields(command, operation_id))
        return "unparseable"
    key = natural_key(command, payload)
    if key is None:
        log.debug("callback %s (operationID %s): not handled; ignored", command[:80], operation_id,
                  extra=_fields(command, operation_id))
        return "ignored"
    if not isinstance(payload, dict):
        log.warning("callback %s (operationID %s): body is not a JSON object; ignored", command, operation_id,
                    extra=_fields(command, operation_id))
        return "unparseable"
    try:
        received_ms = int(services.clock() * 1000)
        stored = writer.record(services.store, command, key, text, received_ms)
    except StorageUnavailable as exc:
        log.error("callback %s (operationID %s) lost: %s", command, operation_id, exc,
                  extra=_fields(command, operation_id))
        return "failed"
    except Exception:  # answering OpenIM matters more than this one event
        log.exception("callback %s (operationID %s) lost: unexpected error", command, operation_id,
                      extra=_fields(command, operation_id))
        return "failed"
    if not stored:
        log.debug("callback %s (operationID %s): duplicate of %s; ignored", command, operation_id, key[:200],
                  extra=_fields(command, operation_id))
        return "duplicate"
    log.debug("callback %s (operationID %s) stored", command, operation_id,
              extra=_fields(command, operation_id))
    services.callbacks.wake()
    return "stored"


class CallbackEndpoint:
    """WSGI middleware in front of the Flask app that answers ``POST /openim/callback/<token>/<command>``.

    Callbacks come in bursts of thousands of tiny requests a second, and Flask's
    per-request machinery (contexts, routing over every rule, a Response object)
    cost more CPU than storing the callback; answered here, a callback skips it
    (bench_callbacks). Anything else, a wrong token included, goes to the app
    unchanged, which has no such route: a plain 404 problem, as for any unknown
    path, so a wrong token learns nothing.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]], services: Services, counts: metrics.Metrics) -> None:
        self.app, self.services, self.metrics = app, services, counts
        self.token = services.config.callback_token.encode("utf-8")
        self.writer = InboxWriter()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") != "POST" or not path.startswith(PREFIX):
            return self.app(environ, start_response)
        token, _, command = path[len(PREFIX):].partition("/")
        # PATH_INFO holds the URL's bytes as latin-1 text: compared as bytes, in constant time
        given = token.encode("latin-1", "replace")
        if not command or "/" in command or not hmac.compare_digest(given, self.token):
            return self.app(environ, start_response)  # the token is a secret: never echoed or logged
        try:
            self.take(command, environ)
        except Exception:  # answering OpenIM matters more than this one event
            log.exception("callback %s lost: unexpected error", command[:80], extra=_fields(command, None))
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", _CONTINUE_LENGTH)])
        return [_CONTINUE_BODY]

    def take(self, command: str, environ: dict[str, Any]) -> None:
        """Read and store one callback; whatever happens, the caller answers "continue"."""
        operation_id = environ.get("HTTP_OPERATIONID")
        try:
            body = read_body(get_input_stream(environ), get_content_length(environ),
                             self.services.config.callback_max_body_bytes)
        except PayloadTooLarge as exc:
            result = "too-large"
            log.warning("callback %s (operationID %s) ignored: %s", command[:80], operation_id, exc.detail,
                        extra=_fields(command, operation_id))
        except (OSError, ValueError, ClientDisconnected) as exc:  # the connection broke: no one hears the answer
            result = "unreadable"
            log.warning("callback %s (operationID %s) ignored: body unreadable: %s", command[:80], operation_id,
                        exc, extra=_fields(command, operation_id))
        else:
            result = take_callback(self.services, command, body, operation_id, self.writer)
        # commands we do not handle share one label: the command comes from the URL
        self.metrics.callback_received(command if command in HANDLERS else "other", result)


# -- Answering while storage stalls -------------------------------------------------
#
# A write to the inbox can wait on SQLite's lock for busy_timeout (30 s: another
# process holds it, a checkpoint, a slow disk) or on a Redis socket timeout,
# and OpenIM drops an after-callback (or blocks a message, for a before-callback)
# long before. So the write runs on a small pool and the request waits for it at
# most INBOX_WAIT_SECONDS, then answers "continue" anyway and logs the callback
# as lost; the write itself goes on and may still land (its outcome is logged).
#
# The usual write needs no pool: when no other thread or process is writing the
# inbox (its locks are free at once), the request thread writes it itself; at
# synchronous=NORMAL its commit is a write() to the page cache, no fsync. Only a
# write that would wait for a lock goes through the pool (a thread hand-off per
# callback cost ~0.15 ms of CPU and a p99 beyond 5 ms in bench_callbacks).
#
# The trade-off, against answering first and storing from an in-memory queue:
# here a callback is normally stored *before* OpenIM hears "continue", so a crash
# just after answering loses nothing, and a loss only happens while storage is
# actually stalled; the price, during a stall, is a wait of INBOX_WAIT_SECONDS
# per callback, within OpenIM's 3 s. At most MAX_PENDING_WRITES writes wait at
# once; past that a callback is answered at once and lost, so a long stall
# cannot pile up threads or memory.

INBOX_WAIT_SECONDS = 1.0
LOCK_WAIT_SECONDS = 0.1  # for this process's other inbox writes, before taking the pool's path
MAX_PENDING_WRITES = 64


class InboxWriter:
    """Inbox writes on their own threads, each waited for at most *wait* seconds."""

    def __init__(self, wait: float = INBOX_WAIT_SECONDS, pending: int = MAX_PENDING_WRITES,
                 workers: int = 4) -> None:
        self.wait = wait
        self._slots = threading.BoundedSemaphore(pending)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="callback-inbox")

    def record(self, store: Any, command: str, key: str, text: str, received_ms: int) -> bool:
        """``store.record_callback(...)``; StorageUnavailable when it does not finish in time."""
        try:  # the usual case: nobody else is writing, so the write cannot wait on anyone
            return store.record_callback_now(command, key, text, received_ms, LOCK_WAIT_SECONDS)
        except StorageBusy:
            pass
        if not self._slots.acquire(blocking=False):
            raise StorageUnavailable("too many callback inbox writes are already waiting (storage stalled)")
        try:
            future = self._pool.submit(store.record_callback, command, key, text, received_ms)
        except RuntimeError as exc:  # the pool was shut down
            self._slots.release()
            raise StorageUnavailable(f"callback inbox writer stopped: {exc}") from None
        future.add_done_callback(lambda _done: self._slots.release())
        try:
            return future.result(timeout=self.wait)
        except FutureTimeout:
            future.add_done_callback(lambda done: _late_outcome(command, key, done))
            raise StorageUnavailable(f"the callback inbox did not take the write within {self.wait:g} s; "
                                     "answered OpenIM anyway (the write may still land)") from None


def _late_outcome(command: str, key: str, done: Future) -> None:
    error = None if done.cancelled() else done.exception()
    if error is None and not done.cancelled():
        log.warning("callback %s (%s) stored late, after OpenIM was answered", command[:80], key[:200])
    else:
        log.error("callback %s (%s) lost after OpenIM was answered: %s", command[:80], key[:200], error)
