"""Hardening (issue 6, item 5): every bad input gets a clear 4xx and stores nothing.

Each test goes through the real app. Where the transport matters (body size
limits, chunked uploads, header parsing) the app is served over real HTTP on
loopback, because Flask's test client hands the app a body and headers that
never were on a wire. "Stores nothing" is counted in the database, not
inferred from the answer. The fault tests break the storage under a running
app: a trigger that refuses the write, a file size limit (the disk is full),
a Redis that went away (callbacks while storage is locked: test_callback_spool.py).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, SECRETS, Signed, message, write_config
from openim_bizplugin.web.app import create_app
from openim_bizplugin.web.callbacks import CONTINUE
from openim_bizplugin.catalog.bounded import VALIDATION_BUDGET, BoundedValidator, pattern_degree
from openim_bizplugin.catalog.registry import Catalog
from openim_bizplugin.config import load_config
from openim_bizplugin.errors import ConfigError
from openim_bizplugin.signing import signature_headers
from openim_bizplugin.web.server import serving
from openim_bizplugin.web.wire import path_and_query

LIMIT = 65536  # server.max_body_bytes of the test config
CALLBACK_LIMIT = 256 * 1024  # callbacks.max_body_bytes, by default
CALLBACK = "/openim/callback/test-callback-token-0001"


# -- helpers ------------------------------------------------------------------------


def rows(store: Any, table: str = "messages") -> int:
    return store._read(f"SELECT COUNT(*) FROM {table}")[0][0]


def inbox_rows(store: Any) -> int:
    return store._inbox.read("SELECT COUNT(*) FROM callbacks")[0][0]


def problem(status: int, got_status: int, content_type: str, raw: bytes) -> dict:
    """The problem document of an answer, after checking its status and documented shape."""
    assert got_status == status, raw[:500]
    assert content_type == "application/problem+json", content_type
    body = json.loads(raw)
    assert body["status"] == status and body["type"].startswith("https://")
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    for error in body.get("errors", []):
        assert set(error) == {"path", "message"}
    return body


def problem_of(response: Any, status: int) -> dict:
    """:func:`problem` for a Flask test-client response."""
    return problem(status, response.status_code, response.mimetype, response.get_data())


def served(app: Any) -> contextlib.AbstractContextManager[int]:
    """The app on serve's HTTP engine on 127.0.0.1; yields its port."""
    return serving(app)


def signed_headers(clock: Any, body: bytes, client: str = "crm", path: str = "/v1/messages",
                   idempotency_key: str | None = None) -> dict[str, str]:
    headers = signature_headers(client, SECRETS[client], "POST", path, body, now=clock(),
                                idempotency_key=idempotency_key)
    headers["Content-Type"] = "application/json"
    return headers


def post_chunked(port: int, path: str, headers: dict[str, str], body: bytes,
                 chunk: int = 8192) -> tuple[int, str, bytes, dict[str, str]]:
    """POST *body* with ``Transfer-Encoding: chunked`` (no Content-Length), framed by hand."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("POST", path)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for start in range(0, len(body), chunk):
            part = body[start:start + chunk]
            conn.send(b"%x\r\n%s\r\n" % (len(part), part))
        conn.send(b"0\r\n\r\n")
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read(), dict(response.getheaders())
    finally:
        conn.close()


def post_raw(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes, bytes]:
    """Send a hand-written request; returns (status, response head, response body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head + b"\r\n" + body)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    response_head, _, response_body = data.partition(b"\r\n\r\n")
    return int(response_head.split(b" ", 2)[1]), response_head, response_body


def padded(body: dict, size: int) -> bytes:
    """*body* as JSON, padded with spaces to *size* bytes (still valid JSON)."""
    raw = json.dumps(body).encode()
    return raw + b" " * (size - len(raw))


# -- body size, over real HTTP ----------------------------------------------------------


def test_body_over_the_limit_by_content_length_is_413_over_http(app, clock, store):
    body = padded(message(), LIMIT + 1)
    with served(app) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/messages", body=body, headers=signed_headers(clock, body))
        response = conn.getresponse()
        detail = problem(413, response.status, response.getheader("Content-Type"), response.read())["detail"]
        conn.close()
    assert f"{LIMIT + 1} bytes" in detail
    assert rows(store) == 0


