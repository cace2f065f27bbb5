"""JSON log lines: their shape, the redaction net, and a whole flow that leaks nothing.

The flow test runs the app on a real loopback HTTP server (with ``serve``'s
request handler, so access lines are included) against the fake OpenIM and a
subscriber, captures every record at DEBUG through :func:`logs.setup`, and
checks that no secret, token or signature is in any line -- neither in what the
call sites logged nor in the formatted lines -- and that one grep for a message
id follows it from acceptance through OpenIM to the callbacks.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from standardwebhooks.webhooks import Webhook
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from e2e_support import (CALLBACK_TOKEN, SECRETS, config_tables, running_server, signed_get, signed_post,
                         write_config, write_tables)
from openim_bizplugin import logs
from openim_bizplugin.web.app import create_app
from openim_bizplugin.config import load_config
from openim_bizplugin.web.server import serving  # serve's engine: access lines through logging
from openim_bizplugin.signing import signature_headers
from openim_bizplugin.testing import FakeOpenIM

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SUBSCRIBER_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
UI_TOKEN = "operator-token-0123456789abcdef"
JWT = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJVc2VySUQiOiJpbUFkbWluIn0.c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWc"


def record(msg: str, *args: Any, level: int = logging.INFO, exc_info: Any = None, **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("openim_bizplugin.test", level, __file__, 1, msg, args, exc_info)
    rec.__dict__.update(extra)
    return rec


# -- the line ---------------------------------------------------------------------------------
def test_a_line_is_one_json_object_with_time_level_logger_event_and_fields():
    formatter = logs.JsonFormatter()
    rec = record("message %s\nsent", "m1", event="delivery.outcome", message_id="m1", attempt=2,
                 recipients=("u1", "u2"), skipped=None)
    line = formatter.format(rec)
    assert "\n" not in line
    entry = json.loads(line)
    assert list(entry)[:5] == ["ts", "level", "logger", "event", "msg"]
    assert RFC3339_MS.match(entry["ts"]) and entry["ts"] == logs.rfc3339(rec.created)
    assert (entry["level"], entry["logger"], entry["msg"]) == ("INFO", "openim_bizplugin.test", "message m1\nsent")
    assert (entry["message_id"], entry["attempt"], entry["recipients"], entry["skipped"]) == ("m1", 2, ["u1", "u2"],
                                                                                              None)
    assert logs.rfc3339(0.0105) == "1970-01-01T00:00:00.010Z"


def test_an_exception_is_one_field_of_the_same_line():
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("failed", level=logging.ERROR, exc_info=sys.exc_info())
    entry = json.loads(logs.JsonFormatter().format(rec))
    assert entry["level"] == "ERROR" and "ValueError: boom" in entry["exc"] and "Traceback" in entry["exc"]


# -- the redaction net ------------------------------------------------------------------------------
def test_known_secrets_are_masked_in_the_message_the_fields_and_the_traceback():
    formatter = logs.JsonFormatter(["client-secret-0123456789", "abc"])  # too short to mask: ordinary text
    try:
        raise RuntimeError("client-secret-0123456789 leaked")
    except RuntimeError:
        rec = record("secret %s in abc", "client-secret-0123456789", exc_info=sys.exc_info(),
                     detail={"nested": ["client-secret-0123456789"], "api_token": "x"},
                     note="xclient-secret-0123456789x")
    line = formatter.format(rec)
    entry = json.loads(line)
    assert "client-secret-0123456789" not in line
    assert entry["msg"] == "secret *** in abc"
    assert entry["detail"] == {"nested": ["***"], "api_token": "***"} and entry["note"] == "x***x"
    assert "RuntimeError: *** leaked" in entry["exc"]


def test_fields_named_like_secrets_are_masked_whatever_they_hold():
    entry = json.loads(logs.JsonFormatter().format(record(
        "x", token="t", admin_token=1, callback_secret=None, x_biz_signature="s", Password="p", cookie="c",
        authorization="a", operation_id="biz-abc-0-1-ff")))
    assert {k: entry[k] for k in ("token", "admin_token", "callback_secret", "x_biz_signature", "Password",
                                  "cookie", "authorization")} == dict.fromkeys(
        ("token", "admin_token", "callback_secret", "x_biz_signature", "Password", "cookie", "authorization"), "***")
    assert entry["operation_id"] == "biz-abc-0-1-ff"


def test_secret_shaped_strings_are_masked_and_ids_are_not():
    signature = signature_headers("crm", "crm-secret-00000000001", "POST", "/v1/messages", b"{}")["X-Biz-Signature"]
    cookie = "eyJjc3JmIjoiYWJjIn0.Z0Fz8w.2bY1xSZqgZTvY7h4w6BbXl6cQ9Q"
    webhook_signature = "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4="
    keep = ("message 0193a1b2c3d4e5f60718293a4b5c6d7e user u1: sent (operationID "
            "biz-0193a1b2c3d4e5f60718293a4b5c6d7e-0-1795694400000-a1b2c30, attempt 1) "
            "openim_bizplugin.callbacks.processing.after_send_single /msg/send_msg 3.8.3 example.com")
    text = f"{keep} {signature} {JWT} {cookie} {SUBSCRIBER_SECRET} {webhook_signature}"
    masked = logs.Redactor().text(text)
    assert masked == f"{keep} *** *** *** *** ***"


def test_config_secrets_are_every_secret_of_the_config(tmp_path):
    config = load_config(_flow_config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9/events"))
    found = set(logs.config_secrets(config))
    assert {SECRETS["crm"], SECRETS["ops"], "openIM123", CALLBACK_TOKEN, SUBSCRIBER_SECRET,
            SUBSCRIBER_SECRET.removeprefix("whsec_"), UI_TOKEN} <= found


def test_setup_replaces_its_own_handler_and_no_other():
    root = logging.getLogger()
    level, foreign = root.level, logging.NullHandler()
    root.addHandler(foreign)
    first = second = None
    try:
        first = logs.setup(logging.DEBUG, stream=io.StringIO())
        second = logs.setup("WARNING", stream=io.StringIO())
        assert first not in root.handlers and second in root.handlers and foreign in root.handlers
        assert root.level == logging.WARNING
        logging.getLogger("openim_bizplugin.test").warning("hello %s", "there", extra={"event": "x"})
        assert json.loads(second.stream.getvalue())["msg"] == "hello there"
    finally:
        for handler in (first, second, foreign):
            root.removeHandler(handler)
        root.setLevel(level)


# -- the whole flow -----------------------------------------------------------------------------------
class _Quiet(WSGIRequestHandler):
    def log_request(self, *args: Any) -> None:  # the receiver is the test's, not the sidecar's: no access lines
        pass


class Subscriber:
    """A loopback receiver keeping every signature header it was sent."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.signatures: list[str] = []
        self._hook = Webhook(SUBSCRIBER_SECRET)
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True, request_handler=_Quiet)
        self.url = f"http://127.0.0.1:{self._server.port}/events?auth=query-credential-0123"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _app(self, environ: dict, start_response: Any) -> Any:
        request = Request(environ)
        self.signatures.append(request.headers["webhook-signature"])
        self.events.append(self._hook.verify(request.get_data(), dict(request.headers)))
        return Response("", status=204)(environ, start_response)

    def close(self) -> None:
        self._server.shutdown()


