"""``GET /metrics``: Prometheus text from the app's own registry.

Counters are driven through the real surfaces -- signed API requests, OpenIM
callbacks, delivery rounds against the loopback fake OpenIM -- and read back
by parsing the exposition, as Prometheus would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Signed, message
from openim_bizplugin.web.app import create_app
from openim_bizplugin.errors import StorageUnavailable
from openim_bizplugin.counters import Metrics
from openim_bizplugin.testing import FakeOpenIM

CALLBACK_URL = "/openim/callback/test-callback-token-0001"
FAMILIES = {
    "bizplugin_messages_accepted", "bizplugin_requests_rejected", "bizplugin_recipients_sent",
    "bizplugin_recipients_failed", "bizplugin_recipients_retried", "bizplugin_recipients_held",
    "bizplugin_recipients_skipped", "bizplugin_recipients_throttled", "bizplugin_callbacks_received",
    "bizplugin_callbacks_processed", "bizplugin_openim_request_duration_seconds", "bizplugin_queue_depth",
}


class Scrape:
    """One parsed ``/metrics`` answer."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, sample: str, **labels: str) -> float:
        """The value of *sample* with exactly these labels; 0 when it is not there (yet)."""
        family = self.families.get(sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum"))
        for s in family.samples if family else ():
            if s.name == sample and s.labels == labels:
                return s.value
        return 0.0


def scrape(app: Any) -> Scrape:
    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    return Scrape(response.get_data(as_text=True))


@pytest.fixture
def fake() -> Iterator[FakeOpenIM]:
    with FakeOpenIM(users=["u1", "u2", "u3"], online=["u1"]) as im:
        yield im


@pytest.fixture
def config_overrides(request: pytest.FixtureRequest) -> dict[str, Any]:
    if "fake" not in request.fixturenames:
        return {}
    fake = request.getfixturevalue("fake")
    return {"openim": {"api_url": fake.url, "timeout_seconds": 2}}


def example(app: Any, type_name: str) -> dict[str, Any]:
    return app.extensions["bizplugin"].catalog.get(type_name).schemas[1]["examples"][0]


def deliver(app: Any) -> None:
    engine = app.extensions["bizplugin"].engine
    while engine.step():
        pass


def test_every_family_is_described_before_anything_happened(app):
    assert FAMILIES <= set(scrape(app).families)


def test_accepted_rejected_and_queue_depth_by_priority(app, signed):
    assert signed.post(message()).status_code == 202
    assert signed.post(message(to={"users": ["u9"]}, priority="high")).status_code == 202
    assert app.test_client().post("/v1/messages", json=message()).status_code == 401
    keyed = message(data={"fields": ["phone"]})
    assert signed.post(keyed, idempotency_key="k1").status_code == 202
    signed.clock.advance(1)  # a new signature: not a replay, but the same key
    assert signed.post(keyed, idempotency_key="k1").status_code == 202
    assert app.test_client().get("/nowhere").status_code == 404
    got = scrape(app)
    assert got.value("bizplugin_messages_accepted_total", client="crm", type="profile.updated") == 3
    assert got.value("bizplugin_requests_rejected_total", reason="bad-signature", status="401") == 1
    assert got.value("bizplugin_requests_rejected_total", reason="routing", status="404") == 1
    assert got.value("bizplugin_queue_depth", priority="normal") == 4
    assert got.value("bizplugin_queue_depth", priority="high") == 1
    assert got.value("bizplugin_queue_depth", priority="low") == 0


def test_delivery_outcomes_and_openim_latency_by_endpoint_and_errcode(app, signed, fake):
    ops = Signed(app.test_client(), signed.clock)
    openim = app.extensions["bizplugin"].openim
    openim.admin_token()
    fake.expire_tokens()  # the first call (the presence check) is refused (1501), repeated with a fresh token
    fake.set_online("u2", [1])
    upgrade = {"type": "app.upgrade_available", "version": 1, "data": example(app, "app.upgrade_available")}
    assert ops.post(message(to={"users": ["u1"]}), as_client="ops").status_code == 202
    assert ops.post({**upgrade, "to": {"users": ["u3"]}}, as_client="ops").status_code == 202  # offline: held
    for n in range(2):  # 1/day, policy drop: the second is throttled
        answer = ops.post({**upgrade, "to": {"users": ["u2"]}, "ttl_seconds": 600 + n}, as_client="ops")
        assert answer.status_code == 202
    deliver(app)

    fake.fail_next("/msg/send_business_notification", http_status=502, body=b"502 Bad Gateway")
    fake.fail_next("/msg/send_business_notification", err_code=1004)  # not found: permanent
    assert ops.post(message(to={"users": ["u1", "u2"]}), as_client="ops").status_code == 202
    deliver(app)

    got = scrape(app)
    notify, online = "/msg/send_business_notification", "/user/get_users_online_status"
    assert got.value("bizplugin_recipients_sent_total", type="profile.updated") == 1
    assert got.value("bizplugin_recipients_sent_total", type="app.upgrade_available") == 1
    assert got.value("bizplugin_recipients_held_total", type="app.upgrade_available") == 1
    assert got.value("bizplugin_recipients_throttled_total", type="app.upgrade_available", policy="drop") == 1
    assert got.value("bizplugin_recipients_retried_total", type="profile.updated") == 1
    assert got.value("bizplugin_recipients_failed_total", type="profile.updated") == 1
    assert got.value("bizplugin_openim_request_duration_seconds_count", endpoint=online, err_code="1501") == 1
    # and once per round of persistent notifications: an app that is offline gets them only when held
    assert got.value("bizplugin_openim_request_duration_seconds_count", endpoint=online, err_code="0") == 2
    assert got.value("bizplugin_openim_request_duration_seconds_count", endpoint=notify, err_code="http-502") == 1
    assert got.value("bizplugin_openim_request_duration_seconds_count", endpoint=notify, err_code="1004") == 1
    assert got.value("bizplugin_openim_request_duration_seconds_count", endpoint=notify, err_code="0") == 2
    assert got.value("bizplugin_openim_request_duration_seconds_count", endpoint="/auth/get_admin_token",
                     err_code="0") == 2
    assert got.value("bizplugin_openim_request_duration_seconds_sum", endpoint=notify, err_code="0") > 0
    assert got.value("bizplugin_queue_depth", priority="normal") == 1  # the retry waits for its backoff


def test_a_rate_limit_delay_counts_as_throttled_not_as_a_retry(app, signed, fake):
    for n in range(11):  # profile.updated: 10/hour, delay
        assert signed.post(message(to={"users": ["u1"]}, ttl_seconds=600 + n)).status_code == 202
    deliver(app)
    got = scrape(app)
    assert got.value("bizplugin_recipients_sent_total", type="profile.updated") == 10
    assert got.value("bizplugin_recipients_throttled_total", type="profile.updated", policy="delay") == 1
    assert got.value("bizplugin_recipients_retried_total", type="profile.updated") == 0


def test_callbacks_by_command_and_result(app, fake):
    client = app.test_client()
    online = json.dumps(fake.user_online("u1", 1, seq=5))
    command = "callbackAfterUserOnlineCommand"
    for body in (online, online):
        assert client.post(f"{CALLBACK_URL}/{command}", data=body).status_code == 200
    assert client.post(f"{CALLBACK_URL}/callbackSomethingNew", data=online).status_code == 200
    assert client.post(f"{CALLBACK_URL}/{command}", data=b"{not json").status_code == 200
    assert client.post(f"/openim/callback/wrong-token-0000000000/{command}", data=online).status_code == 404
    app.extensions["bizplugin"].callbacks.step()
    got = scrape(app)
    assert got.value("bizplugin_callbacks_received_total", command=command, result="stored") == 1
    assert got.value("bizplugin_callbacks_received_total", command=command, result="duplicate") == 1
    assert got.value("bizplugin_callbacks_received_total", command=command, result="unparseable") == 1
    assert got.value("bizplugin_callbacks_received_total", command="other", result="ignored") == 1
    assert got.value("bizplugin_callbacks_processed_total", command=command, result="applied") == 1
    # a wrong token is answered as any unknown path is
    assert got.value("bizplugin_requests_rejected_total", reason="routing", status="404") == 1


def test_each_app_counts_in_its_own_registry(app, signed, config, clock):
    other = create_app(config, clock=clock)
    try:
        assert signed.post(message()).status_code == 202
        assert scrape(app).value("bizplugin_messages_accepted_total", client="crm", type="profile.updated") == 1
        assert scrape(other).value("bizplugin_messages_accepted_total", client="crm", type="profile.updated") == 0
    finally:
        other.extensions["bizplugin"].close()


class _StalledStore:
    """The one store method a scrape calls, failing as a store that cannot be reached does."""

    def queue_depth(self) -> dict[str, int]:
        raise StorageUnavailable("database is locked")


def test_a_store_that_does_not_answer_leaves_out_the_gauge_not_the_counters(caplog):
    metrics = Metrics(_StalledStore())  # type: ignore[arg-type]
    metrics.accepted("crm", "profile.updated")
    got = Scrape(metrics.exposition().decode())
    assert "bizplugin_queue_depth" not in got.families
    assert got.value("bizplugin_messages_accepted_total", client="crm", type="profile.updated") == 1
    assert "queue depth left out of /metrics: database is locked" in caplog.text
