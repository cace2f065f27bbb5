"""Schema validation with bounded cost: the validator the catalogue compiles.

Separated from :mod:`.catalog` (which reads and checks the files) because it
is its own concern: how expensive a JSON Schema may be to apply to untrusted
input, and how that is enforced.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from re import _constants as sre  # the parser behind re.compile (CPython 3.11+), for pattern_degree
from re import _parser as sre_parse
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

#: Keywords whose values are instance data, not subschemas.
DATA_KEYWORDS = frozenset({"examples", "enum", "const", "default"})
#: Keywords whose values map arbitrary names to subschemas.
SCHEMA_MAPS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def json_pointer(parts: Iterable[object]) -> str:
    """RFC 6901 pointer for a path of keys and indexes (``""`` for none)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)



# --- Bounded validation --------------------------------------------------------
#
# jsonschema runs ``pattern`` with Python's backtracking ``re``, which can be
# neither interrupted nor given a deadline, and its ``uniqueItems`` compares
# every pair of unhashable items: either can keep one request busy for minutes
# (``a.*b`` over 65,000 characters takes 10 s; ``uniqueItems`` over 16,000
# objects, longer). A time limit cannot stop a running match, so the bounds are
# structural, set when the catalogue loads and charged while validating:
#
# * ``uniqueItems`` hashes a canonical form of each item: linear time, no limit
#   on the schema needed.
# * A pattern that can backtrack exponentially (a choice inside a repetition
#   that two ways can satisfy: ``(a+)+``, ``(\w+\s?)*``, ``(a|a)*``) or that
#   uses a back-reference is refused at load (ConfigError): no input is short
#   enough to make it safe, ``^(a+)+$`` takes 2 s on 25 characters.
# * Every other pattern has a degree d (:func:`pattern_degree`): matching n
#   characters costs at most about n**d steps. ``^[0-9]+\.[0-9]+$`` is 1,
#   ``^.*,.*$`` and an unanchored ``\s+$`` are 2. Each string matched is charged
#   n**d against :data:`VALIDATION_BUDGET` per request; past it the string is a
#   422 ("too long to check") instead of a match. A string longer than its
#   schema's ``maxLength`` is not matched at all (``maxLength`` already refuses
#   it), so a ``maxLength`` makes a costly pattern cheap.
# * Patterns follow ECMA-262, as JSON Schema says: ``$`` is the end of the
#   string. Python's ``$`` also matches before a final newline, so
#   ``^[a-z]+$`` accepted ``"abc\n"``. And ``\d``, ``\w`` and ``\b`` are
#   ASCII, as in JavaScript (Python's also matched "١٢٣" as digits and "é" as
#   a word character), while ``\s`` keeps JavaScript's Unicode spaces.

#: Units are regex steps (about 5 ns each): this bounds a request to ~0.1 s of matching.
VALIDATION_BUDGET = 20_000_000


class TooCostly(Exception):
    """A property name would overrun the budget (a string gets a located violation instead)."""


class Budget:
    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left


BUDGET: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("validation_budget", default=None)


# ECMA-262's WhiteSpace and LineTerminator: what JavaScript's \s matches
_ECMA_SPACES = "\\t\\n\\v\\f\\r \\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff"


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(_ecma(pattern), re.ASCII)  # ASCII \d \w \b, as ECMA-262


def _ecma(pattern: str) -> str:
    """*pattern* for Python's re with ECMA-262's meaning: each ``$`` anchor (outside a
    character class) spelt ``\\Z``, and ``\\s`` spelt out (re.ASCII would shrink it)."""
    out, index, class_start = [], 0, None
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            escape = pattern[index:index + 2]
            if escape == "\\s":
                out.append(_ECMA_SPACES if class_start is not None else f"[{_ECMA_SPACES}]")
            elif escape == "\\S" and class_start is None:
                out.append(f"[^{_ECMA_SPACES}]")
            else:  # (\S inside a class stays ASCII's complement: a superset of ECMA's)
                out.append(escape)
            index += 2
            continue
        if class_start is None:
            if char == "[":
                class_start = index + 2 if pattern.startswith("^", index + 1) else index + 1
            out.append("\\Z" if char == "$" else char)
        else:
            if char == "]" and index > class_start:  # "[]a]": the first "]" is a literal
                class_start = None
            out.append(char)
        index += 1
    return "".join(out)


def search_within_budget(pattern: str, text: str) -> bool | None:
    """Whether *pattern* matches *text*; None when that would overrun the request's budget."""
    budget = BUDGET.get()
    if budget is not None:
        budget.left -= len(text) ** pattern_degree(pattern)
        if budget.left < 0:
            return None
    return _compiled(pattern).search(text) is not None


