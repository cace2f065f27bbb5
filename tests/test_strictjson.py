"""Strict JSON: what Python's json lets through, the sidecar refuses."""

from __future__ import annotations

import pytest

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


@pytest.mark.parametrize("number", [b"9007199254740993", b"-9007199254740993", b"1" * 5000, b"1e400"])
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
