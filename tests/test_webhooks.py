"""``openim-bizplugin webhooks --from FILE``: OpenIM's webhooks.yml with only the sidecar's keys changed.

OpenIM's loader (viper on yaml.v3) refuses a key that appears twice, so lines
appended to the stock file stop OpenIM from starting. The command must change
the keys where they stand and leave every other byte alone. The stock files of
open-im-server v3.8.3 and main are fixtures (tests/fixtures/webhooks/); the
output is read back with a loader that refuses duplicate keys, as OpenIM's does.
"""

from __future__ import annotations

import difflib
import io
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import write_config
from openim_bizplugin.cli import run
from openim_bizplugin.config import load_config
from openim_bizplugin.webhooks import WebhooksFileError, edit_webhooks

FIXTURES = Path(__file__).parent / "fixtures" / "webhooks"
PUBLIC = "http://bizplugin:8080"
URL = f"{PUBLIC}/openim/callback/test-callback-token-0001"
SIDECAR_HOOKS = ("afterSendSingleMsg", "afterSendGroupMsg", "afterMsgSaveDB", "afterSingleMsgRead",
                 "afterGroupMsgRead", "afterUserOnline", "afterUserOffline")


class StrictLoader(yaml.SafeLoader):
    """yaml.v3's rule: a mapping key that appears twice is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        repeated = {key for key in keys if keys.count(key) > 1}
        if repeated:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {repeated}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def strict_load(text: str) -> Any:
    return yaml.load(text, Loader=StrictLoader)


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return run(list(argv), out, err), out.getvalue(), err.getvalue()


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path)


@pytest.fixture
def config(config_file: Path):
    return load_config(config_file)


def test_the_old_advice_to_append_lines_gives_a_file_openim_refuses():
    """Why the command exists: the stock file already has every key doctor used to print."""
    stock = (FIXTURES / "main.webhooks.yml").read_text()
    appended = stock + f"url: {URL}\nafterUserOnline:\n  enable: true\n  timeout: 5\n"
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate keys"):
        strict_load(appended)


@pytest.mark.parametrize("release", ["v3.8.3", "main"])
def test_stock_file_gets_only_the_sidecars_keys_changed(config_file, release):
    stock_path = FIXTURES / f"{release}.webhooks.yml"
    stock = stock_path.read_text()
    code, out, err = _run("webhooks", "-c", str(config_file), "--from", str(stock_path), "--public-url", PUBLIC)
    assert code == 0, err
    before, after = strict_load(stock), strict_load(out)  # no duplicate keys: OpenIM starts

    assert after["url"] == URL
    for hook in SIDECAR_HOOKS:
        assert (after[hook]["enable"], after[hook]["timeout"]) == (True, 5), hook
    assert after["afterSendSingleMsg"]["attentionIds"] == ["imAdmin"]
    assert after["afterSendGroupMsg"].get("attentionIds", []) == []  # a group id here would drop every group callback
    for key in before:  # every other key and value as it was
        if key != "url" and key not in SIDECAR_HOOKS:
            assert after[key] == before[key], key
    for hook in SIDECAR_HOOKS:
        for key, value in (before.get(hook) or {}).items():
            if key not in ("enable", "attentionIds"):
                assert after[hook][key] == value, f"{hook}.{key}"
    _assert_only_sidecar_lines_changed(stock, out)
    assert "openim-bizplugin: changed url, afterSendSingleMsg.enable" in err


def _assert_only_sidecar_lines_changed(old: str, new: str) -> None:
    """Byte for byte, every line is the old one, except values of the sidecar's keys (and appended hooks)."""
    old_lines, new_lines = old.splitlines(keepends=True), new.splitlines(keepends=True)
    owner = _hook_of_each_line(old_lines)
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        if op == "insert" and i1 == len(old_lines):  # a hook the file lacks, appended as a block
            assert re.fullmatch(r"(afterMsgSaveDB:\n)(  (enable: true|timeout: 5)\n)+", "".join(new_lines[j1:j2]))
            continue
        assert op == "replace" and i2 - i1 == j2 - j1, (op, old_lines[i1:i2], new_lines[j1:j2])
        for old_line, new_line, n in zip(old_lines[i1:i2], new_lines[j1:j2], range(i1, i2)):
            key = re.match(r"(\s*)([A-Za-z]+):", old_line)
            assert key and new_line.startswith(key.group(0)), (old_line, new_line)  # same key, same indent
            assert (owner[n], key.group(2)) in {("", "url")} | {(h, k) for h in SIDECAR_HOOKS
                                                                  for k in ("enable", "attentionIds")}


def _hook_of_each_line(lines: list[str]) -> list[str]:
    owner, current = [], ""
    for line in lines:
        top = re.match(r"([A-Za-z]+):", line)
        current = top.group(1) if top else current
        owner.append("" if top else current)
    return owner


def test_v383_file_gets_after_msg_save_db_added_with_a_note(config_file):
    code, out, err = _run("webhooks", "-c", str(config_file), "--from", str(FIXTURES / "v3.8.3.webhooks.yml"),
                          "--public-url", PUBLIC)
    assert code == 0
    assert out.endswith("afterMsgSaveDB:\n  enable: true\n  timeout: 5\n")
    assert "note: added afterMsgSaveDB: OpenIM main only (v3.8.x ignores the key)" in err


