"""The fake OpenIM server (``openim_bizplugin.testing``), over real loopback HTTP.

Expected envelopes and error texts are OpenIM's own (OPENIM.md §1-5, checked
against open-im-server main and v3.8.3-patch.16). Timeouts are short and
every wait is bounded.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import itertools
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from openim_bizplugin.testing import FakeOpenIM

USERS = ("u1001", "u2002")
CUSTOM = {"data": '{"type":"cfg.refresh","id":"evt-42"}', "description": "cfg.refresh", "extension": ""}
ALLOW = {"actionCode": 0, "errCode": 0, "errMsg": "", "errDlt": "", "nextCode": 0}


class Clock:
    def __init__(self) -> None:
        self.now = 1_720_000_000.0

    def __call__(self) -> float:
        return self.now


class Api:
    """A client of the fake: operationID on every call, the admin token once logged in."""

    def __init__(self, fake: FakeOpenIM) -> None:
        self.fake, self.session, self.token = fake, requests.Session(), ""
        self._ops = itertools.count(1)

    def post(self, path: str, body: Any = None, *, raw: bytes | None = None, token: str | None = None,
             op: str | None = None, timeout: float = 5.0) -> requests.Response:
        headers = {"operationID": op if op is not None else f"op-{next(self._ops)}"}
        if (token if token is not None else self.token):
            headers["token"] = token if token is not None else self.token
        data = raw if raw is not None else json.dumps(body).encode()
        return self.session.post(self.fake.url + path, data=data, headers=headers, timeout=timeout)

    def login(self, **body: str) -> str:
        reply = self.post("/auth/get_admin_token", {"secret": "openIM123", "userID": "imAdmin", **body}).json()
        self.token = reply["data"]["token"]
        return self.token

    def ok(self, path: str, body: Any, **kwargs: Any) -> Any:
        response = self.post(path, body, **kwargs)
        assert response.status_code == 200, response.text
        assert list(response.json()) == ["errCode", "errMsg", "errDlt", "data"], response.text
        assert response.json()["errCode"] == 0, response.text
        return response.json()["data"]


def error(response: requests.Response, status: int = 200) -> tuple[int, str, str]:
    """(errCode, errMsg, errDlt) of an error envelope, which never carries data."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["errCode", "errMsg", "errDlt"], body
    return body["errCode"], body["errMsg"], body["errDlt"]


def custom_msg(**fields: Any) -> dict[str, Any]:
    return {"sendID": "imAdmin", "recvID": "u1001", "senderPlatformID": 10, "content": dict(CUSTOM),
            "contentType": 110, "sessionType": 1, "notOfflinePush": True, **fields}


def notification(**fields: Any) -> dict[str, Any]:
    return {"sendUserID": "imAdmin", "key": "order.paid", "data": '{"orderId":"A1"}', **fields}


