"""The operator page ``/ui`` through Flask's test client.

What it shows comes from real work: messages accepted through the signed API,
delivered by the engine (stepped by hand) to the loopback fake OpenIM, users
reported online by the store's presence updates. The browser test
(``test_ui_browser.py``) builds on the same :class:`OperatorSidecar`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
from pathlib import Path
from typing import Any

import pytest

from conftest import write_config
from test_delivery import APPS, USERS, Sidecar
from openim_bizplugin.web.app import create_app
from openim_bizplugin.config import load_config
from openim_bizplugin.testing import FakeOpenIM
from openim_bizplugin.web.ui import (COOKIE_NAME, SESSION_HOURS, SIGN_IN_FAILURES_IN_ALL,
                                     SIGN_IN_FAILURES_PER_ADDRESS, SIGN_IN_WINDOW_MS, session_key)

TOKEN = "operator-token-0123456789abcdef"
EVIL = '<script>alert("pwned")</script>&amp;'  # a user id an API client may send: any string


class OperatorSidecar(Sidecar):
    """A :class:`Sidecar` whose app also serves the operator page behind *token*."""

    def __init__(self, tmp_path: Any, fake: FakeOpenIM, clock: Any, token: str = TOKEN, **delivery: Any) -> None:
        super().__init__(tmp_path, fake, clock, **delivery)
        config = dataclasses.replace(self.services.config, ui_token=token)
        self.app = create_app(config, clock=clock, services=self.services)
        self.api.client = self.app.test_client()

    def seed(self) -> dict[str, str]:
        """Delivered, failed and waiting work, and presence: the page has something to show."""
        ids = {"delivered": self.send(to={"users": ["u1", "u2"]}),
               "dead": self.send(mode="custom", to={"users": ["ghost", "u3"]})}
        self.drain()
        ids["waiting"] = self.send(to={"users": ["u1"]}, priority="high")
        now_ms = int(self.clock() * 1000)
        self.store.update_presence("u1", 1, True, 1, now_ms)
        self.store.update_presence("u2", 1, False, 1, now_ms)
        return ids


@pytest.fixture
def fake():
    with FakeOpenIM(users=USERS, online=APPS) as im:
        yield im


@pytest.fixture
def side(tmp_path, fake, clock):
    sidecar = OperatorSidecar(tmp_path, fake, clock)
    yield sidecar
    sidecar.services.close()


def sign_in(client: Any, token: str = TOKEN) -> Any:
    return client.post("/ui/login", data={"token": token})


def csrf_of(page: Any) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page.get_data(as_text=True)).group(1)


def page_text(client: Any) -> str:
    page = client.get("/ui")
    assert page.status_code == 200
    return page.get_data(as_text=True)


# -- on, off and signing in -------------------------------------------------------------
def test_without_a_ui_token_the_page_does_not_exist(app):
    client = app.test_client()
    unknown = client.get("/no-such-page")
    for response in (client.get("/ui"), client.post("/ui/login", data={"token": "x"}),
                     client.post("/ui/dlq/m1/replay", data={"csrf": "x"})):
        assert response.status_code == 404 and response.get_json() == unknown.get_json()
        assert "Set-Cookie" not in response.headers
    assert app.secret_key is None


def test_it_asks_for_the_token_and_a_wrong_one_gets_no_session(side):
    client = side.app.test_client()
    form = client.get("/ui")
    assert form.status_code == 200 and 'name="token"' in form.get_data(as_text=True)
    assert 'type="password"' in form.get_data(as_text=True) and "Set-Cookie" not in form.headers
    for wrong in (TOKEN[:-1], TOKEN + "x", "", TOKEN.upper()):
        refused = sign_in(client, wrong)
        assert refused.status_code == 401 and "Set-Cookie" not in refused.headers
        assert "not the operator token" in refused.get_data(as_text=True)
    assert client.post("/ui/login").status_code == 401  # no token field at all
    assert 'name="token"' in page_text(client) and "Queue depth" not in page_text(client)


def test_the_right_token_opens_a_session_cookie_that_scripts_cannot_read(side):
    client = side.app.test_client()
    signed_in = sign_in(client)
    assert signed_in.status_code == 303 and signed_in.headers["Location"] == "/ui"
    cookie = signed_in.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE_NAME}=")
    assert {"HttpOnly", "SameSite=Strict", "Path=/ui"} <= {part.strip() for part in cookie.split(";")}
    assert "Expires=" in cookie and "Secure" not in cookie  # served over plain HTTP here
    key = side.app.extensions["bizplugin.mount"].flask.secret_key  # the plugin's own app's, not the host's
    assert TOKEN not in cookie and key != TOKEN.encode() and side.app.secret_key is None
    assert key == hmac.new(TOKEN.encode(), b"openim-bizplugin ui session v1",
                                           hashlib.sha256).digest() == session_key(TOKEN)
    assert "Queue depth" in page_text(client)


def test_over_https_the_cookie_is_also_secure(side):
    client = side.app.test_client()
    cookie = client.post("/ui/login", data={"token": TOKEN}, base_url="https://ops.example").headers["Set-Cookie"]
    assert "Secure" in {part.strip() for part in cookie.split(";")}


def test_behind_a_proxy_that_ends_tls_secure_cookie_marks_it_secure(tmp_path, clock):
    config = load_config(write_config(tmp_path, {"ui": {"token": TOKEN, "secure_cookie": True}}))
    app = create_app(config, clock=clock)
    try:
        cookie = sign_in(app.test_client()).headers["Set-Cookie"]  # plain HTTP from the proxy
        assert "Secure" in {part.strip() for part in cookie.split(";")}
    finally:
        app.extensions["bizplugin"].close()


def test_behind_a_path_prefix_the_cookie_follows_the_page(side):
    client = side.app.test_client()
    signed_in = client.post("/ui/login", data={"token": TOKEN}, base_url="http://ops.example/bizplugin/")
    assert signed_in.headers["Location"] == "/bizplugin/ui" and "Path=/bizplugin/ui" in signed_in.headers["Set-Cookie"]


def test_a_session_signed_under_another_token_is_not_accepted(tmp_path, fake, clock, side):
    client = side.app.test_client()
    sign_in(client)
    (tmp_path / "rotated").mkdir()
    rotated = OperatorSidecar(tmp_path / "rotated", fake, clock, token="a-new-operator-token-000000")
    try:
        other = rotated.app.test_client()
        other.set_cookie(COOKIE_NAME, client.get_cookie(COOKIE_NAME, path="/ui").value, path="/ui")
        assert 'name="token"' in page_text(other)  # changing the token signed everyone out
    finally:
        rotated.services.close()


def test_pages_forbid_framing_scripts_and_caching(side):
    client = side.app.test_client()
    for response in (client.get("/ui"), sign_in(client), client.get("/ui")):
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
        assert "script-src" not in response.headers["Content-Security-Policy"]
        assert response.headers["X-Frame-Options"] == "DENY" and response.headers["Cache-Control"] == "no-store"


# -- what it shows -----------------------------------------------------------------------
def test_the_page_shows_queue_presence_messages_failures_and_dead_letters(side):
    ids = side.seed()
    client = side.app.test_client()
    sign_in(client)
    text = page_text(client)
    assert re.search(r'data-priority="high"><b>1</b>', text) and re.search(r'data-priority="low"><b>0</b>', text)
    assert re.search(r"<b>1</b><span>online</span>", text) and re.search(r"<b>1</b><span>offline</span>", text)
    for message_id in ids.values():
        assert f"<code>{message_id}</code>" in text
    assert text.index(ids["waiting"]) < text.index(f'data-message="{ids["delivered"]}"')  # newest first
    delivered = _details(text, ids["delivered"])
    assert 'class="status st-sent">sent</span>' in delivered and "2 sent" in delivered
    dead = _details(text, ids["dead"])
    assert "<code>ghost</code>" in dead and "1 failed, 1 sent" in dead and "errCode 1004" in dead
    assert 'class="status st-partial">partial</span>' in dead
    failures = _section(text, "failures")
    assert "<code>ghost</code>" in failures and "errCode 1004" in failures and "<code>u3</code>" not in failures
    dead_letters = _section(text, "dead-letters")
    assert f'action="/ui/dlq/{ids["dead"]}/replay"' in dead_letters and ">Replay</button>" in dead_letters
    assert TOKEN not in text and side.services.config.openim.secret not in text


def test_replay_without_the_csrf_token_is_refused_and_replays_nothing(side):
    dead = side.seed()["dead"]
    client = side.app.test_client()
    sign_in(client)
    for form in ({}, {"csrf": ""}, {"csrf": "forged"}):
        refused = client.post(f"/ui/dlq/{dead}/replay", data=form)
        assert refused.status_code == 403 and "CSRF" in refused.get_data(as_text=True)
    stranger = side.app.test_client()  # no session, even with a token from someone's page
    assert stranger.post(f"/ui/dlq/{dead}/replay", data={"csrf": csrf_of(client.get("/ui"))}).status_code == 403
    assert [d.message_id for d in side.store.dead_letters()] == [dead]
    assert [r["status"] for r in side.recipients(dead)] == ["failed", "sent"]


def test_replay_with_the_csrf_token_queues_the_failed_recipients_again(side, fake):
    dead = side.seed()["dead"]
    client = side.app.test_client()
    sign_in(client)
    replayed = client.post(f"/ui/dlq/{dead}/replay", data={"csrf": csrf_of(client.get("/ui"))})
    assert replayed.status_code == 303 and replayed.headers["Location"] == "/ui#dead-letters"
    assert [r["status"] for r in side.recipients(dead)] == ["queued", "sent"]
    assert side.store.dead_letters() == []
    text = page_text(client)
    assert f"Replayed message {dead}: 1 recipient(s) queued again." in text
    assert "No dead letters." in text and f"Replayed message {dead}" not in page_text(client)  # flashed once
    fake.add_users("ghost")
    side.drain()
    assert [r["status"] for r in side.recipients(dead)] == ["sent", "sent"]
    again = client.post(f"/ui/dlq/{dead}/replay", data={"csrf": csrf_of(client.get("/ui"))})
    assert again.status_code == 303 and "no longer a dead letter" in page_text(client)


def test_html_in_recipient_ids_is_shown_as_text(side):
    mid = side.send(mode="custom", to={"users": [EVIL]})
    side.drain()
    assert side.recipients(mid)[0]["status"] == "failed"
    client = side.app.test_client()
    sign_in(client)
    text = page_text(client)
    assert "<script" not in text and EVIL not in text
    escaped = "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;&amp;amp;"
    assert text.count(escaped) >= 2  # in the failures and the recent messages
    replayed = client.post(f"/ui/dlq/{mid}/replay", data={"csrf": csrf_of(client.get("/ui"))})
    assert replayed.status_code == 303


def test_sign_out_needs_the_csrf_token_and_ends_the_session(side):
    client = side.app.test_client()
    sign_in(client)
    assert client.post("/ui/logout").status_code == 403
    assert "Queue depth" in page_text(client)
    signed_out = client.post("/ui/logout", data={"csrf": csrf_of(client.get("/ui"))})
    assert signed_out.status_code == 303 and 'name="token"' in page_text(client)


def copy_of(source: Any, app: Any) -> Any:
    """Another browser (on *app*) holding a copy of *source*'s session cookie."""
    copy = app.test_client()
    copy.set_cookie(COOKIE_NAME, source.get_cookie(COOKIE_NAME, path="/ui").value, path="/ui")
    return copy


