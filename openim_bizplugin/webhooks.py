"""OpenIM's ``config/webhooks.yml`` pointed at this sidecar, changed where it stands (SPEC §8).

OpenIM's stock file already holds every key the sidecar needs (``url``,
``afterSendSingleMsg``, ``afterUserOnline``…), and OpenIM's loader (viper on
yaml.v3, v3.8.x and main) refuses a file in which a key appears twice: lines
appended to the file stop OpenIM from starting. :func:`edit_webhooks`
therefore changes the values of the sidecar's keys where they stand and
adds only keys that are missing.

The file is read with PyYAML's composer, which gives every key and value its
exact place in the text, and only those bytes are replaced: every other key,
value, comment and blank line stays as it was, byte for byte. (A round-trip
library re-renders the whole file: ruamel.yaml turns the stock file's
``enable:  false`` into ``enable: false``.) The result is parsed again and
compared with the input before it is handed out.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .config import Config

TIMEOUT_SECONDS = 5  # OpenIM's default; a hung sidecar holds OpenIM's two hook workers no longer
CUSTOM = 110  # the content type of receipts and of the sidecar's custom-mode messages
# The hooks the sidecar uses, and whether their type filters must let Custom (110) through.
# Before-hooks stay as they are: they block OpenIM's sending whenever the sidecar is down.
HOOKS = {"afterSendSingleMsg": True, "afterSendGroupMsg": True, "afterMsgSaveDB": True,
         "afterSingleMsgRead": False, "afterGroupMsgRead": False, "afterUserOnline": False,
         "afterUserOffline": False}
MAIN_ONLY = {"afterMsgSaveDB"}
_PLAIN = re.compile(r"[A-Za-z0-9_./~-][A-Za-z0-9_./~:@+=%-]*")  # safe unquoted outside [...] and {...}
_PLAIN_IN_FLOW = re.compile(r"[A-Za-z0-9_./~-][A-Za-z0-9_./~@+=%-]*")
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::", "")
_YAML_WORDS = re.compile(r"(?i)(true|false|yes|no|on|off|y|n|null|~|[-+.0-9][-+.0-9eE_:]*)")


class WebhooksFileError(Exception):
    """The file cannot be changed safely; the message is one line naming the file."""


@dataclass(frozen=True)
class Edited:
    """The whole file with the sidecar's keys changed, what changed, and notes for the operator."""

    text: str
    changed: tuple[str, ...]  # dotted keys whose value changed or that were added
    notes: tuple[str, ...] = ()


def callback_url(config: Config, public_url: str | None = None) -> str:
    """The ``url`` OpenIM posts callbacks under: ``<base>/openim/callback/<token>`` (no trailing /)."""
    base = public_url or f"http://{config.server.host}:{config.server.port}"
    return f"{base.rstrip('/')}/openim/callback/{config.callback_token}"


def wanted(config: Config, public_url: str | None = None) -> dict[str, Any]:
    """The sidecar's keys with the values it needs, as :func:`fragment` prints them."""
    keys: dict[str, Any] = {"url": callback_url(config, public_url)}
    for hook in HOOKS:
        keys[hook] = {"enable": True, "timeout": TIMEOUT_SECONDS}
    # only receipts (messages *to* the sender account) matter: keeps chat traffic away
    keys["afterSendSingleMsg"]["attentionIds"] = [config.openim.sender_id]
    # main compares recvID, empty for group messages: any id here would drop every group callback
    keys["afterSendGroupMsg"]["attentionIds"] = []
    return keys


def fragment(config: Config, public_url: str | None = None) -> str:
    """The sidecar's keys of ``webhooks.yml``, to be set where they stand (never appended)."""
    lines = []
    for key, value in wanted(config, public_url).items():
        if not isinstance(value, dict):
            lines.append(f"{key}: {_scalar(value)}")
            continue
        lines.append(f"{key}:")
        lines += [f"  {name}: {_flow(item)}" for name, item in value.items()]
    return "\n".join(lines)


