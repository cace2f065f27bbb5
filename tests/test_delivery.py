"""Delivery through the fake OpenIM over real HTTP, with the engine stepped by hand.

The sidecar runs in this process with an injected clock: backoff, leases and
TTLs advance by setting the clock, never by sleeping. OpenIM is the loopback
:class:`FakeOpenIM`, which speaks OpenIM's wire format.
"""

from __future__ import annotations

import json
import threading
import time
from unittest.mock import Mock

import pytest

from conftest import Signed, message, write_config
from openim_bizplugin.web.app import create_app
from openim_bizplugin.config import load_config
from openim_bizplugin.delivery.engine import backoff_seconds
from openim_bizplugin.errors import StorageUnavailable
from openim_bizplugin.testing import FakeOpenIM

USERS = ("u1", "u2", "u3", "imAdmin")
APPS = USERS[:3]  # online (persistent notifications to offline apps are held: test_offline_policy)


@pytest.fixture
def fake():
    with FakeOpenIM(users=USERS, groups={"g1": ["u1", "u2"]}, online=APPS) as im:
        yield im


class Sidecar:
    """An app wired to the fake, a signed test client and a hand-stepped engine."""

    def __init__(self, tmp_path, fake, clock, **delivery) -> None:
        settings = {"workers": 1, "max_attempts": 5, "backoff_base_seconds": 1.0, "backoff_max_seconds": 30.0,
                    "lease_seconds": 10.0, **delivery}
        openim = {"api_url": fake.url, "timeout_seconds": 0.5}
        openim.update(settings.pop("openim", {}))
        tables = {"openim": openim, "delivery": settings}
        if "schemas_dir" in settings:
            tables["schemas"] = {"dir": str(settings.pop("schemas_dir"))}
        config = load_config(write_config(tmp_path, tables))
        self.app = create_app(config, clock=clock)
        self.services = self.app.extensions["bizplugin"]
        self.engine, self.store, self.clock = self.services.engine, self.services.store, clock
        self.api = Signed(self.app.test_client(), clock)

    def send(self, as_client: str = "ops", **overrides) -> str:
        response = self.api.post(message(**overrides), as_client=as_client)
        assert response.status_code == 202, response.get_data(as_text=True)
        return response.get_json()["id"]

    def drain(self, rounds: int = 100) -> None:
        """Step until nothing is due, moving the clock to each retry time."""
        for _ in range(rounds):
            if self.engine.step():
                continue
            due = self.store.next_due_ms()
            if due is None:
                return
            self.clock.now = max(self.clock.now, due / 1000)
        raise AssertionError("delivery did not settle")

    def recipients(self, message_id: str) -> list[dict]:
        return self.api.get(f"/v1/messages/{message_id}", as_client="ops").get_json()["recipients"]


@pytest.fixture
def sidecar(tmp_path, fake, clock):
    side = Sidecar(tmp_path, fake, clock)
    yield side
    side.services.close()


def _envelope_id(delivery) -> str:
    text = delivery.data if delivery.content_type == 2001 else delivery.content["data"]
    return json.loads(text)["id"]


def test_notification_to_users_carries_the_envelope(sidecar, fake):
    mid = sidecar.send(to={"users": ["u1", "u2"]})
    sidecar.drain()
    calls = fake.calls_to("/msg/send_business_notification")
    assert len(calls) == 2
    body = calls[0].body
    assert body["key"] == "profile.updated" and body["sendUserID"] == "imAdmin"
    assert body["reliabilityLevel"] == 2  # profile.updated is persistent
    envelope = json.loads(body["data"])
    assert envelope["id"] == mid and envelope["from"] == "ops" and envelope["data"] == {"fields": ["nickname"]}
    recipients = sidecar.recipients(mid)
    assert {r["status"] for r in recipients} == {"sent"}
    assert all(r["server_msg_id"] and r["client_msg_id"] and r["sent_at"] for r in recipients)
    assert len({c.operation_id for c in calls}) == 2  # one operationID per attempt


