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

"At once" holds while storage is locked, slow or down too: a callback the
inbox cannot take at once goes to this process's spool file and is drained
into the inbox in the background (:mod:`..callbacks.spool`).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from werkzeug.exceptions import ClientDisconnected
from werkzeug.wsgi import get_content_length, get_input_stream

from ..callbacks.processing import HANDLERS, natural_key
from ..callbacks.spool import SpoolFull
from ..errors import PayloadTooLarge, StorageUnavailable
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


def take_callback(services: Services, command: str, body: bytes, operation_id: str | None) -> str:
    """Keep one callback for processing, without waiting on storage; never raises.

    ``stored``, ``duplicate`` (seen before), ``spooled`` (kept in the spool
    file: the inbox could not take it at once), ``ignored`` (a command we do
    not handle), ``unparseable`` (not a JSON object), ``spool-full`` or
    ``failed`` (lost: the spool is full, or its file cannot be written).
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
        result = services.spool.keep(command, key, text, int(services.clock() * 1000))
    except SpoolFull:  # logged by the spool, at most every few seconds
        return "spool-full"
    except StorageUnavailable as exc:
        log.error("callback %s (operationID %s) lost: %s", command, operation_id, exc,
                  extra=_fields(command, operation_id))
        return "failed"
    except Exception:  # answering OpenIM matters more than this one event
        log.exception("callback %s (operationID %s) lost: unexpected error", command, operation_id,
                      extra=_fields(command, operation_id))
        return "failed"
    log.debug("callback %s (operationID %s) %s: %s", command, operation_id, result, key[:200],
              extra=_fields(command, operation_id))
    if result == "stored":
        services.callbacks.wake()
    return result


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
            result = take_callback(self.services, command, body, operation_id)
        # commands we do not handle share one label: the command comes from the URL
        self.metrics.callback_received(command if command in HANDLERS else "other", result)

