"""What every storage backend stores, and the interface it offers.

A message is stored once with one row per recipient (a user or a group).
Acceptance is one atomic write: the ``202`` is only answered after the
message, all of its recipients and its idempotency/replay identity are
committed together, so nothing answered ``202`` can be lost.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from ..catalog.registry import RateLimit

PRIORITY_RANK = {"high": 0, "normal": 1, "low": 2}

# Recipient statuses (SPEC §4). Active ones still have work to do; "throttled"
# is final: dropped by the type's rate limit (a delayed one stays "queued").
ACTIVE_STATUSES = ("queued", "held", "sending")
DELIVERED_STATUSES = ("sent", "read", "acknowledged")
FINAL_STATUSES = DELIVERED_STATUSES + ("failed", "expired", "skipped", "throttled")
# Subscriber events every subscriber has received are deleted, but the newest this many of them
# stay for a look back; an event some subscriber still waits for is never deleted.
EVENTS_KEPT = 10_000
# Presence reports are kept this long after their last update: OpenIM re-asserts every online
# user every 10-20 minutes (OPENIM.md §5.7), so an older report says nothing a delivery would
# trust (delivery.presence_max_age_seconds is 5 minutes) and only takes room.
PRESENCE_KEPT_MS = 3_600_000
SWEEP_CHUNK = 1_000  # rows one retention transaction deletes at most: a short hold of the write lock


@dataclass(frozen=True)
class Retention:
    """How long finished data is kept (SPEC §2 ``[retention]``), in milliseconds.

    A message all of whose recipients are final is deleted, with everything about it,
    ``finished_ms`` after it finished (``dead_letter_ms`` when some recipient failed). A
    message of a rate-limited type counts as finished one period of its rate limit later:
    its sends count toward the limit until then.
    """

    finished_ms: int = 604_800_000
    dead_letter_ms: int = 2_592_000_000
    presence_ms: int = PRESENCE_KEPT_MS


@dataclass
class Swept:
    """What one retention step deleted, and whether there is more to do right now."""

    messages: int = 0
    recipients: int = 0
    presence: int = 0
    more: bool = False


def rate_period_ms(delivery: Any) -> int:
    """The period of the rate limit in a message's frozen delivery settings, 0 without one."""
    text = delivery.get("rate_limit") if isinstance(delivery, dict) else None
    try:
        return RateLimit.parse(text).period_seconds * 1000 if text else 0
    except ValueError:
        return 0


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
    type: str = ""  # the message's type and version: filled in by replayed() (is it deprecated?)
    version: int = 0

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


# WorkItem, Outcome and openim.SendResult are made once per recipient and never changed
# afterwards, but are not frozen: a frozen dataclass sets each field through
# object.__setattr__ (5.4 us against 1.4 for WorkItem's 20 fields), a sixth of a worker's
# CPU per recipient in custom mode (bench_delivery).
@dataclass
class WorkItem:
    """One leased recipient: everything a worker needs to deliver it."""

    message_id: str
    seq: int
    kind: str  # "user" | "group"
    target: str
    attempts: int  # including this one
    counted: bool  # whether this lease counts as an attempt (a recheck of a held one does not)
    operation_id: str  # this attempt's OpenIM operationID
    check_operation_id: str | None  # an earlier attempt whose outcome is unknown
    lease_owner: str
    client: str
    type: str
    version: int
    mode: str
    priority: str
    offline: str
    envelope: str
    delivery: dict[str, Any]
    expires_ms: int
    # A batch (SQLite, see delivered_in_batches): one item for the (seq, user) of every user one
    # batch_send_msg call sends to; seq and target are the first's. Users split off a batch
    # (OpenIM refused them, or the rate limit held them back) are items of their own with
    # batch_id set and members None.
    members: list[tuple[int, str]] | None = None
    batch_id: int | None = None
    # what makes this item's stored row unusable (see stored_message): it fails at once, alone
    defect: str | None = None
    # when its type's rate limit let it through this round (delivery/throttle.py): the slot is
    # given back if nothing was sent after all
    approved_ms: int | None = None

    @property
    def size(self) -> int:
        """How many recipients this item stands for."""
        return 1 if self.members is None else len(self.members)

    def member(self, seq: int, target: str) -> WorkItem:
        """The item of one user of this batch, to record an outcome of its own."""
        return dataclasses.replace(self, seq=seq, target=target, members=None)


