"""What the app on a phone receives, on released OpenIM v3.8.x and on main (SPEC §5).

The sidecar runs in this process (engine stepped by hand, injected clock) and
talks over loopback HTTP to :class:`FakeOpenIM`, which models each user's app:
online push at send time, stored or online-only messages per release, what a
reconnecting app syncs, iOS apps in the background. Assertions are on what
the app's listeners raised (``FakeOpenIM.received_by``), not on API answers.
"""

from __future__ import annotations

import contextlib
import json

import pytest

from test_delivery import USERS, Sidecar
from openim_bizplugin.testing import FakeOpenIM


def _ids(deliveries) -> list[str]:
    """The envelope ids of what an app received (business notifications and custom messages)."""
    return [json.loads(d.data if d.content_type == 2001 else d.content["data"])["id"] for d in deliveries]


@pytest.fixture(params=["v3.8.3", "main"])
def flavor(request):
    return request.param


@contextlib.contextmanager
def _running(tmp_path, clock, flavor: str = "main", *, groups=None, version: str = "auto", before=None):
    """A fake OpenIM of *flavor* and the sidecar on it (release probed unless *version* says);
    *before(fake)* runs before the sidecar is built."""
    with FakeOpenIM(users=USERS, groups=groups, flavor=flavor) as fake:
        if before is not None:
            before(fake)
        side = Sidecar(tmp_path, fake, clock, hold_recheck_seconds=60, openim={"version": version})
        try:
            yield fake, side
        finally:
            side.services.close()


def _online_callback(side: Sidecar, fake: FakeOpenIM, user: str, **kwargs) -> None:
    """OpenIM's afterUserOnline callback, posted to the sidecar and processed."""
    token = side.services.config.callback_token
    body = fake.user_online(user, **kwargs)
    answer = side.app.test_client().post(f"/openim/callback/{token}/{body['callbackCommand']}", json=body)
    assert answer.status_code == 200
    assert side.services.callbacks.step() == 1


def _chatted_then_left(fake: FakeOpenIM) -> None:
    """u1's app has logged in before, has a chat with the sender account, and is offline now."""
    fake.connect("u1")
    fake.receipt_message("u1", "imAdmin", {"id": "earlier", "status": "done"})
    fake.disconnect("u1")


def _logged_in_before(fake: FakeOpenIM) -> None:
    """u1's app has logged in before (not a first login), never chatted with the sender, is offline now."""
    fake.connect("u1")
    fake.disconnect("u1")


def _never_logged_in(fake: FakeOpenIM) -> None:
    """u1's app will log in for the first time on this device."""


@pytest.mark.parametrize("history", [_chatted_then_left, _logged_in_before, _never_logged_in])
def test_a_persistent_message_to_an_offline_user_reaches_the_app_once_it_connects(tmp_path, clock, flavor,
                                                                                  history):
    # on main OpenIM stores it, but a reconnecting app syncs it only after a chat with the sender
    # (GetMaxSeq) and a first login skips it: on every release the sidecar keeps it until the app is online
    with _running(tmp_path, clock, flavor, before=history) as (fake, side):
        mid = side.send(to={"users": ["u1"]})  # profile.updated: persistent, offline = "store"
        side.engine.step()
        [recipient] = side.recipients(mid)
        assert recipient["status"] == "held" and "held until they come online" in recipient["reason"]
        assert fake.deliveries_to(user="u1") == []
        fake.connect("u1")
        _online_callback(side, fake, "u1")
        side.drain()
        assert _ids(fake.received_by("u1")) == [mid]
        assert side.recipients(mid)[0]["status"] == "sent"
        [call] = fake.calls_to("/msg/send_business_notification")[1:]  # after the probe
        assert call.body["reliabilityLevel"] == 2  # OpenIM main keeps it too, for the user's other devices
        fake.disconnect("u1")
        fake.connect("u1")  # a later reconnect raises nothing again
        assert _ids(fake.received_by("u1")) == [mid]


def test_on_main_a_persistent_message_to_an_online_user_goes_out_at_once(tmp_path, clock):
    with _running(tmp_path, clock, "main", before=lambda fake: fake.connect("u1", 2)) as (fake, side):
        mid = side.send(to={"users": ["u1"]})
        side.engine.step()
        assert side.recipients(mid)[0]["status"] == "sent"
        assert _ids(fake.received_by("u1")) == [mid]


def test_on_main_an_ios_app_in_the_background_is_offline_for_a_persistent_message(tmp_path, clock):
    with _running(tmp_path, clock, "main", before=lambda fake: fake.connect("u1", 1)) as (fake, side):
        _online_callback(side, fake, "u1")  # "online" a moment ago...
        fake.set_background("u1", 1)        # ...then the app went to the background, silently
        mid = side.send(to={"users": ["u1"]})
        side.engine.step()
        assert side.recipients(mid)[0]["status"] == "held"  # OpenIM's live view was asked
        fake.set_background("u1", 1, False)  # back in the foreground: no callback, the recheck finds it
        clock.advance(61)
        side.drain()
        assert _ids(fake.received_by("u1")) == [mid]


