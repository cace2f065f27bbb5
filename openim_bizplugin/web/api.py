"""The signed internal API, ``/v1`` (SPEC §3–§4). Views stay thin; ``POST /v1/messages`` is
answered in front of the app, by :mod:`.messages`."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, current_app, jsonify, request

from ..errors import NotFound
from ..services import Services
from ..signing import VerifiedRequest
from ..store.base import ACTIVE_STATUSES, DELIVERED_STATUSES, MessageRecord
from .wire import verified_caller

bp = Blueprint("v1", __name__, url_prefix="/v1")


def services() -> Services:
    return current_app.extensions["bizplugin"]


def _verified(body: bytes) -> VerifiedRequest:
    return verified_caller(services(), request.environ, body)


@bp.get("/messages/<message_id>")
def get_message(message_id: str) -> Any:
    verified = _verified(b"")
    return jsonify(message_document(services(), message_id, verified.client_id))


def message_document(svc: Services, message_id: str, client_id: str | None) -> dict[str, Any]:
    """The JSON of ``GET /v1/messages/<id>`` as *client_id* reads it (None: whoever sent it)."""
    record = svc.store.get_message(message_id)
    # Another client's message is answered exactly like a missing one.
    if record is None or (client_id is not None and record.client != client_id):
        owner = f" for client {client_id!r}" if client_id is not None else ""
        raise NotFound(f"no message {message_id[:64]!r}{owner}")
    return message_view(record)


@bp.get("/types")
def get_types() -> Any:
    _verified(b"")
    catalog = services().catalog
    return jsonify({"types": [
        {"type": t.name, "version": v, "schema": t.schemas[v], "defaults": t.defaults.as_dict(),
         "deprecated": t.is_deprecated(v)}
        for t in catalog.types() for v in t.versions
    ]})


def rfc3339(ms: int | None) -> str | None:
    """Milliseconds since the epoch as RFC 3339 UTC (``2026-11-26T12:00:00.123Z``)."""
    if ms is None:
        return None
    moment = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def summary_status(statuses: list[str]) -> str:
    """One word for a message: its recipients' common status, or where it stands.

    Mixed statuses read ``sending`` while work remains and some has been
    done, ``queued`` while nothing has been done, and ``partial`` when all
    work is over with some recipients not delivered.
    """
    distinct = set(statuses)
    if len(distinct) == 1:
        return statuses[0]
    if distinct & set(ACTIVE_STATUSES):
        return "queued" if distinct <= {"queued", "held"} else "sending"
    return "sent" if distinct <= set(DELIVERED_STATUSES) else "partial"


def message_view(record: MessageRecord) -> dict[str, Any]:
    """The JSON of ``GET /v1/messages/<id>``."""
    return {
        "id": record.id, "client": record.client, "type": record.type, "version": record.version,
        "mode": record.mode, "priority": record.priority, "offline": record.offline,
        "status": summary_status([r.status for r in record.recipients]),
        "created_at": rfc3339(record.created_ms), "expires_at": rfc3339(record.expires_ms),
        "recipients": [
            {("user_id" if r.kind == "user" else "group_id"): r.target, "status": r.status,
             "attempts": r.attempts, "last_error": r.last_error, "server_msg_id": r.server_msg_id,
             "client_msg_id": r.client_msg_id, "sent_at": rfc3339(r.sent_ms), "receipt": r.receipt,
             "reason": r.reason}
            for r in record.recipients
        ],
    }
