"""Signed requests from internal services (SPEC §3).

A request carries ``X-Biz-Client: <client_id>`` and ``X-Biz-Signature:
<token>``. The token is an itsdangerous :class:`~itsdangerous.TimestampSigner`
token over :func:`signed_value` — the hex SHA-256 of
``METHOD + " " + PATH_AND_QUERY + "\\n" + RAW_BODY`` — so the body is
authenticated as raw bytes, before any JSON parsing. A request that carries an
``Idempotency-Key`` header signs ``METHOD + " " + PATH_AND_QUERY + " " + KEY +
"\\n" + RAW_BODY`` instead: the header decides which earlier message a request
repeats, so whoever can add a header must not be able to choose it. Requests
without the header sign exactly what they always did.

:class:`RequestVerifier` is framework-free: it takes the two header values,
the method, the path as sent on the wire and the raw body, and either returns a
:class:`VerifiedRequest` or raises :class:`~openim_bizplugin.errors.Unauthorized`.
The clock is the injected ``clock`` callable and nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from itsdangerous import BadSignature, TimestampSigner

from .errors import ConfigError, Unauthorized

SALT = "openim-bizplugin"
CLIENT_HEADER = "X-Biz-Client"
SIGNATURE_HEADER = "X-Biz-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"

# value.timestamp.signature; "=" is allowed because itsdangerous decodes
# padded base64 too, and we must not reject what a conforming signer accepts.
_TOKEN_RE = re.compile(r"[0-9a-f]{64}\.[A-Za-z0-9_=-]+\.[A-Za-z0-9_=-]+")


def signed_value(method: str, path_and_query: str, body: bytes, idempotency_key: str | None = None) -> str:
    """Return the lower-case hex SHA-256 of ``METHOD PATH_AND_QUERY\\nBODY``, or of
    ``METHOD PATH_AND_QUERY KEY\\nBODY`` when the request carries an ``Idempotency-Key``.

    *path_and_query* is the path plus ``?query`` when there is one, exactly as
    sent on the wire (still percent-encoded, never decoded). A request target
    holds no space, so the first line reads one way only.
    """
    key = "" if idempotency_key is None else " " + idempotency_key
    head = f"{method.upper()} {path_and_query}{key}\n".encode()
    return hashlib.sha256(head + body).hexdigest()


def _make_signer(secrets: str | Sequence[str]) -> TimestampSigner:
    """A TimestampSigner per SPEC §3; *secrets* are ordered oldest to newest."""
    return TimestampSigner(
        secrets, salt=SALT, key_derivation="hmac", digest_method=hashlib.sha256
    )


class _SignerAt(TimestampSigner):
    """A TimestampSigner whose clock is a fixed, caller-supplied second."""

    def __init__(self, secret: str, timestamp: int) -> None:
        super().__init__(secret, salt=SALT, key_derivation="hmac", digest_method=hashlib.sha256)
        self._timestamp = timestamp

    def get_timestamp(self) -> int:
        return self._timestamp


def sign(
    secret: str, method: str, path_and_query: str, body: bytes, *, now: float | None = None,
    idempotency_key: str | None = None,
) -> str:
    """Return the ``X-Biz-Signature`` token for one request.

    *now* is unix seconds (truncated to an integer); it defaults to the
    current time. Pass *idempotency_key* when the request carries that header.
    """
    timestamp = int(time.time() if now is None else now)
    value = signed_value(method, path_and_query, body, idempotency_key)
    return _SignerAt(secret, timestamp).sign(value).decode("ascii")


def signature_headers(
    client_id: str,
    secret: str,
    method: str,
    path_and_query: str,
    body: bytes,
    *,
    now: float | None = None,
    idempotency_key: str | None = None,
) -> dict[str, str]:
    """Return both headers a signed request must carry, and the ``Idempotency-Key``
    header the signature covers when *idempotency_key* is given."""
    headers = {
        CLIENT_HEADER: client_id,
        SIGNATURE_HEADER: sign(secret, method, path_and_query, body, now=now, idempotency_key=idempotency_key),
    }
    if idempotency_key is not None:
        headers[IDEMPOTENCY_HEADER] = idempotency_key
    return headers


@dataclass(frozen=True)
class VerifiedRequest:
    """A request whose signature checked out.

    ``(client_id, signed_value, timestamp)`` identifies a replay: the
    timestamp is the decoded integer, so two base64 spellings of the same
    token are the same request.
    """

    client_id: str
    signed_value: str
    timestamp: int


class RequestVerifier:
    """Check signed requests against each client's secrets (oldest to newest).

    Tokens older than *max_age* seconds, or more than *skew* seconds in the
    future, are rejected; *clock* returns unix seconds.
    """

    def __init__(
        self,
        secrets_by_client: Mapping[str, Sequence[str]],
        *,
        max_age: int = 300,
        skew: int = 30,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_age = max_age
        self.skew = skew
        self.clock = clock
        self._signers: dict[str, TimestampSigner] = {}
        for client_id, secrets in secrets_by_client.items():
            keys = [secrets] if isinstance(secrets, str) else list(secrets)
            # A signer without keys would reject everything silently; refuse instead.
            if not keys or not all(keys):
                raise ConfigError(
                    f"clients.{client_id}.secrets: needs at least one non-empty secret"
                )
            self._signers[client_id] = _make_signer(keys)

    def check_headers(self, client_id: str | None, token: str | None) -> TimestampSigner:
        """What can be checked before the body is read: both headers present, a known
        client, a well-formed token. Returns the client's signer, or raises Unauthorized."""
        if not client_id:
            raise Unauthorized(f"Missing {CLIENT_HEADER} header.")
        if not token:
            raise Unauthorized(f"Missing {SIGNATURE_HEADER} header.")
        signer = self._signers.get(client_id)
        if signer is None:
            raise Unauthorized(f"Unknown client {client_id[:64]!r} in {CLIENT_HEADER}.")
        if not _TOKEN_RE.fullmatch(token):
            raise Unauthorized(
                f"Malformed {SIGNATURE_HEADER}: expected VALUE.TIMESTAMP.SIGNATURE "
                "(hex SHA-256, then two URL-safe base64 segments)."
            )
        return signer

    def verify(
        self,
        client_id: str | None,
        token: str | None,
        method: str,
        path_and_query: str,
        body: bytes,
        idempotency_key: str | None = None,
    ) -> VerifiedRequest:
        """Return the verified identity of a request, or raise Unauthorized.

        *idempotency_key* is the request's ``Idempotency-Key`` header, None when it has none.
        """
        signer = self.check_headers(client_id, token)
        try:
            # No max_age: itsdangerous would reject every future timestamp,
            # but we allow `skew` seconds of clock drift.
            value, signed_at = signer.unsign(token, return_timestamp=True)
        except BadSignature:
            raise Unauthorized(
                f"Signature does not match any current key of client {client_id!r}."
            ) from None
        except (ValueError, OverflowError, OSError):
            # A validly signed but absurd timestamp (datetime cannot hold it).
            raise Unauthorized(f"Malformed {SIGNATURE_HEADER}: timestamp out of range.") from None

        expected = signed_value(method, path_and_query, body, idempotency_key)
        if not hmac.compare_digest(value, expected.encode("ascii")):
            raise Unauthorized(_mismatch(value, method, path_and_query, body, idempotency_key))

        timestamp = int(signed_at.timestamp())
        age = int(self.clock()) - timestamp
        if age > self.max_age:
            raise Unauthorized(
                f"Signature expired: signed {age} s ago, limit is {self.max_age} s."
            )
        if -age > self.skew:
            raise Unauthorized(
                f"Signature timestamp is {-age} s in the future, "
                f"beyond the allowed clock skew of {self.skew} s."
            )
        return VerifiedRequest(client_id, expected, timestamp)


def _mismatch(value: bytes, method: str, path_and_query: str, body: bytes, idempotency_key: str | None) -> str:
    """Why a well-signed token does not fit this request, in words a sender can act on."""
    if idempotency_key is not None and hmac.compare_digest(
            value, signed_value(method, path_and_query, body).encode("ascii")):
        return (f"Signature does not cover the {IDEMPOTENCY_HEADER} header: a request that carries it"
                f" signs METHOD + \" \" + PATH_AND_QUERY + \" \" + KEY + \"\\n\" + RAW_BODY"
                f" (README, 'Signing requests'), or put idempotency_key in the body instead.")
    return ("Signature does not match this request: method, path with query, Idempotency-Key header "
            "(when sent) and raw body must be signed exactly as sent.")
