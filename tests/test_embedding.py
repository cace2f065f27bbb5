"""The plugin mounted in a host Flask app (SPEC §9), in this process through Flask's test client.

The end-to-end proof, a host on a real prefork server, is in test_embedding_e2e.py.
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
from flask import Flask, session

from conftest import BASE_CONFIG, SECRETS, Signed, write_config
from openim_bizplugin.errors import BizError, ConfigError
from openim_bizplugin.testing import FakeOpenIM
from openim_bizplugin.web import BizPlugin
from openim_bizplugin.web.app import create_app

PROBLEM_JSON = "application/problem+json"
UI_TOKEN = "operator-token-0123456789abcdef"
HOST_404 = "<h1>Shop</h1> no such page"
PROFILE = {"type": "profile.updated", "version": 1, "data": {"fields": ["nickname"]}}


def settings(**tables: dict[str, Any]) -> dict[str, Any]:
    """The test config as a mapping (storage relative to the current directory), tables merged in."""
    data = copy.deepcopy(BASE_CONFIG)
    for name, values in tables.items():
        data.setdefault(name, {}).update(values)
    return data


def shop() -> Flask:
    """A host app with routes, an error page, a session and JSON settings of its own."""
    app = Flask("shop")
    app.secret_key = "the-shop's-own-secret"

    @app.get("/hello")
    def hello() -> Any:
        return {"zebra": 1, "apple": 2}

    @app.post("/cart/<item>")
    def add(item: str) -> Any:
        session["cart"] = [*session.get("cart", []), item]
        return {"cart": session["cart"]}

    @app.errorhandler(404)
    def not_found(_error: Any) -> Any:
        return HOST_404, 404

    return app


@pytest.fixture
def host(tmp_path, monkeypatch, clock):
    monkeypatch.chdir(tmp_path)
    app = shop()
    biz = BizPlugin(app, config=settings(ui={"token": UI_TOKEN}), url_prefix="/biz", background=False, clock=clock)
    yield app, biz
    app.extensions["bizplugin"].close()


@pytest.fixture
def client(host):
    return host[0].test_client()


@pytest.fixture
def signed(client, clock) -> Signed:
    return Signed(client, clock)


def _snapshot(app: Flask) -> dict[str, Any]:
    return {"rules": sorted((r.rule, r.endpoint, tuple(sorted(r.methods))) for r in app.url_map.iter_rules()),
            "errors": copy.copy(app.error_handler_spec), "json": app.json, "sort_keys": app.json.sort_keys,
            "secret": app.secret_key, "session": app.session_interface, "config": dict(app.config),
            "hooks": (dict(app.before_request_funcs), dict(app.after_request_funcs)),
            "filters": set(app.jinja_env.filters), "globals": set(app.jinja_env.globals),
            "blueprints": dict(app.blueprints)}


# -- mounting ---------------------------------------------------------------------------------
def test_mounting_changes_nothing_of_the_hosts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = shop()
    before = _snapshot(app)
    BizPlugin(app, config=settings(ui={"token": UI_TOKEN}), url_prefix="/biz", background=False)
    try:
        assert _snapshot(app) == before
        client = app.test_client()
        assert client.get("/hello").get_data(as_text=True).replace(" ", "").strip() == '{"apple":2,"zebra":1}'
        assert client.post("/cart/tea").get_json() == {"cart": ["tea"]}
        assert client.post("/cart/milk").get_json() == {"cart": ["tea", "milk"]}  # its session, its key
        for path in ("/nope", "/healthz", "/v1/types", "/ui", "/bizarre", "/openim/callback/x/y"):
            page = client.get(path)
            assert (page.status_code, page.get_data(as_text=True)) == (404, HOST_404), path
    finally:
        app.extensions["bizplugin"].close()


def test_every_surface_answers_under_the_prefix(client, signed):
    assert client.get("/biz/healthz").get_json() == {"status": "ok"}
    ready = client.get("/biz/readyz")  # nothing listens at the configured OpenIM
    assert ready.status_code == 503 and ready.get_json()["checks"]["storage"] == "ok"
    assert "bizplugin_messages_accepted_total" in client.get("/biz/metrics").get_data(as_text=True)
    openapi = client.get("/biz/openapi.json").get_json()
    assert openapi["servers"] == [{"url": "/biz"}] and "/v1/messages" in openapi["paths"]
    assert 'name="token"' in client.get("/biz/ui").get_data(as_text=True)
    types = signed.get("/biz/v1/types")
    assert types.status_code == 200 and {"profile.updated", "order.status_changed"} <= {
        t["type"] for t in types.get_json()["types"]}


def test_problems_answer_only_the_plugins_paths(client):
    missing = client.get("/biz/no-such-thing")
    assert missing.status_code == 404 and missing.mimetype == PROBLEM_JSON
    assert list(missing.get_json()) == ["type", "title", "status", "detail"]  # the plugin's order, not sorted
    wrong_method = client.post("/biz/healthz")
    assert wrong_method.status_code == 405 and wrong_method.mimetype == PROBLEM_JSON
    assert "GET" in wrong_method.headers["Allow"]
    unsigned = client.post("/biz/v1/messages", data=b"{}", content_type="application/json")
    assert unsigned.status_code == 401 and unsigned.mimetype == PROBLEM_JSON
    page = client.get("/no-such-thing")
    assert (page.status_code, page.mimetype, page.get_data(as_text=True)) == (404, "text/html", HOST_404)


def test_the_signature_covers_the_prefix(signed):
    body = {**PROFILE, "to": {"users": ["u1"]}}
    without_prefix = signed.request("POST", "/v1/messages", body)  # signed for the sidecar's own paths
    assert without_prefix.status_code == 404 and without_prefix.get_data(as_text=True) == HOST_404
    raw = json.dumps(body).encode()
    headers = {**_headers("/v1/messages", raw, signed), "Content-Type": "application/json"}
    refused = signed.client.post("/biz/v1/messages", data=raw, headers=headers)
    assert refused.status_code == 401 and "signed exactly as sent" in refused.get_json()["detail"]
    accepted = signed.request("POST", "/biz/v1/messages", body)
    assert accepted.status_code == 202, accepted.get_data(as_text=True)
    message_id = accepted.get_json()["id"]
    document = signed.get(f"/biz/v1/messages/{message_id}")
    assert document.status_code == 200 and document.get_json()["recipients"][0]["user_id"] == "u1"


def _headers(path: str, raw: bytes, signed: Signed) -> dict[str, str]:
    from openim_bizplugin.signing import signature_headers

    return signature_headers("crm", SECRETS["crm"], "POST", path, raw, now=signed.clock())


def test_openim_callbacks_are_taken_under_the_prefix(host, client):
    app, _biz = host
    services = app.extensions["bizplugin"]
    token = BASE_CONFIG["callbacks"]["token"]
    with FakeOpenIM(users=["u1"]) as fake:
        payload = fake.user_online("u1", 1)
    answer = client.post(f"/biz/openim/callback/{token}/callbackAfterUserOnlineCommand", json=payload)
    assert answer.status_code == 200 and answer.get_json()["actionCode"] == 0
    assert services.callbacks.step() == 1  # stored, then processed
    assert services.store.presence_counts().online == 1
    wrong = client.post("/biz/openim/callback/not-the-token/callbackAfterUserOnlineCommand", json=payload)
    assert wrong.status_code == 404 and wrong.mimetype == PROBLEM_JSON
    unprefixed = client.post(f"/openim/callback/{token}/callbackAfterUserOnlineCommand", json=payload)
    assert unprefixed.status_code == 404 and unprefixed.get_data(as_text=True) == HOST_404


def test_the_operator_page_keeps_its_session_apart_from_the_hosts(host, client):
    app, _biz = host
    assert client.post("/cart/tea").status_code == 200
    signed_in = client.post("/biz/ui/login", data={"token": UI_TOKEN})
    assert signed_in.status_code == 303 and signed_in.headers["Location"] == "/biz/ui"
    assert "Path=/biz/ui" in signed_in.headers["Set-Cookie"]
    assert "Queue depth" in client.get("/biz/ui").get_data(as_text=True)
    assert client.post("/cart/milk").get_json() == {"cart": ["tea", "milk"]}  # the host's session still reads
    assert app.secret_key == "the-shop's-own-secret"


# -- in process ------------------------------------------------------------------------------
def test_send_stores_and_answers_as_the_api_does(host, signed):
    app, biz = host
    answer = biz.send("profile.updated", 1, {"fields": ["nickname"]}, users=["u1", "u2"], client="crm",
                      idempotency_key="profile-42")
    api = signed.request("POST", "/biz/v1/messages", {**PROFILE, "to": {"users": ["u1", "u2"]}})
    assert api.status_code == 202
    assert answer.keys() == api.get_json().keys() and answer == {**api.get_json(), "id": answer["id"]}
    assert biz.status(answer["id"]) == signed.get(f"/biz/v1/messages/{answer['id']}").get_json()
    assert biz.status(answer["id"])["status"] == "queued" and biz.status(answer["id"])["client"] == "crm"
    again = biz.send("profile.updated", 1, {"fields": ["nickname"]}, users=["u1", "u2"], client="crm",
                     idempotency_key="profile-42")
    assert again == answer
    scrape = app.test_client().get("/biz/metrics").get_data(as_text=True)
    assert 'bizplugin_messages_accepted_total{client="crm",type="profile.updated"} 2.0' in scrape
    app.extensions["bizplugin"].store.close()  # durable: read back through fresh connections
    assert biz.status(answer["id"])["recipients"][1]["user_id"] == "u2"


def _api_body(type_: str, version: int, data: Any, **options: Any) -> dict[str, Any]:
    """What a client posts for the same call (BizClient's body)."""
    body = {"type": type_, "version": version, "data": data}
    to = {key: options.pop(key) for key in ("users", "groups") if key in options}
    if to:
        body["to"] = to
    return {**body, **{k: v for k, v in options.items() if k != "client"}}


REFUSED = {
    "type not allowed": ("app.upgrade_available", 1, {}, {"users": ["u1"]}),
    "unknown type": ("no.such_type", 1, {}, {"users": ["u1"], "client": "ops"}),
    "unknown version": ("profile.updated", 9, {"fields": ["nickname"]}, {"users": ["u1"]}),
    "schema": ("profile.updated", 1, {"fields": "nickname", "extra": 1}, {"users": ["u1"]}),
    "no recipients": ("profile.updated", 1, {"fields": ["nickname"]}, {}),
    "both kinds": ("profile.updated", 1, {"fields": ["nickname"]}, {"users": ["u1"], "groups": ["g1"]}),
    "bad priority": ("profile.updated", 1, {"fields": ["nickname"]}, {"users": ["u1"], "priority": "urgent"}),
    "bad ttl": ("profile.updated", 1, {"fields": ["nickname"]}, {"users": ["u1"], "ttl_seconds": 0}),
    "over the cap": ("profile.updated", 1, {"fields": ["nickname"]}, {"users": [f"u{i}" for i in range(51)]}),
    "bad ids": ("profile.updated", 1, {"fields": ["nickname"]}, {"users": [" u1", ""]}),
    "too large": ("profile.updated", 1, {"fields": ["x" * 70_000]}, {"users": ["u1"]}),
    "not strict JSON": ("profile.updated", 1, {"fields": [float("nan")]}, {"users": ["u1"]}),
}


@pytest.mark.parametrize("case", REFUSED)
def test_send_refuses_what_the_api_refuses_with_the_same_problem(host, signed, case):
    _app, biz = host
    type_, version, data, options = REFUSED[case]
    client = options.get("client", "crm")
    raw = json.dumps(_api_body(type_, version, data, **options)).encode()
    response = signed.request("POST", "/biz/v1/messages", raw, as_client=client)
    problem = response.get_json()
    with pytest.raises(BizError) as refused:
        biz.send(type_, version, data, **{"client": client, **options})
    error = refused.value
    assert (error.status, error.detail) == (problem["status"], problem["detail"])
    assert [e.as_dict() for e in error.errors] == problem.get("errors", [])
    assert error.status == response.status_code >= 400


def test_send_refuses_a_reused_idempotency_key_as_the_api_does(host, signed):
    _app, biz = host
    biz.send("profile.updated", 1, {"fields": ["nickname"]}, users=["u1"], client="crm", idempotency_key="k-1")
    body = {**PROFILE, "data": {"fields": ["avatar"]}, "to": {"users": ["u1"]}, "idempotency_key": "k-1"}
    problem = signed.request("POST", "/biz/v1/messages", body).get_json()
    with pytest.raises(BizError) as refused:
        biz.send("profile.updated", 1, {"fields": ["avatar"]}, users=["u1"], client="crm", idempotency_key="k-1")
    assert (refused.value.status, refused.value.detail) == (422, problem["detail"])


def test_send_names_an_unknown_client_and_data_that_is_not_json(host):
    _app, biz = host
    with pytest.raises(BizError) as unknown:
        biz.send("profile.updated", 1, {"fields": ["nickname"]}, users=["u1"], client="billing")
    assert unknown.value.status == 401 and "'billing'" in unknown.value.detail
    with pytest.raises(BizError) as not_json:
        biz.send("profile.updated", 1, {"fields": {"nickname"}}, users=["u1"], client="crm")
    assert not_json.value.status == 400 and "not JSON" in not_json.value.detail


def test_status_of_an_unknown_message_is_not_found(host):
    with pytest.raises(BizError) as missing:
        host[1].status("0" * 32)
    assert missing.value.status == 404


# -- configuration and conventions -------------------------------------------------------------------
def test_config_is_a_mapping_with_paths_relative_to_the_current_directory(host, tmp_path):
    assert (tmp_path / "bizplugin.db").exists()


def test_config_is_a_path_or_bizplugin_config(tmp_path, monkeypatch):
    path = write_config(tmp_path, {"storage": {"url": "sqlite:///from-file.db"}})
    for given in (str(path), path, None):
        monkeypatch.setenv("BIZPLUGIN_CONFIG", str(path))
        app = Flask("host")
        BizPlugin(app, config=given, background=False)
        app.extensions["bizplugin"].close()
    assert (tmp_path / "from-file.db").exists()


def test_config_problems_are_one_line_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BIZPLUGIN_CONFIG", raising=False)
    cases = [(None, "no configuration: pass BizPlugin(config=PATH or mapping) or set BIZPLUGIN_CONFIG"),
             (settings(server={"port": "x"}), "server.port: must be an integer"),
             (tmp_path / "missing.toml", f"{tmp_path / 'missing.toml'}: no such config file"),
             (42, "config: must be a TOML file path or a mapping, not int")]
    for given, line in cases:
        with pytest.raises(ConfigError) as refused:
            BizPlugin(Flask("host"), config=given)
        assert str(refused.value) == line


def test_init_app_follows_the_flask_extension_conventions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    biz = BizPlugin(url_prefix="/biz/", background=False)
    with pytest.raises(RuntimeError, match="init_app"):
        biz.status("x")
    first, second = Flask("first"), Flask("second")
    biz.init_app(first, config=settings(storage={"url": "sqlite:///first.db"}))
    biz.init_app(second, config=settings(storage={"url": "sqlite:///second.db"}), url_prefix="/notify")
    try:
        with pytest.raises(RuntimeError, match="already mounted"):
            biz.init_app(first, config=settings())
        assert first.test_client().get("/biz/healthz").status_code == 200
        assert second.test_client().get("/notify/healthz").status_code == 200
        with first.app_context():  # each app's own store
            sent = biz.send("profile.updated", 1, {"fields": ["nickname"]}, users=["u1"], client="crm")
            assert biz.status(sent["id"])["id"] == sent["id"]
        with second.app_context(), pytest.raises(BizError):
            biz.status(sent["id"])
        with pytest.raises(BizError):  # outside an app context: the app mounted last
            biz.status(sent["id"])
    finally:
        for app in (first, second):
            app.extensions["bizplugin"].close()


def test_the_host_cli_gets_a_bizplugin_worker_command(host):
    app, _biz = host
    result = app.test_cli_runner().invoke(args=["bizplugin", "--help"])
    assert result.exit_code == 0 and "worker" in result.output


def test_serve_runs_the_same_plugin_mounted_at_the_root(config):
    app = create_app(config)
    try:
        mount = app.extensions["bizplugin.mount"]
        assert mount.prefix == "" and app.extensions["bizplugin"] is mount.services
        client = app.test_client()
        assert client.get("/healthz").get_json() == {"status": "ok"}
        assert client.get("/nope").mimetype == PROBLEM_JSON  # the whole app is the plugin's
    finally:
        app.extensions["bizplugin"].close()


# -- background work ----------------------------------------------------------------------------------
def _delivered(biz: BizPlugin, message_id: str) -> bool:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if biz.status(message_id)["status"] == "sent":
            return True
        time.sleep(0.05)
    return False


def test_background_work_starts_on_first_use_once_per_process(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="openim_bizplugin.web.plugin")
    with FakeOpenIM(users=["u1", "imAdmin"], online=["u1"]) as fake:
        app = shop()
        biz = BizPlugin(app, config=settings(openim={"api_url": fake.url}, delivery={"workers": 1}), url_prefix="/biz")
        try:
            assert not [r for r in caplog.records if getattr(r, "event", "") == "background.started"]
            app.test_client().get("/hello")  # any first request, the host's own included
            app.test_client().get("/biz/healthz")
            sent = biz.send("profile.updated", 1, {"fields": ["nickname"]}, users=["u1"], client="crm")
            assert _delivered(biz, sent["id"]) and len(fake.deliveries_to(user="u1")) == 1
        finally:
            app.extensions["bizplugin"].close()
    assert len([r for r in caplog.records if getattr(r, "event", "") == "background.started"]) == 1


FORK_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from flask import Flask
    from openim_bizplugin.web import BizPlugin

    app = Flask("host")
    biz = BizPlugin(app, config=sys.argv[1])

    def delivered(message_id):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if biz.status(message_id)["status"] == "sent":
                return True
            time.sleep(0.05)
        return False

    def send(user):
        return biz.send("profile.updated", 1, {"fields": ["nickname"]}, users=[user], client="crm")["id"]

    assert delivered(send("u1"))  # background work runs here, in the parent
    app.extensions["bizplugin"].close()  # and stops: only the child can deliver what follows
    child = os.fork()
    if child == 0:
        os._exit(0 if delivered(send("u2")) else 3)
    sys.exit(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
""")


def test_a_process_forked_after_start_runs_background_work_of_its_own(tmp_path):
    with FakeOpenIM(users=["u1", "u2", "imAdmin"], online=["u1", "u2"]) as fake:
        path = write_config(tmp_path, {"openim": {"api_url": fake.url}, "delivery": {"workers": 1}})
        done = subprocess.run([sys.executable, "-c", FORK_SCRIPT, str(path)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert len(fake.deliveries_to(user="u1")) == len(fake.deliveries_to(user="u2")) == 1