def test_chunked_body_over_the_limit_is_413_over_http(app, clock, store):
    body = padded(message(), 4 * LIMIT)  # validly signed: only its size is wrong
    with served(app) as port:
        status, content_type, raw, _ = post_chunked(port, "/v1/messages", signed_headers(clock, body), body)
    assert "over the limit" in problem(413, status, content_type, raw)["detail"]
    assert rows(store) == 0


def test_chunked_body_within_the_limit_is_read_whole_over_http(app, clock, store):
    body = padded(message(), LIMIT)  # exactly the limit, in 8 KiB chunks
    with served(app) as port:
        status, _, raw, _ = post_chunked(port, "/v1/messages", signed_headers(clock, body), body)
    assert status == 202, raw
    assert json.loads(raw)["recipients"] == 2 and rows(store) == 1


def test_chunked_callback_over_the_limit_is_answered_and_not_stored(app, store):
    body = json.dumps({"callbackCommand": "callbackAfterSendSingleMsgCommand",
                       "pad": "x" * (2 * CALLBACK_LIMIT)}).encode()
    with served(app) as port:
        status, _, raw, _ = post_chunked(port, f"{CALLBACK}/callbackAfterSendSingleMsgCommand",
                                         {"Content-Type": "application/json"}, body)
    assert status == 200 and json.loads(raw) == CONTINUE
    assert inbox_rows(store) == 0


def test_chunked_callback_is_stored(app, store):
    body = json.dumps({"callbackCommand": "callbackAfterUserOnlineCommand", "userID": "u1", "platformID": 1,
                       "seq": 7, "pad": "x" * 20_000}).encode()
    with served(app) as port:
        status, _, raw, _ = post_chunked(port, f"{CALLBACK}/callbackAfterUserOnlineCommand",
                                         {"Content-Type": "application/json"}, body, chunk=1000)
    assert status == 200 and json.loads(raw) == CONTINUE
    assert inbox_rows(store) == 1


def test_callback_cut_off_mid_body_is_answered_and_not_stored(app, store):
    body = json.dumps({"callbackCommand": "callbackAfterUserOnlineCommand", "userID": "u1", "platformID": 1,
                       "seq": 7}).encode()
    head = (f"POST {CALLBACK}/callbackAfterUserOnlineCommand HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body) + 100}\r\n\r\n").encode()
    with served(app) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head + body)
        conn.shutdown(socket.SHUT_WR)  # the sender is gone before the rest of its body
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    # serve's engine hands the app whole requests only: this one is dropped with its connection
    assert answer == b""
    assert inbox_rows(store) == 0


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_callback_url_answers_only_post(app, store, method):
    body = json.dumps({"callbackCommand": "callbackAfterUserOnlineCommand", "userID": "u1", "platformID": 1,
                       "seq": 7}).encode()
    response = app.test_client().open(f"{CALLBACK}/callbackAfterUserOnlineCommand", method=method, data=body)
    assert response.status_code == 404 and response.mimetype == "application/problem+json"
    assert inbox_rows(store) == 0


# -- strict JSON ------------------------------------------------------------------------


def _data_json(data_text: str) -> bytes:
    return ('{"type": "profile.updated", "version": 1, "to": {"users": ["u1"]}, "data": ' + data_text + "}").encode()