def _pattern(validator: Any, pattern: str, instance: Any, schema: dict) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "string"):
        return
    limit = schema.get("maxLength")
    if isinstance(limit, int) and len(instance) > limit:
        return  # maxLength reports this string; matching it could only cost time
    found = search_within_budget(pattern, instance)
    if found is None:
        yield ValidationError(f"a string of {len(instance)} characters is too long to check against "
                              f"{pattern!r} (give the schema a maxLength)")
    elif not found:
        yield ValidationError(f"{shorten(repr(instance), 60)} does not match {pattern!r}")


def _key_matches(pattern: str, name: str) -> bool:
    found = search_within_budget(pattern, name)
    if found is None:
        raise TooCostly(f"a property name of {len(name)} characters is too long to check against {pattern!r}")
    return found


def _pattern_properties(validator: Any, patterns: dict, instance: Any, schema: dict) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for name, value in instance.items():
            if _key_matches(pattern, name):
                yield from validator.descend(value, subschema, path=name, schema_path=pattern)


def _additional_properties(validator: Any, allowed: Any, instance: Any, schema: dict) -> Iterator[ValidationError]:
    """jsonschema's keyword, with property names matched as :func:`_pattern` does."""
    if not validator.is_type(instance, "object"):
        return
    known, patterns = schema.get("properties", {}), list(schema.get("patternProperties", {}))
    extras = [name for name in instance
              if name not in known and not any(_key_matches(p, name) for p in patterns)]
    if validator.is_type(allowed, "object"):
        for name in extras:
            yield from validator.descend(instance[name], allowed, path=name)
    elif not allowed and extras:
        names = ", ".join(repr(name[:64]) for name in sorted(extras)[:10])
        more = f" and {len(extras) - 10} more" if len(extras) > 10 else ""
        verb = "was" if len(extras) == 1 else "were"
        yield ValidationError(f"Additional properties are not allowed ({names}{more} {verb} unexpected)")


def _canonical(value: Any) -> Any:
    """A hashable form equal exactly when JSON Schema calls two values equal (1 == 1.0, true != 1)."""
    if isinstance(value, dict):
        return ("object", frozenset((key, _canonical(item)) for key, item in value.items()))
    if isinstance(value, list):
        return ("array", tuple(_canonical(item) for item in value))
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    return (type(value) is str, value)  # Python already has 1 == 1.0 with equal hashes


def _unique_items(validator: Any, unique: Any, instance: Any, schema: dict) -> Iterator[ValidationError]:
    if not (unique and validator.is_type(instance, "array")):
        return
    seen: dict[Any, int] = {}
    for index, item in enumerate(instance):
        first = seen.setdefault(_canonical(item), index)
        if first != index:
            yield ValidationError(f"has non-unique elements (item {index} repeats item {first})")
            return


#: Draft 2020-12 with the bounded keywords above; the catalogue and the envelope use it.
BoundedValidator = validators.extend(Draft202012Validator, {
    "pattern": _pattern, "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties, "uniqueItems": _unique_items,
})


