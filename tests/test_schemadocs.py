"""``schemas docs``: the browsable catalogue (Markdown and HTML) and its command."""

from __future__ import annotations

import html
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from e2e_support import SCHEMAS_DIR, write_config
from openim_bizplugin.catalog.registry import Catalog
from openim_bizplugin.cli import run
from openim_bizplugin.catalog.docs import (
    EXAMPLE_CLIENT, delivered_argument, describe_catalog, render_html, render_markdown, schema_fields, write_docs,
)

ENVELOPE_KEYS = ["id", "type", "v", "ts", "from", "priority", "data"]


def cli(*argv: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    code = run(list(argv), stdout, stderr)
    return code, stdout.getvalue(), stderr.getvalue()


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def shipped() -> list[tuple[str, int, dict]]:
    """(type, version, schema) of every file of the shipped catalogue, read directly."""
    return [(path.parent.name, int(path.stem[1:]), json.loads(path.read_text(encoding="utf-8")))
            for path in sorted(SCHEMAS_DIR.glob("*/v*.json"))]


def top_level_fields(schema: dict) -> list[str]:
    return list(schema["properties"])


@pytest.fixture(scope="module")
def types():
    return describe_catalog(Catalog.load(SCHEMAS_DIR))


@pytest.fixture(scope="module")
def markdown(types) -> str:
    return render_markdown(types)


@pytest.fixture(scope="module")
def page(types) -> str:
    return render_html(types)


def copy_catalogue(tmp_path: Path) -> Path:
    return Path(shutil.copytree(SCHEMAS_DIR, tmp_path / "schemas"))


def edit_schema(path: Path, change) -> None:
    schema = json.loads(path.read_text(encoding="utf-8"))
    change(schema)
    path.write_text(json.dumps(schema, ensure_ascii=False), encoding="utf-8")


# --- What the catalogue says --------------------------------------------------------------


def test_markdown_mentions_every_type_version_and_field(markdown):
    for name, version, schema in shipped():
        assert f"## `{name}`" in markdown
        assert f"### `{name}` v{version}" in markdown
        section = version_section(markdown, name, version)
        for field in top_level_fields(schema):
            assert f"| `{field}` |" in section, (name, version, field)
        assert (schema["description"] in section) or (schema["description"] in markdown)
    # a nested object ($ref to $defs/money) is listed field by field
    order = version_section(markdown, "order.status_changed", 1)
    assert "| `amount.value` | string | yes |" in order
    assert "| `amount.currency` | string | yes |" in order


def version_section(markdown: str, name: str, version: int) -> str:
    start = markdown.index(f"### `{name}` v{version}")
    following = [m.start() for m in re.finditer(r"^#{2,3} ", markdown, re.M) if m.start() > start]
    return markdown[start:following[0] if following else len(markdown)]


def test_markdown_shows_the_v1_to_v2_change_of_profile_updated(markdown):
    v2 = version_section(markdown, "profile.updated", 2)
    assert "Changes from v1:" in v2
    assert "- added optional field /changed_by (string)" in v2
    assert "Changes from" not in version_section(markdown, "profile.updated", 1)
    # newest version first
    assert markdown.index("### `profile.updated` v2") < markdown.index("### `profile.updated` v1")


def test_fields_carry_type_required_description_values_and_limits(types):
    [profile] = [t for t in types if t.name == "profile.updated"]
    rows = {f.name: f for f in profile.latest.fields}
    assert rows["fields"].type == "array of string"
    assert rows["fields"].required is True
    assert rows["fields"].values == ("nickname", "faceURL", "gender", "birth", "phone", "email", "remark", "ex")
    assert rows["fields"].limits == ("at least 1 item", "unique items")
    assert rows["updated_at"].limits == ("format: date-time",)
    assert rows["changed_by"].type == "string"  # inferred from the enum, as `schemas check` does
    assert rows["changed_by"].required is False
    assert rows["changed_by"].description.startswith("Who changed it")
    [order] = [t for t in types if t.name == "order.status_changed"]
    rows = {f.name: f for f in order.latest.fields}
    assert rows["status"].description == "The new status."  # beside the $ref, not the target's
    assert "shipped" in rows["status"].values
    assert rows["amount.currency"].limits == ("pattern: ^[A-Z]{3}$",)
    assert rows["order_id"].limits == ("1-64 characters",)


def test_arrays_of_objects_are_listed_with_their_item_fields():
    schema = {"type": "object", "required": ["lines"], "properties": {
        "lines": {"type": "array", "maxItems": 50, "items": {
            "type": "object", "required": ["sku"],
            "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}}}}}
    rows = {f.name: f for f in schema_fields(schema)}
    assert list(rows) == ["lines", "lines[].sku", "lines[].qty"]
    assert rows["lines"].type == "array of object"
    assert rows["lines"].limits == ("at most 50 items",)
    assert rows["lines[].sku"].required and not rows["lines[].qty"].required
    assert rows["lines[].qty"].limits == (">= 1",)


def test_delivery_defaults_come_from_type_toml(markdown):
    upgrade = markdown[markdown.index("## `app.upgrade_available`"):markdown.index("## `order.status_changed`")]
    assert "| `offline` | hold |" in upgrade
    assert "| `ttl_seconds` | 604800 (7 days) |" in upgrade
    assert "| `rate_limit` | 1/day | at most this many per recipient; more are dropped (throttled) |" in upgrade
    assert "| `persistent` | false | online users only" in upgrade
    profile = markdown[markdown.index("## `profile.updated`"):]
    assert "| `offline` | store | sent at once to a user who is online; held while the user is offline" in profile
    assert "| `persistent` | true | reaches apps that were offline: the sidecar holds it" in profile
    action = markdown[markdown.index("## `action.required`"):markdown.index("## `app.upgrade_available`")]
    assert "| `mode` | custom | Custom message (contentType 110)" in action
    assert "| `push_title` | Action required |" in action


def test_every_example_has_the_envelope_an_app_receives(types, markdown):
    catalog = Catalog.load(SCHEMAS_DIR)
    for t in types:
        for v in t.versions:
            assert [e.data for e in v.examples] == catalog.schema(t.name, v.version)["examples"]
            for example in v.examples:
                envelope = example.envelope
                assert list(envelope) == ENVELOPE_KEYS
                assert (envelope["type"], envelope["v"], envelope["data"]) == (t.name, v.version, example.data)
                assert envelope["priority"] == t.defaults.priority
                assert envelope["from"] == EXAMPLE_CLIENT
                assert re.fullmatch(r"[0-9a-f]{32}", envelope["id"])
                assert json.loads(example.envelope_text) == envelope
                assert json.dumps(envelope, indent=2, ensure_ascii=False) in markdown
                assert json.dumps(example.data, indent=2, ensure_ascii=False) in markdown
    ids = [e.envelope["id"] for t in types for v in t.versions for e in v.examples]
    assert len(set(ids)) == len(ids)


def test_the_sdk_argument_matches_the_mode():
    envelope = '{"id":"m1","type":"a.b","v":1,"ts":1,"from":"crm","priority":"normal","data":{}}'
    business = json.loads(delivered_argument("a.b", "notification", envelope))
    assert business == {"key": "a.b", "data": envelope}
    custom = json.loads(delivered_argument("a.b", "custom", envelope))
    assert custom == {"data": envelope, "description": "a.b", "extension": ""}


def test_output_is_reproducible(types):
    again = describe_catalog(Catalog.load(SCHEMAS_DIR))
    assert render_markdown(again) == render_markdown(types)
    assert render_html(again) == render_html(types)


def test_html_is_one_self_contained_page_with_the_same_content(page, types):
    assert page.startswith("<!DOCTYPE html>")
    assert "<style>" in page
    assert not re.search(r"<(script|link|img|iframe)\b", page)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    for name, version, schema in shipped():
        assert f'id="{name.replace(".", "-").replace("_", "-")}-v{version}"' in page
        for field in top_level_fields(schema):
            assert f"<code>{field}</code>" in page
    assert "added optional field /changed_by (string)" in page
    first = types[0].latest.examples[0]
    assert html.escape(json.dumps(first.envelope, indent=2, ensure_ascii=False), quote=True) in page


def test_breaking_changes_and_deprecated_versions_are_marked(tmp_path):
    catalogue = copy_catalogue(tmp_path)
    folder = catalogue / "profile.updated"

    def v3(schema):
        del schema["properties"]["updated_at"]
        schema["required"] = ["fields", "changed_by"]
        schema["examples"] = [{"fields": ["email"], "changed_by": "user"}]

    shutil.copy(folder / "v2.json", folder / "v3.json")
    edit_schema(folder / "v3.json", v3)
    toml = folder / "type.toml"
    toml.write_text(toml.read_text().replace("deprecated_versions = []", "deprecated_versions = [1]"))
    types = describe_catalog(Catalog.load(catalogue))
    markdown, page = render_markdown(types), render_html(types)
    v3_section = version_section(markdown, "profile.updated", 3)
    assert "- **BREAKING** removed field /updated_at" in v3_section
    assert "- **BREAKING** field /changed_by is now required" in v3_section
    assert '<span class="breaking">BREAKING</span> removed field /updated_at' in page
    assert "### `profile.updated` v1 (deprecated)" in markdown
    assert '<span class="tag deprecated">deprecated</span>' in page


# --- Escaping -------------------------------------------------------------------------------


HOSTILE = '<script>alert("x")</script> & <img src=x onerror=alert(1)> | a`b'


def hostile_catalogue(tmp_path: Path) -> Path:
    catalogue = copy_catalogue(tmp_path)

    def poison(schema):
        schema["description"] = HOSTILE
        schema["title"] = "</title><script>t()</script>"
        action = schema["properties"]["action"]
        action["description"] = HOSTILE
        action["enum"].append("<b>bold</b>|pipe")
        schema["properties"]["body"]["pattern"] = r"^(?:[^`]*|`</code><script>p\(\)</script>)$"
        schema["examples"][0]["body"] = "a</code></pre><script>e()</script>"

    edit_schema(catalogue / "action.required" / "v1.json", poison)
    toml = catalogue / "action.required" / "type.toml"
    toml.write_text(toml.read_text().replace('push_title = "Action required"',
                                              'push_title = "<i>push</i> & co"'))
    return catalogue


def test_html_escapes_every_piece_of_catalogue_text(tmp_path):
    types = describe_catalog(Catalog.load(hostile_catalogue(tmp_path)))
    page = render_html(types)
    assert "<script" not in page and "<img" not in page and "<b>" not in page and "<i>" not in page
    assert "</title><script>" not in page
    assert html.escape(HOSTILE, quote=True) in page
    assert "&lt;b&gt;bold&lt;/b&gt;|pipe" in page
    assert "&lt;i&gt;push&lt;/i&gt; &amp; co" in page
    assert "a&lt;/code&gt;&lt;/pre&gt;&lt;script&gt;e()&lt;/script&gt;" in page
    # every tag left is one the renderer writes itself
    assert set(re.findall(r"</?([a-zA-Z0-9]+)", page)) <= {
        "html", "head", "meta", "title", "style", "body", "nav", "strong", "ul", "li", "a", "main", "h1", "h2",
        "h3", "p", "code", "table", "thead", "tbody", "tr", "th", "td", "section", "span", "br", "div", "pre"}


def test_markdown_keeps_catalogue_text_out_of_raw_html_and_table_syntax(tmp_path):
    markdown = render_markdown(describe_catalog(Catalog.load(hostile_catalogue(tmp_path))))
    row = next(line for line in markdown.splitlines() if line.startswith("| `action` |"))
    # the row still has its six cells: every pipe from the catalogue is escaped
    assert len(re.findall(r"(?<!\\)\|", row)) == 7
    assert "&lt;script&gt;alert(\"x\")&lt;/script&gt; &amp; &lt;img src=x onerror=alert(1)&gt; \\| a\\`b" in row
    assert "``<b>bold</b>\\|pipe``" not in row and "`<b>bold</b>\\|pipe`" in row
    pattern_row = next(line for line in markdown.splitlines() if line.startswith("| `body` |"))
    assert r"``pattern: ^(?:[^`]*\|`</code><script>p\(\)</script>)$``" in pattern_row


def _only_inside_code(markdown: str) -> bool:
    """Raw ``<script`` may appear only inside code spans or fenced blocks, where it is text."""
    outside = re.sub(r"```.*?```", "", markdown, flags=re.S)
    outside = re.sub(r"(`+)(?:(?!\1).)+?\1", "", outside)
    return "<script" not in outside and "<img" not in outside


def test_markdown_never_lets_catalogue_html_through_outside_code(tmp_path):
    markdown = render_markdown(describe_catalog(Catalog.load(hostile_catalogue(tmp_path))))
    assert _only_inside_code(markdown)


# --- The command --------------------------------------------------------------------------------


def test_cli_writes_markdown_by_default_and_says_so_in_one_line(tmp_path):
    out = tmp_path / "catalogue.md"
    code, stdout, stderr = cli("schemas", "docs", "--dir", str(SCHEMAS_DIR), "--out", str(out))
    assert code == 0, stderr
    assert one_line(stdout) == f"wrote {out} (4 types, 5 versions, markdown)"
    assert stderr == ""
    text = out.read_text(encoding="utf-8")
    assert text == render_markdown(describe_catalog(Catalog.load(SCHEMAS_DIR)))
    assert (out.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["catalogue.md"]  # no temporary file left


def test_cli_writes_html_by_extension_or_by_format(tmp_path):
    code, stdout, _ = cli("schemas", "docs", "--dir", str(SCHEMAS_DIR), "--out", str(tmp_path / "site" / "types.html"))
    assert code == 0 and one_line(stdout).endswith("html)")
    assert (tmp_path / "site" / "types.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    code, _, _ = cli("schemas", "docs", "--dir", str(SCHEMAS_DIR), "--out", str(tmp_path / "t.txt"), "--format", "html")
    assert code == 0 and (tmp_path / "t.txt").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    code, _, _ = cli("schemas", "docs", "--dir", str(SCHEMAS_DIR), "--out", str(tmp_path / "t.html"),
                     "--format", "markdown")
    assert code == 0 and (tmp_path / "t.html").read_text(encoding="utf-8").startswith("# Message type catalogue")


@pytest.mark.parametrize("out", [["--out", "-"], []])  # SPEC §2: Markdown to stdout unless --out names a file
def test_cli_out_dash_or_no_out_prints_the_markdown_document_only(out):
    code, stdout, stderr = cli("schemas", "docs", "--dir", str(SCHEMAS_DIR), *out)
    assert code == 0 and stderr == ""
    assert stdout == render_markdown(describe_catalog(Catalog.load(SCHEMAS_DIR)))


def test_cli_reads_the_catalogue_named_by_the_config(tmp_path, monkeypatch):
    config = write_config(tmp_path)
    code, stdout, _ = cli("schemas", "docs", "-c", str(config), "--out", str(tmp_path / "c.md"))
    assert code == 0 and "4 types" in stdout
    monkeypatch.setenv("BIZPLUGIN_CONFIG", str(config))
    code, stdout, _ = cli("schemas", "docs", "--out", str(tmp_path / "d.md"))
    assert code == 0 and (tmp_path / "d.md").exists()


def test_cli_fails_with_one_line_on_an_invalid_catalogue(tmp_path):
    catalogue = copy_catalogue(tmp_path)
    broken = catalogue / "action.required" / "v1.json"
    edit_schema(broken, lambda schema: schema.update(examples=[{"action": "dance"}]))
    out = tmp_path / "c.md"
    code, stdout, stderr = cli("schemas", "docs", "--dir", str(catalogue), "--out", str(out))
    assert code == 1 and stdout == ""
    line = one_line(stderr)
    assert line.startswith("openim-bizplugin: ") and str(broken) in line and "schemas check" in line
    assert not out.exists()


def test_cli_fails_with_one_line_on_a_missing_catalogue_or_unwritable_output(tmp_path):
    code, _, stderr = cli("schemas", "docs", "--dir", str(tmp_path / "nope"), "--out", str(tmp_path / "c.md"))
    assert code == 1 and "schema directory not found" in one_line(stderr)
    (tmp_path / "file").write_text("x")
    code, _, stderr = cli("schemas", "docs", "--dir", str(SCHEMAS_DIR), "--out", str(tmp_path / "file" / "c.md"))
    assert code == 1 and one_line(stderr).startswith(f"openim-bizplugin: --out {tmp_path / 'file' / 'c.md'}: ")
    code, _, stderr = cli("schemas", "docs", "--dir", str(SCHEMAS_DIR), "--out", str(tmp_path))
    assert code == 1 and one_line(stderr).startswith("openim-bizplugin: --out ")


def test_cli_usage_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("BIZPLUGIN_CONFIG", raising=False)
    code, _, _ = cli("schemas", "docs", "--dir", str(SCHEMAS_DIR), "--out", "x.md", "--format", "pdf")
    assert code == 2 and "'pdf'" in capsys.readouterr().err.strip().splitlines()[-1]
    code, _, stderr = cli("schemas", "docs", "--out", str(tmp_path / "c.md"))
    assert code == 2 and "BIZPLUGIN_CONFIG" in one_line(stderr)


def test_write_docs_returns_the_summary(tmp_path):
    assert write_docs(SCHEMAS_DIR, str(tmp_path / "x.md"), None) == f"wrote {tmp_path / 'x.md'} (4 types, 5 versions, markdown)"
