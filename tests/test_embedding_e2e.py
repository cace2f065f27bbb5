"""End to end: docs/embedding_example.py, a shop's Flask app with the plugin under /biz, served by
gunicorn with two worker processes, delivering to the fake OpenIM over loopback (SPEC §9)."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from e2e_support import CALLBACK_TOKEN, CRM_SECRET, REPO, child_env, config_tables, stop, write_tables
from e2e_support import wait_for as wait_up_to
from openim_bizplugin.client import BizAPIError, BizClient
from openim_bizplugin.testing import FakeOpenIM
from test_delivery_crash import delivery_counts, envelope_id

EXAMPLE = REPO / "docs" / "embedding_example.py"
USERS = [f"u{n}" for n in range(1, 42)]  # u41: the worker test's
WAIT_SECONDS = 30
wait_for = functools.partial(wait_up_to, seconds=WAIT_SECONDS)
ORDER = {"status": "paid", "at": "2026-11-26T12:00:00Z"}


def plugin_config(folder: Path, openim_url: str, **delivery: object) -> Path:
    tables = config_tables(folder / "bizplugin.db")
    tables["openim"].update(api_url=openim_url, timeout_seconds=2)
    tables["delivery"].update(workers=2, backoff_base_seconds=0.05, backoff_max_seconds=0.2, lease_seconds=5,
                              **delivery)
    tables["clients.shop"] = {"secrets": ["shop-e2e-secret-0123456789ab"], "allowed_types": ["order.*"]}
    return write_tables(folder / "bizplugin.toml", tables)


@dataclass
class Host:
    url: str
    log: Path

    def started_pids(self) -> set[str]:
        """The processes that logged starting their background work."""
        return set(re.findall(r"background work started in process (\d+)", self.log.read_text()))


@contextlib.contextmanager
def gunicorn(config: Path, workers: int) -> Iterator[Host]:
    log = config.parent / "gunicorn.log"
    env = {**child_env(), "BIZPLUGIN_CONFIG": str(config)}
    with log.open("ab") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--workers", str(workers), "--bind", "127.0.0.1:0",
             "--no-control-socket", "--graceful-timeout", "5", "--pythonpath", str(EXAMPLE.parent),
             "embedding_example:app"],
            stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL, env=env, cwd=config.parent)
    try:
        found = wait_for("gunicorn to listen", lambda: process.poll() is None and re.search(
            r"Listening at: (http://127\.0\.0\.1:\d+)", log.read_text()))
        yield Host(found.group(1), log)
    finally:
        stop(process)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenIM]:
    with FakeOpenIM(users=[*USERS, "imAdmin"], online=USERS) as im:
        yield im


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory, fake: FakeOpenIM) -> Iterator[Host]:
    with gunicorn(plugin_config(tmp_path_factory.mktemp("embedded"), fake.url), workers=2) as running:
        yield running


def delivered_ids(fake: FakeOpenIM, user: str) -> list[str]:
    return [envelope_id(d) for d in fake.deliveries_to(user=user)]


def test_the_documented_example_is_the_one_tested() -> None:
    page = (REPO / "docs" / "embedding.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", page, re.DOTALL)
    assert EXAMPLE.read_text(encoding="utf-8") in blocks


def test_the_hosts_pages_stay_the_hosts(host: Host) -> None:
    assert requests.get(host.url + "/", timeout=10).json() == {"service": "shop", "version": 3}
    for path in ("/no-such-page", "/healthz", "/v1/types"):
        page = requests.get(host.url + path, timeout=10)
        assert page.status_code == 404 and page.text == "<h1>Shop</h1><p>There is no such page.</p>", path
    problem = requests.get(host.url + "/biz/no-such-page", timeout=10)
    assert problem.status_code == 404 and problem.headers["Content-Type"] == "application/problem+json"
    assert requests.get(host.url + "/biz/healthz", timeout=10).json() == {"status": "ok"}


def test_a_signed_request_under_the_prefix_is_delivered(host: Host, fake: FakeOpenIM) -> None:
    crm = BizClient(host.url + "/biz", "crm", CRM_SECRET)  # signs /biz/v1/messages, as sent
    answer = crm.send("profile.updated", 1, {"fields": ["nickname"]}, users=["u1"])
    wait_for("the delivery", lambda: delivered_ids(fake, "u1") == [answer["id"]])
    assert wait_for("the status", lambda: crm.status(answer["id"])["status"] == "sent")
    with pytest.raises(BizAPIError) as unsigned_prefix:
        BizClient(host.url, "crm", CRM_SECRET).send("profile.updated", 1, {"fields": ["x"]}, users=["u1"])
    assert unsigned_prefix.value.status == 404  # the host's: its API lives under /biz only


def test_a_callback_under_the_prefix_releases_a_held_message(host: Host, fake: FakeOpenIM) -> None:
    fake.set_online("u2", [])
    crm = BizClient(host.url + "/biz", "crm", CRM_SECRET)
    answer = crm.send("profile.updated", 1, {"fields": ["nickname"]}, users=["u2"], offline="hold")
    wait_for("the hold", lambda: crm.status(answer["id"])["status"] == "held")
    assert fake.deliveries_to(user="u2") == []
    fake.set_online("u2", [1])
    status, reply = fake.post_callback(f"{host.url}/biz/openim/callback/{CALLBACK_TOKEN}",
                                       "callbackAfterUserOnlineCommand", fake.user_online("u2", 1))
    assert (status, reply["actionCode"]) == (200, 0)
    wait_for("delivery after the online callback", lambda: delivered_ids(fake, "u2") == [answer["id"]])


def test_an_in_process_send_from_a_host_route_is_delivered(host: Host, fake: FakeOpenIM) -> None:
    made = requests.post(host.url + "/orders/SO-1/status", json={**ORDER, "buyer": "u3"}, timeout=10)
    assert made.status_code == 201, made.text
    message_id = made.json()["notification"]
    wait_for("the delivery", lambda: delivered_ids(fake, "u3") == [message_id])
    [sent] = fake.deliveries_to(user="u3")
    assert sent.key == "order.status_changed" and '"order_id":"SO-1"' in sent.data
    status = requests.get(f"{host.url}/notifications/{message_id}", timeout=10).json()
    assert status["client"] == "shop" and status["recipients"][0]["user_id"] == "u3"
    refused = requests.post(host.url + "/orders/SO-2/status", json={**ORDER, "status": "lost", "buyer": "u3"},
                            timeout=10)
    assert refused.status_code == 422 and refused.json()["errors"][0]["path"] == "/data/status"


def test_two_gunicorn_workers_deliver_each_message_once(host: Host, fake: FakeOpenIM) -> None:
    with ThreadPoolExecutor(8) as pool:
        def both_started() -> bool:  # concurrent requests reach both workers; each starts its own work
            list(pool.map(lambda _: requests.get(host.url + "/", timeout=10), range(8)))
            return len(host.started_pids()) == 2

        wait_for("both workers to start background work", both_started)
        crm = BizClient(host.url + "/biz", "crm", CRM_SECRET)
        signed = list(pool.map(lambda u: crm.send("profile.updated", 1, {"fields": ["nickname"]}, users=[u])["id"],
                               USERS[10:25]))
        in_process = list(pool.map(lambda u: requests.post(f"{host.url}/orders/SO-{u}/status",
                                                           json={**ORDER, "buyer": u}, timeout=10).json(),
                                   USERS[25:40]))
    ids = set(signed) | {made["notification"] for made in in_process}
    assert len(ids) == 30
    wait_for("every delivery", lambda: ids <= {envelope_id(d) for d in fake.delivered})
    counts = delivery_counts(fake)
    assert {key: n for key, n in counts.items() if key[0] in ids and n != 1} == {}
    assert len([key for key in counts if key[0] in ids]) == 30


WORKER_HOST = textwrap.dedent("""
    from flask import Flask
    from openim_bizplugin.web import BizPlugin

    app = Flask(__name__)
    biz = BizPlugin(app, url_prefix="/biz", background=False)
""")


def test_with_background_off_flask_bizplugin_worker_delivers(tmp_path: Path, fake: FakeOpenIM) -> None:
    config = plugin_config(tmp_path, fake.url)
    (tmp_path / "quiet_host.py").write_text(WORKER_HOST, encoding="utf-8")
    env = {**child_env(), "BIZPLUGIN_CONFIG": str(config), "FLASK_APP": "quiet_host:app",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    send = ("import logging; logging.basicConfig(level=logging.INFO);"
            "from quiet_host import app, biz; app.test_client().get('/biz/healthz');"
            "print(biz.send('profile.updated', 1, {'fields': ['nickname']}, users=['u41'], client='crm')['id'])")
    sent = subprocess.run([sys.executable, "-c", send], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=60)
    assert sent.returncode == 0, sent.stderr
    assert "background work started" not in sent.stderr and fake.deliveries_to(user="u41") == []
    worker = subprocess.Popen([sys.executable, "-m", "flask", "bizplugin", "worker"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the worker's delivery", lambda: delivered_ids(fake, "u41") == [sent.stdout.strip()])
    finally:
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert "delivering with 2 workers" in out
