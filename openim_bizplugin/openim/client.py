"""OpenIM REST client: one request chokepoint for every call the sidecar makes.

Every call is a JSON ``POST`` with an ``operationID`` header (plus the admin
``token`` for admin calls) and explicit connect/read timeouts. Both the HTTP
status and the envelope's ``errCode`` are checked (OPENIM.md §1.3–1.5), and
every failure -- a ``requests`` exception, an HTTP status or an ``errCode`` --
is translated in :meth:`OpenIMClient._post` into one exception whose flags tell
the delivery engine what to do. The client never retries on its own, except
once after refreshing the admin token.

    OpenIMError                  one failed call: endpoint, err_code, err_msg, err_dlt,
     │                           http_status, operation_id (of the last attempt)
     ├── retryable = True        network errors, HTTP 5xx and 429, errCode 429,
     │                           token errors 1501-1507 (after the one refresh),
     │                           errCode 500 (not content validation), 90000-range
     ├── retryable = False       HTTP 400 bind errors, 1001, 1002 (after the one refresh), 1004, 11xx, 12xx,
     │                           1302/1303, 1402/1403, validation 500s, any other code
     ├── token_refused = True    /auth/get_admin_token answered 1001, 1002 or 1004 (wrong
     │                           secret, unknown admin user): the deployment's state, not
     │                           the call's; asked again every refusal_recheck_seconds
     └── outcome_unknown = True  the request may have reached OpenIM and no answer came:
                                 read timeout, connection dropped after sending, 5xx
                                 without an OpenIM envelope, internal errCode 500.
                                 Ask check_msg_is_send_success(error.operation_id)
                                 before re-sending a send_msg.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeGuard

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from ..config import OpenIMConfig
from ..counters import DISCARD, Metrics
from ..store.base import Answer, answers_by_user

log = logging.getLogger(__name__)

TOKEN_NAME = "openim.admin_token"
REFRESH_LOCK = "openim.admin_token.refresh"
TOKEN_ERRORS = frozenset(range(1501, 1508))
# an admin route's answer to a token whose user is no admin any more (imAdminUser.userIDs changed):
# the deployment's state, like a token error; a fresh token tells (get_admin_token refuses it: 1001)
NO_PERMISSION = 1002
# get_admin_token: 1002 "secret invalid", 1001 "userID is error." (not an admin), 1004 "user not found"
TOKEN_REFUSALS = frozenset({1001, 1002, 1004})
MAX_IDS = 1000  # OpenIM caps ID arrays at 1,000
CUSTOM = 110
SINGLE_CHAT, GROUP_CHAT = 1, 3
ADMIN_PLATFORM = 10
IOS_PLATFORM = 1  # online push skips it while the app is in the background
_VALIDATION = re.compile(r"Field validation|error\(s\) decoding|mapstructure")
_HINT = re.compile(r"[^A-Za-z0-9_.]+")
_DELIVERY_OPERATION = re.compile(r"biz-([0-9a-f]{32})-\d+-")  # new_operation_id(message_id) + f"-{seq}"


def operation_message_id(operation_id: str) -> str | None:
    """The message id in the operationID of a delivery attempt, or None for other calls."""
    found = _DELIVERY_OPERATION.match(operation_id)
    return found.group(1) if found else None


class OpenIMError(Exception):
    """A translated failure of one OpenIM call; never carries the token or the secret."""

    def __init__(self, *, endpoint: str, operation_id: str, err_msg: str, err_code: int | None = None,
                 err_dlt: str = "", http_status: int | None = None, retryable: bool = False,
                 outcome_unknown: bool = False) -> None:
        self.endpoint, self.operation_id = endpoint, operation_id
        self.err_code, self.err_msg, self.err_dlt = err_code, err_msg, err_dlt
        self.http_status, self.retryable, self.outcome_unknown = http_status, retryable, outcome_unknown
        self.token_refused = False  # OpenIM refuses the admin token: nothing was sent
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"errCode {self.err_code}" if self.err_code is not None else (
            f"HTTP {self.http_status}" if self.http_status is not None else "network")
        detail = f"{self.err_msg}: {self.err_dlt}" if self.err_dlt else self.err_msg
        return " ".join(f"{self.endpoint} {where} {detail} (operationID {self.operation_id})".split())

    @classmethod
    def batch_refusal(cls, endpoint: str, operation_id: str) -> OpenIMError:
        """A recipient in ``failedUserIDs``: OpenIM swallowed its reason, so it is worth a retry."""
        return cls(endpoint=endpoint, operation_id=operation_id, http_status=200, retryable=True,
                   err_msg="recipient listed in failedUserIDs (OpenIM gives no reason)")


@dataclass  # not frozen: one per recipient (see store.base.WorkItem)
class SendResult:
    """What OpenIM answered for one delivered message."""

    server_msg_id: str
    client_msg_id: str
    send_time_ms: int
    operation_id: str = ""  # of the attempt that succeeded (differs after a token refresh)


@dataclass(frozen=True)
class BatchResult:
    """``/msg/batch_send_msg``: OpenIM's ``results`` (one entry per user it sent to), the IDs it
    reported as failed, and its answer as it came (``answer``, JSON text: the store keeps it as
    is instead of encoding the results again, ~1 us per user)."""

    results: list[dict[str, Any]]
    failed: tuple[str, ...]
    answer: str = ""

    @functools.cached_property
    def sent_to(self) -> frozenset[str]:
        """The users OpenIM answered for."""
        return frozenset(r["recvID"] for r in self.results)

    @functools.cached_property
    def sent(self) -> dict[str, Answer]:
        """Per user it sent to: (serverMsgID, clientMsgID, sendTime)."""
        return answers_by_user(self.results)


class _Reply(NamedTuple):
    data: Any  # the envelope's data
    body: bytes  # the whole answer, as it came (gzip undone)


class TokenStore(Protocol):
    """Where the admin token is shared by all workers and replicas (the sidecar's store implements it)."""

    def load_token(self, name: str) -> tuple[str, int] | None: ...  # (token, expires_ms)
    def save_token(self, name: str, token: str, expires_ms: int) -> None: ...
    def try_lock(self, name: str, owner: str, ttl_ms: int) -> bool: ...
    def unlock(self, name: str, owner: str) -> None: ...


class _Token(NamedTuple):
    value: str
    expires_ms: int


def _classify(status: int, code: int, dlt: str) -> tuple[bool, bool]:
    """(retryable, outcome_unknown) for an OpenIM envelope with a non-zero errCode."""
    if code == 429 or status == 429 or code in TOKEN_ERRORS:
        return True, False
    if status == 400:  # gin bind error: our request is malformed
        return False, False
    if code == 500:
        # content failing mapstructure/validator comes back as 500 (OPENIM.md §3.3); otherwise
        # an internal error, possibly a gRPC deadline after the message was handed on
        return (False, False) if _VALIDATION.search(dlt) else (True, True)
    if 90000 <= code < 100000 or status >= 500:
        return True, False
    return False, False


def _transport_flags(exc: requests.RequestException) -> tuple[bool, bool]:
    """(retryable, outcome_unknown) for a requests exception."""
    if isinstance(exc, (requests.ConnectTimeout, requests.exceptions.SSLError)):
        return True, False
    if isinstance(exc, requests.ConnectionError):
        reason = getattr(exc.args[0], "reason", None) if exc.args else None
        never_sent = isinstance(reason, urllib3.exceptions.NewConnectionError)
        return True, not never_sent  # refused / DNS vs. dropped after the request went out
    if isinstance(exc, (requests.Timeout, requests.exceptions.ChunkedEncodingError,
                        requests.exceptions.ContentDecodingError)):
        return True, True
    return False, False  # invalid URL, header, ...: configuration, not the network


def _envelope(resp: requests.Response) -> dict[str, Any] | None:
    """The OpenIM envelope of *resp*, or None when the body is not one."""
    try:
        body = resp.json()
    except ValueError:
        return None
    ok = isinstance(body, dict) and isinstance(body.get("errCode"), int) and not isinstance(body["errCode"], bool)
    return body if ok else None


def _chunks(ids: Sequence[str]) -> list[list[str]]:
    """*ids* without duplicates (OpenIM answers them with 1001), in slices OpenIM accepts."""
    unique = list(dict.fromkeys(ids))
    return [unique[i:i + MAX_IDS] for i in range(0, len(unique), MAX_IDS)]


def _send_result(data: Any, operation_id: str) -> SendResult:
    data = data if isinstance(data, dict) else {}
    return SendResult(str(data.get("serverMsgID") or ""), str(data.get("clientMsgID") or ""),
                      int(data.get("sendTime") or 0), operation_id)


def _custom_fields(send_id: str, content: dict[str, str], push_title: str, push_desc: str) -> dict[str, Any]:
    """The body fields send_msg and batch_send_msg share (OPENIM.md §3.3, §3.5)."""
    bad = [k for k, v in content.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"custom content values must be strings (OpenIM/SDK drop others): {bad}")
    body: dict[str, Any] = {"sendID": send_id, "senderPlatformID": ADMIN_PLATFORM, "content": dict(content),
                            "contentType": CUSTOM, "isOnlineOnly": False, "notOfflinePush": not push_title}
    if push_title:
        body["offlinePushInfo"] = {"title": push_title, "desc": push_desc, "ex": "", "iOSPushSound": "",
                                   "iOSBadgeCount": False, "signalInfo": ""}
    return body


class OpenIMClient:
    """Calls OpenIM's REST API as the admin user.

    The admin token is one per deployment, shared through the :class:`TokenStore`:
    on OpenIM main each ``/auth/get_admin_token`` call revokes the earlier admin
    tokens of that user after 5 minutes (OPENIM.md §2.1), so replicas fetching
    their own would keep invalidating each other. Refreshes are serialised by a
    thread lock and, across processes, by ``try_lock``; a token error refreshes
    only if the token that failed is still the current one, so N workers hitting
    the same expired token cause one refresh.
    """

    def __init__(self, config: OpenIMConfig, tokens: TokenStore, *, session: requests.Session | None = None,
                 clock: Callable[[], float] = time.time, refresh_margin_seconds: float = 3600,
                 owner: str | None = None, connect_timeout_seconds: float = 5.0,
                 lock_wait_seconds: float = 5.0, lock_poll_seconds: float = 0.1,
                 refusal_recheck_seconds: float = 5.0, sleep: Callable[[float], None] = time.sleep) -> None:
        self._config, self._tokens, self._clock, self._sleep = config, tokens, clock, sleep
        self._session = session or _session_for(config.api_url)
        if session is None:  # one pool shared by every worker thread
            self._session.mount("http://", HTTPAdapter(pool_maxsize=64))
            self._session.mount("https://", HTTPAdapter(pool_maxsize=64))
        self._timeout = (min(connect_timeout_seconds, config.timeout_seconds), config.timeout_seconds)
        self._margin_ms = int(refresh_margin_seconds * 1000)
        self._owner = owner or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._wait_rounds = max(1, round(lock_wait_seconds / lock_poll_seconds))
        self._poll = lock_poll_seconds
        self._lock_ttl_ms = int((sum(self._timeout) + 5) * 1000)
        self._lock = threading.Lock()
        self._token: _Token | None = None
        self._dead: str | None = None  # the last token OpenIM refused: never offered again
        self._refusal: tuple[OpenIMError, float] | None = None  # OpenIM's last refusal and when
        self._refusal_recheck = refusal_recheck_seconds
        self._op_tag, self._op_counter = secrets.token_hex(3), itertools.count()
        self.metrics: Metrics = DISCARD  # the app's, once metrics.install() hands it over

    def new_operation_id(self, hint: str = "") -> str:
        """``biz-<hint>-<ms>-<process tag><counter>``: unique per attempt, safe in headers and logs.

        A random tag once per process and a counter, not random bytes per call.
        Leasing makes one per message and round and appends ``-<seq>`` per recipient.
        """
        hint = _HINT.sub("-", hint).strip("-")[:40]
        ms = int(self._clock() * 1000)
        return "-".join(p for p in ("biz", hint, str(ms), f"{self._op_tag}{next(self._op_counter):x}") if p)

    # -- the chokepoint ----------------------------------------------------------
    def call(self, endpoint: str, body: dict[str, Any], *, operation_id: str | None = None,
             admin: bool = True) -> Any:
        """POST *body* to *endpoint*; return the envelope's ``data`` or raise :class:`OpenIMError`.

        Admin calls that fail with a token error are repeated once with a fresh
        token and the operationID ``<operation_id>-retry`` (OpenIM did not process
        the first); the OpenIMError of a failure carries the last attempt's ID.
        """
        return self._call(endpoint, body, operation_id or self.new_operation_id(endpoint.rsplit("/", 1)[-1]),
                          admin=admin, same_id_on_retry=False)[0].data

    def _call(self, endpoint: str, body: dict[str, Any], operation_id: str, *, admin: bool,
              same_id_on_retry: bool) -> tuple[_Reply, str]:
        if not admin:
            return self._post(endpoint, body, operation_id, None), operation_id
        token = self.admin_token()
        try:
            return self._post(endpoint, body, operation_id, token), operation_id
        except OpenIMError as exc:
            if exc.err_code not in TOKEN_ERRORS and exc.err_code != NO_PERMISSION:
                raise
            log.info("OpenIM refused the admin token (%s, operationID %s): refreshing once",
                     exc.err_msg, operation_id, extra={"event": "openim.token_refused", "endpoint": endpoint,
                                                       "operation_id": operation_id, "err_code": exc.err_code})
        token = self._refresh(failed=token)
        retry_id = operation_id if same_id_on_retry else f"{operation_id}-retry"
        return self._post(endpoint, body, retry_id, token), retry_id

    def _post(self, endpoint: str, body: dict[str, Any], operation_id: str, token: str | None) -> _Reply:
        """One HTTP attempt: the only place requests is called and its errors translated."""
        headers = {"operationID": operation_id}
        if token:
            headers["token"] = token
        started = time.monotonic()
        status: int | None = None
        code: int | None = None
        try:
            resp = self._send(self._config.api_url + endpoint, body, headers)
            status = resp.status_code
            envelope = _envelope(resp)
            code = envelope["errCode"] if envelope else None
            return _Reply(self._data(endpoint, operation_id, status, envelope), resp.content)
        except requests.RequestException as exc:
            retryable, unknown = _transport_flags(exc)
            raise OpenIMError(endpoint=endpoint, operation_id=operation_id, retryable=retryable,
                              outcome_unknown=unknown, err_msg=self._scrub(f"{type(exc).__name__}: {exc}")) from exc
        finally:
            seconds = time.monotonic() - started
            outcome = str(code) if code is not None else ("network" if status is None else f"http-{status}")
            self.metrics.openim_call(endpoint, outcome, seconds)
            log.debug("OpenIM %s operationID=%s http=%s errCode=%s %.0fms", endpoint, operation_id, status, code,
                      seconds * 1000, extra={"event": "openim.call", "endpoint": endpoint, "operation_id": operation_id,
                                             "http_status": status, "err_code": code,
                                             "duration_ms": round(seconds * 1000, 1)})

    def _send(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> requests.Response:
        """POST *body* as JSON straight to the session's adapter.

        ``Session.post`` would merge cookies, hooks, auth and settings and look for
        redirects on every call: ~0.7 ms of CPU per call, for features OpenIM's API
        does not use (proxies are read once, in :func:`_session_for`).
        """
        try:
            data = json.dumps(body, allow_nan=False).encode()  # as requests' json= encodes it
        except ValueError as exc:
            raise requests.exceptions.InvalidJSONError(exc) from exc
        request = requests.PreparedRequest()
        request.method, request.url, request.body = "POST", url, data
        request.headers = CaseInsensitiveDict(self._session.headers)
        request.headers.update({"Content-Type": "application/json", "Content-Length": str(len(data)), **headers})
        return self._session.get_adapter(url).send(request, timeout=self._timeout, proxies=self._session.proxies)

    def _data(self, endpoint: str, operation_id: str, status: int, envelope: dict[str, Any] | None) -> Any:
        if envelope is None:
            retryable = status >= 500 or status == 429
            raise OpenIMError(endpoint=endpoint, operation_id=operation_id, http_status=status,
                              err_msg="response is not an OpenIM envelope", retryable=retryable,
                              outcome_unknown=status >= 500)
        code = envelope["errCode"]
        if code == 0 and status == 200:
            return envelope.get("data")
        dlt = self._scrub(str(envelope.get("errDlt") or ""))
        retryable, unknown = _classify(status, code, dlt) if code else (status >= 500 or status == 429, False)
        raise OpenIMError(endpoint=endpoint, operation_id=operation_id, err_code=code or None, err_dlt=dlt,
                          err_msg=self._scrub(str(envelope.get("errMsg") or "")), http_status=status,
                          retryable=retryable, outcome_unknown=unknown)

    def _scrub(self, text: str) -> str:
        """Belt and braces: OpenIM's answers should never echo these, but never let them through."""
        for secret in (self._config.secret, self._token.value if self._token else ""):
            if secret:
                text = text.replace(secret, "***")
        return text

    # -- admin token ---------------------------------------------------------------
    def admin_token(self) -> str:
        """The shared admin token, refreshed when it expires within the refresh margin."""
        current = self._token
        if current and self._usable(current, None):
            return current.value
        return self._refresh(failed=None)

    def _usable(self, token: _Token | None, failed: str | None) -> TypeGuard[_Token]:
        return (token is not None and token.value not in (failed, self._dead)
                and token.expires_ms - int(self._clock() * 1000) > self._margin_ms)

    def _refresh(self, failed: str | None) -> str:
        """A token other than *failed* and not near expiry: adopt one another worker made, or fetch one.

        While OpenIM refuses to grant one (a wrong secret, an unknown admin user), its
        refusal is raised again without asking for refusal_recheck_seconds: delivery
        rounds and probes then cost OpenIM nothing. A token another process obtained
        meanwhile (a replica with the new secret) is adopted all the same.
        """
        with self._lock:
            if failed is not None:
                self._dead = failed
            for candidate in (self._token, self._stored()):
                if self._usable(candidate, failed):
                    return self._adopt(candidate)
            self._raise_recent_refusal()
            if self._tokens.try_lock(REFRESH_LOCK, self._owner, self._lock_ttl_ms):
                try:
                    stored = self._stored()  # another process may have saved one since we looked
                    return self._adopt(stored) if self._usable(stored, failed) else self._fetch()
                finally:
                    self._tokens.unlock(REFRESH_LOCK, self._owner)
            for _ in range(self._wait_rounds):  # another process is refreshing: wait for its token
                self._sleep(self._poll)
                stored = self._stored()
                if self._usable(stored, failed):
                    return self._adopt(stored)
            log.warning("admin token refresh by another process did not finish in time; fetching one here")
            return self._fetch()

    def _stored(self) -> _Token | None:
        loaded = self._tokens.load_token(TOKEN_NAME)
        return _Token(*loaded) if loaded else None

    def _adopt(self, token: _Token) -> str:
        self._token = token
        return token.value

    def _fetch(self) -> str:
        """``/auth/get_admin_token`` (no token header; the body holds the secret and is never logged)."""
        endpoint = "/auth/get_admin_token"
        operation_id = self.new_operation_id("admin-token")
        try:
            data = self._post(endpoint, {"secret": self._config.secret, "userID": self._config.admin_user_id},
                              operation_id, None).data
        except OpenIMError as exc:
            exc.outcome_unknown = False  # the call the token was for was never made
            if exc.err_code in TOKEN_REFUSALS:
                self._refused(exc)
            raise
        value = data.get("token") if isinstance(data, dict) else None
        lifetime = data.get("expireTimeSeconds") if isinstance(data, dict) else None
        if not isinstance(value, str) or not value or not isinstance(lifetime, int):
            raise OpenIMError(endpoint=endpoint, operation_id=operation_id, http_status=200, retryable=True,
                              err_msg="answer lacks token/expireTimeSeconds")
        token = _Token(value, int(self._clock() * 1000) + lifetime * 1000)  # a duration, not a timestamp
        self._tokens.save_token(TOKEN_NAME, token.value, token.expires_ms)
        log.info("obtained a new OpenIM admin token for %s (operationID %s, valid %d s)",
                 self._config.admin_user_id, operation_id, lifetime,
                 extra={"event": "openim.token", "operation_id": operation_id})
        if self._refusal is not None:
            log.warning("OpenIM grants the admin token again: delivery resumes",
                        extra={"event": "openim.token_granted", "operation_id": operation_id})
            self._refusal = None
            self.metrics.admin_token_refused(None)
        return self._adopt(token)

    def _refused(self, exc: OpenIMError) -> None:
        """OpenIM refuses the admin token: remember it, and say so once (log, metric)."""
        exc.token_refused, exc.retryable = True, True
        if self._refusal is None:
            log.warning("OpenIM refuses the admin token for %s (%s): delivery waits without spending attempts "
                        "until it grants one; check [openim] secret and admin_user_id against OpenIM's share.yml",
                        self._config.admin_user_id, exc, extra={"event": "openim.token_refused_deployment",
                                                                "operation_id": exc.operation_id,
                                                                "err_code": exc.err_code})
        self._refusal = (exc, self._clock())
        self.metrics.admin_token_refused(exc.err_code)

    def _raise_recent_refusal(self) -> None:
        if self._refusal is None:
            return
        refusal, at = self._refusal
        if self._clock() - at < self._refusal_recheck:
            again = OpenIMError(endpoint=refusal.endpoint, operation_id=refusal.operation_id,
                                err_code=refusal.err_code, err_msg=refusal.err_msg, err_dlt=refusal.err_dlt,
                                http_status=refusal.http_status, retryable=True)
            again.token_refused = True
            raise again

    # -- messages ------------------------------------------------------------------
    def send_business_notification(self, *, send_user_id: str, key: str, data: str, recv_user_id: str | None = None,
                                   recv_group_id: str | None = None, reliability_level: int = 1,
                                   operation_id: str) -> SendResult:
        """``/msg/send_business_notification`` to one user or (OpenIM main only) one group.

        OpenIM v3.8.3 ignores ``recvGroupID``/``reliabilityLevel`` and answers a
        group target with HTTP 400, errCode 1001, errDlt ``Key: 'RecvUserID'
        Error:Field validation for 'RecvUserID' failed on the 'required' tag``.
        """
        if (recv_user_id is None) == (recv_group_id is None):
            raise ValueError("give exactly one of recv_user_id and recv_group_id")
        if not isinstance(data, str):
            raise TypeError("data must be a string (OpenIM rejects a JSON object)")
        body: dict[str, Any] = {"sendUserID": send_user_id, "key": key, "data": data, "sendMsg": False,
                                "reliabilityLevel": reliability_level}
        body.update({"recvUserID": recv_user_id} if recv_user_id is not None else {"recvGroupID": recv_group_id})
        reply, used = self._call("/msg/send_business_notification", body, operation_id, admin=True,
                                 same_id_on_retry=False)
        return _send_result(reply.data, used)

    def send_msg(self, *, send_id: str, content: dict[str, str], recv_id: str | None = None,
                 group_id: str | None = None, push_title: str = "", push_desc: str = "",
                 operation_id: str) -> SendResult:
        """A Custom (110) message to one user (sessionType 1) or one group (sessionType 3)."""
        if (recv_id is None) == (group_id is None):
            raise ValueError("give exactly one of recv_id and group_id")
        body = _custom_fields(send_id, content, push_title, push_desc)
        if recv_id is not None:
            body.update(recvID=recv_id, sessionType=SINGLE_CHAT)
        else:
            body.update(groupID=group_id, sessionType=GROUP_CHAT)
        reply, used = self._call("/msg/send_msg", body, operation_id, admin=True, same_id_on_retry=False)
        return _send_result(reply.data, used)

    def batch_send_msg(self, *, send_id: str, content: dict[str, str], recv_ids: Sequence[str],
                       push_title: str = "", push_desc: str = "", operation_id: str) -> BatchResult:
        """One Custom (110) message to up to 1,000 users; OpenIM sends them one by one."""
        ids = list(dict.fromkeys(recv_ids))  # a duplicate would be sent twice
        if len(ids) > MAX_IDS:
            raise ValueError(f"at most {MAX_IDS} recipients per batch_send_msg, got {len(ids)}")
        if not ids:
            return BatchResult([], ())
        body = _custom_fields(send_id, content, push_title, push_desc)
        body.update(sessionType=SINGLE_CHAT, isSendAll=False, recvIDs=ids)
        reply, _ = self._call("/msg/batch_send_msg", body, operation_id, admin=True, same_id_on_retry=False)
        data = reply.data if isinstance(reply.data, dict) else {}
        results = [r for r in data.get("results") or () if isinstance(r, dict) and isinstance(r.get("recvID"), str)]
        return BatchResult(results, tuple(data.get("failedUserIDs") or ()),
                           reply.body.decode("utf-8", "replace"))

    def check_msg_is_send_success(self, operation_id: str) -> bool:
        """Did the ``send_msg`` made with *operation_id* go through? (status 2, kept 24 h)."""
        reply, _ = self._call("/msg/check_msg_is_send_success", {}, operation_id, admin=True,
                              same_id_on_retry=True)  # the operationID is the question itself
        return isinstance(reply.data, dict) and reply.data.get("status") == 2

    # -- users and groups ------------------------------------------------------------
    def account_check(self, user_ids: Sequence[str]) -> dict[str, bool]:
        """Registered or not, per user (``/user/account_check``, admin; duplicates would be 1001)."""
        registered: dict[str, bool] = {}
        for chunk in _chunks(user_ids):
            data = self.call("/user/account_check", {"checkUserIDs": chunk},
                             operation_id=self.new_operation_id("account-check"))
            results = (data or {}).get("results") or ()
            status = {r.get("userID"): r.get("accountStatus") == 1 for r in results if isinstance(r, dict)}
            registered.update({uid: status.get(uid, False) for uid in chunk})
        return registered

    def group_member_ids(self, group_id: str) -> list[str]:
        """Member user IDs of *group_id*; OpenIM answers an unknown group with no members, not an error."""
        data = self.call("/group/get_group_member_user_id", {"groupID": group_id},
                         operation_id=self.new_operation_id("group-members"))
        return list((data or {}).get("userIDs") or ())

    def users_online(self, user_ids: Sequence[str]) -> dict[str, list[int]]:
        """Per user, the platform IDs of the connections online push reaches (empty list =
        offline), from every gateway. OpenIM's gateway skips iOS connections whose app is in
        the background (``hub_server.go`` pushToUser), so those are left out."""
        online: dict[str, list[int]] = {}
        for chunk in _chunks(user_ids):
            data = self.call("/user/get_users_online_status", {"userIDs": chunk},
                             operation_id=self.new_operation_id("users-online"))
            found = {}
            for entry in data or ():  # the answer also holds user tokens: never log it
                details = entry.get("detailPlatformStatus") or () if entry.get("status") == 1 else ()
                found[entry.get("userID")] = [d["platformID"] for d in details if isinstance(d, dict)
                                              and not (d.get("isBackground") and d.get("platformID") == IOS_PLATFORM)]
            online.update({uid: found.get(uid, []) for uid in chunk})
        return online


def _session_for(api_url: str) -> requests.Session:
    """A session that reads proxy settings once, not on every call (~0.2 ms each)."""
    session = requests.Session()
    session.trust_env = False
    session.proxies = requests.utils.get_environ_proxies(api_url)
    return session