class Records(logging.Handler):
    """Keeps the records as logged, before any formatting."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _flow_config(tmp_path: Path, openim_url: str, subscriber_url: str) -> Path:
    tables = config_tables(tmp_path / "bizplugin.db")
    tables["openim"]["api_url"] = openim_url
    tables["ui"] = {"token": UI_TOKEN}
    path = write_tables(tmp_path / "config.toml", tables)
    with path.open("a") as fh:
        fh.write(f'[[subscribers]]\nurl = "{subscriber_url}"\nsecret = "{SUBSCRIBER_SECRET}"\n'
                 'events = ["message.sent", "receipt.received"]\n')
    return path


@pytest.fixture
def captured() -> Iterator[tuple[io.StringIO, Records]]:
    root = logging.getLogger()
    level, raw = root.level, Records()
    lines = io.StringIO()
    root.addHandler(raw)
    try:
        yield lines, raw
    finally:
        for handler in [h for h in root.handlers if h is raw or getattr(h, "stream", None) is lines]:
            root.removeHandler(handler)
        root.setLevel(level)


def test_a_whole_flow_logs_no_secret_and_one_grep_follows_the_message(tmp_path, captured):
    lines, raw = captured
    sent_signatures: list[str] = []
    with FakeOpenIM(users=["u1", "imAdmin"], online=["u1"]) as fake:
        subscriber = Subscriber()
        config = load_config(_flow_config(tmp_path, fake.url, subscriber.url))
        logs.setup(logging.DEBUG, config, stream=lines)
        app = create_app(config)
        services = app.extensions["bizplugin"]
        services.subscribers.step()  # a new subscriber starts after the newest event: before ours
        engine = contextlib.ExitStack()
        base = f"http://127.0.0.1:{engine.enter_context(serving(app))}"
        try:
            # 1. a signed request is accepted
            body = json.dumps({"type": "action.required", "version": 1, "to": {"users": ["u1"]}, "data": {
                "action": "verify_identity", "title": "Verify", "deep_link": "app://verify"}}).encode()
            headers = signature_headers("ops", SECRETS["ops"], "POST", "/v1/messages", body)
            sent_signatures.append(headers["X-Biz-Signature"])
            answer = requests.post(base + "/v1/messages", data=body, timeout=10,
                                   headers={**headers, "Content-Type": "application/json"})
            assert answer.status_code == 202, answer.text
            message_id = answer.json()["id"]

            # 2. delivered through OpenIM, whose admin token expires first: refreshed once
            first_token = services.openim.admin_token()
            fake.expire_tokens()
            assert services.engine.step() == 1
            [delivery] = fake.deliveries_to(user="u1")
            assert delivery.operation_id.endswith("-retry")

            # 3. OpenIM's callbacks: the send confirmed, then the app's receipt, to the URL with the token
            callback_url = f"{base}/openim/callback/{CALLBACK_TOKEN}"
            receipt = fake.receipt_message("u1", "imAdmin", {"id": message_id, "status": "done"})
            for payload in (fake.after_send_single_msg(delivery), fake.after_send_single_msg(receipt)):
                status, _ = fake.post_callback(callback_url, "callbackAfterSendSingleMsgCommand", payload)
                assert status == 200
            assert services.callbacks.step() == 2

            # 4. the subscriber gets its signed events
            services.subscribers.step()
            assert [e["type"] for e in subscriber.events] == ["message.sent", "receipt.received"]
            status = signed_get(base, f"/v1/messages/{message_id}", client="ops").json()
            assert status["recipients"][0]["status"] == "acknowledged"
        finally:
            engine.close()
            services.close()
            subscriber.close()
        tokens = {call.token for call in fake.calls if call.token}

    assert first_token in tokens and len(tokens) == 2  # the expired one and its replacement
    secrets = {SECRETS["ops"], SECRETS["crm"], "openIM123", CALLBACK_TOKEN, SUBSCRIBER_SECRET,
               SUBSCRIBER_SECRET.removeprefix("whsec_"), UI_TOKEN, "query-credential-0123",
               *sent_signatures, *subscriber.signatures, *tokens}
    assert len(subscriber.signatures) == 2

    # what the call sites logged, before the formatter's net
    logged = [f"{r.getMessage()} {({k: v for k, v in vars(r).items() if k not in ('msg', 'args')})!r}"
              for r in raw.records]
    assert [(s[:12], text) for text in logged for s in secrets if s in text] == []

    # what reached the stream: JSON lines, none holding a secret
    text = lines.getvalue()
    assert [s[:12] for s in secrets if s in text] == []
    entries = [json.loads(line) for line in text.splitlines()]
    assert len(entries) == len(raw.records) > 15
    assert all(RFC3339_MS.match(e["ts"]) and {"level", "logger", "msg"} <= set(e) for e in entries)

    # one grep for the message id: accepted, the OpenIM call with its operationID, the callbacks, the receipt
    found = [e for line, e in zip(text.splitlines(), entries) if message_id in line]
    events = {e.get("event") for e in found}
    assert {"message.accepted", "openim.call", "delivery.outcome", "callback.received", "callback.confirmed",
            "receipt.received"} <= events
    [call] = [e for e in found if e.get("event") == "openim.call" and e["err_code"] == 0]
    assert (call["endpoint"], call["operation_id"]) == ("/msg/send_msg", delivery.operation_id)
    confirmed = next(e for e in found if e.get("event") == "callback.confirmed")
    assert (confirmed["callback"], confirmed["message_id"], confirmed["operation_id"]) == (
        "callbackAfterSendSingleMsgCommand", message_id, delivery.operation_id)
    # ... and at INFO, what production logs by default, still from the request to the callback
    assert {"message.accepted", "delivery.outcome", "callback.confirmed", "receipt.received"} <= {
        e.get("event") for e in found if e["level"] != "DEBUG"}

    # the access lines, the callback token masked in the path
    paths = {e["path"] for e in entries if e.get("event") == "http.access"}
    assert "/openim/callback/***/callbackAfterSendSingleMsgCommand" in paths and f"/v1/messages/{message_id}" in paths


def test_serve_writes_json_lines_with_the_token_masked(tmp_path):
    with running_server(write_config(tmp_path)) as running:
        body = json.dumps({"type": "profile.updated", "version": 1, "to": {"users": ["u1"]},
                           "data": {"fields": ["nickname"]}}).encode()
        answer = signed_post(running.url, body)
        assert answer.status_code == 202
        assert requests.post(f"{running.url}/openim/callback/{CALLBACK_TOKEN}/callbackAfterUserOnlineCommand",
                             data=b"{}", timeout=10).status_code == 200
        assert signed_post(running.url, body.replace(b'"u1"', b'" u1"')).status_code == 422
    entries = [json.loads(line) for line in running.stderr().splitlines()]
    assert CALLBACK_TOKEN not in running.stderr() and SECRETS["crm"] not in running.stderr()
    [accepted] = [e for e in entries if e.get("event") == "message.accepted"]
    assert (accepted["message_id"], accepted["client"], accepted["level"]) == (answer.json()["id"], "crm", "INFO")
    # one line per request: the accepted message's own line, an access line for the others
    access = [(e["path"], e["status"]) for e in entries if e.get("event") == "http.access"]
    assert ("/openim/callback/***/callbackAfterUserOnlineCommand", 200) in access
    assert [status for path, status in access if path == "/v1/messages"] == [422]
    assert not [e for e in entries if e["level"] == "DEBUG"]  # info unless --log-level says otherwise
