"""Property-based tests (hypothesis) over the envelope and the signature check.

The envelope: any JSON value, any near-valid envelope and any bytes sent
(validly signed) to ``POST /v1/messages`` is answered 202 with a stored
message, or a 4xx problem of the documented shape; never a 5xx.

The signature: no random token verifies; a valid token verifies only for its
own method, path and body; a mutation of it verifies only when it is one of
the lenient base64 spellings itsdangerous accepts for the *same* signature
bytes, which the API then treats as a replay (tests/test_hardening.py).
"""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from itsdangerous.encoding import base64_decode

from conftest import SECRETS, Clock, message
from openim_bizplugin.errors import Unauthorized
from openim_bizplugin.signing import RequestVerifier, sign

# No example database: the tests leave no .hypothesis folder in the work tree.
QUICK = settings(database=None, deadline=None)
FIXTURES_OK = settings(QUICK, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PROBLEM_STATUSES = {400, 403, 404, 409, 413, 415, 422}

# -- the envelope -----------------------------------------------------------------------

SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**60), max_value=2**60)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
IDS = st.lists(st.sampled_from(["u1", "u2", "", " u", "u\n", "g_ops", "\x00"]) | st.text(max_size=6), max_size=6)
ENVELOPES = st.fixed_dictionaries({
    "type": st.sampled_from(["profile.updated", "order.status_changed", "app.upgrade_available", "nope"]) | JSON,
    "version": st.sampled_from([1, 2, 1.0, 0, 3]) | JSON,
    "data": st.sampled_from([{"fields": ["nickname"]}, {"fields": ["email", "email"]}, {}]) | JSON,
    "to": st.fixed_dictionaries({}, optional={"users": IDS, "groups": IDS}) | JSON,
}, optional={
    "priority": st.sampled_from(["high", "normal", "low", "urgent"]) | JSON,
    "idempotency_key": st.text(alphabet="ab \n\x7f", min_size=0, max_size=3) | JSON,
    "collapse_key": st.text(alphabet="cd\r", max_size=3),
    "ttl_seconds": st.integers(min_value=-5, max_value=40_000_000) | JSON,
    "offline": st.sampled_from(["store", "hold", "drop", "later"]),
    "mode": st.sampled_from(["notification", "custom", "other"]),
    "surprise": JSON,
})
VALID = st.sampled_from([
    message(), message(to={"groups": ["g_ops"]}, priority="high", offline="hold", ttl_seconds=60),
    message(version=2, data={"fields": ["email"], "changed_by": "admin"}, mode="custom", collapse_key="c1"),
    message(type="order.status_changed",
            data={"order_id": "A1", "status": "paid", "updated_at": "2026-11-26T12:00:00Z"}),
])
ENVELOPE_KEYS = ["type", "version", "data", "to", "priority", "idempotency_key", "collapse_key", "ttl_seconds",
                 "offline", "mode", "surprise"]


@st.composite
def near_valid(draw: Any) -> dict:
    """A valid envelope with a few keys dropped or set to other values: near misses and accepted ones."""
    body = dict(draw(VALID))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        key = draw(st.sampled_from(ENVELOPE_KEYS))
        if draw(st.booleans()):
            body.pop(key, None)
        else:
            body[key] = draw(JSON | st.text(max_size=5))
    return body


def check_answer(response: Any, store: Any) -> None:
    """202 with a stored message, or a 4xx problem with the documented shape."""
    assert response.status_code < 500, response.get_data(as_text=True)
    event(f"status {response.status_code}")
    if response.status_code == 202:
        answer = response.get_json()
        assert answer["status"] == "queued" and isinstance(answer["recipients"], int) and answer["recipients"] >= 1
        assert store.get_message(answer["id"]) is not None
        return
    assert response.status_code in PROBLEM_STATUSES, response.status_code
    assert response.mimetype == "application/problem+json"
    body = json.loads(response.get_data())
    assert body["status"] == response.status_code
    assert all(isinstance(body[key], str) and body[key] for key in ("type", "title", "detail"))
    assert set(body) <= {"type", "title", "status", "detail", "errors"}
    for error in body.get("errors", []):
        assert set(error) == {"path", "message"}
        assert isinstance(error["message"], str) and (error["path"] == "" or error["path"].startswith("/"))


@settings(FIXTURES_OK, max_examples=150)
@given(body=ENVELOPES | near_valid())
def test_any_envelope_is_accepted_or_a_4xx_problem(signed, store, body):
    check_answer(signed.post(json.dumps(body).encode()), store)


@settings(FIXTURES_OK, max_examples=80)
@given(body=JSON)
def test_any_json_value_is_accepted_or_a_4xx_problem(signed, store, body):
    check_answer(signed.post(json.dumps(body).encode()), store)


@settings(FIXTURES_OK, max_examples=80)
@given(raw=st.binary(max_size=200) | st.builds(lambda b, cut: b[:cut], st.just(json.dumps(message()).encode()),
                                               st.integers(0, 120)))
def test_any_bytes_are_accepted_or_a_4xx_problem(signed, store, raw):
    check_answer(signed.post(raw), store)


@settings(FIXTURES_OK, max_examples=60)
@given(content_type=st.text(max_size=40), key=st.text(max_size=20))
def test_any_content_type_or_idempotency_header_is_accepted_or_a_4xx_problem(signed, store, content_type, key):
    assume(all(ch not in content_type + key for ch in "\r\n"))  # werkzeug's test client refuses those
    check_answer(signed.post(message(), headers={"Content-Type": content_type}, idempotency_key=key), store)


