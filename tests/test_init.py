"""``init`` writes a deployment folder from the package's own data; ``demo`` runs anywhere (SPEC §2)."""

from __future__ import annotations

import filecmp
import io
import re
import tomllib
from pathlib import Path

import pytest

from conftest import REPO
from openim_bizplugin.cli import run
from openim_bizplugin.config import load_config
from openim_bizplugin.scaffold import CONFIG_TEMPLATE, EXAMPLE_SCHEMAS

TEMPLATE = (REPO / "config.example.toml").read_text(encoding="utf-8")
URL_PATH_SAFE = re.compile(r"[A-Za-z0-9._~-]+")


def cli(*argv: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    code = run(list(argv), stdout, stderr)
    return code, stdout.getvalue(), stderr.getvalue()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def same_tree(left: Path, right: Path) -> bool:
    def walk(a: Path, b: Path) -> bool:
        cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
        _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
        return (not (cmp.left_only or cmp.right_only or cmp.funny_files or mismatch or errors)
                and all(walk(a / name, b / name) for name in cmp.common_dirs))
    return walk(left, right)


def key_paths(table: dict, prefix: str = "") -> set[str]:
    paths = set()
    for key, value in table.items():
        paths.add(prefix + key)
        if isinstance(value, dict):
            paths |= key_paths(value, f"{prefix}{key}.")
    return paths


def init(folder: Path) -> tuple[int, str, str]:
    return cli("init", str(folder))


# --- package data ------------------------------------------------------------------------


def test_the_package_carries_the_repository_catalogue_and_config_template():
    assert CONFIG_TEMPLATE.read_bytes() == (REPO / "config.example.toml").read_bytes()
    assert same_tree(EXAMPLE_SCHEMAS, REPO / "schemas")


def test_demo_runs_from_an_empty_folder_with_the_shipped_catalogue(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BIZPLUGIN_CONFIG", raising=False)
    code, out, err = cli("demo")
    assert code == 0, out + err
    assert "4 of 4 messages delivered." in out
    assert not list(tmp_path.iterdir())  # the demo keeps its files elsewhere


# --- init --------------------------------------------------------------------------------


def test_init_writes_a_config_that_loads_with_fresh_secrets_and_token(tmp_path):
    code, out, err = init(tmp_path / "a")
    assert code == 0 and err == ""
    config = load_config(tmp_path / "a" / "config.toml")
    example = load_config(REPO / "config.example.toml")
    assert config.schemas_dir == tmp_path / "a" / "schemas"  # relative paths: against the new folder
    assert config.storage.sqlite_path == tmp_path / "a" / "bizplugin.db"
    assert URL_PATH_SAFE.fullmatch(config.callback_token)
    assert config.callback_token != example.callback_token
    assert set(config.clients) == set(example.clients)
    for client_id, client in config.clients.items():
        assert len(client.secrets) == 1 and client.secrets[0] not in example.clients[client_id].secrets
    secrets = [config.callback_token] + [client.secrets[0] for client in config.clients.values()]
    assert len(set(secrets)) == len(secrets)
    assert not any(secret in out for secret in secrets)  # the next steps never show a secret

    init(tmp_path / "b")
    other = load_config(tmp_path / "b" / "config.toml")
    assert other.callback_token != config.callback_token
    assert all(other.clients[c].secrets != config.clients[c].secrets for c in config.clients)


def test_init_secrets_are_made_like_keygens(tmp_path):
    _, keygen, _ = cli("keygen")
    init(tmp_path)
    tables = tomllib.loads((tmp_path / "config.toml").read_text(encoding="utf-8"))
    for client in tables["clients"].values():
        secret = client["secrets"][0]
        assert len(secret) == len(keygen.strip()) and URL_PATH_SAFE.fullmatch(secret)


def test_init_config_keeps_every_key_and_comment_of_the_template(tmp_path):
    init(tmp_path)
    written = (tmp_path / "config.toml").read_text(encoding="utf-8").splitlines()
    template = TEMPLATE.splitlines()
    assert len(written) == len(template)
    changed = [(old, new) for old, new in zip(template, written) if old != new]
    # Only the example secrets and token, and the "Start with" line naming the file.
    assert [old for old, _ in changed if "change-me" not in old] == [
        "# Start with:  openim-bizplugin serve -c config.example.toml"]
    for old, new in (pair for pair in changed if "change-me" in pair[0]):
        assert new.split("=")[0] == old.split("=")[0] and "change-me" not in new
    assert key_paths(tomllib.loads("\n".join(written))) == key_paths(tomllib.loads(TEMPLATE))


def test_init_writes_the_example_catalogue_with_a_readme(tmp_path):
    init(tmp_path)
    assert same_tree(tmp_path / "schemas", REPO / "schemas")
    assert "To add a type" in (tmp_path / "schemas" / "README.md").read_text(encoding="utf-8")
    code, out, _ = cli("schemas", "check", "-c", str(tmp_path / "config.toml"))
    assert code == 0 and "all valid" in out


def test_init_defaults_to_the_current_folder_and_prints_the_next_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = cli("init")
    assert code == 0 and (tmp_path / "config.toml").is_file() and (tmp_path / "schemas").is_dir()
    steps = out.splitlines()
    assert any("[openim]" in line and "config.toml" in line for line in steps)
    ordered = ["openim-bizplugin doctor -c config.toml", "openim-bizplugin webhooks -c config.toml --from",
               "openim-bizplugin serve -c config.toml"]
    at = [next(i for i, line in enumerate(steps) if command in line) for command in ordered]
    assert at == sorted(at)


@pytest.mark.parametrize("existing", ["config.toml", "schemas"])
def test_init_refuses_to_overwrite_and_writes_nothing(tmp_path, existing):
    if existing == "schemas":
        (tmp_path / "schemas").mkdir()
        (tmp_path / "schemas" / "mine.txt").write_text("mine")
    else:
        (tmp_path / "config.toml").write_text("mine")
    before = snapshot(tmp_path)
    code, out, err = init(tmp_path)
    assert code == 1 and out == ""
    assert err.strip() == f"openim-bizplugin: init: {tmp_path / existing} already exists: nothing written (init never overwrites)"
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == [existing]


def test_init_into_a_file_is_one_clear_line(tmp_path):
    (tmp_path / "taken").write_text("x")
    code, _, err = init(tmp_path / "taken")
    assert code == 1 and err.strip() == f"openim-bizplugin: init: {tmp_path / 'taken'} is not a folder: nothing written"


def test_init_config_is_readable_by_its_owner_only(tmp_path):
    init(tmp_path)
    assert (tmp_path / "config.toml").stat().st_mode & 0o777 == 0o600


def test_init_that_fails_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    def refuse(path, text):  # as a read-only folder does, but root may write anywhere
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr("openim_bizplugin.scaffold._write_private", refuse)
    code, _, err = init(tmp_path)
    assert code == 1 and err.strip() == f"openim-bizplugin: init: {tmp_path / 'config.toml'}: Permission denied"
    assert list(tmp_path.iterdir()) == []
