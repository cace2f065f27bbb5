"""The /v1 API through Flask's test client: each bad input gets its status."""

from __future__ import annotations

import json

import pytest

from conftest import SECRETS, message
from openim_bizplugin.signing import signature_headers


def _count(store, table: str) -> int:
    return store._read(f"SELECT COUNT(*) FROM {table}")[0][0]


def _problem(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body = response.get_json(force=True)
    assert body["status"] == status and body["title"] and body["detail"] and body["type"]
    return body


def test_accepted_message_is_stored_with_one_row_per_unique_recipient(signed, store):
    response = signed.post(message(to={"users": ["u1", "u2", "u1"]}))
    assert response.status_code == 202
    answer = response.get_json()
    assert answer["status"] == "queued" and answer["recipients"] == 2
    assert _count(store, "recipients") == 2
    shown = signed.get(f"/v1/messages/{answer['id']}").get_json()
    assert [r["user_id"] for r in shown["recipients"]] == ["u1", "u2"]
    assert {r["status"] for r in shown["recipients"]} == {"queued"}
    assert shown["status"] == "queued" and shown["client"] == "crm"


def test_defaults_come_from_type_toml_and_envelope_overrides_them(signed):
    first = signed.post(message()).get_json()
    shown = signed.get(f"/v1/messages/{first['id']}").get_json()
    assert (shown["priority"], shown["mode"], shown["offline"]) == ("normal", "notification", "store")
    assert shown["created_at"] == "2026-11-26T12:00:00.000Z"
    assert shown["expires_at"] == "2026-11-27T12:00:00.000Z"
    second = signed.post(message(priority="high", ttl_seconds=60, offline="hold", mode="custom")).get_json()
    shown = signed.get(f"/v1/messages/{second['id']}").get_json()
    assert (shown["priority"], shown["mode"], shown["offline"]) == ("high", "custom", "hold")
    assert shown["expires_at"] == "2026-11-26T12:01:00.000Z"


def test_group_recipients_are_shown_with_group_id(signed):
    answer = signed.post(message(to={"groups": ["g_ops"]})).get_json()
    shown = signed.get(f"/v1/messages/{answer['id']}").get_json()
    assert shown["recipients"][0]["group_id"] == "g_ops"
    assert "user_id" not in shown["recipients"][0]


@pytest.mark.parametrize("raw, fragment", [
    (b'{"type": "profile.updated",', "not valid JSON"),
    (b'{"type": NaN}', "NaN"),
    (b'{"type": "a", "type": "b"}', "duplicate key"),
    (b'{"type": "\xff"}', "UTF-8"),
    (b"[" * 65 + b"]" * 65, "nesting"),
    (b"[" * 20_000, "nesting"),
], ids=["truncated", "nan", "duplicate", "utf8", "depth65", "depth20000"])
def test_malformed_json_is_400_and_stores_nothing(signed, store, raw, fragment):
    assert fragment in _problem(signed.post(raw), 400)["detail"]
    assert _count(store, "messages") == 0


def test_integers_beyond_2_53_are_422_with_their_path(signed):
    body = _problem(signed.post(message(data={"fields": ["nickname"], "n": 2**53 + 1})), 422)
    assert body["errors"][0]["path"] == "/data/n"


def test_missing_signature_is_401(signed):
    response = signed.client.post("/v1/messages", data=json.dumps(message()),
                                  headers={"Content-Type": "application/json"})
    assert "X-Biz-Client" in _problem(response, 401)["detail"]


def test_signature_of_another_body_is_401(signed, store):
    from openim_bizplugin.signing import signature_headers
    from conftest import SECRETS
    headers = signature_headers("crm", SECRETS["crm"], "POST", "/v1/messages", b"{}", now=signed.clock())
    headers["Content-Type"] = "application/json"
    _problem(signed.client.post("/v1/messages", data=json.dumps(message()), headers=headers), 401)
    assert _count(store, "messages") == 0


def test_expired_and_future_signatures_are_401(signed, clock):
    _problem(signed.post(message(), signed_at=clock() - 301), 401)
    _problem(signed.post(message(), signed_at=clock() + 31), 401)
    assert signed.post(message(), signed_at=clock() + 30).status_code == 202


def test_type_not_allowed_for_client_is_403(signed):
    body = message(type="app.upgrade_available", data={})
    assert "app.upgrade_available" in _problem(signed.post(body), 403)["detail"]


def test_unknown_type_or_version_is_404(signed):
    _problem(signed.post(message(type="profile.deleted")), 404)
    assert "known: 1, 2" in _problem(signed.post(message(version=9)), 404)["detail"]


def test_unknown_and_foreign_messages_are_404(signed):
    answer = signed.post(message()).get_json()
    _problem(signed.get("/v1/messages/nope"), 404)
    _problem(signed.get(f"/v1/messages/{answer['id']}", as_client="ops"), 404)


def test_body_over_limit_is_413_before_parsing(signed, config):
    raw = b'{"pad": "' + b"x" * config.server.max_body_bytes + b'"}'
    _problem(signed.post(raw), 413)


def test_not_json_content_type_is_415(signed):
    _problem(signed.post(message(), headers={"Content-Type": "text/plain"}), 415)


def test_schema_violations_list_each_path(signed):
    body = _problem(signed.post(message(data={"fields": ["nickname", 7], "extra": 1})), 422)
    paths = [e["path"] for e in body["errors"]]
    assert "/data/fields/1" in paths and "/data" in paths


@pytest.mark.parametrize("envelope_change, path", [
    ({"to": {}}, "/to"),
    ({"to": {"users": ["u1"], "groups": ["g1"]}}, "/to"),
    ({"to": {"users": []}}, "/to/users"),
    ({"priority": "urgent"}, "/priority"),
    ({"ttl_seconds": 0}, "/ttl_seconds"),
    ({"surprise": True}, ""),
    ({"version": "1"}, "/version"),
])
def test_envelope_violations_are_422_with_path(signed, envelope_change, path):
    body = _problem(signed.post(message(**envelope_change)), 422)
    assert path in [e["path"] for e in body["errors"]]


@pytest.mark.parametrize("bad_id", ["", "u1\n", " u1", "u1 ", "a" * 129, "u\x00x", "u\x7fx", "u\x85x", "u\ud800"])
def test_bad_recipient_ids_are_422(signed, store, bad_id):
    raw = json.dumps(message(to={"users": ["ok", bad_id]})).encode()
    body = _problem(signed.post(raw), 422)
    assert body["errors"][0]["path"] in ("/to/users/1",)
    assert _count(store, "messages") == 0


def test_recipients_over_the_cap_are_422(signed, config):
    users = [f"u{i}" for i in range(config.server.max_recipients + 1)]
    assert "cap" in _problem(signed.post(message(to={"users": users})), 422)["detail"]


def test_idempotency_key_repeats_first_answer(signed, store):
    first = signed.post(message(idempotency_key="crm-42"))
    again = signed.post(message(idempotency_key="crm-42"))
    by_header = signed.post(message(), idempotency_key="crm-42")
    assert first.status_code == again.status_code == by_header.status_code == 202
    assert first.get_json() == again.get_json() == by_header.get_json()
    assert _count(store, "messages") == 1


def test_an_added_idempotency_key_header_cannot_turn_a_new_message_into_an_old_answer(signed, store, clock):
    """Someone on the path who can add a header (not sign) must not make a signed request answer an
    earlier message's id and send nothing: the signature covers the header when it is there."""
    first = signed.post(message(), idempotency_key="crm-daily-prompt")
    assert first.status_code == 202
    clock.advance(3600)  # the next day's prompt: the same body, signed afresh, no key
    raw = json.dumps(message()).encode()
    sent = signature_headers("crm", SECRETS["crm"], "POST", "/v1/messages", raw, now=clock())
    sent.update({"Content-Type": "application/json", "Idempotency-Key": "crm-daily-prompt"})  # added on the way
    hijacked = signed.client.post("/v1/messages", data=raw, headers=sent)
    assert "Idempotency-Key header" in _problem(hijacked, 401)["detail"]
    assert _count(store, "messages") == 1
    del sent["Idempotency-Key"]
    second = signed.client.post("/v1/messages", data=raw, headers=sent)
    assert second.status_code == 202 and second.get_json()["id"] != first.get_json()["id"]
    assert _count(store, "messages") == 2


def test_idempotency_key_with_other_body_is_422(signed):
    signed.post(message(idempotency_key="crm-42"))
    body = _problem(signed.post(message(idempotency_key="crm-42", to={"users": ["u9"]})), 422)
    assert body["errors"][0]["path"] == "/idempotency_key"


def test_idempotency_key_is_per_client_and_expires(signed, clock, store):
    signed.post(message(idempotency_key="k"))
    signed.post(message(type="order.status_changed", data=_order(), idempotency_key="k"), as_client="ops")
    clock.advance(86_401)
    signed.post(message(idempotency_key="k"))
    assert _count(store, "messages") == 3


def _order() -> dict:
    return {"order_id": "A1", "status": "paid", "updated_at": "2026-11-26T12:00:00Z"}


def test_replayed_signed_request_is_answered_like_the_first(signed, store):
    from openim_bizplugin.signing import signature_headers
    from conftest import SECRETS
    raw = json.dumps(message()).encode()
    headers = signature_headers("crm", SECRETS["crm"], "POST", "/v1/messages", raw, now=signed.clock())
    headers["Content-Type"] = "application/json"
    first = signed.client.post("/v1/messages", data=raw, headers=headers)
    value, ts, sig = headers["X-Biz-Signature"].split(".")
    headers["X-Biz-Signature"] = f"{value}.{ts}.{sig}=="  # itsdangerous decodes this spelling too
    again = signed.client.post("/v1/messages", data=raw, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.get_json() == again.get_json()
    assert _count(store, "messages") == 1


def test_a_replay_gets_the_first_answer_even_after_its_type_left_the_catalogue(tmp_path, clock):
    import shutil
    from openim_bizplugin.web.app import create_app
    from openim_bizplugin.config import load_config
    from conftest import REPO, Signed, write_config
    shutil.copytree(REPO / "schemas", tmp_path / "schemas")
    config = load_config(write_config(tmp_path, {"schemas": {"dir": "schemas"}}))
    first = Signed(create_app(config, clock=clock).test_client(), clock).post(message())
    shutil.rmtree(tmp_path / "schemas" / "profile.updated")  # a restart with a catalogue without the type
    restarted = Signed(create_app(load_config(write_config(tmp_path, {"schemas": {"dir": "schemas"}})),
                                  clock=clock).test_client(), clock)
    replayed = restarted.post(message())  # the same signed request again
    assert first.status_code == replayed.status_code == 202
    assert replayed.get_json() == first.get_json()
    _problem(restarted.post(message(idempotency_key="new")), 404)  # a new request meets the new catalogue


def test_deprecated_version_is_accepted_with_deprecation_header(tmp_path, clock):
    import shutil
    from openim_bizplugin.web.app import create_app
    from openim_bizplugin.config import load_config
    from conftest import REPO, Signed, write_config
    shutil.copytree(REPO / "schemas", tmp_path / "schemas")
    toml = tmp_path / "schemas" / "profile.updated" / "type.toml"
    toml.write_text(toml.read_text().replace("deprecated_versions = []", "deprecated_versions = [1]"))
    app = create_app(load_config(write_config(tmp_path, {"schemas": {"dir": "schemas"}})), clock=clock)
    client = Signed(app.test_client(), clock)
    body = message()
    first, replayed = client.post(body), client.post(body)  # the same signed request twice: a replay
    assert first.headers["Deprecation"] == replayed.headers["Deprecation"] == "true"
    assert replayed.get_json() == first.get_json()
    assert "Deprecation" not in client.post(message(version=2)).headers
    listed = {(t["type"], t["version"]): t for t in client.get("/v1/types").get_json()["types"]}
    assert listed[("profile.updated", 1)]["deprecated"] is True


def test_types_lists_every_version_with_schema_and_defaults(signed):
    types = signed.get("/v1/types").get_json()["types"]
    listed = {(t["type"], t["version"]) for t in types}
    assert {("profile.updated", 1), ("profile.updated", 2), ("action.required", 1)} <= listed
    action = next(t for t in types if t["type"] == "action.required")
    assert action["defaults"]["mode"] == "custom" and action["schema"]["type"] == "object"


def test_types_needs_a_signature(signed):
    _problem(signed.client.get("/v1/types"), 401)


def test_openapi_describes_v1_with_every_type(signed):
    doc = signed.client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {"/v1/messages", "/v1/messages/{id}", "/v1/types"}
    assert "profile.updated.v2" in doc["components"]["schemas"]


def test_unknown_route_and_method_are_problem_json(signed):
    _problem(signed.client.get("/v2/nothing"), 404)
    _problem(signed.client.delete("/v1/messages"), 405)


@pytest.mark.parametrize("body", [
    message(), message(priority="high", ttl_seconds=5, offline="drop", mode="custom", collapse_key="c",
                       idempotency_key="k"),
    message(to={"groups": ["g"]}), message(version=True), message(version=0), message(to={"users": [1]}),
    message(to={"users": []}), message(to={"users": ["a"], "groups": ["b"]}), message(to={"people": ["a"]}),
    message(priority="urgent"), message(ttl_seconds=1.5), message(ttl_seconds=10**9), message(collapse_key=""),
    message(idempotency_key="with space"), message(extra=1), {"type": "x", "version": 1, "to": {"users": ["a"]}},
    message(type=""), message(type=5), [], "text", None,
], ids=lambda b: json.dumps(b)[:40])
def test_quick_envelope_check_never_passes_what_the_schema_refuses(body):
    from jsonschema import Draft202012Validator
    from openim_bizplugin.envelope import ENVELOPE_SCHEMA, plainly_valid
    if plainly_valid(body):
        assert Draft202012Validator(ENVELOPE_SCHEMA).is_valid(body)
    assert plainly_valid(body) == Draft202012Validator(ENVELOPE_SCHEMA).is_valid(body)


@pytest.mark.parametrize("config_overrides", [
    {"clients": {"crm": {"secrets": ["crm-test-secret-0000000001"], "allowed_types": ["profile.*"],
                         "rate_limit": "2/second"}}}])
def test_client_over_its_rate_limit_gets_429_with_retry_after(signed, clock, store):
    assert [signed.post(message(idempotency_key=f"k{i}")).status_code for i in range(2)] == [202, 202]
    limited = signed.post(message(idempotency_key="k3"))
    assert _problem(limited, 429)["detail"].endswith("2/second")
    # a sliding window counter: the full second still weighs half once the next one is half over
    assert limited.headers["Retry-After"] == "2"
    assert signed.get("/v1/types", as_client="ops").status_code == 200  # other clients unaffected
    clock.advance(1.0)
    assert signed.post(message(idempotency_key="k4")).status_code == 429
    clock.advance(0.5)
    assert signed.post(message(idempotency_key="k5")).status_code == 202
    assert _count(store, "messages") == 3