def schema_keywords(node: Any, where: str = "") -> Iterator[tuple[str, str, Any]]:
    """(pointer, keyword, value) for every keyword of every subschema of *node*, never
    looking inside instance data (``enum``, ``examples``...)."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            yield from schema_keywords(item, f"{where}/{index}")
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        here = where + json_pointer([key])
        yield here, key, value
        if key in SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                yield from schema_keywords(sub, here + json_pointer([name]))
        elif key not in DATA_KEYWORDS:
            yield from schema_keywords(value, here)


# Keywords that describe a schema without constraining instances: a ``$ref`` with only these beside
# it can take its target's keywords in its place.
ANNOTATIONS = frozenset({"title", "description", "$comment", "examples", "default", "deprecated", "readOnly",
                         "writeOnly"})


def inline_local_refs(schema: Any) -> Any:
    """*schema* with each local ``$ref`` (``#/...``) replaced by a copy of its target's keywords.

    Validation is unchanged; jsonschema resolves a ``$ref`` on every use (~80 us of a ~150 us
    validation of order.status_changed, bench_intake). A ``$ref`` is kept where inlining could
    change meaning: with constraining keywords beside it, a target carrying its own ``$id`` or
    anchors, or a cycle; and none is inlined when a subschema has its own ``$id`` (``#/...``
    below it would name that resource, not the document).
    """
    if any(key == "$id" and here.count("/") > 1 for here, key, _value in schema_keywords(schema)):
        return schema
    def resolve(pointer: str) -> Any:
        node = schema
        for part in pointer[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node

    def inline(node: Any, resolving: tuple[str, ...], data: bool = False) -> Any:
        if isinstance(node, list):
            return [inline(item, resolving, data) for item in node]
        if not isinstance(node, dict) or data:
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/") and ref not in resolving:  # "#" is the whole schema
            try:
                target = resolve(ref)
            except (KeyError, IndexError, ValueError, TypeError):
                target = None
            beside = set(node) - {"$ref"}
            if (isinstance(target, dict) and beside <= ANNOTATIONS and not beside & set(target)
                    and not {"$id", "$anchor", "$dynamicAnchor"} & set(target)):
                return {**inline(target, resolving + (ref,)), **{k: node[k] for k in beside}}
        out = {}
        for key, value in node.items():
            if key in SCHEMA_MAPS and isinstance(value, dict):
                out[key] = {name: inline(sub, resolving) for name, sub in value.items()}
            else:
                out[key] = inline(value, resolving, data=key in DATA_KEYWORDS)
        return out

    return inline(schema, ())


def schema_patterns(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(pointer, regex) for each ``pattern`` and ``patternProperties`` name of a schema."""
    for here, key, value in schema_keywords(node, where):
        if key == "pattern" and isinstance(value, str):
            yield here, value
        elif key == "patternProperties" and isinstance(value, dict):
            yield from ((here + json_pointer([name]), name) for name in value)


# -- How a regular expression backtracks -------------------------------------------
#
# A backtracking matcher is linear when every choice it makes (take another
# round of a repetition or stop; which alternative) is settled by the next
# character: the characters that may start one option are disjoint from those
# that may start the other. A choice that is not settled (is "ambiguous") inside
# a repetition doubles the ways to match with each round: exponential, refused.
# Outside one, an ambiguous unbounded repetition gives back characters one by
# one and re-runs the rest of the pattern for each: that multiplies its cost by
# n. An unanchored pattern is tried from every start position: one more n. The
# character sets are over-approximated (``\d`` may be any non-ASCII
# character), so a degree is an upper bound.

_ALL = ((0, 0x10FFFF),)
_NON_ASCII = (0x80, 0x10FFFF)
_LETTERS = ((0x41, 0x5A), (0x61, 0x7A))
_CATEGORIES = {  # over-approximated: non-ASCII counts for each (matching uses ASCII \d \w, ECMA \s)
    sre.CATEGORY_DIGIT: ((0x30, 0x39), _NON_ASCII),
    sre.CATEGORY_WORD: ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A), _NON_ASCII),
    sre.CATEGORY_SPACE: ((0x09, 0x0D), (0x1C, 0x20), _NON_ASCII),
}
_REPEATS = (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT)
_ASSERTIONS = (sre.AT, sre.ASSERT, sre.ASSERT_NOT)
_SMALL_REPEAT = 64  # {m,n} up to this many rounds costs a constant factor, not a power of n


@lru_cache(maxsize=1024)
def pattern_degree(pattern: str) -> int:
    """d such that matching *pattern* on n characters takes at most about n**d steps.

    Raises ValueError (saying why) for a pattern whose matching time can grow
    exponentially, or that uses a back-reference.
    """
    parsed = sre_parse.parse(pattern)
    fold = bool(parsed.state.flags & re.IGNORECASE) or "(?" in pattern
    degree = _Regex(fold).walk(list(parsed), _Next((), True), False, 0)
    if degree and not _anchored(list(parsed)):
        degree += 1  # a search tries each start position, and an attempt can fail after n steps
    return max(degree, 1)


@dataclass(frozen=True)
class _Next:
    """What may follow a point of a pattern: its first characters, and whether the match may end there."""

    chars: tuple
    may_end: bool


def _overlap(a: tuple, b: tuple) -> bool:
    return any(lo1 <= hi2 and lo2 <= hi1 for lo1, hi1 in a for lo2, hi2 in b)


def _complement(ranges: list) -> tuple:
    result, start = [], 0
    for low, high in sorted(ranges):
        if low > start:
            result.append((start, low - 1))
        start = max(start, high + 1)
    return tuple(result + [(start, 0x10FFFF)] if start <= 0x10FFFF else result)


def _anchored(items: list) -> bool:
    if not items:
        return False
    op, av = items[0]
    if op is sre.AT:
        return av in (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING)
    if op is sre.SUBPATTERN:
        return _anchored(list(av[3]))
    return op is sre.BRANCH and all(_anchored(list(alt)) for alt in av[1])


