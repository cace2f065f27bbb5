"""A schemathesis run against the project's own OpenAPI description of ``/v1``.

The app is served over real HTTP; every generated request is signed on the
way out by a ``requests`` auth hook, which sees the final method, path with
query and body bytes — exactly what SPEC §3 signs — so the fuzzer reaches
the envelope and schema checks instead of stopping at 401. Checks: no 5xx,
status codes, content types and bodies as the description says.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)
from werkzeug.serving import make_server

from conftest import SECRETS, message
from openim_bizplugin.signing import signature_headers

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


class SignedAuth(requests.auth.AuthBase):
    """Signs the prepared request (method, path with query, Idempotency-Key, raw body) as ``client``."""

    def __init__(self, clock: Callable[[], float], client: str = "ops") -> None:
        self.clock, self.client = clock, client

    def __call__(self, prepared: requests.PreparedRequest) -> requests.PreparedRequest:
        body = prepared.body or b""
        body = body.encode() if isinstance(body, str) else body
        prepared.headers.update(signature_headers(self.client, SECRETS[self.client], prepared.method or "GET",
                                                  prepared.path_url, body, now=self.clock(),
                                                  idempotency_key=prepared.headers.get("Idempotency-Key")))
        return prepared


@pytest.fixture
def base_url(app: Any) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.port}"
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def api_schema(app: Any) -> Any:
    document = app.test_client().get("/openapi.json").get_json()
    return schemathesis.openapi.from_dict(document)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_v1_conforms_to_its_openapi_description(case: Any, base_url: str, clock: Any) -> None:
    response = case.call(base_url=base_url, auth=SignedAuth(clock))
    case.validate_response(response, checks=CHECKS)


def test_the_auth_hook_signs_what_is_sent(base_url: str, clock: Any) -> None:
    """Without this, a hook that signed wrongly would pass the run above on 401s alone."""
    sent = requests.post(base_url + "/v1/messages", json=message(), auth=SignedAuth(clock), timeout=10)
    assert sent.status_code == 202, sent.text
    shown = requests.get(f"{base_url}/v1/messages/{sent.json()['id']}?x=%2F", auth=SignedAuth(clock), timeout=10)
    assert shown.status_code == 200 and shown.json()["client"] == "ops"  # signed with its query as sent