def test_notification_to_group_on_main_is_one_call(sidecar, fake):
    mid = sidecar.send(to={"groups": ["g1"]})
    sidecar.drain()
    [call] = fake.calls_to("/msg/send_business_notification")
    assert call.body["recvGroupID"] == "g1" and "recvUserID" not in call.body
    [recipient] = sidecar.recipients(mid)
    assert (recipient["group_id"], recipient["status"]) == ("g1", "sent")


def test_notification_to_group_on_v383_goes_to_each_member(tmp_path, clock):
    with FakeOpenIM(users=USERS, groups={"g1": ["u1", "u2"]}, flavor="v3.8.3") as old:
        side = Sidecar(tmp_path, old, clock)
        mid = side.send(to={"groups": ["g1"]})
        side.drain()
        assert sorted(d.recv_id for d in old.delivered) == ["u1", "u2"]
        [recipient] = side.recipients(mid)
        assert recipient["status"] == "sent" and "2 members" in recipient["reason"]
        side.services.close()


def test_custom_mode_batches_users_with_string_content(sidecar, fake):
    mid = sidecar.send(mode="custom", to={"users": ["u1", "u2", "u3"]})
    sidecar.drain()
    [call] = fake.calls_to("/msg/batch_send_msg")
    assert call.body["contentType"] == 110 and sorted(call.body["recvIDs"]) == ["u1", "u2", "u3"]
    assert all(isinstance(v, str) for v in call.body["content"].values())
    assert call.body["content"]["description"] == "profile.updated"
    assert call.body["offlinePushInfo"]["title"] == "Profile updated"
    assert sorted(_envelope_id(d) for d in fake.delivered) == [mid] * 3
    assert {r["status"] for r in sidecar.recipients(mid)} == {"sent"}


def test_custom_mode_group_is_send_msg_to_the_group(sidecar, fake):
    mid = sidecar.send(mode="custom", to={"groups": ["g1"]})
    sidecar.drain()
    [call] = fake.calls_to("/msg/send_msg")
    assert call.body["sessionType"] == 3 and call.body["groupID"] == "g1"
    assert sidecar.recipients(mid)[0]["status"] == "sent"


def test_token_expiry_mid_run_refreshes_once(sidecar, fake):
    sidecar.send(to={"users": ["u1"]})
    sidecar.drain()
    fake.expire_tokens()
    second = sidecar.send(to={"users": ["u2", "u3"]})
    sidecar.drain()
    assert len(fake.calls_to("/auth/get_admin_token")) == 2
    assert {r["status"] for r in sidecar.recipients(second)} == {"sent"}


def test_openim_down_then_back_delivers_everything_once(sidecar, fake):
    fake.refuse_connections()
    ids = [sidecar.send(to={"users": ["u1", "u2"]}, idempotency_key=f"k{i}") for i in range(3)]
    sidecar.engine.step()
    waiting = sidecar.recipients(ids[0])[0]
    assert waiting["status"] == "queued" and waiting["attempts"] == 1 and waiting["last_error"]
    fake.accept_connections()
    sidecar.drain()
    assert sorted(_envelope_id(d) for d in fake.delivered) == sorted(ids * 2)


def test_permanent_error_fails_at_once_and_replays_from_dead_letters(sidecar, fake):
    mid = sidecar.send(mode="custom", to={"users": ["ghost"]})
    sidecar.drain()
    [recipient] = sidecar.recipients(mid)
    assert recipient["status"] == "failed" and recipient["attempts"] == 1 and "1004" in recipient["last_error"]
    assert len(fake.calls_to("/msg/send_msg")) == 1
    assert [d.message_id for d in sidecar.store.dead_letters()] == [mid]
    fake.add_users("ghost")
    assert sidecar.store.replay_dead_letters(mid, int(sidecar.clock() * 1000)) == 1
    sidecar.drain()
    assert sidecar.recipients(mid)[0]["status"] == "sent" and sidecar.store.dead_letters() == []