@pytest.fixture
def other_process(side, clock):
    """A second app on the same store, as another worker process or replica would be."""
    app = create_app(dataclasses.replace(side.services.config, ui_token=TOKEN), clock=clock)
    yield app
    app.extensions["bizplugin"].close()


def test_after_sign_out_a_copied_cookie_opens_nothing_in_any_process(side, other_process):
    client = side.app.test_client()
    sign_in(client)
    here, elsewhere = copy_of(client, side.app), copy_of(client, other_process)
    assert "Queue depth" in page_text(here) and "Queue depth" in page_text(elsewhere)  # one session, shared
    csrf = csrf_of(client.get("/ui"))
    assert client.post("/ui/logout", data={"csrf": csrf}).status_code == 303
    for copy in (here, elsewhere):
        assert 'name="token"' in page_text(copy)
        assert copy.post("/ui/dlq/m1/replay", data={"csrf": csrf}).status_code == 403
    signed_out_elsewhere = other_process.test_client()
    sign_in(signed_out_elsewhere)
    copy = copy_of(signed_out_elsewhere, side.app)
    signed_out_elsewhere.post("/ui/logout", data={"csrf": csrf_of(signed_out_elsewhere.get("/ui"))})
    assert 'name="token"' in page_text(copy)


def test_a_session_ends_after_hours_without_use_and_lasts_while_used(side, clock):
    used, idle = side.app.test_client(), side.app.test_client()
    sign_in(used), sign_in(idle)
    for _ in range(3):
        clock.advance(SESSION_HOURS * 3600 * 0.75)
        assert "Queue depth" in page_text(used)
    assert 'name="token"' in page_text(idle)