# -- the signature check -------------------------------------------------------------------

NOW = 1_795_694_400
PATH = "/v1/messages"
BODY = json.dumps(message()).encode()
TOKEN_CHARS = string.ascii_letters + string.digits + "-_=.~+/ "


@pytest.fixture(scope="module")
def verifier() -> RequestVerifier:
    return RequestVerifier({"crm": [SECRETS["crm"]], "ops": ["an-older-key-0001", SECRETS["ops"]]},
                           clock=Clock(NOW))


def valid_token(client: str = "crm", method: str = "POST", path: str = PATH, body: bytes = BODY,
                at: float = NOW) -> str:
    return sign(SECRETS[client], method, path, body, now=at)


@QUICK
@given(client=st.sampled_from(["crm", "ops", "nobody", ""]) | st.text(max_size=10),
       token=st.text(TOKEN_CHARS, max_size=180) | st.text(max_size=60))
def test_random_tokens_never_verify(verifier, client, token):
    with pytest.raises(Unauthorized):
        verifier.verify(client, token, "POST", PATH, BODY)


@QUICK
@given(value=st.text("0123456789abcdef", min_size=64, max_size=64), timestamp=st.text(TOKEN_CHARS[:64], max_size=8),
       signature=st.text(TOKEN_CHARS[:64] + "=", max_size=50))
def test_well_formed_tokens_without_the_key_never_verify(verifier, value, timestamp, signature):
    with pytest.raises(Unauthorized):
        verifier.verify("crm", f"{value}.{timestamp}.{signature}", "POST", PATH, BODY)


@QUICK
@given(body=st.binary(max_size=300), method=st.sampled_from(["POST", "GET", "PUT", "post"]),
       path=st.sampled_from([PATH, PATH + "?", PATH + "/", "/v1/messages?x=1", "/V1/messages", "/v1/types"]))
def test_a_token_verifies_only_for_what_it_signed(verifier, body, method, path):
    token = valid_token()
    if (body, method.upper(), path) == (BODY, "POST", PATH):
        assert verifier.verify("crm", token, method, path, body).client_id == "crm"
    else:
        with pytest.raises(Unauthorized):
            verifier.verify("crm", token, method, path, body)


@QUICK
@given(client=st.sampled_from(["crm", "ops"]))
def test_a_token_of_one_client_does_not_verify_as_another(verifier, client):
    other = "ops" if client == "crm" else "crm"
    with pytest.raises(Unauthorized):
        verifier.verify(other, valid_token(client), "POST", PATH, BODY)


def _same_signature(original: str, mutated: str) -> bool:
    """True when *mutated* is a lenient re-spelling of the signature part of *original*."""
    head, _, signature = original.rpartition(".")
    mutated_head, _, mutated_signature = mutated.rpartition(".")
    try:
        return head == mutated_head and base64_decode(mutated_signature) == base64_decode(signature)
    except Exception:  # noqa: BLE001 - not decodable at all: not the same signature
        return False


MUTATIONS = st.one_of(
    st.tuples(st.just("replace"), st.integers(0, 200), st.sampled_from(TOKEN_CHARS)),
    st.tuples(st.just("insert"), st.integers(0, 200), st.sampled_from(TOKEN_CHARS)),
    st.tuples(st.just("delete"), st.integers(0, 200), st.just("")),
    st.tuples(st.just("append"), st.just(0), st.text(TOKEN_CHARS, min_size=1, max_size=4)),
)


def mutate(token: str, mutation: tuple[str, int, str]) -> str:
    kind, position, text = mutation
    position %= len(token)
    if kind == "replace":
        return token[:position] + text + token[position + 1:]
    if kind == "insert":
        return token[:position] + text + token[position:]
    if kind == "delete":
        return token[:position] + token[position + 1:]
    return token + text


@settings(QUICK, max_examples=400)
@given(mutations=st.lists(MUTATIONS, min_size=1, max_size=3), age=st.integers(-30, 300))
def test_a_mutated_token_verifies_only_as_a_respelling_of_the_same_signature(verifier, mutations, age):
    token = valid_token(at=NOW - age)
    mutated = token
    for mutation in mutations:
        mutated = mutate(mutated, mutation)
    assume(mutated != token)
    try:
        verified = verifier.verify("crm", mutated, "POST", PATH, BODY)
    except Unauthorized:
        return
    # Accepted: it must be the same signed request, which intake treats as a replay.
    assert _same_signature(token, mutated), (token, mutated)
    event("a re-spelling verified")
    assert verified == verifier.verify("crm", token, "POST", PATH, BODY)


@QUICK
@given(age=st.integers(-3600, 3600))
def test_only_tokens_within_max_age_and_skew_verify(verifier, age):
    token = valid_token(at=NOW - age)
    if -30 <= age <= 300:
        assert verifier.verify("crm", token, "POST", PATH, BODY).timestamp == NOW - age
    else:
        with pytest.raises(Unauthorized):
            verifier.verify("crm", token, "POST", PATH, BODY)


@QUICK
@given(secret=st.sampled_from(["an-older-key-0001", SECRETS["ops"], "not-a-key-of-ops"]))
def test_every_listed_key_of_a_client_verifies_and_no_other(verifier, secret):
    token = sign(secret, "POST", PATH, BODY, now=NOW)
    if secret == "not-a-key-of-ops":
        with pytest.raises(Unauthorized):
            verifier.verify("ops", token, "POST", PATH, BODY)
    else:
        assert verifier.verify("ops", token, "POST", PATH, BODY).client_id == "ops"
