"""The storage contract: what every backend must do, as one test mixin.

``test_store_contract.py`` runs :class:`StoreContract` against SQLite and
against a real Redis (huey's ``tests/test_storage.py`` pattern). A subclass
provides ``new_store(event_types)``: every store it opens shares one
backend, like replicas sharing one database. Time is always injected.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from typing import Any

import pytest

from openim_bizplugin.store.base import (IdempotencyMismatch, NewMessage, Outcome, PresenceCounts, PresenceState,
                                        ReplayKey, Retention, Swept)
from openim_bizplugin.store.base import SubscriberCursor

T0 = 1_700_000_000_000
DAY = 86_400_000
RETENTION = Retention(finished_ms=DAY, dead_letter_ms=3 * DAY, presence_ms=3_600_000)
EVENTS = frozenset({"message.sent", "message.failed", "message.expired", "message.read", "receipt.received",
                    "user.online", "user.offline"})


def new(mid: str = "m1", *targets: str, priority: str = "normal", created: int = T0, ttl: int = 60,
        key: str | None = None, digest: str = "h", client: str = "crm", kind: str = "user",
        offline: str = "store", collapse: str | None = None, mode: str = "notification",
        delivery: dict[str, Any] | None = None) -> NewMessage:
    return NewMessage(
        id=mid, client=client, type="profile.updated", version=1, mode=mode, priority=priority,
        offline=offline, ttl_seconds=ttl, collapse_key=collapse, idempotency_key=key, request_hash=digest,
        envelope='{"id":"%s"}' % mid, delivery=delivery or {"persistent": True}, target_kind=kind,
        targets=targets or ("u1", "u2"), created_ms=created)


class OpIds:
    """Fresh operationIDs per call, as the OpenIM client makes them."""

    def __init__(self, tag: str = "op") -> None:
        self.tag, self.counter = tag, itertools.count(1)

    def __call__(self, hint: str) -> str:
        return f"{self.tag}{next(self.counter)}-{hint}"


def statuses(store: Any, mid: str) -> list[str]:
    return [r.status for r in store.get_message(mid).recipients]


def users_of(items: list) -> list[str]:
    """The users leased items stand for: a batch item's members, or the item's own target."""
    return sorted(user for item in items for _seq, user in (item.members or [(item.seq, item.target)]))


def answered(items: list, now: int, refused: frozenset[str] = frozenset()) -> list:
    """Outcomes for leased custom-mode items as batch_send_msg answers them: every user sent
    (serverMsgID ``s-<user>``), except *refused* users, retried a second later."""
    def sent(user: str) -> Outcome:
        return Outcome.retry("refused", now + 1_000) if user in refused else Outcome.sent(f"s-{user}", f"c-{user}", now)
    results = []
    for item in items:
        if item.members is None:
            results.append((item, sent(item.target)))
        else:
            results += [(item.member(seq, user), sent(user)) for seq, user in item.members if user in refused]
            results.append((item, sent_batch(
                {user: (f"s-{user}", f"c-{user}", now) for _seq, user in item.members if user not in refused}, now)))
    return results


def sent_batch(answers: dict[str, tuple[str, str, int]], now: int) -> Outcome:
    """A batch's outcome as the sender makes it: OpenIM's batch_send_msg answer, as OpenIM sends it."""
    results = [{"serverMsgID": s, "clientMsgID": c, "sendTime": t, "recvID": user}
               for user, (s, c, t) in answers.items()]
    answer = json.dumps({"errCode": 0, "errMsg": "", "errDlt": "", "data": {"results": results, "failedUserIDs": []}})
    return Outcome.sent_batch(answer, frozenset(answers), now)


def swept_all(store: Any, now: int, retention: Retention = RETENTION, budget: int = 1_000) -> Swept:
    """Sweep until the store says it is done for now; what it deleted in all."""
    total = Swept()
    for _ in range(1_000):
        step = store.sweep(now, retention, budget)
        total.messages, total.recipients = total.messages + step.messages, total.recipients + step.recipients
        total.presence += step.presence
        if not step.more:
            return total
    raise AssertionError("the sweep never finished")


class StoreContract:
    """Tests every backend passes; subclasses define the ``new_store``, ``replica_code`` and ``corrupt``
    fixtures (``corrupt(message_id, field, value)`` sets a stored message field as a bug or a hand edit
    might; field None deletes the message)."""

    @pytest.fixture
    def store(self, new_store: Any) -> Any:
        return new_store(EVENTS)

    def lease(self, store: Any, now: int = T0, limit: int = 100, lease_ms: int = 10_000, owner: str = "w",
              aging_ms: int = 3_600_000) -> list:
        return store.lease(now, limit, lease_ms, owner, OpIds(owner), aging_ms=aging_ms)

    # -- intake -----------------------------------------------------------------------
    def test_accept_stores_the_message_and_its_recipients(self, store):
        accepted = store.accept(new("m1", "u1", "u2"), None, retention_ms=10_000)
        assert accepted.created and accepted.answer() == {"id": "m1", "status": "queued", "recipients": 2}
        record = store.get_message("m1")
        assert (record.id, record.client, record.type, record.version, record.priority, record.offline,
                record.created_ms, record.expires_ms) == ("m1", "crm", "profile.updated", 1, "normal", "store",
                                                          T0, T0 + 60_000)
        assert [(r.kind, r.target, r.status, r.attempts, r.receipt) for r in record.recipients] == [
            ("user", "u1", "queued", 0, None), ("user", "u2", "queued", 0, None)]
        assert store.get_message("nope") is None

    def test_a_replayed_request_gets_the_first_answer(self, store):
        replay = ReplayKey("crm", "v" * 64, 42)
        store.accept(new("m1"), replay, retention_ms=10_000)
        again = store.accept(new("m2"), replay, retention_ms=10_000)
        first = store.replayed(replay)
        assert (again.message_id, again.recipients, again.created) == (first.message_id, first.recipients, False)
        assert (first.message_id, first.created, first.type, first.version) == ("m1", False, "profile.updated", 1)
        assert store.replayed(ReplayKey("crm", "v" * 64, 43)) is None
        assert store.get_message("m2") is None

    def test_idempotency_same_mismatch_per_client_and_retention(self, store):
        store.accept(new("m1", key="k"), None, retention_ms=1_000)
        repeat = store.accept(new("m2", key="k", created=T0 + 999), None, retention_ms=1_000)
        assert (repeat.message_id, repeat.created, repeat.recipients) == ("m1", False, 2)
        with pytest.raises(IdempotencyMismatch):
            store.accept(new("m3", key="k", digest="other"), None, retention_ms=1_000)
        assert store.accept(new("m4", key="k", client="ops"), None, retention_ms=1_000).created
        assert store.accept(new("m5", key="k", created=T0 + 1_000), None, retention_ms=1_000).created
        assert store.accept(new("m6", key="k", created=T0 + 1_500), None, retention_ms=1_000).message_id == "m5"
        assert [store.get_message(m) is None for m in ("m2", "m3", "m6")] == [True, True, True]

    # -- leasing ----------------------------------------------------------------------
    def test_lease_takes_the_best_priority_first_then_the_oldest(self, store):
        store.accept(new("low", "a", priority="low"), None, retention_ms=0)
        store.accept(new("n2", "b", created=T0 + 2), None, retention_ms=0)
        store.accept(new("n1", "c", created=T0 + 1), None, retention_ms=0)
        store.accept(new("high", "d", priority="high", created=T0 + 3), None, retention_ms=0)
        store.accept(new("later", "e", priority="high", created=T0 + 50), None, retention_ms=0)
        assert [i.message_id for i in self.lease(store, T0 + 10, limit=3)] == ["high", "n1", "n2"]
        assert [i.message_id for i in self.lease(store, T0 + 10)] == ["low"]
        assert self.lease(store, T0 + 10) == []

    def test_a_work_item_carries_what_the_worker_needs(self, store):
        store.accept(new("m1", "g1", kind="group", offline="hold"), None, retention_ms=0)
        [item] = store.lease(T0, 10, 5_000, "w1", lambda hint: f"op-{hint}")
        assert (item.message_id, item.seq, item.kind, item.target, item.attempts, item.operation_id,
                item.check_operation_id, item.lease_owner) == ("m1", 0, "group", "g1", 1, "op-m1-0", None, "w1")
        assert (item.client, item.type, item.version, item.mode, item.priority, item.offline, item.envelope,
                item.delivery, item.expires_ms) == ("crm", "profile.updated", 1, "notification", "normal", "hold",
                                                    '{"id":"m1"}', {"persistent": True}, T0 + 60_000)
        assert statuses(store, "m1") == ["sending"]

    def test_a_live_lease_is_not_handed_out_again(self, store):
        store.accept(new("m1"), None, retention_ms=0)
        assert len(self.lease(store, T0, lease_ms=1_000)) == 2
        assert self.lease(store, T0 + 999, owner="other") == []

    def test_an_expired_lease_is_taken_over_and_asks_about_the_lost_attempt(self, store):
        store.accept(new("m1", "u1"), None, retention_ms=0)
        [lost] = self.lease(store, T0, lease_ms=1_000, owner="dead")
        [taken] = self.lease(store, T0 + 1_000, owner="alive")
        assert (taken.attempts, taken.check_operation_id, taken.lease_owner) == (2, lost.operation_id, "alive")
        assert taken.operation_id != lost.operation_id
        assert store.complete([(lost, Outcome.sent("s-late", "c", T0 + 1_001))], T0 + 1_001) == 0
        assert store.complete([(taken, Outcome.sent("s1", "c1", T0 + 1_002))], T0 + 1_002) == 1
        assert store.get_message("m1").recipients[0].server_msg_id == "s1"

    def test_renew_extends_only_the_holders_lease(self, store):
        store.accept(new("m1", "u1", "u2"), None, retention_ms=0)
        mine = self.lease(store, T0, lease_ms=1_000)
        assert store.renew(mine[:1], T0 + 900, 1_000) == mine[:1]
        [other] = self.lease(store, T0 + 1_000, owner="other")  # only the one not renewed ran out
        assert other.seq == 1
        assert store.renew(mine, T0 + 1_100, 1_000) == mine[:1]
        assert self.lease(store, T0 + 1_950, owner="third") == []

    def test_a_retry_waits_for_its_time_and_carries_the_unknown_operation(self, store):
        store.accept(new("m1", "u1"), None, retention_ms=0)
        [first] = self.lease(store)
        assert store.complete([(first, Outcome.retry("timeout", T0 + 5_000, first.operation_id))], T0 + 1) == 1
        [r] = store.get_message("m1").recipients
        assert (r.status, r.attempts, r.last_error) == ("queued", 1, "timeout")
        assert self.lease(store, T0 + 4_999) == []
        [second] = self.lease(store, T0 + 5_000)
        assert (second.attempts, second.check_operation_id) == (2, first.operation_id)
        store.complete([(second, Outcome.sent("s1", "c1", T0 + 5_001))], T0 + 5_001)
        [r] = store.get_message("m1").recipients
        assert (r.status, r.attempts, r.last_error, r.server_msg_id, r.client_msg_id, r.sent_ms) == (
            "sent", 2, None, "s1", "c1", T0 + 5_001)
        assert self.lease(store, T0 + 100_000) == []

    def test_skipped_is_final_with_its_reason(self, store):
        store.accept(new("m1", "u1"), None, retention_ms=0)
        [item] = self.lease(store)
        store.complete([(item, Outcome.skipped("user offline"))], T0 + 1)
        [r] = store.get_message("m1").recipients
        assert (r.status, r.reason) == ("skipped", "user offline")
        assert store.next_due_ms() is None

    def test_a_held_recheck_is_no_attempt_and_coming_online_releases_it_first(self, store):
        store.accept(new("m1", "u1", offline="hold"), None, retention_ms=0)
        store.accept(new("m2", "u2", created=T0 - 5), None, retention_ms=0)
        [item] = [i for i in self.lease(store) if i.message_id == "m1"]
        store.complete([(item, Outcome.held("user offline", T0 + 30_000))], T0 + 1)
        assert (store.get_message("m1").recipients[0].status, store.get_message("m1").recipients[0].reason) == (
            "held", "user offline")
        [recheck] = [i for i in self.lease(store, T0 + 30_000, owner="w2") if i.message_id == "m1"]
        assert (recheck.attempts, getattr(recheck, "counted", False)) == (1, False)
        store.complete([(recheck, Outcome.held("still offline", T0 + 60_000 - 1))], T0 + 30_001)
        store.accept(new("m3", "u3", created=T0 + 30_002), None, retention_ms=0)
        assert store.update_presence("u1", 1, True, 1, T0 + 30_005)
        [first] = self.lease(store, T0 + 30_005, limit=1, owner="w3")
        assert (first.message_id, first.attempts) == ("m1", 1)  # due at once, before the older normal m3

    def test_a_newer_message_with_the_collapse_key_replaces_what_still_waits(self, store):
        store.accept(new("gone", "u2", ttl=1, created=T0 - 5_000, collapse="profile"), None, retention_ms=0)
        store.accept(new("m1", "u1", "u2", "u3", collapse="profile"), None, retention_ms=0)  # 'gone' had expired
        store.accept(new("other", "u2", client="ops", collapse="profile", created=T0 + 1), None, retention_ms=0)
        store.accept(new("groups", "u2", kind="group", collapse="profile", created=T0 + 1), None, retention_ms=0)
        [sending] = self.lease(store, limit=1)  # m1's u1 (the oldest, 'gone', is past its TTL)
        assert (sending.message_id, sending.target) == ("m1", "u1")
        store.accept(new("m2", "u1", "u2", created=T0 + 2, collapse="profile"), None, retention_ms=0)
        record = store.get_message("m1")
        assert [(r.status, r.reason) for r in record.recipients] == [
            ("sending", None), ("skipped", "replaced by newer message m2 (collapse_key 'profile')"),
            ("queued", None)]
        assert statuses(store, "other") == statuses(store, "groups") == ["queued"]
        assert statuses(store, "gone") == ["expired"]
        taken = {(i.message_id, i.target) for i in self.lease(store, T0 + 2)}
        assert taken == {("m1", "u3"), ("m2", "u1"), ("m2", "u2"), ("other", "u2"), ("groups", "u2")}

    def test_long_waiting_work_ages_up_a_level_then_two(self, store):
        store.accept(new("low", "u1", priority="low", ttl=3_600), None, retention_ms=0)
        store.accept(new("normal", "u2", created=T0 + 250_000, ttl=3_600), None, retention_ms=0)
        [first] = self.lease(store, T0 + 300_000, limit=1, aging_ms=300_000)
        assert first.message_id == "low"  # due for 300 s: counts as normal, and it is older
        store.accept(new("high", "u3", priority="high", created=T0 + 550_000, ttl=3_600), None, retention_ms=0)
        [second] = self.lease(store, T0 + 850_000, limit=1, aging_ms=300_000)
        assert second.message_id == "normal"  # due for 600 s: counts as high, and it is older

    def test_a_deferred_outcome_is_no_attempt_and_throttled_is_final(self, store):
        store.accept(new("m1", "u1", "u2"), None, retention_ms=0)
        a, b = self.lease(store)
        store.complete([(a, Outcome.deferred("delayed: rate limit", T0 + 5_000)),
                        (b, Outcome.throttled("dropped: rate limit"))], T0 + 1)
        assert [(r.status, r.attempts, r.reason) for r in store.get_message("m1").recipients] == [
            ("queued", 0, "delayed: rate limit"), ("throttled", 1, "dropped: rate limit")]
        assert store.next_due_ms() == T0 + 5_000
        [again] = self.lease(store, T0 + 5_000)
        assert (again.target, again.attempts) == ("u1", 1)

    def test_sent_counts_per_type_and_recipient(self, store):
        store.accept(new("m1", "u1", "u2"), None, retention_ms=0)
        store.accept(new("g1", "u1", kind="group", created=T0 + 1), None, retention_ms=0)
        a, b, g = self.lease(store, T0 + 1)
        store.complete([(a, Outcome.sent("s1", "c1", T0 + 10)), (b, Outcome.retry("busy", T0 + 99)),
                        (g, Outcome.sent("s2", "c2", T0 + 20))], T0 + 30)
        [c] = self.lease(store, T0 + 99)
        store.complete([(c, Outcome.sent("s3", "c3", T0 + 100))], T0 + 100)
        assert store.sent_counts("user", ["u1", "u2", "u3"], "profile.updated", T0) == {
            "u1": (1, T0 + 10), "u2": (1, T0 + 100)}
        assert store.sent_counts("user", ["u1", "u2"], "profile.updated", T0 + 10) == {"u2": (1, T0 + 100)}
        assert store.sent_counts("group", ["u1"], "profile.updated", T0) == {"u1": (1, T0 + 20)}
        assert store.sent_counts("user", ["u1", "u2"], "order.status_changed", 0) == {}
        assert store.sent_counts("user", [], "profile.updated", 0) == {}

    def test_sent_counts_add_a_users_own_sends_and_those_of_custom_fan_outs(self, store):
        limited = {"rate_limit": "10/hour"}
        store.accept(new("m1", "u1", delivery=limited), None, retention_ms=0)
        [one] = self.lease(store, T0 + 1)
        store.complete([(one, Outcome.sent("s1", "c1", T0 + 5))], T0 + 5)
        store.accept(new("m2", "u1", "u2", mode="custom", delivery=limited), None, retention_ms=0)
        fan_out = self.lease(store, T0 + 10)
        store.complete(answered(fan_out, T0 + 20), T0 + 20)
        assert store.sent_counts("user", ["u1", "u2", "u3"], "profile.updated", T0) == {
            "u1": (2, T0 + 5), "u2": (1, T0 + 20)}
        assert store.sent_counts("user", ["u1"], "profile.updated", T0 + 5) == {"u1": (1, T0 + 20)}

    def test_messages_started_counts_a_types_leased_messages_not_expired_by_then(self, store):
        store.accept(new("m1", "u1", ttl=60), None, retention_ms=0)  # expires at T0 + 60 s
        store.accept(new("m2", "u1", created=T0 + 1, ttl=120), None, retention_ms=0)  # at T0 + 121 s
        store.accept(dataclasses.replace(new("m3", "u1"), type="order.status_changed"), None, retention_ms=0)
        store.accept(new("m4", "u1", created=T0 + 10_000), None, retention_ms=0)  # not due yet
        assert store.messages_started("profile.updated", T0, 10) == 0  # nothing leased: nothing sent
        assert sorted(item.message_id for item in self.lease(store, T0 + 1)) == ["m1", "m2", "m3"]
        assert store.messages_started("profile.updated", T0, 10) == 2
        assert store.messages_started("profile.updated", T0 + 60_000, 10) == 1
        assert store.messages_started("profile.updated", T0 + 121_000, 10) == 0
        assert store.messages_started("profile.updated", T0, 1) == 1  # counted up to at_most
        assert store.messages_started("order.status_changed", T0, 10) == 1
        assert store.messages_started("app.upgrade_available", 0, 10) == 0

    def test_leased_elsewhere_names_leases_of_the_type_by_other_owners_until_they_end(self, store):
        store.accept(new("m1", "u1", "u2"), None, retention_ms=0)
        store.accept(dataclasses.replace(new("m2", "u3"), type="order.status_changed"), None, retention_ms=0)
        assert not store.leased_elsewhere("profile.updated", "w2", 0)  # nothing leased: nobody sent it
        mine = [i for i in self.lease(store, T0, limit=1, lease_ms=1_000, owner="w1")]
        assert [i.message_id for i in mine] == ["m1"]
        assert store.leased_elsewhere("profile.updated", "w2", T0 + 999)
        assert not store.leased_elsewhere("profile.updated", "w2", T0 + 1_000)  # that lease had ended
        assert not store.leased_elsewhere("profile.updated", "w1", T0)  # its own leases
        assert not store.leased_elsewhere("order.status_changed", "w2", T0)  # another type
        assert store.renew(mine, T0 + 900, 1_000) == mine  # a renewal holds it longer
        assert store.leased_elsewhere("profile.updated", "w2", T0 + 1_899)
        self.lease(store, T0 + 2_000, lease_ms=1_000, owner="w2")  # later leases of another owner add up
        assert store.leased_elsewhere("profile.updated", "w1", T0 + 2_999)
        assert store.leased_elsewhere("order.status_changed", "w1", T0 + 2_999)

    def test_release_gives_untried_work_back_due_at_once(self, store):
        store.accept(new("m1", "u1", "u2"), None, retention_ms=0)
        a, b = self.lease(store, lease_ms=10_000)
        assert store.release([a], T0 + 5) == 1
        assert store.release([a], T0 + 6) == 0  # no longer ours
        assert statuses(store, "m1") == ["queued", "sending"] and store.next_due_ms() == T0 + 5
        [again] = self.lease(store, T0 + 5, owner="w2")
        assert (again.target, again.attempts, again.check_operation_id) == ("u1", 1, None)

    def test_higher_due_sees_only_better_work_that_is_due(self, store):
        store.accept(new("low", "u1", priority="low"), None, retention_ms=0)
        store.accept(new("normal", "u2", created=T0 + 100), None, retention_ms=0)
        assert not store.higher_due(2, T0 + 99)
        assert store.higher_due(2, T0 + 100)
        assert not store.higher_due(1, T0 + 100) and not store.higher_due(0, T0 + 100)
        store.accept(new("high", "u3", priority="high", created=T0 + 200), None, retention_ms=0)
        assert store.higher_due(1, T0 + 200)

    # -- TTL ----------------------------------------------------------------------
    def test_recipients_past_their_ttl_expire_with_the_reason(self, store):
        store.accept(new("queued", "u1"), None, retention_ms=0)
        store.accept(new("held", "u1", offline="hold"), None, retention_ms=0)
        store.accept(new("sending", "u1"), None, retention_ms=0)
        items = {i.message_id: i for i in self.lease(store, T0, lease_ms=1_000)}
        store.complete([(items["queued"], Outcome.retry("busy", T0 + 60_000)),
                        (items["held"], Outcome.held("offline", T0 + 60_000))], T0 + 1)
        assert self.lease(store, T0 + 60_000) == []
        reasons = {m: store.get_message(m).recipients[0] for m in ("queued", "held", "sending")}
        assert {m: (r.status, r.reason) for m, r in reasons.items()} == {
            "queued": ("expired", "ttl passed before delivery"),
            "held": ("expired", "ttl passed while the user was offline"),
            "sending": ("expired", "ttl passed; the last attempt's outcome is unknown")}
        expired = [e for e in store.events_after(0, 100) if e.type == "message.expired"]
        assert sorted(e.data["message_id"] for e in expired) == ["held", "queued", "sending"]
        assert expired[0].data["user_id"] == "u1" and expired[0].data["client"] == "crm"
        assert store.next_due_ms() is None

    def test_expired_recipients_are_never_handed_out(self, store):
        store.accept(new("old", "u1", ttl=1), None, retention_ms=0)
        store.accept(new("new", "u2", ttl=600), None, retention_ms=0)
        assert [i.message_id for i in self.lease(store, T0 + 1_000, limit=1)] == ["new"]
        assert statuses(store, "old") == ["expired"]

    def test_a_recipient_past_its_ttl_since_the_last_lease_is_expired_when_picked(self, store):
        store.accept(new("old", "u1", ttl=1, created=T0 - 500), None, retention_ms=0)  # expires at T0 + 500
        store.accept(new("new", "u2", ttl=600), None, retention_ms=0)
        assert self.lease(store, T0, limit=0) == []  # a round a moment earlier, with no room
        leased = [i.message_id for i in self.lease(store, T0 + 600, limit=1)]
        assert statuses(store, "old") == ["expired"]
        leased += [i.message_id for i in self.lease(store, T0 + 700)]
        assert leased == ["new"]

    # -- failures -------------------------------------------------------------------
    def test_failed_recipients_are_dead_letters_until_replayed(self, store):
        store.accept(new("m1", "u1", "u2", "u3"), None, retention_ms=0)
        a, b, c = self.lease(store)
        store.complete([(a, Outcome.failed("e1", "refused")), (b, Outcome.failed("e2", "gave up")),
                        (c, Outcome.sent("s", "c", T0 + 1))], T0 + 1)
        [letter] = store.dead_letters()
        assert (letter.message_id, letter.client, letter.type, letter.failed, letter.last_error,
                letter.created_ms) == ("m1", "crm", "profile.updated", 2, "e2", T0 + 1)
        assert [e.data.get("reason") for e in store.events_after(0, 100) if e.type == "message.failed"] == [
            "refused", "gave up"]
        assert store.replay_dead_letters("nope", T0 + 2) == 0
        assert store.replay_dead_letters("m1", T0 + 2) == 2
        assert store.dead_letters() == [] and statuses(store, "m1") == ["queued", "queued", "sent"]
        again = self.lease(store, T0 + 2)
        assert [(i.target, i.attempts, i.check_operation_id) for i in again] == [("u1", 1, None), ("u2", 1, None)]

    def test_replay_all_dead_letters_newest_first(self, store):
        for n, mid in enumerate(("m1", "m2")):
            store.accept(new(mid, "u1"), None, retention_ms=0)
            [item] = self.lease(store, T0 + n)
            store.complete([(item, Outcome.failed("boom", "refused"))], T0 + 10 + n)
        assert [d.message_id for d in store.dead_letters()] == ["m2", "m1"]
        assert [d.message_id for d in store.dead_letters(limit=1)] == ["m2"]
        assert store.replay_dead_letters(None, T0 + 20) == 2 and store.dead_letters() == []

    def test_next_due_is_the_earliest_waiting_recipient(self, store):
        assert store.next_due_ms() is None
        store.accept(new("m1", "u1"), None, retention_ms=0)
        store.accept(new("m2", "u2", priority="low", created=T0 - 7), None, retention_ms=0)
        assert store.next_due_ms() == T0 - 7
        items = self.lease(store, T0, lease_ms=3_000)
        assert store.next_due_ms() == T0 + 3_000  # a lease comes due when it runs out
        store.complete([(items[0], Outcome.retry("busy", T0 + 2_000)), (items[1], Outcome.sent("s", "c", T0))], T0)
        assert store.next_due_ms() == T0 + 2_000

    # -- for the operator page ------------------------------------------------------------
    def test_queue_depth_counts_the_work_left_by_priority(self, store):
        assert store.queue_depth() == {"high": 0, "normal": 0, "low": 0}
        store.accept(new("h", "a", "b", priority="high"), None, retention_ms=0)
        store.accept(new("n", "c"), None, retention_ms=0)
        store.accept(new("l", "d", "e", "f", priority="low"), None, retention_ms=0)
        assert store.queue_depth() == {"high": 2, "normal": 1, "low": 3}
        a, b, c, d = self.lease(store, limit=4)  # leased work still counts: it is not done
        assert store.queue_depth() == {"high": 2, "normal": 1, "low": 3}
        store.complete([(a, Outcome.sent("s", "c", T0)), (b, Outcome.failed("e", "refused")),
                        (c, Outcome.held("offline", T0 + 60_000)), (d, Outcome.skipped("dropped"))], T0 + 1)
        assert store.queue_depth() == {"high": 0, "normal": 1, "low": 2}
        self.lease(store, T0 + 10_000, aging_ms=6_000)  # waiting that long, low counts as normal
        assert store.queue_depth() == {"high": 0, "normal": 3, "low": 0}

    def test_recent_messages_newest_first_with_their_first_recipients(self, store):
        store.accept(new("m1", "u1", "u2", "u3"), None, retention_ms=10_000)
        store.accept(new("m2", "g1", kind="group", priority="high", created=T0 + 1), None, retention_ms=10_000)
        store.accept(new("m3", *(f"v{i}" for i in range(5)), created=T0 + 2, key="k"), None, retention_ms=10_000)
        store.accept(new("again", "x", created=T0 + 3, key="k"), None, retention_ms=10_000)  # a repeat of m3
        a, b, _ = [i for i in self.lease(store) if i.message_id == "m1"]
        store.complete([(a, Outcome.sent("s1", "c1", T0 + 5)), (b, Outcome.failed("e", "refused"))], T0 + 5)
        newest, middle = store.recent_messages(2, recipients=2)
        assert (newest.message.id, newest.recipient_count, newest.status_counts) == ("m3", 5, {"queued": 5})
        assert [r.target for r in newest.message.recipients] == ["v0", "v1"]
        assert (middle.message.id, middle.message.priority, middle.recipient_count) == ("m2", "high", 1)
        assert [(r.kind, r.target) for r in middle.message.recipients] == [("group", "g1")]
        oldest = store.recent_messages(10)[2]
        assert oldest.message == store.get_message("m1") and len(store.recent_messages(10)) == 3
        assert (oldest.recipient_count, oldest.status_counts) == (3, {"sent": 1, "failed": 1, "sending": 1})
        assert store.recent_messages(0) == [] and store.recent_messages(1, recipients=0)[0].message.recipients == ()

    def test_failed_recipients_of_dead_letters_newest_first(self, store):
        for n, (mid, targets) in enumerate((("m1", ("u1", "u2", "u3")), ("m2", ("u4",)))):
            store.accept(new(mid, *targets), None, retention_ms=0)
            items = self.lease(store, T0 + n)
            store.complete([(i, Outcome.failed(f"e-{i.target}", "refused") if i.target != "u2"
                             else Outcome.sent("s", "c", T0)) for i in items], T0 + 10 + n)
        failed = store.failed_recipients(10)
        assert [(f.message_id, f.recipient.target, f.failed_ms) for f in failed] == [
            ("m2", "u4", T0 + 11), ("m1", "u1", T0 + 10), ("m1", "u3", T0 + 10)]
        first = failed[0]
        assert (first.client, first.type, first.recipient.status, first.recipient.attempts,
                first.recipient.last_error, first.recipient.reason) == (
                    "crm", "profile.updated", "failed", 1, "e-u4", "refused")
        assert [f.recipient.target for f in store.failed_recipients(2)] == ["u4", "u1"]
        store.acknowledge("m1", "u1", {"id": "m1", "ok": True}, T0 + 20)  # the app got it after all
        store.replay_dead_letters("m2", T0 + 21)
        assert [f.recipient.target for f in store.failed_recipients(10)] == ["u3"]
        assert store.failed_recipients(0) == []

    def test_presence_counts_users_by_their_last_report(self, store):
        assert store.presence_counts() == PresenceCounts(0, 0)
        store.update_presence("u1", 1, True, 1, T0)
        store.update_presence("u1", 2, False, 1, T0)  # online on another platform
        store.update_presence("u2", 1, True, 1, T0)
        store.update_presence("u2", 1, False, 2, T0 + 1)
        store.update_presence("u3", 1, True, 1, T0)
        store.update_presence("u3", 1, False, 0, T0 + 1)  # older report: ignored
        assert store.presence_counts() == PresenceCounts(online=2, offline=1)
        store.update_presence("u1", 1, False, 2, T0 + 2)
        assert store.presence_counts() == PresenceCounts(online=1, offline=2)

    # -- presence and events ------------------------------------------------------------
    def test_presence_is_ordered_by_seq_across_platforms(self, store):
        assert store.update_presence("u1", 1, True, 5, T0)
        assert not store.update_presence("u1", 1, False, 4, T0 + 1)  # older report
        assert not store.update_presence("u1", 1, False, 5, T0 + 1)
        assert store.update_presence("u1", 2, False, 1, T0 + 2)
        assert store.presence(["u1", "u2"]) == {"u1": PresenceState(True, T0 + 2)}
        assert store.update_presence("u1", 1, False, 6, T0 + 3)
        assert store.presence(["u1"]) == {"u1": PresenceState(False, T0 + 3)}
        assert store.presence([]) == {}
        changes = [(e.type, e.data) for e in store.events_after(0, 100)]
        assert changes == [("user.online", {"user_id": "u1", "platform_id": 1}),
                           ("user.offline", {"user_id": "u1", "platform_id": 1})]

    @staticmethod
    def _events_after_cursors(new_store, kept: int, *subscribers: str):
        """A store keeping *kept* delivered events, with cursors for *subscribers* and five events after them."""
        store = new_store(EVENTS)
        store.events_kept = kept
        for name in subscribers:
            store.subscriber_cursor(name)
        for seq in range(1, 6):
            store.update_presence(f"u{seq}", 1, True, 1, T0)
        return store

    def test_events_every_subscriber_passed_are_deleted_and_no_others(self, new_store):
        store = self._events_after_cursors(new_store, 0, "a", "b")
        store.save_subscriber_cursor(SubscriberCursor("a", 4))
        store.save_subscriber_cursor(SubscriberCursor("b", 2))
        assert [e.seq for e in store.events_after(0, 10)] == [3, 4, 5]  # 1 and 2 reached both
        store.save_subscriber_cursor(SubscriberCursor("b", 5))
        assert [e.seq for e in store.events_after(0, 10)] == [5]
        store.events_kept = 2  # the newest delivered ones stay for a look back
        store.update_presence("u9", 1, True, 1, T0)
        store.save_subscriber_cursor(SubscriberCursor("a", 6)), store.save_subscriber_cursor(SubscriberCursor("b", 6))
        assert [e.seq for e in store.events_after(0, 10)] == [5, 6]

    def test_forgetting_a_removed_subscriber_frees_the_events_only_it_waited_for(self, new_store):
        store = self._events_after_cursors(new_store, 1, "kept", "removed")
        store.save_subscriber_cursor(SubscriberCursor("kept", 5))
        assert [e.seq for e in store.events_after(0, 10)] == [1, 2, 3, 4, 5]  # "removed" has none of them
        assert store.subscriber_names() == ["kept", "removed"]
        assert store.forget_subscriber("removed")
        assert store.subscriber_names() == ["kept"]
        assert [e.seq for e in store.events_after(0, 10)] == [5]  # the newest delivered one stays
        assert not store.forget_subscriber("removed")
        store.subscriber_cursor("removed")  # configured again later: it starts after the newest event
        assert store.subscriber_cursor("removed").last_seq == 5

    def test_forgetting_the_last_subscriber_keeps_only_the_newest_events(self, new_store):
        store = self._events_after_cursors(new_store, 2, "gone")
        assert store.forget_subscriber("gone")
        assert store.subscriber_names() == []
        assert [e.seq for e in store.events_after(0, 10)] == [4, 5]

    def test_events_are_kept_only_for_subscribed_types(self, new_store):
        store = new_store(frozenset({"message.sent"}))
        store.accept(new("m1", "u1", "u2"), None, retention_ms=0)
        a, b = self.lease(store)
        store.complete([(a, Outcome.failed("e", "refused")), (b, Outcome.sent("s2", "c2", T0 + 1))], T0 + 1)
        store.update_presence("u1", 1, True, 1, T0 + 2)
        [event] = store.events_after(0, 10)
        assert (event.type, event.created_ms) == ("message.sent", T0 + 1)
        assert event.data == {"message_id": "m1", "type": "profile.updated", "client": "crm", "user_id": "u2",
                              "server_msg_id": "s2", "client_msg_id": "c2"}
        assert event.id.startswith("evt_")

    def test_a_new_subscriber_starts_after_the_newest_event_and_keeps_its_place(self, store):
        store.update_presence("u1", 1, True, 1, T0)
        store.update_presence("u2", 1, True, 1, T0)
        cursor = store.subscriber_cursor("crm-hook")
        assert (cursor.attempts, cursor.next_attempt_ms, cursor.last_error) == (0, 0, None)
        assert store.events_after(cursor.last_seq, 10) == []
        store.update_presence("u3", 1, True, 1, T0 + 1)
        store.update_presence("u4", 1, True, 1, T0 + 2)
        events = store.events_after(cursor.last_seq, 10)
        assert [e.data["user_id"] for e in events] == ["u3", "u4"] and events[0].seq < events[1].seq
        assert store.events_after(cursor.last_seq, 1) == events[:1]
        assert store.events_after(events[0].seq, 10) == events[1:]  # ids and seqs are stable
        saved = SubscriberCursor("crm-hook", events[0].seq, 2, T0 + 9, "HTTP 500")
        store.save_subscriber_cursor(saved)
        assert store.subscriber_cursor("crm-hook") == saved
        store.save_subscriber_cursor(SubscriberCursor("crm-hook", events[1].seq))
        assert store.subscriber_cursor("crm-hook") == SubscriberCursor("crm-hook", events[1].seq)
        assert store.subscriber_cursor("other").last_seq == events[1].seq

    # -- callbacks -----------------------------------------------------------------------
    def test_the_callback_inbox_dedupes_and_keeps_arrival_order(self, store):
        assert store.record_callback("cmdA", "k1", '{"a":1}', T0)
        assert not store.record_callback("cmdA", "k1", '{"a":2}', T0 + 1)
        assert store.record_callback("cmdA", "k2", '{"b":1}', T0 + 2)
        assert store.record_callback("cmdB", "k1", '{"c":1}', T0 + 3)
        pending = store.pending_callbacks(10)
        assert [(c.command, c.body, c.received_ms) for c in pending] == [
            ("cmdA", '{"a":1}', T0), ("cmdA", '{"b":1}', T0 + 2), ("cmdB", '{"c":1}', T0 + 3)]
        assert pending[0].id < pending[1].id < pending[2].id
        store.finish_callbacks([(pending[0].id, None), (pending[2].id, "ValueError: odd")])
        assert store.pending_callbacks(10) == [pending[1]]
        assert store.pending_callbacks(0) == [] and store.pending_callbacks(1) == [pending[1]]
        assert not store.record_callback("cmdA", "k1", "{}", T0 + 4)  # finished ones stay seen

    def test_a_batch_of_callbacks_is_stored_once_each_in_order(self, store):
        batch = [("cmdA", "k1", '{"n":1}', T0), ("cmdA", "k2", '{"n":2}', T0 + 1), ("cmdA", "k1", "{}", T0 + 2)]
        assert store.record_callbacks(batch) == 2  # a spool replayed twice adds nothing the second time
        assert store.record_callbacks(batch[:1]) == 0 and store.record_callbacks([]) == 0
        assert [(c.command, c.body, c.received_ms) for c in store.pending_callbacks(10)] == [
            ("cmdA", '{"n":1}', T0), ("cmdA", '{"n":2}', T0 + 1)]

    def test_pruning_forgets_old_processed_callbacks_only(self, store):
        for n in range(4):
            store.record_callback("cmdA", f"k{n}", f'{{"n":{n}}}', T0 + n * 10)
        first, second, third, fourth = store.pending_callbacks(10)
        store.finish_callbacks([(first.id, None), (second.id, "ValueError: odd"), (fourth.id, None)])
        assert store.prune_callbacks(T0 + 15, limit=1) == 1  # the oldest first, at most the limit
        assert store.prune_callbacks(T0 + 15, limit=10) == 1  # then the other one before T0 + 15
        assert store.prune_callbacks(T0 + 15, limit=10) == 0
        # never an unprocessed one, however old: the third is kept while the newer fourth goes
        assert store.prune_callbacks(T0 + 1_000, limit=10) == 1
        assert store.pending_callbacks(10) == [third]
        assert not store.record_callback("cmdA", "k2", "{}", T0 + 50)  # still waiting: still a duplicate
        # a forgotten callback's dedupe key went with it: the same event is stored again
        assert store.record_callback("cmdA", "k0", '{"n":0}', T0 + 60)
        assert [c.body for c in store.pending_callbacks(10)] == ['{"n":2}', '{"n":0}']

    def test_callbacks_update_sent_recipients(self, store):
        store.accept(new("m1", "u1", "u2"), None, retention_ms=0)
        a, b = self.lease(store)
        # one batch_send_msg: one clientMsgID for both users, a serverMsgID each
        store.complete([(a, Outcome.sent("s1", "c1", T0 + 1)), (b, Outcome.sent("s2", "c1", T0 + 1))], T0 + 1)
        assert (store.confirm_sent("s1", T0 + 2), store.confirm_sent("nope", T0 + 2)) == (1, 0)
        # a push callback names its user: only that recipient of the clientMsgID is marked
        assert (store.mark_pushed("c1", "user", ["u2"], T0 + 3), store.mark_pushed("nope", "user", ["u1"], T0 + 3),
                store.mark_pushed("c1", "group", ["u1"], T0 + 3), store.mark_pushed("c1", "user", [], T0 + 3)) \
            == (1, 0, 0, 0)
        assert store.record_saved_seq("s1", "si_u1_admin", 7) == 1
        assert store.record_saved_seq("s2", "si_u2_admin", 7) == 1
        assert store.record_saved_seq("nope", "si_x", 1) == 0
        assert store.mark_read("si_u1_admin", [7], "u2", T0 + 4) == 0  # not the reader's message
        assert store.mark_read("si_u1_admin", [6, 7, 7], "u1", T0 + 4) == 1
        assert store.mark_read("si_u1_admin", [7], "u1", T0 + 5) == 0
        assert statuses(store, "m1") == ["read", "sent"]
        [read] = [e for e in store.events_after(0, 100) if e.type == "message.read"]
        assert read.data == {"message_id": "m1", "type": "profile.updated", "client": "crm", "user_id": "u1"}

    def test_a_read_of_300000_seqs_is_one_read(self, store):
        store.accept(new("m1", "u1"), None, retention_ms=0)
        [item] = self.lease(store)
        store.complete([(item, Outcome.sent("s1", "c1", T0 + 1))], T0 + 1)
        store.record_saved_seq("s1", "si_admin_u1", 299_999)
        assert store.mark_read("si_admin_u1", list(range(300_000)), "u1", T0 + 2) == 1  # more than SQL variables
        assert statuses(store, "m1") == ["read"]

    def test_the_first_receipt_acknowledges_and_ends_the_work(self, store):
        store.accept(new("m1", "u1", "u2"), None, retention_ms=0)
        receipt = {"id": "m1", "ok": True, "at": 1_700_000_000_123, "note": "vu ✓"}
        assert store.acknowledge("m1", "u2", receipt, T0 + 1)
        assert not store.acknowledge("m1", "u2", {"id": "m1", "ok": False}, T0 + 2)
        assert not store.acknowledge("m1", "u9", receipt, T0 + 2)
        assert not store.acknowledge("nope", "u1", receipt, T0 + 2)
        record = store.get_message("m1")
        assert [(r.status, r.receipt) for r in record.recipients] == [("queued", None), ("acknowledged", receipt)]
        assert [i.target for i in self.lease(store, T0 + 3)] == ["u1"]
        [event] = [e for e in store.events_after(0, 100) if e.type == "receipt.received"]
        assert event.data == {"message_id": "m1", "type": "profile.updated", "client": "crm", "user_id": "u2",
                              "receipt": receipt}

    def test_a_malformed_stored_message_is_handed_out_with_what_is_wrong(self, store, corrupt):
        for mid in ("bad", "good", "gone"):
            store.accept(new(mid, "u1"), None, retention_ms=0)
        corrupt("bad", "delivery", "not json")
        corrupt("gone", None, None)  # the message itself is missing, its recipient is not
        items = {i.message_id: i for i in self.lease(store)}
        assert (items["bad"].defect, items["good"].defect) == ("its stored delivery settings are not a JSON object",
                                                               None)
        assert items["good"].delivery == {"persistent": True}
        # never sent: handed out to fail (SQLite), or failed by the store itself (Redis)
        assert "gone" not in items or items["gone"].defect == "its message row is missing"
        assert self.lease(store, T0 + 60_000) == []

    # -- retention ------------------------------------------------------------------------------------
    def deliver(self, store: Any, now: int, failed: tuple[str, ...] = ()) -> None:
        """Lease everything due and record each as sent (serverMsgID s-<target>), or failed."""
        results = [(item, Outcome.failed("e", "refused") if item.target in failed
                    else Outcome.sent(f"s-{item.target}", f"c-{item.target}", now)) for item in self.lease(store, now)]
        store.complete(results, now)

    def test_a_finished_message_goes_after_its_retention_with_everything_about_it(self, store):
        replay = ReplayKey("crm", "v" * 64, 42)
        store.accept(new("m1", "u1", "u2", key="k1"), replay, retention_ms=10 * DAY)
        self.deliver(store, T0 + 1)
        assert swept_all(store, T0 + 1) == Swept()  # finished at T0 + 1: nothing deleted yet
        store.record_saved_seq("s-u1", "si_admin_u1", 7)
        store.mark_read("si_admin_u1", [7], "u1", T0 + 2)
        store.acknowledge("m1", "u2", {"id": "m1", "ok": True}, T0 + 3)
        assert swept_all(store, T0 + 1 + DAY - 1) == Swept()
        assert statuses(store, "m1") == ["read", "acknowledged"]

        assert swept_all(store, T0 + 1 + DAY) == Swept(messages=1, recipients=2)
        assert store.get_message("m1") is None and store.replayed(replay) is None
        assert store.recent_messages(10) == [] and store.sent_counts("user", ["u1"], "profile.updated", 0) == {}
        assert (store.confirm_sent("s-u1", T0 + DAY), store.mark_pushed("c-u1", "user", ["u1"], T0 + DAY)) == (0, 0)
        assert store.mark_read("si_admin_u1", [7], "u1", T0 + DAY) == 0
        assert not store.acknowledge("m1", "u1", {"id": "m1"}, T0 + DAY)
        # its replay and idempotency keys went with it: the same request is a new message now
        again = store.accept(new("m2", "u1", key="k1", created=T0 + 2 * DAY), replay, retention_ms=10 * DAY)
        assert again.created and again.message_id == "m2"
        assert swept_all(store, T0 + 3 * DAY) == Swept()  # m2 still waits: never deleted

    def test_work_left_is_never_deleted(self, store):
        store.accept(new("queued", "u1"), None, retention_ms=0)
        store.accept(new("half", "u1", "u2"), None, retention_ms=0)
        store.accept(new("held", "u1", offline="hold"), None, retention_ms=0)
        store.accept(new("sending", "u1"), None, retention_ms=0)
        items = {i.message_id + i.target: i for i in self.lease(store, T0, lease_ms=100 * DAY)}
        store.release([items["queuedu1"]], T0)
        store.complete([(items["halfu1"], Outcome.sent("s", "c", T0)), (items["halfu2"], Outcome.retry("busy", T0 + 1)),
                        (items["heldu1"], Outcome.held("offline", T0 + 60_000))], T0)
        assert swept_all(store, T0 + 30 * DAY) == Swept()
        assert [statuses(store, mid) for mid in ("queued", "half", "held", "sending")] == [
            ["queued"], ["sent", "queued"], ["held"], ["sending"]]

    def test_dead_letters_stay_for_their_own_retention_and_a_replay_keeps_them(self, store):
        for mid in ("m1", "m2"):
            store.accept(new(mid, "u1", "u2"), None, retention_ms=0)
        self.deliver(store, T0 + 1, failed=("u2",))
        swept_all(store, T0 + 1)  # both finished (the same moment for every backend)
        assert swept_all(store, T0 + 2 + DAY) == Swept()  # a finished message's time: dead letters stay
        assert store.replay_dead_letters("m2", T0 + 2 + DAY) == 1  # m2 has work again
        assert swept_all(store, T0 + 2 + 3 * DAY) == Swept(messages=1, recipients=2)
        assert store.get_message("m1") is None and [d.message_id for d in store.dead_letters()] == []
        assert statuses(store, "m2") == ["sent", "queued"]

    def test_a_rate_limited_message_stays_one_period_longer_for_its_limit(self, store):
        store.accept(new("m1", "u1", delivery={"rate_limit": "3/day"}), None, retention_ms=0)
        self.deliver(store, T0 + 1)
        swept_all(store, T0 + 1)
        assert swept_all(store, T0 + 2 + DAY) == Swept()
        assert store.sent_counts("user", ["u1"], "profile.updated", T0) == {"u1": (1, T0 + 1)}
        assert swept_all(store, T0 + 2 + 2 * DAY) == Swept(messages=1, recipients=1)

    def test_a_large_message_is_deleted_in_short_steps_and_gone_from_the_first(self, store):
        store.accept(new("big", *(f"u{n}" for n in range(7))), None, retention_ms=0)
        self.deliver(store, T0 + 1)
        swept_all(store, T0 + 1)
        first = store.sweep(T0 + 2 + DAY, RETENTION, 3)
        assert (first.messages, first.recipients, first.more) == (1, 3, True)
        assert store.get_message("big") is None and store.recent_messages(10) == []
        rest = swept_all(store, T0 + 2 + DAY, budget=3)
        assert (rest.messages, rest.recipients) == (0, 4)

    def test_a_custom_fan_out_goes_with_its_batches(self, store):
        limited = {"persistent": True, "rate_limit": "10/hour"}
        store.accept(new("m1", "u1", "u2", "u3", mode="custom", delivery=limited), None, retention_ms=0)
        store.complete(answered(self.lease(store), T0 + 1), T0 + 1)
        assert store.sent_counts("user", ["u1", "u3"], "profile.updated", T0)  # the limit counts the batch
        swept_all(store, T0 + 1)
        assert swept_all(store, T0 + 1 + DAY + 3_600_000) == Swept(messages=1, recipients=3)
        assert store.get_message("m1") is None
        assert store.sent_counts("user", ["u1", "u2", "u3"], "profile.updated", T0) == {}

    def test_presence_not_reported_for_the_retention_is_forgotten(self, store):
        store.update_presence("u1", 1, True, 1, T0)
        store.update_presence("u2", 1, True, 1, T0)
        store.update_presence("u2", 2, False, 1, T0 + 3_600_000)  # a newer report on another platform
        assert swept_all(store, T0 + 3_600_000).presence == 0  # an hour old: still known
        assert swept_all(store, T0 + 3_600_001).presence == 1  # the user, with all their reports
        assert store.presence(["u1", "u2"]) == {"u2": PresenceState(True, T0 + 3_600_000)}
        assert store.presence_counts() == PresenceCounts(online=1, offline=0)
        assert store.update_presence("u1", 1, False, 1, T0 + 3_600_001)  # a first report again

    # -- custom-mode fan-outs (SQLite keeps their state per batch_send_msg call) -----------------
    def test_a_custom_fan_out_is_sent_and_refused_users_go_on_alone(self, store):
        limited = {"persistent": True, "rate_limit": "10/hour"}
        store.accept(new("m1", "u1", "u2", "u3", mode="custom", delivery=limited), None, retention_ms=0)
        items = self.lease(store)
        assert users_of(items) == ["u1", "u2", "u3"] and statuses(store, "m1") == ["sending"] * 3
        assert {(i.attempts, i.check_operation_id) for i in items} == {(1, None)}
        assert store.queue_depth()["normal"] == 3
        assert store.complete(answered(items, T0 + 1, refused=frozenset({"u2"})), T0 + 1) >= 2
        record = store.get_message("m1")
        assert [(r.target, r.status, r.server_msg_id, r.client_msg_id, r.sent_ms, r.attempts, r.last_error)
                for r in record.recipients] == [("u1", "sent", "s-u1", "c-u1", T0 + 1, 1, None),
                                                ("u2", "queued", None, None, None, 1, "refused"),
                                                ("u3", "sent", "s-u3", "c-u3", T0 + 1, 1, None)]
        [recent] = store.recent_messages(10)
        assert recent.status_counts == {"sent": 2, "queued": 1}
        assert [r.status for r in recent.message.recipients] == ["sent", "queued", "sent"]
        assert store.queue_depth()["normal"] == 1 and store.next_due_ms() == T0 + 1_001
        assert self.lease(store, T0 + 1_000) == []
        [again] = self.lease(store, T0 + 1_001)
        assert (again.target, again.attempts, again.members) == ("u2", 2, None)
        assert store.complete(answered([again], T0 + 1_002), T0 + 1_002) == 1
        assert statuses(store, "m1") == ["sent"] * 3
        assert store.sent_counts("user", ["u1", "u2", "u9"], "profile.updated", T0) == {
            "u1": (1, T0 + 1), "u2": (1, T0 + 1_002)}  # what a rate limit counts
        store.settle_batched("m1", ["u1"])  # counted once, with a row of its own now
        assert store.sent_counts("user", ["u1"], "profile.updated", T0) == {"u1": (1, T0 + 1)}
        sent = [(e.data["user_id"], e.data["server_msg_id"]) for e in store.events_after(0, 100)
                if e.type == "message.sent"]
        assert sorted(sent) == [("u1", "s-u1"), ("u2", "s-u2"), ("u3", "s-u3")]

    def test_a_custom_fan_out_retried_then_failed_is_a_dead_letter(self, store):
        store.accept(new("m1", "u1", "u2", mode="custom"), None, retention_ms=0)
        items = self.lease(store)
        store.complete([(i, Outcome.retry("OpenIM down", T0 + 500, "op-lost")) for i in items], T0 + 1)
        record = store.get_message("m1")
        assert [(r.status, r.attempts, r.last_error) for r in record.recipients] == [("queued", 1, "OpenIM down")] * 2
        items = self.lease(store, T0 + 500)
        assert users_of(items) == ["u1", "u2"]
        assert {(i.attempts, i.check_operation_id) for i in items} == {(2, "op-lost")}
        store.complete([(i, Outcome.failed("no permission", "refused")) for i in items], T0 + 501)
        record = store.get_message("m1")
        assert [(r.status, r.attempts, r.last_error, r.reason) for r in record.recipients] == [
            ("failed", 2, "no permission", "refused")] * 2
        [letter] = store.dead_letters()
        assert (letter.message_id, letter.failed) == ("m1", 2)
        assert sorted(e.data["user_id"] for e in store.events_after(0, 100) if e.type == "message.failed") == [
            "u1", "u2"]
        assert store.replay_dead_letters("m1", T0 + 600) == 2
        items = self.lease(store, T0 + 600)
        store.complete(answered(items, T0 + 601), T0 + 601)
        assert statuses(store, "m1") == ["sent", "sent"]

    def test_a_custom_fan_out_past_its_ttl_expires_user_by_user(self, store):
        store.accept(new("m1", "u1", "u2", mode="custom", ttl=1), None, retention_ms=0)
        assert self.lease(store, T0 + 1_000) == []
        record = store.get_message("m1")
        assert [(r.status, r.reason) for r in record.recipients] == [("expired", "ttl passed before delivery")] * 2
        assert sorted(e.data["user_id"] for e in store.events_after(0, 100) if e.type == "message.expired") == [
            "u1", "u2"]
        assert store.next_due_ms() is None and store.queue_depth()["normal"] == 0

    def test_a_custom_fan_out_whose_worker_died_is_taken_over(self, store):
        store.accept(new("m1", "u1", "u2", mode="custom"), None, retention_ms=0)
        lost = self.lease(store, lease_ms=1_000, owner="dead")
        taken = self.lease(store, T0 + 1_000, owner="alive")
        assert users_of(taken) == ["u1", "u2"]
        assert {(i.attempts, i.lease_owner) for i in taken} == {(2, "alive")}
        assert {i.check_operation_id for i in taken} <= {i.operation_id for i in lost}
        assert store.complete(answered(lost, T0 + 1_001), T0 + 1_001) == 0
        assert store.renew(lost, T0 + 1_001, 1_000) == [] and store.release(lost, T0 + 1_001) == 0
        assert store.renew(taken, T0 + 1_001, 1_000) == taken
        assert store.complete(answered(taken, T0 + 1_002), T0 + 1_002) >= 1
        assert [r.server_msg_id for r in store.get_message("m1").recipients] == ["s-u1", "s-u2"]

    def test_a_released_custom_fan_out_is_due_at_once_with_no_attempt_used(self, store):
        store.accept(new("m1", "u1", "u2", mode="custom"), None, retention_ms=0)
        assert store.release(self.lease(store), T0 + 5) == 2
        assert statuses(store, "m1") == ["queued", "queued"] and store.next_due_ms() == T0 + 5
        assert {i.attempts for i in self.lease(store, T0 + 5)} == {1}

    def test_callbacks_and_receipts_reach_the_users_of_a_custom_fan_out(self, store):
        store.accept(new("m1", "u1", "u2", "u3", mode="custom"), None, retention_ms=0)
        store.complete(answered(self.lease(store), T0 + 1), T0 + 1)
        for user in ("u1", "u3"):
            store.settle_batched("m1", [user])
        assert store.confirm_sent("s-u1", T0 + 2) == 1
        assert store.mark_pushed("c-u1", "user", ["u1"], T0 + 2) == 1
        assert store.record_saved_seq("s-u3", "si_admin_u3", 9) == 1
        assert store.mark_read("si_admin_u3", [9], "u3", T0 + 3) == 1
        receipt = {"id": "m1", "ok": True}
        assert store.acknowledge("m1", "u2", receipt, T0 + 4)
        record = store.get_message("m1")
        assert [(r.target, r.status, r.server_msg_id, r.receipt) for r in record.recipients] == [
            ("u1", "sent", "s-u1", None), ("u2", "acknowledged", "s-u2", receipt), ("u3", "read", "s-u3", None)]

    # -- shared credentials -----------------------------------------------------------------
    def test_tokens_and_locks_are_shared(self, new_store):
        one, two = new_store(frozenset()), new_store(frozenset())
        assert one.load_token("admin") is None
        one.save_token("admin", "tok-1", T0 + 60_000)
        assert two.load_token("admin") == ("tok-1", T0 + 60_000)
        one.save_token("admin", "tok-2", T0 + 120_000)
        assert two.load_token("admin") == ("tok-2", T0 + 120_000)
        assert one.try_lock("refresh", "a", 60_000)
        assert not two.try_lock("refresh", "b", 60_000)
        assert one.try_lock("refresh", "a", 60_000)  # the holder renews it
        two.unlock("refresh", "b")  # not the holder: no effect
        assert not two.try_lock("refresh", "b", 60_000)
        one.unlock("refresh", "a")
        assert two.try_lock("refresh", "b", 60_000)
        assert one.try_lock("other", "a", 60_000)
        one.ping()

    # -- the operator page's sessions and sign-in throttle -------------------------------------
    def test_sessions_are_shared_and_a_sign_out_ends_them_everywhere(self, new_store):
        one, two = new_store(frozenset()), new_store(frozenset())
        assert not two.touch_session("s1", T0, T0 + 1_000)  # never opened
        one.open_session("s1", T0, T0 + 60_000)
        one.open_session("s2", T0, T0 + 60_000)
        assert two.touch_session("s1", T0 + 59_999, T0 + 120_000)  # in use: it lasts longer
        assert one.touch_session("s1", T0 + 100_000, T0 + 160_000)
        assert not one.touch_session("s2", T0 + 60_000, T0 + 120_000)  # unused until it ended
        one.open_session("s3", T0 + 100_000, T0 + 160_000)  # also forgets s2
        two.close_session("s1")
        assert not one.touch_session("s1", T0 + 100_001, T0 + 200_000)
        assert one.touch_session("s3", T0 + 100_001, T0 + 200_000)
        two.close_session("s1")  # again: nothing to end, no error

    def test_failures_are_counted_per_name_in_shared_windows(self, new_store):
        one, two = new_store(frozenset()), new_store(frozenset())
        assert one.failures("a", T0) == (0, T0)
        assert one.count_failure("a", T0, 60_000) == 1
        assert two.count_failure("a", T0 + 30_000, 60_000) == 2  # the window began at the first
        assert one.count_failure("b", T0 + 30_000, 60_000) == 1
        assert two.failures("a", T0 + 59_999) == (2, T0 + 60_000)
        assert one.failures("a", T0 + 60_000) == (0, T0 + 60_000)  # over
        assert one.count_failure("a", T0 + 60_000, 60_000) == 1  # a new window
        assert two.failures("a", T0 + 60_001) == (1, T0 + 120_000)
        assert one.failures("b", T0 + 60_001) == (1, T0 + 90_000)

    def test_failures_counted_at_once_by_several_replicas_are_all_counted(self, new_store):
        stores = [new_store(frozenset()) for _ in range(2)]
        counted: list[int] = []

        def count(store: Any) -> None:
            counted.extend(store.count_failure("all", T0, 60_000) for _ in range(25))

        threads = [threading.Thread(target=count, args=(stores[i % 2],)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(counted) == list(range(1, 101)) and stores[0].failures("all", T0) == (100, T0 + 60_000)

    # -- replicas --------------------------------------------------------------------
    def test_replicas_leasing_concurrently_take_each_recipient_once(self, new_store):
        stores = [new_store(frozenset()), new_store(frozenset())]
        for n in range(5):
            stores[0].accept(new(f"m{n}", *(f"u{n}-{i}" for i in range(1_000))), None, retention_ms=0)
        taken: list[Any] = []
        errors: list[Exception] = []

        def worker(store: Any, owner: str) -> None:
            try:
                for _ in range(1_000):  # bounded: 5,000 recipients in batches of 50 need far fewer rounds
                    items = store.lease(T0, 50, 600_000, owner, OpIds(owner))
                    if not items:
                        return
                    taken.extend(items)
                    store.complete([(i, Outcome.sent(f"s-{i.operation_id}", None, T0)) for i in items], T0)
            except Exception as exc:  # collected: the assertion shows it
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(stores[n % 2], f"r{n % 2}-t{n}")) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert errors == []
        counts = Counter((i.message_id, i.seq) for i in taken)
        assert len(counts) == 5_000 and set(counts.values()) == {1}
        assert all(set(statuses(stores[1], f"m{n}")) == {"sent"} for n in range(5))

    def test_a_replica_killed_mid_work_loses_nothing(self, new_store, replica_code):
        store = new_store(frozenset())
        store.accept(new("m1", *(f"u{i}" for i in range(100))), None, retention_ms=0)
        code = replica_code + (
            "\nitems = store.lease(%d, 100, 10_000, 'doomed', lambda hint: 'doomed-' + hint)"
            "\nprint(len(items), flush=True)\nsys.stdin.read()\n" % T0)
        child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        try:
            assert child.stdout.readline().strip() == "100"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL
        assert self.lease(store, T0 + 9_999, owner="survivor") == []  # its leases still run
        items = self.lease(store, T0 + 10_000, owner="survivor")
        assert len(items) == 100 and all(i.check_operation_id.startswith("doomed-m1-") for i in items)
        assert store.complete([(i, Outcome.sent("s", None, T0 + 10_001)) for i in items], T0 + 10_001) == 100
        assert set(statuses(store, "m1")) == {"sent"}
