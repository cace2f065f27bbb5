"""A Python client for the sidecar's internal API: signs and sends.

    BizClientError          anything that kept a call from getting an answer
     ├── BizConnectionError the sidecar could not be reached
     └── BizAPIError        the sidecar answered with a problem (RFC 9457)

Example::

    client = BizClient("http://127.0.0.1:8080", "crm", secret)
    answer = client.send("profile.updated", 1, {"fields": ["nickname"]}, users=["u1"])
    client.status(answer["id"])["status"]

Calls are retried as Stripe's client retries them: after a connection error or
timeout (or a proxy's ``502``/``504``), and after ``409`` (the same idempotency
key is still being stored), ``429`` and ``503`` (nothing was stored), waiting with jittered exponential
backoff and at least as long as the answer's ``Retry-After`` says, up to
``max_tries`` tries in all. ``send`` always carries an ``idempotency_key`` in
the body (a generated one when the caller gives none), so a retry of a message
that was stored but whose answer was lost gets the first answer instead of
sending the message twice. Each try is signed afresh.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from .retry import backoff_seconds
from .signing import signature_headers

log = logging.getLogger(__name__)

# 409: a request with this idempotency key is still being stored (asking again gets its answer);
# 429: over the client's rate limit; 503: storage unavailable, nothing was stored; 502 and 504: a
# proxy in front could not reach the sidecar or had no answer in time, like a connection error.
RETRY_STATUSES = frozenset({409, 429, 502, 503, 504})
# failures after which the request may or may not have arrived: safe to send again, since every
# message carries an idempotency key and a GET changes nothing
_NETWORK_FAILURES = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class BizClientError(Exception):
    """Base class of the client's errors."""


class BizConnectionError(BizClientError):
    """The sidecar could not be reached or did not answer in time."""


