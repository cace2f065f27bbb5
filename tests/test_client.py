"""``openim_bizplugin.client.BizClient`` against a faked sidecar (``responses``)."""

from __future__ import annotations

import json
from urllib.parse import unquote

import pytest
import requests
import responses

from openim_bizplugin.client import BizAPIError, BizClient, BizClientError, BizConnectionError
from openim_bizplugin.signing import RequestVerifier

BASE = "http://127.0.0.1:8080"
SECRET = "client-test-secret-0123456789"
PROBLEM_JSON = "application/problem+json"
ACCEPTED = {"id": "01a2187b0b3bb5f4d05792a9ebb075b0", "status": "queued", "recipients": 2}


@pytest.fixture
def sidecar():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def client() -> BizClient:
    return BizClient(BASE + "/", "crm", SECRET)


def capture(sidecar: responses.RequestsMock, method: str, url: str, status: int, answer: object):
    """Register *url*; returns the list the sent requests are appended to."""
    seen: list[requests.PreparedRequest] = []

    def reply(request: requests.PreparedRequest):
        seen.append(request)
        return status, {"Content-Type": "application/json"}, json.dumps(answer)

    sidecar.add_callback(method, url, callback=reply)
    return seen


def verify(request: requests.PreparedRequest) -> None:
    """The request's signature checks out for exactly the method, path and bytes sent."""
    body = request.body or b""
    body = body.encode() if isinstance(body, str) else body
    assert request.headers["X-Biz-Client"] == "crm"
    RequestVerifier({"crm": [SECRET]}).verify(
        request.headers["X-Biz-Client"], request.headers["X-Biz-Signature"], request.method,
        request.path_url, body)


def test_send_posts_a_signed_envelope(sidecar, client):
    seen = capture(sidecar, "POST", BASE + "/v1/messages", 202, ACCEPTED)
    answer = client.send("profile.updated", 1, {"fields": ["nickname"]}, users=["u1", "u2"],
                         priority="high", idempotency_key="k-1", ttl_seconds=60)
    assert answer == ACCEPTED
    (request,) = seen
    verify(request)
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.body) == {
        "type": "profile.updated", "version": 1, "data": {"fields": ["nickname"]},
        "to": {"users": ["u1", "u2"]}, "priority": "high", "idempotency_key": "k-1", "ttl_seconds": 60}


def test_send_to_groups_leaves_unset_options_out(sidecar, client):
    seen = capture(sidecar, "POST", BASE + "/v1/messages", 202, ACCEPTED)
    client.send("order.status_changed", 1, {"order_id": "1"}, groups=["g1"])
    assert json.loads(seen[0].body) == {"type": "order.status_changed", "version": 1,
                                        "data": {"order_id": "1"}, "to": {"groups": ["g1"]}}


def test_status_signs_the_percent_encoded_path(sidecar, client):
    message_id = "odd id/with?chars"
    seen = capture(sidecar, "GET", BASE + "/v1/messages/odd%20id%2Fwith%3Fchars", 200, {"id": message_id})
    assert client.status(message_id) == {"id": message_id}
    (request,) = seen
    verify(request)
    assert unquote(request.path_url.rsplit("/", 1)[1]) == message_id


def test_types_returns_the_list(sidecar, client):
    types = [{"type": "profile.updated", "version": 1, "schema": {}, "defaults": {}, "deprecated": False}]
    seen = capture(sidecar, "GET", BASE + "/v1/types", 200, {"types": types})
    assert client.types() == types
    verify(seen[0])


@pytest.mark.parametrize("recipients", [{}, {"users": ["u1"], "groups": ["g1"]}], ids=["none", "both"])
def test_send_needs_exactly_one_of_users_or_groups(sidecar, client, recipients):
    with pytest.raises(ValueError):
        client.send("profile.updated", 1, {"fields": ["ex"]}, **recipients)
    assert len(sidecar.calls) == 0


def test_a_problem_answer_raises_with_its_details(sidecar, client):
    problem = {"type": "https://openim-bizplugin.dev/problems/invalid", "status": 422,
               "title": "Message does not match its schema or envelope",
               "detail": "data does not match profile.updated v1",
               "errors": [{"path": "/data/fields/0", "message": "'shoe size' is not one of [...]"}]}
    sidecar.add("POST", BASE + "/v1/messages", status=422, json=problem, content_type=PROBLEM_JSON)
    with pytest.raises(BizAPIError) as raised:
        client.send("profile.updated", 1, {"fields": ["shoe size"]}, users=["u1"])
    error = raised.value
    assert (error.status, error.title, error.detail) == (422, problem["title"], problem["detail"])
    assert error.errors == problem["errors"]
    assert "422" in str(error) and problem["detail"] in str(error) and "/data/fields/0" in str(error)


def test_a_non_json_error_answer_still_raises_a_readable_api_error(sidecar, client):
    sidecar.add("GET", BASE + "/v1/types", status=502, body="<html>upstream went away</html>",
                content_type="text/html")
    with pytest.raises(BizAPIError) as raised:
        client.types()
    assert raised.value.status == 502
    assert "502" in str(raised.value)
    assert "upstream went away" in str(raised.value)


def test_retry_after_is_carried_on_429(sidecar, client):
    problem = {"type": "https://openim-bizplugin.dev/problems/rate-limited", "status": 429,
               "title": "Too many requests", "detail": "over 50/second"}
    sidecar.add("POST", BASE + "/v1/messages", status=429, json=problem, content_type=PROBLEM_JSON,
                headers={"Retry-After": "7"})
    with pytest.raises(BizAPIError) as raised:
        client.send("profile.updated", 1, {"fields": ["ex"]}, users=["u1"])
    assert raised.value.status == 429
    assert str(raised.value.retry_after) == "7"


@pytest.mark.parametrize("failure", [requests.ConnectionError("refused"), requests.Timeout("slow")],
                         ids=["refused", "timeout"])
def test_unreachable_sidecar_raises_connection_error(sidecar, client, failure):
    sidecar.add("GET", BASE + "/v1/messages/abc", body=failure)
    with pytest.raises(BizConnectionError) as raised:
        client.status("abc")
    assert isinstance(raised.value, BizClientError)
    assert BASE in str(raised.value)
    assert isinstance(raised.value.__cause__, requests.RequestException)
