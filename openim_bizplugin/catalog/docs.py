"""``schemas docs``: a browsable catalogue of the message types for app developers.

Loads a catalogue with :meth:`.Catalog.load` (the checks the server runs at
start-up) and writes one Markdown file or one self-contained HTML page. Per
type: its description and delivery defaults (``type.toml``); per version,
newest first: its fields (name, type, required, description, allowed values,
formats and limits), what changed since the previous version (computed by
:func:`.schemacheck.diff_schemas`, the same diff ``schemas check`` prints),
every example, and the envelope an app receives for it — built by the same
code that builds envelopes for real messages (:func:`.intake.new_message`),
with a fixed id and time so that the output only changes when the catalogue
does.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..envelope import parse_envelope
from ..intake import new_message
from .check import SchemaChange, diff_schemas

# Private helpers of the diff, reused so that docs and `schemas check` agree
# on how a field's type is named and how local $refs are followed.
from .check import _resolve as resolve_ref
from .check import _type_name as field_type
from .registry import Catalog, MessageType, TypeDefaults

FORMATS = ("markdown", "html")
#: 2025-11-26T12:00:00Z, the time every example envelope carries.
EXAMPLE_TS_MS = 1764158400000
EXAMPLE_CLIENT = "crm"
EXAMPLE_USER = "u1001"
_MAX_DEPTH = 16  # nested objects listed; deeper ones are left to the schema


class DocsError(Exception):
    """The catalogue cannot be documented or the output cannot be written."""


# --- The model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldDoc:
    """One row of a version's field table."""

    name: str  # dotted as an app reads it: "amount.value", "fields[]", "items[].sku"
    type: str  # "string", "array of string", "string | null"
    required: bool  # within its parent object
    description: str
    values: tuple[Any, ...]  # enum / const (of the items, for an array of scalars)
    limits: tuple[str, ...]  # "format: date-time", "length 1-100", "unique items"


@dataclass(frozen=True)
class ExampleDoc:
    data: Any
    envelope: dict[str, Any]  # the envelope object (the app parses it from a string)
    envelope_text: str  # the string itself, exactly as the sidecar sends it


@dataclass(frozen=True)
class VersionDoc:
    version: int
    title: str
    description: str
    deprecated: bool
    fields: tuple[FieldDoc, ...]
    closed: bool  # "additionalProperties": false at the top
    previous: int | None  # the version the changes are relative to
    changes: tuple[SchemaChange, ...]
    examples: tuple[ExampleDoc, ...]


@dataclass(frozen=True)
class TypeDoc:
    name: str
    title: str
    description: str
    defaults: TypeDefaults
    versions: tuple[VersionDoc, ...]  # newest first

    @property
    def latest(self) -> VersionDoc:
        return self.versions[0]

    @property
    def anchor(self) -> str:
        return slug(self.name)


