"""Per-type, per-recipient rate limits: delay until the window allows, or drop."""

from __future__ import annotations

import re
import shutil

import pytest

from conftest import REPO
from test_delivery import APPS, USERS, Sidecar
from openim_bizplugin.catalog.registry import Catalog
from openim_bizplugin.store.base import Outcome
from openim_bizplugin.testing import FakeOpenIM


@pytest.fixture
def fake():
    with FakeOpenIM(users=USERS, online=APPS) as im:
        yield im


def _sidecar(tmp_path, fake, clock, policy: str) -> Sidecar:
    catalog = tmp_path / "schemas"
    shutil.copytree(REPO / "schemas", catalog)
    toml = catalog / "profile.updated" / "type.toml"
    text = toml.read_text().replace('rate_limit = "10/hour"', 'rate_limit = "2/hour"')
    toml.write_text(text.replace('rate_limit_policy = "delay"', f'rate_limit_policy = "{policy}"'))
    return Sidecar(tmp_path, fake, clock, schemas_dir=catalog)


def _statuses(side, ids) -> list[str]:
    return [side.recipients(mid)[0]["status"] for mid in ids]


def test_delay_policy_sends_when_the_window_allows_within_the_ttl(tmp_path, fake, clock):
    side = _sidecar(tmp_path, fake, clock, "delay")
    ids = [side.send(to={"users": ["u1"]}, idempotency_key=f"k{i}") for i in range(3)]
    side.engine.step()
    assert _statuses(side, ids) == ["sent", "sent", "queued"]
    third = side.recipients(ids[2])[0]
    assert "rate limit 2/hour" in third["reason"] and third["attempts"] == 0
    side.drain()  # moves the clock to the window's end
    assert _statuses(side, ids) == ["sent", "sent", "sent"]
    sent_at = [side.recipients(mid)[0]["sent_at"] for mid in ids]
    assert sent_at[2] > sent_at[0]
    assert len(fake.deliveries_to(user="u1")) == 3
    side.services.close()


def test_sends_while_few_messages_of_the_type_exist_count_against_later_ones(tmp_path, fake, clock):
    side = _sidecar(tmp_path, fake, clock, "delay")
    first = [side.send(to={"users": ["u1"]}, idempotency_key=f"k{i}") for i in range(2)]
    side.engine.step()  # two messages of the type, 2 per hour: no one can be over, nothing is counted
    assert _statuses(side, first) == ["sent", "sent"]
    third = side.send(to={"users": ["u1"]}, idempotency_key="k2")
    side.engine.step()  # a third: now u1's sends are counted, and the window is full
    assert _statuses(side, [third]) == ["queued"] and "rate limit 2/hour" in side.recipients(third)[0]["reason"]
    assert len(fake.deliveries_to(user="u1")) == 2
    side.services.close()


def test_delay_past_the_ttl_expires_instead_of_sending_late(tmp_path, fake, clock):
    side = _sidecar(tmp_path, fake, clock, "delay")
    ids = [side.send(to={"users": ["u1"]}, idempotency_key=f"k{i}", ttl_seconds=600) for i in range(3)]
    side.drain()
    assert _statuses(side, ids) == ["sent", "sent", "expired"]
    assert len(fake.deliveries_to(user="u1")) == 2
    side.services.close()


def test_drop_policy_ends_throttled_and_other_recipients_are_not_limited(tmp_path, fake, clock):
    side = _sidecar(tmp_path, fake, clock, "drop")
    ids = [side.send(to={"users": ["u1"]}, idempotency_key=f"k{i}") for i in range(3)]
    other = side.send(to={"users": ["u2"]}, idempotency_key="other")
    side.drain()
    assert _statuses(side, ids) == ["sent", "sent", "throttled"]
    assert "dropped" in side.recipients(ids[2])[0]["reason"]
    assert _statuses(side, [other]) == ["sent"]
    side.services.close()


def test_parallel_delivery_threads_share_the_window(tmp_path, fake, clock):
    side = _sidecar(tmp_path, fake, clock, "drop")
    ids = [side.send(to={"users": ["u1"]}, idempotency_key=f"k{i}") for i in range(6)]
    now_ms = int(clock() * 1000)
    # two "threads" each lease three recipients for the same user before anything is recorded as sent
    first = side.store.lease(now_ms, 3, 10_000, "w1", lambda hint: f"a-{hint}")
    second = side.store.lease(now_ms, 3, 10_000, "w2", lambda hint: f"b-{hint}")
    throttle = side.engine.sender.throttle
    outcomes = []
    allowed = throttle.apply(first, lambda item, outcome: outcomes.append(outcome))
    allowed += throttle.apply(second, lambda item, outcome: outcomes.append(outcome))
    assert len(allowed) == 2 and [o.status for o in outcomes] == ["throttled"] * 4
    assert len(ids) == 6
    side.services.close()


