"""The exception tree of openim-bizplugin.

    ConfigError                 start-up refused; one line naming the key or file
    BizError                    an answer to an API caller, rendered as RFC 9457
     ├── BadRequest             400  body is not strict JSON
     ├── Unauthorized           401  missing, bad or expired signature
     ├── Forbidden              403  type not allowed for this client
     ├── NotFound               404  unknown type, version or message
     ├── Conflict               409  same idempotency key still being stored
     ├── PayloadTooLarge        413  body over server.max_body_bytes
     ├── UnsupportedMediaType   415  not application/json
     ├── Unprocessable          422  schema or envelope violation (with errors)
     ├── RateLimited            429  over the client's rate limit
     └── StorageUnavailable     503  the store cannot take the write (now: try again later)
          ├── StorageBusy            a write asked not to wait found the store locked
          └── StorageRejected        the store refuses this write for what it holds: never

Each class knows its HTTP status, a stable problem slug and a title; the
views only raise, and one renderer (:func:`problem`) builds the JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROBLEM_BASE = "https://openim-bizplugin.dev/problems/"


class ConfigError(Exception):
    """The configuration or the schema catalogue is unusable.

    The message is one line that names the key or file at fault; the CLI
    prints it as is and exits non-zero.
    """


@dataclass(frozen=True)
class Violation:
    """One schema or envelope violation, located by a JSON pointer."""

    path: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}


class BizError(Exception):
    """An error answered to an API caller as ``application/problem+json``."""

    status = 500
    slug = "internal"
    title = "Internal error"

    def __init__(
        self,
        detail: str,
        *,
        errors: list[Violation] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []
        self.headers = headers or {}


class BadRequest(BizError):
    status, slug, title = 400, "bad-json", "Body is not valid JSON"


class Unauthorized(BizError):
    status, slug, title = 401, "bad-signature", "Missing, invalid or expired signature"


class Forbidden(BizError):
    status, slug, title = 403, "type-not-allowed", "Type not allowed for this client"


class NotFound(BizError):
    status, slug, title = 404, "not-found", "Not found"


class Conflict(BizError):
    status, slug, title = 409, "in-progress", "A request with this idempotency key is still being stored"


class PayloadTooLarge(BizError):
    status, slug, title = 413, "too-large", "Body too large"


class UnsupportedMediaType(BizError):
    status, slug, title = 415, "not-json", "Body must be application/json"


class Unprocessable(BizError):
    status, slug, title = 422, "invalid", "Message does not match its schema or envelope"


class RateLimited(BizError):
    status, slug, title = 429, "rate-limited", "Too many requests"


class StorageUnavailable(BizError):
    status, slug, title = 503, "storage-unavailable", "Storage unavailable; nothing was stored"


class StorageBusy(StorageUnavailable):
    """A write that was asked not to wait could not start at once (nothing was written)."""


class StorageRejected(StorageUnavailable):
    """The store refuses this write for what it holds (a value of the wrong type, too large, too
    many variables, a constraint): trying it again fails again. Nothing was written. A kind of
    StorageUnavailable, so that the API still answers 503; a pipeline fails the one item instead
    of waiting for the store (callbacks, delivery)."""


def problem(exc: BizError) -> dict[str, Any]:
    """Render *exc* as an RFC 9457 problem document."""
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + exc.slug,
        "title": exc.title,
        "status": exc.status,
        "detail": exc.detail,
    }
    if exc.errors:
        body["errors"] = [v.as_dict() for v in exc.errors]
    return body
