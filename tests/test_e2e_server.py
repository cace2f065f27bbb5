"""End to end: the real ``openim-bizplugin serve`` process over real HTTP (SPEC §2–§4)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import jsonschema
import pytest
import requests
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from e2e_support import (CRM_SECRET, MAX_BODY_BYTES, OPS_SECRET, SCHEMAS_DIR, child_env, command,
                         config_tables, count_rows, running_server, signed_get, signed_post,
                         write_config, write_tables)
from openim_bizplugin.client import BizAPIError, BizClient
from openim_bizplugin.signing import signature_headers

PROBLEM_JSON = "application/problem+json"
PROFILE = {"type": "profile.updated", "version": 1, "data": {"fields": ["nickname"]}}


def shipped_versions() -> list[tuple[str, int, dict, dict]]:
    """(type, version, schema, type.toml) for every schema file in the repository."""
    found = []
    for folder in sorted(p for p in SCHEMAS_DIR.iterdir() if p.is_dir()):
        defaults = tomllib.loads((folder / "type.toml").read_text(encoding="utf-8"))
        for path in sorted(folder.glob("v*.json")):
            found.append((folder.name, int(path.stem[1:]), json.loads(path.read_text()), defaults))
    return found


def body(**fields: object) -> bytes:
    return json.dumps({**PROFILE, "to": {"users": ["u1"]}, **fields}).encode()


def moment(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text)


def assert_problem(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == PROBLEM_JSON
    problem = response.json()
    assert {"type", "title", "status", "detail"} <= problem.keys()
    assert problem["status"] == status
    assert all(isinstance(problem[k], str) and problem[k] for k in ("type", "title", "detail"))
    return problem


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with running_server(write_config(tmp_path_factory.mktemp("e2e"))) as running:
        yield running


@pytest.fixture
def crm(server) -> BizClient:
    return BizClient(server.url, "crm", CRM_SECRET)


@pytest.fixture
def ops(server) -> BizClient:
    return BizClient(server.url, "ops", OPS_SECRET)


def messages(server) -> int:
    return count_rows(server.db_path, "messages")


# --- accepting and reading back ---------------------------------------------------


def test_send_answers_202_with_unique_recipients_and_status_lists_each(server, crm):
    response = signed_post(server.url, body(to={"users": ["u1", "u2", "u1", "u3", "u2"]}))
    assert response.status_code == 202
    answer = response.json()
    assert answer.keys() == {"id", "status", "recipients"}
    assert (answer["status"], answer["recipients"]) == ("queued", 3)

    message = crm.status(answer["id"])
    assert (message["id"], message["client"], message["type"], message["version"]) == (
        answer["id"], "crm", "profile.updated", 1)
    assert [r["user_id"] for r in message["recipients"]] == ["u1", "u2", "u3"]
    assert {r["status"] for r in message["recipients"]} == {"queued"}
    assert message["status"] == "queued"
    ttl = tomllib.loads((SCHEMAS_DIR / "profile.updated/type.toml").read_text())["ttl_seconds"]
    lifetime = moment(message["expires_at"]) - moment(message["created_at"])
    assert lifetime.total_seconds() == ttl


def test_group_recipients_and_envelope_ttl(crm):
    answer = crm.send("order.status_changed", 1, {"order_id": "SO-1", "status": "paid",
                                                  "updated_at": "2026-11-26T12:00:00Z"},
                      groups=["g1", "g2", "g1"], ttl_seconds=600)
    assert (answer["status"], answer["recipients"]) == ("queued", 2)
    message = crm.status(answer["id"])
    assert [r.get("group_id") for r in message["recipients"]] == ["g1", "g2"]
    assert not any("user_id" in r for r in message["recipients"])
    assert (moment(message["expires_at"]) - moment(message["created_at"])).total_seconds() == 600


def test_types_lists_every_shipped_type_and_version(crm):
    listed = {(t["type"], t["version"]): t for t in crm.types()}
    shipped = shipped_versions()
    assert {("profile.updated", 1), ("profile.updated", 2), ("app.upgrade_available", 1),
            ("order.status_changed", 1), ("action.required", 1)} <= listed.keys()
    assert listed.keys() == {(name, version) for name, version, _, _ in shipped}
    for name, version, schema, type_toml in shipped:
        entry = listed[(name, version)]
        assert entry["schema"] == schema
        assert entry["deprecated"] is False
        assert {k: entry["defaults"][k] for k in type_toml} == type_toml


def test_a_client_cannot_read_another_clients_message(crm, ops):
    message_id = crm.send("profile.updated", 1, {"fields": ["email"]}, users=["u1"])["id"]
    with pytest.raises(BizAPIError) as other:
        ops.status(message_id)
    with pytest.raises(BizAPIError) as unknown:
        ops.status("f" * 32)
    assert other.value.status == unknown.value.status == 404
    assert other.value.problem["type"] == unknown.value.problem["type"]
    assert other.value.title == unknown.value.title
    assert other.value.detail.replace(message_id, "ID") == unknown.value.detail.replace("f" * 32, "ID")


# --- repeats: idempotency keys and replayed requests -------------------------------


def test_idempotency_key_in_body_returns_the_first_answer(server):
    compact = body(idempotency_key="e2e-body-key")
    spaced = json.dumps(json.loads(compact), indent=2).encode()  # same message, other bytes
    before = messages(server)
    first = signed_post(server.url, compact)
    again = signed_post(server.url, spaced)
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert messages(server) == before + 1


def test_idempotency_key_header_returns_the_first_answer(server):
    raw, key = body(), "e2e-header-key"
    before = messages(server)
    first = signed_post(server.url, raw, idempotency_key=key, now=time.time() - 5)
    again = signed_post(server.url, raw, idempotency_key=key)  # another signature: not a replay
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert messages(server) == before + 1


def test_same_idempotency_key_with_another_body_is_422(server):
    assert signed_post(server.url, body(idempotency_key="e2e-clash")).status_code == 202
    before = messages(server)
    other = body(idempotency_key="e2e-clash", data={"fields": ["phone"]})
    problem = assert_problem(signed_post(server.url, other), 422)
    assert "/idempotency_key" in [e["path"] for e in problem["errors"]]
    assert messages(server) == before


def test_replayed_signed_request_is_answered_like_the_first(server):
    raw = body(collapse_key="replay-test")
    headers = {"Content-Type": "application/json",
               **signature_headers("crm", CRM_SECRET, "POST", "/v1/messages", raw)}
    before = messages(server)
    first = requests.post(server.url + "/v1/messages", data=raw, headers=headers, timeout=10)
    again = requests.post(server.url + "/v1/messages", data=raw, headers=headers, timeout=10)
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()

    value, stamp, signature = headers["X-Biz-Signature"].split(".")
    respelled = dict(headers, **{"X-Biz-Signature": f"{value}.{stamp}.{signature}="})
    third = requests.post(server.url + "/v1/messages", data=raw, headers=respelled, timeout=10)
    assert third.status_code == 202
    assert third.json() == first.json()
    assert messages(server) == before + 1


# --- limits and errors ---------------------------------------------------------------


def oversized() -> bytes:
    return body(data={"fields": ["nickname"], "updated_at": "x" * (MAX_BODY_BYTES * 2)})


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_limit_is_413_and_nothing_is_stored(server, crm, chunked):
    raw = oversized()
    before = messages(server)
    headers = {"Content-Type": "application/json",
               **signature_headers("crm", CRM_SECRET, "POST", "/v1/messages", raw)}
    data = (raw[i:i + 1000] for i in range(0, len(raw), 1000)) if chunked else raw
    response = requests.post(server.url + "/v1/messages", data=data, headers=headers, timeout=10)
    assert ("Transfer-Encoding" in response.request.headers) == chunked
    assert_problem(response, 413)
    assert messages(server) == before
    assert crm.send("profile.updated", 1, {"fields": ["ex"]}, users=["after-413"])["status"] == "queued"


ERROR_REQUESTS = {
    400: lambda url: signed_post(url, b'{"type": NaN}'),
    401: lambda url: signed_post(url, body(), secret="not-the-right-secret-0000"),
    403: lambda url: signed_post(url, json.dumps({"type": "app.upgrade_available", "version": 1,
                                                  "data": {}, "to": {"users": ["u1"]}}).encode()),
    404: lambda url: signed_post(url, body(type="profile.no_such_type")),
    405: lambda url: signed_get(url, "/v1/messages"),
    415: lambda url: signed_post(url, body(), content_type="text/plain"),
    422: lambda url: signed_post(url, body(data={"fields": ["shoe size"]})),
}


@pytest.mark.parametrize("status", sorted(ERROR_REQUESTS))
def test_every_error_is_a_problem_document(server, status):
    assert_problem(ERROR_REQUESTS[status](server.url), status)


def test_unknown_route_is_a_problem_document(server):
    assert_problem(signed_get(server.url, "/v1/no-such-thing"), 404)


def test_server_keeps_answering_after_many_requests(tmp_path):
    # A small container allows few open files; a server must not use one per request.
    with running_server(write_config(tmp_path), max_open_files=256) as running:
        client = BizClient(running.url, "crm", CRM_SECRET, timeout=5)
        message_id = client.send("profile.updated", 1, {"fields": ["ex"]}, users=["u1"])["id"]
        for _ in range(300):
            assert client.status(message_id)["id"] == message_id


# --- several processes, crashes ----------------------------------------------------


def test_two_servers_share_one_sqlite_file(tmp_path):
    db = tmp_path / "shared.db"
    configs = [write_config(tmp_path, db_path=db, name=f"{n}.toml") for n in ("a", "b")]
    with running_server(configs[0]) as a, running_server(configs[1]) as b:
        def send(job: tuple[str, str]) -> requests.Response:
            url, n = job  # distinct bodies: identical signed requests would be replays
            return signed_post(url, body(to={"users": [f"x{n}", f"y{n}", f"x{n}"]}), client="ops")

        jobs = [(s.url, f"{name}{i}") for i in range(50) for name, s in (("a", a), ("b", b))]
        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(send, jobs))
    assert [r.status_code for r in answers] == [202] * 100
    assert len({r.json()["id"] for r in answers}) == 100
    assert count_rows(db, "messages") == 100
    assert count_rows(db, "recipients") == 200
    for running in (a, b):
        assert "database is locked" not in running.stderr()


def test_a_202_survives_kill_9(tmp_path):
    config = write_config(tmp_path)
    with running_server(config) as first:
        answer = BizClient(first.url, "crm", CRM_SECRET).send(
            "profile.updated", 1, {"fields": ["nickname"]}, users=["k1", "k2", "k3"])
        first.process.kill()
        first.process.wait(timeout=10)
    with running_server(config) as second:
        message = BizClient(second.url, "crm", CRM_SECRET).status(answer["id"])
    assert [r["user_id"] for r in message["recipients"]] == ["k1", "k2", "k3"]
    assert {r["status"] for r in message["recipients"]} == {"queued"}


# --- OpenAPI ---------------------------------------------------------------------------


def test_openapi_describes_exactly_the_envelopes_the_server_accepts(server, ops):
    response = requests.get(server.url + "/openapi.json", timeout=10)
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"] == "3.1.0"
    registry = Registry().with_resource(
        "urn:openapi", Resource.from_contents(document, default_specification=DRAFT202012))
    validator = jsonschema.Draft202012Validator(
        {"$ref": "urn:openapi#/components/schemas/MessageRequest"}, registry=registry)
    for name, version, schema, _ in shipped_versions():
        envelope = {"type": name, "version": version, "data": schema["examples"][0],
                    "to": {"users": ["openapi-user"]}}
        assert list(validator.iter_errors(envelope)) == [], (name, version)
        assert ops.send(name, version, envelope["data"], users=["openapi-user"])["status"] == "queued"
        wrong = dict(envelope, data={"surely_not_a_field": 1})
        assert not validator.is_valid(wrong), (name, version)


# --- configuration errors --------------------------------------------------------------


def _break_schema(tmp_path: Path, tables: dict) -> str:
    copy = tmp_path / "schemas"
    shutil.copytree(SCHEMAS_DIR, copy)
    broken = copy / "order.status_changed" / "v1.json"
    broken.write_text('{"type": "object", "properties": ')
    tables["schemas"]["dir"] = str(copy)
    return str(broken)


def _drop_openim(tmp_path: Path, tables: dict) -> str:
    del tables["openim"]
    return "openim"


def _port_text(tmp_path: Path, tables: dict) -> str:
    tables["server"]["port"] = "x"
    return "server.port"


def _unset_secret(tmp_path: Path, tables: dict) -> str:
    tables["openim"]["secret"] = "env:NOPE_NOT_SET"
    return "openim.secret"


@pytest.mark.parametrize("spoil", [_drop_openim, _port_text, _unset_secret, _break_schema],
                         ids=["missing-openim", "port-not-int", "env-secret-unset", "broken-schema"])
def test_bad_config_stops_start_up_with_one_line(tmp_path, spoil):
    tables = config_tables(tmp_path / "bizplugin.db")
    named = spoil(tmp_path, tables)
    config = write_tables(tmp_path / "config.toml", tables)
    env = child_env()
    env.pop("NOPE_NOT_SET", None)
    started = time.monotonic()
    done = subprocess.run([*command(), "serve", "-c", str(config)], capture_output=True, text=True,
                          timeout=15, env=env, stdin=subprocess.DEVNULL)
    assert time.monotonic() - started < 10
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert named in lines[0]
    assert "Traceback" not in done.stderr
    assert "listening" not in done.stdout
