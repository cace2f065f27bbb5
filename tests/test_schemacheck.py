"""``schemas check``: collecting every problem and diffing versions."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from openim_bizplugin.catalog.check import SchemaChange, diff_schemas, run_check

SHIPPED = Path(__file__).resolve().parents[1] / "schemas"


@pytest.fixture
def catalog_dir(tmp_path: Path) -> Path:
    """A writable copy of the shipped catalogue."""
    return Path(shutil.copytree(SHIPPED, tmp_path / "schemas"))


def check(directory: Path) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = run_check(directory, out)
    return code, out.getvalue().splitlines()


def obj(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required)}


STRING = {"type": "string"}


# --- run_check -------------------------------------------------------------------


def test_shipped_catalogue_passes() -> None:
    code, lines = check(SHIPPED)
    assert code == 0
    assert "ok profile.updated v1, v2 (5 examples)" in lines
    assert "ok action.required v1 (2 examples)" in lines
    assert "profile.updated v1 -> v2: added optional field /changed_by (string)" in lines
    assert lines[-1] == "4 types, 5 versions, 12 examples: all valid"
    assert not any("ERROR" in line or "BREAKING" in line for line in lines)


def test_collects_problems_across_files(catalog_dir: Path) -> None:
    (catalog_dir / "profile.updated/v2.json").write_text("{oops")
    (catalog_dir / "action.required/type.toml").write_text('mode = "push"\nlimit = 3\n')
    schema_path = catalog_dir / "order.status_changed/v1.json"
    schema = json.loads(schema_path.read_text())
    schema["examples"] += [{"order_id": "1"}, {"status": "paid"}]
    schema_path.write_text(json.dumps(schema))
    (catalog_dir / "Bad Name").mkdir()

    code, lines = check(catalog_dir)

    errors = [line for line in lines if line.startswith("ERROR ")]
    assert code == 1
    assert len(errors) == 6
    assert any(f"{catalog_dir / 'profile.updated/v2.json'}: not valid JSON" in e for e in errors)
    assert any("action.required/type.toml: mode = \"push\"" in e for e in errors)
    assert any("action.required/type.toml: unknown key 'limit'" in e for e in errors)
    assert any("order.status_changed/v1.json: examples[3] does not validate" in e for e in errors)
    assert any("order.status_changed/v1.json: examples[4] does not validate" in e for e in errors)
    assert any("Bad Name: type folder name" in e for e in errors)
    # The untouched type is still checked and reported.
    assert "ok app.upgrade_available v1 (2 examples)" in lines
    assert lines[-1].endswith(": 6 problems")


def test_breaking_change_is_reported_but_does_not_fail(catalog_dir: Path) -> None:
    old = json.loads((catalog_dir / "order.status_changed/v1.json").read_text())
    new = json.loads(json.dumps(old).replace("order.status_changed/v1", "order.status_changed/v2"))
    del new["properties"]["previous_status"]
    for example in new["examples"]:
        example.pop("previous_status", None)
    (catalog_dir / "order.status_changed/v2.json").write_text(json.dumps(new))

    code, lines = check(catalog_dir)

    assert code == 0
    assert "order.status_changed v1 -> v2: BREAKING removed field /previous_status" in lines
    assert "ok order.status_changed v1, v2 (6 examples)" in lines


def test_identical_versions_say_so(catalog_dir: Path) -> None:
    shutil.copy(catalog_dir / "action.required/v1.json", catalog_dir / "action.required/v2.json")
    code, lines = check(catalog_dir)
    assert code == 0
    assert "action.required v1 -> v2: no field changes" in lines


def test_missing_directory(tmp_path: Path) -> None:
    code, lines = check(tmp_path / "nowhere")
    assert code == 1
    assert lines == [
        f"ERROR {tmp_path / 'nowhere'}: schema directory not found",
        "0 types, 0 versions, 0 examples: 1 problems",
    ]


# --- diff_schemas ----------------------------------------------------------------


def test_added_optional_field() -> None:
    changes = diff_schemas(obj({"a": STRING}), obj({"a": STRING, "b": {"type": "integer"}}))
    assert changes == [SchemaChange("added", "/b", "added optional field /b (integer)", False)]


def test_added_required_field_is_breaking() -> None:
    changes = diff_schemas(obj({"a": STRING}), obj({"a": STRING, "b": STRING}, ("b",)))
    assert changes == [SchemaChange("added", "/b", "added required field /b (string)", True)]


def test_removed_field_is_breaking() -> None:
    changes = diff_schemas(obj({"a": STRING, "legacy_id": STRING}), obj({"a": STRING}))
    assert changes == [SchemaChange("removed", "/legacy_id", "removed field /legacy_id", True)]


def test_retyped_field_is_breaking() -> None:
    changes = diff_schemas(obj({"a": STRING}), obj({"a": {"type": "integer"}}))
    assert changes == [SchemaChange("retyped", "/a", "retyped field /a (string -> integer)", True)]


def test_existing_field_newly_required_is_breaking() -> None:
    changes = diff_schemas(obj({"a": STRING}), obj({"a": STRING}, ("a",)))
    assert changes == [SchemaChange("newly_required", "/a", "field /a is now required", True)]


def test_nested_object_changes() -> None:
    money = obj({"value": STRING, "currency": STRING}, ("value",))
    new_money = obj(
        {"value": {"type": "number"}, "currency": STRING, "scale": {"type": "integer"}}, ("value",)
    )
    changes = diff_schemas(obj({"amount": money}), obj({"amount": new_money}))
    assert [(c.kind, c.path, c.breaking) for c in changes] == [
        ("added", "/amount/scale", False),
        ("retyped", "/amount/value", True),
    ]


def test_array_item_changes() -> None:
    old = obj({"lines": {"type": "array", "items": obj({"sku": STRING, "qty": {"type": "integer"}})}})
    new = obj({"lines": {"type": "array", "items": obj({"sku": STRING}, ("sku",))}})
    changes = diff_schemas(old, new)
    assert [(c.kind, c.path, c.breaking) for c in changes] == [
        ("removed", "/lines/[]/qty", True),
        ("newly_required", "/lines/[]/sku", True),
    ]


def test_array_of_scalars_retyped() -> None:
    old = obj({"tags": {"type": "array", "items": STRING}})
    new = obj({"tags": {"type": "array", "items": {"type": "integer"}}})
    assert [(c.kind, c.path) for c in diff_schemas(old, new)] == [("retyped", "/tags/[]")]


def test_enum_narrowed_is_breaking_and_widened_is_not() -> None:
    old = obj({"status": {"type": "string", "enum": ["paid", "shipped", "lost"]}})
    new = obj({"status": {"type": "string", "enum": ["paid", "shipped", "refunded"]}})
    changes = diff_schemas(old, new)
    assert changes == [
        SchemaChange(
            "enum_narrowed", "/status", "enum of /status narrowed (no longer allows 'lost')", True
        ),
        SchemaChange(
            "enum_widened", "/status", "enum of /status widened (now allows 'refunded')", False
        ),
    ]


def test_enum_added_to_free_field_narrows() -> None:
    changes = diff_schemas(obj({"s": STRING}), obj({"s": {"type": "string", "enum": ["a"]}}))
    assert [(c.kind, c.breaking) for c in changes] == [("enum_narrowed", True)]


def test_local_refs_are_followed() -> None:
    def with_status(values: list[str]) -> dict:
        schema = obj({"status": {"$ref": "#/$defs/status"}})
        schema["$defs"] = {"status": {"type": "string", "enum": values}}
        return schema

    changes = diff_schemas(with_status(["a", "b"]), with_status(["a"]))
    assert [(c.kind, c.path) for c in changes] == [("enum_narrowed", "/status")]


def test_recursive_schema_terminates() -> None:
    tree = obj({"name": STRING, "children": {"type": "array", "items": {"$ref": "#"}}})
    assert diff_schemas(tree, tree) == []


def test_escaped_field_names() -> None:
    changes = diff_schemas(obj({}), obj({"a/b": STRING}))
    assert changes[0].path == "/a~1b"


def test_no_changes() -> None:
    schema = json.loads((SHIPPED / "order.status_changed/v1.json").read_text())
    assert diff_schemas(schema, schema) == []