Answer = tuple[str, str, int]  # one user's (serverMsgID, clientMsgID, sendTime) in a batch's results


def answers_by_user(results: Any) -> dict[str, Answer]:
    """(serverMsgID, clientMsgID, sendTime) per recvID of OpenIM's batch_send_msg ``results``."""
    return {r["recvID"]: (r.get("serverMsgID") or "", r.get("clientMsgID") or "", r.get("sendTime") or 0)
            for r in results or () if isinstance(r, dict) and isinstance(r.get("recvID"), str)}


MESSAGE_MISSING = ("", "", 0, "notification", "normal", "store", "", "{}", 0)  # stored_message's placeholder


def stored_message(row: tuple | None) -> tuple[tuple, dict[str, Any], str | None]:
    """A stored message's (client, type, version, mode, priority, offline, envelope, delivery JSON,
    expires_ms) as a lease reads them: the row (a placeholder when it is missing), its delivery
    settings, and what makes it unusable, or None. Such a message's items fail on their own
    instead of failing every round that leases them (a row edited by hand, a bug of an older
    release)."""
    if row is None:
        return MESSAGE_MISSING, {}, "its message row is missing"
    try:
        settings = json.loads(row[7])
    except (TypeError, ValueError):
        settings = None
    if not isinstance(settings, dict):
        return row, {}, "its stored delivery settings are not a JSON object"
    if row[4] not in PRIORITY_RANK or row[3] not in ("notification", "custom") or not isinstance(row[6], str):
        return row, settings, f"its stored message is malformed (mode {row[3]!r}, priority {row[4]!r})"
    return row, settings, None


def delivered_in_batches(message: NewMessage) -> bool:
    """Whether a backend may keep this message's queue state per ``batch_send_msg`` call
    instead of per recipient: custom mode to several users, without an offline policy or a
    collapse key (which decide user by user while the users wait; a rate limit splits users
    off the batch when it is sent)."""
    return (message.mode == "custom" and message.target_kind == "user" and len(message.targets) > 1
            and message.offline == "store" and not message.collapse_key)


@dataclass  # not frozen: see WorkItem
class Outcome:
    """What became of one attempt; see the constructors below."""

    status: str  # sent | queued (retry later) | held (until online) | failed | skipped
    error: str | None = None
    reason: str | None = None
    next_attempt_ms: int | None = None
    unknown_operation_id: str | None = None  # retry, but first ask whether this one arrived
    server_msg_id: str | None = None
    client_msg_id: str | None = None
    sent_ms: int | None = None
    uncounted: bool = False  # nothing was sent: this lease does not count as an attempt
    # a batch's answer: OpenIM's batch_send_msg answer as it came (JSON text, its data.results
    # per user: read with batch_answers), and the users it names; users it leaves out were
    # recorded apart (refused). None: sent, but OpenIM's answer is not known
    answer: str | None = None
    sent_to: frozenset[str] | None = None

    @classmethod
    def sent(cls, server_msg_id: str | None, client_msg_id: str | None, sent_ms: int,
             reason: str | None = None) -> Outcome:
        return cls("sent", server_msg_id=server_msg_id, client_msg_id=client_msg_id, sent_ms=sent_ms,
                   reason=reason)

    @classmethod
    def sent_batch(cls, answer: str, sent_to: frozenset[str], sent_ms: int) -> Outcome:
        return cls("sent", answer=answer, sent_to=sent_to, sent_ms=sent_ms)

    def recipients(self, item: WorkItem) -> int:
        """How many recipients this outcome of *item* is about."""
        return len(self.sent_to) if self.sent_to is not None else item.size

    @classmethod
    def retry(cls, error: str, next_attempt_ms: int, unknown_operation_id: str | None = None) -> Outcome:
        return cls("queued", error=error, next_attempt_ms=next_attempt_ms,
                   unknown_operation_id=unknown_operation_id)

    @classmethod
    def failed(cls, error: str, reason: str) -> Outcome:
        return cls("failed", error=error, reason=reason)

    @classmethod
    def held(cls, reason: str, recheck_ms: int) -> Outcome:
        return cls("held", reason=reason, next_attempt_ms=recheck_ms)

    @classmethod
    def skipped(cls, reason: str) -> Outcome:
        return cls("skipped", reason=reason)

    @classmethod
    def throttled(cls, reason: str) -> Outcome:
        return cls("throttled", reason=reason)

    @classmethod
    def deferred(cls, reason: str, next_attempt_ms: int) -> Outcome:
        return cls("queued", reason=reason, next_attempt_ms=next_attempt_ms, uncounted=True)

    @classmethod
    def waiting(cls, error: str, next_attempt_ms: int) -> Outcome:
        """Nothing was sent for a reason of the deployment's (OpenIM refuses the admin token): no attempt spent."""
        return cls("queued", error=error, next_attempt_ms=next_attempt_ms, uncounted=True)


