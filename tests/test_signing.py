"""Unit tests for openim_bizplugin.signing (SPEC §3)."""

from __future__ import annotations

import hashlib

import pytest
from itsdangerous import TimestampSigner
from itsdangerous.encoding import base64_decode, base64_encode

from openim_bizplugin.errors import ConfigError, Unauthorized
from openim_bizplugin.signing import (
    SALT,
    RequestVerifier,
    VerifiedRequest,
    sign,
    signature_headers,
    signed_value,
)

OLD = "old-secret-0123456789abcdef"
NEW = "new-secret-fedcba9876543210"
OTHER = "other-client-secret-000000"
NOW = 1_764_158_400
BODY = b'{"type":"profile.updated","version":1}'
PATH = "/v1/messages"


class Clock:
    """A settable clock; tests move time instead of sleeping."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(clock: Clock) -> RequestVerifier:
    return RequestVerifier({"crm": [OLD, NEW], "billing": [OTHER]}, clock=clock)


def reject(verifier: RequestVerifier, *args: object, match: str) -> Unauthorized:
    with pytest.raises(Unauthorized, match=match) as info:
        verifier.verify(*args)  # type: ignore[arg-type]
    for secret in (OLD, NEW, OTHER):
        assert secret not in info.value.detail
    return info.value


# --- signed_value ------------------------------------------------------------


def test_signed_value_hashes_method_path_newline_body() -> None:
    expected = hashlib.sha256(b"POST /v1/messages\n" + BODY).hexdigest()
    assert signed_value("POST", PATH, BODY) == expected


def test_signed_value_upper_cases_method_and_keeps_query() -> None:
    assert signed_value("get", "/v1/messages/abc?x=1", b"") == hashlib.sha256(
        b"GET /v1/messages/abc?x=1\n"
    ).hexdigest()


def test_signed_value_is_lower_case_hex() -> None:
    value = signed_value("POST", PATH, BODY)
    assert len(value) == 64 and value == value.lower()
    int(value, 16)


# --- sign / verify -------------------------------------------------------------


def test_round_trip(verifier: RequestVerifier) -> None:
    token = sign(NEW, "POST", PATH, BODY, now=NOW)
    result = verifier.verify("crm", token, "POST", PATH, BODY)
    assert result == VerifiedRequest("crm", signed_value("POST", PATH, BODY), NOW)


def test_sign_is_an_itsdangerous_timestamp_signer_token() -> None:
    signer = TimestampSigner(NEW, salt=SALT, key_derivation="hmac", digest_method=hashlib.sha256)
    token = sign(NEW, "POST", PATH, BODY, now=NOW + 0.9)
    value, signed_at = signer.unsign(token, return_timestamp=True)
    assert value.decode() == signed_value("POST", PATH, BODY)
    assert int(signed_at.timestamp()) == NOW  # now is truncated


def test_get_with_query_and_empty_body(verifier: RequestVerifier) -> None:
    token = sign(NEW, "GET", "/v1/messages/abc?x=1", b"", now=NOW)
    assert verifier.verify("crm", token, "GET", "/v1/messages/abc?x=1", b"").timestamp == NOW


def test_signature_headers() -> None:
    headers = signature_headers("crm", NEW, "POST", PATH, BODY, now=NOW)
    assert headers == {
        "X-Biz-Client": "crm",
        "X-Biz-Signature": sign(NEW, "POST", PATH, BODY, now=NOW),
    }


# --- the Idempotency-Key header -------------------------------------------------


def test_a_request_with_an_idempotency_key_header_signs_the_key_on_the_first_line() -> None:
    expected = hashlib.sha256(b"POST /v1/messages crm-42\n" + BODY).hexdigest()
    assert signed_value("POST", PATH, BODY, "crm-42") == expected
    assert signed_value("POST", PATH, BODY, None) == signed_value("POST", PATH, BODY)  # unchanged without it
    headers = signature_headers("crm", NEW, "POST", PATH, BODY, now=NOW, idempotency_key="crm-42")
    assert headers == {"X-Biz-Client": "crm", "X-Biz-Signature": sign(NEW, "POST", PATH, BODY, now=NOW,
                                                                       idempotency_key="crm-42"),
                       "Idempotency-Key": "crm-42"}


def test_a_signed_idempotency_key_verifies_and_is_part_of_the_replay_identity(verifier: RequestVerifier) -> None:
    token = sign(NEW, "POST", PATH, BODY, now=NOW, idempotency_key="crm-42")
    verified = verifier.verify("crm", token, "POST", PATH, BODY, "crm-42")
    assert verified.signed_value == signed_value("POST", PATH, BODY, "crm-42") != signed_value("POST", PATH, BODY)


@pytest.mark.parametrize("signed_key, sent_key", [(None, "older-message-key"), ("crm-42", "older-message-key"),
                                                  ("crm-42", None), ("crm-42", "crm-42 "), ("crm-42", "")])
def test_an_idempotency_key_header_the_signature_does_not_cover_is_refused(
    verifier: RequestVerifier, signed_key: str | None, sent_key: str | None
) -> None:
    # whoever can add or change a header must not choose which earlier message a request repeats
    token = sign(NEW, "POST", PATH, BODY, now=NOW, idempotency_key=signed_key)
    reject(verifier, "crm", token, "POST", PATH, BODY, sent_key, match="Signature does not")


def test_a_sender_that_signed_without_its_idempotency_key_header_is_told_so(verifier: RequestVerifier) -> None:
    token = sign(NEW, "POST", PATH, BODY, now=NOW)
    problem = reject(verifier, "crm", token, "POST", PATH, BODY, "crm-42",
                     match="Signature does not cover the Idempotency-Key header")
    assert "idempotency_key in the body" in problem.detail


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", PATH, BODY + b" "),  # tampered body
        ("POST", PATH, b""),
        ("POST", "/v1/messages?x=1", BODY),  # tampered query
        ("POST", "/v1/types", BODY),  # tampered path
        ("PUT", PATH, BODY),  # tampered method
    ],
)
def test_tampered_request_rejected(
    verifier: RequestVerifier, method: str, path: str, body: bytes
) -> None:
    token = sign(NEW, "POST", PATH, BODY, now=NOW)
    reject(verifier, "crm", token, method, path, body, match="does not match this request")


def test_wrong_secret_rejected(verifier: RequestVerifier) -> None:
    token = sign(OTHER, "POST", PATH, BODY, now=NOW)
    reject(verifier, "crm", token, "POST", PATH, BODY, match="does not match any current key")


def test_wrong_client_rejected(verifier: RequestVerifier) -> None:
    token = sign(NEW, "POST", PATH, BODY, now=NOW)
    reject(verifier, "billing", token, "POST", PATH, BODY, match="does not match any current key")


def test_unknown_client_rejected(verifier: RequestVerifier) -> None:
    token = sign(NEW, "POST", PATH, BODY, now=NOW)
    reject(verifier, "nobody", token, "POST", PATH, BODY, match="Unknown client 'nobody'")


@pytest.mark.parametrize("client_id", [None, ""])
def test_missing_client_header(verifier: RequestVerifier, client_id: str | None) -> None:
    token = sign(NEW, "POST", PATH, BODY, now=NOW)
    reject(verifier, client_id, token, "POST", PATH, BODY, match="Missing X-Biz-Client")


@pytest.mark.parametrize("token", [None, ""])
def test_missing_signature_header(verifier: RequestVerifier, token: str | None) -> None:
    reject(verifier, "crm", token, "POST", PATH, BODY, match="Missing X-Biz-Signature")


def test_distinct_messages(verifier: RequestVerifier, clock: Clock) -> None:
    good = sign(NEW, "POST", PATH, BODY, now=NOW)
    cases = [
        (None, good, BODY),
        ("crm", None, BODY),
        ("nobody", good, BODY),
        ("crm", "garbage", BODY),
        ("crm", good, b"tampered"),
        ("crm", sign(OTHER, "POST", PATH, BODY, now=NOW), BODY),
        ("crm", sign(NEW, "POST", PATH, BODY, now=NOW - 301), BODY),
        ("crm", sign(NEW, "POST", PATH, BODY, now=NOW + 31), BODY),
    ]
    details = set()
    for client_id, token, body in cases:
        with pytest.raises(Unauthorized) as info:
            verifier.verify(client_id, token, "POST", PATH, body)
        details.add(info.value.detail)
    assert len(details) == len(cases)


# --- the age window --------------------------------------------------------------


def test_expired_rejected_with_age_and_limit(verifier: RequestVerifier, clock: Clock) -> None:
    token = sign(NEW, "POST", PATH, BODY, now=NOW)
    clock.now = NOW + 301
    reject(verifier, "crm", token, "POST", PATH, BODY, match="expired.*301 s.*300 s")


def test_just_inside_max_age_accepted(verifier: RequestVerifier, clock: Clock) -> None:
    token = sign(NEW, "POST", PATH, BODY, now=NOW)
    clock.now = NOW + 300.9
    assert verifier.verify("crm", token, "POST", PATH, BODY).timestamp == NOW


def test_custom_max_age(clock: Clock) -> None:
    verifier = RequestVerifier({"crm": [NEW]}, max_age=10, clock=clock)
    token = sign(NEW, "POST", PATH, BODY, now=NOW - 11)
    reject(verifier, "crm", token, "POST", PATH, BODY, match="11 s ago, limit is 10 s")


def test_future_within_skew_accepted(verifier: RequestVerifier) -> None:
    token = sign(NEW, "POST", PATH, BODY, now=NOW + 30)
    assert verifier.verify("crm", token, "POST", PATH, BODY).timestamp == NOW + 30


def test_future_beyond_skew_rejected(verifier: RequestVerifier) -> None:
    token = sign(NEW, "POST", PATH, BODY, now=NOW + 31)
    reject(verifier, "crm", token, "POST", PATH, BODY, match="31 s in the future.*30 s")


# --- rotation --------------------------------------------------------------------


@pytest.mark.parametrize("secret", [OLD, NEW])
def test_rotation_accepts_old_and_new(verifier: RequestVerifier, secret: str) -> None:
    token = sign(secret, "POST", PATH, BODY, now=NOW)
    assert verifier.verify("crm", token, "POST", PATH, BODY).client_id == "crm"


def test_removed_secret_rejected(clock: Clock) -> None:
    verifier = RequestVerifier({"crm": [NEW]}, clock=clock)
    token = sign(OLD, "POST", PATH, BODY, now=NOW)
    reject(verifier, "crm", token, "POST", PATH, BODY, match="does not match any current key")


@pytest.mark.parametrize("secrets", [[], [""], [NEW, ""]])
def test_client_without_secret_refused_at_start(secrets: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"clients\.crm\.secrets"):
        RequestVerifier({"crm": secrets})


# --- malformed tokens ---------------------------------------------------------------


def _good() -> str:
    return sign(NEW, "POST", PATH, BODY, now=NOW)


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "...",
        "a.b.c",  # value is not a SHA-256 hex digest
        ".".join(_good().split(".")[:2]),  # two parts
        _good() + ".extra",  # four parts
        "x." + _good(),
        _good().upper(),
        _good().replace(".", ". "),
        _good() + "\n",
        _good() + "é",
    ],
)
def test_malformed_token_rejected(verifier: RequestVerifier, token: str) -> None:
    reject(verifier, "crm", token, "POST", PATH, BODY, match="Malformed X-Biz-Signature")


def test_garbage_signature_segment_is_a_mismatch(verifier: RequestVerifier) -> None:
    value, ts, _ = _good().split(".")
    reject(verifier, "crm", f"{value}.{ts}.AAAA", "POST", PATH, BODY, match="does not match")


def test_absurd_but_signed_timestamp_rejected(verifier: RequestVerifier) -> None:
    # Only a key holder can make this; it must still be a 401, not a crash.
    token = _sign_with_ts_segment(NEW, signed_value("POST", PATH, BODY), "f_________8")
    reject(verifier, "crm", token, "POST", PATH, BODY, match="Malformed X-Biz-Signature")


# --- replay identity --------------------------------------------------------------------


def _sign_with_ts_segment(secret: str, value: str, ts_segment: str) -> str:
    """Sign *value* with a hand-spelled timestamp segment, as a foreign signer might."""
    signer = TimestampSigner(secret, salt=SALT, key_derivation="hmac", digest_method=hashlib.sha256)
    payload = f"{value}.{ts_segment}"
    return f"{payload}.{signer.get_signature(payload).decode()}"


def test_respelled_tokens_have_one_replay_identity(verifier: RequestVerifier) -> None:
    token = _good()
    value, ts, sig = token.split(".")
    assert base64_decode(ts + "==") == base64_decode(ts)
    # Last base64 char of the 32-byte signature carries 2 unused bits.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet[alphabet.index(sig[-1]) ^ 1]
    spellings = [
        token,
        f"{value}.{ts}.{sig}=",  # padded signature
        f"{value}.{ts}.{sig[:-1]}{last}",  # other unused bits
        _sign_with_ts_segment(NEW, value, ts + "=="),  # padded timestamp
        _sign_with_ts_segment(NEW, value, base64_encode(NOW.to_bytes(8, "big")).decode()),
    ]
    assert len(set(spellings)) == len(spellings)
    identities = {verifier.verify("crm", t, "POST", PATH, BODY) for t in spellings}
    assert identities == {VerifiedRequest("crm", value, NOW)}


def test_verified_request_is_frozen() -> None:
    result = VerifiedRequest("crm", "v", 1)
    with pytest.raises(AttributeError):
        result.timestamp = 2  # type: ignore[misc]


def test_verifier_reads_only_the_injected_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    # Break the system clock: verification must not notice.
    monkeypatch.setattr("time.time", lambda: 0.0)
    verifier = RequestVerifier({"crm": [NEW]}, clock=lambda: NOW)
    assert verifier.verify("crm", _good(), "POST", PATH, BODY).timestamp == NOW
