"""FakeOpenIM's model of what each user's app receives (``openim/fake_apps.py``).

Each expectation is OpenIM's behaviour read from its source (open-im-server
main and v3.8.3-patch.15/16, openim-sdk-core main), as the module docstring
lists: online push at send time, stored or online-only per release, what a
reconnecting app syncs, iOS apps in the background. Messages are sent over
loopback HTTP like any OpenIM client would.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from openim_bizplugin.testing import FakeOpenIM

USERS = ("u1", "u2")


class Admin:
    """An admin client of the fake: logs in, then posts with an operationID."""

    def __init__(self, fake: FakeOpenIM) -> None:
        self.fake, self.ops = fake, itertools.count()
        reply = self._post("/auth/get_admin_token", {"secret": "openIM123", "userID": "imAdmin"}, token=None)
        self.token = reply["data"]["token"]

    def _post(self, path: str, body: dict[str, Any], token: str | None) -> dict[str, Any]:
        headers = {"operationID": f"op-{next(self.ops)}", **({"token": token} if token else {})}
        return requests.post(self.fake.url + path, json=body, headers=headers, timeout=5).json()

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._post(path, body, self.token)

    def notify(self, user: str = "", *, group: str = "", level: int = 1, data: str = "n") -> dict[str, Any]:
        target = {"recvGroupID": group} if group else {"recvUserID": user}
        return self.post("/msg/send_business_notification", {"sendUserID": "imAdmin", "key": "k", "data": data,
                                                             "reliabilityLevel": level, **target})

    def custom(self, user: str, data: str = "c") -> dict[str, Any]:
        return self.post("/msg/send_msg", {"sendID": "imAdmin", "recvID": user, "content": {"data": data},
                                           "contentType": 110, "sessionType": 1})


def got(fake: FakeOpenIM, user: str, platform: int | None = None) -> list[str]:
    """What the user's app received: the notification's data, or the custom message's."""
    return [d.data if d.content_type == 2001 else d.content["data"] for d in fake.received_by(user, platform)]


@pytest.fixture(params=["main", "v3.8.3"])
def fake(request) -> Iterator[FakeOpenIM]:
    with FakeOpenIM(users=USERS, groups={"g": list(USERS)}, flavor=request.param) as server:
        yield server


@pytest.fixture
def admin(fake: FakeOpenIM) -> Admin:
    return Admin(fake)


def test_online_apps_get_a_push_at_send_time_offline_ones_never_get_an_online_only_message(fake, admin):
    fake.connect("u1")
    fake.connect("u2")
    fake.disconnect("u2")
    admin.notify("u1", data="a")
    admin.notify("u2", data="b")
    fake.connect("u2")
    assert got(fake, "u1") == ["a"] and got(fake, "u2") == []


def test_a_stored_notification_is_synced_on_reconnect_only_on_main(fake, admin):
    fake.connect("u1")
    admin.custom("u1", "hello")  # a chat with the sender: the user has si_imAdmin_u1
    fake.disconnect("u1")
    answer = admin.notify("u1", level=2, data="kept?")
    assert answer["errCode"] == 0
    assert got(fake, "u1") == ["hello"]
    fake.connect("u1")
    expected = ["hello", "kept?"] if fake.flavor == "main" else ["hello"]  # v3.8.x hard-codes level 1
    assert got(fake, "u1") == expected
    fake.disconnect("u1")
    fake.connect("u1")
    assert got(fake, "u1") == expected  # once


def test_on_main_a_user_without_a_chat_with_the_sender_is_not_synced_until_the_next_live_one():
    with FakeOpenIM(users=USERS) as fake:
        admin = Admin(fake)
        fake.connect("u1")
        fake.disconnect("u1")
        admin.notify("u1", level=2, data="first")
        fake.connect("u1")  # GetMaxSeq does not report n_imAdmin_u1: the user has no si_ with imAdmin
        assert got(fake, "u1") == []
        admin.notify("u1", level=2, data="second")  # seq 2 arrives live: the SDK pulls the gap first
        assert got(fake, "u1") == ["first", "second"]


