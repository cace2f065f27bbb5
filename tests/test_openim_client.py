"""Unit tests of the OpenIM HTTP client, faked at the HTTP edge with ``responses``.

Response bodies follow OpenIM's real envelope and error texts (OPENIM.md §1-4,
checked against open-im-server v3.8.3-patch.16 and main). Connection refused
and read timeout use real loopback sockets, so the translation of requests'
own exceptions is tested, not our idea of them.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from typing import Any

import pytest
import requests
import responses
import urllib3.exceptions

from openim_bizplugin.config import OpenIMConfig
from openim_bizplugin.openim.client import TOKEN_NAME, OpenIMClient, OpenIMError, SendResult

API = "http://openim.test:10002"
SECRET = "openim-secret-do-not-log-7c1f"
TOKEN, TOKEN2 = "eyJhbGciOiJIUzI1NiJ9.admin-one.sig1", "eyJhbGciOiJIUzI1NiJ9.admin-two.sig2"
DAY = 86_400
NOW = 1_720_000_000.0
CONFIG = OpenIMConfig(api_url=API, secret=SECRET, admin_user_id="imAdmin", sender_id="bizbot", timeout_seconds=2.0)


class MemoryTokens:
    """The TokenStore seam, in memory; ``try_lock`` honours other owners (TTL not modelled)."""

    def __init__(self) -> None:
        self.tokens: dict[str, tuple[str, int]] = {}
        self.locks: dict[str, str] = {}
        self.mutex = threading.Lock()

    def load_token(self, name: str) -> tuple[str, int] | None:
        return self.tokens.get(name)

    def save_token(self, name: str, token: str, expires_ms: int) -> None:
        self.tokens[name] = (token, expires_ms)

    def try_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        with self.mutex:
            if self.locks.get(name, owner) != owner:
                return False
            self.locks[name] = owner
            return True

    def unlock(self, name: str, owner: str) -> None:
        with self.mutex:
            if self.locks.get(name) == owner:
                del self.locks[name]


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def envelope(data: Any = None, code: int = 0, msg: str = "", dlt: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {"errCode": code, "errMsg": msg, "errDlt": dlt}
    if data is not None:
        body["data"] = data
    return body


def admin_token_ok(rsps: responses.RequestsMock, token: str = TOKEN, lifetime: int = 90 * DAY) -> None:
    rsps.post(API + "/auth/get_admin_token", json=envelope({"token": token, "expireTimeSeconds": lifetime}))


def sent(n: int = 1) -> dict[str, Any]:
    return envelope({"serverMsgID": f"srv{n}", "clientMsgID": f"cli{n}", "sendTime": 1720000000456 + n})


def body_of(call: Any) -> dict[str, Any]:
    return json.loads(call.request.body)


def calls_to(rsps: responses.RequestsMock, endpoint: str) -> list[Any]:
    return [c for c in rsps.calls if c.request.url == API + endpoint]


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def store() -> MemoryTokens:
    return MemoryTokens()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(store: MemoryTokens, clock: Clock) -> OpenIMClient:
    return OpenIMClient(CONFIG, store, clock=clock, lock_poll_seconds=0.01, lock_wait_seconds=0.05,
                        sleep=lambda s: None)


def seed(store: MemoryTokens, token: str = TOKEN, valid_for: float = 90 * DAY) -> None:
    store.save_token(TOKEN_NAME, token, int((NOW + valid_for) * 1000))


# -- request shapes ---------------------------------------------------------------------------
def test_business_notification_to_a_user(rsps, client):
    admin_token_ok(rsps)
    rsps.post(API + "/msg/send_business_notification", json=sent())
    result = client.send_business_notification(send_user_id="bizbot", key="order.paid", data='{"id":"m1"}',
                                               recv_user_id="u1001", reliability_level=2, operation_id="op-1")
    assert result == SendResult("srv1", "cli1", 1720000000457, "op-1")
    token_call, call = rsps.calls
    assert "token" not in token_call.request.headers
    assert body_of(token_call) == {"secret": SECRET, "userID": "imAdmin"}
    assert call.request.headers["operationID"] == "op-1" and call.request.headers["token"] == TOKEN
    assert body_of(call) == {"sendUserID": "bizbot", "key": "order.paid", "data": '{"id":"m1"}',
                             "recvUserID": "u1001", "sendMsg": False, "reliabilityLevel": 2}
    assert call.request.req_kwargs["timeout"] == (2.0, 2.0)


def test_business_notification_to_a_group_sends_recv_group_id_only(rsps, client):
    admin_token_ok(rsps)
    rsps.post(API + "/msg/send_business_notification", json=sent())
    client.send_business_notification(send_user_id="bizbot", key="t", data="{}", recv_group_id="g_ops",
                                      operation_id="op-g")
    body = body_of(rsps.calls[-1])
    assert body["recvGroupID"] == "g_ops" and "recvUserID" not in body and body["reliabilityLevel"] == 1


@pytest.mark.parametrize("targets", [{}, {"recv_user_id": "u", "recv_group_id": "g"}])
def test_business_notification_needs_exactly_one_target(client, targets):
    with pytest.raises(ValueError):
        client.send_business_notification(send_user_id="b", key="k", data="{}", operation_id="o", **targets)


def test_group_notification_on_v383_is_a_permanent_bind_error(rsps, client):
    # v3.8.3-patch.16 internal/api/msg.go: RecvUserID `binding:"required"`, c.BindJSON -> HTTP 400
    admin_token_ok(rsps)
    dlt = "Key: 'RecvUserID' Error:Field validation for 'RecvUserID' failed on the 'required' tag"
    rsps.post(API + "/msg/send_business_notification", status=400, json=envelope(code=1001, msg="ArgsError", dlt=dlt))
    with pytest.raises(OpenIMError) as info:
        client.send_business_notification(send_user_id="b", key="k", data="{}", recv_group_id="g", operation_id="o")
    err = info.value
    assert (err.http_status, err.err_code, err.retryable, err.outcome_unknown) == (400, 1001, False, False)
    assert "RecvUserID" in err.err_dlt


def test_send_msg_single_chat_custom_content(rsps, client):
    admin_token_ok(rsps)
    rsps.post(API + "/msg/send_msg", json=envelope({"serverMsgID": "s", "clientMsgID": "c", "sendTime": 5,
                                                    "modify": {"ex": "changed"}}))
    content = {"data": '{"id":"m1"}', "description": "cfg.refresh", "extension": ""}
    assert client.send_msg(send_id="bizbot", content=content, recv_id="u1001", operation_id="op-s") == \
        SendResult("s", "c", 5, "op-s")
    body = body_of(rsps.calls[-1])
    assert body == {"sendID": "bizbot", "recvID": "u1001", "senderPlatformID": 10, "content": content,
                    "contentType": 110, "sessionType": 1, "isOnlineOnly": False, "notOfflinePush": True}
    assert all(isinstance(v, str) for v in body["content"].values())


def test_send_msg_to_a_group_with_offline_push(rsps, client):
    admin_token_ok(rsps)
    rsps.post(API + "/msg/send_msg", json=sent())
    client.send_msg(send_id="bizbot", content={"data": "x"}, group_id="g_ops", push_title="Order paid",
                    push_desc="A1", operation_id="op")
    body = body_of(rsps.calls[-1])
    assert body["sessionType"] == 3 and body["groupID"] == "g_ops" and "recvID" not in body
    assert body["notOfflinePush"] is False
    assert body["offlinePushInfo"]["title"] == "Order paid" and body["offlinePushInfo"]["desc"] == "A1"


def test_send_msg_refuses_non_string_content_before_calling(rsps, client):
    with pytest.raises(TypeError):
        client.send_msg(send_id="b", content={"data": {"id": 1}}, recv_id="u", operation_id="o")  # type: ignore
    assert not rsps.calls


def test_batch_send_maps_results_and_failures(rsps, client):
    admin_token_ok(rsps)
    rsps.post(API + "/msg/batch_send_msg", json=envelope({
        "results": [{"serverMsgID": "s1", "clientMsgID": "c", "sendTime": 7, "recvID": "u1", "modify": None}],
        "failedUserIDs": ["ghost"]}))
    result = client.batch_send_msg(send_id="bizbot", content={"data": "x"}, recv_ids=["u1", "ghost", "u1"],
                                   operation_id="op-b")
    assert result.sent == {"u1": ("s1", "c", 7)} and result.sent_to == {"u1"} and result.failed == ("ghost",)
    assert json.loads(result.answer)["data"]["results"][0]["serverMsgID"] == "s1"  # OpenIM's answer as it came
    body = body_of(rsps.calls[-1])
    assert body["recvIDs"] == ["u1", "ghost"] and body["isSendAll"] is False
    assert body["sessionType"] == 1 and body["contentType"] == 110 and "recvID" not in body


def test_batch_send_null_lists(rsps, client):
    admin_token_ok(rsps)
    rsps.post(API + "/msg/batch_send_msg", json=envelope({"results": None, "failedUserIDs": None}))
    result = client.batch_send_msg(send_id="b", content={"data": "x"}, recv_ids=["u1"], operation_id="o")
    assert result.sent == {} and result.failed == ()


def test_batch_send_caps_at_1000(rsps, client):
    with pytest.raises(ValueError):
        client.batch_send_msg(send_id="b", content={"data": "x"}, recv_ids=[f"u{i}" for i in range(1001)],
                              operation_id="o")
    assert not rsps.calls


@pytest.mark.parametrize("status, arrived", [(2, True), (0, False)])
def test_check_msg_is_send_success_reuses_the_operation_id(rsps, client, status, arrived):
    admin_token_ok(rsps)
    rsps.post(API + "/msg/check_msg_is_send_success", json=envelope({"status": status}))
    assert client.check_msg_is_send_success("biz-send-1-abc") is arrived
    call = rsps.calls[-1]
    assert call.request.headers["operationID"] == "biz-send-1-abc" and body_of(call) == {}


def test_check_msg_keeps_its_operation_id_across_a_token_refresh(rsps, client, store):
    seed(store)
    admin_token_ok(rsps, TOKEN2)
    rsps.post(API + "/msg/check_msg_is_send_success", json=envelope(code=1501, msg="TokenExpiredError"))
    rsps.post(API + "/msg/check_msg_is_send_success", json=envelope({"status": 2}))
    assert client.check_msg_is_send_success("op-x") is True
    checks = calls_to(rsps, "/msg/check_msg_is_send_success")
    assert [c.request.headers["operationID"] for c in checks] == ["op-x", "op-x"]


def test_account_check_dedupes_and_chunks(rsps, client):
    admin_token_ok(rsps)

    def answer(request):
        ids = json.loads(request.body)["checkUserIDs"]
        results = [{"userID": u, "accountStatus": 0 if u == "u7" else 1} for u in ids]
        return 200, {}, json.dumps(envelope({"results": results}))

    rsps.add_callback(responses.POST, API + "/user/account_check", callback=answer)
    ids = ["u7", "u7"] + [f"x{i}" for i in range(1200)]
    registered = client.account_check(ids)
    bodies = [body_of(c)["checkUserIDs"] for c in calls_to(rsps, "/user/account_check")]
    assert [len(b) for b in bodies] == [1000, 201] and bodies[0][0] == "u7"
    assert registered["u7"] is False and registered["x1199"] is True and len(registered) == 1201
    assert client.account_check([]) == {}


def test_group_member_ids(rsps, client):
    admin_token_ok(rsps)
    rsps.post(API + "/group/get_group_member_user_id", json=envelope({"userIDs": ["a", "b"]}))
    rsps.post(API + "/group/get_group_member_user_id", json=envelope({"userIDs": None}))
    assert client.group_member_ids("g_ops") == ["a", "b"]
    assert client.group_member_ids("g_none") == []
    assert body_of(calls_to(rsps, "/group/get_group_member_user_id")[0]) == {"groupID": "g_ops"}


def test_users_online(rsps, client):
    admin_token_ok(rsps)
    rsps.post(API + "/user/get_users_online_status", json=envelope([
        {"userID": "u1", "status": 1, "detailPlatformStatus": [
            {"platformID": 1, "connID": "c", "isBackground": False, "token": "user-token"},
            {"platformID": 5, "connID": "d", "isBackground": False, "token": "user-token"}]},
        {"userID": "u2", "status": 0, "detailPlatformStatus": None},
        # OpenIM's gateway skips online push to an iOS app in the background (hub_server.go pushToUser)
        {"userID": "u3", "status": 1, "detailPlatformStatus": [
            {"platformID": 1, "connID": "e", "isBackground": True, "token": "user-token"},
            {"platformID": 2, "connID": "f", "isBackground": True, "token": "user-token"}]},
        {"userID": "u4", "status": 1, "detailPlatformStatus": [
            {"platformID": 1, "connID": "g", "isBackground": True, "token": "user-token"}]}]))
    assert client.users_online(["u1", "u2", "u3", "u4", "u5"]) == {"u1": [1, 5], "u2": [], "u3": [2], "u4": [],
                                                                   "u5": []}
    assert body_of(rsps.calls[-1]) == {"userIDs": ["u1", "u2", "u3", "u4", "u5"]}


# -- error classification ---------------------------------------------------------------------
ERRORS = [  # (HTTP status, body, retryable, outcome_unknown)
    (400, envelope(code=1001, msg="ArgsError", dlt="json: cannot unmarshal object into Go struct field"),
     False, False),
    (200, envelope(code=1004, msg="RecordNotFoundError", dlt="user not found"), False, False),
    (200, envelope(code=500, msg="ServerInternalError",
                   dlt="Key: 'CustomElem.Data' Error:Field validation for 'Data' failed on the 'required' tag"),
     False, False),
    (200, envelope(code=500, msg="ServerInternalError",
                   dlt="1 error(s) decoding:\n\n* 'Data' expected type 'string', got unconvertible type"),
     False, False),
    (200, envelope(code=500, msg="grpc service msg down, please check"), True, True),
    (200, envelope(code=90004, msg="NetworkError", dlt="webhook timeout"), True, False),
    (200, envelope(code=1302, msg="BlockedByPeer"), False, False),
    (200, envelope(code=4242, msg="custom webhook refusal"), False, False),
    (429, envelope(code=429, msg="too many requests, please try again later"), True, False),
    (200, envelope(code=429, msg="too many requests"), True, False),
]


@pytest.mark.parametrize("status, body, retryable, unknown", ERRORS)
def test_error_classification(rsps, client, status, body, retryable, unknown):
    admin_token_ok(rsps)
    rsps.post(API + "/msg/send_msg", status=status, json=body)
    with pytest.raises(OpenIMError) as info:
        client.send_msg(send_id="b", content={"data": "x"}, recv_id="u", operation_id="op-e")
    err = info.value
    assert (err.retryable, err.outcome_unknown) == (retryable, unknown)
    assert (err.err_code, err.http_status, err.operation_id) == (body["errCode"], status, "op-e")
    assert "\n" not in str(err) and str(err).startswith("/msg/send_msg errCode ")


@pytest.mark.parametrize("status, retryable", [(502, True), (500, True), (404, False), (200, False)])
def test_non_json_bodies(rsps, client, status, retryable):
    admin_token_ok(rsps)
    rsps.post(API + "/msg/send_msg", status=status, body="<html>Bad Gateway</html>")
    with pytest.raises(OpenIMError) as info:
        client.send_msg(send_id="b", content={"data": "x"}, recv_id="u", operation_id="o")
    assert info.value.retryable is retryable and info.value.err_code is None
    assert f"HTTP {status}" in str(info.value)


def test_error_message_is_one_readable_line(rsps, client):
    admin_token_ok(rsps)
    rsps.post(API + "/msg/send_msg", json=envelope(code=1004, msg="RecordNotFoundError", dlt="user not found"))
    with pytest.raises(OpenIMError) as info:
        client.send_msg(send_id="b", content={"data": "x"}, recv_id="u", operation_id="biz-x-1-ab")
    assert str(info.value) == "/msg/send_msg errCode 1004 RecordNotFoundError: user not found (operationID biz-x-1-ab)"


def test_connection_refused_is_retryable_and_not_unknown(store):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = OpenIMClient(OpenIMConfig(f"http://127.0.0.1:{port}", SECRET, "imAdmin", "bizbot", 1.0), store)
    seed(store, valid_for=(1 << 31))
    with pytest.raises(OpenIMError) as info:
        client.send_msg(send_id="b", content={"data": "x"}, recv_id="u", operation_id="o")
    assert (info.value.retryable, info.value.outcome_unknown) == (True, False)
    assert isinstance(info.value.__cause__, requests.ConnectionError)


def test_read_timeout_is_outcome_unknown(store):
    with socket.socket() as server:  # accepts (kernel backlog) but never answers
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        config = OpenIMConfig(f"http://127.0.0.1:{server.getsockname()[1]}", SECRET, "imAdmin", "bizbot", 0.3)
        client = OpenIMClient(config, store)
        seed(store, valid_for=(1 << 31))
        with pytest.raises(OpenIMError) as info:
            client.send_msg(send_id="b", content={"data": "x"}, recv_id="u", operation_id="op-t")
    assert (info.value.retryable, info.value.outcome_unknown, info.value.operation_id) == (True, True, "op-t")
    assert isinstance(info.value.__cause__, requests.ReadTimeout)


def test_connection_dropped_after_sending_is_outcome_unknown(rsps, client, store):
    seed(store)
    dropped = requests.ConnectionError(urllib3.exceptions.ProtocolError(
        "Connection aborted.", ConnectionResetError(104, "Connection reset by peer")))
    rsps.post(API + "/msg/send_msg", body=dropped)
    with pytest.raises(OpenIMError) as info:
        client.send_msg(send_id="b", content={"data": "x"}, recv_id="u", operation_id="o")
    assert (info.value.retryable, info.value.outcome_unknown) == (True, True)


# -- admin token ------------------------------------------------------------------------------
def test_token_is_fetched_once_and_shared_through_the_store(rsps, client, store, clock):
    admin_token_ok(rsps)
    rsps.post(API + "/group/get_group_member_user_id", json=envelope({"userIDs": []}))
    for _ in range(3):
        client.group_member_ids("g")
    assert len(calls_to(rsps, "/auth/get_admin_token")) == 1
    assert store.tokens[TOKEN_NAME] == (TOKEN, int(NOW * 1000) + 90 * DAY * 1000)
    other = OpenIMClient(CONFIG, store, clock=clock)
    assert other.admin_token() == TOKEN
    other.group_member_ids("g")
    assert len(calls_to(rsps, "/auth/get_admin_token")) == 1
    assert all(c.request.headers.get("token") == TOKEN for c in calls_to(rsps, "/group/get_group_member_user_id"))


def test_token_is_refreshed_ahead_of_expiry(rsps, client, store, clock):
    admin_token_ok(rsps, TOKEN, lifetime=DAY)
    admin_token_ok(rsps, TOKEN2, lifetime=DAY)
    assert client.admin_token() == TOKEN
    clock.now += DAY - 3601  # still more than the one-hour margin left
    assert client.admin_token() == TOKEN
    clock.now += 2
    assert client.admin_token() == TOKEN2
    assert store.tokens[TOKEN_NAME][0] == TOKEN2 and len(calls_to(rsps, "/auth/get_admin_token")) == 2


@pytest.mark.parametrize("code, msg", [(1501, "TokenExpiredError"), (1507, "TokenNotExistError"),
                                       (1002, "NoPermissionError")])  # the token's user is no admin any more
def test_token_error_refreshes_once_and_repeats_with_a_new_operation_id(rsps, client, store, code, msg):
    seed(store)
    admin_token_ok(rsps, TOKEN2)
    rsps.post(API + "/msg/send_msg", json=envelope(code=code, msg=msg))
    rsps.post(API + "/msg/send_msg", json=sent())
    result = client.send_msg(send_id="b", content={"data": "x"}, recv_id="u", operation_id="op-1")
    first, second = calls_to(rsps, "/msg/send_msg")
    assert first.request.headers["token"] == TOKEN and second.request.headers["token"] == TOKEN2
    assert first.request.headers["operationID"] == "op-1" != second.request.headers["operationID"]
    assert result.operation_id == second.request.headers["operationID"]
    assert len(calls_to(rsps, "/auth/get_admin_token")) == 1


def test_token_error_after_the_refresh_is_retryable(rsps, client, store):
    seed(store)
    admin_token_ok(rsps, TOKEN2)
    rsps.post(API + "/msg/send_msg", json=envelope(code=1507, msg="TokenNotExistError"))
    with pytest.raises(OpenIMError) as info:
        client.send_msg(send_id="b", content={"data": "x"}, recv_id="u", operation_id="op-1")
    assert info.value.err_code == 1507 and info.value.retryable and not info.value.outcome_unknown
    assert info.value.operation_id == "op-1-retry"
    assert len(calls_to(rsps, "/auth/get_admin_token")) == 1 and len(calls_to(rsps, "/msg/send_msg")) == 2


def test_no_permission_again_after_the_refresh_is_final(rsps, client, store):
    """The fresh token is an admin's and the route still says 1002: that is about the call, not the token."""
    seed(store)
    admin_token_ok(rsps, TOKEN2)
    rsps.post(API + "/msg/send_msg", json=envelope(code=1002, msg="NoPermissionError",
                                                    dlt="only app manager can send message"))
    with pytest.raises(OpenIMError) as info:
        client.send_msg(send_id="b", content={"data": "x"}, recv_id="u", operation_id="op-1")
    assert info.value.err_code == 1002 and not info.value.retryable and not info.value.outcome_unknown
    assert info.value.operation_id == "op-1-retry"
    assert len(calls_to(rsps, "/auth/get_admin_token")) == 1 and len(calls_to(rsps, "/msg/send_msg")) == 2


