"""OpenIM refusing the admin token is the deployment's state, not the messages' (issue 16, point 4).

``/auth/get_admin_token`` answering 1002 (wrong secret), 1001 (not an admin
user id) or 1004 (admin user missing) holds for every message alike: the
recipients wait without spending attempts, ``/readyz`` is not ready and says
why, a log line and a gauge say it too, and delivery resumes by itself once
OpenIM grants a token. The engine is stepped by hand against the loopback
FakeOpenIM, with the clock injected; the secret rotation also runs end to end
through a ``serve`` process.
"""

from __future__ import annotations

import json
import logging

import pytest
import requests

from e2e_support import config_tables, running_server, signed_get, signed_post, write_tables
from test_delivery import APPS, USERS, Sidecar
from e2e_support import wait_for
from openim_bizplugin.testing import FakeOpenIM

RECHECK = 5.0  # [openim] token_recheck_seconds


@pytest.fixture
def fake():
    with FakeOpenIM(users=USERS, groups={"g1": ["u1", "u2"]}, online=APPS) as im:
        yield im


def _send_mixed(side: Sidecar) -> list[str]:
    """A notification to two users, a custom fan-out to three (one batch_send_msg), a group."""
    return [side.send(to={"users": ["u1", "u2"]}), side.send(mode="custom", to={"users": ["u1", "u2", "u3"]}),
            side.send(to={"groups": ["g1"]})]


def _statuses(side: Sidecar, ids: list[str]) -> list[tuple[str, int]]:
    return [(r["status"], r["attempts"]) for mid in ids for r in side.recipients(mid)]


def _steps(side: Sidecar, rounds: int) -> None:
    for _ in range(rounds):
        side.engine.step()
        side.clock.advance(RECHECK / 2)


def test_recipients_wait_without_attempts_and_resume_once_openim_grants_a_token(tmp_path, fake, clock, caplog):
    caplog.set_level(logging.INFO)
    fake.change_secret("rotated-on-openim")  # the sidecar still has the old one
    side = Sidecar(tmp_path, fake, clock)
    ids = _send_mixed(side)
    _steps(side, 6)
    assert _statuses(side, ids) == [("queued", 0)] * 6  # nothing failed, no attempt spent
    assert not fake.delivered
    # asked again every token_recheck_seconds, not every round of every worker
    assert len(fake.calls_to("/auth/get_admin_token")) <= 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("OpenIM refuses the admin token" in w for w in warnings) == 1  # once, not per round
    assert "1002" in warnings[0] and "rotated-on-openim" not in caplog.text and "openIM123" not in caplog.text

    fake.change_secret("openIM123")  # OpenIM's secret is set back: no restart of the sidecar
    clock.advance(RECHECK)
    side.drain()
    assert _statuses(side, ids) == [("sent", 1)] * 6
    assert sorted(d.recv_id or d.group_id for d in fake.delivered) == ["g1", "u1", "u1", "u2", "u2", "u3"]
    assert any("grants the admin token again" in r.getMessage() for r in caplog.records)
    side.services.close()


def test_a_refusal_in_the_middle_of_a_round_spends_no_attempt(tmp_path, fake, clock):
    side = Sidecar(tmp_path, fake, clock)
    side.engine.sender.openim.admin_token()  # held from earlier work
    fake.change_secret("rotated-on-openim")  # the held token now fails (1505); a new one is refused (1002)
    ids = _send_mixed(side)
    assert side.engine.step() == 6  # leased: the held token looked good
    recipients = [r for mid in ids for r in side.recipients(mid)]
    assert {(r["status"], r["attempts"]) for r in recipients} == {("queued", 0)}
    assert all("OpenIM refuses the admin token" in r["last_error"] for r in recipients)
    assert not fake.delivered
    side.services.close()


def test_secret_rotation_nothing_fails_and_all_is_delivered_after_the_fix(tmp_path, fake, clock):
    """OpenIM gets a new secret; messages keep coming; the operator then gives the sidecar the
    new secret and restarts it: every message arrives, none failed, no attempt was lost."""
    side = Sidecar(tmp_path, fake, clock, max_attempts=2)
    before = side.send(to={"users": ["u1"]})
    side.drain()
    fake.change_secret("n3w-secret")
    during = _send_mixed(side)
    _steps(side, 10)  # far more rounds than max_attempts
    assert _statuses(side, during) == [("queued", 0)] * 6
    ready = side.app.test_client().get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["checks"]["openim"].startswith("OpenIM refuses the admin token")
    assert 'bizplugin_openim_admin_token_refused{err_code="1002"} 1.0' in _metrics(side)
    side.services.close()

    fixed = Sidecar(tmp_path, fake, clock, max_attempts=2, openim={"secret": "n3w-secret"})  # same store
    fixed.drain()
    assert _statuses(fixed, [before]) == [("sent", 1)]
    assert _statuses(fixed, during) == [("sent", 1)] * 6
    assert fixed.app.test_client().get("/readyz").status_code == 200
    assert 'bizplugin_openim_admin_token_refused{err_code="1002"} 1.0' not in _metrics(fixed)
    fixed.services.close()


