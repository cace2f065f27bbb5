"""The catalogue of business message types (the schema registry).

A catalogue is a directory with one folder per type::

    schemas/
      profile.updated/
        type.toml      delivery defaults (SPEC §2)
        v1.json        JSON Schema 2020-12 with ``examples``
        v2.json

:meth:`Catalog.load` reads and checks everything once at start-up and keeps
one compiled validator per (type, version), so validating a request is a
dictionary look-up plus ``iter_errors``.

Every per-folder and per-file check takes a ``report`` callable instead of
raising: :meth:`Catalog.load` passes one that raises :class:`ConfigError` on
the first problem, while ``schemas check`` (:mod:`.schemacheck`) passes one
that collects every problem.  That keeps one implementation of the rules.

Validation is bounded (see "Bounded validation" below): no schema the
catalogue loads can keep one request busy for seconds.
"""

from __future__ import annotations

import contextvars
import difflib
import itertools
import json
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from re import _constants as sre  # the parser behind re.compile (CPython 3.11+), for pattern_degree
from re import _parser as sre_parse
from types import MappingProxyType
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError, ValidationError

from .errors import ConfigError, Violation

MODES = ("notification", "custom")
PRIORITIES = ("high", "normal", "low")
OFFLINE_POLICIES = ("store", "hold", "drop")
RATE_POLICIES = ("delay", "drop")

DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
TYPE_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")
VERSION_FILE = re.compile(r"^v([1-9][0-9]*)\.json$")
_RATE = re.compile(r"^([0-9]+)/(second|minute|hour|day)$")
_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}

#: Receives one problem as a line ``"<file>: <what is wrong>"``.
Report = Callable[[str], None]


@dataclass(frozen=True)
class RateLimit:
    """A rate such as ``3/hour``: at most *count* per *period_seconds*."""

    count: int
    period_seconds: int
    text: str

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """Parse ``N/second|minute|hour|day`` (N >= 1); ValueError otherwise."""
        match = _RATE.match(text) if isinstance(text, str) else None
        if match is None or int(match.group(1)) < 1:
            raise ValueError(
                f"{text!r} is not a rate like '3/hour' (N/second|minute|hour|day, N >= 1)"
            )
        return cls(int(match.group(1)), _PERIODS[match.group(2)], text)


