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

import difflib
import itertools
import json
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError

from ..errors import ConfigError, Violation
from ..strictjson import DuplicateKey, object_without_duplicates
from .bounded import (BUDGET, VALIDATION_BUDGET, BoundedValidator, Budget, TooCostly, inline_local_refs, json_pointer,
                      pattern_degree, schema_keywords, schema_patterns, shorten)
from .quick import compile_quick

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
        inlined = {(t.name, version): inline_local_refs(schema)
                   for t in self._types.values() for version, schema in t.schemas.items()}
        self._validators = {key: BoundedValidator(schema) for key, schema in inlined.items()}
        self._quick = {key: compile_quick(schema) for key, schema in inlined.items()}

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
        quick = self._quick[(name, version)]
        if quick is not None and quick(data):  # plainly valid: jsonschema would find nothing
            return []
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
    token = BUDGET.set(Budget(budget) if budget is not None else None)
    try:
        # oneOf/anyOf errors carry sub-errors in .context; the parent error is
        # the one a sender can act on, so it is reported alone.
        errors = sorted(
            itertools.islice(validator.iter_errors(data), MAX_VIOLATIONS),
            key=lambda e: (_path_key(e.absolute_path), e.message),
        )
        found = (Violation(json_pointer(e.absolute_path), _message(e)) for e in errors)
        return list(dict.fromkeys(found))  # drop repeats, keep order
    except TooCostly as exc:
        return [Violation("", str(exc))]
    except RecursionError:  # a recursive schema over deeply nested data
        return [Violation("", "data is nested too deeply to validate against its schema")]
    finally:
        BUDGET.reset(token)


def _message(error: ValidationError) -> str:
    """The error's message, at most MAX_MESSAGE long, keeping what is wrong."""
    message = error.message
    if len(message) > MAX_MESSAGE:
        quoted = repr(error.instance)
        if message.startswith(quoted):  # jsonschema quotes the whole instance: "[...] is too long"
            message = shorten(quoted, 60) + message[len(quoted):]
    return shorten(message, MAX_MESSAGE)


def _path_key(parts: Iterable[object]) -> list[tuple[int, int, str]]:
    # Indexes compare as numbers, so /fields/2 comes before /fields/10.
    return [(0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in parts]


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


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read as UTF-8 text ({exc})") from exc
    try:  # a silently kept last duplicate could hide a whole "properties" block
        return json.loads(text, object_pairs_hook=object_without_duplicates)
    except DuplicateKey as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
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
    for where, pattern in schema_patterns(schema):
        try:
            pattern_degree(pattern)
        except ValueError as exc:
            raise ValueError(f"pattern {pattern!r} at {where or '/'} {exc}; rewrite it so each "
                             "character can be matched only one way") from None
    for where, key, ref in schema_keywords(schema):
        # Remote or cross-file refs would only fail (or fetch!) at request
        # time; the catalogue must be self-contained.
        if key in ("$ref", "$dynamicRef") and isinstance(ref, str) and not ref.startswith("#"):
            raise ValueError(f"$ref {ref!r} at {where} is not local (only '#...' refs are allowed)")


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