def test_a_second_run_changes_nothing(config_file, tmp_path):
    code, once, _ = _run("webhooks", "-c", str(config_file), "--from", str(FIXTURES / "main.webhooks.yml"),
                         "--public-url", PUBLIC)
    edited = tmp_path / "webhooks.yml"
    edited.write_text(once)
    code, twice, err = _run("webhooks", "-c", str(config_file), "--from", str(edited), "--public-url", PUBLIC)
    assert code == 0 and twice == once
    assert "changed nothing: it already points at this sidecar" in err


def test_without_public_url_it_warns_that_openim_cannot_reach_a_loopback_address(config_file):
    code, out, err = _run("webhooks", "-c", str(config_file), "--from", str(FIXTURES / "main.webhooks.yml"))
    assert code == 0 and out.startswith("url: http://127.0.0.1:0/openim/callback/")
    assert "pass --public-url" in err


def test_enabled_hooks_of_others_are_kept_and_named(config):
    stock = (FIXTURES / "main.webhooks.yml").read_text()
    text = stock.replace("beforeSendSingleMsg:\n  enable: false", "beforeSendSingleMsg:\n  enable: true")
    edited = edit_webhooks(text, config, PUBLIC)
    assert strict_load(edited.text)["beforeSendSingleMsg"]["enable"] is True
    assert any("beforeSendSingleMsg" in note and "OpenIM stops sending" in note for note in edited.notes)


# -- files that are not stock ------------------------------------------------------------------
def _edit(config, text: str) -> str:
    edited = edit_webhooks(text, config, PUBLIC)
    strict_load(edited.text)
    return edited.text


def test_block_lists_keep_block_style_and_other_comments(config):
    text = ("# ours\nurl: 'http://old:1/hook'   # who gets callbacks\nafterSendSingleMsg:\n"
            "    enable: false\n    timeout: 3   # short\n    attentionIds:\n      - alice   # a tester\n"
            "      - bob\n    # a comment after the list\n    deniedTypes: [110, 101]\n"
            "afterSendGroupMsg: {enable: false, attentionIds: [g1]}\nafterUserOnline:\n")
    assert _edit(config, text) == (
        f"# ours\nurl: '{URL}'   # who gets callbacks\nafterSendSingleMsg:\n"
        "    enable: true\n    timeout: 3   # short\n    attentionIds:\n      - imAdmin\n"
        "    # a comment after the list\n    deniedTypes: [101]\n"
        "afterSendGroupMsg: {enable: true, attentionIds: [], timeout: 5}\n"
        "afterUserOnline: {enable: true, timeout: 5}\n"
        "afterMsgSaveDB:\n    enable: true\n    timeout: 5\n"
        "afterSingleMsgRead:\n    enable: true\n    timeout: 5\n"
        "afterGroupMsgRead:\n    enable: true\n    timeout: 5\n"
        "afterUserOffline:\n    enable: true\n    timeout: 5\n")


def test_type_filters_let_custom_messages_through(config):
    text = ("url: x\nafterSendSingleMsg:\n  enable: true\n  timeout: 30\n  attentionIds: [ops, imAdmin]\n"
            "  allowedTypes: [101, 200-500]\n  deniedTypes: [\"100-200\", 1400]\n")
    loaded = strict_load(_edit(config, text))["afterSendSingleMsg"]
    assert loaded == {"enable": True, "timeout": 5, "attentionIds": ["ops", "imAdmin"],
                      "allowedTypes": [101, "200-500", 110], "deniedTypes": [1400]}


def test_crlf_file_without_final_newline_and_without_url(config):
    text = "afterUserOnline:\r\n  enable: false\r\n  timeout: 5"
    out = _edit(config, text)
    assert out.startswith(f"url: {URL}\r\nafterUserOnline:\r\n  enable: true\r\n  timeout: 5\r\nafterSendSingleMsg:")
    assert "\n" not in out.replace("\r\n", "")


@pytest.mark.parametrize("text, message", [
    ("url: [\n", "not YAML: expected the node content"),
    ("- url\n- afterUserOnline\n", "not OpenIM's webhooks.yml"),
    ("", "not OpenIM's webhooks.yml"),
    ("name: app\nport: 8080\n", "not OpenIM's webhooks.yml (no url and no hook"),
    ("callback:\n  url: http://x\n  userOnline:\n    enable: false\n", "OpenIM before v3.8"),
    ("url: a\nafterUserOnline:\n  enable: false\nafterUserOnline:\n  enable: true\n",
     "key 'afterUserOnline' appears twice (lines 2 and 4)"),
    ("url: a\nafterUserOnline:\n  enable: false\n  enable: true\n", "key 'afterUserOnline.enable' appears twice"),
    ("url: a\nbase: &b {enable: false}\nafterUserOnline: *b\n", "uses a YAML alias or merge key"),
    ("url: a\nafterUserOnline: true\n", "afterUserOnline (line 2) is not a mapping"),
    ("url: {a: 1}\n", "url (line 1) is not a string"),
    ("url: a\nafterUserOnline:\n  enable: !flag yes\n", "a value OpenIM cannot read"),
])
def test_files_it_cannot_change_safely_are_one_clear_error(config, text, message):
    with pytest.raises(WebhooksFileError, match=re.escape(message)):
        edit_webhooks(text, config, PUBLIC, name="webhooks.yml")


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("url: [\n", "not YAML"),
    (b"\xff\xfe\x00", "not a text file"),
    ("- a\n", "not OpenIM's webhooks.yml"),
])
def test_cli_errors_are_one_line_and_a_non_zero_exit(config_file, tmp_path, content, message):
    path = tmp_path / "webhooks.yml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    code, out, err = _run("webhooks", "-c", str(config_file), "--from", str(path))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"openim-bizplugin: {path}: ") and message in err