def test_on_v38_a_held_message_goes_out_on_the_recheck_when_the_online_callback_was_lost(tmp_path, clock):
    with _running(tmp_path, clock, "v3.8.3") as (fake, side):
        mid = side.send(to={"users": ["u1"]}, ttl_seconds=3600)
        side.engine.step()
        fake.connect("u1")  # a fresh install, even: the message is pushed live
        clock.advance(61)
        side.drain()
        assert _ids(fake.received_by("u1")) == [mid]


def test_on_v38_an_online_only_message_waits_while_the_ios_app_is_in_the_background(tmp_path, clock):
    # connected, but OpenIM's gateway skips it
    with _running(tmp_path, clock, "v3.8.3", before=lambda fake: fake.connect("u1", background=True)) as (fake, side):
        mid = side.send(to={"users": ["u1"]})
        side.engine.step()
        assert side.recipients(mid)[0]["status"] == "held"
        fake.set_background("u1", 1, False)  # no callback comes for this
        clock.advance(61)
        side.drain()
        assert _ids(fake.received_by("u1")) == [mid]


def test_a_stale_online_callback_is_not_trusted_for_an_online_only_send(tmp_path, clock):
    with _running(tmp_path, clock, "v3.8.3") as (fake, side):
        fake.connect("u1", 1)
        _online_callback(side, fake, "u1")  # "online" a moment ago...
        fake.set_background("u1", 1)        # ...then the app went to the background, silently
        mid = side.send(to={"users": ["u1"]})
        side.engine.step()
        assert side.recipients(mid)[0]["status"] == "held"  # OpenIM's live view was asked
        assert fake.received_by("u1") == []


def test_an_ios_online_callback_from_the_background_counts_as_offline(tmp_path, clock):
    with _running(tmp_path, clock, "v3.8.3") as (fake, side):
        _online_callback(side, fake, "u1", platform_id=1, is_app_background=True)
        assert not side.store.presence(["u1"])["u1"].online
        _online_callback(side, fake, "u2", platform_id=2, is_app_background=True)  # Android is pushed to
        assert side.store.presence(["u2"])["u2"].online


def test_the_release_is_probed_once_and_the_probe_sends_nothing(tmp_path, clock, flavor):
    with _running(tmp_path, clock, flavor, before=lambda fake: fake.connect("u1")) as (fake, side):
        side.engine.step()  # nothing due: the worker still learns the release
        expected = "3.8" if flavor == "v3.8.3" else "main"
        assert side.services.release.describe() == f"{expected} (detected)"
        [probe] = fake.calls_to("/msg/send_business_notification")
        assert probe.body == {"sendUserID": "imAdmin"}
        assert fake.delivered == [] and fake.received_by("u1") == []
        side.send(to={"users": ["u1"]})
        side.drain()
        assert len(fake.calls_to("/msg/send_business_notification")) == 2  # no second probe


def test_a_configured_release_is_not_probed(tmp_path, clock):
    with _running(tmp_path, clock, "v3.8.3", version="3.8") as (fake, side):
        side.engine.step()
        assert side.services.release.describe() == "3.8 (configured)"
        assert fake.calls_to("/msg/send_business_notification") == []


def _probe_meets_a_bad_gateway(fake: FakeOpenIM) -> None:
    fake.fail_next("/msg/send_business_notification", http_status=502, body=b"502 Bad Gateway")


def test_while_the_release_is_unknown_persistent_messages_are_kept_for_offline_users(tmp_path, clock):
    with _running(tmp_path, clock, before=_probe_meets_a_bad_gateway) as (fake, side):
        mid = side.send(to={"users": ["u1"]})
        side.engine.step()
        assert side.services.release.describe().startswith("unknown (probe failed")
        assert side.recipients(mid)[0]["status"] == "held"
        clock.advance(61)  # the next probe is due after 30 s
        fake.connect("u1")  # on the recheck
        side.drain()
        assert side.services.release.describe() == "main (detected)"
        assert _ids(fake.received_by("u1")) == [mid]


def test_on_v38_group_notifications_go_to_each_member_without_a_refused_group_call(tmp_path, clock):
    with _running(tmp_path, clock, "v3.8.3", groups={"g1": ["u1", "u2"]}) as (fake, side):
        fake.connect("u1")
        fake.connect("u2")
        mid = side.send(to={"groups": ["g1"]})
        side.drain()
        calls = fake.calls_to("/msg/send_business_notification")[1:]  # after the probe
        assert [c.body["recvUserID"] for c in calls] == ["u1", "u2"]
        assert _ids(fake.received_by("u1")) == _ids(fake.received_by("u2")) == [mid]
