"""doctor and dlq through the CLI entry point, against the fake OpenIM."""

from __future__ import annotations

import io

from conftest import write_config
from openim_bizplugin.cli import run
from openim_bizplugin.testing import FakeOpenIM


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return run(list(argv), out, err), out.getvalue(), err.getvalue()


def test_doctor_checks_openim_and_prints_webhooks(tmp_path):
    with FakeOpenIM(users=["imAdmin"]) as fake:
        config = write_config(tmp_path, {"openim": {"api_url": fake.url}})
        code, out, _ = _run("doctor", "-c", str(config), "--public-url", "http://sidecar:8080")
    assert code == 0, out
    assert "ok    OpenIM admin token" in out and "ok    sender account" in out
    assert "ok    OpenIM release: main (configured): OpenIM stores persistent notifications" in out
    assert "url: http://sidecar:8080/openim/callback/test-callback-token-0001" in out


def test_doctor_shows_the_detected_release(tmp_path):
    with FakeOpenIM(users=["imAdmin"], flavor="v3.8.3") as fake:
        config = write_config(tmp_path, {"openim": {"api_url": fake.url, "version": "auto"}})
        code, out, _ = _run("doctor", "-c", str(config))
        assert fake.delivered == []  # the probe sends nothing
    assert code == 0, out
    assert "ok    OpenIM release: 3.8 (detected): OpenIM keeps no business notification" in out
    assert "attentionIds: [imAdmin]" in out


def test_doctor_fails_on_wrong_secret_without_printing_it(tmp_path):
    with FakeOpenIM(users=["imAdmin"], secret="the-real-secret") as fake:
        config = write_config(tmp_path, {"openim": {"api_url": fake.url, "secret": "a-wrong-secret"}})
        code, out, _ = _run("doctor", "-c", str(config))
    assert code == 1
    assert "FAIL  OpenIM admin token" in out and "1002" in out
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