def test_five_threads_on_an_expired_token_cause_one_refresh(rsps, client, store):
    seed(store)
    barrier = threading.Barrier(5, timeout=5)

    def send(request):
        if request.headers["token"] == TOKEN:
            barrier.wait()  # every thread holds the 1501 before anyone refreshes
            return 200, {}, json.dumps(envelope(code=1501, msg="TokenExpiredError"))
        return 200, {}, json.dumps(sent())

    rsps.add_callback(responses.POST, API + "/msg/send_msg", callback=send)
    admin_token_ok(rsps, TOKEN2)
    results: list[Any] = []
    threads = [threading.Thread(target=lambda i=i: results.append(client.send_msg(
        send_id="b", content={"data": "x"}, recv_id=f"u{i}", operation_id=f"op-{i}"))) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 5
    assert len(calls_to(rsps, "/auth/get_admin_token")) == 1
    assert len(calls_to(rsps, "/msg/send_msg")) == 10


def test_waits_for_another_process_that_is_refreshing(rsps, store, clock):
    store.try_lock("openim.admin_token.refresh", "other-replica", 10_000)

    def other_replica_finishes(seconds: float) -> None:
        store.save_token(TOKEN_NAME, TOKEN2, int((clock.now + DAY) * 1000))

    client = OpenIMClient(CONFIG, store, clock=clock, sleep=other_replica_finishes, owner="me")
    assert client.admin_token() == TOKEN2
    assert not rsps.calls


def test_fetches_anyway_when_the_other_refresher_never_finishes(rsps, store, clock):
    store.try_lock("openim.admin_token.refresh", "dead-replica", 10_000)
    naps: list[float] = []
    client = OpenIMClient(CONFIG, store, clock=clock, sleep=naps.append, lock_wait_seconds=0.5,
                          lock_poll_seconds=0.1)
    admin_token_ok(rsps)
    assert client.admin_token() == TOKEN
    assert naps == [0.1] * 5 and store.tokens[TOKEN_NAME][0] == TOKEN


def test_refresh_lock_is_released(rsps, client, store):
    admin_token_ok(rsps)
    client.admin_token()
    assert store.locks == {}


def test_wrong_secret_is_a_refusal_of_the_deployment_and_does_not_leak(rsps, client):
    rsps.post(API + "/auth/get_admin_token", json=envelope(code=1002, msg="NoPermissionError", dlt="secret invalid"))
    with pytest.raises(OpenIMError) as info:
        client.send_msg(send_id="b", content={"data": "x"}, recv_id="u", operation_id="o")
    err = info.value
    assert err.endpoint == "/auth/get_admin_token" and err.err_code == 1002
    assert err.token_refused and err.retryable and not err.outcome_unknown  # not the message's fault
    assert "/auth/get_admin_token" in str(err) and SECRET not in str(err) and SECRET not in repr(err.args)
    assert not calls_to(rsps, "/msg/send_msg")


REFUSALS = [(1002, "NoPermissionError", "secret invalid"),
            (1001, "ArgsError", "userID is error., userID=imAdmin, adminUserID=[ops]"),
            (1004, "RecordNotFoundError", "user not found")]


@pytest.mark.parametrize("code, msg, dlt", REFUSALS)
def test_a_refusal_is_asked_again_only_after_the_recheck_interval(rsps, client, clock, code, msg, dlt):
    rsps.post(API + "/auth/get_admin_token", json=envelope(code=code, msg=msg, dlt=dlt))
    for _ in range(5):  # delivery rounds and probes in the meantime cost OpenIM nothing
        with pytest.raises(OpenIMError) as info:
            client.admin_token()
        assert info.value.token_refused and info.value.err_code == code
    assert len(calls_to(rsps, "/auth/get_admin_token")) == 1
    clock.now += 5.0  # refusal_recheck_seconds
    rsps.replace(responses.POST, API + "/auth/get_admin_token",
                 json=envelope({"token": TOKEN, "expireTimeSeconds": 90 * DAY}))
    assert client.admin_token() == TOKEN
    assert len(calls_to(rsps, "/auth/get_admin_token")) == 2


def test_other_token_failures_are_no_refusal(rsps, client):
    rsps.post(API + "/auth/get_admin_token", json=envelope(code=500, msg="ServerInternalError", dlt="redis down"))
    with pytest.raises(OpenIMError) as info:
        client.admin_token()
    assert not info.value.token_refused


def test_a_token_refused_after_a_secret_change_is_never_offered_again(rsps, client, store, clock):
    seed(store)  # the token of the old secret, valid for 90 days by its own claims
    rsps.post(API + "/msg/send_msg", json=envelope(code=1505, msg="signature is invalid"))
    rsps.post(API + "/auth/get_admin_token", json=envelope(code=1002, msg="NoPermissionError", dlt="secret invalid"))
    with pytest.raises(OpenIMError) as info:
        client.send_msg(send_id="b", content={"data": "x"}, recv_id="u", operation_id="o")
    assert info.value.token_refused
    with pytest.raises(OpenIMError):  # not the dead token from memory or the store: the refusal
        client.admin_token()
    store.save_token(TOKEN_NAME, TOKEN2, int((NOW + DAY) * 1000))  # a replica with the new secret got one
    assert client.admin_token() == TOKEN2
    assert len(calls_to(rsps, "/auth/get_admin_token")) == 1


def test_echoed_secret_is_scrubbed(rsps, client):
    rsps.post(API + "/auth/get_admin_token", json=envelope(code=1001, msg="ArgsError", dlt=f"bad secret {SECRET}"))
    with pytest.raises(OpenIMError) as info:
        client.admin_token()
    assert SECRET not in str(info.value) and "***" in info.value.err_dlt


# -- operation IDs and logging ----------------------------------------------------------------
def test_operation_ids_are_unique_per_attempt(rsps, client, clock):
    ids = {client.new_operation_id("send") for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"biz-send-1720000000000-[0-9a-f]{7,}", i) for i in ids)
    assert re.fullmatch(r"biz-a-b-\d+-[0-9a-f]{8}", client.new_operation_id("a b/"))
    admin_token_ok(rsps)
    rsps.post(API + "/group/get_group_member_user_id", json=envelope({"userIDs": []}))
    for _ in range(3):
        client.group_member_ids("g")
    seen = [c.request.headers["operationID"] for c in rsps.calls]
    assert len(set(seen)) == len(seen) == 4


def test_logs_never_contain_the_token_or_the_secret(rsps, client, store, caplog):
    caplog.set_level(logging.DEBUG)
    admin_token_ok(rsps, TOKEN)
    admin_token_ok(rsps, TOKEN2)
    rsps.post(API + "/msg/send_msg", json=envelope(code=1501, msg="TokenExpiredError"))
    rsps.post(API + "/msg/send_msg", json=sent())
    rsps.post(API + "/msg/send_msg", json=envelope(code=1004, msg="RecordNotFoundError", dlt="user not found"))
    client.send_msg(send_id="b", content={"data": "x"}, recv_id="u", operation_id="op-log")
    with pytest.raises(OpenIMError):
        client.send_msg(send_id="b", content={"data": "x"}, recv_id="u", operation_id="op-log2")
    text = "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    assert "op-log" in text and "/msg/send_msg" in text and "errCode=1004" in text
    for secret in (SECRET, TOKEN, TOKEN2):
        assert secret not in text
