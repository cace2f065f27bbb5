"""The quick check in front of jsonschema: a yes only where jsonschema finds nothing wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openim_bizplugin.catalog.bounded import VALIDATION_BUDGET, BoundedValidator, inline_local_refs
from openim_bizplugin.catalog.quick import compile_quick
from openim_bizplugin.catalog.registry import Catalog, violations

SHIPPED = Path(__file__).resolve().parents[1] / "schemas"
CATALOG = Catalog.load(SHIPPED)

# every keyword the quick check compiles, with bounds the generated data falls on both sides of
EVERY_KEYWORD = {
    "type": "object", "required": ["s"], "additionalProperties": False,
    "properties": {
        "s": {"type": "string", "minLength": 1, "maxLength": 5, "pattern": "^[a-c]+$", "format": "email"},
        "m": {"type": "string", "minLength": 2, "maxLength": 3},
        "n": {"type": "number", "minimum": 0, "exclusiveMaximum": 10},
        "i": {"type": ["integer", "null"], "maximum": 3, "exclusiveMinimum": -3},
        "e": {"enum": ["x", "y"]},
        "c": {"const": "k"},
        "a": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3, "uniqueItems": True},
        "o": {"type": "object", "additionalProperties": {"type": "boolean"}, "minProperties": 1,
              "maxProperties": 2, "description": "annotations are ignored"},
        "t": True,
    },
}
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 12) | st.floats(-5, 12, allow_nan=False)
    | st.sampled_from(["x", "y", "k", "", "abc", "abc\n", "abcabc", "ab", "EUR", "12.50", "https://a.b/c"])
    | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["a", "b", "s"]), inner, max_size=3),
    max_leaves=8)
# each field of EVERY_KEYWORD: values inside its bounds, and values on or past them
INSIDE = {"s": ["a", "abc", "abcab"], "n": [0, 9.99, 5], "i": [None, 3, -2, 0], "e": ["x", "y"], "c": ["k"],
          "a": [["a"], ["a", "b"]], "o": [{"p": True}], "m": ["ab", "abc"], "t": [1, "any"]}
EDGES = {"s": ["", "abcabc", "abd", "abc\n", 5], "n": [-1, 10, 10.0, True, "5", -0.5], "i": [4, -3, 2.0, False, True],
         "e": ["z", 1], "c": ["kk", 1], "a": [[], ["a", "a"], ["a", 1], ["a", "b", "a", "b"], [True], "a"],
         "o": [{}, {"p": 1}, {"p": True, "q": True, "r": True}, []], "m": ["a", "abcd", 12], "z": [1]}


@st.composite
def _near_every_keyword(draw):
    """A valid record with at most one field on or past its bounds (or missing, for "s")."""
    record = {name: draw(st.sampled_from(INSIDE[name]))
              for name in ["s", *draw(st.sets(st.sampled_from(sorted(INSIDE))))]}
    edge = draw(st.sampled_from([None, *sorted(EDGES)]))
    if edge is not None:
        record[edge] = draw(st.sampled_from(EDGES[edge]))
    if draw(st.integers(0, 9)) == 0:
        del record["s"]
    return record


@st.composite
def _near_an_example(draw, examples):
    """An example with one field replaced, added or removed."""
    record = dict(draw(st.sampled_from(examples)))
    name = draw(st.sampled_from([*record, "extra"]))
    if draw(st.integers(0, 3)) == 0:
        record.pop(name, None)
    else:
        record[name] = draw(VALUES)
    return record


def _shipped() -> list[tuple[str, dict]]:
    return [(f"{t.name} v{v}", inline_local_refs(schema)) for t in CATALOG.types() for v, schema in t.schemas.items()]


def _agrees(schema: dict, record: object) -> None:
    quick = compile_quick(schema)
    assert quick is not None
    if quick(record):
        assert violations(BoundedValidator(schema), record, budget=VALIDATION_BUDGET) == [], record


@settings(database=None, deadline=None, max_examples=600)
@given(_near_every_keyword())
def test_a_quick_yes_is_always_jsonschemas_yes_for_every_keyword(record):
    _agrees(EVERY_KEYWORD, record)


@pytest.mark.parametrize("name, schema", _shipped(), ids=[name for name, _ in _shipped()])
@settings(database=None, deadline=None, max_examples=200)
@given(data=st.data())
def test_a_quick_yes_is_always_jsonschemas_yes_for_the_shipped_types(name, schema, data):
    _agrees(schema, data.draw(_near_an_example(schema["examples"])))


def test_the_shipped_examples_are_plainly_valid():
    """So the usual message skips jsonschema: the quick check is not dead code for the shipped types."""
    for message_type in CATALOG.types():
        for version, schema in message_type.schemas.items():
            check = compile_quick(inline_local_refs(schema))
            assert check is not None and all(check(example) for example in schema["examples"]), message_type.name


@pytest.mark.parametrize("schema", [
    {"anyOf": [{"type": "string"}, {"type": "null"}]}, {"type": "number", "multipleOf": 0.1},
    {"type": "object", "patternProperties": {"^x": {}}}, {"prefixItems": [{"type": "string"}]},
    {"enum": [1, "one"]}, {"properties": {"gone": False}}, {"$ref": "https://example.com/remote.json"},
])
def test_keywords_checked_only_by_jsonschema_leave_no_quick_check(schema):
    assert compile_quick(schema) is None


@pytest.mark.parametrize("schema, value", [
    ({"type": "integer"}, 1.0),                       # an integer in JSON Schema, a float in Python
    ({"uniqueItems": True}, [1, True]),               # unique for JSON Schema, equal for Python
    ({"type": "string", "pattern": "^.*,.*x$"}, "," * 20_000),  # too long to check: jsonschema's 422
], ids=["integer-1.0", "unique-1-true", "too-long-to-check"])
def test_not_sure_leaves_the_verdict_to_jsonschema(schema, value):
    assert compile_quick(schema)(value) is False


def test_a_string_too_long_to_check_is_still_refused_with_its_reason():
    catalog_schema = {"type": "object", "properties": {"csv": {"type": "string", "pattern": "^.*,.*x$"}}}
    data = {"csv": "," * 20_000}
    assert compile_quick(catalog_schema)(data) is False
    [problem] = violations(BoundedValidator(catalog_schema), data, budget=VALIDATION_BUDGET)
    assert "too long to check" in problem.message