def test_retryable_errors_give_up_after_max_attempts(sidecar, fake):
    fake.fail_next("/msg/send_business_notification", times=50, err_code=500, err_dlt="grpc service msg down")
    mid = sidecar.send(to={"users": ["u1"]})
    sidecar.drain()
    [recipient] = sidecar.recipients(mid)
    assert recipient["status"] == "failed" and recipient["attempts"] == 5
    assert "gave up after 5 attempts" in recipient["reason"]


def test_timeout_after_openim_accepted_is_not_sent_twice(sidecar, fake):
    fake.delay_next("/msg/send_msg", 1.5, after_processing=True)
    mid = sidecar.send(mode="custom", to={"users": ["u1"]})
    sidecar.engine.step()
    assert sidecar.recipients(mid)[0]["status"] == "queued"
    sidecar.drain()
    assert len(fake.deliveries_to(user="u1")) == 1
    [check] = fake.calls_to("/msg/check_msg_is_send_success")
    assert check.operation_id == fake.calls_to("/msg/send_msg")[0].operation_id
    assert sidecar.recipients(mid)[0]["status"] == "sent"


def test_lease_of_a_vanished_worker_runs_out_and_work_is_retried(sidecar, fake):
    mid = sidecar.send(mode="custom", to={"users": ["u1"]})
    now_ms = int(sidecar.clock() * 1000)
    [taken] = sidecar.store.lease(now_ms, 10, 10_000, "dead-worker", lambda hint: f"op-{hint}")
    assert sidecar.engine.step() == 0  # still leased
    sidecar.clock.advance(11)
    sidecar.drain()
    assert [c.operation_id for c in fake.calls_to("/msg/check_msg_is_send_success")] == [taken.operation_id]
    assert len(fake.deliveries_to(user="u1")) == 1 and sidecar.recipients(mid)[0]["status"] == "sent"


def test_ttl_passed_before_delivery_expires_instead_of_sending_late(sidecar, fake):
    fake.refuse_connections()
    mid = sidecar.send(to={"users": ["u1"]}, ttl_seconds=5)
    sidecar.engine.step()
    fake.accept_connections()
    sidecar.clock.advance(6)
    sidecar.drain()
    [recipient] = sidecar.recipients(mid)
    assert recipient["status"] == "expired" and "ttl" in recipient["reason"]
    assert fake.delivered == []


def test_check_recipients_fails_unknown_users_without_sending(tmp_path, fake, clock):
    side = Sidecar(tmp_path, fake, clock, openim={"check_recipients": True})
    mid = side.send(to={"users": ["u1", "nobody"]})  # checked before holding: "nobody" never comes online
    side.drain()
    by_user = {r["user_id"]: r for r in side.recipients(mid)}
    assert by_user["u1"]["status"] == "sent" and by_user["nobody"]["status"] == "failed"
    assert [d.recv_id for d in fake.delivered] == ["u1"]
    side.services.close()


def test_high_priority_is_leased_before_queued_normal_work(sidecar):
    sidecar.send(to={"users": ["u1"]}, idempotency_key="normal")
    sidecar.send(to={"users": ["u2"]}, priority="high", idempotency_key="high")
    [first] = sidecar.store.lease(int(sidecar.clock() * 1000), 1, 1000, "w", lambda hint: hint)
    assert first.target == "u2" and first.priority == "high"


def test_backoff_is_full_jitter_and_capped():
    assert backoff_seconds(1, 1.0, 30.0, rand=lambda: 0.999) == pytest.approx(0.999)
    assert backoff_seconds(4, 1.0, 30.0, rand=lambda: 0.5) == pytest.approx(4.0)
    assert backoff_seconds(20, 1.0, 30.0, rand=lambda: 1.0) == 30.0
    assert backoff_seconds(3, 1.0, 30.0, rand=lambda: 0.0) == 0.0


