"""A loopback fake OpenIM Server for integration tests.

:class:`FakeOpenIM` listens on 127.0.0.1 (a free port unless told otherwise)
and answers the REST endpoints openim-bizplugin uses the way OpenIM's
``openim-api`` does, read from its source (``../shared/OPENIM.md``): the
``{"errCode","errMsg","errDlt","data"}`` envelope, HTTP 200 for most errors
but 400 for gin bind failures, the ``operationID`` and ``token`` headers, HS256
admin tokens and their expiry, rotation and revocation, the validation order
and error texts of each endpoint, gzip when the client accepts it. Every
request is recorded (:attr:`FakeOpenIM.calls`), every message OpenIM accepted
too (:attr:`FakeOpenIM.delivered`). Faults are injected per endpoint and
consumed in order; :meth:`FakeOpenIM.post_callback` posts webhooks shaped
like OpenIM's, and :meth:`FakeOpenIM.after_hooks` posts them through OpenIM's
after-hook queue (2 workers, 100 slots, a caller blocked while it is full;
:mod:`.fake_hooks`); after :meth:`FakeOpenIM.fire_hooks` the fake fires them
itself for every message it accepts, as OpenIM's msg RPC and msgtransfer do.
``flavor="v3.8.3"`` reproduces the newest tag where it differs.

What each user's app received is modelled too (:mod:`.fake_apps`): apps
connect, go to the background and disconnect (:meth:`FakeOpenIM.connect`,
:meth:`~FakeOpenIM.set_background`, :meth:`~FakeOpenIM.disconnect`; the users
listed in ``online=`` are connected from the start, every other user is
offline, as a user whose app never connected is in OpenIM); a message
is pushed to connected apps (not to iOS apps in the background), stored when
its options say so, and synced when an app reconnects as openim-sdk-core
does; :meth:`FakeOpenIM.received_by` lists what an app's listeners raised.

Run your own integration tests against it::

    from openim_bizplugin.testing import FakeOpenIM

    def test_order_paid_reaches_the_app():
        with FakeOpenIM(users=["u1001"], groups={"g_ops": ["u1001"]}) as im:
            im.connect("u1001", platform_id=1)    # the user's iPhone app is connected
            im.fail_next("/msg/send_business_notification", err_code=1501)  # one expired token
            my_service.notify(openim_url=im.url, secret=im.secret, user="u1001")
            [sent] = im.deliveries_to(user="u1001")
            assert sent.key == "order.paid" and sent.reliability_level == 2
            assert im.received_by("u1001") == [sent]    # what the app's listener got

            im.refuse_connections()        # OpenIM down: connection refused on the same port
            im.accept_connections()        # ... and back

            im.change_secret("n3w")        # share.yml secret changed: old tokens 1505, get_admin_token 1002
            im.set_admin_user_ids(["ops"]) # imAdminUser.userIDs changed: get_admin_token 1001 for others

            receipt = im.receipt_message("u1001", "imAdmin", {"id": "m1", "status": "done"})
            status, reply = im.post_callback("http://127.0.0.1:8080/openim/callback/TOKEN",
                                             "callbackAfterSendSingleMsgCommand",
                                             im.after_send_single_msg(receipt))

A 429 from OpenIM's optional rate limiter is ``fail_next(endpoint,
err_code=429, http_status=429)``; a proxy's 502 is ``fail_next(endpoint,
http_status=502, body=b"502 Bad Gateway")``. A user who does not accept messages
(global receive option 1) is :meth:`FakeOpenIM.block_messages`. Not modelled:
friends, blacklists, mutes, per-conversation receive options, dismissed
groups, CORS, webhooks fired by OpenIM itself.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import hmac
import itertools
import json
import os
import socket
import socketserver
import sys
import threading
import time
import traceback
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests

from .fake_apps import Apps
from .fake_hooks import AfterHookQueue

__all__ = ["Call", "Delivery", "FakeOpenIM"]

FLAVORS = ("main", "v3.8.3")
ADMIN_PLATFORM_ID = 10
ROTATION_GRACE_SECONDS = 300      # main keeps a replaced admin token in a 5-minute temporary key
SEND_STATUS_TTL_SECONDS = 86400   # check_msg_is_send_success remembers an operationID for 24 h
PLATFORM_NAMES = {1: "IOS", 2: "Android", 3: "Windows", 4: "OSX", 5: "Web", 6: "MiniWeb", 7: "Linux",
                  8: "APad", 9: "IPad", 10: "Admin", 11: "HarmonyOS"}
ERROR_NAMES = {429: "too many requests, please try again later", 500: "ServerInternalError",
               1001: "ArgsError", 1002: "NoPermissionError", 1003: "DuplicateKeyError",
               1004: "RecordNotFoundError", 1101: "UserIDNotFoundError", 1203: "NotInGroupYetError",
               1204: "DismissedAlreadyError", 1501: "TokenExpiredError", 1502: "TokenInvalidError",
               1503: "TokenMalformedError", 1504: "TokenNotValidYetError", 1505: "TokenUnknownError",
               1506: "TokenKickedError", 1507: "TokenNotExistError", 90004: "NetworkError",
               90007: "DataError"}
SEND_MSG_CONTENT_TYPES = frozenset({101, 102, 103, 104, 105, 106, 110, 114, 118, 1400})
KEYED_CALLBACKS = frozenset({"callbackAfterSendSingleMsgCommand", "callbackAfterSendGroupMsgCommand",
                             "callbackAfterMsgSaveDBCommand"})
_TOKEN_WHITELIST = ("/auth/get_admin_token", "/auth/parse_token")
_JSON = "application/json"    # CorsHandler sets it before gin's c.JSON, so no "; charset=utf-8"
_NOT_FOUND = (404, b"404 page not found", "text/plain")
_NO_DATA = object()


@dataclass(frozen=True)
class Call:
    """One HTTP request the fake received (faults and 404s included)."""

    endpoint: str
    operation_id: str | None
    token: str | None
    body: Any
    at: float


@dataclass(frozen=True)
class Delivery:
    """One message OpenIM accepted, as its MsgData would hold it.

    ``endpoint`` is the API path, or ``"ws"`` for a client app's message
    (:meth:`FakeOpenIM.receipt_message`); ``key``/``data``/``reliability_level``
    are set for business notifications only.
    """

    endpoint: str
    session_type: int
    content_type: int
    send_id: str
    recv_id: str = ""
    group_id: str = ""
    content: dict[str, Any] = field(default_factory=dict)
    key: str | None = None
    data: str | None = None
    reliability_level: int | None = None
    operation_id: str = ""
    server_msg_id: str = ""
    client_msg_id: str = ""
    send_time: int = 0
    create_time: int = 0
    msg_from: int = 200
    sender_platform_id: int = 0
    sender_nickname: str = ""
    sender_face_url: str = ""
    status: int = 0
    ex: str = ""
    at_user_list: list[str] | None = None
    options: dict[str, bool] = field(default_factory=dict)
    offline_push_info: dict[str, Any] | None = None


class _OpenIMError(Exception):
    """An error answer: errCode, errMsg (the code's name unless given), errDlt, HTTP status."""

    def __init__(self, code: int, dlt: str = "", *, msg: str | None = None, http_status: int = 200) -> None:
        super().__init__(f"{code} {dlt}")
        self.code, self.dlt, self.http_status = code, dlt, http_status
        self.msg = ERROR_NAMES.get(code, "") if msg is None else msg


class _BindError(Exception):
    """A Go encoding/json error, worded like Go's."""


@dataclass(frozen=True)
class _Fault:
    kind: str                    # "fail" or "delay"
    seconds: float = 0.0
    after_processing: bool = False
    err_code: int | None = None
    err_msg: str = ""
    err_dlt: str = ""
    http_status: int = 200
    body: bytes | None = None


@dataclass
class _TokenState:
    user_id: str
    platform_id: int
    expired: bool = False
    revoked_at: float | None = None


@dataclass(frozen=True)
class _Req:
    path: str
    raw: bytes
    operation_id: str
    user_id: str | None


# ── Go-compatible JSON ────────────────────────────────────────────────────────
_GO_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                             "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _go_json(value: Any, *, sort_keys: bool = False) -> str:
    """encoding/json.Marshal: compact, HTML characters escaped (Go maps sort their keys)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys).translate(_GO_ESCAPES)


def _kind(value: Any) -> str:
    for kind, name in ((bool, "bool"), (int, "number"), (float, "number"), (str, "string"),
                       (list, "array"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null"


def _parse_body(raw: bytes, *, stream: bool) -> Any:
    """Decode a body: gin's BindJSON streams (first value only); a2r uses json.Unmarshal."""
    text = raw.decode("utf-8", "replace").strip()
    end = "unexpected EOF" if stream else "unexpected end of JSON input"
    if not text:
        raise _BindError("EOF" if stream else end)
    try:
        return json.JSONDecoder().raw_decode(text)[0] if stream else json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text):
            raise _BindError(end) from None
        raise _BindError(f"invalid character {text[exc.pos]!r} looking for beginning of value") from None


