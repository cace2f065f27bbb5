"""``openim_bizplugin.client.BizClient`` against a faked sidecar (``responses``)."""

from __future__ import annotations

import json
import re
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
def waits() -> list[float]:
    """The seconds the client asked to sleep between tries (it never really sleeps here)."""
    return []


@pytest.fixture
def client(waits) -> BizClient:
    return BizClient(BASE + "/", "crm", SECRET, sleep=waits.append)


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
    sent = json.loads(seen[0].body)
    assert re.fullmatch(r"bizclient-[0-9a-f]{32}", sent.pop("idempotency_key"))  # always one: see the retries
    assert sent == {"type": "order.status_changed", "version": 1, "data": {"order_id": "1"}, "to": {"groups": ["g1"]}}


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


def test_retry_after_is_carried_on_429(sidecar, client, waits):
    problem = {"type": "https://openim-bizplugin.dev/problems/rate-limited", "status": 429,
               "title": "Too many requests", "detail": "over 50/second"}
    sidecar.add("POST", BASE + "/v1/messages", status=429, json=problem, content_type=PROBLEM_JSON,
                headers={"Retry-After": "7"})
    with pytest.raises(BizAPIError) as raised:
        client.send("profile.updated", 1, {"fields": ["ex"]}, users=["u1"])
    assert raised.value.status == 429
    assert str(raised.value.retry_after) == "7"
    assert len(sidecar.calls) == 3 and waits[0] >= 7 and waits[1] >= 7  # three tries, as asked


@pytest.mark.parametrize("failure", [requests.ConnectionError("refused"), requests.Timeout("slow")],
                         ids=["refused", "timeout"])
def test_unreachable_sidecar_raises_connection_error(sidecar, client, failure):
    sidecar.add("GET", BASE + "/v1/messages/abc", body=failure)  # every try fails
    with pytest.raises(BizConnectionError) as raised:
        client.status("abc")
    assert isinstance(raised.value, BizClientError)
    assert BASE in str(raised.value)
    assert isinstance(raised.value.__cause__, requests.RequestException)


# --- retries ----------------------------------------------------------------------------------


def problem_reply(status: int, retry_after: str | None = None) -> dict:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return {"status": status, "json": {"status": status, "title": "busy"}, "content_type": PROBLEM_JSON,
            "headers": headers}


def sent_keys(sidecar: responses.RequestsMock) -> list[str]:
    return [json.loads(call.request.body)["idempotency_key"] for call in sidecar.calls]


@pytest.mark.parametrize("first", [problem_reply(503, "2"), problem_reply(429, "2"), problem_reply(409),
                                   problem_reply(502), {"body": requests.ConnectionError("reset by peer")},
                                   {"body": requests.ReadTimeout("no answer in 10 s")}],
                         ids=["503", "429", "409", "502", "reset", "read-timeout"])
def test_a_send_is_tried_again_with_the_same_idempotency_key(sidecar, client, waits, first):
    sidecar.add("POST", BASE + "/v1/messages", **first)
    sidecar.add("POST", BASE + "/v1/messages", status=202, json=ACCEPTED)
    assert client.send("profile.updated", 1, {"fields": ["ex"]}, users=["u1"]) == ACCEPTED
    assert len(sidecar.calls) == 2 and len(waits) == 1
    first_key, again_key = sent_keys(sidecar)
    assert first_key == again_key  # the sidecar answers the retry with the first's id, if it was stored
    for call in sidecar.calls:
        verify(call.request)  # each try is signed, the retry afresh
    assert waits[0] >= (2 if "Retry-After" in first.get("headers", {}) else client.backoff_base)


def test_a_callers_key_is_kept_and_each_call_gets_its_own_generated_key(sidecar, client):
    sidecar.add("POST", BASE + "/v1/messages", **problem_reply(503))
    sidecar.add("POST", BASE + "/v1/messages", status=202, json=ACCEPTED)
    client.send("profile.updated", 1, {"fields": ["ex"]}, users=["u1"], idempotency_key="crm-7")
    client.send("profile.updated", 1, {"fields": ["ex"]}, users=["u1"])
    client.send("profile.updated", 1, {"fields": ["ex"]}, users=["u1"])
    keys = sent_keys(sidecar)
    assert keys[:2] == ["crm-7", "crm-7"] and len(set(keys[2:])) == 2  # two calls, two messages


def test_tries_are_bounded_and_back_off(sidecar, waits):
    client = BizClient(BASE, "crm", SECRET, max_tries=5, backoff_base=0.5, backoff_max=3.0, sleep=waits.append)
    sidecar.add("GET", BASE + "/v1/types", **problem_reply(503))
    with pytest.raises(BizAPIError) as raised:
        client.types()
    assert raised.value.status == 503 and len(sidecar.calls) == 5 and len(waits) == 4
    for attempt, wait in enumerate(waits, 1):
        assert 0.5 <= wait <= min(3.0, 0.5 * 2 ** (attempt - 1))


def test_one_try_means_no_retry(sidecar, waits):
    client = BizClient(BASE, "crm", SECRET, max_tries=1, sleep=waits.append)
    sidecar.add("GET", BASE + "/v1/types", body=requests.ConnectionError("refused"))
    with pytest.raises(BizConnectionError):
        client.types()
    assert len(sidecar.calls) == 1 and waits == []
    with pytest.raises(ValueError):
        BizClient(BASE, "crm", SECRET, max_tries=0)


@pytest.mark.parametrize("reply", [problem_reply(400), problem_reply(401), problem_reply(404), problem_reply(422),
                                   problem_reply(500), problem_reply(429, "3600"),
                                   {"body": requests.TooManyRedirects("loop")}],
                         ids=["400", "401", "404", "422", "500", "retry-after-beyond-the-cap", "not-a-network-error"])
def test_what_another_try_cannot_fix_is_raised_at_once(sidecar, client, waits, reply):
    sidecar.add("POST", BASE + "/v1/messages", **reply)
    with pytest.raises(BizClientError):
        client.send("profile.updated", 1, {"fields": ["ex"]}, users=["u1"])
    assert len(sidecar.calls) == 1 and waits == []
