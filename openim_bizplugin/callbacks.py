"""OpenIM's webhook callbacks: ``POST /openim/callback/<token>/<callbackCommand>`` (SPEC §6).

OpenIM appends the command to the ``url`` of its ``webhooks.yml``, so that
url is ``http://HOST:PORT/openim/callback/<token>``. The recipe is
warehouse's: authenticate (the unguessable token, compared in constant
time), deduplicate on a natural key, store, and only then process — in
:class:`~.callback_handlers.CallbackProcessor`, not here.

Whatever happens after the token check, OpenIM gets its "continue" JSON with
HTTP 200 at once: OpenIM's after-callbacks wait in a queue of 100 with two
workers and are dropped after 3 s, and its before-callbacks *block* sending
on any failure (it ignores ``failedContinue``), so a slow or failing answer
here would lose events or stop chat. Unknown commands are understood and
ignored (zulip's rule), not stored.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from flask import Blueprint, Response, current_app, request

from . import metrics
from .callback_handlers import HANDLERS, natural_key
from .errors import NotFound, PayloadTooLarge, StorageUnavailable
from .services import Services
from .wire import read_body

log = logging.getLogger(__name__)

bp = Blueprint("openim_callbacks", __name__)

CONTINUE = {"actionCode": 0, "errCode": 0, "errMsg": "", "errDlt": "", "nextCode": 0}
_CONTINUE_BODY = json.dumps(CONTINUE, separators=(",", ":")).encode()


def token_matches(given: str, expected: str) -> bool:
    """Constant-time comparison, so the token cannot be guessed by timing answers."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8"))


def _fields(command: str, operation_id: str | None) -> dict[str, Any]:
    """The structured log fields of a received callback (both come from the request: kept short)."""
    return {"event": "callback.received", "callback": command[:80],
            "operation_id": (operation_id or "")[:128] or None}


def take_callback(services: Services, command: str, body: bytes, operation_id: str | None) -> str:
    """Store one callback for processing; says what became of it, never raises.

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
        stored = services.store.record_callback(command, key, text, int(services.clock() * 1000))
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


def continue_response() -> Response:
    """OpenIM's "continue" answer (its reply parser only stops on actionCode 0 with nextCode 1)."""
    return Response(_CONTINUE_BODY, status=200, mimetype="application/json")


@bp.post("/openim/callback/<token>/<command>")
def receive(token: str, command: str) -> Response:
    services: Services = current_app.extensions["bizplugin"]
    if not token_matches(token, services.config.callback_token):
        raise NotFound("no such callback endpoint")  # the token is a secret: never echoed or logged
    operation_id = request.headers.get("operationID")
    try:
        body = read_body(request.stream, request.content_length, services.config.server.max_body_bytes)
    except PayloadTooLarge as exc:
        _count(command, "too-large")
        log.warning("callback %s (operationID %s) ignored: %s", command[:80], operation_id, exc.detail,
                    extra=_fields(command, operation_id))
        return continue_response()
    _count(command, take_callback(services, command, body, operation_id))
    return continue_response()


def _count(command: str, result: str) -> None:
    # commands we do not handle share one label: the command comes from the URL
    metrics.current().callback_received(command if command in HANDLERS else "other", result)
