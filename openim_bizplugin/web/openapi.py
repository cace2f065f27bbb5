"""The OpenAPI 3.1 description of ``/v1``, with every type's schema inside.

Built once at start-up from the catalogue so generated clients and probing
tools (schemathesis) see exactly the types this deployment accepts.
"""

from __future__ import annotations

import copy
from typing import Any

from .. import __version__
from ..catalog.registry import Catalog
from ..envelope import ENVELOPE_SCHEMA

_STATUSES = ["queued", "held", "throttled", "sending", "sent", "read", "acknowledged",
             "failed", "expired", "skipped"]
_NULLABLE_STR = {"type": ["string", "null"]}

_PROBLEM = {
    "type": "object",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {"type": "array", "items": {
            "type": "object", "required": ["path", "message"],
            "properties": {"path": {"type": "string"}, "message": {"type": "string"}}}},
    },
}
_ACCEPTED = {
    "type": "object", "required": ["id", "status", "recipients"],
    "properties": {"id": {"type": "string"}, "status": {"const": "queued"},
                   "recipients": {"type": "integer", "minimum": 1}},
}
_RECIPIENT = {
    "type": "object", "required": ["status", "attempts"],
    "properties": {
        "user_id": {"type": "string"}, "group_id": {"type": "string"},
        "status": {"enum": _STATUSES}, "attempts": {"type": "integer"},
        "last_error": _NULLABLE_STR, "reason": _NULLABLE_STR, "server_msg_id": _NULLABLE_STR,
        "client_msg_id": _NULLABLE_STR, "sent_at": _NULLABLE_STR, "receipt": {},
    },
}
_MESSAGE = {
    "type": "object",
    "required": ["id", "client", "type", "version", "mode", "priority", "status", "created_at",
                 "expires_at", "recipients"],
    "properties": {
        "id": {"type": "string"}, "client": {"type": "string"}, "type": {"type": "string"},
        "version": {"type": "integer"}, "mode": {"type": "string"}, "priority": {"type": "string"},
        "offline": {"type": "string"}, "status": {"type": "string"},
        "created_at": {"type": "string", "format": "date-time"},
        "expires_at": {"type": "string", "format": "date-time"},
        "recipients": {"type": "array", "items": {"$ref": "#/components/schemas/Recipient"}},
    },
}
_TYPES = {
    "type": "object", "required": ["types"],
    "properties": {"types": {"type": "array", "items": {
        "type": "object", "required": ["type", "version", "schema", "defaults", "deprecated"],
        "properties": {"type": {"type": "string"}, "version": {"type": "integer"},
                       "schema": {"type": "object"}, "defaults": {"type": "object"},
                       "deprecated": {"type": "boolean"}}}}},
}


def _problems(*codes: int) -> dict[str, Any]:
    ref = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    return {str(code): {"description": _REASONS[code], "content": ref} for code in codes}


_REASONS = {400: "Body is not strict JSON", 401: "Missing, invalid or expired signature",
            403: "Type not allowed for this client", 404: "Unknown type, version or message",
            409: "Same idempotency key still being stored", 413: "Body too large",
            415: "Not application/json", 422: "Schema or envelope violation",
            429: "Rate limited", 503: "Storage unavailable"}


def _embedded(schema: dict[str, Any], name: str) -> dict[str, Any]:
    """A type schema as a component: no ``$id``/``$schema``, local refs re-rooted."""
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: walk(v) for k, v in node.items() if k not in ("$id", "$schema")}
            ref = out.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                out["$ref"] = f"#/components/schemas/{name}" + ref[1:]
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node
    return walk(copy.deepcopy(schema))


def build_openapi(catalog: Catalog) -> dict[str, Any]:
    """The whole OpenAPI document for this deployment's catalogue."""
    components: dict[str, Any] = {"Problem": _PROBLEM, "Accepted": _ACCEPTED, "Recipient": _RECIPIENT,
                                  "Message": _MESSAGE, "Types": _TYPES}
    variants = []
    for message_type in catalog.types():
        for version in message_type.versions:
            name = f"{message_type.name}.v{version}"
            components[name] = _embedded(message_type.schemas[version], name)
            variants.append({
                "type": "object", "required": ["type", "version", "data"],
                "properties": {"type": {"const": message_type.name}, "version": {"const": version},
                               "data": {"$ref": f"#/components/schemas/{name}"}},
            })
    components["Envelope"] = ENVELOPE_SCHEMA
    components["MessageRequest"] = {"allOf": [{"$ref": "#/components/schemas/Envelope"}, {"oneOf": variants}]}
    signed = [{"bizClient": [], "bizSignature": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "openim-bizplugin internal API", "version": __version__,
                 "description": "Signed business control messages for OpenIM. Every /v1 request carries "
                                "X-Biz-Client and X-Biz-Signature (see the README, 'Signing requests')."},
        "paths": {
            "/v1/messages": {"post": {
                "operationId": "sendMessage", "security": signed,
                "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                "description": "Covered by X-Biz-Signature when sent (README, 'Signing"
                                               " requests'); or put idempotency_key in the body.",
                                "schema": {"type": "string", "minLength": 1, "maxLength": 200}}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/MessageRequest"}}}},
                "responses": {"202": {"description": "Stored; delivery follows", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}}},
                    **_problems(400, 401, 403, 404, 409, 413, 415, 422, 429, 503)},
            }},
            "/v1/messages/{id}": {"get": {
                "operationId": "getMessage", "security": signed,
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The message and its recipients", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Message"}}}},
                    **_problems(401, 404, 429, 503)},
            }},
            "/v1/types": {"get": {
                "operationId": "listTypes", "security": signed,
                "responses": {"200": {"description": "Every type and version", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Types"}}}},
                    **_problems(401, 429)},
            }},
        },
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bizClient": {"type": "apiKey", "in": "header", "name": "X-Biz-Client"},
                "bizSignature": {"type": "apiKey", "in": "header", "name": "X-Biz-Signature",
                                 "description": "itsdangerous TimestampSigner token over the request"},
            },
        },
    }