@pytest.mark.parametrize("raw, status, fragment", [
    (_data_json('{"fields": ["nickname"], "deep": ' + "[" * 70 + "]" * 70 + "}"), 400, "nesting deeper than 64"),
    (_data_json("[" * 30_000 + "]" * 30_000), 400, "nesting deeper than 64"),
    (b'{"a": ' * 9_000 + b"1" + b"}" * 9_000, 400, "nesting deeper than 64"),
    (_data_json('{"fields": ["nickname"], "n": 9007199254740993}'), 422, "out of range"),
    (_data_json('{"fields": ["nickname"], "n": -9007199254740993}'), 422, "out of range"),
    (_data_json('{"fields": ["nickname"], "n": ' + "9" * 5000 + "}"), 422, "out of range"),
    (_data_json('{"fields": ["nickname"], "n": 1e400}'), 422, "out of range"),
    (_data_json('{"fields": ["nickname"], "n": -1e400}'), 422, "out of range"),
    (b'{"type": "profile.updated", "version": 1e400, "to": {"users": ["u1"]}, "data": {}}', 422, "out of range"),
    (_data_json('{"fields": ["nickname"], "fields": ["email"]}'), 400, "duplicate key 'fields'"),
    (b'{"type": "profile.updated", "version": 1, "version": 2, "to": {"users": ["u1"]}, "data": {}}', 400,
     "duplicate key"),
    (_data_json('{"fields": ["x"]}').replace(b'"x"', b'"\xff"'), 400, "UTF-8"),
    (_data_json('{"fields": ["x"]}').replace(b'"x"', b'"\xc0\xaf"'), 400, "UTF-8"),  # overlong "/"
    (_data_json('{"fields": ["x"]}').replace(b'"x"', b'"\xed\xa0\x80"'), 400, "UTF-8"),  # encoded surrogate
    (_data_json('{"fields": ["x"]}').replace(b'"x"', b'"\xe2\x82"'), 400, "UTF-8"),  # truncated sequence
    (_data_json('{"fields": ["\\ud800"]}'), 422, "unpaired surrogate"),
    (_data_json('{"fields": ["nickname"], "n": NaN}'), 400, "NaN is not valid JSON"),
    (_data_json('{"fields": ["nickname"], "n": Infinity}'), 400, "Infinity is not valid JSON"),
    (_data_json('{"fields": ["nickname"], "n": -Infinity}'), 400, "-Infinity is not valid JSON"),
    (b"\xef\xbb\xbf" + _data_json('{"fields": ["nickname"]}'), 400, "not valid JSON"),  # a BOM
], ids=["depth70-in-data", "depth30000", "objects-depth10000", "2^53+1", "-(2^53+1)", "5000-digits",
        "1e400", "-1e400", "version-1e400", "duplicate-in-data", "duplicate-in-envelope", "utf8-ff",
        "utf8-overlong", "utf8-surrogate", "utf8-truncated", "escaped-lone-surrogate", "nan", "infinity",
        "minus-infinity", "bom"])
def test_bad_json_is_a_clear_4xx_and_stores_nothing(signed, store, raw, status, fragment):
    assert len(raw) <= LIMIT
    body = problem_of(signed.post(raw), status)
    assert fragment in body["detail"] + json.dumps(body.get("errors", []))
    assert rows(store) == 0


def test_out_of_range_numbers_name_where_they_are(signed):
    body = problem_of(signed.post(_data_json('{"fields": ["nickname"], "a": [1, 1e999, 2]}')), 422)
    assert [e["path"] for e in body["errors"]] == ["/data/a/1"]


def test_integral_floats_are_stored_as_integers(signed, store):
    # JSON Schema's "integer" admits 1.0: it must not reach the envelope apps receive as "v": 1.0
    answer = signed.post(_data_json('{"fields": ["nickname"]}').replace(b'"version": 1', b'"version": 1.0'))
    assert answer.status_code == 202
    envelope = json.loads(store._read("SELECT envelope FROM messages")[0][0])
    assert envelope["v"] == 1 and isinstance(envelope["v"], int)


# -- content type -------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
    "application/json; charset=latin-1", "application/jsonp", "application/json-patch+json", "",
])
def test_not_json_content_type_is_415_and_stores_nothing(signed, store, content_type):
    response = signed.post(message(), headers={"Content-Type": content_type})
    assert "application/json" in problem_of(response, 415)["detail"]
    assert rows(store) == 0


@pytest.mark.parametrize("content_type", [
    "application/json; charset=UTF-8", 'Application/JSON;charset="utf-8"', "application/json; charset=utf-8; x=y",
])
def test_json_content_type_spellings_are_accepted(signed, content_type):
    assert signed.post(message(), headers={"Content-Type": content_type}).status_code == 202


# -- ids, keys and patterns: "$" must not accept a trailing newline -------------------------------