def _two_messages_to_u1(tmp_path, fake, clock) -> Sidecar:
    """A sidecar whose type allows 2 per hour, with two messages to u1 accepted and not leased."""
    side = _sidecar(tmp_path, fake, clock, "drop")
    for i in range(2):
        side.send(to={"users": ["u1"]}, idempotency_key=f"k{i}")
    return side


def test_a_message_accepted_while_uncounted_sends_are_in_flight_counts_them(tmp_path, fake, clock):
    side = _two_messages_to_u1(tmp_path, fake, clock)
    now_ms = int(clock() * 1000)
    throttle, outcomes = side.engine.sender.throttle, []
    in_flight = side.store.lease(now_ms, 10, 10_000, "w1", lambda hint: f"a-{hint}")
    # two messages of the type, 2 per hour: both go without a count, and are not recorded yet
    assert len(throttle.apply(in_flight, lambda item, outcome: outcomes.append(outcome))) == 2
    side.send(to={"users": ["u1"]}, idempotency_key="k2")
    third = side.store.lease(now_ms, 10, 10_000, "w2", lambda hint: f"b-{hint}")
    assert throttle.apply(third, lambda item, outcome: outcomes.append(outcome)) == []
    assert [o.status for o in outcomes] == ["throttled"]
    side.services.close()


@pytest.mark.parametrize("policy, held", [("delay", ("queued", 0)), ("drop", ("throttled", 1))])
def test_users_of_a_custom_fan_out_over_the_limit_are_split_off_its_batch(tmp_path, fake, clock, policy, held):
    side = _sidecar(tmp_path, fake, clock, policy)
    earlier = [side.send(mode="custom", to={"users": ["u2", "u3"]}, idempotency_key=f"k{i}") for i in range(2)]
    side.engine.step()  # both batches sent: u2 and u3 have had their 2 per hour
    assert [{r["status"] for r in side.recipients(mid)} for mid in earlier] == [{"sent"}, {"sent"}]
    mid = side.send(mode="custom", to={"users": ["u1", "u2", "u3"]}, idempotency_key="fan-out")
    side.engine.step()
    assert fake.calls_to("/msg/batch_send_msg")[-1].body["recvIDs"] == ["u1"]
    statuses = {r["user_id"]: (r["status"], r["attempts"]) for r in side.recipients(mid)}
    assert statuses == {"u1": ("sent", 1), "u2": held, "u3": held}  # a delay is no attempt
    assert "rate limit 2/hour" in side.recipients(mid)[1]["reason"]
    side.drain()
    final = {r["user_id"]: r["status"] for r in side.recipients(mid)}
    assert final == ({"u1": "sent", "u2": "sent", "u3": "sent"} if policy == "delay"
                     else {"u1": "sent", "u2": "throttled", "u3": "throttled"})
    assert len(fake.deliveries_to(user="u2")) == (3 if policy == "delay" else 2)
    side.services.close()


def test_a_custom_fan_out_all_over_the_limit_sends_nothing(tmp_path, fake, clock, caplog):
    side = _sidecar(tmp_path, fake, clock, "drop")
    for i in range(3):
        side.send(mode="custom", to={"users": ["u1", "u2"]}, idempotency_key=f"k{i}")
    with caplog.at_level("INFO", logger="openim_bizplugin.delivery.sending"):
        side.drain()
    assert [c.body["recvIDs"] for c in fake.calls_to("/msg/batch_send_msg")] == [["u1", "u2"]] * 2
    assert side.store.next_due_ms() is None and side.store.queue_depth()["normal"] == 0
    [emptied] = [r.getMessage() for r in caplog.records if ": skipped" in r.getMessage()]
    assert re.search(r"user batch \d+ \(emptied\): skipped", emptied), emptied  # not "u1 (batch of 0)"
    side.services.close()


def test_fan_outs_leased_by_parallel_threads_share_the_window(tmp_path, fake, clock):
    side = _sidecar(tmp_path, fake, clock, "drop")
    for i in range(3):
        side.send(mode="custom", to={"users": ["u1", "u2"]}, idempotency_key=f"k{i}")
    now_ms = int(clock() * 1000)
    # three "threads" each lease one batch before anything is recorded as sent: the first one's
    # users are new to the window, the next ones find those approvals
    leases = [side.store.lease(now_ms, 2, 10_000, f"w{n}", lambda hint, n=n: f"{n}-{hint}") for n in range(3)]
    assert [[item.members for item in lease] for lease in leases] == [[[(0, "u1"), (1, "u2")]]] * 3
    throttle = side.engine.sender.throttle
    outcomes = []
    allowed = [throttle.apply(lease, lambda item, outcome: outcomes.append(outcome)) for lease in leases]
    assert [[len(item.members) for item in a] for a in allowed] == [[2], [2], []]  # 2 per hour
    assert [o.status for o in outcomes] == ["throttled", "throttled", "skipped"]  # the third batch emptied
    side.services.close()