def test_newer_message_with_same_collapse_key_replaces_the_queued_one(sidecar, fake):
    older = sidecar.send(to={"users": ["u1", "u2"]}, collapse_key="profile:u1")
    newer = sidecar.send(to={"users": ["u1"]}, collapse_key="profile:u1", data={"fields": ["faceURL"]})
    other_client = sidecar.send(as_client="crm", to={"users": ["u1"]}, collapse_key="profile:u1")
    by_user = {r["user_id"]: r for r in sidecar.recipients(older)}
    assert by_user["u1"]["status"] == "skipped" and newer in by_user["u1"]["reason"]
    assert by_user["u2"]["status"] == "queued"  # not a recipient of the newer message
    sidecar.drain()
    assert sorted(_envelope_id(d) for d in fake.deliveries_to(user="u1")) == sorted([newer, other_client])


def test_long_waiting_low_work_ages_ahead_of_fresh_normal_work(sidecar):
    low = sidecar.send(to={"users": ["u1"]}, priority="low", idempotency_key="low")
    sidecar.clock.advance(301)  # past priority_aging_seconds (300 s by default): low counts as normal
    sidecar.send(to={"users": ["u2"]}, priority="normal", idempotency_key="fresh")
    [first] = sidecar.store.lease(int(sidecar.clock() * 1000), 1, 1000, "w", lambda hint: hint)
    assert first.message_id == low  # equal rank now, and it has waited longer
    sidecar.clock.advance(601)  # due for twice the aging period: the normal one counts as high
    sidecar.send(to={"users": ["u3"]}, priority="high", idempotency_key="new-high")
    [second] = sidecar.store.lease(int(sidecar.clock() * 1000), 1, 1000, "w", lambda hint: hint)
    assert second.target == "u2"


def test_a_custom_fan_out_sends_the_known_users_and_fails_only_the_unknown(sidecar, fake):
    mid = sidecar.send(mode="custom", to={"users": ["u1", "ghost", "u2"]})
    sidecar.drain()
    [call] = fake.calls_to("/msg/batch_send_msg")
    assert call.body["recvIDs"] == ["u1", "ghost", "u2"]
    recipients = {r["user_id"]: r for r in sidecar.recipients(mid)}
    assert {user: r["status"] for user, r in recipients.items()} == {"u1": "sent", "ghost": "failed", "u2": "sent"}
    assert [d.server_msg_id for d in fake.deliveries_to(user="u2")] == [recipients["u2"]["server_msg_id"]]
    # failedUserIDs gives no reason: sent alone, OpenIM says why
    assert [c.body["recvID"] for c in fake.calls_to("/msg/send_msg")] == ["ghost"]
    assert "1004" in recipients["ghost"]["last_error"] and recipients["ghost"]["attempts"] == 1
    assert [d.message_id for d in sidecar.store.dead_letters()] == [mid]
    assert len(fake.deliveries_to(user="u1")) == 1


def test_a_user_who_blocks_messages_fails_at_once_inside_a_batch(sidecar, fake):
    fake.block_messages("u2")  # global receive option 1: OpenIM main answers 1001 "message is not sent"
    mid = sidecar.send(mode="custom", to={"users": ["u1", "u2", "u3"]})
    sidecar.drain()
    recipients = {r["user_id"]: r for r in sidecar.recipients(mid)}
    assert {user: r["status"] for user, r in recipients.items()} == {"u1": "sent", "u2": "failed", "u3": "sent"}
    assert recipients["u2"]["attempts"] == 1 and "message is not sent" in recipients["u2"]["last_error"]
    assert len(fake.calls_to("/msg/batch_send_msg")) == 1 and len(fake.calls_to("/msg/send_msg")) == 1


