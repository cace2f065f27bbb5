"""What each OpenIM callback means to the sidecar, and the processor that applies it.

Callbacks are stored first (``callbacks.py`` answers OpenIM at once) and
processed here afterwards. ``HANDLERS`` is the dispatch table keyed by
OpenIM's ``callbackCommand``; a command missing from it is understood and
ignored. ``natural_key`` names one event so that a callback OpenIM sends
twice is stored (and processed) once. Payload shapes: OPENIM.md §5.6–§5.9.

Handlers are idempotent: every store method they call ignores a change it
already made (first confirmation, first receipt, newer presence seq…), so a
callback processed twice — two processor threads, a crash between applying
and marking it done — changes nothing the second time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..background import BackgroundLoop
from ..config import Config
from ..counters import DISCARD, Metrics
from ..errors import StorageRejected, StorageUnavailable
from ..openim.client import IOS_PLATFORM, operation_message_id
from ..store.base import CallbackRecord, Store

log = logging.getLogger(__name__)
ONLINE_COMMAND = "callbackAfterUserOnlineCommand"

CUSTOM_CONTENT_TYPE = 110  # OpenIM's Custom message: how client receipts arrive
SINGLE_CHAT, GROUP_CHAT = 1, 3  # OpenIM sessionType values (OPENIM.md §3.1)
BATCH_SIZE = 200
GATHER_SECONDS = 0.02  # how long the processor lets callbacks gather before a round
CHUNK_SIZE = 16  # callbacks applied per main-file transaction
PRUNE_EVERY_SECONDS = 10.0  # how often processed callbacks past callbacks.retention_seconds are forgotten
PRUNE_CHUNK = 500  # callbacks forgotten per transaction: a short hold of the inbox's lock


@dataclass(frozen=True)
class Context:
    """What a handler may use: the store, the sender account and the time of processing."""

    store: Store
    sender_id: str
    now_ms: int


Handler = Callable[[Context, dict[str, Any]], None]


# -- natural keys ------------------------------------------------------------------------
def _field(payload: dict[str, Any], name: str) -> Any:
    """A key field; missing or empty means the payload is not what OpenIM sends."""
    value = payload[name]
    if value is None or value == "":
        raise KeyError(name)
    return value


def _text(payload: dict[str, Any], name: str) -> str:
    """An id field: a non-empty string (OpenIM's are; anything else fails this callback alone)."""
    value = _field(payload, name)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, not {type(value).__name__}")
    return value


def _integer(payload: dict[str, Any], name: str) -> int:
    """A number field: an integer (JSON numbers like 1.0 included), never a bool or a string."""
    value = _field(payload, name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
    return value


def _message_key(p: dict[str, Any]) -> list[Any]:
    return [_field(p, "serverMsgID")]


def _single_read_key(p: dict[str, Any]) -> list[Any]:
    return [_field(p, "userID"), _field(p, "conversationID"), sorted(_read_seqs(p))]


def _read_seqs(p: dict[str, Any]) -> list[Any]:
    """``Seqs`` of a read callback: OpenIM copies the SDK's list, which is nil (``null``)
    when nothing was marked; a missing key is still not what OpenIM sends."""
    seqs = p["Seqs"]
    return [] if seqs is None else seqs


def _presence_key(online: bool) -> Callable[[dict[str, Any]], list[Any]]:
    return lambda p: [_field(p, "userID"), _field(p, "platformID"), _field(p, "seq"),
                      "online" if online else "offline"]


def _push_key(p: dict[str, Any]) -> list[Any]:
    return [_field(p, "clientMsgID"), sorted(_field(p, "userIDList"))]


def _group_push_key(p: dict[str, Any]) -> list[Any]:
    return [_field(p, "clientMsgID"), _field(p, "groupID")]


def _group_read_key(p: dict[str, Any]) -> list[Any]:
    return [_field(p, "sendID"), _field(p, "unreadMsgNum")]


def natural_key(command: str, payload: Any) -> str | None:
    """The identity of one event of *command*, or None when the command is not handled.

    A payload that lacks the key fields (not something OpenIM sends) is keyed
    by a digest of its content, so it is still stored once and its
    processing error can be seen.
    """
    if command not in HANDLERS:
        return None
    try:
        parts = _KEYS[command](payload)
    except (KeyError, TypeError, ValueError):
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
        return f"sha256:{digest}"
    # JSON of a list: unambiguous whatever characters the ids contain
    return json.dumps(parts, separators=(",", ":"), ensure_ascii=False)


# -- handlers ------------------------------------------------------------------------------
def parse_receipt(content: Any) -> dict[str, Any] | None:
    """The receipt in a Custom message's content, or None when it carries none.

    ``content`` is the stored CustomElem as a JSON string,
    ``{"data": "<json string>", "description": ..., "extension": ...}``,
    and a receipt's data is ``{"receipt": {"id": "<message id>", ...}}``.
    """
    data = _custom_data(content)
    receipt = data.get("receipt") if isinstance(data, dict) else None
    if not isinstance(receipt, dict) or not isinstance(receipt.get("id"), str) or not receipt["id"]:
        return None
    return receipt


def _custom_data(content: Any) -> Any:
    """The JSON in ``data`` of a Custom message's content, or None."""
    try:
        return json.loads(json.loads(content)["data"])
    except (TypeError, ValueError, KeyError, RecursionError):
        return None


def envelope_id(content: Any) -> str | None:
    """The message id in the envelope of one of the sidecar's Custom messages."""
    data = _custom_data(content)
    message_id = data.get("id") if isinstance(data, dict) else None
    return message_id if isinstance(message_id, str) else None


def _settle_batched(ctx: Context, p: dict[str, Any], users: Any) -> None:
    """Users of a custom fan-out whose batch was sent get recipient rows of their own first (SQLite
    keeps a batch's answer on the batch), so updates by serverMsgID/clientMsgID reach them."""
    message_id = envelope_id(p.get("content"))
    users = _receivers(ctx, users)
    if message_id and users:
        ctx.store.settle_batched(message_id, users)


def _receivers(ctx: Context, users: Any) -> list[str]:
    """The user ids of a callback's list other than the sender account (senderSync adds it)."""
    return [u for u in users if isinstance(u, str) and u != ctx.sender_id] if isinstance(users, list) else []


def after_send_single(ctx: Context, p: dict[str, Any]) -> None:
    """The sidecar's own send is confirmed; a user's Custom message to the sender may be a receipt."""
    if p.get("sendID") == ctx.sender_id:
        _settle_batched(ctx, p, [p.get("recvID")])
        _log_confirmed(p, ctx.store.confirm_sent(_text(p, "serverMsgID"), ctx.now_ms))
        return
    if p.get("recvID") != ctx.sender_id or p.get("contentType") != CUSTOM_CONTENT_TYPE:
        log.debug("after-send %s: not for the sender account; ignored", p.get("serverMsgID"))
        return
    sender = p.get("sendID")
    receipt = parse_receipt(p.get("content"))
    # A user's random chat to the sender account is no error: ignore it quietly.
    if receipt is None or not isinstance(sender, str) or not sender:
        log.debug("after-send %s from %r: Custom message without a receipt; ignored", p.get("serverMsgID"), sender)
        return
    if ctx.store.acknowledge(receipt["id"], sender, receipt, ctx.now_ms):
        log.info("message %s user %s: receipt %r received", receipt["id"], sender, receipt.get("status"),
                 extra=_receipt_fields(p, receipt, sender))
    else:
        log.info("message %s user %s: receipt ignored (no such recipient, or one already received)",
                 receipt["id"][:64], sender[:128], extra=_receipt_fields(p, receipt, sender))


def _receipt_fields(p: dict[str, Any], receipt: dict[str, Any], sender: str) -> dict[str, Any]:
    return {"event": "receipt.received", "message_id": receipt["id"][:64], "recipient": sender[:128],
            "status": receipt.get("status"), "callback": p.get("callbackCommand"),
            "operation_id": p.get("operationID")}


def _log_confirmed(p: dict[str, Any], recipients: int) -> None:
    """The callback line of one of the sidecar's own messages: its operationID names the message."""
    operation_id = p.get("operationID") if isinstance(p.get("operationID"), str) else None
    log.info("callback %s: OpenIM confirmed serverMsgID %s (operationID %s, %d recipients)",
             p.get("callbackCommand"), p.get("serverMsgID"), operation_id, recipients,
             extra={"event": "callback.confirmed", "callback": p.get("callbackCommand"),
                    "message_id": operation_message_id(operation_id or ""), "operation_id": operation_id,
                    "server_msg_id": p.get("serverMsgID"), "recipients": recipients})


def after_send_group(ctx: Context, p: dict[str, Any]) -> None:
    """The sidecar's own group send is confirmed."""
    if p.get("sendID") == ctx.sender_id:
        _log_confirmed(p, ctx.store.confirm_sent(_text(p, "serverMsgID"), ctx.now_ms))


def conversation_id(p: dict[str, Any]) -> str | None:
    """OpenIM's chat conversation of a message (OPENIM.md §3.2): ``si_<a>_<b>`` sorted, ``sg_<group>``."""
    if p.get("sessionType") == SINGLE_CHAT:
        return "si_" + "_".join(sorted((_text(p, "sendID"), _text(p, "recvID"))))
    if p.get("sessionType") == GROUP_CHAT:
        return "sg_" + _text(p, "groupID")
    return None


def after_msg_save_db(ctx: Context, p: dict[str, Any]) -> None:
    """The sidecar's message was stored at a seq: reads of that seq are tracked (SPEC §7).

    Also a confirmation of the send: with ``attentionIds`` set on
    afterSendSingleMsg, OpenIM main compares recvID only and filters out the
    after-send callback of every message the sidecar sends to a user, while
    afterMsgSaveDB is never filtered by it (OPENIM.md §5.4).
    """
    if p.get("sendID") != ctx.sender_id:
        return
    _settle_batched(ctx, p, [p.get("recvID")])
    server_msg_id = _text(p, "serverMsgID")
    _log_confirmed(p, ctx.store.confirm_sent(server_msg_id, ctx.now_ms))
    conversation, seq = conversation_id(p), p.get("seq")
    if conversation is None or not isinstance(seq, int) or seq <= 0:
        log.debug("saved message %s has no chat conversation or seq; reads cannot be tracked", server_msg_id)
        return
    ctx.store.record_saved_seq(server_msg_id, conversation, seq)


def single_msg_read(ctx: Context, p: dict[str, Any]) -> None:
    """A user read these seqs of a conversation (note OpenIM's capitalised ``Seqs``)."""
    seqs = [s for s in _read_seqs(p) if isinstance(s, int) and not isinstance(s, bool)]
    if seqs:
        ctx.store.mark_read(_text(p, "conversationID"), seqs, _text(p, "userID"), ctx.now_ms)


def group_msg_read(ctx: Context, p: dict[str, Any]) -> None:
    """Understood and ignored: OpenIM names the reader and the new hasReadSeq but not the group
    (OPENIM.md §5.8), so no message can be matched. Stored for the record."""


def _presence(online: bool) -> Handler:
    def handle(ctx: Context, p: dict[str, Any]) -> None:
        # Level reports, unordered: the store keeps the newest seq per user and platform.
        platform = _integer(p, "platformID")
        # OpenIM's online push skips an iOS app in the background: not reachable, so offline here
        reachable = online and not (platform == IOS_PLATFORM and p.get("isAppBackground") is True)
        ctx.store.update_presence(_text(p, "userID"), platform, reachable, _integer(p, "seq"), ctx.now_ms)
    handle.__doc__ = f"A user's platform reported {'online' if online else 'offline'} (ordered by seq)."
    return handle


def before_online_push(ctx: Context, p: dict[str, Any]) -> None:
    """OpenIM is pushing the sidecar's message to a user's online devices (only when the
    operator enables the hook). Matched on clientMsgID *and* user: batch_send_msg gives every
    user of one call the same clientMsgID (OpenIM's ``BatchSendMsg`` builds the message once)."""
    if p.get("sendID") == ctx.sender_id:
        users = _receivers(ctx, p.get("userIDList"))
        _settle_batched(ctx, p, users)
        ctx.store.mark_pushed(_text(p, "clientMsgID"), "user", users, ctx.now_ms)


def before_group_online_push(ctx: Context, p: dict[str, Any]) -> None:
    """OpenIM is pushing the sidecar's message to a group's online members."""
    if p.get("sendID") == ctx.sender_id:
        ctx.store.mark_pushed(_text(p, "clientMsgID"), "group", [_text(p, "groupID")], ctx.now_ms)


HANDLERS: dict[str, Handler] = {
    "callbackAfterSendSingleMsgCommand": after_send_single,
    "callbackAfterSendGroupMsgCommand": after_send_group,
    "callbackAfterMsgSaveDBCommand": after_msg_save_db,
    "callbackAfterSingleMsgReadCommand": single_msg_read,
    "callbackAfterGroupMsgReadCommand": group_msg_read,
    "callbackAfterUserOnlineCommand": _presence(True),
    "callbackAfterUserOfflineCommand": _presence(False),
    "callbackBeforeOnlinePushCommand": before_online_push,
    "callbackBeforeGroupOnlinePushCommand": before_group_online_push,
}

_KEYS: dict[str, Callable[[dict[str, Any]], list[Any]]] = {
    "callbackAfterSendSingleMsgCommand": _message_key,
    "callbackAfterSendGroupMsgCommand": _message_key,
    "callbackAfterMsgSaveDBCommand": _message_key,
    "callbackAfterSingleMsgReadCommand": _single_read_key,
    "callbackAfterGroupMsgReadCommand": _group_read_key,
    "callbackAfterUserOnlineCommand": _presence_key(True),
    "callbackAfterUserOfflineCommand": _presence_key(False),
    "callbackBeforeOnlinePushCommand": _push_key,
    "callbackBeforeGroupOnlinePushCommand": _group_push_key,
}


def apply_callback(ctx: Context, record: CallbackRecord) -> None:
    """Run the handler of one stored callback; raises when its payload cannot be applied."""
    handler = HANDLERS.get(record.command)
    if handler is None:  # stored by another version of the sidecar
        log.debug("callback %d: %s is not handled here; ignored", record.id, record.command)
        return
    payload = json.loads(record.body)
    if not isinstance(payload, dict):
        raise ValueError(f"payload is a JSON {type(payload).__name__}, not an object")
    handler(ctx, payload)


# -- the processor ---------------------------------------------------------------------------
class CallbackProcessor:
    """Applies stored callbacks in arrival order; ``step()`` is one round, ``loop`` runs threads."""

    def __init__(self, config: Config, store: Store, clock: Callable[[], float] = time.time, *,
                 on_change: Callable[[], None] = lambda: None,
                 on_online: Callable[[], None] = lambda: None) -> None:
        self.config, self.store, self.clock = config, store, clock
        # Called after a round that applied callbacks: they may have emitted subscriber
        # events (on_change), and a user coming online makes held recipients due (on_online;
        # waking delivery after every round caused a burst of empty lease rounds).
        self.on_change, self.on_online = on_change, on_online
        self.metrics: Metrics = DISCARD  # the app's, once metrics.install() hands it over
        # callbacks come one by one: gathering them for a moment makes a round (one
        # transaction, one fsync) apply many, and leaves the CPU to OpenIM's answers
        self.loop = BackgroundLoop("callbacks", self.step, gather_seconds=GATHER_SECONDS, full_round=BATCH_SIZE)
        self._next_prune = 0.0  # at once after start-up, then every PRUNE_EVERY_SECONDS

    def step(self) -> int:
        """Process up to one batch of pending callbacks; returns how many were finished.

        A callback whose handler fails is marked with the error (and not
        tried again) so one odd payload never holds up the rest: a field of
        the wrong type, or a value the store refuses (StorageRejected: too
        big, not bindable). A storage failure of the moment (a lock, I/O, a
        full disk) is different: the callback stays pending and the round
        ends, to be tried again once the store answers.
        """
        finished: list[tuple[CallbackRecord, str | None]] = []  # each with its error, if any
        records = self.store.pending_callbacks(BATCH_SIZE)
        for start in range(0, len(records), CHUNK_SIZE):
            # one transaction per chunk: a commit (an fsync) per presence report cost more CPU
            # than the reports themselves; a whole round in one would hold the main file's
            # writer lock (message intake, delivery outcomes) across the yields below
            applied: list[tuple[CallbackRecord, str | None]] = []
            try:
                with self.store.batch():
                    postponed = self._apply(records[start:start + CHUNK_SIZE], applied)
            except StorageUnavailable as exc:  # the chunk's transaction did not start or commit
                log.warning("callbacks left for later: %s", exc, extra={"event": "callback.postponed"})
                break
            finished += applied  # committed
            if postponed:
                break
            time.sleep(0)  # hand the GIL to OpenIM's waiting answers between chunks
        if finished:
            self.store.finish_callbacks([(record.id, error) for record, error in finished])
            for record, error in finished:
                self.metrics.callback_processed(record.command, error is None)
            self.on_change()
            if any(record.command == ONLINE_COMMAND for record, _ in finished):
                self.on_online()  # a user came online: recipients held for them may be due now
        self._prune()
        return len(finished)

    def _prune(self) -> None:
        """Forget processed callbacks older than ``callbacks.retention_seconds``, so the inbox
        holds that window's callbacks and no more (unprocessed ones are never forgotten)."""
        now = self.clock()
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_EVERY_SECONDS
        before_ms = int((now - self.config.callback_retention_seconds) * 1000)
        forgotten = 0
        try:
            while (pruned := self.store.prune_callbacks(before_ms, PRUNE_CHUNK)) > 0:
                forgotten += pruned
                if pruned < PRUNE_CHUNK:
                    break
                time.sleep(0)  # OpenIM's answers may need the inbox between chunks
        except StorageUnavailable as exc:
            log.warning("processed callbacks not pruned this time: %s", exc, extra={"event": "callback.prune_failed"})
        self.metrics.deleted("callbacks", forgotten)
        if forgotten:
            log.debug("forgot %d processed callbacks received before %d", forgotten, before_ms,
                      extra={"event": "callback.pruned", "callbacks": forgotten})

    def _apply(self, records: list[CallbackRecord], finished: list[tuple[CallbackRecord, str | None]]) -> bool:
        """Apply *records* in order, adding each to *finished*; True when storage failed and the rest must wait."""
        for record in records:
            ctx = Context(self.store, self.config.openim.sender_id, int(self.clock() * 1000))
            try:
                apply_callback(ctx, record)
                error = None
            except StorageRejected as exc:  # this payload can never be stored: it fails alone
                error = f"rejected by the store: {exc.detail}"[:500]
                log.warning("callback %d (%s) could not be applied: %s", record.id, record.command, error,
                            extra={"event": "callback.failed", "callback": record.command})
            except StorageUnavailable as exc:  # a lock, the disk: the same callback may go through later
                log.warning("callback %d (%s) left for later: %s", record.id, record.command, exc,
                            extra={"event": "callback.postponed", "callback": record.command})
                return True
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
                log.warning("callback %d (%s) could not be applied: %s", record.id, record.command, error,
                            extra={"event": "callback.failed", "callback": record.command})
            finished.append((record, error))
        return False

    def wake(self) -> None:
        """A callback was stored: let an idle thread process it now instead of at its next poll."""
        self.loop.wake()

    def start(self, threads: int = 1) -> None:
        """Process callbacks in background threads of this process (one is plenty)."""
        self.loop.start(threads)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the round in flight; unprocessed callbacks stay stored."""
        self.loop.stop(timeout)