def test_sends_by_another_process_count_against_this_ones_rounds(tmp_path, fake, clock):
    side = _two_messages_to_u1(tmp_path, fake, clock)
    now_ms = int(clock() * 1000)
    # another worker process (a replica, or this one before a restart) sent both: this process's
    # approvals never saw them, only the store did
    elsewhere = side.store.lease(now_ms, 10, 10_000, "other-process", lambda hint: f"o-{hint}")
    assert side.store.complete([(item, Outcome.sent("s", "c", now_ms)) for item in elsewhere], now_ms) == 2
    third = side.send(to={"users": ["u1"]}, idempotency_key="k2")
    side.engine.step()
    assert _statuses(side, [third]) == ["throttled"]
    assert len(fake.deliveries_to(user="u1")) == 0  # the other process's sends never reached this fake
    side.services.close()


def test_a_delayed_recipient_goes_when_its_window_has_room_not_a_whole_window_later(tmp_path, clock):
    with FakeOpenIM(users=USERS, online=APPS, clock=clock) as fake:  # OpenIM's sendTime on the same clock
        _delayed_until_the_window_has_room(_sidecar(tmp_path, fake, clock, "delay"), clock)


def _delayed_until_the_window_has_room(side, clock):
    first = [side.send(to={"users": ["u1"]}, idempotency_key=f"k{i}") for i in range(2)]
    sent_first = clock.now
    side.engine.step()
    clock.now += 1800  # half an hour later, a third: 2/hour is full until an hour after the first two
    third = side.send(to={"users": ["u1"]}, idempotency_key="k2")
    side.engine.step()
    assert _statuses(side, first + [third]) == ["sent", "sent", "queued"]
    side.drain()  # moves the clock to the third's due time, and sends it
    assert _statuses(side, [third]) == ["sent"]
    assert clock.now - sent_first == pytest.approx(3600, abs=1)
    side.services.close()


def test_a_newly_set_limit_counts_what_this_process_sent_before_it(tmp_path, fake, clock):
    """intake restarted with the limit while this worker kept running (it had sent the earlier ones)"""
    side = _sidecar(tmp_path, fake, clock, "drop")
    limited = side.services.catalog
    unlimited_dir = tmp_path / "unlimited"
    shutil.copytree(tmp_path / "schemas", unlimited_dir)
    toml = unlimited_dir / "profile.updated" / "type.toml"
    toml.write_text(re.sub(r'(?m)^rate_limit = .*$', "", toml.read_text()))
    side.services.catalog = Catalog.load(unlimited_dir)
    before = [side.send(to={"users": ["u1"]}, idempotency_key=f"k{i}") for i in range(2)]
    side.engine.step()
    assert _statuses(side, before) == ["sent", "sent"]
    side.services.catalog = limited  # 2/hour from now on
    third = side.send(to={"users": ["u1"]}, idempotency_key="k2")
    side.engine.step()
    assert _statuses(side, [third]) == ["throttled"]
    assert len(fake.deliveries_to(user="u1")) == 2
    side.services.close()


@pytest.mark.parametrize("others", [0, 3], ids=["few-messages-of-the-type", "counted"])
def test_attempts_that_sent_nothing_do_not_use_up_the_window(tmp_path, fake, clock, others):
    """OpenIM was busy (429) for three attempts: those sent nothing, so the window still has both slots."""
    side = _sidecar(tmp_path, fake, clock, "delay")
    for i in range(others):  # enough messages of the type that each round counts per recipient
        side.send(to={"users": ["u2"]}, idempotency_key=f"other{i}")
    side.engine.step()
    first = side.send(to={"users": ["u1"]}, idempotency_key="first")
    fake.fail_next("/msg/send_business_notification", times=3, err_code=429)
    for _ in range(3):
        side.engine.step()
        clock.now += 60  # past the backoff
    assert side.recipients(first)[0]["status"] == "queued" and side.recipients(first)[0]["attempts"] == 3
    side.engine.step()
    second = side.send(to={"users": ["u1"]}, idempotency_key="second")
    third = side.send(to={"users": ["u1"]}, idempotency_key="third")
    side.engine.step()
    assert _statuses(side, [first, second, third]) == ["sent", "sent", "queued"]  # 2/hour: the third waits
    assert len(fake.deliveries_to(user="u1")) == 2
    side.services.close()