def _coerce(item: Any, go_type: str, where: str) -> Any:
    """One field of json.Unmarshal: null keeps the zero value, a type mismatch is an error."""
    if item is None:
        return {"string": "", "bool": False, "int32": 0, "int64": 0}.get(go_type)
    is_int = isinstance(item, int) and not isinstance(item, bool)
    ok = {"string": isinstance(item, str), "bool": isinstance(item, bool),
          "int32": is_int and -2**31 <= item < 2**31, "int64": is_int and -2**63 <= item < 2**63,
          "*int": is_int, "[]string": isinstance(item, list),
          "map[string]interface {}": isinstance(item, dict), "*sdkws.OfflinePushInfo": isinstance(item, dict)}
    if not ok[go_type]:
        shown = f"number {item!r}" if "int" in go_type and _kind(item) == "number" else _kind(item)
        raise _BindError(f"json: cannot unmarshal {shown} into Go struct field {where} of type "
                         + go_type.lstrip("*"))
    if go_type == "[]string":
        for element in item:
            if element is not None and not isinstance(element, str):
                raise _BindError(f"json: cannot unmarshal {_kind(element)} into Go struct field {where} "
                                 "of type string")
        return ["" if element is None else element for element in item]
    return item


def _bind(value: Any, struct: str, go_type: str, fields: Mapping[str, str]) -> dict[str, Any]:
    """json.Unmarshal into a Go struct: unknown keys ignored, names matched case-insensitively."""
    out = {name: _coerce(None, kind, "") for name, kind in fields.items()}
    if value is None:
        return out
    if not isinstance(value, dict):
        raise _BindError(f"json: cannot unmarshal {_kind(value)} into Go value of type {go_type}")
    folded, errors = {name.lower(): name for name in fields}, []
    for key, item in value.items():
        name = key if key in fields else folded.get(key.lower())
        if name is not None:
            try:
                out[name] = _coerce(item, fields[name], f"{struct}.{name}")
            except _BindError as exc:
                errors.append(exc)
    if errors:
        raise errors[0]
    return out


def _validation_text(failures: Sequence[tuple[str, str]]) -> str:
    """go-playground/validator's ValidationErrors.Error() for (namespace, tag) pairs."""
    return "\n".join(f"Key: '{ns}' Error:Field validation for '{ns.rsplit('.', 1)[-1]}' failed on the '{tag}' tag"
                     for ns, tag in failures)


def _gin_bind(raw: bytes, struct: str, go_type: str, fields: Mapping[str, str],
              validate: Callable[[dict[str, Any]], list[tuple[str, str]]], *, code: int = 1001) -> dict[str, Any]:
    """c.BindJSON: a decode or `binding` failure is HTTP 400 (the envelope follows it)."""
    try:
        req = _bind(_parse_body(raw, stream=True), struct, go_type, fields)
    except _BindError as exc:
        raise _OpenIMError(code, str(exc), http_status=400) from None
    failures = validate(req)
    if failures:
        raise _OpenIMError(code, _validation_text(failures), http_status=400)
    return req


def _a2r_bind(raw: bytes, go_type: str, fields: Mapping[str, str],
              check: Callable[[dict[str, Any]], str | None] = lambda req: None) -> dict[str, Any]:
    """a2r.Call: bad JSON is HTTP 200, 1001 with the decoder text as errMsg; then the proto Check()."""
    try:
        req = _bind(_parse_body(raw, stream=False), go_type.rsplit(".", 1)[-1], go_type, fields)
    except _BindError as exc:
        raise _OpenIMError(1001, msg=str(exc)) from None
    problem = check(req)
    if problem:
        raise _OpenIMError(1001, problem)
    return req


# ── message content (mapstructure.WeakDecode + validator) ─────────────────────
_ELEMS = {110: ("CustomElem", {"data": True, "description": False, "extension": False}),
          101: ("TextElem", {"content": True}), 118: ("MarkdownTextElem", {"content": True})}


def _go_v(value: Any) -> str:
    """fmt's %v for decoded JSON values."""
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{_go_v(value[k])}" for k in sorted(value)) + "]"
    if isinstance(value, list):
        return "[" + " ".join(_go_v(item) for item in value) + "]"
    return "<nil>" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _weak_string(value: Any, name: str) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        return format(Decimal(repr(value)), "f")
    go_type = "map[string]interface {}" if isinstance(value, dict) else "[]interface {}"
    raise _BindError(f"'{name}' expected type 'string', got unconvertible type '{go_type}', "
                     f"value: '{_go_v(value)}'")


