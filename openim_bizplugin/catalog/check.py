"""``schemas check``: check a whole catalogue and report version changes.

Unlike :meth:`.Catalog.load`, which stops at the first problem, this walks
every type folder, schema and example with the same checks (they live in
:mod:`.catalog`) and prints all problems at once, then what changed between
each pair of consecutive versions, marking changes that break senders or
apps as ``BREAKING``.  Breaking changes are information, not failures: the
exit code is 1 only when some file is invalid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .registry import MessageType, json_pointer, load_type, type_folders

#: Kinds of :class:`SchemaChange`.
CHANGE_KINDS = ("added", "removed", "retyped", "newly_required", "enum_narrowed", "enum_widened")
_JSON_TYPES = {
    bool: "boolean", int: "integer", float: "number", str: "string",
    list: "array", dict: "object", type(None): "null",
}
# Local $refs may be recursive (a tree of nodes); the diff stops descending
# past this depth instead of recursing forever.
_MAX_DEPTH = 32


@dataclass(frozen=True)
class SchemaChange:
    """One difference between two versions of a type's schema.

    *path* is a field path in pointer style (``/amount/currency``; ``[]``
    stands for every item of an array, ``/fields/[]``); *detail* is the
    human sentence printed by ``schemas check``.  A new field that is
    required is one ``added`` change with ``breaking=True``; ``newly_required``
    is an existing field that became required.
    """

    kind: str
    path: str
    detail: str
    breaking: bool


def diff_schemas(old: dict, new: dict) -> list[SchemaChange]:
    """What changed from schema *old* to schema *new*, walking nested
    ``properties`` and array ``items`` (local ``#/...`` refs are followed).

    Breaking: removed fields, retyped fields, newly required fields (new or
    existing) and removed enum values.
    """
    changes: list[SchemaChange] = []
    _diff_node(_Walk(old, new, changes), old, new, "", 0)
    return changes


@dataclass(frozen=True)
class _Walk:
    old_root: dict
    new_root: dict
    changes: list[SchemaChange]

    def add(self, kind: str, path: str, detail: str, breaking: bool) -> None:
        self.changes.append(SchemaChange(kind, path, detail, breaking))


def _diff_node(walk: _Walk, old: Any, new: Any, path: str, depth: int) -> None:
    old, new = _resolve(old, walk.old_root), _resolve(new, walk.new_root)
    if depth > _MAX_DEPTH or not isinstance(old, dict) or not isinstance(new, dict):
        return
    old_type, new_type = _type_name(old), _type_name(new)
    if old_type != new_type:
        detail = f"retyped field {path or '/'} ({old_type} -> {new_type})"
        walk.add("retyped", path, detail, True)
        return
    _diff_enum(walk, old, new, path)
    _diff_properties(walk, old, new, path, depth)
    if "items" in old or "items" in new:
        _diff_node(walk, old.get("items", {}), new.get("items", {}), path + "/[]", depth + 1)


def _diff_properties(walk: _Walk, old: dict, new: dict, path: str, depth: int) -> None:
    old_props, new_props = old.get("properties", {}), new.get("properties", {})
    old_required, new_required = set(old.get("required", ())), set(new.get("required", ()))
    for name in sorted(old_props.keys() | new_props.keys()):
        here = path + json_pointer([name])
        if name not in new_props:
            walk.add("removed", here, f"removed field {here}", True)
        elif name not in old_props:
            required = name in new_required
            kind = _type_name(_resolve(new_props[name], walk.new_root))
            label = "required" if required else "optional"
            walk.add("added", here, f"added {label} field {here} ({kind})", required)
        else:
            if name in new_required and name not in old_required:
                walk.add("newly_required", here, f"field {here} is now required", True)
            _diff_node(walk, old_props[name], new_props[name], here, depth + 1)


def _diff_enum(walk: _Walk, old: dict, new: dict, path: str) -> None:
    old_values, new_values = _allowed_values(old), _allowed_values(new)
    if old_values == new_values:
        return
    # None means "any value": gaining an enum narrows, losing one widens.
    where = path or "/"
    if new_values is not None and (old_values is None or _missing(old_values, new_values)):
        lost = "other values" if old_values is None else _show(_missing(old_values, new_values))
        detail = f"enum of {where} narrowed (no longer allows {lost})"
        walk.add("enum_narrowed", path, detail, True)
    if old_values is not None and (new_values is None or _missing(new_values, old_values)):
        gained = "any value" if new_values is None else _show(_missing(new_values, old_values))
        walk.add("enum_widened", path, f"enum of {where} widened (now allows {gained})", False)


def _allowed_values(schema: dict) -> list | None:
    """The closed set of values of ``enum``/``const``, or None for open."""
    if "const" in schema:
        return [schema["const"]]
    return list(schema["enum"]) if isinstance(schema.get("enum"), list) else None


def _missing(values: list, others: list) -> list:
    # Lists, not sets: enum values may be unhashable objects.
    return [v for v in values if v not in others]


def _show(values: list) -> str:
    return ", ".join(repr(v) for v in values)


def _type_name(schema: Any) -> str:
    """``string``, ``string | null`` ... inferred from enum/const when untyped."""
    if not isinstance(schema, dict):
        return "any"
    declared = schema.get("type")
    if isinstance(declared, str):
        return declared
    if isinstance(declared, list):
        return " | ".join(sorted(declared))
    values = _allowed_values(schema)
    if values:
        return " | ".join(sorted({_JSON_TYPES.get(type(v), "any") for v in values}))
    return "object" if "properties" in schema else "any"


def _resolve(schema: Any, root: dict) -> Any:
    """Follow a local ``{"$ref": "#/..."}`` to its target (best effort)."""
    for _ in range(_MAX_DEPTH):
        ref = schema.get("$ref") if isinstance(schema, dict) else None
        if not isinstance(ref, str) or not ref.startswith("#"):
            return schema
        target: Any = root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                return schema
            target = target[part]
        schema = target
    return schema


# --- The command -------------------------------------------------------------


class _Problems:
    """A catalogue ``report`` callable that prints and counts problems."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.count = 0

    def __call__(self, problem: str) -> None:
        self.count += 1
        print(f"ERROR {problem}", file=self.out)


def run_check(directory: str | Path, out: TextIO) -> int:
    """Check every type, schema and example in *directory*; print a report.

    Returns 0 when every file is valid and 1 otherwise.
    """
    problems = _Problems(out)
    folders = type_folders(Path(directory), problems)
    versions = examples = 0
    for folder in folders:
        before = problems.count
        message_type = load_type(folder, problems)
        if message_type is None:
            continue
        versions += len(message_type.versions)
        examples += _example_count(message_type)
        if problems.count == before:
            listed = ", ".join(f"v{v}" for v in message_type.versions)
            count = _example_count(message_type)
            print(f"ok {message_type.name} {listed} ({count} examples)", file=out)
        for line in version_report(message_type):
            print(line, file=out)
    counts = f"{len(folders)} types, {versions} versions, {examples} examples"
    verdict = "all valid" if problems.count == 0 else f"{problems.count} problems"
    print(f"{counts}: {verdict}", file=out)
    return 0 if problems.count == 0 else 1


def version_report(message_type: MessageType) -> list[str]:
    """One line per change between consecutive versions of *message_type*."""
    lines = []
    versions = message_type.versions
    for old, new in zip(versions, versions[1:]):
        prefix = f"{message_type.name} v{old} -> v{new}: "
        changes = diff_schemas(message_type.schemas[old], message_type.schemas[new])
        if not changes:
            lines.append(prefix + "no field changes")
        for change in changes:
            lines.append(prefix + ("BREAKING " if change.breaking else "") + change.detail)
    return lines


def _example_count(message_type: MessageType) -> int:
    return sum(len(schema.get("examples", ())) for schema in message_type.schemas.values())