@dataclass(frozen=True)
class TypeDefaults:
    """A type's delivery defaults, read from its ``type.toml`` (SPEC §2)."""

    mode: str = "notification"
    priority: str = "normal"
    offline: str = "store"
    ttl_seconds: int = 86400
    persistent: bool = True
    rate_limit: RateLimit | None = None
    rate_limit_policy: str = "delay"
    push_title: str = ""
    push_desc: str = ""
    deprecated_versions: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, keyed as in ``type.toml``."""
        result = {f.name: getattr(self, f.name) for f in fields(self)}
        result["rate_limit"] = self.rate_limit.text if self.rate_limit else None
        result["deprecated_versions"] = list(self.deprecated_versions)
        return result


@dataclass(frozen=True)
class MessageType:
    """One business message type: its defaults and its schema versions."""

    name: str
    defaults: TypeDefaults
    schemas: Mapping[int, dict]

    @property
    def versions(self) -> list[int]:
        """The schema versions, oldest first."""
        return sorted(self.schemas)

    def is_deprecated(self, version: int) -> bool:
        """True when *version* is listed in ``deprecated_versions``."""
        return version in self.defaults.deprecated_versions


class Catalog:
    """The loaded, checked catalogue; immutable after construction."""

    def __init__(self, types: Iterable[MessageType]) -> None:
        self._types = {t.name: t for t in types}
        # Compiled once: validate() runs for every API request.
        self._validators = {
            (t.name, version): BoundedValidator(schema)
            for t in self._types.values()
            for version, schema in t.schemas.items()
        }

    @classmethod
    def load(cls, directory: str | Path) -> Catalog:
        """Load and check *directory*; ConfigError names the first bad file."""
        folders = type_folders(Path(directory), _raise_config_error)
        return cls(load_type(folder, _raise_config_error) for folder in folders)

    def types(self) -> list[MessageType]:
        """Every type, sorted by name."""
        return [self._types[name] for name in sorted(self._types)]

    def get(self, name: str) -> MessageType | None:
        """The type called *name*, or None."""
        return self._types.get(name)

    def schema(self, name: str, version: int) -> dict | None:
        """The schema of *name* version *version*, or None if unknown."""
        message_type = self._types.get(name)
        return message_type.schemas.get(version) if message_type else None

    def validate(self, name: str, version: int, data: object) -> list[Violation]:
        """Every violation of *data* against the schema, sorted by path.

        Paths are JSON pointers relative to *data* (``""`` is *data* itself).
        Raises KeyError for an unknown type or version: callers answer 404
        after :meth:`schema` returned None, before validating.
        """
        validator = self._validators.get((name, version))
        if validator is None:
            raise KeyError(f"unknown message type {name} v{version}")
        return violations(validator, data, budget=VALIDATION_BUDGET)


#: At most this many violations are reported (a 2 MiB array of wrong items
#: would otherwise answer with megabytes of errors), each at most this long.
MAX_VIOLATIONS = 50
MAX_MESSAGE = 300


def violations(validator: Draft202012Validator, data: object,
               budget: int | None = None) -> list[Violation]:
    """Errors of *validator* on *data* as sorted :class:`Violation` values.

    *budget* bounds the regular-expression work (see :func:`pattern_degree`);
    None means unbounded, for the catalogue's own examples.
    """
    token = _BUDGET.set(_Budget(budget) if budget is not None else None)
    try:
        # oneOf/anyOf errors carry sub-errors in .context; the parent error is
        # the one a sender can act on, so it is reported alone.
        errors = sorted(
            itertools.islice(validator.iter_errors(data), MAX_VIOLATIONS),
            key=lambda e: (_path_key(e.absolute_path), e.message),
        )
        found = (Violation(json_pointer(e.absolute_path), _message(e)) for e in errors)
        return list(dict.fromkeys(found))  # drop repeats, keep order
    except _TooCostly as exc:
        return [Violation("", str(exc))]
    except RecursionError:  # a recursive schema over deeply nested data
        return [Violation("", "data is nested too deeply to validate against its schema")]
    finally:
        _BUDGET.reset(token)


def _message(error: ValidationError) -> str:
    """The error's message, at most MAX_MESSAGE long, keeping what is wrong."""
    message = error.message
    if len(message) > MAX_MESSAGE:
        quoted = repr(error.instance)
        if message.startswith(quoted):  # jsonschema quotes the whole instance: "[...] is too long"
            message = _shorten(quoted, 60) + message[len(quoted):]
    return _shorten(message, MAX_MESSAGE)