def slug(name: str) -> str:
    """An anchor for a type or version: letters, digits and ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def describe_catalog(catalog: Catalog, *, client: str = EXAMPLE_CLIENT) -> list[TypeDoc]:
    """The documentation model of every type in *catalog*, sorted by name."""
    return [describe_type(t, catalog, client=client) for t in catalog.types()]


def describe_type(message_type: MessageType, catalog: Catalog, *, client: str = EXAMPLE_CLIENT) -> TypeDoc:
    versions = message_type.versions
    docs = []
    for index, version in enumerate(versions):
        schema = message_type.schemas[version]
        previous = versions[index - 1] if index else None
        changes = diff_schemas(message_type.schemas[previous], schema) if previous else []
        docs.append(VersionDoc(
            version=version,
            title=_text(schema.get("title")),
            description=_text(schema.get("description")),
            deprecated=message_type.is_deprecated(version),
            fields=tuple(schema_fields(schema)),
            closed=schema.get("additionalProperties") is False,
            previous=previous,
            changes=tuple(changes),
            examples=tuple(_example(message_type, version, n, data, catalog, client)
                           for n, data in enumerate(schema.get("examples", ()))),
        ))
    docs.reverse()
    latest = docs[0]
    return TypeDoc(message_type.name, latest.title, latest.description, message_type.defaults, tuple(docs))


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _example(message_type: MessageType, version: int, index: int, data: Any, catalog: Catalog,
             client: str) -> ExampleDoc:
    """The envelope for one example, built as for a real message (defaults from type.toml)."""
    body = {"type": message_type.name, "version": version, "data": data, "to": {"users": [EXAMPLE_USER]}}
    request = parse_envelope(body, client_id=client, allowed_types=("*",), catalog=catalog, max_recipients=1)
    envelope = json.loads(new_message(request, client, EXAMPLE_TS_MS).envelope)
    # A real id is 12 hex digits of time and 20 random ones; here the random
    # part is derived from the example so the output is reproducible.
    seed = f"{message_type.name}/v{version}/{index}".encode()
    envelope["id"] = f"{EXAMPLE_TS_MS:012x}{hashlib.sha256(seed).hexdigest()[:20]}"
    return ExampleDoc(data, envelope, json.dumps(envelope, separators=(",", ":"), ensure_ascii=False))


def delivered_argument(name: str, mode: str, envelope_text: str) -> str:
    """What the app's OpenIM SDK hands over for one message (SPEC §5, OPENIM.md §6).

    Notification mode: the string passed to ``onRecvCustomBusinessMessage``.
    Custom mode: the ``customElem`` of the message passed to ``OnRecvNewMessage``.
    """
    if mode == "notification":
        value: dict[str, str] = {"key": name, "data": envelope_text}
    else:
        value = {"data": envelope_text, "description": name, "extension": ""}
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# --- Fields ------------------------------------------------------------------------------------


def schema_fields(schema: dict) -> list[FieldDoc]:
    """One row per property, nested objects and arrays of objects included."""
    rows: list[FieldDoc] = []
    _object_fields(schema, schema, "", rows, 0)
    return rows


def _merged(node: Any, root: dict) -> dict:
    """*node* with a local ``$ref`` resolved; keywords beside the ``$ref`` win (2020-12)."""
    if not isinstance(node, dict):
        return {}
    target = resolve_ref(node, root)
    merged = dict(target) if isinstance(target, dict) else {}
    merged.update({k: v for k, v in node.items() if k != "$ref"})
    return merged


def _object_fields(root: dict, node: dict, prefix: str, rows: list[FieldDoc], depth: int) -> None:
    if depth > _MAX_DEPTH:
        return
    required = set(node.get("required", ()))
    properties = node.get("properties", {})
    if not isinstance(properties, dict):
        return
    for name, sub in properties.items():
        _field(root, _merged(sub, root), prefix + name, name in required, rows, depth)


def _field(root: dict, node: dict, path: str, required: bool, rows: list[FieldDoc], depth: int) -> None:
    kind = field_type(node)
    values = _values(node)
    limits = _limits(node)
    items = _merged(node.get("items"), root) if kind == "array" or "items" in node else {}
    if items:
        item_kind = field_type(items)
        kind = "array" if item_kind == "any" else f"array of {item_kind}"
        values = values or _values(items)
        limits += tuple(f"items: {limit}" for limit in _limits(items))
    rows.append(FieldDoc(path, kind, required, _text(node.get("description")), values, limits))
    if "properties" in node:
        _object_fields(root, node, path + ".", rows, depth + 1)
    if "properties" in items:
        _object_fields(root, items, path + "[].", rows, depth + 1)


def _values(node: dict) -> tuple[Any, ...]:
    if "const" in node:
        return (node["const"],)
    enum = node.get("enum")
    return tuple(enum) if isinstance(enum, list) else ()


def _limits(node: dict) -> tuple[str, ...]:
    """Formats and limits of one schema node, in words a reader checks quickly."""
    found = []
    if isinstance(node.get("format"), str):
        found.append(f"format: {node['format']}")
    if isinstance(node.get("pattern"), str):
        found.append(f"pattern: {node['pattern']}")
    found += _range("character", node.get("minLength"), node.get("maxLength"))
    found += _range("item", node.get("minItems"), node.get("maxItems"))
    found += _range("key", node.get("minProperties"), node.get("maxProperties"))
    for key, sign in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if _number(node.get(key)):
            found.append(f"{sign} {node[key]}")
    if _number(node.get("multipleOf")):
        found.append(f"multiple of {node['multipleOf']}")
    if node.get("uniqueItems") is True:
        found.append("unique items")
    if "properties" in node and node.get("additionalProperties") is False:
        found.append("no other keys")
    for keyword in ("oneOf", "anyOf", "allOf"):
        if isinstance(node.get(keyword), list):
            found.append(f"{keyword}: {len(node[keyword])} alternatives (see the schema)")
    if "default" in node:
        found.append(f"default: {json.dumps(node['default'], ensure_ascii=False)}")
    if node.get("deprecated") is True:
        found.append("deprecated")
    return tuple(found)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _range(unit: str, low: Any, high: Any) -> list[str]:
    low, high = (v if _number(v) else None for v in (low, high))

    def count(n: Any) -> str:
        return f"{n} {unit}" if n == 1 else f"{n} {unit}s"

    if low is not None and high is not None:
        return [count(low) if low == high else f"{low}-{count(high)}"]
    if low is not None:
        return [f"at least {count(low)}"]
    if high is not None:
        return [f"at most {count(high)}"]
    return []


def show_value(value: Any) -> str:
    """An allowed value as a reader writes it: strings bare, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