class _Regex:
    """The walk behind :func:`pattern_degree` over ``re``'s parse tree."""

    def __init__(self, fold: bool) -> None:
        self.fold = fold  # case-insensitive somewhere: letters match either case

    def chars(self, op: Any, av: Any) -> tuple:
        if op is sre.LITERAL:
            found: tuple = ((av, av),)
        elif op is sre.NOT_LITERAL:
            found = _complement([(av, av)])
        elif op is sre.IN:
            ranges, negate = [], False
            for kind, value in av:
                if kind is sre.NEGATE:
                    negate = True
                elif kind is sre.LITERAL:
                    ranges.append((value, value))
                elif kind is sre.RANGE:
                    ranges.append(value)
                else:  # a category: \d, \w, \s or a negation of one
                    ranges.extend(_CATEGORIES.get(value, _ALL))
            found = _complement(ranges) if negate else tuple(ranges)
        else:
            return _ALL
        if self.fold and _overlap(found, _LETTERS + (_NON_ASCII,)):
            found += _LETTERS + (_NON_ASCII,)
        return found

    def first(self, items: Iterable) -> tuple[tuple, bool]:
        """The characters a match of *items* can start with, and whether it can be empty."""
        chars: tuple = ()
        for op, av in items:
            found, empty = self.first_of(op, av)
            chars += found
            if not empty:
                return chars, False
        return chars, True

    def first_of(self, op: Any, av: Any) -> tuple[tuple, bool]:
        if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN):
            return self.chars(op, av), False
        if op is sre.BRANCH:
            options = [self.first(alt) for alt in av[1]]
            return sum((chars for chars, _ in options), ()), any(empty for _, empty in options)
        if op is sre.SUBPATTERN:
            return self.first(av[3])
        if op is sre.ATOMIC_GROUP:
            return self.first(av)
        if op in _REPEATS:
            chars, empty = self.first(av[2])
            return chars, empty or av[0] == 0
        if op in _ASSERTIONS:
            return (), True
        raise ValueError("uses a back-reference or conditional, whose matching time is unbounded")

    def following(self, items: list, after: _Next) -> _Next:
        chars, may_end = (), True
        for op, av in items:
            found, empty = self.first_of(op, av)
            chars += found
            may_end = may_end and op not in _ASSERTIONS  # "$" or a lookahead can still fail
            if not empty:
                return _Next(chars, False)
        return _Next(chars + after.chars, after.may_end and may_end)

    def walk(self, items: list, after: _Next, in_loop: bool, rest: int) -> int:
        """The degree of *items* followed by a rest of degree *rest*."""
        degree = rest
        for index in reversed(range(len(items))):
            op, av = items[index]
            degree = self.step(op, av, self.following(items[index + 1:], after), in_loop, degree)
        return degree

    def step(self, op: Any, av: Any, after: _Next, in_loop: bool, rest: int) -> int:
        if op is sre.BRANCH:
            starts = []
            for alt in av[1]:
                chars, empty = self.first(alt)
                starts.append(chars + (after.chars if empty else ()))
            if in_loop and any(_overlap(a, b) for i, a in enumerate(starts) for b in starts[i + 1:]):
                raise ValueError("repeats a choice between alternatives that can start alike (like (a|ab)*)")
            return max(self.walk(list(alt), after, in_loop, rest) for alt in av[1])
        if op is sre.SUBPATTERN:
            return self.walk(list(av[3]), after, in_loop, rest)
        if op is sre.ATOMIC_GROUP:
            return self.walk(list(av), after, in_loop, rest)
        if op in (sre.ASSERT, sre.ASSERT_NOT):
            return max(self.walk(list(av[1]), _Next((), True), in_loop, 0), rest)
        if op in _REPEATS:
            return self.repeat(op, av, after, in_loop, rest)
        self.first_of(op, av)  # raises for a back-reference
        return rest

    def repeat(self, op: Any, av: Any, after: _Next, in_loop: bool, rest: int) -> int:
        low, high, body = av[0], av[1], list(av[2])
        if high == 0:
            return rest
        first, empty = self.first(body)
        loops = high > 1
        ambiguous = low < high and op is not sre.POSSESSIVE_REPEAT and (
            (empty and loops) or _overlap(first, after.chars))
        if ambiguous and in_loop:
            raise ValueError("nests repetitions that can match the same text (like (a+)+ or (\\w+\\s?)*)")
        inner = self.walk(body, _Next(first + after.chars, after.may_end) if loops else after,
                          in_loop or loops, 0)
        if high <= _SMALL_REPEAT or after.may_end:
            return max(inner, rest)
        if ambiguous:  # each character given back re-runs the rest
            return max(inner, 1 + rest)
        return max(inner, 1, rest)
