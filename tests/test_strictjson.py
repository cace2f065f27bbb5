"""Strict JSON: what Python's json lets through, the sidecar refuses."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openim_bizplugin.errors import BadRequest, Unprocessable
from openim_bizplugin.strictjson import MAX_DEPTH, loads


@pytest.mark.parametrize("raw", [
    b"NaN", b'{"a": Infinity}', b'{"a": -Infinity}', b'{"a": 1, "a": 1}',
    b'{"a": "\xc3\x28"}', b"\xef\xbb\xbf{}", b"{} {}", b"", b"{'a': 1}",
    b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), b"[" * 50_000,
    b'{"a": {"b": {"a": 1, "a": 2}}}',
], ids=["nan", "inf", "-inf", "dupe", "utf8", "bom", "extra", "empty", "quotes", "depth", "recursion",
        "nested-dupe"])
def test_malformed_input_is_bad_request(raw):
    with pytest.raises(BadRequest):
        loads(raw)


def test_nesting_up_to_the_limit_is_fine():
    depth = MAX_DEPTH
    assert loads(b"[" * depth + b"]" * depth) is not None


@pytest.mark.parametrize("number", [b"9007199254740993", b"-9007199254740993", b"1" * 5000, b"1e400",
                                    b"2e308", b"-1E+400", b"0.00000000000000000001e330"])
def test_out_of_range_numbers_are_unprocessable_with_path(number):
    with pytest.raises(Unprocessable) as caught:
        loads(b'{"a": [0, ' + number + b"]}")
    assert caught.value.errors[0].path == "/a/1"


def test_exact_limits_and_ordinary_values_pass():
    assert loads(b'{"n": 9007199254740992, "m": -9007199254740992, "f": 1.5e300}') == {
        "n": 2**53, "m": -(2**53), "f": 1.5e300}
    assert loads('{"name": "王小明 😀", "esc": "\\ud83d\\ude00"}'.encode()) == {
        "name": "王小明 😀", "esc": "😀"}


def test_lone_surrogates_are_unprocessable():
    with pytest.raises(Unprocessable) as caught:
        loads(b'{"a~/b": "\\udc00"}')
    assert caught.value.errors[0].path == "/a~0~1b"


# Numbers as JSON spells them, near and far beyond the limits (ints past 2^53, floats past 1.8e308).
NUMBER_TEXT = st.from_regex(r"-?(0|[1-9][0-9]{0,330})(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,4})?", fullmatch=True)
STRING_TEXT = st.text(max_size=6).map(lambda s: json.dumps(s, ensure_ascii=True))  # \u escapes, surrogates too
VALUE_TEXT = st.recursive(NUMBER_TEXT | STRING_TEXT, lambda inner: st.lists(inner, max_size=3).map(
    lambda items: "[" + ",".join(items) + "]") | st.lists(st.tuples(STRING_TEXT, inner), max_size=3).map(
    lambda pairs: "{" + ",".join(f"{k}:{v}" for k, v in dict(pairs).items()) + "}"), max_leaves=12)


@settings(database=None, deadline=None, max_examples=400)
@given(VALUE_TEXT)
def test_the_quick_look_never_skips_a_value_the_walk_would_refuse(text):
    """loads() walks the parsed tree only when the text may need it: never wrongly skipped."""
    from openim_bizplugin.strictjson import _DECODER, _check_tree, _may_need_checking
    value = _DECODER.decode(text)
    try:
        _check_tree(value)
    except (BadRequest, Unprocessable):
        assert _may_need_checking(text)