def failed_sign_in(client: Any, address: str) -> Any:
    return client.post("/ui/login", data={"token": "a-wrong-guess-of-the-token"}, environ_base={"REMOTE_ADDR": address})


def right_sign_in(client: Any, address: str) -> Any:
    return client.post("/ui/login", data={"token": TOKEN}, environ_base={"REMOTE_ADDR": address})


def test_failed_sign_ins_are_throttled_per_address_in_every_process(side, other_process, clock):
    client, elsewhere = side.app.test_client(), other_process.test_client()
    for n in range(SIGN_IN_FAILURES_PER_ADDRESS):
        assert failed_sign_in(client if n % 2 else elsewhere, "203.0.113.7").status_code == 401
    for app_client in (client, elsewhere):
        refused = right_sign_in(app_client, "203.0.113.7")  # even the right token: no more tries for now
        assert refused.status_code == 429 and "Set-Cookie" not in refused.headers
        assert int(refused.headers["Retry-After"]) == SIGN_IN_WINDOW_MS // 1000
        assert "Too many failed sign-ins" in refused.get_data(as_text=True)
    assert right_sign_in(client, "198.51.100.1").status_code == 303  # another operator is not locked out
    clock.advance(SIGN_IN_WINDOW_MS / 1000)
    assert right_sign_in(side.app.test_client(), "203.0.113.7").status_code == 303