class BizAPIError(BizClientError):
    """The sidecar answered with an error; ``problem`` holds its details."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.title = str(problem.get("title", ""))
        self.detail = str(problem.get("detail", ""))
        self.errors: list[dict[str, str]] = list(problem.get("errors") or [])
        self.retry_after = problem.get("retry_after")
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """``422 Message does not match …: detail (/data/x: message; …)``."""
        text = f"{self.status} {self.title}"
        if self.detail:
            text += f": {self.detail}"
        if self.errors:
            text += " (" + "; ".join(f"{e.get('path') or '/'}: {e.get('message')}" for e in self.errors[:5])
            text += "; …)" if len(self.errors) > 5 else ")"
        return text


class BizClient:
    """Signs requests with *secret* as *client_id* and sends them to *base_url*.

    *max_tries* bounds the tries of one call (1: never retry). Retries wait
    between *backoff_base* and *backoff_max* seconds (jittered, doubling), or
    longer when the sidecar's ``Retry-After`` asks; a ``Retry-After`` beyond
    *max_retry_after* seconds is not waited for: the error is raised at once.
    *sleep* does the waiting (tests pass their own).
    """

    def __init__(self, base_url: str, client_id: str, secret: str, *, timeout: float = 10.0,
                 session: requests.Session | None = None, max_tries: int = 3, backoff_base: float = 0.5,
                 backoff_max: float = 8.0, max_retry_after: float = 60.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if max_tries < 1:
            raise ValueError("max_tries must be at least 1")
        self.base_url = base_url.rstrip("/")
        # signed as the request line has it: with the base URL's path (a mount prefix such as /biz)
        self._base_path = urlsplit(self.base_url).path
        self.client_id = client_id
        self._secret = secret
        self.timeout = timeout
        self.session = session or requests.Session()
        self.max_tries, self.backoff_base, self.backoff_max = max_tries, backoff_base, backoff_max
        self.max_retry_after = max_retry_after
        self._sleep = sleep

    def send(self, type: str, version: int, data: Any, *, users: Sequence[str] | None = None,
             groups: Sequence[str] | None = None, priority: str | None = None,
             idempotency_key: str | None = None, collapse_key: str | None = None,
             ttl_seconds: int | None = None, offline: str | None = None,
             mode: str | None = None) -> dict[str, Any]:
        """Post one message; returns ``{"id", "status", "recipients"}``.

        Without *idempotency_key* a fresh one is generated, so the retries of
        this call are one message; two calls are two messages.
        """
        if (users is None) == (groups is None):
            raise ValueError("give exactly one of users or groups")
        body: dict[str, Any] = {"type": type, "version": version, "data": data,
                                "to": {"users": list(users)} if users is not None else {"groups": list(groups)}}
        # in the body, not the Idempotency-Key header: covered by the signature like the rest of it
        idempotency_key = idempotency_key or f"bizclient-{uuid.uuid4().hex}"
        optional = {"priority": priority, "idempotency_key": idempotency_key, "collapse_key": collapse_key,
                    "ttl_seconds": ttl_seconds, "offline": offline, "mode": mode}
        body.update({k: v for k, v in optional.items() if v is not None})
        return self._call("POST", "/v1/messages", json.dumps(body).encode())

    def status(self, message_id: str) -> dict[str, Any]:
        """The message with one entry per recipient."""
        return self._call("GET", "/v1/messages/" + quote(message_id, safe=""))

    def types(self) -> list[dict[str, Any]]:
        """Every type and version the sidecar accepts, with schema and defaults."""
        return self._call("GET", "/v1/types")["types"]

    def _call(self, method: str, path: str, body: bytes = b"") -> dict[str, Any]:
        attempt = 1
        while True:
            try:
                return self._try(method, path, body)
            except BizClientError as exc:
                delay = self._retry_delay(exc, attempt)
                if delay is None:
                    raise
                attempt += 1
                log.info("%s %s: %s; trying again in %.1f s (try %d of %d)", method, path.split("?")[0], exc,
                         delay, attempt, self.max_tries)
                self._sleep(delay)

    def _retry_delay(self, exc: BizClientError, attempt: int) -> float | None:
        """How long to wait before trying again after *exc*, or None to give up."""
        if attempt >= self.max_tries:
            return None
        asked = 0.0
        if isinstance(exc, BizAPIError):
            if exc.status not in RETRY_STATUSES:
                return None
            asked = _seconds(exc.retry_after)
            if asked > self.max_retry_after:
                return None
        elif not isinstance(exc.__cause__, _NETWORK_FAILURES):
            return None
        backoff = max(self.backoff_base, backoff_seconds(attempt, self.backoff_base, self.backoff_max))
        return max(backoff, asked)

    def _try(self, method: str, path: str, body: bytes) -> dict[str, Any]:
        headers = signature_headers(self.client_id, self._secret, method, self._base_path + path, body)
        if body:
            headers["Content-Type"] = "application/json"
        try:
            response = self.session.request(method, self.base_url + path, data=body or None,
                                            headers=headers, timeout=self.timeout)
        except requests.RequestException as exc:
            raise BizConnectionError(f"cannot reach the sidecar at {self.base_url}: {exc}") from exc
        if response.status_code >= 400:
            raise BizAPIError(response.status_code, _problem_of(response))
        return response.json()


def _seconds(retry_after: Any) -> float:
    """``Retry-After`` as seconds when it is a delay in seconds (all the sidecar sends); anything
    else (an HTTP date, garbage) is 0 and the backoff alone decides."""
    text = str(retry_after).strip() if retry_after is not None else ""
    return float(text) if text.isascii() and text.isdigit() else 0.0


def _problem_of(response: requests.Response) -> dict[str, Any]:
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        problem = {"title": response.reason or "Error", "status": response.status_code,
                   "detail": response.text[:200]}
    if "Retry-After" in response.headers:
        problem.setdefault("retry_after", response.headers["Retry-After"])
    return problem
