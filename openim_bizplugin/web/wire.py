"""Reading a request exactly as it came over the wire.

The signature covers the raw bytes and the path as sent, so both are read
here without Flask's decoding; the body limit holds for chunked uploads too,
which Flask's ``MAX_CONTENT_LENGTH`` does not bound.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from ..errors import PayloadTooLarge

if TYPE_CHECKING:
    from ..services import Services
    from ..signing import VerifiedRequest

CHUNK = 64 * 1024
# After a 413 we keep reading (and discarding) up to this much so the client
# sees the answer instead of a reset connection; beyond it we just close.
DRAIN_LIMIT = 64 * 1024 * 1024
# Set in the WSGI environ by a view that logged its request in a line of its own
# (``message.accepted``): serve's access log then adds no second line for it.
LOGGED = "openim_bizplugin.logged"


def read_body(stream: Any, content_length: int | None, limit: int) -> bytes:
    """Read at most *limit* bytes from *stream*, or raise PayloadTooLarge."""
    if content_length is not None and content_length > limit:
        _drain(stream, content_length)
        raise PayloadTooLarge(f"body of {content_length} bytes is over the limit of {limit} bytes")
    parts, size = [], 0
    while True:
        chunk = stream.read(min(CHUNK, limit + 1 - size))
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            _drain(stream, None)
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes")


def _drain(stream: Any, expected: int | None) -> None:
    remaining = DRAIN_LIMIT if expected is None else min(expected, DRAIN_LIMIT)
    while remaining > 0:
        chunk = stream.read(min(CHUNK, remaining))
        if not chunk:
            return
        remaining -= len(chunk)


def path_and_query(environ: dict[str, Any]) -> str:
    """The request target as the client sent it (path plus ``?query``)."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        if not raw.startswith("/"):  # absolute-form target: keep path and query only
            parts = urlsplit(raw)
            raw = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # WSGI hands over the target as latin-1 text; signers hash it as UTF-8. A server
        # that already decoded it (text beyond latin-1) is taken at its word.
        try:
            return raw.encode("latin-1").decode("utf-8", "replace")
        except UnicodeEncodeError:
            return raw
    path = quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""), safe="/:@!$&'()*+,;=-._~%")
    query = environ.get("QUERY_STRING", "")
    return f"{path}?{query}" if query else path


def verified_caller(svc: Services, environ: dict[str, Any], body: bytes) -> VerifiedRequest:
    """The signed caller of a ``/v1`` request, within its rate limit (checked after the
    signature, so nobody can spend another client's quota); Unauthorized or RateLimited."""
    verified = svc.verifier.verify(
        environ.get("HTTP_X_BIZ_CLIENT"), environ.get("HTTP_X_BIZ_SIGNATURE"), environ.get("REQUEST_METHOD", ""),
        path_and_query(environ), body, environ.get("HTTP_IDEMPOTENCY_KEY"))
    svc.limiter.check(verified.client_id)
    return verified