@dataclass(frozen=True)
class DeadLetter:
    """A message with recipients that failed for good."""

    message_id: str
    client: str
    type: str
    failed: int
    last_error: str | None
    created_ms: int


@dataclass(frozen=True)
class RecentMessage:
    """A message as the operator page lists it: its first recipients, and counts over all of them."""

    message: MessageRecord  # recipients: only the first few, by seq
    recipient_count: int
    status_counts: dict[str, int]  # status -> how many recipients have it


@dataclass(frozen=True)
class FailedRecipient:
    """A recipient that failed for good, with the message it belongs to (a dead letter)."""

    message_id: str
    client: str
    type: str
    recipient: RecipientRecord
    failed_ms: int  # when the message became a dead letter


@dataclass(frozen=True)
class PresenceCounts:
    """How many users OpenIM's presence callbacks last reported online and offline."""

    online: int
    offline: int


@dataclass(frozen=True)
class CallbackRecord:
    """An OpenIM callback as received, waiting to be processed."""

    id: int
    command: str
    body: str
    received_ms: int


@dataclass(frozen=True)
class PresenceState:
    """What OpenIM's presence callbacks last said of a user."""

    online: bool
    updated_ms: int


@dataclass(frozen=True)
class EventRecord:
    """One subscriber event in the outbox; ``id`` is stable across retries."""

    seq: int
    id: str
    type: str
    data: dict[str, Any]
    created_ms: int