def wait_for(predicate: Any, seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def fake() -> Iterator[FakeOpenIM]:
    with FakeOpenIM(users=USERS, groups={"g_ops": ["u1001", "u2002"]}) as server:
        yield server


@pytest.fixture
def api(fake: FakeOpenIM) -> Api:
    client = Api(fake)
    client.login()
    return client


@pytest.fixture
def old_fake() -> Iterator[FakeOpenIM]:
    with FakeOpenIM(users=USERS, groups={"g_ops": ["u1001"]}, flavor="v3.8.3") as server:
        yield server


# ── envelope, headers, tokens ──────────────────────────────────────────────────
def test_admin_token_is_an_hs256_jwt_for_the_admin_platform(fake: FakeOpenIM) -> None:
    response = Api(fake).post("/auth/get_admin_token", {"secret": "openIM123", "userID": "imAdmin"})
    assert response.headers["Content-Type"] == "application/json"
    data = response.json()["data"]
    assert data["expireTimeSeconds"] == 90 * 86400      # a duration, not a timestamp
    head, claims, signature = data["token"].split(".")
    expected = hmac.new(b"openIM123", f"{head}.{claims}".encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(signature + "==") == expected
    claims_json = json.loads(base64.urlsafe_b64decode(claims + "=="))
    assert (claims_json["UserID"], claims_json["PlatformID"]) == ("imAdmin", 10)


@pytest.mark.parametrize(("body", "expected"), [
    ({"secret": "wrong", "userID": "imAdmin"}, (1002, "NoPermissionError", "secret invalid")),
    ({"secret": "openIM123", "userID": "u1001"},
     (1001, "ArgsError", "userID is error., userID=u1001, adminUserID=[imAdmin]")),
    ({"secret": "openIM123"}, (1001, "ArgsError", "userID is empty")),
])
def test_admin_token_checks(fake: FakeOpenIM, body: dict[str, str], expected: tuple[int, str, str]) -> None:
    assert error(Api(fake).post("/auth/get_admin_token", body)) == expected


def test_every_post_needs_an_operation_id_even_on_unknown_routes(api: Api) -> None:
    for path in ("/msg/send_msg", "/no/such/route", "/auth/get_admin_token"):
        assert error(api.post(path, {}, op="")) == (1001, "ArgsError", "header must have operationID")


def test_token_header_required_except_for_get_admin_token(api: Api) -> None:
    assert error(api.post("/user/get_users_status", {"userIDs": ["u1001"]}, token="")) == \
        (1001, "ArgsError", "header must have token")
    assert api.post("/auth/get_admin_token", {"secret": "openIM123", "userID": "imAdmin"},
                    token="").json()["errCode"] == 0


def test_malformed_and_foreign_tokens(api: Api) -> None:
    assert error(api.post("/user/get_users_status", {"userIDs": ["u1001"]}, token="not-a-jwt"))[:2] == \
        (1503, "TokenMalformedError")
    head, claims, _ = api.token.split(".")
    foreign = hmac.new(b"another-secret", f"{head}.{claims}".encode(), hashlib.sha256).digest()
    token = f"{head}.{claims}.{base64.urlsafe_b64encode(foreign).rstrip(b'=').decode()}"
    assert error(api.post("/user/get_users_status", {"userIDs": ["u1001"]}, token=token)) == \
        (1505, "signature is invalid", "")


def test_expire_tokens_then_a_fresh_token_works(fake: FakeOpenIM, api: Api) -> None:
    old = api.token
    fake.expire_tokens()
    assert error(api.post("/msg/send_msg", custom_msg())) == (1501, "TokenExpiredError", "")
    api.login()
    assert api.ok("/msg/send_msg", custom_msg())["serverMsgID"]
    assert error(api.post("/msg/send_msg", custom_msg(), token=old))[0] == 1501


def test_revoke_tokens_answers_token_not_exist(fake: FakeOpenIM, api: Api) -> None:
    fake.revoke_tokens()
    assert error(api.post("/user/account_check", {"checkUserIDs": ["u1001"]})) == (1507, "TokenNotExistError", "")


def test_main_revokes_older_admin_tokens_five_minutes_after_a_new_one() -> None:
    clock = Clock()
    with FakeOpenIM(users=USERS, clock=clock) as fake:
        api = Api(fake)
        first, second = api.login(), api.login()
        assert api.ok("/user/get_users_status", {"userIDs": ["u1001"]}, token=first)
        clock.now += 301
        assert error(api.post("/user/get_users_status", {"userIDs": ["u1001"]}, token=first))[0] == 1507
        assert api.ok("/user/get_users_status", {"userIDs": ["u1001"]}, token=second)
        clock.now += 90 * 86400
        assert error(api.post("/user/get_users_status", {"userIDs": ["u1001"]}, token=second))[0] == 1501


def test_v383_does_not_rotate_admin_tokens() -> None:
    clock = Clock()
    with FakeOpenIM(users=USERS, clock=clock, flavor="v3.8.3") as fake:
        api = Api(fake)
        first = api.login()
        api.login()
        clock.now += 3600
        assert api.ok("/user/get_users_status", {"userIDs": ["u1001"]}, token=first)


def test_admin_routes_refuse_a_users_token(fake: FakeOpenIM, api: Api) -> None:
    fake.set_online("u1001", [1])
    [status] = api.ok("/user/get_users_online_status", {"userIDs": ["u1001"]})
    user_token = status["detailPlatformStatus"][0]["token"]
    assert error(api.post("/msg/send_msg", custom_msg(), token=user_token)) == \
        (1002, "NoPermissionError", "only app manager can send message")
    assert error(api.post("/user/account_check", {"checkUserIDs": ["u2002"]}, token=user_token)) == \
        (1002, "NoPermissionError", "user u1001 is not admin userID")
    assert api.ok("/user/get_users_status", {"userIDs": ["u2002"]}, token=user_token)


def test_unknown_routes_and_methods_are_gins_404(api: Api, fake: FakeOpenIM) -> None:
    for response in (api.post("/msg/nope", {}), api.session.get(fake.url + "/msg/send_msg")):
        assert response.status_code == 404
        assert response.text == "404 page not found"
        assert response.headers["Content-Type"] == "text/plain"


def test_answers_are_gzipped_only_for_clients_that_accept_gzip(fake: FakeOpenIM, api: Api) -> None:
    assert api.post("/user/get_users_status", {"userIDs": ["u1001"]}).headers["Content-Encoding"] == "gzip"
    connection = http.client.HTTPConnection("127.0.0.1", int(fake.url.rsplit(":", 1)[1]), timeout=5)
    connection.request("POST", "/user/get_users_status", json.dumps({"userIDs": ["u1001"]}),
                       {"operationID": "op-plain", "token": api.token})
    response = connection.getresponse()
    assert response.getheader("Content-Encoding") is None
    assert json.loads(response.read())["data"]["statusList"][0]["userID"] == "u1001"
    connection.close()


def test_every_request_is_recorded(fake: FakeOpenIM, api: Api) -> None:
    api.post("/msg/send_msg", raw=b"{broken", op="op-x")
    api.post("/no/where", {"a": 1})
    [call] = fake.calls_to("/msg/send_msg")
    assert (call.operation_id, call.token, call.body) == ("op-x", api.token, None)
    assert call.at == pytest.approx(time.time(), abs=5)
    assert [c.endpoint for c in fake.calls] == ["/auth/get_admin_token", "/msg/send_msg", "/no/where"]
    assert fake.calls[-1].body == {"a": 1}


# ── /msg/send_msg, /msg/check_msg_is_send_success ──────────────────────────────
def test_send_msg_to_a_user(fake: FakeOpenIM, api: Api) -> None:
    data = api.ok("/msg/send_msg", custom_msg(ex="x"), op="op-send")
    assert list(data) == ["serverMsgID", "clientMsgID", "sendTime"]
    assert all(len(data[k]) == 32 for k in ("serverMsgID", "clientMsgID"))
    [sent] = fake.deliveries_to(user="u1001")
    assert (sent.endpoint, sent.session_type, sent.content_type, sent.send_id, sent.msg_from) == \
        ("/msg/send_msg", 1, 110, "imAdmin", 200)
    assert (sent.server_msg_id, sent.client_msg_id, sent.send_time) == \
        (data["serverMsgID"], data["clientMsgID"], data["sendTime"])
    assert (sent.content, sent.options) == (CUSTOM, {"offlinePush": False})
    assert (sent.operation_id, sent.ex, sent.sender_platform_id) == ("op-send", "x", 10)
    assert sent.key is None and sent.reliability_level is None


def test_send_msg_to_a_group(fake: FakeOpenIM, api: Api) -> None:
    body = custom_msg(sessionType=3, groupID="g_ops", isOnlineOnly=True)
    del body["recvID"]
    api.ok("/msg/send_msg", body)
    [sent] = fake.deliveries_to(group="g_ops")
    assert (sent.session_type, sent.recv_id, sent.options["history"]) == (3, "", False)


@pytest.mark.parametrize(("fields", "detail"), [
    ({"recvID": "ghost"}, "userID not found"),
    ({"sessionType": 3, "groupID": "g_ghost"}, ""),
    ({"sessionType": 2, "groupID": "g_ops"}, None),
])
def test_send_msg_target_errors(fake: FakeOpenIM, api: Api, fields: dict[str, Any], detail: str | None) -> None:
    expected = (1001, "ArgsError", "unknown sessionType") if detail is None else (1004, "RecordNotFoundError", detail)
    assert error(api.post("/msg/send_msg", custom_msg(**fields))) == expected
    assert fake.delivered == []


@pytest.mark.parametrize(("raw", "detail"), [
    (b"", "EOF"),
    (b'{"sendID":', "unexpected EOF"),
    (b'{"sendID":}', "invalid character '}' looking for beginning of value"),
    (json.dumps(custom_msg(content="text")).encode(),
     "json: cannot unmarshal string into Go struct field SendMsgReq.content of type map[string]interface {}"),
    (json.dumps(custom_msg(sessionType=1.5)).encode(),
     "json: cannot unmarshal number 1.5 into Go struct field SendMsgReq.sessionType of type int32"),
    (json.dumps(custom_msg(recvID="")).encode(),
     "Key: 'SendMsgReq.RecvID' Error:Field validation for 'RecvID' failed on the 'required_if' tag"),
    (b"{}", "\n".join(f"Key: 'SendMsgReq.SendMsg.{f}' Error:Field validation for '{f}' failed on the 'required' tag"
                      for f in ("SendID", "Content", "ContentType", "SessionType"))),
])
def test_send_msg_bind_errors_are_http_400(api: Api, raw: bytes, detail: str) -> None:
    response = api.post("/msg/send_msg", raw=raw)
    assert error(response, 400) == (1001, "ArgsError", detail)
    assert response.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(("content", "detail"), [
    ({"description": "d"}, "Key: 'CustomElem.Data' Error:Field validation for 'Data' failed on the 'required' tag"),
    ({"data": ""}, "Key: 'CustomElem.Data' Error:Field validation for 'Data' failed on the 'required' tag"),
    ({"data": {"a": 1}}, "1 error(s) decoding:\n\n* 'data' expected type 'string', "
                         "got unconvertible type 'map[string]interface {}', value: 'map[a:1]'"),
])
def test_custom_content_failures_are_error_500(fake: FakeOpenIM, api: Api, content: dict[str, Any],
                                               detail: str) -> None:
    assert error(api.post("/msg/send_msg", custom_msg(content=content))) == (500, "ServerInternalError", detail)
    assert fake.delivered == []


def test_weakly_decoded_content_is_stored_as_sent(fake: FakeOpenIM, api: Api) -> None:
    api.ok("/msg/send_msg", custom_msg(content={"data": 42, "zzz": [1]}))
    assert fake.delivered[0].content == {"data": 42, "zzz": [1]}


@pytest.mark.parametrize("content_type", [119, 120, 2001])
def test_send_msg_rejects_other_content_types(api: Api, content_type: int) -> None:
    assert error(api.post("/msg/send_msg", custom_msg(contentType=content_type))) == (1001, "ArgsError", "")


def test_check_msg_is_send_success_by_operation_id(api: Api) -> None:
    api.ok("/msg/send_msg", custom_msg(), op="op-sent")
    api.post("/msg/send_msg", custom_msg(recvID="ghost"), op="op-failed")
    assert api.ok("/msg/check_msg_is_send_success", {}, op="op-sent") == {"status": 2}
    assert api.ok("/msg/check_msg_is_send_success", {}, op="op-failed") == {"status": 0}


# ── /msg/batch_send_msg ────────────────────────────────────────────────────────
def test_batch_reports_unknown_users_in_failed_user_ids(fake: FakeOpenIM, api: Api) -> None:
    body = {**custom_msg(), "recvIDs": ["u1001", "ghost", "u2002"]}
    del body["recvID"]
    data = api.ok("/msg/batch_send_msg", body)
    assert data["failedUserIDs"] == ["ghost"]
    assert [r["recvID"] for r in data["results"]] == ["u1001", "u2002"]
    assert list(data["results"][0]) == ["serverMsgID", "clientMsgID", "sendTime", "recvID"]
    assert len({r["clientMsgID"] for r in data["results"]}) == 1
    assert len({r["serverMsgID"] for r in data["results"]}) == 2
    assert [d.recv_id for d in fake.delivered] == ["u1001", "u2002"]


def test_batch_empty_lists_are_null(api: Api) -> None:
    body = {**custom_msg(), "recvIDs": ["ghost"]}
    assert api.ok("/msg/batch_send_msg", body) == {"results": None, "failedUserIDs": ["ghost"]}
    assert api.ok("/msg/batch_send_msg", {**body, "recvIDs": ["u1001"]})["failedUserIDs"] is None
    assert api.ok("/msg/batch_send_msg", {**body, "recvIDs": []}) == {"results": None, "failedUserIDs": None}


def test_batch_needs_a_recv_ids_array(api: Api) -> None:
    assert error(api.post("/msg/batch_send_msg", custom_msg()), 400) == (
        1001, "ArgsError", "Key: 'BatchSendMsgReq.RecvIDs' Error:Field validation for 'RecvIDs' failed on the "
                           "'required' tag")


# ── /msg/send_business_notification ────────────────────────────────────────────
def test_business_notification_to_users_even_unknown_ones(fake: FakeOpenIM, api: Api) -> None:
    data = api.ok("/msg/send_business_notification", notification(recvUserID="u1001", reliabilityLevel=2))
    assert list(data) == ["serverMsgID", "clientMsgID", "sendTime"]
    api.ok("/msg/send_business_notification", notification(recvUserID="nobody"))
    first, second = fake.delivered
    assert (first.session_type, first.content_type, first.key) == (1, 2001, "order.paid")
    assert first.data == '{"orderId":"A1"}'
    assert first.content == {"detail": '{"key":"order.paid","data":"{\\"orderId\\":\\"A1\\"}"}'}
    assert (first.reliability_level, first.options["history"]) == (2, True)
    assert first.options["isNotNotification"] is False      # an n_ conversation
    assert (second.recv_id, second.reliability_level, second.options["history"]) == ("nobody", 1, False)
    assert api.ok("/msg/check_msg_is_send_success", {}, op=first.operation_id) == {"status": 0}


def test_business_notification_to_a_group_on_main(fake: FakeOpenIM, api: Api) -> None:
    api.ok("/msg/send_business_notification", notification(recvGroupID="g_ops", sendMsg=True))
    [sent] = fake.deliveries_to(group="g_ops")
    assert (sent.session_type, sent.options["isSendMsg"]) == (3, True)
    assert error(api.post("/msg/send_business_notification", notification(recvGroupID="g_ghost"))) == \
        (1004, "RecordNotFoundError", "")


@pytest.mark.parametrize(("fields", "detail"), [
    ({}, "recvUserID and recvGroupID cannot be empty at the same time"),
    ({"recvUserID": "u1001", "recvGroupID": "g_ops"}, "recvUserID and recvGroupID cannot be set at the same time"),
])
def test_business_notification_needs_exactly_one_target(api: Api, fields: dict[str, str], detail: str) -> None:
    assert error(api.post("/msg/send_business_notification", notification(**fields))) == (1001, "ArgsError", detail)


def test_business_notification_data_must_be_a_string(api: Api) -> None:
    response = api.post("/msg/send_business_notification", notification(recvUserID="u1001", data={"a": 1}))
    assert error(response, 400) == (
        1001, "ArgsError", "json: cannot unmarshal object into Go struct field .data of type string")


def test_v383_refuses_a_group_business_notification(old_fake: FakeOpenIM) -> None:
    api = Api(old_fake)
    api.login()
    response = api.post("/msg/send_business_notification", notification(recvGroupID="g_ops"))
    assert error(response, 400) == (
        1001, "ArgsError", "Key: 'RecvUserID' Error:Field validation for 'RecvUserID' failed on the 'required' tag")
    assert old_fake.delivered == []


def test_v383_business_notification_is_online_only_and_answers_modify_null(old_fake: FakeOpenIM) -> None:
    api = Api(old_fake)
    api.login()
    data = api.ok("/msg/send_business_notification", notification(recvUserID="u1001", reliabilityLevel=2))
    assert list(data) == ["serverMsgID", "clientMsgID", "sendTime", "modify"] and data["modify"] is None
    assert api.ok("/msg/send_msg", custom_msg())["modify"] is None
    sent = old_fake.delivered[0]
    assert (sent.reliability_level, sent.options["history"]) == (1, False)


# ── users, presence, groups ────────────────────────────────────────────────────
def test_account_check(api: Api) -> None:
    assert api.ok("/user/account_check", {"checkUserIDs": ["u1001", "ghost"]}) == {"results": [
        {"userID": "u1001", "accountStatus": 1}, {"userID": "ghost", "accountStatus": 0}]}
    assert error(api.post("/user/account_check", {"checkUserIDs": ["u1001", "u1001"]})) == \
        (1001, "ArgsError", "userID repeated")
    assert error(api.post("/user/account_check", {"checkUserIDs": []})) == \
        (1001, "ArgsError", "CheckUserIDs is empty")


def test_a2r_endpoints_answer_bad_json_with_http_200(api: Api) -> None:
    response = api.post("/user/account_check", raw=b"[1]")
    assert error(response) == (1001, "json: cannot unmarshal array into Go value of type user.AccountCheckReq", "")


def test_get_users_info_leaves_out_missing_users(api: Api) -> None:
    [info] = api.ok("/user/get_users_info", {"userIDs": ["ghost", "u1001"]})["usersInfo"]
    assert (info["userID"], info["appMangerLevel"]) == ("u1001", 0)
    assert set(info) == {"userID", "nickname", "faceURL", "ex", "createTime", "appMangerLevel", "globalRecvMsgOpt"}
    assert api.ok("/user/get_users_info", {"userIDs": ["ghost"]}) == {"usersInfo": None}


def test_online_status_is_an_array_with_platform_detail(fake: FakeOpenIM, api: Api) -> None:
    fake.set_online("u1001", [1, 5])
    online, offline = api.ok("/user/get_users_online_status", {"userIDs": ["u1001", "u2002"]})
    assert (online["status"], [d["platformID"] for d in online["detailPlatformStatus"]]) == (1, [1, 5])
    assert set(online["detailPlatformStatus"][0]) == {"platformID", "connID", "isBackground", "token"}
    assert offline == {"userID": "u2002", "status": 0, "detailPlatformStatus": None}
    assert api.ok("/user/get_users_online_status", {"userIDs": []}) is None
    fake.set_online("u1001", [])
    assert api.ok("/user/get_users_online_status", {"userIDs": ["u1001"]})[0]["status"] == 0


def test_get_users_status(fake: FakeOpenIM, api: Api) -> None:
    fake.set_online("u2002", [2])
    assert api.ok("/user/get_users_status", {"userID": "imAdmin", "userIDs": ["u1001", "u2002"]}) == {"statusList": [
        {"userID": "u1001", "status": 0, "platformIDs": None}, {"userID": "u2002", "status": 1, "platformIDs": [2]}]}
    assert error(api.post("/user/get_users_status", {"userIDs": []})) == (1001, "ArgsError", "UserIDs is empty")


def test_get_group_member_user_id(fake: FakeOpenIM, api: Api) -> None:
    assert api.ok("/group/get_group_member_user_id", {"groupID": "g_ops"}) == {"userIDs": ["u1001", "u2002"]}
    # The real server finds no members for an unknown group and answers success.
    assert api.ok("/group/get_group_member_user_id", {"groupID": "g_ghost"}) == {"userIDs": None}
    assert error(api.post("/group/get_group_member_user_id", {})) == (1001, "ArgsError", "GroupID is empty")


# ── faults ─────────────────────────────────────────────────────────────────────
def test_fail_next_answers_an_error_envelope_once(fake: FakeOpenIM, api: Api) -> None:
    fake.fail_next("/msg/send_msg", err_code=1501)
    assert error(api.post("/msg/send_msg", custom_msg())) == (1501, "TokenExpiredError", "")
    assert fake.delivered == [] and len(fake.calls_to("/msg/send_msg")) == 1
    api.ok("/msg/send_msg", custom_msg())
    fake.fail_next("msg/send_msg", err_code=5001, err_msg="blocked", err_dlt="policy X")
    assert error(api.post("/msg/send_msg", custom_msg())) == (5001, "blocked", "policy X")


def test_fail_next_raw_bodies_and_counts(fake: FakeOpenIM, api: Api) -> None:
    fake.fail_next("/msg/send_msg", times=2, http_status=502, body=b"502 Bad Gateway")
    for _ in range(2):
        response = api.post("/msg/send_msg", custom_msg())
        assert (response.status_code, response.text) == (502, "502 Bad Gateway")
    fake.fail_next("/msg/send_msg", http_status=500)
    assert error(api.post("/msg/send_msg", custom_msg()), 500) == (500, "ServerInternalError", "")
    api.ok("/msg/send_msg", custom_msg())
    assert len(fake.delivered) == 1


def test_delay_before_processing_times_the_client_out_then_handles_the_request(fake: FakeOpenIM, api: Api) -> None:
    fake.delay_next("/msg/send_msg", 0.6)
    with pytest.raises(requests.Timeout):
        api.post("/msg/send_msg", custom_msg(), op="op-slow", timeout=0.15)
    assert fake.delivered == []
    assert wait_for(lambda: len(fake.delivered) == 1)


def test_delay_after_processing_accepts_the_message_first(fake: FakeOpenIM, api: Api) -> None:
    fake.delay_next("/msg/send_msg", 0.6, after_processing=True)
    with pytest.raises(requests.Timeout):
        api.post("/msg/send_msg", custom_msg(), op="op-lost-answer", timeout=0.15)
    assert [d.operation_id for d in fake.delivered] == ["op-lost-answer"]
    assert Api(fake).ok("/msg/check_msg_is_send_success", {}, token=api.token, op="op-lost-answer") == {"status": 2}


def test_a_delayed_request_does_not_block_others(fake: FakeOpenIM, api: Api) -> None:
    fake.delay_next("/msg/send_msg", 0.8)
    slow = threading.Thread(target=lambda: Api(fake).post("/msg/send_msg", custom_msg(), token=api.token))
    slow.start()
    assert wait_for(lambda: len(fake.calls_to("/msg/send_msg")) == 1)
    started = time.monotonic()
    api.ok("/user/get_users_status", {"userIDs": ["u1001"]})
    assert time.monotonic() - started < 0.5
    slow.join(timeout=5)


def test_refuse_and_accept_connections_on_the_same_port(fake: FakeOpenIM, api: Api) -> None:
    url = fake.url
    api.ok("/msg/send_msg", custom_msg())       # leaves a keep-alive connection in the session
    fake.refuse_connections()
    for client in (api.session, requests):
        with pytest.raises(requests.ConnectionError):
            client.post(url + "/msg/send_msg", json=custom_msg(), timeout=2)
    fake.accept_connections()
    assert fake.url == url
    api.ok("/msg/send_msg", custom_msg())
    assert len(fake.delivered) == 2


def test_stop_closes_the_port() -> None:
    fake = FakeOpenIM().start()
    url = fake.url
    fake.stop()
    with pytest.raises(requests.ConnectionError):
        requests.post(url + "/auth/get_admin_token", json={}, timeout=2)


# ── callbacks ──────────────────────────────────────────────────────────────────
class Receiver:
    """A tiny webhook receiver on loopback that records what it was sent."""

    def __init__(self, reply: bytes = json.dumps(ALLOW).encode(), gate: threading.Event | None = None) -> None:
        received: list[dict[str, Any]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append({"path": self.path, "headers": self.headers, "body": body})
                if gate is not None:  # a receiver that answers once the test lets it (bounded)
                    gate.wait(30)
                self.send_response(200)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.received, self.server = received, ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/openim/callback/tok"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


COMMON_KEYS = ["sendID", "callbackCommand", "serverMsgID", "clientMsgID", "operationID", "senderPlatformID",
               "senderNickname", "sessionType", "msgFrom", "contentType", "status", "sendTime", "createTime",
               "content", "seq", "atUserList", "faceURL", "ex"]


def test_post_callback_after_send_single_msg(fake: FakeOpenIM, api: Api, receiver: Receiver) -> None:
    api.ok("/msg/send_msg", custom_msg(senderNickname="System"), op="op-cb")
    payload = fake.after_send_single_msg(fake.delivered[0])
    assert list(payload) == [*COMMON_KEYS, "recvID"]
    assert json.loads(payload["content"]) == CUSTOM and payload["content"].startswith('{"data":')
    assert (payload["seq"], payload["status"], payload["msgFrom"], payload["atUserList"]) == (0, 0, 200, None)
    status, reply = fake.post_callback(receiver.url, "callbackAfterSendSingleMsgCommand", payload)
    assert (status, reply) == (200, ALLOW)
    [sent] = receiver.received
    url = urlsplit(sent["path"])
    assert url.path == "/openim/callback/tok/callbackAfterSendSingleMsgCommand"
    [key] = parse_qs(url.query)["key"]
    assert json.loads(base64.b64decode(key)) == {"sendID": "imAdmin", "recvID": "u1001", "groupID": ""}
    assert "%3D" in url.query or "=" not in key      # the base64 is query-escaped
    assert sent["headers"]["Content-Type"] == "application/json; charset=utf-8"
    assert sent["headers"]["operationID"] == "op-cb"
    assert sent["body"].endswith(b"}\n") and json.loads(sent["body"]) == payload


def test_post_callback_without_query_on_v383_and_for_other_commands(old_fake: FakeOpenIM,
                                                                    receiver: Receiver) -> None:
    receipt = old_fake.receipt_message("u1001", "imAdmin", {"id": "m1", "status": "done"})
    payload = old_fake.after_send_single_msg(receipt)
    old_fake.post_callback(receiver.url, "callbackAfterSendSingleMsgCommand", payload)
    old_fake.post_callback(receiver.url, "callbackAfterUserOnlineCommand", old_fake.user_online("u1001"))
    assert [r["path"] for r in receiver.received] == ["/openim/callback/tok/callbackAfterSendSingleMsgCommand",
                                                      "/openim/callback/tok/callbackAfterUserOnlineCommand"]
    assert receiver.received[1]["headers"]["operationID"].startswith("p_")


def test_post_callback_returns_none_for_a_non_json_reply(fake: FakeOpenIM) -> None:
    server = Receiver(reply=b"ok")
    try:
        payload = fake.user_offline("u1")
        assert fake.post_callback(server.url, "callbackAfterUserOfflineCommand", payload) == (200, None)
    finally:
        server.close()


def test_group_and_save_db_payloads(fake: FakeOpenIM, api: Api, receiver: Receiver) -> None:
    body = custom_msg(sessionType=3, groupID="g_ops")
    api.ok("/msg/send_msg", body)
    [sent] = fake.delivered
    group = fake.after_send_group_msg(sent)
    assert list(group) == [*COMMON_KEYS, "groupID"] and group["groupID"] == "g_ops"
    saved = fake.after_msg_save_db(sent, seq=17)
    assert list(saved) == [*COMMON_KEYS, "recvID", "groupID"] and saved["seq"] == 17
    fake.post_callback(receiver.url, "callbackAfterMsgSaveDBCommand", saved)
    [key] = parse_qs(urlsplit(receiver.received[0]["path"]).query)["key"]
    assert json.loads(base64.b64decode(key)) == {"sendID": "imAdmin", "recvID": "u1001", "groupID": "g_ops"}


def test_presence_and_read_payloads(fake: FakeOpenIM) -> None:
    online = fake.user_online("u1001", 5, seq=123)
    assert list(online) == ["callbackCommand", "operationID", "platformID", "platform", "userID", "seq",
                            "isAppBackground", "connID"]
    assert (online["callbackCommand"], online["platform"], online["seq"]) == \
        ("callbackAfterUserOnlineCommand", "Web", 123)
    offline = fake.user_offline("u1001", 1)
    assert (offline["callbackCommand"], offline["platform"], "isAppBackground" in offline) == \
        ("callbackAfterUserOfflineCommand", "IOS", False)
    assert fake.single_msg_read("u1001", "si_imAdmin_u1001", [16, 17]) == {
        "callbackCommand": "callbackAfterSingleMsgReadCommand", "conversationID": "si_imAdmin_u1001",
        "userID": "u1001", "Seqs": [16, 17], "contentType": 1}
    assert fake.group_msg_read("u1001", 42) == {"callbackCommand": "callbackAfterGroupMsgReadCommand",
                                                "sendID": "u1001", "receiveID": "u1001", "unreadMsgNum": 42,
                                                "contentType": 3}


def test_receipt_message_is_a_users_custom_message(fake: FakeOpenIM) -> None:
    receipt = fake.receipt_message("u1001", "imAdmin", {"id": "m1", "status": "done"})
    assert fake.deliveries_to(user="imAdmin") == [receipt]
    assert json.loads(receipt.content["data"]) == {"receipt": {"id": "m1", "status": "done"}}
    payload = fake.after_send_single_msg(receipt)
    assert (payload["msgFrom"], payload["senderPlatformID"], payload["contentType"], payload["sessionType"]) == \
        (100, 1, 110, 1)
    assert (payload["sendID"], payload["recvID"], payload["status"]) == ("u1001", "imAdmin", 1)
    assert fake.after_msg_save_db(receipt, 3)["status"] == 2


# ── the after-hook transport: 2 workers, 100 slots, a blocking push, a timeout per hook ─────
def wait_until(condition: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition()


def test_after_hooks_hold_100_behind_2_workers_and_then_block_and_drop(fake: FakeOpenIM) -> None:
    gate = threading.Event()
    server = Receiver(gate=gate)
    try:
        hooks = fake.after_hooks(server.url, push_wait=0.2)
        payloads = [fake.user_online(f"u{n}", 1, seq=n) for n in range(103)]
        assert hooks.push("callbackAfterUserOnlineCommand", payloads[0])
        assert hooks.push("callbackAfterUserOnlineCommand", payloads[1])
        wait_until(lambda: len(server.received) == 2)  # both workers wait for the receiver's answer
        assert all(hooks.push("callbackAfterUserOnlineCommand", p) for p in payloads[2:102])
        assert (hooks.depth, hooks.blocked, hooks.dropped) == (100, 0, 0)
        # the 103rd caller finds every slot taken: it waits push_wait (3 s in OpenIM), then the hook is lost
        assert not hooks.push("callbackAfterUserOnlineCommand", payloads[102])
        assert (hooks.pushed, hooks.blocked, hooks.dropped) == (102, 1, 1)
        gate.set()
        assert hooks.join()
        assert [(r.status, r.reply) for r in hooks.results] == [(200, ALLOW)] * 102
        assert sorted(json.loads(r["body"])["userID"] for r in server.received) == sorted(
            p["userID"] for p in payloads[:102])
        hooks.close()
    finally:
        gate.set()
        server.close()


def test_after_hooks_give_up_on_a_receiver_slower_than_the_hook_timeout(fake: FakeOpenIM) -> None:
    gate = threading.Event()
    server = Receiver(gate=gate)
    try:
        hooks = fake.after_hooks(server.url, timeout=0.2)
        assert hooks.push("callbackAfterUserOfflineCommand", fake.user_offline("u1"))
        assert hooks.join()
        [result] = hooks.results
        assert (result.status, result.error) == (None, "ReadTimeout")  # logged by OpenIM, never retried
    finally:
        gate.set()
        server.close()


@pytest.mark.parametrize("flavor", ["main", "v3.8.3"])
def test_fire_hooks_posts_what_openim_fires_for_each_accepted_message(flavor: str) -> None:
    server = Receiver()
    try:
        with FakeOpenIM(users=USERS, flavor=flavor) as fake:
            client = Api(fake)
            client.login()
            hooks = fake.fire_hooks(server.url)
            sent = client.ok("/msg/send_msg", custom_msg())
            client.ok("/msg/send_business_notification", notification(recvUserID="u1001"))  # 2001: none
            assert hooks.join()
            fired = sorted((r.command, r.payload.get("seq")) for r in hooks.results)
    finally:
        server.close()
    expected = [("callbackAfterSendSingleMsgCommand", 0)]
    if flavor == "main":  # msgtransfer's hook, with the stored message's seq; v3.8.x has none
        expected.insert(0, ("callbackAfterMsgSaveDBCommand", 1))
    assert fired == expected
    assert all(r.payload["serverMsgID"] == sent["serverMsgID"] for r in hooks.results)