@pytest.mark.parametrize("change", [
    {"to": {"users": ["u1\n"]}}, {"to": {"groups": ["g1\n"]}}, {"to": {"users": ["u1\r"]}},
    {"to": {"users": ["u1\u2028"]}}, {"to": {"users": ["\tu1"]}}, {"idempotency_key": "key\n"},
    {"collapse_key": "profile:u1\n"}, {"idempotency_key": "key\n", "to": {"users": ["u1\n"]}},
], ids=["user", "group", "cr", "line-separator", "tab", "idempotency-key", "collapse-key", "both"])
def test_trailing_newlines_in_ids_and_keys_are_422(signed, store, change):
    body = problem_of(signed.post(message(**change)), 422)
    assert body["errors"], body
    assert rows(store) == 0


def test_schema_patterns_anchor_at_the_very_end(signed, store):
    order = {"order_id": "A1", "status": "paid", "updated_at": "2026-11-26T12:00:00Z",
             "amount": {"value": "12.50", "currency": "EUR\n"}}
    body = problem_of(signed.post(message(type="order.status_changed", data=order)), 422)
    assert [e["path"] for e in body["errors"]] == ["/data/amount/currency"]
    order["amount"]["currency"] = "EUR"
    assert signed.post(message(type="order.status_changed", data=order)).status_code == 202
    assert rows(store) == 1


@pytest.mark.parametrize("pattern, text, matches", [
    (r"^\d+$", "123", True), (r"^\d+$", "١٢٣", False),  # Arabic-Indic digits are no \d in JavaScript
    (r"^\w+$", "a_1", True), (r"^\w+$", "é", False), (r"\bfoo\b", "éfoo", True),
    (r"^\s$", "\u00a0", True), (r"^\s$", "\ufeff", True), (r"^\S$", "\u3000", False), (r"^[\s\d]+$", " 1\u2028", True),
])
def test_schema_patterns_mean_what_they_mean_in_javascript(pattern, text, matches):
    validator = BoundedValidator({"type": "string", "pattern": pattern})
    assert validator.is_valid(text) is matches


# -- headers ---------------------------------------------------------------------------------

ALLOWED_RESPONSE_HEADERS = {"server", "date", "content-type", "content-length", "connection", "deprecation",
                            "retry-after"}


@pytest.mark.parametrize("header, value", [
    ("Idempotency-Key", "k\r\nSet-Cookie: evil=1"), ("Idempotency-Key", "k\nX-Injected: 1"),
    ("Idempotency-Key", "k\x00"), ("Idempotency-Key", "k\x7f"), ("Idempotency-Key", "ké"),
    ("Idempotency-Key", "k" * 201), ("X-Biz-Client", "crm\r\nSet-Cookie: evil=1"), ("X-Biz-Client", "crm\n"),
])
def test_header_injection_is_4xx_and_not_reflected(signed, store, clock, header, value):
    raw = json.dumps(message()).encode()
    headers = signed_headers(clock, raw, idempotency_key=value if header == "Idempotency-Key" else None)
    headers.pop("Idempotency-Key", None)  # sent below, past werkzeug's own header checks
    environ = {f"HTTP_{header.upper().replace('-', '_')}": value}
    response = signed.client.post("/v1/messages", data=raw, headers=headers, environ_overrides=environ)
    expected = 401 if header == "X-Biz-Client" else 422
    problem_of(response, expected)
    assert {name.lower() for name in response.headers.keys()} <= ALLOWED_RESPONSE_HEADERS
    assert rows(store) == 0


