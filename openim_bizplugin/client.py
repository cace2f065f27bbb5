"""A Python client for the sidecar's internal API: signs and sends.

    BizClientError          anything that kept a call from getting an answer
     ├── BizConnectionError the sidecar could not be reached
     └── BizAPIError        the sidecar answered with a problem (RFC 9457)

Example::

    client = BizClient("http://127.0.0.1:8080", "crm", secret)
    answer = client.send("profile.updated", 1, {"fields": ["nickname"]}, users=["u1"])
    client.status(answer["id"])["status"]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from .signing import signature_headers


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
    """Signs requests with *secret* as *client_id* and sends them to *base_url*."""

    def __init__(self, base_url: str, client_id: str, secret: str, *, timeout: float = 10.0,
                 session: requests.Session | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        # signed as the request line has it: with the base URL's path (a mount prefix such as /biz)
        self._base_path = urlsplit(self.base_url).path
        self.client_id = client_id
        self._secret = secret
        self.timeout = timeout
        self.session = session or requests.Session()

    def send(self, type: str, version: int, data: Any, *, users: Sequence[str] | None = None,
             groups: Sequence[str] | None = None, priority: str | None = None,
             idempotency_key: str | None = None, collapse_key: str | None = None,
             ttl_seconds: int | None = None, offline: str | None = None,
             mode: str | None = None) -> dict[str, Any]:
        """Post one message; returns ``{"id", "status", "recipients"}``."""
        if (users is None) == (groups is None):
            raise ValueError("give exactly one of users or groups")
        body: dict[str, Any] = {"type": type, "version": version, "data": data,
                                "to": {"users": list(users)} if users is not None else {"groups": list(groups)}}
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