@pytest.mark.parametrize("code", [1001, 1004])
def test_an_unknown_admin_user_waits_too_and_resumes_when_openim_lists_it(tmp_path, fake, clock, code):
    if code == 1001:
        fake.set_admin_user_ids(["ops-admin"])  # imAdmin is no admin any more
    else:
        fake.remove_users("imAdmin")  # listed, but its user record is gone
    side = Sidecar(tmp_path, fake, clock)
    mid = side.send(to={"users": ["u1"]})
    _steps(side, 4)
    assert _statuses(side, [mid]) == [("queued", 0)]
    assert f'bizplugin_openim_admin_token_refused{{err_code="{code}"}} 1.0' in _metrics(side)
    fake.set_admin_user_ids(["ops-admin", "imAdmin"])  # and created again, as OpenIM does at start
    clock.advance(RECHECK)
    side.drain()
    assert _statuses(side, [mid]) == [("sent", 1)]
    metrics = _metrics(side)
    assert f'bizplugin_openim_admin_token_refused{{err_code="{code}"}} 1.0' not in metrics
    assert 'bizplugin_recipients_failed_total{type="profile.updated"}' not in metrics
    side.services.close()


def test_an_admin_dropped_while_its_token_is_held_waits_instead_of_failing(tmp_path, fake, clock):
    """OpenIM restarts without imAdmin in imAdminUser.userIDs: the token the sidecar holds still parses,
    but every admin route answers 1002. A fresh token is asked for and refused (1001): nothing fails."""
    side = Sidecar(tmp_path, fake, clock)
    side.engine.sender.openim.admin_token()  # held from earlier work
    fake.set_admin_user_ids(["ops-admin"])
    ids = _send_mixed(side)
    _steps(side, 4)
    assert _statuses(side, ids) == [("queued", 0)] * 6
    assert 'bizplugin_openim_admin_token_refused{err_code="1001"} 1.0' in _metrics(side)
    fake.set_admin_user_ids(["ops-admin", "imAdmin"])
    clock.advance(RECHECK)
    side.drain()
    assert _statuses(side, ids) == [("sent", 1)] * 6
    side.services.close()


def _metrics(side: Sidecar) -> str:
    return side.app.test_client().get("/metrics").get_data(as_text=True)


# -- end to end: a serve process, real time ----------------------------------------------------
def test_secret_rotation_end_to_end_through_serve(tmp_path, fake):
    tables = config_tables(tmp_path / "bizplugin.db")
    tables["openim"].update(api_url=fake.url, timeout_seconds=1, token_recheck_seconds=0.2)
    tables["delivery"].update(workers=2, max_attempts=2, backoff_base_seconds=0.05, backoff_max_seconds=0.1,
                              lease_seconds=5)
    path = write_tables(tmp_path / "config.toml", tables)

    def send(server, users: list[str]) -> str:
        body = json.dumps({"type": "profile.updated", "version": 1, "data": {"fields": ["nickname"]},
                           "to": {"users": users}}).encode()
        answer = signed_post(server.url, body, client="ops")
        assert answer.status_code == 202, answer.text
        return answer.json()["id"]

    def recipients(server, mid: str) -> list[dict]:
        return signed_get(server.url, f"/v1/messages/{mid}", client="ops").json()["recipients"]

    with running_server(path) as server:
        first = send(server, ["u1"])
        wait_for("the first message", lambda: recipients(server, first)[0]["status"] == "sent")
        fake.change_secret("n3w-secret")
        waiting = [send(server, ["u1", "u2"]), send(server, ["u3"])]
        wait_for("the refusal", lambda: len(fake.calls_to("/auth/get_admin_token")) >= 4)
        assert [r["status"] for mid in waiting for r in recipients(server, mid)] == ["queued"] * 3
        ready = wait_for("/readyz to say why", lambda: (r := _get(server, "/readyz")).status_code == 503 and r.json())
        assert "OpenIM refuses the admin token" in ready["checks"]["openim"]
        assert "n3w-secret" not in server.stderr() and "openIM123" not in server.stderr()

    tables["openim"]["secret"] = "n3w-secret"  # the operator's fix: the new secret, and a restart
    write_tables(path, tables)
    with running_server(path) as server:
        wait_for("every waiting message", lambda: all(r["status"] == "sent" for mid in waiting
                                                   for r in recipients(server, mid)))
        assert all(r["attempts"] == 1 for mid in waiting for r in recipients(server, mid))
        assert _get(server, "/readyz").status_code == 200


def _get(server, path: str) -> requests.Response:
    return requests.get(server.url + path, timeout=10)