def test_a_first_login_raises_nothing_stored_before_it():
    with FakeOpenIM(users=USERS, groups={"g": list(USERS)}) as fake:
        admin = Admin(fake)
        admin.custom("u1", "hello")
        admin.notify("u1", level=2, data="old")
        admin.notify(group="g", level=2, data="group-old")
        fake.connect("u1")  # a fresh install fast-forwards to the newest seqs
        assert got(fake, "u1") == []
        admin.notify("u1", level=2, data="new")
        assert got(fake, "u1") == ["new"]


def test_group_notifications_stored_on_main_reach_members_that_reconnect():
    with FakeOpenIM(users=USERS, groups={"g": list(USERS)}) as fake:
        admin = Admin(fake)
        fake.connect("u1")
        fake.disconnect("u1")
        admin.notify(group="g", level=2, data="to-all")  # stored in n_g; members have sg_g from creation
        fake.connect("u1")
        assert got(fake, "u1") == ["to-all"] and got(fake, "u2") == []


def test_a_reconnecting_app_gets_only_the_newest_chat_message_per_conversation(fake, admin):
    fake.connect("u1")
    fake.disconnect("u1")
    for n in range(3):
        admin.custom("u1", f"c{n}")
    fake.connect("u1")  # connectPullNums = 1; the rest is history the app loads when opened
    assert got(fake, "u1") == ["c2"]


def test_ios_apps_in_the_background_are_not_pushed_to(fake, admin):
    fake.connect("u1", 1, background=True)
    fake.connect("u2", 2, background=True)  # Android in the background still gets online push
    admin.notify("u1", data="lost")
    admin.notify("u2", data="android")
    admin.custom("u1", "stored")
    assert got(fake, "u1") == [] and got(fake, "u2") == ["android"]
    [status] = admin.post("/user/get_users_online_status", {"userIDs": ["u1"]})["data"]
    assert (status["status"], status["detailPlatformStatus"][0]["isBackground"]) == (1, True)
    fake.set_background("u1", 1, False)  # back in the foreground the SDK syncs; no callback is sent
    assert got(fake, "u1") == ["stored"]


def test_each_platform_is_an_app_of_its_own(fake, admin):
    fake.connect("u1", 1)
    fake.connect("u1", 5)
    fake.set_background("u1", 1)
    admin.notify("u1", data="x")
    assert (got(fake, "u1", 1), got(fake, "u1", 5), got(fake, "u1")) == ([], ["x"], ["x"])


def test_a_user_who_blocks_messages_gets_no_chat_message(fake, admin):
    fake.connect("u1")
    fake.block_messages("u1")
    single = admin.custom("u1")
    batch = admin.post("/msg/batch_send_msg", {"sendID": "imAdmin", "content": {"data": "c"}, "contentType": 110,
                                               "sessionType": 1, "recvIDs": ["u1", "u2"]})
    if fake.flavor == "main":
        assert (single["errCode"], single["errDlt"]) == (1001, "message is not sent")
        assert batch["data"]["failedUserIDs"] == ["u1"]
    else:  # v3.8.3's RPC returns (nil, nil): success with empty ids (derived from the code)
        assert single["data"]["serverMsgID"] == single["data"]["clientMsgID"] == ""
        assert batch["data"]["results"][0]["serverMsgID"] == "" and batch["data"]["failedUserIDs"] is None
    admin.notify("u1", data="notifications skip the receive option")
    assert got(fake, "u1") == ["notifications skip the receive option"]
    assert [d.recv_id for d in fake.delivered] == ["u2", "u1"]


def test_only_the_users_listed_online_have_a_connected_app_at_start():
    with FakeOpenIM(users=USERS, online=["u1"]) as fake:  # a user whose app never connected is offline
        admin = Admin(fake)
        statuses = admin.post("/user/get_users_online_status", {"userIDs": ["u1", "u2"]})["data"]
        assert [s["status"] for s in statuses] == [1, 0]
        admin.notify("u1", data="a")
        admin.notify("u2", data="b")
        assert got(fake, "u1") == ["a"] and got(fake, "u2") == []