def _shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _path_key(parts: Iterable[object]) -> list[tuple[int, int, str]]:
    # Indexes compare as numbers, so /fields/2 comes before /fields/10.
    return [(0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in parts]


def json_pointer(parts: Iterable[object]) -> str:
    """RFC 6901 pointer for a path of keys and indexes (``""`` for none)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _raise_config_error(problem: str) -> None:
    raise ConfigError(problem)


# --- Folder level ----------------------------------------------------------


def _ignored(path: Path) -> bool:
    # Editors, VCS and Python leave .swp, .git, __pycache__ behind.
    return path.name.startswith((".", "_"))


def type_folders(directory: Path, report: Report) -> list[Path]:
    """The type folders of *directory*, sorted; reports bad names.

    Plain files at the top level (a README, say) are not types and are
    left alone.
    """
    if not directory.is_dir():
        report(f"{directory}: schema directory not found")
        return []
    folders = []
    for entry in sorted(directory.iterdir()):
        if _ignored(entry) or not entry.is_dir():
            continue
        if TYPE_NAME.match(entry.name):
            folders.append(entry)
        else:
            report(
                f"{entry}: type folder name must be dot-separated lowercase words"
                " (letters, digits, _), like profile.updated"
            )
    if not folders:
        report(f"{directory}: no message types (expected one folder per type)")
    return folders


def version_files(folder: Path, report: Report) -> dict[int, Path]:
    """``{version: path}`` of *folder*'s ``v<N>.json``; reports stray entries."""
    found = {}
    for entry in sorted(folder.iterdir()):
        match = VERSION_FILE.match(entry.name)
        if _ignored(entry) or entry.name == "type.toml":
            continue
        if match and entry.is_file():
            found[int(match.group(1))] = entry
        else:
            report(
                f"{entry}: unexpected entry in a type folder"
                " (expected v<N>.json with N >= 1 and no leading zero, or type.toml)"
            )
    if not found:
        report(f"{folder}: no schema versions (expected v1.json, v2.json, ...)")
    return found


def load_type(folder: Path, report: Report) -> MessageType | None:
    """Load one type folder, reporting every problem found.

    With a collecting *report* the result holds only the versions that are
    valid; it is None when ``type.toml`` or every version is unusable.
    """
    files = version_files(folder, report)
    defaults = load_defaults(folder / "type.toml", set(files), report)
    schemas = {}
    for version, path in files.items():
        schema = load_schema_file(path, report)
        if schema is not None:
            schemas[version] = schema
    if defaults is None or not schemas:
        return None
    return MessageType(folder.name, defaults, MappingProxyType(schemas))


# --- type.toml -------------------------------------------------------------


def _choice(options: tuple[str, ...]) -> Callable[[object], object]:
    def check(value: object) -> object:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    return check


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("must be a positive integer")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _rate(value: object) -> RateLimit:
    return RateLimit.parse(_text(value))


def _version_list(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
    ):
        raise ValueError("must be a list of version numbers like [1, 2]")
    return tuple(sorted(set(value)))


#: type.toml key -> checker returning the parsed value or raising ValueError.
_DEFAULT_KEYS: dict[str, Callable[[object], object]] = {
    "mode": _choice(MODES),
    "priority": _choice(PRIORITIES),
    "offline": _choice(OFFLINE_POLICIES),
    "ttl_seconds": _positive_int,
    "persistent": _boolean,
    "rate_limit": _rate,
    "rate_limit_policy": _choice(RATE_POLICIES),
    "push_title": _text,
    "push_desc": _text,
    "deprecated_versions": _version_list,
}


def load_defaults(path: Path, versions: set[int], report: Report) -> TypeDefaults | None:
    """Parse a ``type.toml``; reports each bad key, None if any problem.

    *versions* are the version files present, which ``deprecated_versions``
    may name.
    """
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        report(f"{path}: missing (every type folder needs its delivery defaults)")
        return None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        report(f"{path}: not valid TOML ({exc})")
        return None
    values, problems = {}, []
    for key, value in table.items():
        if key not in _DEFAULT_KEYS:
            problems.append(_unknown_key(key))
            continue
        try:
            values[key] = _DEFAULT_KEYS[key](value)
        except ValueError as exc:
            problems.append(f"{key} = {json.dumps(value, default=str)}: {exc}")
    missing = sorted(set(values.get("deprecated_versions", ())) - versions)
    if missing:
        names = ", ".join(f"v{v}.json" for v in missing)
        problems.append(f"deprecated_versions names {names}, which does not exist")
    for problem in problems:
        report(f"{path}: {problem}")
    return None if problems else TypeDefaults(**values)


def _unknown_key(key: str) -> str:
    close = difflib.get_close_matches(key, _DEFAULT_KEYS, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "expected " + ", ".join(_DEFAULT_KEYS)
    return f"unknown key {key!r} ({hint})"


# --- v<N>.json ---------------------------------------------------------------


def load_schema_file(path: Path, report: Report) -> dict | None:
    """Load and check one schema file; None if it has any problem.

    Structural problems stop at the first (later checks build on earlier
    ones); every failing example is reported.
    """
    try:
        schema = _read_json(path)
        _check_schema(schema)
    except ValueError as exc:
        report(f"{path}: {exc}")
        return None
    problems = list(example_problems(schema))
    for problem in problems:
        report(f"{path}: {problem}")
    return None if problems else schema


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last duplicate silently; in a schema that hides
    # a whole "properties" block, so refuse it.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"not valid JSON (duplicate key {key!r})")
        result[key] = value
    return result


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read as UTF-8 text ({exc})") from exc
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})"
        ) from exc