# --- Delivery defaults in words ------------------------------------------------------------------


def duration(seconds: int) -> str:
    """``86400`` → ``1 day``; the largest unit that divides exactly."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}" + ("" if count == 1 else "s")
    return f"{seconds} seconds"


def default_rows(defaults: TypeDefaults) -> list[tuple[str, str, str]]:
    """``(setting, value, what it means)`` for each key of ``type.toml``."""
    notification = defaults.mode == "notification"
    mode = (
        "business notification: the app's onRecvCustomBusinessMessage gets {\"key\", \"data\"}, "
        "data = the envelope" if notification else
        "Custom message (contentType 110) in the conversation with the sender account (or in the group): "
        "OnRecvNewMessage, customElem.data = the envelope"
    )
    offline = {
        "store": "sent at once whether the user is online or not",
        "hold": "kept by the sidecar while the user is offline, sent when they come online (within the TTL)",
        "drop": "not sent to users who are offline at send time (they end skipped)",
    }[defaults.offline]
    if notification and defaults.persistent and defaults.offline == "store":
        offline = "sent at once to a user who is online; held while the user is offline (see persistent)"
    if notification:
        persistent = ("reaches apps that were offline: the sidecar holds it while the user is offline and sends it"
                      " when they come online (within the TTL), with reliabilityLevel 2. OpenIM alone would not"
                      " deliver it: v3.8.x stores no business notification, and on main an app syncs a stored one"
                      " after a reconnect only if the user has chatted with the sender" if defaults.persistent
                      else "online users only: OpenIM does not store it")
        push_title = push_desc = "not used: OpenIM sends no offline push for business notifications"
    else:
        persistent = "not used: custom messages are always stored in the conversation"
        push_title = "title of the offline push when the user has no device online; empty: no offline push"
        push_desc = "text of that offline push"
    if defaults.rate_limit:
        over = "delayed until the window allows" if defaults.rate_limit_policy == "delay" else "dropped (throttled)"
        rate = (defaults.rate_limit.text, f"at most this many per recipient; more are {over}")
    else:
        rate = ("none", "no per-recipient limit")
    deprecated = ", ".join(f"v{v}" for v in defaults.deprecated_versions) or "none"
    return [
        ("mode", defaults.mode, mode),
        ("priority", defaults.priority, "high is sent before queued normal work, normal before low "
                                        "(work that waits long moves up)"),
        ("offline", defaults.offline, offline),
        ("ttl_seconds", f"{defaults.ttl_seconds} ({duration(defaults.ttl_seconds)})",
         "not delivered after this; the recipient ends expired"),
        ("persistent", "true" if defaults.persistent else "false", persistent),
        ("rate_limit", rate[0], rate[1]),
        ("push_title", defaults.push_title or "(empty)", push_title),
        ("push_desc", defaults.push_desc or "(empty)", push_desc),
        ("deprecated_versions", deprecated, "still accepted; senders get a Deprecation header"),
    ]


def _overview(types: list[TypeDoc]) -> str:
    versions = sum(len(t.versions) for t in types)
    return f"{len(types)} types, {versions} versions"


_ABOUT = (
    "Every message reaches the app as an envelope, a JSON string "
    '{"id", "type", "v", "ts", "from", "priority", "data"}: "data" is the object described below, '
    '"v" its version, "id" the message id to de-duplicate on and to name in a receipt, "ts" '
    'milliseconds since the epoch, "from" the internal service that sent it. Notification-mode types '
    'arrive in onRecvCustomBusinessMessage as {"key": <type>, "data": <envelope>}; custom-mode types '
    "as a Custom message (contentType 110) whose customElem.data is the envelope. A sender may override "
    "a type's mode, priority, offline policy and TTL per message. docs/client-guide.md shows how to "
    "dispatch, de-duplicate and send receipts."
)


# --- Markdown --------------------------------------------------------------------------------------


def _md_text(text: str, cell: bool = False) -> str:
    """Prose for Markdown: no raw HTML, and safe inside a table cell."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("`", "\\`")
    if cell:
        text = " ".join(text.split()).replace("|", "\\|")
    return text