def test_folded_and_split_headers_over_http_are_4xx_and_not_reflected(app, clock, store):
    raw = json.dumps(message()).encode()
    signed_ = signed_headers(clock, raw)
    base = (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nX-Biz-Signature: %s\r\n" % (len(raw), signed_["X-Biz-Signature"].encode()))
    attempts = [
        (b"X-Biz-Client: crm\r\n Set-Cookie: evil=1\r\n", 401),  # obs-fold: joined into the value
        # the signature does not cover these keys: refused before they are read
        (b"X-Biz-Client: crm\r\nIdempotency-Key: k\r\n Set-Cookie: evil=1\r\n", 401),
        (b"X-Biz-Client: crm\r\nIdempotency-Key: k\x00x\r\n", 401),
    ]
    with served(app) as port:
        for extra, status in attempts:
            got, head, body = post_raw(port, base + extra, raw)
            assert got in (status, 400), body  # serve's engine refuses a folded or NUL header itself: 400
            assert b"evil" not in head and b"Set-Cookie" not in head
            assert json.loads(body)["status"] == got
    assert rows(store) == 0


def test_a_request_target_beyond_latin_1_is_read_not_a_500():
    # WSGI promises latin-1 text; a server that decoded UTF-8 itself must not make signing crash
    assert path_and_query({"RAW_URI": "/v1/messages/\u4e2d?a=1"}) == "/v1/messages/\u4e2d?a=1"
    assert path_and_query({"RAW_URI": "/v1/messages/\xe4\xb8\xad"}) == "/v1/messages/\u4e2d"


# -- recipients cap --------------------------------------------------------------------------


def test_recipients_over_the_cap_are_422_and_repeats_count_once(signed, store, config):
    cap = config.server.max_recipients
    over = problem_of(signed.post(message(to={"users": [f"u{i}" for i in range(cap + 1)]})), 422)
    assert over["errors"] == [{"path": "/to/users", "message": f"at most {cap} unique ids"}]
    assert rows(store) == 0
    repeated = [f"u{i % cap}" for i in range(cap * 20)]  # 20 times over the cap, but only `cap` unique
    assert signed.post(message(to={"users": repeated})).get_json()["recipients"] == cap
    assert rows(store, "recipients") == cap


def test_many_bad_ids_answer_a_bounded_list(signed, store):
    body = problem_of(signed.post(message(to={"users": ["ok"] + [" x"] * 10_000})), 422)
    assert 1 <= len(body["errors"]) <= 50
    assert rows(store) == 0


# -- costly schemas: bounded at load and at validation ----------------------------------------------


def catalog_with(tmp_path: Path, schema_properties: dict, example: dict) -> Path:
    """The shipped schemas plus ``demo.costly`` v1 with *schema_properties*."""
    root = tmp_path / "schemas"
    shutil.copytree(REPO / "schemas", root)
    folder = root / "demo.costly"
    folder.mkdir()
    (folder / "type.toml").write_text('mode = "notification"\n')
    (folder / "v1.json").write_text(json.dumps({
        "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
        "properties": schema_properties, "examples": [example]}))
    return root


@pytest.mark.parametrize("pattern", [r"^(a+)+$", r"^(\w+\s?)*$", r"^(a|a)*$", r"^(\d+(\.\d+)?)+$", r"(.)\1"])
def test_patterns_that_backtrack_exponentially_are_refused_at_load(tmp_path, pattern):
    root = catalog_with(tmp_path, {"s": {"type": "string", "pattern": pattern}}, {"s": "a"})
    with pytest.raises(ConfigError) as refused:
        Catalog.load(root)
    assert "demo.costly" in str(refused.value) and "/properties/s/pattern" in str(refused.value)


def test_pattern_property_names_are_checked_at_load(tmp_path):
    root = catalog_with(tmp_path, {}, {})
    schema = json.loads((root / "demo.costly" / "v1.json").read_text())
    schema["patternProperties"] = {"^(x+x+)+y$": {}}
    (root / "demo.costly" / "v1.json").write_text(json.dumps(schema))
    with pytest.raises(ConfigError, match="patternProperties"):
        Catalog.load(root)


@pytest.mark.parametrize("pattern, degree", [
    (r"^[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$", 1), (r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$", 1),
    (r"^[^@]+@[^@]+$", 1), (r"^.*foo$", 1), ("[a-z]+", 1), (r"^a*a*$", 2), (r"\s+$", 2), ("a.*b", 2),
    (r"x.*y.*z", 3),
])
def test_pattern_degree_bounds_the_matching_time(pattern, degree):
    assert pattern_degree(pattern) == degree
    if degree == 1:  # linear: long runs that nearly match, then fail, take milliseconds
        for fill in ("a", "x", " ", "1.", "a.", "xy", "@a", "a@"):
            started = time.perf_counter()
            re.search(pattern, fill * (100_000 // len(fill)) + "!")
            assert time.perf_counter() - started < 0.2, fill


@pytest.fixture
def costly_app(tmp_path, clock):
    """An app whose catalogue has demo.costly with a quadratic pattern, a maxLength'd one and uniqueItems."""
    root = catalog_with(tmp_path, {
        "csv": {"type": "string", "pattern": "^.*,.*x$"},
        "short": {"type": "string", "pattern": "^.*,.*x$", "maxLength": 100},
        "items": {"type": "array", "uniqueItems": True},
    }, {"csv": "a,x"})
    app = create_app(load_config(write_config(tmp_path, {"schemas": {"dir": str(root)},
                                                         "server": {"max_body_bytes": 1 << 20}})), clock=clock)
    yield Signed(app.test_client(), clock), app.extensions["bizplugin"].store
    app.extensions["bizplugin"].close()


def _timed_post(client: Signed, data: dict) -> tuple[Any, float]:
    started = time.perf_counter()
    response = client.post(message(type="demo.costly", data=data), as_client="ops")
    return response, time.perf_counter() - started


def test_costly_pattern_over_its_budget_is_422_quickly(costly_app):
    client, store = costly_app
    text = "," * 200_000  # ~11 s of backtracking for "^.*,.*x$" if matched
    assert len(text) ** 2 > VALIDATION_BUDGET
    response, took = _timed_post(client, {"csv": text})
    body = problem_of(response, 422)
    assert body["errors"][0]["path"] == "/data/csv" and "too long to check" in body["errors"][0]["message"]
    assert took < 2.0 and rows(store) == 0
    assert client.post(message(type="demo.costly", data={"csv": "a,b,x"}), as_client="ops").status_code == 202


def test_pattern_is_not_matched_past_max_length(costly_app):
    client, store = costly_app
    response, took = _timed_post(client, {"short": "," * 200_000})
    errors = problem_of(response, 422)["errors"]
    assert [e["path"] for e in errors] == ["/data/short"]  # maxLength only: the pattern never ran
    assert errors[0]["message"].endswith("is too long") and len(errors[0]["message"]) <= 300
    assert took < 2.0 and rows(store) == 0


def test_unique_items_over_many_objects_is_linear(costly_app):
    client, store = costly_app
    items: list[Any] = [{"n": i} for i in range(40_000)]  # jsonschema's own check compares every pair
    response, took = _timed_post(client, {"items": items})
    assert response.status_code == 202 and took < 3.0
    items.append({"n": 7.0})  # equal to {"n": 7} in JSON Schema
    response, took = _timed_post(client, {"items": items})
    assert problem_of(response, 422)["errors"] == [
        {"path": "/data/items", "message": "has non-unique elements (item 40000 repeats item 7)"}]
    assert took < 3.0 and rows(store) == 1


def test_unique_items_tells_true_from_1_and_objects_by_content(costly_app):
    client, _ = costly_app
    assert client.post(message(type="demo.costly", data={"items": [1, True, "1", [1], {"a": 1}, {"a": True}]}),
                       as_client="ops").status_code == 202
    assert client.post(message(type="demo.costly", data={"items": [{"a": 1, "b": 2}, {"b": 2, "a": 1}]}),
                       as_client="ops").status_code == 422


# -- replayed signatures -----------------------------------------------------------------------


def _respellings(token: str) -> list[str]:
    """Spellings of the same signature that itsdangerous decodes to the same bytes."""
    value, timestamp, signature = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(signature[-1])
    # 32 bytes fill 42 characters and 4 bits of the 43rd: its 2 low bits are ignored
    trailing = [signature[:-1] + alphabet[last ^ bits] for bits in (1, 2, 3)]
    return [f"{value}.{timestamp}.{s}" for s in [signature + "=", signature + "==", *trailing]]


def test_replayed_signature_in_any_base64_spelling_is_answered_like_the_first(signed, store, clock):
    raw = json.dumps(message()).encode()
    headers = signed_headers(clock, raw)
    first = signed.client.post("/v1/messages", data=raw, headers=headers)
    assert first.status_code == 202
    for token in _respellings(headers["X-Biz-Signature"]):
        again = signed.client.post("/v1/messages", data=raw, headers={**headers, "X-Biz-Signature": token})
        assert (again.status_code, again.get_json()) == (202, first.get_json()), token
    assert rows(store) == 1 and rows(store, "recipients") == 2


def test_a_respelled_timestamp_is_not_the_same_signature(signed, store, clock):
    raw = json.dumps(message()).encode()
    headers = signed_headers(clock, raw)
    value, timestamp, signature = headers["X-Biz-Signature"].split(".")
    for spelling in (timestamp + "=", "AA" + timestamp):  # decode to the same time, but were not signed
        token = f"{value}.{spelling}.{signature}"
        problem_of(signed.client.post("/v1/messages", data=raw, headers={**headers, "X-Biz-Signature": token}),
                   401)
    assert rows(store) == 0


# -- storage faults: 503, never a 202 without a stored row ----------------------------------------


def test_a_write_the_database_refuses_is_503_and_leaves_no_row(signed, store):
    db = sqlite3.connect(store.path)
    db.execute("CREATE TRIGGER full BEFORE INSERT ON recipients BEGIN"
               " SELECT RAISE(ABORT, 'database or disk is full'); END")
    db.commit()
    body = problem_of(signed.post(message()), 503)
    assert "disk is full" in body["detail"]
    assert rows(store) == 0  # the message row written before the recipients was rolled back with them
    db.execute("DROP TRIGGER full")
    db.commit()
    db.close()
    assert signed.post(message()).status_code == 202 and rows(store) == 1


def _serve_with_file_size_limit(config_path: Path, max_file_bytes: int) -> tuple[subprocess.Popen, str]:
    """``openim-bizplugin serve`` where no file may grow past *max_file_bytes*: a full disk."""
    from e2e_support import child_env, command

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), not the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    process = subprocess.Popen([*command(), "serve", "-c", str(config_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True, env=child_env(),
                               preexec_fn=limit)
    line = process.stdout.readline()  # "listening on http://127.0.0.1:PORT", or EOF if it died
    if not line.startswith("listening on "):
        process.kill()
        raise AssertionError(f"serve did not start (exit {process.wait(10)}): {line!r}")
    return process, line.removeprefix("listening on ").strip()


def test_a_full_disk_is_503_and_every_202_has_its_row(tmp_path):
    from e2e_support import CRM_SECRET, config_tables, signed_get, signed_post, write_tables
    tables = config_tables(tmp_path / "bizplugin.db", max_body_bytes=LIMIT)
    config_path = write_tables(tmp_path / "config.toml", tables)
    process, url = _serve_with_file_size_limit(config_path, 512 * 1024)
    accepted, statuses = [], []
    try:
        for index in range(60):  # 500 long ids a message: the WAL passes 512 KiB well before the end
            users = [f"user-{index}-{i}-".ljust(100, "x") for i in range(500)]
            body = json.dumps(message(to={"users": users})).encode()
            response = signed_post(url, body, secret=CRM_SECRET)
            statuses.append(response.status_code)
            if response.status_code == 202:
                accepted.append(response.json()["id"])
            else:
                problem(503, response.status_code, response.headers["Content-Type"], response.content)
        assert 503 in statuses and accepted, statuses
        for message_id in accepted:  # nothing answered 202 is missing
            assert signed_get(url, f"/v1/messages/{message_id}").status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        if process.poll() is None:
            process.kill()
        process.stdout.close()
    db = sqlite3.connect(tmp_path / "bizplugin.db")
    stored = {row[0] for row in db.execute("SELECT id FROM messages")}
    db.close()
    assert set(accepted) <= stored


def test_redis_gone_is_503(tmp_path, clock):
    from redis_server import RedisServer
    server = RedisServer(tmp_path).start()
    try:
        app = create_app(load_config(write_config(tmp_path, {"storage": {"url": server.url}})), clock=clock)
        client = Signed(app.test_client(), clock)
        assert client.post(message(idempotency_key="before")).status_code == 202
        server.stop()
        body = problem_of(client.post(message(idempotency_key="after")), 503)
        assert "redis" in body["detail"]
        app.extensions["bizplugin"].close()
    finally:
        server.stop()