def read_webhooks(path: str | Path) -> str:
    """The text of OpenIM's webhooks.yml at *path*, line endings kept."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            return fh.read()
    except FileNotFoundError:
        raise WebhooksFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise WebhooksFileError(f"{path}: is a folder, not OpenIM's webhooks.yml") from None
    except UnicodeDecodeError:
        raise WebhooksFileError(f"{path}: not a text file (not UTF-8)") from None
    except OSError as exc:
        raise WebhooksFileError(f"{path}: cannot read ({exc.strerror})") from None


def edit_webhooks(text: str, config: Config, public_url: str | None = None, *, name: str = "webhooks.yml") -> Edited:
    """*text* with only the sidecar's keys changed; raises :class:`WebhooksFileError`."""
    root = _root(text, name)
    editor = _Editor(text, name, root)
    want = wanted(config, public_url)
    try:
        editor.set_url(want["url"])
        for hook, settings in want.items():
            if hook != "url":
                editor.set_hook(hook, settings, config.openim.sender_id, HOOKS[hook])
    except yaml.YAMLError as exc:  # a value the safe loader cannot make (an unknown !tag, ...)
        raise WebhooksFileError(f"{name}: a value OpenIM cannot read: {str(exc).splitlines()[0]}") from None
    new_text = "".join(editor.applied())
    _verify(text, new_text, name, want, set(editor.changed), config.openim.sender_id)
    notes = editor.notes + _other_hooks(root)
    if public_url is None and config.server.host in _LOCAL_HOSTS:
        notes.append(f"url uses [server] host {config.server.host!r}, which OpenIM in another container or "
                     "host cannot reach: pass --public-url with the address OpenIM reaches the sidecar at")
    return Edited(new_text, tuple(editor.changed), tuple(notes))


# -- reading -------------------------------------------------------------------------
def _root(text: str, name: str) -> MappingNode:
    """The top-level mapping, checked: YAML, one mapping, no duplicate keys, a webhooks file."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        where = f" (line {exc.problem_mark.line + 1})" if exc.problem_mark else ""
        raise WebhooksFileError(f"{name}: not YAML: {exc.problem or exc.context}{where}") from None
    except yaml.YAMLError as exc:
        raise WebhooksFileError(f"{name}: not YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(root, MappingNode) or not root.value:
        raise WebhooksFileError(f"{name}: not OpenIM's webhooks.yml (expected keys such as url and "
                                "afterUserOnline at the top level)")
    _refuse_duplicates(root, name, "")
    keys = {k.value for k, _ in root.value if isinstance(k, ScalarNode)}
    if "callback" in keys and "url" not in keys:
        raise WebhooksFileError(f"{name}: the webhooks config of OpenIM before v3.8 (keys under `callback:`); "
                                "the sidecar works with OpenIM v3.8.x and main")
    if "url" not in keys and not any(re.match(r"(before|after)[A-Z]", k) for k in keys):
        raise WebhooksFileError(f"{name}: not OpenIM's webhooks.yml (no url and no hook such as afterUserOnline)")
    if root.flow_style:
        raise WebhooksFileError(f"{name}: written as one flow mapping {{...}}; write it in block style first")
    return root


def _refuse_duplicates(node: Node, name: str, where: str) -> None:
    """OpenIM's yaml.v3 refuses a mapping key that appears twice; so do we, naming both lines."""
    if isinstance(node, SequenceNode):
        for item in node.value:
            _refuse_duplicates(item, name, where)
    if not isinstance(node, MappingNode):
        return
    seen: dict[Any, int] = {}
    for key, value in node.value:
        ident = (key.tag, key.value) if isinstance(key, ScalarNode) else id(key)
        dotted = f"{where}{key.value}" if isinstance(key, ScalarNode) else f"{where}?"
        if ident in seen:
            raise WebhooksFileError(f"{name}: key {dotted!r} appears twice (lines {seen[ident]} and "
                                    f"{key.start_mark.line + 1}); OpenIM refuses such a file: keep one and run again")
        seen[ident] = key.start_mark.line + 1
        _refuse_duplicates(value, name, dotted + ".")


def _python(node: Node) -> Any:
    """The value PyYAML's safe loader makes of *node*."""
    return yaml.SafeLoader("").construct_object(node, deep=True)


def _content_end(node: Node) -> int:
    """Where a value's own text ends: a block collection's end mark runs on over comments to the next key."""
    if isinstance(node, (MappingNode, SequenceNode)) and not node.flow_style and node.value:
        last = node.value[-1]
        return _content_end(last[1] if isinstance(node, MappingNode) else last)
    return node.end_mark.index


