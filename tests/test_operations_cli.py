"""doctor and dlq through the CLI entry point, against the fake OpenIM."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from conftest import write_config
from openim_bizplugin.cli import run
from openim_bizplugin.config import load_config
from openim_bizplugin.web.app import create_app
from openim_bizplugin.testing import FakeOpenIM


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return run(list(argv), out, err), out.getvalue(), err.getvalue()


def test_doctor_checks_openim_and_prints_the_keys_to_change_in_place(tmp_path):
    with FakeOpenIM(users=["imAdmin"]) as fake:
        config = write_config(tmp_path, {"openim": {"api_url": fake.url}})
        code, out, _ = _run("doctor", "-c", str(config))
    assert code == 0, out
    assert "ok    OpenIM admin token" in out and "ok    sender account" in out
    assert "do NOT append them" in out and "openim-bizplugin webhooks -c CONFIG --from webhooks.yml" in out
    assert "url: http://127.0.0.1:0/openim/callback/test-callback-token-0001" in out
    assert "ok    OpenIM release: main (configured): OpenIM stores persistent notifications" in out
    assert "the sidecar holds them until the user is online" in out


def test_doctor_shows_the_detected_release(tmp_path):
    with FakeOpenIM(users=["imAdmin"], flavor="v3.8.3") as fake:
        config = write_config(tmp_path, {"openim": {"api_url": fake.url, "version": "auto"}})
        code, out, _ = _run("doctor", "-c", str(config))
        assert fake.delivered == []  # the probe sends nothing
    assert code == 0, out
    assert "ok    OpenIM release: 3.8 (detected): OpenIM keeps no business notification" in out
    assert "attentionIds: [imAdmin]" in out


def test_doctor_asks_openim_itself_not_a_token_kept_from_earlier(tmp_path):
    with FakeOpenIM(users=["imAdmin"]) as fake:
        config = write_config(tmp_path, {"openim": {"api_url": fake.url}})
        assert _run("doctor", "-c", str(config))[0] == 0  # the admin token is now in the store
        fake.refuse_connections()
        code, out, _ = _run("doctor", "-c", str(config))
    assert code == 1 and "FAIL  OpenIM admin token: /user/account_check network" in out


def test_doctor_answers_within_a_few_seconds_when_openim_hangs(tmp_path):
    with FakeOpenIM(users=["imAdmin"]) as fake:
        config = write_config(tmp_path, {"openim": {"api_url": fake.url}})
        fake.delay_next("/auth/get_admin_token", 8)
        started = time.monotonic()
        code, out, _ = _run("doctor", "-c", str(config))
        assert time.monotonic() - started < 6
    assert code == 1 and "FAIL  OpenIM admin token: no answer from OpenIM within 3 s" in out


def test_doctor_fails_on_wrong_secret_without_printing_it(tmp_path):
    with FakeOpenIM(users=["imAdmin"], secret="the-real-secret") as fake:
        config = write_config(tmp_path, {"openim": {"api_url": fake.url, "secret": "a-wrong-secret"}})
        code, out, _ = _run("doctor", "-c", str(config))
    assert code == 1
    assert "FAIL  OpenIM admin token: OpenIM refuses the admin token" in out and "1002" in out
    assert "a-wrong-secret" not in out and "the-real-secret" not in out


def test_doctor_fails_when_sender_is_not_registered(tmp_path):
    with FakeOpenIM(users=[]) as fake:
        config = write_config(tmp_path, {"openim": {"api_url": fake.url, "sender_id": "bizbot"}})
        code, out, _ = _run("doctor", "-c", str(config))
    assert code == 1 and "FAIL  sender account: 'bizbot' is not a registered OpenIM user" in out


def test_dlq_list_and_replay_of_unknown_id(tmp_path):
    config = write_config(tmp_path)
    code, out, _ = _run("dlq", "list", "-c", str(config))
    assert code == 0 and "0 dead letters" in out
    code, _, err = _run("dlq", "replay", "nope", "-c", str(config))
    assert code == 1 and err.strip() == "openim-bizplugin: no dead letter 'nope'"


def test_demo_delivers_one_message_of_each_type_and_shows_what_apps_receive():
    from conftest import REPO
    code, out, err = _run("demo", "--schemas", str(REPO / "schemas"))
    assert code == 0, out + err
    assert "4 of 4 messages delivered." in out
    assert "onRecvCustomBusinessMessage receives" in out and "customElem" in out
    for name in ("profile.updated", "app.upgrade_available", "order.status_changed", "action.required"):
        assert f"── {name} v" in out


@pytest.fixture
def sidecar_url(tmp_path):
    """A sidecar serving over real HTTP on loopback (another folder: its own store)."""
    folder = tmp_path / "sidecar"
    folder.mkdir()
    app = create_app(load_config(write_config(folder, {"delivery": {"workers": 0}})))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.port}"
    server.shutdown()
    app.extensions["bizplugin"].close()


def test_doctor_public_url_checks_that_a_callback_reaches_this_sidecar(tmp_path, sidecar_url):
    with FakeOpenIM(users=["imAdmin"]) as fake:
        config = write_config(tmp_path, {"openim": {"api_url": fake.url}})
        code, out, _ = _run("doctor", "-c", str(config), "--public-url", sidecar_url)
    assert code == 0, out
    assert f"ok    callback URL: {sidecar_url}/openim/callback/*** reaches this sidecar" in out
    assert f"url: {sidecar_url}/openim/callback/test-callback-token-0001" in out  # for webhooks.yml


def test_doctor_public_url_fails_on_a_sidecar_with_another_token(tmp_path, sidecar_url):
    """OpenIM would log success for the 404 and lose every callback: doctor must not."""
    with FakeOpenIM(users=["imAdmin"]) as fake:
        config = write_config(tmp_path, {"openim": {"api_url": fake.url},
                                         "callbacks": {"token": "another-token-of-another-sidecar"}})
        code, out, _ = _run("doctor", "-c", str(config), "--public-url", sidecar_url + "/")
    assert code == 1
    assert f"FAIL  callback URL: {sidecar_url}/openim/callback/*** answered 404" in out
    assert "lost silently" in out


def test_doctor_public_url_fails_where_nothing_listens(tmp_path):
    with FakeOpenIM(users=["imAdmin"]) as fake:
        config = write_config(tmp_path, {"openim": {"api_url": fake.url}})
        code, out, _ = _run("doctor", "-c", str(config), "--public-url", "http://127.0.0.1:9")
    assert code == 1 and "FAIL  callback URL: no answer from http://127.0.0.1:9/openim/callback/***" in out
    assert "test-callback-token-0001/" not in out.split("\n#")[0]  # the checks never show the token


FIXTURES = Path(__file__).parent / "fixtures" / "webhooks"


def test_doctor_from_checks_the_webhooks_file_and_points_to_the_command(tmp_path):
    with FakeOpenIM(users=["imAdmin"]) as fake:
        config = write_config(tmp_path, {"openim": {"api_url": fake.url}})
        public = "http://127.0.0.1:9"  # nothing listens: that check fails, the file's is what counts here
        stock = str(FIXTURES / "main.webhooks.yml")
        code, out, _ = _run("doctor", "-c", str(config), "--from", stock, "--public-url", public)
        assert code == 1
        assert f"FAIL  webhooks.yml: {stock} differs in url, afterSendSingleMsg.enable" in out
        assert f"`openim-bizplugin webhooks -c {config} --from {stock}`" in out
        assert "do NOT append" not in out  # with --from, no fragment to paste

        edited = tmp_path / "webhooks.yml"
        code, text, _ = _run("webhooks", "-c", str(config), "--from", stock, "--public-url", public)
        edited.write_text(text)
        code, out, _ = _run("doctor", "-c", str(config), "--from", str(edited))
    assert f"FAIL  webhooks.yml: {edited} differs in url" in out  # doctor compares with the same URL
    code, out, _ = _run("doctor", "-c", str(config), "--from", str(edited), "--public-url", public)
    assert f"ok    webhooks.yml: {edited} points at this sidecar" in out


def test_subscribers_lists_cursors_and_forgets_only_those_no_longer_configured(tmp_path):
    """A subscriber removed from the config keeps its events until the operator says it is gone."""
    from openim_bizplugin.store import open_store
    from openim_bizplugin.store.base import SubscriberCursor

    config_path = write_config(tmp_path)
    with config_path.open("a") as fh:
        fh.write('[[subscribers]]\nurl = "http://127.0.0.1:9/kept"\nsecret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"\n'
                 'events = ["user.online"]\n')
    config = load_config(config_path)
    store = open_store(config.storage, event_types=frozenset({"user.online"}))
    store.subscriber_cursor("http://127.0.0.1:9/kept"), store.subscriber_cursor("http://user:pw@127.0.0.1:9/gone")
    for n in range(3):
        store.update_presence(f"u{n}", 1, True, 1, 1_000)
    store.save_subscriber_cursor(SubscriberCursor("http://127.0.0.1:9/kept", 3))
    store.close()

    code, out, _ = _run("subscribers", "-c", str(config_path))
    assert code == 0
    assert "http://127.0.0.1:9/kept  configured  after event 3, 0 waiting" in out
    assert "http://user:***@127.0.0.1:9/gone  NOT CONFIGURED  its 3 events are kept" in out and "pw" not in out
    code, out, _ = _run("doctor", "-c", str(config_path))
    assert "warn  subscribers: 1 no longer configured (http://user:***@127.0.0.1:9/gone)" in out
    code, out, _ = _run("subscribers", "-c", str(config_path), "--forget-unconfigured")
    assert code == 0 and "http://user:***@127.0.0.1:9/gone  forgotten  (3 events it had not received)" in out
    store = open_store(config.storage, event_types=frozenset({"user.online"}))
    try:
        assert store.subscriber_names() == ["http://127.0.0.1:9/kept"]  # the events: tests/store_contract.py
    finally:
        store.close()
    code, out, _ = _run("doctor", "-c", str(config_path))
    assert "warn  subscribers" not in out
