"""How leased recipients become OpenIM calls (SPEC §5).

``notification`` mode sends ``/msg/send_business_notification`` per user or
group; ``custom`` mode sends a Custom (110) message with ``/msg/send_msg``,
or ``/msg/batch_send_msg`` when several users of one message are due
together. Group business notifications exist only on OpenIM main: on v3.8.x
(the detected or configured release, see openim/release.py; or learnt from
the endpoint's refusal of ``recvGroupID``) the sender sends one notification
per member instead.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from ..config import Config
from ..openim.client import OpenIMClient, OpenIMError, SendResult
from ..openim.release import V38, OpenIMRelease
from ..store.base import Outcome, Store, WorkItem
from .offline import OfflinePolicy
from .throttle import RecipientThrottle

log = logging.getLogger(__name__)
Decide = Callable[[WorkItem, OpenIMError], Outcome]
Results = list[tuple[WorkItem, Outcome]]


class Sender:
    """Delivers a batch of leased items and says what became of each."""

    def __init__(self, config: Config, openim: OpenIMClient, store: Store, release: OpenIMRelease,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.openim = openim
        self.release = release
        self.clock = clock
        self.offline = OfflinePolicy(config, store, openim, release, clock)
        self.throttle = RecipientThrottle(store, clock)

    def prepare(self, items: list[WorkItem], decide: Decide) -> tuple[Results, list[WorkItem]]:
        """Checks before sending, batched over the round: earlier attempts whose answer
        was lost, unknown users (before holding them: they never come online), offline
        policies. Returns (settled outcomes, items to send)."""
        results: Results = []
        due = [item for item in items if not self._confirmed_earlier(item, decide, results)]
        if self.config.openim.check_recipients:
            due = self._drop_unknown_users(due, decide, results)
        record = lambda item, outcome: self._record(results, item, outcome)  # noqa: E731
        due = self.offline.apply(due, decide, record)
        due = self.throttle.apply(due, record)
        return results, due

    @staticmethod
    def units(items: list[WorkItem]) -> list[list[WorkItem]]:
        """What one OpenIM call sends: custom-mode users of one message together (a batch
        item already is such a call), else one each."""
        by_message: dict[str, list[WorkItem]] = defaultdict(list)
        units = []
        for item in items:
            if item.mode == "custom" and item.kind == "user" and item.members is None:
                by_message[item.message_id].append(item)
            else:
                units.append([item])
        return units + list(by_message.values())

    def send_unit(self, unit: list[WorkItem], decide: Decide) -> Results:
        """Make the OpenIM call for one unit; one outcome per item."""
        results: Results = []
        if len(unit) == 1 and unit[0].members is None:
            self._send_one(unit[0], decide, results)
        else:
            self._send_batch(unit, decide, results)
        # a retry that surely sent nothing (OpenIM unreachable, or it answered an error) keeps no
        # rate-limit slot: an outage must not use up a recipient's window
        self.throttle.give_back([item for item, outcome in results
                                 if outcome.status == "queued" and outcome.unknown_operation_id is None])
        return results

    # -- before sending ------------------------------------------------------------
    def _confirmed_earlier(self, item: WorkItem, decide: Decide, results: Results) -> bool:
        """Ask OpenIM whether an earlier send_msg whose answer we lost arrived after all.

        Not for a batch: OpenIM records send_msg's operationIDs, not batch_send_msg's
        (OPENIM.md §3.7), so a batch whose answer was lost goes again, and apps tell the
        repeat by the envelope id."""
        if not item.check_operation_id or item.mode != "custom" or item.members is not None:
            return False
        try:
            arrived = self.openim.check_msg_is_send_success(item.check_operation_id)
        except OpenIMError as error:
            outcome = decide(item, error)
            if outcome.status == "queued":  # still unknown: the next attempt must ask again
                outcome = dataclasses.replace(outcome, unknown_operation_id=item.check_operation_id)
            self._record(results, item, outcome)
            return True
        if arrived:
            self._record(results, item, Outcome.sent(
                None, None, self._now_ms(),
                reason=f"operationID {item.check_operation_id} arrived (check_msg_is_send_success)"))
        return arrived

    def _drop_unknown_users(self, items: list[WorkItem], decide: Decide, results: Results) -> list[WorkItem]:
        """``/user/account_check`` first: OpenIM accepts notifications for users that do not exist."""
        users = sorted({i.target for i in items if i.kind == "user" and i.mode == "notification"})
        if not users:
            return items
        try:
            registered = self.openim.account_check(users)
        except OpenIMError as error:
            for item in items:
                results.append((item, decide(item, error)))
            return []
        keep = []
        for item in items:
            if item.kind == "user" and item.mode == "notification" and not registered.get(item.target, False):
                self._record(results, item, Outcome.failed("user is not registered in OpenIM",
                                                           "unknown user (checked with /user/account_check)"))
            else:
                keep.append(item)
        return keep

    # -- sending ---------------------------------------------------------------------
    def _send_one(self, item: WorkItem, decide: Decide, results: Results) -> None:
        try:
            if item.mode == "custom":
                outcome = self._sent(self._send_custom(item))
            elif item.kind == "group" and self.release.get() == V38:
                outcome = self._notify_members(item)
            else:
                outcome = self._sent(self._notify(item, item.kind, item.target, item.operation_id))
        except OpenIMError as error:
            if item.kind == "group" and item.mode == "notification" and self.release.learn(error):
                return self._send_one(item, decide, results)  # v3.8.x after all: to each member
            outcome = decide(item, error)
        self._record(results, item, outcome)

    def _notify(self, item: WorkItem, kind: str, target: str, operation_id: str) -> SendResult:
        return self.openim.send_business_notification(
            send_user_id=self.config.openim.sender_id, key=item.type, data=item.envelope,
            recv_user_id=target if kind == "user" else None, recv_group_id=target if kind == "group" else None,
            reliability_level=2 if item.delivery.get("persistent") else 1, operation_id=operation_id)

    def _notify_members(self, item: WorkItem) -> Outcome:
        members = self.openim.group_member_ids(item.target)
        if not members:  # OpenIM answers an unknown group with an empty list, not an error
            return Outcome.failed("the group has no members (or does not exist)", "unknown or empty group")
        for n, member in enumerate(members):
            self._notify(item, "user", member, f"{item.operation_id}-{n}")
        return Outcome.sent(None, None, self._now_ms(), reason=f"sent to {len(members)} members one by one")

    def _content(self, item: WorkItem) -> dict[str, str]:
        return {"data": item.envelope, "description": item.type, "extension": ""}

    def _push(self, item: WorkItem) -> dict[str, Any]:
        return {"push_title": item.delivery.get("push_title") or "", "push_desc": item.delivery.get("push_desc") or ""}

    def _send_custom(self, item: WorkItem) -> SendResult:
        target = {"recv_id": item.target} if item.kind == "user" else {"group_id": item.target}
        return self.openim.send_msg(send_id=self.config.openim.sender_id, content=self._content(item),
                                    operation_id=item.operation_id, **target, **self._push(item))

    def _send_batch(self, items: list[WorkItem], decide: Decide, results: Results) -> None:
        """One ``batch_send_msg`` for several users of one message, mapped back per user:
        *items* are the users' own items, or one batch item (``members``) whose outcome is
        one for all of them, with the users OpenIM refused split off."""
        first = items[0]
        users = [i.target for i in items] if first.members is None else [user for _, user in first.members]
        try:
            batch = self.openim.batch_send_msg(
                send_id=self.config.openim.sender_id, content=self._content(first),
                recv_ids=users, operation_id=first.operation_id, **self._push(first))
        except OpenIMError as error:
            for item in items:
                self._record(results, item, decide(item, error))
            return
        sent_to, now_ms = batch.sent_to, self._now_ms()
        if first.members is None:
            refused = [i for i in items if i.target not in sent_to]
            for item in items:
                if item.target in sent_to:
                    server_msg_id, client_msg_id, send_time = batch.sent[item.target]
                    results.append((item, Outcome.sent(server_msg_id, client_msg_id, send_time or now_ms)))
        else:  # one outcome for the batch, with OpenIM's answer as it came (the store keeps it)
            refused = [first.member(seq, user) for seq, user in first.members if user not in sent_to]
            results.append((first, Outcome.sent_batch(batch.answer, sent_to, now_ms)))
        # one log line per batch call (a line per user cost ~15 us each); refusals are logged one by one
        log.info("message %s: batch_send_msg to %d users: %d sent, %d refused (operationID %s, attempt %d)",
                 first.message_id, len(users), len(users) - len(refused), len(refused), first.operation_id,
                 first.attempts, extra={"event": "delivery.batch", "message_id": first.message_id,
                                        "client": first.client, "type": first.type,
                                        "operation_id": first.operation_id, "recipients": len(users),
                                        "refused": len(refused), "attempt": first.attempts})
        self._settle_refused(refused, decide, results)

    def _settle_refused(self, items: list[WorkItem], decide: Decide, results: Results) -> None:
        """OpenIM swallows per-user batch errors (``failedUserIDs`` names no reason), so each
        refused user is sent once more alone with ``send_msg``, whose answer says why: an unknown
        user (1004) or one who does not accept messages (1001 "message is not sent") fails for
        good, as with send_msg; a passing fault is retried. The first retryable answer ends the
        one-by-one sends: the rest are retried later instead of each waiting for it too."""
        for n, item in enumerate(items):
            alone = dataclasses.replace(item, operation_id=self.openim.new_operation_id(item.message_id))
            try:
                outcome = self._sent(self._send_custom(alone))
            except OpenIMError as error:
                outcome = decide(item, error)
                if error.retryable:
                    self._record(results, item, outcome)
                    for rest in items[n + 1:]:
                        refusal = OpenIMError.batch_refusal("/msg/batch_send_msg", rest.operation_id)
                        self._record(results, rest, decide(rest, refusal))
                    return
            self._record(results, item, outcome)

    # -- bookkeeping -----------------------------------------------------------------
    def _sent(self, result: SendResult) -> Outcome:
        return Outcome.sent(result.server_msg_id, result.client_msg_id, result.send_time_ms or self._now_ms())

    def _record(self, results: Results, item: WorkItem, outcome: Outcome) -> None:
        if item.members is None:
            recipient = item.target
        else:  # a batch the rate limit emptied has no users left to name
            recipient = f"{item.target} (batch of {item.size})" if item.members else f"batch {item.batch_id} (emptied)"
        log.info("message %s %s %s: %s (operationID %s, attempt %d)%s", item.message_id, item.kind, recipient,
                 outcome.status, item.operation_id, item.attempts,
                 f": {outcome.error}" if outcome.error else "",
                 extra={"event": "delivery.outcome", "message_id": item.message_id, "recipient": item.target,
                        "kind": item.kind, "client": item.client, "type": item.type,
                        "operation_id": item.operation_id, "status": outcome.status, "attempt": item.attempts})
        results.append((item, outcome))

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)