def test_an_ipv6_client_counts_by_its_64_and_all_addresses_share_a_ceiling(side, clock):
    client = side.app.test_client()
    for n in range(SIGN_IN_FAILURES_PER_ADDRESS):
        failed_sign_in(client, f"2001:db8:0:1::{n + 1:x}")
    assert right_sign_in(client, "2001:db8:0:1:ffff::1").status_code == 429  # the same /64
    assert right_sign_in(client, "2001:db8:0:2::1").status_code == 303
    for n in range(SIGN_IN_FAILURES_PER_ADDRESS, SIGN_IN_FAILURES_IN_ALL):
        assert failed_sign_in(client, f"192.0.2.{n}").status_code == 401
    assert right_sign_in(side.app.test_client(), "198.51.100.1").status_code == 429  # guessers on many addresses
    clock.advance(SIGN_IN_WINDOW_MS / 1000)
    assert right_sign_in(side.app.test_client(), "198.51.100.1").status_code == 303


def test_storage_trouble_is_an_error_page_not_a_traceback(side):
    client = side.app.test_client()
    sign_in(client)
    side.store.close()  # drops the pooled connections; the next read opens a file that is not a database
    for leftover in Path(side.store.path).parent.glob(Path(side.store.path).name + "-*"):
        leftover.unlink()
    Path(side.store.path).write_bytes(b"this is not a database" * 100)
    broken = client.get("/ui")
    assert broken.status_code == 503 and "Storage unavailable" in broken.get_data(as_text=True)
    assert broken.mimetype == "text/html"


def test_the_page_is_served_from_a_config_file_with_a_ui_table(tmp_path, clock):
    config = load_config(write_config(tmp_path, {"ui": {"token": TOKEN}}))
    app = create_app(config, clock=clock)
    try:
        client = app.test_client()
        assert sign_in(client).status_code == 303 and "No messages yet." in page_text(client)
    finally:
        app.extensions["bizplugin"].close()


def _section(text: str, section_id: str) -> str:
    start = text.index(f'<section id="{section_id}">')
    return text[start:text.index("</section>", start)]


def _details(text: str, message_id: str) -> str:
    start = text.index(f'data-message="{message_id}"')
    return text[start:text.index("</details>", start)]
