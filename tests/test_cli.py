"""The ``openim-bizplugin`` command: ``run(argv, stdout, stderr)`` with injected streams (SPEC §2)."""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import requests

from e2e_support import CRM_SECRET, REPO, SCHEMAS_DIR, child_env, command, running_server, write_config
from openim_bizplugin.cli import run
from openim_bizplugin.client import BizAPIError, BizClient
from openim_bizplugin.signing import RequestVerifier

BODY = b'{"type": "profile.updated", "version": 1, "data": {"fields": ["email"]}, "to": {"users": ["u1"]}}'


def cli(*argv: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    code = run(list(argv), stdout, stderr)
    return code, stdout.getvalue(), stderr.getvalue()


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def verify_headers(printed: str, method: str, path: str, body: bytes) -> dict[str, str]:
    """Parse the two printed header lines and check the token signs this very request."""
    lines = printed.strip().splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == ["X-Biz-Client", "X-Biz-Signature"]
    headers = dict(line.split(": ", 1) for line in lines)
    assert headers["X-Biz-Client"] == "crm"
    verified = RequestVerifier({"crm": [CRM_SECRET]}).verify(
        "crm", headers["X-Biz-Signature"], method, path, body)
    assert verified.client_id == "crm"
    return headers


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with running_server(write_config(tmp_path_factory.mktemp("cli"))) as running:
        yield running


# --- keygen -----------------------------------------------------------------------------


def test_keygen_prints_a_fresh_urlsafe_secret_each_time():
    first, second = cli("keygen"), cli("keygen")
    assert first[0] == second[0] == 0
    secrets = [one_line(first[1]), one_line(second[1])]
    for secret in secrets:
        assert len(secret) >= 43
        assert re.fullmatch(r"[A-Za-z0-9_-]+", secret)
    assert secrets[0] != secrets[1]


def test_keygen_accepts_and_ignores_a_config_like_every_command(config, tmp_path, monkeypatch):
    monkeypatch.setenv("BIZPLUGIN_CONFIG", str(tmp_path / "missing.toml"))
    for argv in (["-c", str(config)], ["--config", str(tmp_path / "missing.toml")], []):
        code, out, err = cli("keygen", *argv)
        assert (code, err) == (0, "") and re.fullmatch(r"[A-Za-z0-9_-]{43,}", one_line(out))


# --- sign -------------------------------------------------------------------------------


def test_sign_prints_two_headers_that_verify_for_the_body_file(config, tmp_path):
    body_file = tmp_path / "body.json"
    body_file.write_bytes(BODY)
    code, out, err = cli("sign", "-c", str(config), "--client", "crm", "--method", "post",
                         "--path", "/v1/messages", "--body-file", str(body_file))
    assert (code, err) == (0, "")
    verify_headers(out, "POST", "/v1/messages", BODY)


def test_sign_reads_the_body_from_stdin(config):
    done = subprocess.run([*command(), "sign", "-c", str(config), "--client", "crm", "--method", "POST",
                           "--path", "/v1/messages?dry=1", "--body-file", "-"],
                          input=BODY, capture_output=True, timeout=15, env=child_env())
    assert done.returncode == 0, done.stderr
    verify_headers(done.stdout.decode(), "POST", "/v1/messages?dry=1", BODY)


def test_signed_headers_are_accepted_by_the_server(server):
    code, out, _ = cli("sign", "-c", str(server.config_path), "--client", "crm", "--method", "GET",
                       "--path", "/v1/types")
    assert code == 0
    headers = verify_headers(out, "GET", "/v1/types", b"")
    assert requests.get(server.url + "/v1/types", headers=headers, timeout=10).status_code == 200


def test_sign_with_an_idempotency_key_prints_the_header_it_signed(server, tmp_path):
    body_file = tmp_path / "body.json"
    body_file.write_bytes(BODY)
    code, out, _ = cli("sign", "-c", str(server.config_path), "--client", "crm", "--method", "POST",
                       "--path", "/v1/messages", "--body-file", str(body_file), "--idempotency-key", "cli-key-1")
    assert code == 0
    headers = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert list(headers) == ["X-Biz-Client", "X-Biz-Signature", "Idempotency-Key"]
    assert headers["Idempotency-Key"] == "cli-key-1"
    headers["Content-Type"] = "application/json"
    first = requests.post(server.url + "/v1/messages", data=BODY, headers=headers, timeout=10)
    assert first.status_code == 202, first.text


def test_sign_with_an_unknown_client_fails_with_one_line(config):
    code, out, err = cli("sign", "-c", str(config), "--client", "nobody", "--method", "GET",
                         "--path", "/v1/types")
    assert code != 0
    assert out == ""
    assert "nobody" in one_line(err)


def test_missing_config_names_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.delenv("BIZPLUGIN_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("sign", "--client", "crm", "--method", "GET", "--path", "/v1/types")
    assert code != 0
    assert out == ""
    assert "BIZPLUGIN_CONFIG" in one_line(err)


def test_config_named_by_the_environment_variable_is_used(monkeypatch, config):
    monkeypatch.setenv("BIZPLUGIN_CONFIG", str(config))
    code, out, _ = cli("sign", "--client", "crm", "--method", "GET", "--path", "/v1/types")
    assert code == 0
    verify_headers(out, "GET", "/v1/types", b"")


# --- schemas check ----------------------------------------------------------------------


def test_schemas_check_passes_the_shipped_catalogue_and_shows_version_changes(monkeypatch):
    monkeypatch.chdir(REPO)
    code, out, _ = cli("schemas", "check", "--dir", "schemas")
    assert code == 0, out
    assert "profile.updated v1 -> v2" in out


def test_schemas_check_fails_on_a_broken_copy(tmp_path):
    copy = tmp_path / "schemas"
    shutil.copytree(SCHEMAS_DIR, copy)
    broken = copy / "action.required" / "v1.json"
    schema = json.loads(broken.read_text())
    schema["examples"] = [{"action": "dance"}]  # an example its own schema rejects
    broken.write_text(json.dumps(schema))
    code, out, err = cli("schemas", "check", "--dir", str(copy))
    assert code != 0
    assert str(broken) in out + err


# --- send and status against a running server ------------------------------------------


def test_send_then_status_print_the_answers(server):
    base = ("-c", str(server.config_path), "--client", "crm", "--url", server.url)
    code, out, err = cli("send", *base, "--type", "profile.updated", "--version", "2",
                         "--data", '{"fields": ["nickname"], "changed_by": "admin"}',
                         "--user", "u1", "--user", "u2", "--user", "u1", "--priority", "high")
    assert (code, err) == (0, "")
    answer = json.loads(out)
    assert (answer["status"], answer["recipients"]) == ("queued", 2)

    code, out, err = cli("status", *base, answer["id"])
    assert (code, err) == (0, "")
    message = json.loads(out)
    assert (message["id"], message["version"], message["priority"]) == (answer["id"], 2, "high")
    assert [r["user_id"] for r in message["recipients"]] == ["u1", "u2"]


def test_send_to_groups(server):
    code, out, _ = cli("send", "-c", str(server.config_path), "--client", "crm", "--url", server.url,
                       "--type", "profile.updated", "--version", "1", "--data", '{"fields": ["ex"]}',
                       "--group", "g1")
    assert code == 0
    assert json.loads(out)["recipients"] == 1


def test_send_of_an_invalid_message_prints_status_and_detail(server):
    data = {"fields": ["shoe size"]}
    with pytest.raises(BizAPIError) as expected:
        BizClient(server.url, "crm", CRM_SECRET).send("profile.updated", 1, data, users=["u1"])
    code, out, err = cli("send", "-c", str(server.config_path), "--client", "crm", "--url", server.url,
                         "--type", "profile.updated", "--version", "1", "--data", json.dumps(data),
                         "--user", "u1")
    assert code != 0
    assert out == ""
    line = one_line(err)
    assert "422" in line
    assert expected.value.detail in line


def test_status_of_an_unknown_message_fails_with_one_line(server):
    code, out, err = cli("status", "-c", str(server.config_path), "--client", "crm", "--url", server.url,
                         "0" * 32)
    assert code != 0
    assert out == ""
    assert "404" in one_line(err)


def test_send_needs_exactly_one_kind_of_recipient(config):
    code, _, err = cli("send", "-c", str(config), "--client", "crm", "--url", "http://127.0.0.1:9",
                       "--type", "profile.updated", "--version", "1", "--data", '{"fields": ["ex"]}')
    assert code != 0
    one_line(err)


def test_send_to_a_port_where_nothing_listens_fails_with_one_line(config):
    with socket.socket() as taken:  # bound but not listening: connections are refused
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        code, out, err = cli("send", "-c", str(config), "--client", "crm",
                             "--url", f"http://127.0.0.1:{port}", "--type", "profile.updated",
                             "--version", "1", "--data", '{"fields": ["ex"]}', "--user", "u1")
    assert code != 0
    assert out == ""
    assert f"127.0.0.1:{port}" in one_line(err)