def test_a_passing_fault_on_the_single_send_ends_them_and_the_refused_users_retry(sidecar, fake):
    for user in ("u2", "u3"):
        fake.block_messages(user)
    fake.fail_next("/msg/send_msg", err_code=90004)  # a passing fault: no reason learnt, and no more waits
    mid = sidecar.send(mode="custom", to={"users": ["u1", "u2", "u3"]})
    sidecar.engine.step()
    assert [r["status"] for r in sidecar.recipients(mid)] == ["sent", "queued", "queued"]
    assert len(fake.calls_to("/msg/send_msg")) == 1
    for user in ("u2", "u3"):
        fake.block_messages(user, False)
    sidecar.drain()
    assert [r["status"] for r in sidecar.recipients(mid)] == ["sent", "sent", "sent"]
    assert sorted(d.recv_id for d in fake.delivered) == ["u1", "u2", "u3"]


def test_a_custom_fan_out_larger_than_batch_size_goes_in_several_calls(tmp_path, fake, clock):
    side = Sidecar(tmp_path, fake, clock, batch_size=2)
    try:
        fake.fail_next("/msg/batch_send_msg", times=1, err_code=500, err_dlt="grpc service msg down")
        mid = side.send(mode="custom", to={"users": ["u1", "u2", "u3"]})
        side.drain()
        calls = [c.body["recvIDs"] for c in fake.calls_to("/msg/batch_send_msg")]
        assert calls[0] == ["u1", "u2"] and sorted(calls[1:]) == [["u1", "u2"], ["u3"]]  # the first one retried
        assert [(r["status"], r["attempts"]) for r in side.recipients(mid)] == [("sent", 2), ("sent", 2), ("sent", 1)]
        assert sorted(_envelope_id(d) for d in fake.delivered) == [mid] * 3
    finally:
        side.services.close()


def _hold_commits(monkeypatch, store):
    """Make store.complete wait for the returned gate; *entered* is set once one is waiting."""
    gate, entered = threading.Event(), threading.Event()
    complete = store.complete

    def held(results, now_ms):
        entered.set()
        assert gate.wait(10)
        return complete(results, now_ms)

    monkeypatch.setattr(store, "complete", held)
    return gate, entered


def test_the_next_call_goes_out_while_the_last_one_is_being_recorded(tmp_path, fake, clock, monkeypatch):
    side = Sidecar(tmp_path, fake, clock)
    side.engine.recorder.start()
    try:
        mid = side.send(to={"users": ["u1", "u2"]})  # notification mode: one call per user, one round
        gate, entered = _hold_commits(monkeypatch, side.store)
        worker = threading.Thread(target=side.engine.step)
        worker.start()
        assert entered.wait(10)
        for _ in range(200):  # bounded: the second call needs no commit of the first
            if len(fake.calls_to("/msg/send_business_notification")) == 2:
                break
            time.sleep(0.01)
        assert len(fake.calls_to("/msg/send_business_notification")) == 2
        assert [r["status"] for r in side.recipients(mid)] == ["sending", "sending"]  # nothing committed yet
        gate.set()
        worker.join(10)
        assert not worker.is_alive()
        assert [r["status"] for r in side.recipients(mid)] == ["sent", "sent"]  # the round ends recorded
    finally:
        side.services.close()


def test_outcomes_that_cannot_be_recorded_fail_the_round_and_are_sent_again(tmp_path, fake, clock, monkeypatch):
    side = Sidecar(tmp_path, fake, clock)
    side.engine.recorder.start()
    try:
        mid = side.send(mode="custom", to={"users": ["u1", "u2"]})
        complete = side.store.complete
        monkeypatch.setattr(side.store, "complete", Mock(side_effect=StorageUnavailable("disk full")))
        with pytest.raises(StorageUnavailable):
            side.engine.step()
        monkeypatch.setattr(side.store, "complete", complete)
        assert [r["status"] for r in side.recipients(mid)] == ["sending", "sending"]  # leased, not lost
        clock.advance(11)  # past lease_seconds
        side.drain()
        assert [r["status"] for r in side.recipients(mid)] == ["sent", "sent"]
        assert len(fake.calls_to("/msg/batch_send_msg")) == 2  # the unrecorded call was repeated
    finally:
        side.services.close()