# -- rendering -----------------------------------------------------------------------
def _scalar(value: Any, style: str | None = None, *, in_flow: bool = False) -> str:
    """A YAML scalar for *value*: plain where safe, else double-quoted (a JSON string is one)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if style == "'" and "'" not in text and text.isprintable():
        return f"'{text}'"
    plain = _PLAIN_IN_FLOW if in_flow else _PLAIN
    if style is None and plain.fullmatch(text) and not _YAML_WORDS.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def _flow(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(item, in_flow=True) for item in value) + "]"
    return _scalar(value)


@dataclass
class _Editor:
    """Edits of one file: (start, end, new text) against the original, applied back to front."""

    text: str
    name: str
    root: MappingNode
    changed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _edits: list[tuple[int, int, int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.newline = "\r\n" if "\r\n" in self.text else "\n"
        self.indent = next((v.value[0][0].start_mark.column for _, v in self.root.value
                            if isinstance(v, MappingNode) and not v.flow_style and v.value), 2)

    def applied(self) -> list[str]:
        parts, cursor = [], len(self.text)
        for start, end, _, new in sorted(self._edits, reverse=True):
            parts += [self.text[end:cursor], new]
            cursor = start
        parts.append(self.text[:cursor])
        return parts[::-1]

    def _edit(self, start: int, end: int, new: str) -> None:
        self._edits.append((start, end, len(self._edits), new))

    def _entry(self, mapping: MappingNode, key: str) -> tuple[Node, Node] | None:
        return next(((k, v) for k, v in mapping.value if isinstance(k, ScalarNode) and k.value == key), None)

    # -- the top level -------------------------------------------------------------------
    def set_url(self, url: str) -> None:
        entry = self._entry(self.root, "url")
        if entry is None:
            self._edit(self.root.start_mark.index, self.root.start_mark.index, f"url: {_scalar(url)}{self.newline}")
            self.changed.append("url")
            return
        if not isinstance(entry[1], ScalarNode):
            raise WebhooksFileError(f"{self.name}: url (line {entry[0].start_mark.line + 1}) is not a string")
        if _python(entry[1]) != url:
            self._replace(entry, _scalar(url, entry[1].style or None))
            self.changed.append("url")

    def set_hook(self, hook: str, settings: dict[str, Any], sender_id: str, needs_custom: bool) -> None:
        entry = self._entry(self.root, hook)
        if entry is None:
            body = "".join(f"{self.newline}{' ' * self.indent}{k}: {_flow(v)}" for k, v in settings.items())
            lead = "" if self.text.endswith(("\n", "\r")) or not self.text else self.newline
            self._edit(len(self.text), len(self.text), f"{lead}{hook}:{body}{self.newline}")
            self.changed.append(hook)
            if hook in MAIN_ONLY:
                self.notes.append(f"added {hook}: OpenIM main only (v3.8.x ignores the key)")
            return
        key, value = entry
        if value.start_mark.index < key.end_mark.index or (
                isinstance(value, MappingNode) and self._entry(value, "<<") is not None):
            raise WebhooksFileError(f"{self.name}: {hook} (line {key.start_mark.line + 1}) uses a YAML alias or "
                                    "merge key; write its keys out and run again")
        if isinstance(value, ScalarNode) and value.tag == "tag:yaml.org,2002:null":
            flow = "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in settings.items()) + "}"
            self._replace(entry, flow)
            self.changed.append(hook)
            return
        if not isinstance(value, MappingNode):
            raise WebhooksFileError(f"{self.name}: {hook} (line {key.start_mark.line + 1}) is not a mapping "
                                    "of enable, timeout, ...")
        for name, new in self._hook_values(value, settings, sender_id, needs_custom).items():
            self._set(value, name, new)
            self.changed.append(f"{hook}.{name}")

    def _hook_values(self, hook: MappingNode, settings: dict[str, Any], sender_id: str,
                     needs_custom: bool) -> dict[str, Any]:
        """The keys of one hook that must change, with their new values (lists as item texts)."""
        current = {k.value: (k, v) for k, v in hook.value if isinstance(k, ScalarNode)}
        has = {name: _python(node[1]) for name, node in current.items()}
        out: dict[str, Any] = {}
        if has.get("enable") is not True:
            out["enable"] = True
        timeout = has.get("timeout")
        if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= TIMEOUT_SECONDS:
            out["timeout"] = settings["timeout"]
        ids = settings.get("attentionIds")
        present = has.get("attentionIds")
        if ids and not (isinstance(present, list) and sender_id in map(str, present)):
            out["attentionIds"] = [_scalar(i, in_flow=True) for i in ids]
        elif ids == [] and present:
            out["attentionIds"] = []
        if needs_custom:
            out.update(self._type_filters(current))
        return out

    def _type_filters(self, current: dict[str, tuple[Node, Node]]) -> dict[str, Any]:
        """Custom (110) must pass: drop deniedTypes entries that cover it, add it to a non-empty allowedTypes."""
        out: dict[str, Any] = {}
        denied = current.get("deniedTypes")
        if denied and isinstance(denied[1], SequenceNode):
            items = denied[1].value
            kept = [self._source(i) for i in items if not _covers(_python(i), CUSTOM)]
            if len(kept) < len(items):
                out["deniedTypes"] = kept
        allowed = current.get("allowedTypes")
        if allowed and isinstance(allowed[1], SequenceNode) and allowed[1].value:
            items = allowed[1].value
            if not any(_covers(_python(i), CUSTOM) for i in items):
                out["allowedTypes"] = [self._source(i) for i in items] + [str(CUSTOM)]
        return out

    def _source(self, node: Node) -> str:
        return self.text[node.start_mark.index:node.end_mark.index]

    # -- one value -----------------------------------------------------------------------
    def _set(self, mapping: MappingNode, key: str, value: Any) -> None:
        """Set *key* of *mapping* to *value* (a list holds rendered item texts)."""
        entry = self._entry(mapping, key)
        if entry is not None:
            old = entry[1]
            if isinstance(value, list) and isinstance(old, SequenceNode) and not old.flow_style and value:
                dash = " " * old.start_mark.column
                self._replace(entry, "".join(f"{self.newline}{dash}- {item}" for item in value), block=True)
            elif isinstance(value, list):
                self._replace(entry, "[" + ", ".join(value) + "]")
            else:
                style = old.style if isinstance(old, ScalarNode) and isinstance(value, str) else None
                self._replace(entry, _scalar(value, style or None))
            return
        text = f"{key}: " + ("[" + ", ".join(value) + "]" if isinstance(value, list) else _scalar(value))
        if mapping.flow_style:
            close = mapping.end_mark.index - 1
            self._edit(close, close, (", " if mapping.value else "") + text)
            return
        line_end = self.text.find("\n", _content_end(mapping))
        at = len(self.text) if line_end < 0 else line_end - (self.text[line_end - 1:line_end] == "\r")
        column = mapping.value[0][0].start_mark.column
        self._edit(at, at, f"{self.newline}{' ' * column}{text}")

    def _replace(self, entry: tuple[Node, Node], new: str, *, block: bool = False) -> None:
        """Replace the value of *entry*: its own text, or for a block collection all of it after the colon."""
        key, old = entry
        block_old = isinstance(old, (MappingNode, SequenceNode)) and not old.flow_style
        if block_old or old.start_mark.index == old.end_mark.index:
            colon = self.text.index(":", key.end_mark.index) + 1
            self._edit(colon, _content_end(old), new if block else " " + new)
        else:
            self._edit(old.start_mark.index, old.end_mark.index, new)


def _covers(entry: Any, content_type: int) -> bool:
    """Whether a deniedTypes/allowedTypes entry (110, "110" or v3.8.x's range "100-200") covers the type."""
    if isinstance(entry, bool):
        return False
    if isinstance(entry, int):
        return entry == content_type
    low, dash, high = str(entry).strip().partition("-")
    try:
        return int(low) <= content_type <= int(high) if dash else int(low) == content_type
    except ValueError:
        return False


def _other_hooks(root: MappingNode) -> list[str]:
    """Notes on enabled hooks the sidecar does not use: with url changed, OpenIM posts them to it too."""
    enabled = {"before": [], "after": []}
    for key, value in root.value:
        hook = key.value if isinstance(key, ScalarNode) else ""
        if isinstance(value, MappingNode) and hook not in HOOKS and hook.startswith(("before", "after")):
            entry = next((v for k, v in value.value if getattr(k, "value", None) == "enable"), None)
            if entry is not None and _python(entry) is True:
                enabled["before" if hook.startswith("before") else "after"].append(hook)
    notes = []
    if enabled["before"]:
        notes.append(f"enabled before-hooks now post to the sidecar too: {', '.join(enabled['before'])}; it "
                     "answers 'continue', and OpenIM stops sending while a before-hook gets no answer")
    if enabled["after"]:
        notes.append(f"enabled after-hooks now post to the sidecar too, which ignores them: "
                     f"{', '.join(enabled['after'])}")
    return notes


def _verify(old_text: str, new_text: str, name: str, want: dict[str, Any], changed: set[str],
            sender_id: str) -> None:
    """The new file parses without duplicates, holds what the sidecar needs, and nothing else moved."""
    try:
        _refuse_duplicates(yaml.compose(new_text, Loader=yaml.SafeLoader), name, "")
        old, new = yaml.safe_load(old_text), yaml.safe_load(new_text)
    except (yaml.YAMLError, WebhooksFileError) as exc:
        raise WebhooksFileError(f"{name}: could not change it safely ({str(exc).splitlines()[0]}); "
                                "edit it by hand") from None
    problems = [k for k in set(old) | set(new) if k not in want and old.get(k) != new.get(k)]
    problems += [] if new.get("url") == want["url"] else ["url"]
    for hook in HOOKS:
        before, after = old.get(hook) or {}, new.get(hook) or {}
        ids = after.get("attentionIds") or []
        if after.get("enable") is not True or (hook == "afterSendSingleMsg" and sender_id not in map(str, ids)):
            problems.append(hook)
        problems += [f"{hook}.{k}" for k in set(before) | set(after) if hook not in changed
                     and f"{hook}.{k}" not in changed and before.get(k) != after.get(k)]
    if problems:
        raise WebhooksFileError(f"{name}: could not change it safely ({', '.join(sorted(problems))}); "
                                "edit it by hand")
