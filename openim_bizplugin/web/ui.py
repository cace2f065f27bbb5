"""The operator page, ``/ui`` (SPEC §8): server-rendered HTML behind the operator token.

Off unless ``[ui] token`` is set: then this blueprint is not registered at all
and ``/ui`` is a 404 like any unknown path. The page asks once for the token
in a form (compared in constant time) and then keeps Flask's signed session
cookie: HttpOnly, SameSite=Strict, scoped to ``/ui``, Secure when served over
HTTPS or when ``[ui] secure_cookie`` says so (behind a proxy that ends TLS).
Its signing key is derived from the token, so changing the token signs every
operator out. The cookie names a session kept in the store, shared by every
process and replica: signing out ends it there, so a copy of the cookie stops
working too, and so does a session unused for SESSION_HOURS. Every
state-changing request (a dead-letter replay, signing out) is a POST carrying
the session's CSRF token; signing in needs none, since it needs the operator
token, which a forging site does not have.

Failed sign-ins are counted in the store per client address (an IPv6 client by
its /64, which one host usually holds whole) and for all addresses together;
over either limit, sign-in is refused with 429 until the window ends, whatever
the token. Per address, so one guesser does not lock out every operator; in
all, so guessers on many addresses get no more tries than that.

Templates autoescape everything: recipient ids, errors and types are data an
API client chose. The page shows no secret, no envelope payload and no receipt
content, only whether a receipt came.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from flask import Blueprint, Flask, current_app, flash, redirect, render_template, request, session, url_for
from flask.sessions import SecureCookieSessionInterface
from werkzeug.exceptions import Forbidden, HTTPException

from ..errors import BizError
from ..services import Services
from ..store.base import DELIVERED_STATUSES, DeadLetter, FailedRecipient, PresenceCounts, RecentMessage, Store
from .api import rfc3339, summary_status

log = logging.getLogger(__name__)

bp = Blueprint("ui", __name__, url_prefix="/ui", template_folder="templates")

SESSION_HOURS = 8
SESSION_MS = SESSION_HOURS * 3_600_000
COOKIE_NAME = "bizplugin_ui"
SIGN_IN_WINDOW_MS = 600_000  # failed sign-ins are counted in windows of 10 minutes
SIGN_IN_FAILURES_PER_ADDRESS = 10
SIGN_IN_FAILURES_IN_ALL = 100
SHOWN_MESSAGES, SHOWN_RECIPIENTS, SHOWN_FAILURES, SHOWN_DEAD_LETTERS = 20, 50, 50, 50
# no scripts at all; the one stylesheet is inline in the template
CONTENT_SECURITY_POLICY = ("default-src 'none'; style-src 'unsafe-inline'; form-action 'self';"
                           " frame-ancestors 'none'; base-uri 'none'")


def init_app(app: Flask, token: str, *, secure_cookie: bool = False) -> None:
    """Turn the operator page on for *app*, guarded by *token*; *secure_cookie* marks the
    cookie Secure also when the request came over plain HTTP (from a proxy that ended TLS)."""
    app.secret_key = session_key(token)
    app.config.update(SESSION_COOKIE_NAME=COOKIE_NAME, SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict",
                      SESSION_COOKIE_SECURE=secure_cookie, PERMANENT_SESSION_LIFETIME=timedelta(hours=SESSION_HOURS))
    app.session_interface = _SessionInterface()
    app.extensions["bizplugin.ui_token_digest"] = _digest(token)
    app.register_blueprint(bp)


def session_key(token: str) -> bytes:
    """The session signing key: an HMAC of the operator token, never the token itself."""
    return hmac.new(token.encode(), b"openim-bizplugin ui session v1", hashlib.sha256).digest()


def _digest(text: str) -> bytes:
    """What a token is compared by: digests have one length, so a compare shows no length either."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class _SessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie session, sent only to the page (also when mounted under a path
    prefix) and marked Secure whenever the page is served over HTTPS or SESSION_COOKIE_SECURE."""

    def get_cookie_path(self, app: Flask) -> str:
        return request.script_root + (bp.url_prefix or "")

    def get_cookie_secure(self, app: Flask) -> bool:
        return request.is_secure or super().get_cookie_secure(app)


@dataclass(frozen=True)
class Overview:
    """Everything the page shows, read from the store in one go."""

    queue_depth: dict[str, int]
    presence: PresenceCounts
    messages: list[RecentMessage]
    failures: list[FailedRecipient]
    dead_letters: list[DeadLetter]
    now_ms: int


def read_overview(store: Store, now_ms: int) -> Overview:
    """What the operator page shows, as of *now_ms*."""
    return Overview(store.queue_depth(), store.presence_counts(),
                    store.recent_messages(SHOWN_MESSAGES, SHOWN_RECIPIENTS),
                    store.failed_recipients(SHOWN_FAILURES), store.dead_letters(SHOWN_DEAD_LETTERS), now_ms)


def _services() -> Services:
    return current_app.extensions["bizplugin"]


def _now_ms() -> int:
    return int(_services().clock() * 1000)


def _session_id(token: str) -> str:
    """What the store knows a session by: a digest, so a copy of the store opens no session."""
    return hashlib.sha256(token.encode()).hexdigest()


def _signed_in() -> bool:
    """A signed cookie naming a session the store still holds (used now: it lasts longer)."""
    if not (session.get("operator") is True and session.get("csrf") and isinstance(session.get("sid"), str)):
        return False
    now_ms = _now_ms()
    return _services().store.touch_session(_session_id(session["sid"]), now_ms, now_ms + SESSION_MS)


def _address_key() -> str:
    """Whose failed sign-ins these are: the client address, an IPv6 one by its /64."""
    address = request.remote_addr or "unknown"
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:  # ::ffff:192.0.2.1 is that IPv4 client
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


def _sign_in_refused_until() -> int | None:
    """When sign-in opens again for this address, if too many sign-ins failed lately."""
    store, now_ms = _services().store, _now_ms()
    # checked before the token and counted after it: requests racing past the check at once
    # may go a few over a limit, never more than the server's concurrent requests
    for name, limit in ((f"ui-sign-in:{_address_key()}", SIGN_IN_FAILURES_PER_ADDRESS),
                        ("ui-sign-in:*", SIGN_IN_FAILURES_IN_ALL)):
        failures, ends_ms = store.failures(name, now_ms)
        if failures >= limit:
            return ends_ms
    return None


def _count_failed_sign_in() -> None:
    store, now_ms = _services().store, _now_ms()
    store.count_failure(f"ui-sign-in:{_address_key()}", now_ms, SIGN_IN_WINDOW_MS)
    store.count_failure("ui-sign-in:*", now_ms, SIGN_IN_WINDOW_MS)


def _require_post_rights() -> None:
    """A state-changing POST needs a session and its CSRF token in the form."""
    if not _signed_in():
        raise Forbidden("sign in first")
    if not hmac.compare_digest(request.form.get("csrf", "").encode(), session["csrf"].encode()):
        raise Forbidden("the form's CSRF token is missing or stale; reload the page and try again")


@bp.get("")
def overview() -> Any:
    if not _signed_in():
        return render_template("ui/login.html", error=None)
    view = read_overview(_services().store, _now_ms())
    return render_template("ui/overview.html", view=view, csrf=session["csrf"])


@bp.post("/login")
def login() -> Any:
    refused_until = _sign_in_refused_until()
    if refused_until is not None:
        wait_s = max(-(-(refused_until - _now_ms()) // 1000), 1)
        log.warning("operator page: sign-in throttled for %s", request.remote_addr,
                    extra={"event": "ui.sign_in_throttled", "remote": request.remote_addr})
        error = f"Too many failed sign-ins. Try again in {-(-wait_s // 60)} minute(s)."
        return render_template("ui/login.html", error=error), 429, {"Retry-After": str(wait_s)}
    expected = current_app.extensions["bizplugin.ui_token_digest"]
    if not hmac.compare_digest(_digest(request.form.get("token", "")), expected):
        _count_failed_sign_in()
        log.warning("operator page: sign-in refused (wrong token) from %s", request.remote_addr,
                    extra={"event": "ui.sign_in_refused", "remote": request.remote_addr})
        return render_template("ui/login.html", error="That is not the operator token."), 401
    session_token, now_ms = secrets.token_urlsafe(32), _now_ms()
    _services().store.open_session(_session_id(session_token), now_ms, now_ms + SESSION_MS)
    session.clear()
    session.permanent = True  # the cookie ends after SESSION_HOURS, not only when the browser closes
    session.update(operator=True, csrf=secrets.token_urlsafe(32), sid=session_token)
    log.info("operator page: signed in from %s", request.remote_addr,
             extra={"event": "ui.signed_in", "remote": request.remote_addr})
    return redirect(url_for("ui.overview"), 303)


@bp.post("/logout")
def logout() -> Any:
    _require_post_rights()
    _services().store.close_session(_session_id(session["sid"]))  # in every process: copies of the cookie too
    session.clear()
    return redirect(url_for("ui.overview"), 303)


@bp.post("/dlq/<message_id>/replay")
def replay(message_id: str) -> Any:
    _require_post_rights()
    svc = _services()
    replayed = svc.store.replay_dead_letters(message_id, _now_ms())
    log.info("operator page: replayed %d recipients of dead letter %s", replayed, message_id,
             extra={"event": "ui.replay", "message_id": message_id, "recipients": replayed,
                    "remote": request.remote_addr})
    if replayed:
        svc.engine.wake()  # workers in this process deliver it now
        flash(f"Replayed message {message_id}: {replayed} recipient(s) queued again.", "ok")
    else:
        flash(f"Nothing to replay for message {message_id}: it is no longer a dead letter.", "warn")
    return redirect(url_for("ui.overview", _anchor="dead-letters"), 303)


@bp.errorhandler(HTTPException)
@bp.errorhandler(BizError)
def _error_page(exc: HTTPException | BizError) -> Any:
    if isinstance(exc, BizError):
        status, title, detail = exc.status, exc.title, exc.detail
    else:
        status, title, detail = exc.code or 500, exc.name, exc.description
    return render_template("ui/error.html", status=status, title=title, detail=detail), status


@bp.after_request
def _security_headers(response: Any) -> Any:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.app_template_filter("ui_time")
def _time(ms: int | None) -> str:
    return (rfc3339(ms) or "").replace("T", " ").replace("Z", " UTC")


@bp.app_template_global("ui_summary")
def _summary(counts: dict[str, int]) -> tuple[str, bool]:
    """A message's status word, and whether it needs a look (anything not delivered)."""
    return summary_status(list(counts)), not set(counts) <= set(DELIVERED_STATUSES)
