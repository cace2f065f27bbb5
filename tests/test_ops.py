"""/healthz and /readyz."""

from __future__ import annotations

import time

import pytest

from test_delivery import USERS, Sidecar
from openim_bizplugin.testing import FakeOpenIM


@pytest.fixture
def fake():
    with FakeOpenIM(users=USERS) as im:
        yield im


@pytest.fixture
def side(tmp_path, fake, clock):
    sidecar = Sidecar(tmp_path, fake, clock, openim={"timeout_seconds": 10})
    yield sidecar
    sidecar.services.close()


def test_healthz_and_readyz_when_all_is_well(side):
    client = side.app.test_client()
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["checks"] == {"storage": "ok", "openim": "ok"}
    assert ready.get_json()["openim_release"] == "main (configured)"


def test_readyz_shows_the_release_it_probed(tmp_path, clock):
    with FakeOpenIM(users=USERS, flavor="v3.8.3") as fake:
        sidecar = Sidecar(tmp_path, fake, clock, openim={"version": "auto"})
        try:
            assert sidecar.app.test_client().get("/readyz").get_json()["openim_release"] == "3.8 (detected)"
        finally:
            sidecar.services.close()


def test_readyz_is_503_naming_openim_when_the_token_cannot_be_had(side, fake):
    fake.refuse_connections()
    ready = side.app.test_client().get("/readyz")
    assert ready.status_code == 503
    body = ready.get_json()
    assert body["checks"]["storage"] == "ok" and "get_admin_token" in body["checks"]["openim"]
    assert "openIM123" not in ready.get_data(as_text=True)


def test_readyz_answers_within_a_few_seconds_when_openim_hangs(side, fake):
    fake.delay_next("/auth/get_admin_token", 8)
    started = time.monotonic()
    ready = side.app.test_client().get("/readyz")
    assert time.monotonic() - started < 5
    assert ready.status_code == 503 and "no answer" in ready.get_json()["checks"]["openim"]


def test_readyz_asks_openim_itself_not_the_token_it_holds(side, fake, clock):
    client = side.app.test_client()
    assert client.get("/readyz").status_code == 200  # the admin token is held from now on (90 days)
    fake.refuse_connections()  # OpenIM goes down
    clock.advance(3)  # past the few seconds an answer is reused
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "/user/account_check" in ready.get_json()["checks"]["openim"]
    fake.accept_connections()
    clock.advance(3)
    assert client.get("/readyz").status_code == 200


def test_readyz_with_a_held_token_answers_within_a_few_seconds_when_openim_hangs(side, fake, clock):
    client = side.app.test_client()
    assert client.get("/readyz").status_code == 200
    fake.delay_next("/user/account_check", 8, times=3)
    clock.advance(3)
    started = time.monotonic()
    ready = client.get("/readyz")
    assert time.monotonic() - started < 5
    assert ready.status_code == 503 and "no answer from OpenIM" in ready.get_json()["checks"]["openim"]


def test_readyz_reuses_an_answer_for_a_few_seconds_only(side, fake, clock):
    client = side.app.test_client()
    for _ in range(5):  # a probe storm costs OpenIM one call
        assert client.get("/readyz").status_code == 200
    assert len(fake.calls_to("/user/account_check")) == 1
    clock.advance(2.5)
    assert client.get("/readyz").status_code == 200
    assert len(fake.calls_to("/user/account_check")) == 2


def test_readyz_says_openim_refuses_the_admin_token(side, fake):
    fake.change_secret("changed-on-openim")
    ready = side.app.test_client().get("/readyz")
    assert ready.status_code == 503
    detail = ready.get_json()["checks"]["openim"]
    assert detail.startswith("OpenIM refuses the admin token") and "1002" in detail and "secret invalid" in detail
    assert "changed-on-openim" not in detail and "openIM123" not in detail