@dataclass(frozen=True)
class SubscriberCursor:
    """How far a subscriber has received events, and its retry state."""

    subscriber: str
    last_seq: int
    attempts: int = 0
    next_attempt_ms: int = 0
    last_error: str | None = None


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
        """The answer stored for an earlier request with this identity, with its type and version."""

    def get_message(self, message_id: str) -> MessageRecord | None:
        """The message and its recipients, or None."""

    def lease(self, now_ms: int, limit: int, lease_ms: int, owner: str,
              new_operation_id: Callable[[str], str], aging_ms: int = 300_000) -> list[WorkItem]:
        """Take up to *limit* due recipients, highest priority first, for *lease_ms*.

        Recipients due for longer than *aging_ms* move up a priority level
        (low to normal; after twice that, to high), so a steady stream of
        high work cannot starve the rest forever.

        Due means queued and ready, or leased by a worker whose lease ran out
        (it died mid-send). Recipients past their message's TTL end
        ``expired`` here instead of being handed out.

        Each item's operationID is ``new_operation_id(message_id) + "-" + seq``:
        one call per message and round, unique per attempt.

        A backend may hand out the users of a message that is
        :func:`delivered_in_batches` as batch items (``members``, one
        ``batch_send_msg`` each, operationID that of the first user); a batch
        counts as its size toward *limit*, and at least one item is handed out.
        """

    def complete(self, results: list[tuple[WorkItem, Outcome]], now_ms: int) -> int:
        """Record outcomes for items still leased by their owner; returns how many.

        A batch's outcome is every member's, except members split off it
        (:meth:`WorkItem.member`) whose own outcome is in the same *results*.
        """

    def renew(self, items: list[WorkItem], now_ms: int, lease_ms: int) -> list[WorkItem]:
        """Extend the lease of the items this worker still holds; returns those."""

    def messages_started(self, type_: str, since_ms: int, at_most: int) -> int:
        """How many messages of *type_* some worker has leased and that had not expired by
        *since_ms*, counted up to *at_most*: the messages that may have been sent to anyone
        since then (none is sent before its lease or after its expiry), a rate limit's bound."""

    def leased_elsewhere(self, type_: str, owner: str, since_ms: int) -> bool:
        """Whether a worker process other than *owner* held a lease on a message of *type_*
        after *since_ms* (renewals included): whether anyone else may have sent the type since."""

    def sent_counts(self, kind: str, targets: list[str], type_: str, since_ms: int) -> dict[str, tuple[int, int]]:
        """How many messages of *type_* were sent to each of *targets* since *since_ms*, and
        when the first of them was (one query for a whole round; targets with none are left out)."""

    def release(self, items: list[WorkItem], now_ms: int) -> int:
        """Give back leased items not attempted (shutdown, higher-priority work): due at once."""

    def higher_due(self, rank: int, now_ms: int) -> bool:
        """Whether work of a better priority rank than *rank* is due now."""

    def next_due_ms(self) -> int | None:
        """When the earliest waiting recipient becomes due, or None when idle."""

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Messages with failed recipients, newest first."""

    def replay_dead_letters(self, message_id: str | None, now_ms: int) -> int:
        """Queue the failed recipients of one message (or all) again; returns how many."""

    def sweep(self, now_ms: int, retention: Retention, budget: int = SWEEP_CHUNK) -> Swept:
        """One bounded step of retention; call again while it deleted anything.

        Deletes messages finished longer ago than *retention* allows (with their recipients,
        batches, receipts, dead-letter entry, callback indexes and replay/idempotency keys)
        and presence reports older than ``retention.presence_ms``, about *budget* rows in
        all, each transaction short. Work left (queued, held, sending) is never deleted.
        """

    # -- for the operator page (see ui) -----------------------------------------------
    def queue_depth(self) -> dict[str, int]:
        """Recipients with work left (queued, held, sending) per priority as they now stand
        (after aging), with every priority present: ``{"high": 0, "normal": 3, "low": 1}``."""

    def recent_messages(self, limit: int, recipients: int = 50) -> list[RecentMessage]:
        """The newest *limit* messages (Redis keeps the newest 1,000), newest first, each with its
        first *recipients* recipients."""

    def failed_recipients(self, limit: int) -> list[FailedRecipient]:
        """Up to *limit* failed recipients of dead letters, newest dead letter first, then by seq."""

    def presence_counts(self) -> PresenceCounts:
        """Users whose last presence report says online (on any platform), and the others known."""

    # -- the operator page's sessions and sign-in throttle, the same for every process (see ui) --
    def open_session(self, session_id: str, now_ms: int, expires_ms: int) -> None:
        """Keep a session open until *expires_ms* (and forget sessions that ended by *now_ms*)."""

    def touch_session(self, session_id: str, now_ms: int, expires_ms: int) -> bool:
        """Whether the session is open at *now_ms*; when it is, it now lasts until *expires_ms*."""

    def close_session(self, session_id: str) -> None:
        """End a session at once, for every process and replica."""

    def count_failure(self, name: str, now_ms: int, window_ms: int) -> int:
        """Count one failure under *name*; returns the failures in its window, which starts at the
        first failure and lasts *window_ms* (then counting starts again)."""

    def failures(self, name: str, now_ms: int) -> tuple[int, int]:
        """The failures counted under *name* in its current window and when the window ends,
        ``(0, now_ms)`` when there is none."""

    # -- after sending: callbacks, presence, receipts, events (see sqlite_tracking) --
    def record_callback(self, command: str, natural_key: str, body: str, received_ms: int) -> bool:
        """Keep a callback for processing; False when (command, natural_key) was seen."""

    def record_callbacks(self, callbacks: Sequence[tuple[str, str, str, int]]) -> int:
        """:meth:`record_callback` for each (command, natural_key, body, received_ms), in one
        write; returns how many were new."""

    def record_callback_now(self, command: str, natural_key: str, body: str, received_ms: int,
                            wait_seconds: float = 0.0) -> bool:
        """:meth:`record_callback` only if it can start without waiting for a lock (at most
        *wait_seconds* for this process's other writes, not at all for another process's), else
        :class:`~openim_bizplugin.errors.StorageBusy` (always, where the backend cannot tell)."""

    def pending_callbacks(self, limit: int) -> list[CallbackRecord]:
        """Unprocessed callbacks, oldest first."""

    def finish_callbacks(self, results: list[tuple[int, str | None]]) -> None:
        """Mark callbacks processed, each with its error if processing failed (one write)."""

    def prune_callbacks(self, before_ms: int, limit: int) -> int:
        """Forget up to *limit* processed callbacks received before *before_ms*, oldest first:
        the stored body and its dedupe key (the same event arriving again later is stored again).
        Unprocessed callbacks are never touched. Returns how many were forgotten."""

    def settle_batched(self, message_id: str, user_ids: list[str]) -> int:
        """Give these users of a sent batch recipient rows of their own, with what OpenIM
        answered about each, so the callbacks below find them by serverMsgID/clientMsgID.
        Backends that never batch do nothing. Returns how many were settled."""

    def confirm_sent(self, server_msg_id: str, now_ms: int) -> int:
        """OpenIM's after-send callback confirmed this message."""

    def record_saved_seq(self, server_msg_id: str, conversation_id: str, msg_seq: int) -> int:
        """OpenIM stored this message at *msg_seq* of *conversation_id*."""

    def mark_pushed(self, client_msg_id: str, kind: str, targets: list[str], now_ms: int) -> int:
        """OpenIM is pushing this message to these recipients' online devices (kind "user" or
        "group"): only they are marked, as one batch_send_msg gives all its users one clientMsgID."""

    def mark_read(self, conversation_id: str, seqs: list[int], reader: str, now_ms: int) -> int:
        """The reader read these seqs: their sent recipients become ``read``."""

    def acknowledge(self, message_id: str, user_id: str, receipt: dict[str, Any], now_ms: int) -> bool:
        """A client receipt arrived: the recipient becomes ``acknowledged``."""

    def update_presence(self, user_id: str, platform_id: int, online: bool, seq: int, now_ms: int) -> bool:
        """Apply a presence level report ordered by OpenIM's seq."""

    def presence(self, user_ids: list[str]) -> dict[str, PresenceState]:
        """What is known of these users' presence."""

    def events_after(self, seq: int, limit: int) -> list[EventRecord]:
        """Subscriber events after *seq*, in order."""

    def subscriber_cursor(self, subscriber: str) -> SubscriberCursor:
        """A subscriber's position and retry state."""

    def save_subscriber_cursor(self, cursor: SubscriberCursor) -> None:
        """Store a subscriber's position and retry state."""

    def subscriber_names(self) -> list[str]:
        """The subscribers that have a cursor, configured or not (sorted)."""

    def forget_subscriber(self, subscriber: str) -> bool:
        """Delete *subscriber*'s cursor (False when it has none): the events only it still waited
        for are deleted too, but the newest ``events_kept`` of those every subscriber has."""

    def load_token(self, name: str) -> tuple[str, int] | None:
        """A shared credential and its expiry (ms), e.g. the OpenIM admin token."""

    def save_token(self, name: str, token: str, expires_ms: int) -> None:
        """Share a credential with every worker and replica."""

    def try_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Take a named lock across processes for *ttl_ms*, unless someone else holds it."""

    def unlock(self, name: str, owner: str) -> None:
        """Release a lock taken by *owner*."""

    def batch(self) -> AbstractContextManager[None]:
        """Group this thread's writes inside the block into one transaction where the
        backend has them (SQLite: one commit, one fsync); each write still succeeds or
        fails alone. Redis writes are atomic one by one, so there it changes nothing."""

    def ping(self) -> None:
        """Raise StorageUnavailable when the store cannot be reached."""

    def take_rate(self, key: str, count: int, period_ms: int, now_ms: int) -> int:
        """Count one request against *count* per *period_ms* for *key* (a sliding window counter:
        this window's requests plus the previous window's, weighted by its overlap with the last
        period) and return 0, or, when that would pass *count*, count nothing and return the
        milliseconds to wait. Shared by every process and replica of the store."""

    def check_writable(self) -> None:
        """Raise StorageUnavailable unless the store takes a write now (``/readyz``)."""

    def close(self) -> None:
        """Release connections."""


# -- helpers both backends share --------------------------------------------------
def recipient_data(message_id: str, type_: str, client: str, kind: str, target: str, **extra: Any) -> dict[str, Any]:
    """The ``data`` of a message event: which message, which recipient."""
    key = "user_id" if kind == "user" else "group_id"
    return {"message_id": message_id, "type": type_, "client": client, key: target, **extra}


def batch_answers(stored: str | None) -> dict[str, Answer]:
    """(serverMsgID, clientMsgID, sendTime) per user from a batch's ``results``: OpenIM's
    batch_send_msg answer as it came, or the ``{"<user>": [...]}`` map of files written before
    the answer was kept as is."""
    if not stored:
        return {}
    found = json.loads(stored)
    if isinstance(found, dict) and "errCode" in found:
        return answers_by_user((found.get("data") or {}).get("results"))
    return {user: tuple(answer) for user, answer in found.items()}
