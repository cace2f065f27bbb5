"""Accepting a message: from verified raw bytes to a durable ``202`` answer.

Plain functions over the services; the Flask view only passes in what it
read from the request.
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
from dataclasses import dataclass
from email.message import Message

from .envelope import MessageRequest, parse_envelope
from .errors import BizError, Unprocessable, UnsupportedMediaType, Violation
from .services import Services
from .signing import VerifiedRequest
from .store.base import Accepted, IdempotencyMismatch, NewMessage, ReplayKey
from .strictjson import loads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """What the API answers for an accepted (or repeated) message."""

    accepted: Accepted
    deprecated: bool
    message_type: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Deprecation": "true"} if self.deprecated else {}


def accept_message(services: Services, verified: VerifiedRequest, raw: bytes,
                   content_type: str | None, header_key: str | None) -> Answer:
    """Validate and store one message; a replayed request gets its first answer.

    The store finds a replay in the same transaction that would store the
    message, so the usual request costs no separate read. A replay is looked
    up before refusing a body: what was accepted once (before a schema change,
    say) is answered as it was then.
    """
    replay = ReplayKey(verified.client_id, verified.signed_value, verified.timestamp)
    try:
        _require_json(content_type)
        return accept_body(services, verified.client_id, raw, header_key, replay)
    except BizError as refusal:
        earlier = services.store.replayed(replay) if refusal.status < 500 else None
        if earlier is None:
            raise
    return _answer_for(services, earlier, verified.client_id)


def accept_body(services: Services, client_id: str, raw: bytes, header_key: str | None = None,
                replay: ReplayKey | None = None) -> Answer:
    """Check the JSON body *raw* as *client_id*'s message and store it: what a signed
    request and an in-process send both go through (*replay* is None for the latter)."""
    client = services.config.clients[client_id]
    request = parse_envelope(
        loads(raw), client_id=client.client_id, allowed_types=client.allowed_types,
        catalog=services.catalog, max_recipients=services.config.server.max_recipients,
        header_key=header_key,
    )
    message = new_message(request, client.client_id, int(services.clock() * 1000))
    retention_ms = services.config.server.idempotency_retention_seconds * 1000
    try:
        accepted = services.store.accept(message, replay, retention_ms=retention_ms)
    except IdempotencyMismatch as exc:
        raise Unprocessable(
            f"idempotency key {request.idempotency_key!r} was used for a different message ({exc})",
            errors=[Violation("/idempotency_key", "already used with another body")]) from None
    if accepted.created:
        log.info("message %s accepted from %s: %s v%d to %d %s(s), priority %s", message.id, message.client,
                 message.type, message.version, len(message.targets), message.target_kind, message.priority,
                 extra={"event": "message.accepted", "message_id": message.id, "client": message.client,
                        "type": message.type, "version": message.version, "recipients": len(message.targets),
                        "priority": message.priority})
        services.engine.wake()
    else:
        _log_repeat(accepted, client.client_id)
    return Answer(accepted, request.deprecated, message.type)


def _log_repeat(accepted: Accepted, client_id: str) -> None:
    log.info("message %s: repeated request from %s answered again", accepted.message_id, client_id,
             extra={"event": "message.repeated", "message_id": accepted.message_id, "client": client_id})


def _answer_for(services: Services, accepted: Accepted, client_id: str) -> Answer:
    """The first answer again, for a replayed request."""
    _log_repeat(accepted, client_id)
    message_type = services.catalog.get(accepted.type)
    return Answer(accepted, bool(message_type and message_type.is_deprecated(accepted.version)), accepted.type)


def _require_json(content_type: str | None) -> None:
    if not _is_json(content_type or ""):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json (UTF-8), not {(content_type or 'missing')[:80]!r}")


@functools.lru_cache(maxsize=64)
def _is_json(content_type: str) -> bool:
    """Parsed as RFC 9110 says (quoted values, any order): "charset=utf-8; x=y" is fine too.
    Cached: a sender sends the same header every time, and the parse cost ~5% of a request's CPU."""
    header = Message()
    header["Content-Type"] = content_type
    charset = str(header.get_param("charset", "utf-8")).lower()
    return header.get_content_type() == "application/json" and charset in ("utf-8", "utf8")


def new_message_id(now_ms: int) -> str:
    """A 32-hex-digit id that sorts by creation time."""
    return f"{now_ms:012x}{secrets.token_hex(10)}"


def new_message(request: MessageRequest, client_id: str, now_ms: int) -> NewMessage:
    """The record to store, including the envelope string apps will receive (SPEC §5)."""
    message_id = new_message_id(now_ms)
    envelope = {
        "id": message_id, "type": request.message_type.name, "v": request.version, "ts": now_ms,
        "from": client_id, "priority": request.priority, "data": request.data,
    }
    defaults = request.message_type.defaults
    return NewMessage(
        id=message_id, client=client_id, type=request.message_type.name, version=request.version,
        mode=request.mode, priority=request.priority, offline=request.offline,
        ttl_seconds=request.ttl_seconds, collapse_key=request.collapse_key,
        idempotency_key=request.idempotency_key, request_hash=request.request_hash,
        envelope=json.dumps(envelope, separators=(",", ":"), ensure_ascii=False),
        delivery={
            "persistent": defaults.persistent, "push_title": defaults.push_title,
            "push_desc": defaults.push_desc,
            "rate_limit": defaults.rate_limit.text if defaults.rate_limit else None,
            "rate_limit_policy": defaults.rate_limit_policy,
        },
        target_kind=request.target_kind, targets=request.targets, created_ms=now_ms,
    )
