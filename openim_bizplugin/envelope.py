"""The message envelope of ``POST /v1/messages`` (SPEC §4).

:func:`parse_envelope` turns a parsed JSON body into a :class:`MessageRequest`
with every default resolved from the type's ``type.toml``, or raises the
problem the caller should see. Checks run in this order so the most useful
error wins: envelope shape (422), client permission (403), type and version
(404), the data schema (422), recipient ids and their cap (422).
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

from .catalog.registry import (MAX_VIOLATIONS, MODES, OFFLINE_POLICIES, PRIORITIES, BoundedValidator, Catalog,
                               MessageType, violations)
from .errors import Forbidden, NotFound, Unprocessable, Violation

MAX_ID_LENGTH = 128
MAX_TTL_SECONDS = 366 * 86400

_KEY = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"^[\x21-\x7e]+$"}
_IDS = {"type": "array", "minItems": 1, "items": {"type": "string"}}

ENVELOPE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type", "version", "data", "to"],
    "properties": {
        "type": {"type": "string", "minLength": 1, "maxLength": 128},
        "version": {"type": "integer", "minimum": 1},
        "data": {"description": "Validated against schemas/<type>/v<version>.json"},
        "to": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "maxProperties": 1,
            "properties": {"users": _IDS, "groups": _IDS},
            "description": "Exactly one of users or groups, non-empty.",
        },
        "priority": {"enum": list(PRIORITIES)},
        "idempotency_key": _KEY,
        "collapse_key": _KEY,
        "ttl_seconds": {"type": "integer", "minimum": 1, "maximum": MAX_TTL_SECONDS},
        "offline": {"enum": list(OFFLINE_POLICIES)},
        "mode": {"enum": list(MODES)},
    },
}
# Bounded, and with ECMA-262 patterns: "$" in _KEY must not accept "key\n".
_ENVELOPE_VALIDATOR = BoundedValidator(ENVELOPE_SCHEMA)


@dataclass(frozen=True)
class MessageRequest:
    """A message that passed every check, defaults resolved."""

    message_type: MessageType
    version: int
    data: Any
    target_kind: str  # "user" | "group"
    targets: tuple[str, ...]  # unique, in the caller's order
    priority: str
    offline: str
    mode: str
    ttl_seconds: int
    idempotency_key: str | None
    collapse_key: str | None
    request_hash: str

    @property
    def deprecated(self) -> bool:
        return self.message_type.is_deprecated(self.version)


def parse_envelope(body: Any, *, client_id: str, allowed_types: tuple[str, ...], catalog: Catalog,
                   max_recipients: int, header_key: str | None = None) -> MessageRequest:
    """Check *body* against the envelope, the client's rights and the type's schema."""
    if not plainly_valid(body):  # jsonschema only when there is something to explain
        _raise_if(violations(_ENVELOPE_VALIDATOR, body), "the message envelope is invalid")
        body = _integers(body)
    name, version = body["type"], body["version"]
    if not any(fnmatch.fnmatchcase(name, pattern) for pattern in allowed_types):
        raise Forbidden(f"client {client_id!r} may not send type {name!r}")
    message_type = catalog.get(name)
    if message_type is None:
        raise NotFound(f"unknown message type {name!r} (GET /v1/types lists them)")
    if version not in message_type.schemas:
        known = ", ".join(str(v) for v in message_type.versions)
        raise NotFound(f"type {name!r} has no version {version} (known: {known})")
    _raise_if([Violation("/data" + v.path, v.message) for v in catalog.validate(name, version, body["data"])],
              f"data does not match {name} v{version}")
    kind, ids = next(iter(body["to"].items()))
    targets = _unique_ids(f"/to/{kind}", ids, max_recipients)
    key = _idempotency_key(body.get("idempotency_key"), header_key)
    defaults = message_type.defaults
    return MessageRequest(
        message_type=message_type, version=version, data=body["data"],
        target_kind=kind[:-1], targets=targets,
        priority=body.get("priority", defaults.priority),
        offline=body.get("offline", defaults.offline),
        mode=body.get("mode", defaults.mode),
        ttl_seconds=body.get("ttl_seconds", defaults.ttl_seconds),
        idempotency_key=key, collapse_key=body.get("collapse_key"),
        request_hash=request_hash(body),
    )


_OPTIONAL_ENUMS = {"priority": PRIORITIES, "offline": OFFLINE_POLICIES, "mode": MODES}


def plainly_valid(body: Any) -> bool:
    """A quick check that implies ENVELOPE_SCHEMA holds (validation costs ~70 µs a request).

    False means "not sure": the caller then asks jsonschema, which explains.
    """
    if not isinstance(body, dict) or not body.keys() <= ENVELOPE_SCHEMA["properties"].keys():
        return False
    name, version, to = body.get("type"), body.get("version"), body.get("to")
    if not (isinstance(name, str) and 1 <= len(name) <= 128 and "data" in body):
        return False
    if type(version) is not int or version < 1 or not isinstance(to, dict) or len(to) != 1:
        return False
    ids = to.get("users", to.get("groups"))
    if not (isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids)):
        return False
    if any(k in body and body[k] not in allowed for k, allowed in _OPTIONAL_ENUMS.items()):
        return False
    ttl = body.get("ttl_seconds", 1)
    if type(ttl) is not int or not 1 <= ttl <= MAX_TTL_SECONDS:
        return False
    return all(k not in body or (isinstance(body[k], str) and not _bad_key(body[k]))
               for k in ("idempotency_key", "collapse_key"))


def request_hash(body: dict[str, Any]) -> str:
    """A hash of what the message means, independent of key order and spacing."""
    meaning = {k: v for k, v in body.items() if k != "idempotency_key"}
    return hashlib.sha256(json.dumps(meaning, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _integers(body: dict[str, Any]) -> dict[str, Any]:
    """*body* with ``version`` and ``ttl_seconds`` as ints: JSON Schema's "integer" admits 1.0,
    which would reach the stored envelope (``"v": 1.0``) and the idempotency hash."""
    return {k: int(v) if k in ("version", "ttl_seconds") else v for k, v in body.items()}


def _raise_if(found: list[Violation], detail: str) -> None:
    if found:
        raise Unprocessable(detail, errors=found)


# Unicode's categories Cc (controls) and Cs (surrogates), exactly; a regex, not a loop over characters
_CONTROL_OR_SURROGATE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def id_problem(value: str) -> str | None:
    """Why *value* is not a usable OpenIM user or group id, or None."""
    if not 1 <= len(value) <= MAX_ID_LENGTH:
        return f"must be 1-{MAX_ID_LENGTH} characters"
    if value != value.strip():
        return "must not start or end with white space"
    if _CONTROL_OR_SURROGATE.search(value):
        return "must not contain control characters or unpaired surrogates"
    return None


def _unique_ids(path: str, ids: list[str], cap: int) -> tuple[str, ...]:
    unique = tuple(dict.fromkeys(ids))
    if len(unique) > cap:
        raise Unprocessable(f"{len(unique)} recipients is over the cap of {cap} (server.max_recipients)",
                            errors=[Violation(path, f"at most {cap} unique ids")])
    problems = (Violation(f"{path}/{i}", f"id {value[:40]!r} {problem}")
                for i, value in enumerate(ids) if (problem := id_problem(value)))
    _raise_if(list(itertools.islice(problems, MAX_VIOLATIONS)), "some recipient ids are not valid")
    return unique


def _idempotency_key(in_body: str | None, in_header: str | None) -> str | None:
    if in_header is not None:
        if _bad_key(in_header):
            raise Unprocessable("the Idempotency-Key header must be 1-200 printable ASCII characters")
        if in_body is not None and in_body != in_header:
            raise Unprocessable("Idempotency-Key header and body idempotency_key differ",
                                errors=[Violation("/idempotency_key", "differs from the Idempotency-Key header")])
        return in_header
    return in_body


def _bad_key(value: str) -> bool:
    return not (1 <= len(value) <= 200 and all("\x21" <= ch <= "\x7e" for ch in value))
