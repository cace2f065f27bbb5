"""Fixtures: config → app → client, with an injected clock.

``signed`` sends requests through Flask's test client with real signatures,
timestamped by the same clock the app reads, so expiry tests never sleep.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from openim_bizplugin.web.app import create_app
from openim_bizplugin.config import load_config
from openim_bizplugin.signing import signature_headers

# the stores' shared tests (imported by test_store_contract and test_store_sqlite): failures show their values
pytest.register_assert_rewrite("store_contract")

REPO = Path(__file__).resolve().parents[1]
SECRETS = {"crm": "crm-test-secret-0000000001", "ops": "ops-test-secret-0000000001"}

BASE_CONFIG: dict[str, Any] = {
    "server": {"host": "127.0.0.1", "port": 0, "max_body_bytes": 65536, "max_recipients": 50},
    # tests say which OpenIM release they simulate (FakeOpenIM's default flavor), so nothing is probed
    "openim": {"api_url": "http://127.0.0.1:1", "secret": "openIM123", "admin_user_id": "imAdmin",
               "sender_id": "imAdmin", "version": "main"},
    "callbacks": {"token": "test-callback-token-0001"},
    "storage": {"url": "sqlite:///bizplugin.db"},
    "schemas": {"dir": str(REPO / "schemas")},
    "clients": {
        "crm": {"secrets": [SECRETS["crm"]], "allowed_types": ["profile.*", "order.status_changed"]},
        "ops": {"secrets": [SECRETS["ops"]], "allowed_types": ["*"]},
    },
}


def toml_dumps(data: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for config files: tables of scalars and lists."""
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    text = "\n".join(lines) + "\n"
    for key, value in tables:
        name = f"{prefix}.{key}" if prefix else key
        text += f"\n[{name}]\n" + toml_dumps(value, name)
    return text


def write_config(folder: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Write the base test config, with *overrides* merged per table, into *folder*."""
    data = copy.deepcopy(BASE_CONFIG)
    for table, values in (overrides or {}).items():
        data.setdefault(table, {}).update(values)
    path = folder / "config.toml"
    path.write_text(toml_dumps(data))
    return path


class Clock:
    """A settable clock: ``clock()`` returns ``clock.now``."""

    def __init__(self, now: float = 1_795_694_400.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Signed:
    """Sends signed requests through a Flask test client."""

    def __init__(self, client: Any, clock: Clock) -> None:
        self.client, self.clock = client, clock

    def request(self, method: str, path: str, body: bytes | dict | None = None, *, as_client: str = "crm",
                headers: dict[str, str] | None = None, signed_at: float | None = None,
                idempotency_key: str | None = None) -> Any:
        """Sign and send; *idempotency_key* is sent as the header the signature covers."""
        raw = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
        all_headers = signature_headers(as_client, SECRETS[as_client], method, path, raw,
                                        now=self.clock() if signed_at is None else signed_at,
                                        idempotency_key=idempotency_key)
        if method == "POST":
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        return self.client.open(path, method=method, data=raw, headers=all_headers)

    def post(self, body: bytes | dict, **kwargs: Any) -> Any:
        return self.request("POST", "/v1/messages", body, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def config_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
def config(tmp_path: Path, config_overrides: dict[str, Any]) -> Any:
    return load_config(write_config(tmp_path, config_overrides))


@pytest.fixture
def app(config: Any, clock: Clock) -> Any:
    app = create_app(config, clock=clock)
    yield app
    app.extensions["bizplugin"].close()


@pytest.fixture
def store(app: Any) -> Any:
    return app.extensions["bizplugin"].store


@pytest.fixture
def signed(app: Any, clock: Clock) -> Signed:
    return Signed(app.test_client(), clock)


def message(**overrides: Any) -> dict[str, Any]:
    """A valid profile.updated v1 envelope."""
    body = {"type": "profile.updated", "version": 1, "data": {"fields": ["nickname"]},
            "to": {"users": ["u1", "u2"]}}
    body.update(overrides)
    return body
