"""Strict JSON for request bodies.

Python's ``json`` is lenient where a message bus must not be: it accepts
NaN/Infinity, silently keeps the last of duplicate keys, turns ``1e999`` into
``inf`` and parses integers that JavaScript apps cannot read exactly. This
module parses bytes the way SPEC §4 promises: malformed input is a 400, a
well-formed number out of range is a 422 naming where it is.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .errors import BadRequest, Unprocessable, Violation

MAX_DEPTH = 64
MAX_SAFE_INTEGER = 2**53  # beyond this, JavaScript numbers lose precision
# "\ud800" escapes decode to lone surrogates, which cannot be stored or re-encoded as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


class _OutOfRange:
    """A number kept as text because it cannot be represented safely."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _parse_int(text: str) -> int | _OutOfRange:
    # Guard the digit count first: int() of a 5,000-digit string raises.
    if len(text.lstrip("-")) > 16 or abs(int(text)) > MAX_SAFE_INTEGER:
        return _OutOfRange(text)
    return int(text)


def _parse_float(text: str) -> float | _OutOfRange:
    value = float(text)
    return value if math.isfinite(value) else _OutOfRange(text)


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not valid JSON (use null or a string)")


class DuplicateKey(ValueError):
    """A JSON object names one key twice (``json`` would keep the last silently)."""


def object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An ``object_pairs_hook`` that refuses duplicate keys (request bodies, schema files)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKey(f"duplicate key {key[:64]!r} in a JSON object")
        result[key] = value
    return result


_DECODER = json.JSONDecoder(
    object_pairs_hook=object_without_duplicates,
    parse_int=_parse_int,
    parse_float=_parse_float,
    parse_constant=_reject_constant,
)


def loads(raw: bytes) -> Any:
    """Parse *raw* as strict UTF-8 JSON.

    Raises :class:`BadRequest` for invalid UTF-8, syntax errors, NaN/Infinity,
    duplicate keys and nesting deeper than :data:`MAX_DEPTH`;
    :class:`Unprocessable` for numbers outside ±2^53 or outside float range.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"body is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    try:
        value, end = _DECODER.raw_decode(text, _skip_space(text, 0))
    except json.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})") from None
    except DuplicateKey as exc:
        raise BadRequest(str(exc)) from None
    except RecursionError:
        raise BadRequest(f"JSON nesting deeper than {MAX_DEPTH} levels") from None
    if _skip_space(text, end) != len(text):
        raise BadRequest("body is not valid JSON: extra data after the value")
    if _may_need_checking(text):
        _check_tree(value)
    return value


# Text without these cannot hold what _check_tree looks for: an integer beyond 2^53 has
# 16+ digits; a float beyond 1.8e308 has 309+ digits or an exponent of 3+ digits; a
# lone surrogate comes from a \u escape. Matches inside strings only cost a walk.
_MAYBE_UNSAFE = re.compile(r"\d{16}|[eE]\+?\d{3}|\\u")


def _may_need_checking(text: str) -> bool:
    """Whether *text* may nest too deep or hold an unsafe number or string (~1 us, the walk ~25)."""
    return text.count("[") + text.count("{") > MAX_DEPTH or _MAYBE_UNSAFE.search(text) is not None


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _check_tree(root: Any) -> None:
    """Walk the parsed value once: depth limit, out-of-range numbers, lone surrogates."""
    problems: list[Violation] = []
    stack: list[tuple[Any, str, int]] = [(root, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, dict):
            children = [(pointer_escape(k), v) for k, v in value.items()]
            problems.extend(Violation(path, f"key {k[:40]!r} contains an unpaired surrogate")
                            for k in value if _SURROGATE.search(k))
        elif isinstance(value, list):
            children = [(str(i), v) for i, v in enumerate(value)]
        else:
            if isinstance(value, _OutOfRange):
                problems.append(Violation(path, f"number {value.text[:40]} is out of range: "
                                                "integers must be within ±2^53 and numbers finite"))
            elif isinstance(value, str) and _SURROGATE.search(value):
                problems.append(Violation(path, "string contains an unpaired surrogate"))
            continue
        if depth + 1 > MAX_DEPTH:
            raise BadRequest(f"JSON nesting deeper than {MAX_DEPTH} levels")
        stack.extend((child, f"{path}/{key}", depth + 1) for key, child in children)
    if problems:
        raise Unprocessable("the body holds values that cannot be delivered exactly",
                            errors=sorted(problems, key=lambda v: v.path))


def pointer_escape(key: str) -> str:
    """Escape one JSON-pointer reference token (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")
