"""The schema registry: loading rules, the shipped catalogue, validate()."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from openim_bizplugin.catalog.registry import Catalog, MessageType, RateLimit, TypeDefaults
from openim_bizplugin.errors import ConfigError, Violation

SHIPPED = Path(__file__).resolve().parents[1] / "schemas"
SPEC_KEYS = [
    "mode", "priority", "offline", "ttl_seconds", "persistent", "rate_limit",
    "rate_limit_policy", "push_title", "push_desc", "deprecated_versions",
]


@pytest.fixture
def catalog_dir(tmp_path: Path) -> Path:
    """A writable copy of the shipped catalogue, to break in each test."""
    return Path(shutil.copytree(SHIPPED, tmp_path / "schemas"))


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    schema = json.loads(path.read_text())
    change(schema)
    path.write_text(json.dumps(schema))


def edit_toml(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def make_catalog(schema: dict, name: str = "demo.thing") -> Catalog:
    return Catalog([MessageType(name, TypeDefaults(), {1: schema})])


# --- The shipped catalogue -----------------------------------------------------


def test_shipped_catalogue_loads_with_the_documented_types() -> None:
    catalog = Catalog.load(SHIPPED)
    names = [t.name for t in catalog.types()]
    assert names == [
        "action.required", "app.upgrade_available", "order.status_changed", "profile.updated",
    ]
    assert catalog.get("profile.updated").versions == [1, 2]


def test_shipped_modes_follow_the_spec() -> None:
    catalog = Catalog.load(SHIPPED)
    modes = {t.name: t.defaults.mode for t in catalog.types()}
    assert modes.pop("action.required") == "custom"
    assert set(modes.values()) == {"notification"}


def test_every_shipped_example_validates() -> None:
    catalog = Catalog.load(SHIPPED)
    checked = 0
    for message_type in catalog.types():
        for version in message_type.versions:
            for example in catalog.schema(message_type.name, version)["examples"]:
                assert catalog.validate(message_type.name, version, example) == []
                checked += 1
    assert checked >= 8


def test_spec_example_body_validates() -> None:
    catalog = Catalog.load(SHIPPED)
    assert catalog.validate("profile.updated", 1, {"fields": ["nickname", "faceURL"]}) == []


def test_every_shipped_type_toml_lists_every_spec_key() -> None:
    import tomllib

    for folder in sorted(p for p in SHIPPED.iterdir() if p.is_dir()):
        text = (folder / "type.toml").read_text()
        assert text.startswith("#"), folder
        assert list(tomllib.loads(text)) == SPEC_KEYS, folder


def test_defaults_as_dict_is_json_ready() -> None:
    defaults = Catalog.load(SHIPPED).get("profile.updated").defaults
    as_dict = defaults.as_dict()
    assert list(as_dict) == SPEC_KEYS
    assert as_dict["rate_limit"] == "10/hour"
    assert as_dict["push_title"] == "Profile updated"
    assert json.loads(json.dumps(as_dict)) == as_dict


def test_unknown_type_or_version() -> None:
    catalog = Catalog.load(SHIPPED)
    assert catalog.get("nope") is None
    assert catalog.schema("profile.updated", 9) is None
    assert catalog.schema("nope", 1) is None
    with pytest.raises(KeyError):
        catalog.validate("profile.updated", 9, {})


def test_deprecated_versions_are_loaded(catalog_dir: Path) -> None:
    toml = catalog_dir / "profile.updated/type.toml"
    edit_toml(toml, "deprecated_versions = []", "deprecated_versions = [1]")
    message_type = Catalog.load(catalog_dir).get("profile.updated")
    assert message_type.is_deprecated(1) and not message_type.is_deprecated(2)
    assert message_type.defaults.as_dict()["deprecated_versions"] == [1]


def test_omitted_keys_take_spec_defaults(catalog_dir: Path) -> None:
    (catalog_dir / "profile.updated/type.toml").write_text("# minimal\n")
    defaults = Catalog.load(catalog_dir).get("profile.updated").defaults
    assert defaults == TypeDefaults()
    assert defaults.rate_limit is None and defaults.ttl_seconds == 86400


def test_ignores_hidden_and_underscore_entries(catalog_dir: Path) -> None:
    (catalog_dir / ".git").mkdir()
    (catalog_dir / "_drafts").mkdir()
    (catalog_dir / "README.md").write_text("notes")
    (catalog_dir / "profile.updated/.v1.json.swp").write_text("x")
    (catalog_dir / "profile.updated/__pycache__").mkdir()
    assert len(Catalog.load(catalog_dir).types()) == 4


# --- RateLimit -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [("3/hour", 3, 3600), ("50/second", 50, 1), ("1/day", 1, 86400), ("10/minute", 10, 60)],
)
def test_rate_limit_parse(text: str, count: int, period: int) -> None:
    assert RateLimit.parse(text) == RateLimit(count, period, text)


@pytest.mark.parametrize("text", ["0/hour", "3/week", "3 per hour", "-1/day", "/hour", "3/hours", ""])
def test_rate_limit_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="N/second"):
        RateLimit.parse(text)


# --- Broken catalogues -----------------------------------------------------------


def _bad_json(d: Path) -> None:
    text = '{\n  "type": "object",\n  "title": "x"\n  "properties": {}\n}'
    (d / "profile.updated/v2.json").write_text(text)


def _bad_metaschema(d: Path) -> None:
    edit_json(d / "profile.updated/v2.json", lambda s: s["properties"]["fields"].update(type="strng"))


def _not_object_root(d: Path) -> None:
    edit_json(d / "profile.updated/v2.json", lambda s: s.update(type="array"))


def _failing_example(d: Path) -> None:
    edit_json(d / "profile.updated/v2.json", lambda s: s["examples"].append({"fields": ["shoe_size"]}))


def _remote_ref(d: Path) -> None:
    edit_json(
        d / "order.status_changed/v1.json",
        lambda s: s["properties"].update(amount={"$ref": "https://example.com/money.json"}),
    )


def _no_examples(d: Path) -> None:
    edit_json(d / "profile.updated/v1.json", lambda s: s.pop("examples"))


def _old_draft(d: Path) -> None:
    draft_07 = "http://json-schema.org/draft-07/schema#"
    edit_json(d / "profile.updated/v1.json", lambda s: s.update({"$schema": draft_07}))


def _duplicate_key(d: Path) -> None:
    (d / "profile.updated/v1.json").write_text('{"type": "object", "type": "array"}')


def _missing_toml(d: Path) -> None:
    (d / "profile.updated/type.toml").unlink()


def _unknown_key(d: Path) -> None:
    edit_toml(d / "profile.updated/type.toml", "priority =", "prority =")


def _bad_mode(d: Path) -> None:
    edit_toml(d / "profile.updated/type.toml", 'mode = "notification"', 'mode = "push"')


def _bad_rate(d: Path) -> None:
    edit_toml(d / "profile.updated/type.toml", '"10/hour"', '"10 per hour"')


def _bad_ttl(d: Path) -> None:
    edit_toml(d / "profile.updated/type.toml", "ttl_seconds = 86400", "ttl_seconds = 0")


def _bad_persistent(d: Path) -> None:
    edit_toml(d / "profile.updated/type.toml", "persistent = true", 'persistent = "yes"')


def _deprecated_missing(d: Path) -> None:
    edit_toml(d / "profile.updated/type.toml", "deprecated_versions = []", "deprecated_versions = [3]")


def _bad_toml(d: Path) -> None:
    (d / "profile.updated/type.toml").write_text('mode = "notification\n')


def _bad_folder(d: Path) -> None:
    (d / "profile.updated").rename(d / "Profile-Updated")


def _stray_file(d: Path) -> None:
    (d / "profile.updated/v2.json").rename(d / "profile.updated/v2.jsn")


def _leading_zero(d: Path) -> None:
    (d / "profile.updated/v2.json").rename(d / "profile.updated/v02.json")


def _no_versions(d: Path) -> None:
    for path in (d / "profile.updated").glob("v*.json"):
        path.unlink()


@pytest.mark.parametrize(
    ("break_it", "file", "expected"),
    [
        (_bad_json, "profile.updated/v2.json",
         "not valid JSON (line 4 column 3: Expecting ',' delimiter)"),
        (_bad_metaschema, "profile.updated/v2.json", "invalid JSON Schema: 'strng' is not valid"),
        (_bad_metaschema, "profile.updated/v2.json", "at /properties/fields/type"),
        (_not_object_root, "profile.updated/v2.json",
         'root must describe an object ("type": "object")'),
        (_failing_example, "profile.updated/v2.json",
         "examples[3] does not validate: /fields/0: 'shoe_size'"),
        (_remote_ref, "order.status_changed/v1.json",
         "'https://example.com/money.json' at /properties/amount/$ref"),
        (_no_examples, "profile.updated/v1.json", "examples must be a non-empty list"),
        (_old_draft, "profile.updated/v1.json", "$schema must be"),
        (_duplicate_key, "profile.updated/v1.json", "duplicate key 'type'"),
        (_missing_toml, "profile.updated/type.toml", "missing"),
        (_unknown_key, "profile.updated/type.toml", "unknown key 'prority' (did you mean 'priority'?)"),
        (_bad_mode, "profile.updated/type.toml", 'mode = "push": must be one of notification, custom'),
        (_bad_rate, "profile.updated/type.toml", "rate_limit = \"10 per hour\""),
        (_bad_ttl, "profile.updated/type.toml", "ttl_seconds = 0: must be a positive integer"),
        (_bad_persistent, "profile.updated/type.toml", 'persistent = "yes": must be true or false'),
        (_deprecated_missing, "profile.updated/type.toml", "deprecated_versions names v3.json"),
        (_bad_toml, "profile.updated/type.toml", "not valid TOML"),
        (_bad_folder, "Profile-Updated", "type folder name must be dot-separated lowercase"),
        (_stray_file, "profile.updated/v2.jsn", "unexpected entry in a type folder"),
        (_leading_zero, "profile.updated/v02.json", "unexpected entry in a type folder"),
        (_no_versions, "profile.updated", "no schema versions"),
    ],
)
def test_broken_catalogue_names_file_and_problem(
    catalog_dir: Path, break_it: Callable[[Path], None], file: str, expected: str
) -> None:
    break_it(catalog_dir)
    with pytest.raises(ConfigError) as info:
        Catalog.load(catalog_dir)
    message = str(info.value)
    assert message.startswith(f"{catalog_dir / file}: "), message
    assert expected in message
    assert "\n" not in message


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'nowhere'}: schema directory not found$"):
        Catalog.load(tmp_path / "nowhere")


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no message types"):
        Catalog.load(tmp_path)


def test_local_refs_are_allowed_and_resolved() -> None:
    catalog = Catalog.load(SHIPPED)
    data = {"order_id": "1", "status": "lost", "updated_at": "2026-11-26T12:00:00Z"}
    assert catalog.validate("order.status_changed", 1, data) == [
        Violation(
            "/status",
            "'lost' is not one of ['created', 'paid', 'shipped', 'delivered', 'cancelled', 'refunded']",
        )
    ]


# --- validate() ------------------------------------------------------------------


def test_wrong_array_item_points_at_the_item() -> None:
    found = Catalog.load(SHIPPED).validate("profile.updated", 1, {"fields": ["shoe_size", "nickname"]})
    assert [v.path for v in found] == ["/fields/0"]
    assert found[0].message.startswith("'shoe_size' is not one of ['nickname', 'faceURL'")


def test_every_failed_keyword_at_one_path_is_reported() -> None:
    found = Catalog.load(SHIPPED).validate("profile.updated", 1, {"fields": ["nickname", 7]})
    assert [v.path for v in found] == ["/fields/1", "/fields/1"]
    assert any("7 is not of type 'string'" in v.message for v in found)
    assert any("7 is not one of" in v.message for v in found)


def test_missing_required_reports_parent_and_names_property() -> None:
    data = {"order_id": "1", "status": "paid", "amount": {"value": "1.00"}}
    found = Catalog.load(SHIPPED).validate("order.status_changed", 1, data)
    assert [v.as_dict() for v in found] == [
        {"path": "", "message": "'updated_at' is a required property"},
        {"path": "/amount", "message": "'currency' is a required property"},
    ]


def test_additional_property_is_reported() -> None:
    data = {"fields": ["email"], "changed_by": "user"}
    found = Catalog.load(SHIPPED).validate("profile.updated", 1, data)
    assert len(found) == 1 and found[0].path == ""
    assert "'changed_by' was unexpected" in found[0].message


def test_every_violation_sorted_by_path() -> None:
    data = {"fields": ["x", "email"], "changed_by": "bot", "updated_at": 5}
    found = Catalog.load(SHIPPED).validate("profile.updated", 2, data)
    assert [v.path for v in found] == ["/changed_by", "/fields/0", "/updated_at"]


def test_array_indexes_sort_as_numbers() -> None:
    catalog = make_catalog(
        {"type": "object", "properties": {"n": {"type": "array", "items": {"type": "integer"}}}}
    )
    data = {"n": [0, 1, "two", 3, 4, 5, 6, 7, 8, 9, "ten"]}
    assert [v.path for v in catalog.validate("demo.thing", 1, data)] == ["/n/2", "/n/10"]


def test_root_that_is_not_an_object() -> None:
    found = Catalog.load(SHIPPED).validate("profile.updated", 1, ["nickname"])
    assert found == [Violation("", "['nickname'] is not of type 'object'")]


def test_pointer_escapes_slash_and_tilde() -> None:
    catalog = make_catalog({"type": "object", "additionalProperties": {"type": "integer"}})
    found = catalog.validate("demo.thing", 1, {"a/b": "x", "c~d": "y", "ok": 1})
    assert [v.path for v in found] == ["/a~1b", "/c~0d"]


def test_one_of_reports_the_error_itself() -> None:
    catalog = make_catalog(
        {"type": "object", "properties": {"x": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}}
    )
    found = catalog.validate("demo.thing", 1, {"x": 1.5})
    assert len(found) == 1 and found[0].path == "/x"
    assert "is not valid under any of the given schemas" in found[0].message


def test_format_is_annotation_only() -> None:
    # A "date-time" format is documentation here, not an assertion: senders
    # are not refused for it (jsonschema's default behaviour).
    data = {"fields": ["email"], "updated_at": "yesterday"}
    assert Catalog.load(SHIPPED).validate("profile.updated", 1, data) == []


# -- local $refs are inlined for speed, with the same verdicts ---------------------------------
TREE = {"type": "object", "properties": {"name": {"$ref": "#/$defs/name"},
                                         "children": {"type": "array", "items": {"$ref": "#"}}},
        "required": ["name"], "$defs": {"name": {"type": "string", "maxLength": 3}}}
REF_CASES = [
    (json.loads((SHIPPED / "order.status_changed" / "v1.json").read_text()),
     [{"order_id": "A", "status": "lost", "updated_at": "x"}, {"order_id": "A", "status": "paid", "updated_at": "x",
      "amount": {"value": "1.0.0", "currency": "eu"}}, {"order_id": "A", "status": "paid", "updated_at": "x"}]),
    (TREE, [{"name": "abcd"}, {"name": "ab", "children": [{"name": 5}, {"children": []}]}, {"name": "a"}]),
    ({"properties": {"a": {"$ref": "#/$defs/n", "minimum": 3}}, "$defs": {"n": {"type": "integer"}}},
     [{"a": 2}, {"a": "x"}, {"a": 4}]),
]


@pytest.mark.parametrize("schema, instances", REF_CASES, ids=["order.status_changed", "recursive", "constrained"])
def test_inlining_local_refs_keeps_every_verdict_and_message(schema, instances):
    from openim_bizplugin.catalog.bounded import BoundedValidator, inline_local_refs
    from openim_bizplugin.catalog.registry import violations

    inlined = inline_local_refs(schema)
    for instance in instances:
        assert violations(BoundedValidator(inlined), instance) == violations(BoundedValidator(schema), instance)


def test_refs_are_inlined_where_meaning_cannot_change():
    from openim_bizplugin.catalog.bounded import inline_local_refs

    shipped = inline_local_refs(REF_CASES[0][0])
    assert "$ref" not in json.dumps(shipped["properties"])
    assert shipped["properties"]["status"]["description"] == "The new status."  # the annotation beside it stays
    tree = inline_local_refs(TREE)
    assert tree["properties"]["name"] == {"type": "string", "maxLength": 3}
    assert tree["properties"]["children"]["items"] == {"$ref": "#"}  # a cycle stays a reference
    constrained = REF_CASES[2][0]
    assert inline_local_refs(constrained) == constrained  # "minimum" beside the $ref: kept as is
    nested_id = {"properties": {"a": {"$id": "https://x/a", "$ref": "#/$defs/n"}}, "$defs": {"n": {}}}
    assert inline_local_refs(nested_id) == nested_id
