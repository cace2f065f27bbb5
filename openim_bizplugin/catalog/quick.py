"""A quick yes for data that plainly fits its schema, before jsonschema is asked.

jsonschema spends ~90 us on a typical message's data, most of it walking its
own machinery (a validator object per level, error iterators), and it is the
largest part of accepting a message after storage (bench_intake). Nearly all
data sent is valid, so :func:`compile_quick` turns a schema into plain Python
checks that answer True only when the data certainly fits, in a few
microseconds. False means "not sure": the caller then asks the bounded
jsonschema validator, which decides and explains. So the verdict stays
jsonschema's (with :mod:`.bounded`'s rules) by construction:

- only keywords whose meaning is checked exactly here are compiled; a schema
  with any other keyword (``anyOf``, ``multipleOf``, ``patternProperties``,
  ``prefixItems``...) gets no quick check at all;
- where exactness would take care (an ``integer`` given as ``1.0``, an
  ``enum`` of non-strings, ``uniqueItems`` over non-strings) the answer is
  "not sure";
- ``pattern`` uses :func:`.bounded.search_within_budget`, charged to the same budget per
  call, so a string too long to check is "not sure" and then jsonschema's 422.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .bounded import BUDGET, VALIDATION_BUDGET, Budget, search_within_budget

Check = Callable[[Any], bool]

# keywords that describe without constraining (format is an annotation in 2020-12 unless a
# format checker is given, and the catalogue's validator has none)
_ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "$defs", "title", "description", "examples",
                          "default", "deprecated", "readOnly", "writeOnly", "format"})
_TYPES: dict[str, Check] = {
    "string": lambda v: type(v) is str,
    "integer": lambda v: type(v) is int,  # 1.0 is an integer too: "not sure", jsonschema decides
    "number": lambda v: type(v) is int or type(v) is float,
    "boolean": lambda v: type(v) is bool,
    "null": lambda v: v is None,
    "object": lambda v: type(v) is dict,
    "array": lambda v: type(v) is list,
}


class _Unsupported(Exception):
    """The schema uses something checked here not at all, or not exactly."""


def compile_quick(schema: Any) -> Check | None:
    """A check that is True only for data valid against *schema* (local refs inlined), or None
    when the schema uses a keyword the quick check does not know."""
    try:
        node = _compile(schema)
    except _Unsupported:
        return None

    def quick(data: Any) -> bool:
        token = BUDGET.set(Budget(VALIDATION_BUDGET))  # the same budget jsonschema's pass would have
        try:
            return node(data)
        except RecursionError:
            return False
        finally:
            BUDGET.reset(token)
    return quick


def _compile(schema: Any) -> Check:
    if schema is True or schema == {}:
        return lambda value: True
    if not isinstance(schema, dict):  # False, or not a schema at all
        raise _Unsupported
    unknown = schema.keys() - _ANNOTATIONS - _COMPILERS.keys()
    if unknown:
        raise _Unsupported
    checks = [_COMPILERS[key](schema[key], schema) for key in schema if key in _COMPILERS]
    checks = [check for check in checks if check is not None]
    if len(checks) == 1:
        return checks[0]
    return lambda value: all(check(value) for check in checks)


def _type(names: Any, schema: dict) -> Check:
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(name in _TYPES for name in names):
        raise _Unsupported
    tests = [_TYPES[name] for name in names]
    return tests[0] if len(tests) == 1 else (lambda value: any(test(value) for test in tests))


def _enum(members: Any, schema: dict) -> Check:
    if not isinstance(members, list) or not members or not all(type(m) is str for m in members):
        raise _Unsupported  # equality of numbers and booleans has its own rules (1 == 1.0, true != 1)
    allowed = frozenset(members)
    return lambda value: type(value) is str and value in allowed


def _const(member: Any, schema: dict) -> Check:
    return _enum([member], schema)


def _length(bound: Any, below: bool) -> Check:
    if type(bound) is not int or bound < 0:
        raise _Unsupported
    if below:
        return lambda value: type(value) is not str or len(value) <= bound
    return lambda value: type(value) is not str or len(value) >= bound


def _pattern(pattern: Any, schema: dict) -> Check:
    if not isinstance(pattern, str):
        raise _Unsupported
    limit = schema.get("maxLength")
    # as bounded._pattern: past maxLength it is not matched (maxLength refuses it anyway)
    return lambda value: type(value) is not str or (
        (not isinstance(limit, int) or len(value) <= limit) and search_within_budget(pattern, value) is True)


def _bound(limit: Any, compare: Callable[[Any, Any], bool]) -> Check:
    if type(limit) not in (int, float):
        raise _Unsupported
    return lambda value: not (type(value) is int or type(value) is float) or compare(value, limit)


def _properties(properties: Any, schema: dict) -> Check:
    if not isinstance(properties, dict):
        raise _Unsupported
    checks = [(name, _compile(sub)) for name, sub in properties.items()]
    return lambda value: type(value) is not dict or all(
        check(value[name]) for name, check in checks if name in value)


def _required(names: Any, schema: dict) -> Check:
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _Unsupported
    return lambda value: type(value) is not dict or all(name in value for name in names)


def _additional(allowed: Any, schema: dict) -> Check | None:
    if allowed is True:
        return None
    known = schema.get("properties", {})
    if not isinstance(known, dict):
        raise _Unsupported
    if allowed is False:
        return lambda value: type(value) is not dict or all(name in known for name in value)
    check = _compile(allowed)
    return lambda value: type(value) is not dict or all(
        check(item) for name, item in value.items() if name not in known)


def _items(sub: Any, schema: dict) -> Check:
    check = _compile(sub)
    return lambda value: type(value) is not list or all(check(item) for item in value)


def _count(bound: Any, kind: type, below: bool) -> Check:
    if type(bound) is not int or bound < 0:
        raise _Unsupported
    if below:
        return lambda value: type(value) is not kind or len(value) <= bound
    return lambda value: type(value) is not kind or len(value) >= bound


def _unique(unique: Any, schema: dict) -> Check | None:
    if unique is False:
        return None
    if unique is not True:
        raise _Unsupported
    # strings are equal exactly when Python says so; other items: "not sure"
    return lambda value: type(value) is not list or (
        all(type(item) is str for item in value) and len(set(value)) == len(value))


_COMPILERS: dict[str, Callable[[Any, dict], Check | None]] = {
    "type": _type, "enum": _enum, "const": _const, "pattern": _pattern,
    "minLength": lambda bound, schema: _length(bound, below=False),
    "maxLength": lambda bound, schema: _length(bound, below=True),
    "minimum": lambda limit, schema: _bound(limit, lambda v, b: v >= b),
    "maximum": lambda limit, schema: _bound(limit, lambda v, b: v <= b),
    "exclusiveMinimum": lambda limit, schema: _bound(limit, lambda v, b: v > b),
    "exclusiveMaximum": lambda limit, schema: _bound(limit, lambda v, b: v < b),
    "properties": _properties, "required": _required, "additionalProperties": _additional,
    "items": _items, "uniqueItems": _unique,
    "minItems": lambda bound, schema: _count(bound, list, below=False),
    "maxItems": lambda bound, schema: _count(bound, list, below=True),
    "minProperties": lambda bound, schema: _count(bound, dict, below=False),
    "maxProperties": lambda bound, schema: _count(bound, dict, below=True),
}