def _check_content(content_type: int, content: Mapping[str, Any]) -> None:
    """Decode and validate like getSendMsgReq; failures are errCode 500 (not coded errors)."""
    struct, fields = _ELEMS.get(content_type, ("", {}))
    folded = {key.lower(): key for key in content}
    values, problems = {}, []
    for name in fields:
        try:
            values[name] = _weak_string(content.get(name, content.get(folded.get(name, ""))), name)
        except _BindError as exc:
            problems.append(f"* {exc}")
    if problems:
        raise _OpenIMError(500, f"{len(problems)} error(s) decoding:\n\n" + "\n".join(sorted(problems)))
    missing = [(f"{struct}.{name.capitalize()}", "required") for name, required in fields.items()
               if required and not values[name]]
    if missing:
        raise _OpenIMError(500, _validation_text(missing))


_SEND_MSG = {"sendID": "string", "groupID": "string", "senderNickname": "string", "senderFaceURL": "string",
             "senderPlatformID": "int32", "content": "map[string]interface {}", "contentType": "int32",
             "sessionType": "int32", "isOnlineOnly": "bool", "notOfflinePush": "bool", "sendTime": "int64",
             "offlinePushInfo": "*sdkws.OfflinePushInfo", "ex": "string"}
_SEND_MSG_REQ = {"recvID": "string", **_SEND_MSG}
_BATCH_REQ = {**_SEND_MSG, "isSendAll": "bool", "recvIDs": "[]string"}
_NOTIFICATION_MAIN = {"key": "string", "data": "string", "sendUserID": "string", "recvUserID": "string",
                      "recvGroupID": "string", "sendMsg": "bool", "reliabilityLevel": "*int"}
_NOTIFICATION_V383 = {"key": "string", "data": "string", "sendUserID": "string", "recvUserID": "string"}
_ANONYMOUS = "struct { Key string; Data string; ... }"


def _send_msg_failures(req: Mapping[str, Any], prefix: str) -> list[tuple[str, str]]:
    """`binding` tags of apistruct.SendMsg (required_if is OpenIM's own validator)."""
    ns, failures = f"{prefix}.SendMsg.", []
    if not req["sendID"]:
        failures.append((ns + "SendID", "required"))
    if req["sessionType"] in (2, 3) and not req["groupID"]:
        failures.append((ns + "GroupID", "required_if"))
    failures += [(ns + name, "required") for name, value in
                 (("Content", req["content"] is not None), ("ContentType", req["contentType"]),
                  ("SessionType", req["sessionType"])) if not value]
    return failures


def _send_msg_req_failures(req: Mapping[str, Any]) -> list[tuple[str, str]]:
    head = [("SendMsgReq.RecvID", "required_if")] if req["sessionType"] in (1, 4) and not req["recvID"] else []
    return head + _send_msg_failures(req, "SendMsgReq")


def _batch_failures(req: Mapping[str, Any]) -> list[tuple[str, str]]:
    tail = [("BatchSendMsgReq.RecvIDs", "required")] if req["recvIDs"] is None else []
    return _send_msg_failures(req, "BatchSendMsgReq") + tail


def _required(*names: str) -> Callable[[Mapping[str, Any]], list[tuple[str, str]]]:
    return lambda req: [(name[0].upper() + name[1:], "required") for name in names if not req[name]]


def _send_msg_options(body: Mapping[str, Any]) -> dict[str, bool]:
    """SetOptions of the API: only the flags given are written; a missing key means true."""
    options: dict[str, bool] = {}
    if body["isOnlineOnly"]:
        options.update(history=False, persistent=False, senderSync=False, conversationUpdate=False)
    if body["notOfflinePush"]:
        options["offlinePush"] = False
    return options


def _notification_options(send_msg: bool, level: int) -> dict[str, bool]:
    """config.GetOptionsByNotification: stored (history, persistent) only at reliability level 2."""
    return {"isNotNotification": False, "isSendMsg": send_msg, "history": level == 2, "persistent": level == 2,
            "offlinePush": False, "unreadCount": send_msg, "conversationUpdate": False, "senderSync": True,
            "notPrivate": False, "senderConversationUpdate": False, "reactionFromCache": False}


# ── tokens (HS256 JWT, as tokenverify builds them) ────────────────────────────
def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: str, head: str) -> bytes:
    return hmac.new(secret.encode(), head.encode(), hashlib.sha256).digest()


def _read_jwt(secret: str, token: str, now: float) -> dict[str, Any]:
    """GetClaimFromToken: malformed 1503; expired 1501 (jwt v4 checks exp before the signature); 1505."""
    parts = token.split(".")
    try:
        header, claims = (json.loads(_unb64url(part)) for part in parts[:2]) if len(parts) == 3 else (0, 0)
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise ValueError(token)
    except ValueError:
        raise _OpenIMError(1503) from None
    if isinstance(claims.get("exp"), (int, float)) and claims["exp"] <= now:
        raise _OpenIMError(1501)
    try:
        signed = hmac.compare_digest(_unb64url(parts[2]), _sign(secret, f"{parts[0]}.{parts[1]}"))
    except ValueError:
        signed = False
    if not signed:
        raise _OpenIMError(1505, msg="signature is invalid")
    return claims


def _msg_id() -> str:
    return uuid.uuid4().hex     # OpenIM's ids are md5 hex strings: 32 lower-case hex digits


class _Server(ThreadingHTTPServer):
    """One thread per connection; knows its open sockets so refuse_connections() can cut them."""

    def __init__(self, address: tuple[str, int], fake: FakeOpenIM) -> None:
        self.fake, self.open_sockets = fake, set()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)    # skips HTTPServer's getfqdn() lookup
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):   # a client that gave up is not an error
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive like Go's net/http; no Server header, no access log."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True     # and a buffered wfile: headers and body leave in one send
    wbufsize = -1
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.open_sockets.add(self.connection)

    def finish(self) -> None:
        self.server.open_sockets.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True     # a chunked body is not read: do not reuse the stream
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            status, headers, body = self.server.fake._respond(self.command, urlsplit(self.path).path,
                                                              self.headers, raw)
        except Exception:     # gin's Recovery: a panic is an empty HTTP 500
            traceback.print_exc(file=sys.stderr)
            status, headers, body = 500, {}, b""
        self.send_response_only(status)
        self.send_header("Date", self.date_time_string())
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _serve


