"""The retention sweep as a deployment runs it: configured, once per period, counted in /metrics.

What each store deletes is proven by the contract tests (``store_contract.py``);
here the app's own sweeper does it, on its clock (injected: no sleeping).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from conftest import message, write_config
from test_metrics import scrape
from openim_bizplugin.config import RetentionConfig, load_config
from openim_bizplugin.errors import ConfigError
from openim_bizplugin.retention import RetentionSweeper
from openim_bizplugin.store.base import Outcome


@pytest.fixture
def config_overrides() -> dict[str, Any]:
    return {"retention": {"finished_seconds": 60, "dead_letter_seconds": 120, "sweep_seconds": 10},
            "server": {"idempotency_retention_seconds": 60}}


def _sent(store: Any, clock: Any, failed: tuple[str, ...] = ()) -> None:
    now = int(clock() * 1000)
    items = store.lease(now, 100, 10_000, "w", lambda mid: f"op-{mid}")
    store.complete([(i, Outcome.failed("e", "refused") if i.target in failed else Outcome.sent("s", "c", now))
                    for i in items], now)


def test_retention_settings_have_their_defaults_and_are_checked(tmp_path):
    assert load_config(write_config(tmp_path)).retention == RetentionConfig(604_800, 2_592_000, 60)
    assert load_config(write_config(tmp_path)).callback_max_body_bytes == 256 * 1024
    for table, key, problem in (("retention", "sweep_seconds", "must be at least 1"),
                                ("retention", "finished_seconds", "must be an integer"),
                                ("callbacks", "max_body_bytes", "must be at least 1024")):
        path = write_config(tmp_path, {table: {key: 0 if problem.startswith("must be at") else "1d"}})
        with pytest.raises(ConfigError, match=f"^{table}.{key}: {re.escape(problem)}"):
            load_config(path)
    with pytest.raises(ConfigError, match="^retention.keep_seconds: unknown key"):
        load_config(write_config(tmp_path, {"retention": {"keep_seconds": 5}}))


def test_retention_shorter_than_the_idempotency_window_is_refused(tmp_path):
    """A message deleted before its idempotency key runs out would be stored and sent again on a retry."""
    with pytest.raises(ConfigError, match=r"^retention.finished_seconds: must be at least "
                                          r"server.idempotency_retention_seconds \(86400\)"):
        load_config(write_config(tmp_path, {"retention": {"finished_seconds": 3600}}))
    with pytest.raises(ConfigError, match=r"^retention.dead_letter_seconds: must be at least"):
        load_config(write_config(tmp_path, {"retention": {"dead_letter_seconds": 60},
                                            "server": {"idempotency_retention_seconds": 120}}))
    config = load_config(write_config(tmp_path, {"retention": {"finished_seconds": 600, "dead_letter_seconds": 600},
                                                 "server": {"idempotency_retention_seconds": 600}}))
    assert config.retention.finished_seconds == 600


def test_the_app_sweeps_finished_messages_after_finished_seconds_and_counts_them(app, signed, store, clock):
    sweeper = app.extensions["bizplugin"].retention
    done = signed.post(message()).get_json()["id"]
    dead = signed.post(message(to={"users": ["u3"]})).get_json()["id"]
    _sent(store, clock, failed=("u3",))
    assert sweeper.step() == 0  # notes both finished now
    # profile.updated is limited to 10/hour: its sends count for an hour, then finished_seconds run
    clock.advance(3_600 + 59)
    sweeper.step()
    assert store.get_message(done) is not None
    clock.advance(1)
    sweeper.step()
    assert store.get_message(done) is not None  # within the sweep's period: no second sweep
    clock.advance(9)
    sweeper.step()
    assert store.get_message(done) is None and store.get_message(dead) is not None
    clock.advance(60)
    sweeper.step()
    assert store.get_message(dead) is None
    metrics = scrape(app)
    assert metrics.value("bizplugin_retention_deleted_total", what="messages") == 2
    assert metrics.value("bizplugin_retention_deleted_total", what="recipients") == 3


def test_one_process_sweeps_per_period(app, signed, store, clock, config):
    first, other = app.extensions["bizplugin"].retention, RetentionSweeper(config, store, clock, owner="other")
    done = signed.post(message()).get_json()["id"]
    _sent(store, clock)
    first.step()  # takes the sweep's lock for a period (10 s of the store's own clock)
    clock.advance(3_600 + 60)
    other.step()
    assert store.get_message(done) is not None  # the first process holds this period
    first.step()
    assert store.get_message(done) is None


def test_processed_callbacks_forgotten_are_counted(app, clock):
    client = app.test_client()
    assert client.post("/openim/callback/test-callback-token-0001/callbackAfterUserOnlineCommand",
                       json={"userID": "u1", "platformID": 1, "seq": 1}).status_code == 200
    processor = app.extensions["bizplugin"].callbacks
    processor.step()
    clock.advance(3_601)
    processor._next_prune = 0
    processor.step()
    assert scrape(app).value("bizplugin_retention_deleted_total", what="callbacks") == 1