def _md_code(text: str, cell: bool = False) -> str:
    """An inline code span that holds any text (backticks included)."""
    text = " ".join(text.split()) if cell else text
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    span = f"{fence}{pad}{text}{pad}{fence}"
    return span.replace("|", "\\|") if cell else span


def _md_block(text: str, language: str = "json") -> list[str]:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}{language}", text, fence]


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def render_markdown(types: list[TypeDoc], source: str = "schemas") -> str:
    lines = [
        "# Message type catalogue",
        "",
        f"Generated by `openim-bizplugin schemas docs` from {_md_code(source)} ({_overview(types)}); "
        "regenerate it instead of editing it.",
        "",
        _md_text(_ABOUT),
        "",
        "| Type | Versions | Mode | Priority | Description |",
        "| --- | --- | --- | --- | --- |",
    ]
    for t in types:
        listed = ", ".join(f"v{v.version}" for v in reversed(t.versions))
        lines.append(f"| [{_md_code(t.name, True)}](#{t.anchor}) | {listed} | {t.defaults.mode} | "
                     f"{t.defaults.priority} | {_md_text(t.description, True)} |")
    for t in types:
        lines += ["", f'<a id="{t.anchor}"></a>', "", f"## {_md_code(t.name)}", ""]
        if t.title:
            lines += [f"**{_md_text(t.title)}.** {_md_text(t.description)}", ""]
        elif t.description:
            lines += [_md_text(t.description), ""]
        lines += ["Delivery defaults (`type.toml`):", "", "| Setting | Value | Meaning |", "| --- | --- | --- |"]
        for key, value, meaning in default_rows(t.defaults):
            lines.append(f"| `{key}` | {_md_text(value, True)} | {_md_text(meaning, True)} |")
        first = t.latest.examples[0] if t.latest.examples else None
        if first is not None:
            what = ("The string `onRecvCustomBusinessMessage` receives" if t.defaults.mode == "notification"
                    else "The `customElem` of the message `OnRecvNewMessage` receives")
            lines += ["", f"{what}, for the first example of v{t.latest.version}:", ""]
            lines += _md_block(delivered_argument(t.name, t.defaults.mode, first.envelope_text), "text")
        for v in t.versions:
            lines += _md_version(t, v)
    return "\n".join(lines) + "\n"


def _closing(v: VersionDoc) -> str:
    """The sentence under a field table."""
    text = "Fields other than these are refused." if v.closed else "Other fields are allowed."
    if any("." in f.name or "[]" in f.name for f in v.fields):
        text += " A nested field is required only when its parent is present."
    return text


def _md_version(t: TypeDoc, v: VersionDoc) -> list[str]:
    heading = f"### {_md_code(t.name)} v{v.version}" + (" (deprecated)" if v.deprecated else "")
    lines = ["", f'<a id="{t.anchor}-v{v.version}"></a>', "", heading, ""]
    if v.description and (v.description != t.description or v is not t.latest):
        lines += [_md_text(v.description), ""]
    if v.deprecated:
        lines += ["Deprecated: still accepted, but senders should move to a newer version.", ""]
    lines += ["| Field | Type | Required | Description | Values | Format and limits |",
              "| --- | --- | --- | --- | --- | --- |"]
    for f in v.fields:
        values = ", ".join(_md_code(show_value(x), True) for x in f.values)
        limits = "; ".join(_md_code(x, True) if x.startswith(("pattern:", "items: pattern:")) else _md_text(x, True)
                           for x in f.limits)
        lines.append(f"| {_md_code(f.name, True)} | {_md_text(f.type, True)} | {'yes' if f.required else 'no'} | "
                     f"{_md_text(f.description, True)} | {values} | {limits} |")
    if not v.fields:
        lines.append("| (none) | | | | | |")
    lines += ["", _closing(v), ""]
    if v.previous is not None:
        lines.append(f"Changes from v{v.previous}:")
        lines.append("")
        if not v.changes:
            lines.append("- no field changes")
        for change in v.changes:
            mark = "**BREAKING** " if change.breaking else ""
            lines.append(f"- {mark}{_md_text(change.detail)}")
        lines.append("")
    for n, example in enumerate(v.examples, 1):
        lines += [f"Example {n}, `data`:", ""]
        lines += _md_block(_pretty(example.data))
        lines += ["", "The envelope the app receives:", ""]
        lines += _md_block(_pretty(example.envelope))
        lines.append("")
    return lines


