"""Configuration: every problem is one line naming the key or file."""

from __future__ import annotations

import subprocess

import pytest

from conftest import REPO, write_config
from e2e_support import child_env, command
from openim_bizplugin.config import config_path, load_config
from openim_bizplugin.errors import ConfigError


def test_shipped_example_config_loads_with_documented_defaults():
    config = load_config(REPO / "config.example.toml")
    assert config.server.max_recipients == 10_000
    assert config.storage.sqlite_path == REPO / "bizplugin.db"
    assert config.schemas_dir == REPO / "schemas"
    assert config.delivery.batch_size <= 1000
    assert set(config.clients) == {"crm", "ops"}
    assert config.callback_retention_seconds == 3600
    assert config.openim.version == "auto"  # the OpenIM release is probed at start


def _error(tmp_path, overrides) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, overrides))
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("overrides, named", [
    ({"server": {"port": "8080"}}, "server.port"),
    ({"server": {"port": 70000}}, "server.port"),
    ({"server": {"prot": 1}}, "server.prot: unknown key"),
    ({"openim": {"api_url": "localhost:10002"}}, "openim.api_url"),
    ({"openim": {"check_recipients": "yes"}}, "openim.check_recipients"),
    ({"openim": {"version": "3.8.3"}}, 'openim.version: must be "auto", "3.8" or "main"'),
    ({"delivery": {"batch_size": 5000}}, "delivery.batch_size"),
    ({"delivery": {"lease_seconds": 0}}, "delivery.lease_seconds"),
    ({"callbacks": {"token": "short"}}, "callbacks.token"),
    ({"callbacks": {"retention_seconds": 0}}, "callbacks.retention_seconds: must be at least 1"),
    ({"storage": {"url": "postgres://x"}}, "storage.url"),
    ({"clients": {"crm": {"secrets": ["too-short"], "allowed_types": ["*"]}}}, "clients.crm.secrets"),
    ({"clients": {"crm": {"secrets": ["x" * 20]}}}, "clients.crm.allowed_types: missing"),
    ({"clients": {"crm": {"secrets": ["x" * 20], "allowed_types": ["*"], "rate_limit": "fast"}}},
     "clients.crm.rate_limit"),
    ({"ui": {"token": "env:BIZ_TEST_UNSET_VARIABLE"}}, "BIZ_TEST_UNSET_VARIABLE"),
    ({"ui": {"token": "x" * 20, "secure_cookie": "yes"}}, "ui.secure_cookie: must be true or false"),
    ({"openim": {"secret": "env:BIZ_TEST_UNSET_VARIABLE"}}, "openim.secret: environment variable"),
])
def test_bad_values_name_the_key(tmp_path, monkeypatch, overrides, named):
    monkeypatch.delenv("BIZ_TEST_UNSET_VARIABLE", raising=False)
    assert named in _error(tmp_path, overrides)


def test_missing_required_table_and_key(tmp_path):
    path = write_config(tmp_path)
    text = path.read_text()
    path.write_text(text.replace("[openim]", "[unused_openim]"))
    with pytest.raises(ConfigError, match="unused_openim"):
        load_config(path)
    path.write_text(text.replace('sender_id = "imAdmin"\n', ""))
    with pytest.raises(ConfigError, match=r"^openim\.sender_id: missing"):
        load_config(path)


def test_secrets_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CRM_NEW_SECRET", "rotated-secret-from-env-01")
    config = load_config(write_config(tmp_path, {"clients": {"crm": {
        "secrets": ["old-secret-still-valid-01", "env:CRM_NEW_SECRET"], "allowed_types": ["*"]}}}))
    assert config.clients["crm"].secrets == ("old-secret-still-valid-01", "rotated-secret-from-env-01")


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    config = load_config(write_config(tmp_path, {"storage": {"url": "sqlite:///data/x.db"},
                                                 "schemas": {"dir": "catalogue"}}))
    assert config.storage.sqlite_path == tmp_path / "data" / "x.db"
    assert config.schemas_dir == tmp_path / "catalogue"
    absolute = load_config(write_config(tmp_path, {"storage": {"url": f"sqlite:///{tmp_path}/abs.db"}}))
    assert absolute.storage.sqlite_path == tmp_path / "abs.db"


def test_unreadable_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_config_path_comes_from_flag_or_environment(monkeypatch):
    monkeypatch.delenv("BIZPLUGIN_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="BIZPLUGIN_CONFIG"):
        config_path(None)
    monkeypatch.setenv("BIZPLUGIN_CONFIG", "/etc/bizplugin.toml")
    assert str(config_path(None)) == "/etc/bizplugin.toml"
    assert str(config_path("mine.toml")) == "mine.toml"


# OpenIM posts to url + "/" + command (webhooks.yml's url names the token): a token that is
# not one plain path segment can never match /openim/callback/<token>/<command>.
@pytest.mark.parametrize("token", ["callback/token-0123456789", "callback%2Ftoken-0123456789",
                                   "callback token 0123456789", "callback?token=0123456789",
                                   "callback#token-0123456789", "callback-tökén-0123456789"])
def test_a_callback_token_that_is_not_url_path_safe_is_refused(tmp_path, token):
    message = _error(tmp_path, {"callbacks": {"token": token}})
    assert message.startswith("callbacks.token: must be URL-path safe") and token not in message


def test_every_url_path_safe_character_is_accepted_in_a_callback_token(tmp_path):
    token = "Az09._~-" * 3
    assert load_config(write_config(tmp_path, {"callbacks": {"token": token}})).callback_token == token


def test_serve_refuses_to_start_with_such_a_token_in_one_line(tmp_path):
    config = write_config(tmp_path, {"callbacks": {"token": "env:BIZ_TEST_CALLBACK_TOKEN"}})
    done = subprocess.run([*command(), "serve", "-c", str(config)], capture_output=True, text=True,
                          timeout=30, env={**child_env(), "BIZ_TEST_CALLBACK_TOKEN": "from/the/environment-0123"},
                          stdin=subprocess.DEVNULL)
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        ("openim-bizplugin: config error: callbacks.token: must be URL-path safe: only A-Z a-z 0-9 . _ ~ -"
         " (it is one segment of the callback URL in OpenIM's webhooks.yml)")]