class FakeOpenIM:
    """A fake ``openim-api`` on a loopback port; see the module docstring."""

    def __init__(self, *, secret: str = "openIM123", admin_user_ids: Sequence[str] = ("imAdmin",),
                 users: Iterable[str] = (), groups: Mapping[str, Sequence[str]] | None = None,
                 online: Iterable[str] = (), flavor: str = "main", token_ttl_seconds: int = 90 * 86400,
                 host: str = "127.0.0.1", port: int = 0, clock: Callable[[], float] = time.time) -> None:
        if flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {FLAVORS}, not {flavor!r}")
        self.secret, self.flavor, self.host, self.port = secret, flavor, host, port
        self.admin_user_ids, self.token_ttl_seconds = tuple(admin_user_ids), token_ttl_seconds
        self.url = f"http://{host}:{port}"
        self.calls: list[Call] = []
        self.delivered: list[Delivery] = []
        self._clock, self._lock = clock, threading.RLock()
        self._users: dict[str, dict[str, Any]] = {}
        self._groups: dict[str, list[str]] = {}
        self.apps = Apps()    # what each user's app received (fake_apps)
        self._tokens: dict[str, _TokenState] = {}
        self._send_status: dict[str, float] = {}
        self._faults: defaultdict[str, deque[_Fault]] = defaultdict(deque)
        self._callback_seq = itertools.count(1)
        self._hook_queues: list[AfterHookQueue] = []
        self._fired: AfterHookQueue | None = None  # fire_hooks(): OpenIM's own after-hooks
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._routes: dict[str, Callable[[_Req], Any]] = {
            "/auth/get_admin_token": self._get_admin_token, "/msg/send_msg": self._send_msg,
            "/msg/batch_send_msg": self._batch_send_msg, "/msg/check_msg_is_send_success": self._check_send,
            "/msg/send_business_notification": self._send_business_notification,
            "/user/account_check": self._account_check, "/user/get_users_info": self._get_users_info,
            "/user/get_users_online_status": self._get_users_online_status,
            "/user/get_users_status": self._get_users_status,
            "/group/get_group_member_user_id": self._get_group_member_user_id}
        self._add_users(self.admin_user_ids, level=2)   # InitOnce creates the admins (AppMangerLevel 2)
        self.add_users(*users)
        for group_id, members in (groups or {}).items():
            self.add_group(group_id, members)
        for user_id in online:   # apps logged in and connected from the start; every other user is offline
            self.connect(user_id)

    # ── lifecycle ──────────────────────────────────────────────────────────────
    def start(self) -> FakeOpenIM:
        """Listen (threaded) and serve in a background thread; returns self."""
        if self._server is None:
            server = _Server((self.host, self.port), self)
            self.port = server.server_address[1]
            self.url = f"http://{self.host}:{self.port}"
            self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                            name=f"fake-openim-{self.port}", daemon=True)
            self._server = server
            self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listening socket and every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        for sock in list(server.open_sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def refuse_connections(self) -> None:
        """OpenIM down: close the listening socket and open connections (the port is kept)."""
        self.stop()

    def accept_connections(self) -> None:
        """OpenIM back: listen again on the same port, with all state kept."""
        self.start()

    def __enter__(self) -> FakeOpenIM:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        queues, self._hook_queues = self._hook_queues, []
        for hooks in queues:
            hooks.close()
        self.stop()

    # ── state ──────────────────────────────────────────────────────────────────
    def _now(self) -> float:
        return self._clock()

    def _now_ms(self) -> int:
        return int(self._now() * 1000)

    def _add_users(self, user_ids: Iterable[str], level: int = 0) -> None:
        with self._lock:
            for user_id in user_ids:
                self._users.setdefault(user_id, {
                    "userID": user_id, "nickname": user_id, "faceURL": "", "ex": "", "createTime": self._now_ms(),
                    "appMangerLevel": level, "globalRecvMsgOpt": 0})

    def add_users(self, *user_ids: str) -> None:
        """Register users (user_register)."""
        self._add_users(user_ids)

    def add_group(self, group_id: str, members: Sequence[str]) -> None:
        """Create (or replace) a group; its members are registered users too, as in OpenIM, and
        have its ``sg_`` conversation (the groupCreated notification is sent with isSendMsg)."""
        self._add_users(members)
        with self._lock:
            self._groups[group_id] = list(dict.fromkeys(members))
            self.apps.join("sg_" + group_id, self._groups[group_id])

    def block_messages(self, user_id: str, blocked: bool = True) -> None:
        """The user's global receive option: 1 (NotReceiveMessage) or back to 0. Chat messages to
        them fail with 1001 "message is not sent" on main; v3.8.3 answers success with empty ids
        and sends nothing (its RPC returns nil, nil: derived from the code, not observed)."""
        self._add_users([user_id])
        with self._lock:
            self._users[user_id]["globalRecvMsgOpt"] = 1 if blocked else 0

    def connect(self, user_id: str, platform_id: int = 1, *, background: bool = False) -> None:
        """The user's app logs in on this platform through the gateway and syncs as the SDK does."""
        self._add_users([user_id])
        with self._lock:
            self.apps.connect(user_id, platform_id, self._issue_token(user_id, platform_id), background=background)

    def disconnect(self, user_id: str, platform_id: int | None = None) -> None:
        """The app on this platform (every platform when None) loses its connection."""
        with self._lock:
            for connection in self.apps.connections(user_id):
                if platform_id in (None, connection["platformID"]):
                    self.apps.disconnect(user_id, connection["platformID"])

    def set_background(self, user_id: str, platform_id: int = 1, background: bool = True) -> None:
        """The connected app goes to the background or comes back (OpenIM fires no callback)."""
        with self._lock:
            self.apps.set_background(user_id, platform_id, background)

    def set_online(self, user_id: str, platform_ids: Sequence[int]) -> None:
        """Connected on exactly these platforms (the others disconnect); ``[]`` = offline."""
        self._add_users([user_id])
        with self._lock:
            connected = {c["platformID"] for c in self.apps.connections(user_id)}
            for platform in connected - set(platform_ids):
                self.apps.disconnect(user_id, platform)
            for platform in dict.fromkeys(platform_ids):
                if platform not in connected:
                    self.connect(user_id, platform)

    def received_by(self, user_id: str, platform_id: int | None = None) -> list[Delivery]:
        """What the user's app (on one platform, or all of them) got through its SDK's listeners."""
        with self._lock:
            return list(self.apps.received(user_id, platform_id))

    def calls_to(self, endpoint: str) -> list[Call]:
        path = "/" + endpoint.lstrip("/")
        with self._lock:
            return [call for call in self.calls if call.endpoint == path]

    def deliveries_to(self, *, user: str | None = None, group: str | None = None) -> list[Delivery]:
        """Accepted messages addressed to *user* (recvID) and/or *group* (groupID)."""
        with self._lock:
            return [d for d in self.delivered
                    if (user is None or d.recv_id == user) and (group is None or d.group_id == group)]

    # ── faults ─────────────────────────────────────────────────────────────────
    def fail_next(self, endpoint: str, *, times: int = 1, err_code: int | None = None, err_msg: str = "",
                  err_dlt: str = "", http_status: int = 200, body: bytes | None = None) -> None:
        """Answer the next *times* calls with an error envelope (500 unless *err_code*), or *body* raw."""
        code = 500 if err_code is None and body is None else err_code
        self._push_fault(endpoint, times, _Fault("fail", err_code=code, err_msg=err_msg or ERROR_NAMES.get(
            code or 0, ""), err_dlt=err_dlt, http_status=http_status, body=body))

    def delay_next(self, endpoint: str, seconds: float, *, times: int = 1, after_processing: bool = False) -> None:
        """Hold the next *times* calls *seconds* before handling them, or after (the message is accepted)."""
        self._push_fault(endpoint, times, _Fault("delay", seconds=seconds, after_processing=after_processing))

    def _push_fault(self, endpoint: str, times: int, fault: _Fault) -> None:
        with self._lock:
            self._faults["/" + endpoint.lstrip("/")].extend([fault] * times)

    def change_secret(self, secret: str) -> None:
        """OpenIM restarted with another ``share.yml`` secret: tokens signed with the old one answer
        1505 (signature is invalid), and ``get_admin_token`` with the old secret answers 1002."""
        with self._lock:
            self.secret = secret

    def set_admin_user_ids(self, user_ids: Sequence[str]) -> None:
        """OpenIM restarted with another ``imAdminUser.userIDs``; the new admins are created as at
        start. ``get_admin_token`` for an id not listed answers 1001 "userID is error."."""
        with self._lock:
            self.admin_user_ids = tuple(user_ids)
        self._add_users(self.admin_user_ids, level=2)

    def remove_users(self, *user_ids: str) -> None:
        """Delete user records (an admin without one gets 1004 "user not found" from get_admin_token)."""
        with self._lock:
            for user_id in user_ids:
                self._users.pop(user_id, None)

    def expire_tokens(self) -> None:
        """Every token issued so far answers 1501 TokenExpiredError from now on."""
        with self._lock:
            for state in self._tokens.values():
                state.expired = True

    def revoke_tokens(self) -> None:
        """Every token issued so far answers 1507 TokenNotExistError from now on."""
        with self._lock:
            now = self._now()
            for state in self._tokens.values():
                if state.revoked_at is None or state.revoked_at > now:
                    state.revoked_at = now

    # ── HTTP ───────────────────────────────────────────────────────────────────
    def _respond(self, method: str, path: str, headers: Message, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        """Record the call, apply the endpoint's next fault, handle it; (status, headers, body)."""
        operation_id, token = headers.get("operationID", ""), headers.get("token", "")
        gzip_ok = "gzip" in headers.get("Accept-Encoding", "")
        with self._lock:
            self.calls.append(Call(path, operation_id or None, token or None, _json_or_none(raw), self._now()))
            queue = self._faults.get(path)
            fault = queue.popleft() if queue else None
        if fault is not None and fault.kind == "fail":
            if fault.body is not None:
                return fault.http_status, {"Content-Type": "text/plain; charset=utf-8"}, fault.body
            envelope = _envelope(fault.err_code or 0, fault.err_msg, fault.err_dlt)
            return _reply(fault.http_status, envelope, _JSON, gzip_ok)
        if fault is not None and not fault.after_processing:
            time.sleep(fault.seconds)
        with self._lock:
            status, body, content_type = self._handle(method, path, operation_id, token, raw)
        if fault is not None and fault.after_processing:
            time.sleep(fault.seconds)
        return _reply(status, body, content_type, gzip_ok)

    def _handle(self, method: str, path: str, operation_id: str, token: str, raw: bytes) -> tuple[int, bytes, str]:
        """gin's middleware chain (operationID, then token, POST only), then the route."""
        if method != "POST":
            return _NOT_FOUND
        try:
            if not operation_id:
                raise _OpenIMError(1001, "header must have operationID")
            user_id = None if path.startswith(_TOKEN_WHITELIST) else self._authenticate(token)
            route = self._routes.get(path)
            if route is None:
                return _NOT_FOUND
            data = route(_Req(path, raw, operation_id, user_id))
        except _OpenIMError as exc:
            return exc.http_status, _envelope(exc.code, exc.msg, exc.dlt), _JSON
        return 200, _envelope(data=data), _JSON

    # ── auth ───────────────────────────────────────────────────────────────────
    def _issue_token(self, user_id: str, platform_id: int) -> str:
        now = self._now()
        # OpenIM's claims carry no jti; the fake adds one so two tokens issued in one second differ.
        claims = {"UserID": user_id, "PlatformID": platform_id, "exp": int(now + self.token_ttl_seconds),
                  "iat": int(now) - 5, "jti": uuid.uuid4().hex}
        head = _b64url(b'{"alg":"HS256","typ":"JWT"}') + "." + _b64url(_go_json(claims).encode())
        token = head + "." + _b64url(_sign(self.secret, head))
        self._tokens[token] = _TokenState(user_id, platform_id)
        return token

    def _authenticate(self, token: str) -> str:
        """GinParseToken + auth RPC parseToken; returns the token's userID."""
        if not token:
            raise _OpenIMError(1001, "header must have token")
        state = self._tokens.get(token)
        if state is not None and state.expired:
            raise _OpenIMError(1501)
        user_id = str(_read_jwt(self.secret, token, self._now()).get("UserID", ""))
        if state is None:
            if self.flavor == "v3.8.3" and user_id in self.admin_user_ids:
                return user_id     # v3.8.3 accepts any well-signed, unexpired admin JWT
            raise _OpenIMError(1507)
        if state.revoked_at is not None and state.revoked_at <= self._now():
            raise _OpenIMError(1507)
        return user_id

    def _require_admin(self, req: _Req, detail: str) -> None:
        if req.user_id not in self.admin_user_ids:
            raise _OpenIMError(1002, detail)

    def _get_admin_token(self, req: _Req) -> dict[str, Any]:
        body = _a2r_bind(req.raw, "auth.GetAdminTokenReq", {"secret": "string", "userID": "string"},
                         lambda b: None if b["userID"] else "userID is empty")
        if body["secret"] != self.secret:
            raise _OpenIMError(1002, "secret invalid")
        if body["userID"] not in self.admin_user_ids:
            admins = "[" + " ".join(self.admin_user_ids) + "]"
            raise _OpenIMError(1001, f"userID is error., userID={body['userID']}, adminUserID={admins}")
        if body["userID"] not in self._users:      # CheckUser: the admin's user record must exist
            raise _OpenIMError(1004, "user not found")
        if self.flavor == "main":     # CreateToken moves the user's older admin tokens to a 5-minute key
            for state in self._tokens.values():
                if state.user_id == body["userID"] and state.platform_id == ADMIN_PLATFORM_ID \
                        and state.revoked_at is None:
                    state.revoked_at = self._now() + ROTATION_GRACE_SECONDS
        token = self._issue_token(body["userID"], ADMIN_PLATFORM_ID)
        return {"token": token, "expireTimeSeconds": self.token_ttl_seconds}

    # ── messages ───────────────────────────────────────────────────────────────
    def _send_msg(self, req: _Req) -> dict[str, Any]:
        body = _gin_bind(req.raw, "SendMsgReq", "apistruct.SendMsgReq", _SEND_MSG_REQ, _send_msg_req_failures)
        self._require_admin(req, "only app manager can send message")
        delivery = self._accept({**self._draft(body, req), "recv_id": body["recvID"]})
        self._send_status[req.operation_id] = self._now()     # SetSendMsgStatus(2), keyed by operationID
        return self._send_answer(delivery)

    def _batch_send_msg(self, req: _Req) -> dict[str, Any]:
        body = _gin_bind(req.raw, "BatchSendMsgReq", "apistruct.BatchSendMsgReq", _BATCH_REQ, _batch_failures)
        self._require_admin(req, "only app manager can send message")
        recv_ids = list(self._users) if body["isSendAll"] else body["recvIDs"]
        draft, results, failed = self._draft(body, req), [], []    # built once: one clientMsgID for all
        for recv_id in recv_ids:
            try:
                delivery = self._accept({**draft, "recv_id": recv_id})
            except _OpenIMError:
                failed.append(recv_id)     # per-recipient errors are swallowed
                continue
            results.append({"serverMsgID": delivery.server_msg_id, "clientMsgID": delivery.client_msg_id,
                            "sendTime": delivery.send_time, "recvID": recv_id})
        return {"results": results or None, "failedUserIDs": failed or None}

    def _draft(self, body: Mapping[str, Any], req: _Req) -> dict[str, Any]:
        """getSendMsgReq + newUserSendMsgReq: content-type whitelist, content check, MsgData fields."""
        content_type, session_type, content = body["contentType"], body["sessionType"], dict(body["content"])
        if content_type not in SEND_MSG_CONTENT_TYPES:
            raise _OpenIMError(1001)      # errs.WrapMsg(ErrArgs, "unsupported content type"): errDlt stays ""
        if content_type == 1400:          # OANotification: sessionType 4, from an account of level >= 2
            level = self._users.get(body["sendID"], {}).get("appMangerLevel", -1)
            if level < 2:
                raise _OpenIMError(1101) if level < 0 else _OpenIMError(1002, "notification messages cannot be "
                                                                              "sent for this ID")
            session_type, content = 4, {"detail": _go_json(content, sort_keys=True)}
        _check_content(content_type, content)
        return dict(endpoint=req.path, session_type=session_type, content_type=content_type,
                    send_id=body["sendID"], group_id=body["groupID"], content=content,
                    operation_id=req.operation_id, client_msg_id=_msg_id(), send_time=body["sendTime"],
                    create_time=self._now_ms(), sender_platform_id=body["senderPlatformID"],
                    sender_nickname=body["senderNickname"], sender_face_url=body["senderFaceURL"], ex=body["ex"],
                    at_user_list=content.get("atUserList") if content_type == 106 else None,
                    options=_send_msg_options(body), offline_push_info=body["offlinePushInfo"])

    def _send_business_notification(self, req: _Req) -> dict[str, Any]:
        if self.flavor == "v3.8.3":    # recvUserID is `binding:"required"`; recvGroupID is not a field
            body = _gin_bind(req.raw, "", _ANONYMOUS, _NOTIFICATION_V383, _required("sendUserID", "recvUserID"))
            body.update(recvGroupID="", sendMsg=False, reliabilityLevel=1)
        else:
            body = _gin_bind(req.raw, "", _ANONYMOUS, _NOTIFICATION_MAIN, _required("sendUserID"))
            if bool(body["recvUserID"]) == bool(body["recvGroupID"]):
                verb = "set" if body["recvUserID"] else "empty"
                raise _OpenIMError(1001, f"recvUserID and recvGroupID cannot be {verb} at the same time")
        level = 1 if body["reliabilityLevel"] is None else body["reliabilityLevel"]
        self._require_admin(req, "only app manager can send message")
        detail = _go_json({"key": body["key"], "data": body["data"]})
        delivery = self._accept(dict(
            endpoint=req.path, session_type=1 if body["recvUserID"] else 3, content_type=2001,
            send_id=body["sendUserID"], recv_id=body["recvUserID"], group_id=body["recvGroupID"],
            content={"detail": detail}, key=body["key"], data=body["data"], reliability_level=level,
            operation_id=req.operation_id, client_msg_id=_msg_id(), create_time=self._now_ms(),
            options=_notification_options(body["sendMsg"], level)))
        return self._send_answer(delivery)

    def _send_answer(self, delivery: Delivery) -> dict[str, Any]:
        answer: dict[str, Any] = {"serverMsgID": delivery.server_msg_id, "clientMsgID": delivery.client_msg_id,
                                  "sendTime": delivery.send_time}
        if self.flavor == "v3.8.3":
            answer["modify"] = None       # v3.8.3 answers the raw protobuf response
        return answer

    def _accept(self, draft: dict[str, Any]) -> Delivery:
        """The msg RPC: MsgData.Check, encapsulateMsgData, messageVerification; then record."""
        if (draft["session_type"] == 4) != (draft["content_type"] == 1400):
            raise _OpenIMError(1001, "notification msg must have correct session type and content type")
        if draft["session_type"] == 1:
            self._verify_single(draft)
        elif draft["session_type"] == 3:
            self._verify_group(draft)
        elif draft["session_type"] != 4:
            raise _OpenIMError(1001, "unknown sessionType")
        delivery = Delivery(**{**draft, "content": dict(draft["content"]), "options": dict(draft["options"]),
                               "server_msg_id": _msg_id(), "send_time": draft.get("send_time") or self._now_ms()})
        if draft["session_type"] == 1 and self._refused_by_receiver(draft):
            # v3.8.3's sendMsgSingleChat returns (nil, nil): an empty answer, nothing sent
            return dataclasses.replace(delivery, server_msg_id="", client_msg_id="", send_time=0)
        self.delivered.append(delivery)
        seq = self.apps.route(delivery, self._groups[delivery.group_id] if delivery.session_type == 3
                              else [delivery.recv_id])
        self._fire(delivery, seq)
        return delivery

    def _verify_single(self, draft: Mapping[str, Any]) -> None:
        privileged = draft["send_id"] in self.admin_user_ids or 1000 <= draft["content_type"] <= 5000
        if not privileged and draft["send_id"] not in self._users:
            raise _OpenIMError(1004, "record not found")
        if draft["options"].get("isNotNotification", True) and draft["recv_id"] not in self._users:
            raise _OpenIMError(1004, "userID not found")     # receiver's receive-option lookup

    def _refused_by_receiver(self, draft: Mapping[str, Any]) -> bool:
        """modifyMessageByUserMessageReceiveOpt: a chat message to a user whose global option is 1
        is not sent; main says so (1001), v3.8.3 answers success (True: answer empty)."""
        chat = draft["options"].get("isNotNotification", True)
        if not chat or self._users.get(draft["recv_id"], {}).get("globalRecvMsgOpt") != 1:
            return False
        if self.flavor == "main":
            raise _OpenIMError(1001, "message is not sent")
        return True

    def _verify_group(self, draft: Mapping[str, Any]) -> None:
        members = self._groups.get(draft["group_id"])
        if members is None:
            raise _OpenIMError(1004)
        privileged = draft["send_id"] in self.admin_user_ids or 1000 <= draft["content_type"] <= 5000
        if not privileged and draft["send_id"] not in members:
            raise _OpenIMError(1203)

    def _check_send(self, req: _Req) -> dict[str, Any]:
        _a2r_bind(req.raw, "msg.GetSendMsgStatusReq", {})
        sent_at = self._send_status.get(req.operation_id)
        fresh = sent_at is not None and self._now() - sent_at < SEND_STATUS_TTL_SECONDS
        return {"status": 2 if fresh else 0}

    # ── users, presence, groups ────────────────────────────────────────────────
    def _account_check(self, req: _Req) -> dict[str, Any]:
        body = _a2r_bind(req.raw, "user.AccountCheckReq", {"checkUserIDs": "[]string"},
                         lambda b: None if b["checkUserIDs"] else "CheckUserIDs is empty")
        user_ids = body["checkUserIDs"]
        if len(set(user_ids)) != len(user_ids):
            raise _OpenIMError(1001, "userID repeated")
        self._require_admin(req, f"user {req.user_id} is not admin userID")
        return {"results": [{"userID": user_id, "accountStatus": 1 if user_id in self._users else 0}
                            for user_id in user_ids]}

    def _get_users_info(self, req: _Req) -> dict[str, Any]:
        body = _a2r_bind(req.raw, "user.GetDesignateUsersReq", {"userIDs": "[]string"},
                         lambda b: None if b["userIDs"] else "UserIDs is empty")
        found = [dict(self._users[u]) for u in dict.fromkeys(body["userIDs"]) if u in self._users]
        return {"usersInfo": found or None}

    def _get_users_online_status(self, req: _Req) -> list[dict[str, Any]] | None:
        body = _gin_bind(req.raw, "GetUsersOnlineStatusReq", "msggateway.GetUsersOnlineStatusReq",
                         {"userIDs": "[]string"}, lambda b: [], code=500)
        self._require_admin(req, "only app manager")
        answer = []
        for user_id in body["userIDs"] or []:
            detail = self.apps.connections(user_id)
            answer.append({"userID": user_id, "status": 1 if detail else 0,
                           "detailPlatformStatus": detail or None})
        return answer or None

    def _get_users_status(self, req: _Req) -> dict[str, Any]:
        body = _a2r_bind(req.raw, "user.GetUserStatusReq", {"userID": "string", "userIDs": "[]string"},
                         lambda b: None if b["userIDs"] else "UserIDs is empty")
        statuses = []
        for user_id in body["userIDs"]:
            platforms = [d["platformID"] for d in self.apps.connections(user_id)]
            statuses.append({"userID": user_id, "status": 1 if platforms else 0, "platformIDs": platforms or None})
        return {"statusList": statuses}

    def _get_group_member_user_id(self, req: _Req) -> dict[str, Any]:
        body = _a2r_bind(req.raw, "group.GetGroupMemberUserIDsReq", {"groupID": "string"},
                         lambda b: None if b["groupID"] else "GroupID is empty")
        members = list(self._groups.get(body["groupID"], []))   # an unknown group has no members: no error
        if req.user_id not in members and req.user_id not in self.admin_user_ids:
            raise _OpenIMError(1002, "opUser in ownerUserIDs")
        return {"userIDs": members or None}

    # ── callbacks ──────────────────────────────────────────────────────────────
    def post_callback(self, webhook_url: str, command: str, payload: dict[str, Any], *,
                      operation_id: str | None = None, timeout: float = 15.0) -> tuple[int, Any]:
        """POST *payload* as OpenIM's webhook client does; returns (status, JSON reply or None)."""
        url = webhook_url + "/" + command
        if command in KEYED_CALLBACKS and self.flavor == "main":
            url = _with_query(url, "key", _callback_key(payload))
        op = operation_id or payload.get("operationID") or f"p_{os.getpid()}_{next(self._callback_seq)}"
        headers = {"User-Agent": "Go-http-client/1.1", "Operationid": op,   # Go canonicalises header names
                   "Content-Type": "application/json; charset=utf-8", "Accept-Encoding": "gzip"}
        body = (_go_json(payload) + "\n").encode()      # json.Encoder ends with a newline
        with requests.Session() as session:
            session.headers.clear()
            response = session.post(url, data=body, headers=headers, timeout=timeout)
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, None      # OpenIM would log 90007 DataError

    def after_hooks(self, webhook_url: str, **options: Any) -> AfterHookQueue:
        """OpenIM's after-hook transport posting to *webhook_url* through :meth:`post_callback`:
        ``push(command, payload)`` where OpenIM fires the hook (options: ``workers``, ``slots``,
        ``push_wait``, ``timeout``; OpenIM's values by default). Stopped when a ``with`` block
        of the fake ends, or by the queue's ``close()``."""
        hooks = AfterHookQueue(self.post_callback, webhook_url, **options)
        self._hook_queues.append(hooks)
        return hooks

    def fire_hooks(self, webhook_url: str, **options: Any) -> AfterHookQueue:
        """From now on fire OpenIM's after-hooks at *webhook_url* for every message OpenIM
        accepts, through its hook queue (:meth:`after_hooks`, whose options apply): the msg RPC's
        ``afterSendSingleMsg`` / ``afterSendGroupMsg`` for chat messages (a notification, content
        type 1000-5000 such as a business notification's 2001, fires none: OPENIM.md 5.5) and, on
        main only, msgtransfer's ``afterMsgSaveDB`` with the seq of a stored message (v3.8.x has
        no such hook). A full queue blocks the send, as in OpenIM. Returns the queue."""
        self._fired = self.after_hooks(webhook_url, **options)
        return self._fired

    def _fire(self, delivery: Delivery, seq: int) -> None:
        if self._fired is None or delivery.session_type not in (1, 3) or 1000 <= delivery.content_type <= 5000:
            return
        if delivery.session_type == 1:
            self._fired.push("callbackAfterSendSingleMsgCommand", self.after_send_single_msg(delivery))
        else:
            self._fired.push("callbackAfterSendGroupMsgCommand", self.after_send_group_msg(delivery))
        if seq and self.flavor == "main":
            self._fired.push("callbackAfterMsgSaveDBCommand", self.after_msg_save_db(delivery, seq))

    def _common_callback(self, delivery: Delivery, command: str, seq: int, status: int) -> dict[str, Any]:
        """CommonCallbackReq; notifications (1000-5000) carry "" because OpenIM proto-decodes JSON."""
        content = "" if 1000 <= delivery.content_type <= 5000 else _go_json(delivery.content, sort_keys=True)
        return {"sendID": delivery.send_id, "callbackCommand": command, "serverMsgID": delivery.server_msg_id,
                "clientMsgID": delivery.client_msg_id, "operationID": delivery.operation_id,
                "senderPlatformID": delivery.sender_platform_id, "senderNickname": delivery.sender_nickname,
                "sessionType": delivery.session_type, "msgFrom": delivery.msg_from,
                "contentType": delivery.content_type, "status": status, "sendTime": delivery.send_time,
                "createTime": delivery.create_time, "content": content, "seq": seq,
                "atUserList": delivery.at_user_list, "faceURL": delivery.sender_face_url, "ex": delivery.ex}

    def after_send_single_msg(self, delivery: Delivery) -> dict[str, Any]:
        common = self._common_callback(delivery, "callbackAfterSendSingleMsgCommand", 0, delivery.status)
        return {**common, "recvID": delivery.recv_id}

    def after_send_group_msg(self, delivery: Delivery) -> dict[str, Any]:
        common = self._common_callback(delivery, "callbackAfterSendGroupMsgCommand", 0, delivery.status)
        return {**common, "groupID": delivery.group_id}

    def after_msg_save_db(self, delivery: Delivery, seq: int) -> dict[str, Any]:
        status = 2 if delivery.status == 1 else delivery.status     # msgtransfer rewrites Sending → Succeeded
        common = self._common_callback(delivery, "callbackAfterMsgSaveDBCommand", seq, status)
        return {**common, "recvID": delivery.recv_id, "groupID": delivery.group_id}

    def _presence(self, command: str, user_id: str, platform_id: int, seq: int | None) -> dict[str, Any]:
        return {"callbackCommand": command, "operationID": f"p_{os.getpid()}_{next(self._callback_seq)}",
                "platformID": platform_id, "platform": PLATFORM_NAMES.get(platform_id, "UnknownPlatform"),
                "userID": user_id, "seq": self._now_ms() if seq is None else seq}

    def user_online(self, user_id: str, platform_id: int = 1, *, seq: int | None = None,
                    is_app_background: bool = False) -> dict[str, Any]:
        body = self._presence("callbackAfterUserOnlineCommand", user_id, platform_id, seq)
        return {**body, "isAppBackground": is_app_background, "connID": ""}

    def user_offline(self, user_id: str, platform_id: int = 1, *, seq: int | None = None) -> dict[str, Any]:
        return {**self._presence("callbackAfterUserOfflineCommand", user_id, platform_id, seq), "connID": ""}

    def single_msg_read(self, user_id: str, conversation_id: str, seqs: list[int]) -> dict[str, Any]:
        """``contentType`` carries the conversation type; note the capitalised ``Seqs``."""
        conversation_type = 3 if conversation_id.startswith("sg_") else 1
        return {"callbackCommand": "callbackAfterSingleMsgReadCommand", "conversationID": conversation_id,
                "userID": user_id, "Seqs": list(seqs), "contentType": conversation_type}

    def group_msg_read(self, reader: str, has_read_seq: int) -> dict[str, Any]:
        """``unreadMsgNum`` is the reader's new hasReadSeq; the group is not named."""
        return {"callbackCommand": "callbackAfterGroupMsgReadCommand", "sendID": reader, "receiveID": reader,
                "unreadMsgNum": has_read_seq, "contentType": 3}

    def receipt_message(self, from_user: str, to_user: str, receipt: dict[str, Any]) -> Delivery:
        """A client app's custom (110) message carrying ``{"receipt": ...}``, recorded as OpenIM would."""
        now = self._now_ms()
        with self._lock:
            nickname = self._users.get(from_user, {}).get("nickname", "")
            delivery = Delivery(
                endpoint="ws", session_type=1, content_type=110, send_id=from_user, recv_id=to_user,
                content={"data": _go_json({"receipt": receipt})}, operation_id=f"{now}-{uuid.uuid4().hex[:8]}",
                server_msg_id=_msg_id(), client_msg_id=_msg_id(), send_time=now, create_time=now, msg_from=100,
                sender_platform_id=1, sender_nickname=nickname, status=1)
            self.delivered.append(delivery)
            seq = self.apps.route(delivery, [to_user])    # stored: both users now have the si_ conversation
            self._fire(delivery, seq)
        return delivery


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:
        return None


def _envelope(code: int = 0, msg: str = "", dlt: str = "", data: Any = _NO_DATA) -> bytes:
    body: dict[str, Any] = {"errCode": code, "errMsg": msg, "errDlt": dlt}
    if data is not _NO_DATA:
        body["data"] = data
    return _go_json(body).encode()


def _reply(status: int, body: bytes, content_type: str, gzip_ok: bool) -> tuple[int, dict[str, str], bytes]:
    """gin-contrib/gzip compresses every answer for a client that accepts gzip (requests does)."""
    headers = {"Content-Type": content_type}
    if gzip_ok:
        body = gzip.compress(body, compresslevel=6, mtime=0)
        headers.update({"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
    return status, headers, body


def _callback_key(payload: Mapping[str, Any]) -> str:
    """base64 of KeyMsgData {sendID, recvID, groupID} (what /msg/send_simple_msg takes back)."""
    key = {"sendID": payload.get("sendID", ""), "recvID": payload.get("recvID", ""),
           "groupID": payload.get("groupID", "")}
    return base64.b64encode(_go_json(key).encode()).decode()


def _with_query(url: str, name: str, value: str) -> str:
    """url.Values.Set + Encode: keys sorted, values query-escaped."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != name] + [(name, value)]
    return urlunsplit(parts._replace(query=urlencode(sorted(query, key=lambda kv: kv[0]))))
