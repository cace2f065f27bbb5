"""Offline policies: hold until online (or TTL), drop offline users, reconcile stale presence."""

from __future__ import annotations

import pytest

from test_delivery import Sidecar, USERS
from openim_bizplugin.testing import FakeOpenIM


@pytest.fixture
def fake():
    with FakeOpenIM(users=USERS, online=["u2", "u3"]) as im:  # u1's app is offline
        yield im


@pytest.fixture
def sidecar(tmp_path, fake, clock):
    side = Sidecar(tmp_path, fake, clock, hold_recheck_seconds=60, presence_max_age_seconds=300)
    yield side
    side.services.close()


def _status(sidecar, mid) -> dict[str, dict]:
    return {r["user_id"]: r for r in sidecar.recipients(mid)}


def _now_ms(sidecar) -> int:
    return int(sidecar.clock() * 1000)


def test_hold_keeps_offline_users_and_sends_to_online_ones(sidecar, fake):
    mid = sidecar.send(to={"users": ["u1", "u2"]}, offline="hold")
    sidecar.engine.step()
    status = _status(sidecar, mid)
    assert status["u1"]["status"] == "held" and status["u2"]["status"] == "sent"
    assert [d.recv_id for d in fake.delivered] == ["u2"]
    assert status["u1"]["attempts"] == 1


def test_held_recipient_goes_out_first_when_the_user_comes_online(sidecar, fake):
    held = sidecar.send(to={"users": ["u1"]}, offline="hold")
    sidecar.engine.step()
    backlog = sidecar.send(to={"users": ["u2", "u3"]}, priority="low")
    fake.connect("u1")
    sidecar.store.update_presence("u1", 1, True, _now_ms(sidecar), _now_ms(sidecar))  # its online callback
    [first] = sidecar.store.lease(_now_ms(sidecar), 1, 1000, "peek", lambda hint: hint)
    assert (first.message_id, first.target) == (held, "u1")
    sidecar.clock.advance(2)  # the peek's lease runs out
    sidecar.drain()
    assert _status(sidecar, held)["u1"]["status"] == "sent"
    assert {r["status"] for r in sidecar.recipients(backlog)} == {"sent"}


def test_held_until_ttl_expires_and_is_never_sent_late(sidecar, fake):
    mid = sidecar.send(to={"users": ["u1"]}, offline="hold", ttl_seconds=150)
    sidecar.drain()
    [recipient] = sidecar.recipients(mid)
    assert recipient["status"] == "expired" and "offline" in recipient["reason"]
    assert fake.delivered == []
    # before giving up, OpenIM's live view was asked again (a lost online callback must not cost the message)
    assert len(fake.calls_to("/user/get_users_online_status")) >= 2


def test_lost_online_callback_is_caught_by_the_periodic_recheck(sidecar, fake):
    mid = sidecar.send(to={"users": ["u1"]}, offline="hold")
    sidecar.engine.step()
    fake.set_online("u1", [2])  # online, but OpenIM's callback never reached us
    sidecar.clock.advance(61)
    sidecar.drain()
    assert _status(sidecar, mid)["u1"]["status"] == "sent"


def test_drop_skips_users_offline_at_send_time(sidecar, fake):
    mid = sidecar.send(to={"users": ["u1", "u2"]}, offline="drop")
    sidecar.drain()
    status = _status(sidecar, mid)
    assert status["u1"]["status"] == "skipped" and "offline" in status["u1"]["reason"]
    assert status["u2"]["status"] == "sent"


def test_fresh_presence_callbacks_decide_without_asking_openim(sidecar, fake):
    sidecar.store.update_presence("u1", 1, True, _now_ms(sidecar), _now_ms(sidecar))
    # a chat message: stored for the app (a business notification would be checked, test_app_receives)
    mid = sidecar.send(to={"users": ["u1"]}, offline="drop", mode="custom")
    sidecar.drain()
    assert _status(sidecar, mid)["u1"]["status"] == "sent"
    assert fake.calls_to("/user/get_users_online_status") == []


def test_stale_presence_is_reconciled_with_openim_before_dropping(sidecar, fake):
    old = _now_ms(sidecar) - 3_600_000
    sidecar.store.update_presence("u2", 1, False, old, old)  # an hour-old "offline"
    mid = sidecar.send(to={"users": ["u2"]}, offline="drop")
    sidecar.drain()
    assert _status(sidecar, mid)["u2"]["status"] == "sent"
    assert len(fake.calls_to("/user/get_users_online_status")) == 1


def test_store_policy_ignores_presence_for_chat_messages_and_groups(sidecar, fake):
    fake.add_group("g1", ["u1", "u2"])
    chat = sidecar.send(to={"users": ["u1"]}, offline="store", mode="custom")  # kept in the conversation
    group = sidecar.send(to={"groups": ["g1"]}, offline="store")  # one call with recvGroupID (OpenIM main)
    sidecar.drain()
    assert _status(sidecar, chat)["u1"]["status"] == "sent"
    assert sidecar.recipients(group)[0]["status"] == "sent"
    assert fake.calls_to("/user/get_users_online_status") == []


def test_store_policy_holds_a_persistent_notification_for_an_offline_user_on_main(sidecar, fake):
    mid = sidecar.send(to={"users": ["u1", "u2"]}, offline="store")  # profile.updated: persistent
    sidecar.engine.step()
    status = _status(sidecar, mid)
    assert status["u1"]["status"] == "held" and "a chat with the sender" in status["u1"]["reason"]
    assert status["u2"]["status"] == "sent"
    assert [c.body["reliabilityLevel"] for c in fake.calls_to("/msg/send_business_notification")] == [2]
