"""What every storage backend stores, and the interface it offers.

A message is stored once with one row per recipient (a user or a group).
Acceptance is one atomic write: the ``202`` is only answered after the
message, all of its recipients and its idempotency/replay identity are
committed together, so nothing answered ``202`` can be lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

PRIORITY_RANK = {"high": 0, "normal": 1, "low": 2}

# Recipient statuses (SPEC §4). Active ones still have work to do.
ACTIVE_STATUSES = ("queued", "held", "throttled", "sending")
DELIVERED_STATUSES = ("sent", "read", "acknowledged")
FINAL_STATUSES = DELIVERED_STATUSES + ("failed", "expired", "skipped")


@dataclass(frozen=True)
class ReplayKey:
    """A signed request's identity: same client, value and timestamp is a replay."""

    client: str
    signed_value: str
    timestamp: int

    def text(self) -> str:
        return f"{self.client}:{self.signed_value}:{self.timestamp}"


@dataclass(frozen=True)
class NewMessage:
    """A validated message about to be stored."""

    id: str
    client: str
    type: str
    version: int
    mode: str
    priority: str
    offline: str
    ttl_seconds: int
    collapse_key: str | None
    idempotency_key: str | None
    request_hash: str
    envelope: str  # the client-facing JSON string apps receive (SPEC §5)
    delivery: dict[str, Any]  # type settings frozen at acceptance (persistent, push texts…)
    target_kind: str  # "user" | "group"
    targets: tuple[str, ...]
    created_ms: int

    @property
    def expires_ms(self) -> int:
        return self.created_ms + self.ttl_seconds * 1000


@dataclass(frozen=True)
class Accepted:
    """The answer to an accepted message; ``created`` is False for a repeat."""

    message_id: str
    recipients: int
    created: bool

    def answer(self) -> dict[str, Any]:
        return {"id": self.message_id, "status": "queued", "recipients": self.recipients}


@dataclass(frozen=True)
class RecipientRecord:
    kind: str
    target: str
    status: str
    attempts: int
    last_error: str | None
    reason: str | None
    server_msg_id: str | None
    client_msg_id: str | None
    sent_ms: int | None
    receipt: Any


@dataclass(frozen=True)
class MessageRecord:
    id: str
    client: str
    type: str
    version: int
    mode: str
    priority: str
    offline: str
    created_ms: int
    expires_ms: int
    recipients: tuple[RecipientRecord, ...]


class IdempotencyMismatch(Exception):
    """The idempotency key was used before with a different body."""


class Store(Protocol):
    """The storage interface; SQLite is the embedded default."""

    def accept(self, message: NewMessage, replay: ReplayKey | None, *, retention_ms: int) -> Accepted:
        """Store *message* atomically, or return the earlier answer for a repeat.

        A repeat is the same *replay* identity, or the same client and
        idempotency key within *retention_ms* with the same request hash.
        Raises :class:`IdempotencyMismatch` for the same key with another
        body, and :class:`~openim_bizplugin.errors.StorageUnavailable` when
        the write cannot be made durable.
        """

    def replayed(self, replay: ReplayKey) -> Accepted | None:
        """The answer stored for an earlier request with this identity."""

    def get_message(self, message_id: str) -> MessageRecord | None:
        """The message and its recipients, or None."""

    def ping(self) -> None:
        """Raise StorageUnavailable when the store cannot be reached."""

    def close(self) -> None:
        """Release connections."""