# --- HTML --------------------------------------------------------------------------------------------

_CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1f2328;background:#fff}
nav{position:fixed;top:0;bottom:0;width:16rem;overflow:auto;padding:1rem;background:#f6f8fa;
border-right:1px solid #d0d7de;box-sizing:border-box}
nav ul{list-style:none;padding-left:.8rem;margin:.2rem 0}nav>ul{padding:0}
main{margin-left:16rem;padding:1rem 2rem 4rem;max-width:72rem;box-sizing:border-box}
h1{margin-top:0}h2{border-bottom:1px solid #d0d7de;padding-bottom:.3rem;margin-top:2.5rem}
table{border-collapse:collapse;margin:.6rem 0;width:100%}
th,td{border:1px solid #d0d7de;padding:.3rem .5rem;vertical-align:top;text-align:left}
th{background:#f6f8fa}code,pre{font:13px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
code{background:#eff1f3;padding:.05rem .25rem;border-radius:4px}
pre{background:#f6f8fa;padding:.7rem;overflow:auto;border-radius:6px}pre code{background:none;padding:0}
pre.wrap{white-space:pre-wrap;word-break:break-all}h2 code,h3 code{font-size:inherit;background:none;padding:0}
.breaking{color:#b00020;font-weight:600}.muted{color:#59636e}.tag{font-size:.8em;padding:.05rem .4rem;
border-radius:9px;background:#ddf4ff;margin-left:.4rem}.tag.deprecated{background:#fff1c5}
.examples{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:1rem}
@media (max-width:60rem){nav{position:static;width:auto;border:0}main{margin:0}.examples{display:block}}
"""


def _h(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _code(value: Any) -> str:
    return f"<code>{_h(value)}</code>"


def render_html(types: list[TypeDoc], source: str = "schemas") -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>Message type catalogue</title>",
        f"<style>{_CSS}</style></head><body>",
        "<nav><strong>Message types</strong><ul>",
    ]
    for t in types:
        out.append(f'<li><a href="#{_h(t.anchor)}">{_h(t.name)}</a><ul>')
        out += [f'<li><a href="#{_h(t.anchor)}-v{v.version}">v{v.version}</a></li>' for v in t.versions]
        out.append("</ul></li>")
    out += [
        "</ul></nav><main>",
        "<h1>Message type catalogue</h1>",
        f'<p class="muted">Generated by <code>openim-bizplugin schemas docs</code> from {_code(source)} '
        f"({_h(_overview(types))}); regenerate it instead of editing it.</p>",
        f"<p>{_h(_ABOUT)}</p>",
        "<table><thead><tr><th>Type</th><th>Versions</th><th>Mode</th><th>Priority</th><th>Description</th>"
        "</tr></thead><tbody>",
    ]
    for t in types:
        listed = ", ".join(f"v{v.version}" for v in reversed(t.versions))
        out.append(f'<tr><td><a href="#{_h(t.anchor)}">{_code(t.name)}</a></td><td>{listed}</td>'
                   f"<td>{_h(t.defaults.mode)}</td><td>{_h(t.defaults.priority)}</td><td>{_h(t.description)}</td></tr>")
    out.append("</tbody></table>")
    for t in types:
        out += _html_type(t)
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


def _html_type(t: TypeDoc) -> list[str]:
    out = [f'<section id="{_h(t.anchor)}">', f"<h2>{_code(t.name)}</h2>"]
    if t.title or t.description:
        title = f"<strong>{_h(t.title)}.</strong> " if t.title else ""
        out.append(f"<p>{title}{_h(t.description)}</p>")
    out += ["<p>Delivery defaults (<code>type.toml</code>):</p>",
            "<table><thead><tr><th>Setting</th><th>Value</th><th>Meaning</th></tr></thead><tbody>"]
    out += [f"<tr><td>{_code(key)}</td><td>{_h(value)}</td><td>{_h(meaning)}</td></tr>"
            for key, value, meaning in default_rows(t.defaults)]
    out.append("</tbody></table>")
    first = t.latest.examples[0] if t.latest.examples else None
    if first is not None:
        what = ("The string <code>onRecvCustomBusinessMessage</code> receives" if t.defaults.mode == "notification"
                else "The <code>customElem</code> of the message <code>OnRecvNewMessage</code> receives")
        out.append(f"<p>{what}, for the first example of v{t.latest.version}:</p>")
        argument = delivered_argument(t.name, t.defaults.mode, first.envelope_text)
        out.append(f'<pre class="wrap"><code>{_h(argument)}</code></pre>')
    for v in t.versions:
        out += _html_version(t, v)
    out.append("</section>")
    return out


def _html_version(t: TypeDoc, v: VersionDoc) -> list[str]:
    tag = '<span class="tag deprecated">deprecated</span>' if v.deprecated else ""
    latest = '<span class="tag">latest</span>' if v is t.latest else ""
    out = [f'<h3 id="{_h(t.anchor)}-v{v.version}">{_code(t.name)} v{v.version}{latest}{tag}</h3>']
    if v.description and (v.description != t.description or v is not t.latest):
        out.append(f"<p>{_h(v.description)}</p>")
    if v.deprecated:
        out.append("<p>Deprecated: still accepted, but senders should move to a newer version.</p>")
    out.append("<table><thead><tr><th>Field</th><th>Type</th><th>Required</th><th>Description</th>"
               "<th>Values</th><th>Format and limits</th></tr></thead><tbody>")
    for f in v.fields:
        values = ", ".join(_code(show_value(x)) for x in f.values)
        limits = "<br>".join(_code(x) if "pattern:" in x else _h(x) for x in f.limits)
        out.append(f"<tr><td>{_code(f.name)}</td><td>{_h(f.type)}</td><td>{'yes' if f.required else 'no'}</td>"
                   f"<td>{_h(f.description)}</td><td>{values}</td><td>{limits}</td></tr>")
    if not v.fields:
        out.append('<tr><td colspan="6">(none)</td></tr>')
    out.append("</tbody></table>")
    out.append(f"<p>{_h(_closing(v))}</p>")
    if v.previous is not None:
        out.append(f"<p>Changes from v{v.previous}:</p><ul>")
        if not v.changes:
            out.append("<li>no field changes</li>")
        for change in v.changes:
            mark = '<span class="breaking">BREAKING</span> ' if change.breaking else ""
            out.append(f"<li>{mark}{_h(change.detail)}</li>")
        out.append("</ul>")
    for n, example in enumerate(v.examples, 1):
        out += ['<div class="examples">',
                f"<div><p>Example {n}, <code>data</code>:</p><pre><code>{_h(_pretty(example.data))}</code></pre></div>",
                "<div><p>The envelope the app receives:</p>"
                f"<pre><code>{_h(_pretty(example.envelope))}</code></pre></div>",
                "</div>"]
    return out


# --- The command --------------------------------------------------------------------------------------


def render(types: list[TypeDoc], fmt: str, source: str = "schemas") -> str:
    if fmt == "markdown":
        return render_markdown(types, source)
    if fmt == "html":
        return render_html(types, source)
    raise ValueError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")


def guess_format(out: str) -> str:
    """HTML for ``*.html``/``*.htm``, Markdown otherwise."""
    return "html" if out.lower().endswith((".html", ".htm")) else "markdown"


def write_docs(directory: str | Path, out: str, fmt: str | None, stdout: Any = None) -> str:
    """Document the catalogue in *directory* as *out* (``-``: *stdout*); returns a one-line summary.

    Raises :class:`.ConfigError` for an invalid catalogue and :class:`DocsError`
    when the output cannot be written.
    """
    fmt = fmt or guess_format(out)
    directory = Path(directory)
    catalog = Catalog.load(directory)
    types = describe_catalog(catalog)
    text = render(types, fmt, directory.name or str(directory))
    summary = f"{_overview(types)}, {fmt}"
    if out == "-":
        stdout.write(text)
        return summary
    _write_atomically(Path(out), text)
    return f"wrote {out} ({summary})"


def _write_atomically(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as stream:
                stream.write(text)
            os.chmod(temporary, 0o644)  # mkstemp makes it 0600; docs are for reading
            os.replace(temporary, path)
        except BaseException:
            _remove(temporary)
            raise
    except OSError as exc:
        raise DocsError(f"--out {path}: {exc.strerror or exc}") from None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