def _check_schema(schema: Any) -> None:
    """Raise ValueError with the first structural problem of *schema*."""
    if not isinstance(schema, dict):
        raise ValueError("not a JSON object (a schema file holds one JSON Schema object)")
    declared = schema.get("$schema", DRAFT_2020_12)
    if not isinstance(declared, str) or declared.rstrip("#") != DRAFT_2020_12:
        raise ValueError(f"$schema must be {DRAFT_2020_12!r}, not {declared!r}")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = json_pointer(exc.absolute_path) or "/"
        raise ValueError(f"invalid JSON Schema: {exc.message} at {where}") from None
    if schema.get("type") != "object":
        raise ValueError('root must describe an object ("type": "object")')
    for where, pattern in _patterns(schema, ""):
        try:
            pattern_degree(pattern)
        except ValueError as exc:
            raise ValueError(f"pattern {pattern!r} at {where or '/'} {exc}; rewrite it so each "
                             "character can be matched only one way") from None
    for where, ref in _outside_refs(schema, ""):
        # Remote or cross-file refs would only fail (or fetch!) at request
        # time; the catalogue must be self-contained.
        raise ValueError(
            f"$ref {ref!r} at {where} is not local (only '#...' refs are allowed)"
        )


#: Keywords whose values are instance data, not subschemas.
_DATA_KEYWORDS = frozenset({"examples", "enum", "const", "default"})
#: Keywords whose values map arbitrary names to subschemas.
_SCHEMA_MAPS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)


def _outside_refs(node: Any, where: str) -> Iterator[tuple[str, str]]:
    """(pointer, ref) for each ``$ref``/``$dynamicRef`` not starting with ``#``."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            yield from _outside_refs(item, f"{where}/{index}")
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        here = where + json_pointer([key])
        if key in ("$ref", "$dynamicRef") and isinstance(value, str):
            if not value.startswith("#"):
                yield here, value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                yield from _outside_refs(sub, here + json_pointer([name]))
        elif key not in _DATA_KEYWORDS:
            yield from _outside_refs(value, here)


def example_problems(schema: dict) -> Iterator[str]:
    """One line per missing, empty or failing ``examples`` entry."""
    examples = schema.get("examples")
    if not isinstance(examples, list) or not examples:
        yield "examples must be a non-empty list (they document the type and are tested)"
        return
    validator = BoundedValidator(schema)
    for index, example in enumerate(examples):
        found = violations(validator, example)
        if found:
            first = found[0]
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            where = first.path or "/"
            yield f"examples[{index}] does not validate: {where}: {first.message}{more}"


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
#   ``^[a-z]+$`` accepted ``"abc\n"``.

#: Units are regex steps (about 5 ns each): this bounds a request to ~0.1 s of matching.
VALIDATION_BUDGET = 20_000_000


class _TooCostly(Exception):
    """A property name would overrun the budget (a string gets a located violation instead)."""


class _Budget:
    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("validation_budget", default=None)


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(_ecma_end(pattern))


def _ecma_end(pattern: str) -> str:
    """*pattern* with each ``$`` anchor (outside a character class) spelt ``\\Z``."""
    out, index, class_start = [], 0, None
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            out.append(pattern[index:index + 2])
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


def _search(pattern: str, text: str) -> bool | None:
    """Whether *pattern* matches *text*; None when that would overrun the request's budget."""
    budget = _BUDGET.get()
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
    found = _search(pattern, instance)
    if found is None:
        yield ValidationError(f"a string of {len(instance)} characters is too long to check against "
                              f"{pattern!r} (give the schema a maxLength)")
    elif not found:
        yield ValidationError(f"{_shorten(repr(instance), 60)} does not match {pattern!r}")


def _key_matches(pattern: str, name: str) -> bool:
    found = _search(pattern, name)
    if found is None:
        raise _TooCostly(f"a property name of {len(name)} characters is too long to check against {pattern!r}")
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


def _patterns(node: Any, where: str) -> Iterator[tuple[str, str]]:
    """(pointer, regex) for each ``pattern`` and ``patternProperties`` name of a schema."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            yield from _patterns(item, f"{where}/{index}")
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        here = where + json_pointer([key])
        if key == "pattern" and isinstance(value, str):
            yield here, value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            if key == "patternProperties":
                yield from ((here + json_pointer([name]), name) for name in value)
            for name, sub in value.items():
                yield from _patterns(sub, here + json_pointer([name]))
        elif key not in _DATA_KEYWORDS:
            yield from _patterns(value, here)


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
_CATEGORIES = {  # \d \w \s of str patterns also match non-ASCII characters
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
