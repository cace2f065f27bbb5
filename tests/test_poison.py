"""No single bad input stops a pipeline (issue 18).

A callback with a field of the wrong type, a value the store refuses or a read
of 300,000 seqs fails alone (or is applied) and the callbacks after it go on,
across a restart too; a message whose stored row is malformed, or a recipient
whose send raises, fails on its own and the round delivers the rest.
"""

from __future__ import annotations

import json
import sqlite3

import pytest

from conftest import message
from test_callbacks import CONTINUE, config_overrides, fake, side  # noqa: F401 - fixtures used below
from openim_bizplugin.delivery.engine import build_engine
from openim_bizplugin.delivery.sending import Sender
from openim_bizplugin.errors import StorageRejected, StorageUnavailable
from openim_bizplugin.web.app import create_app
from openim_bizplugin.store.sqlite import SqliteStore

ONLINE = "callbackAfterUserOnlineCommand"


# -- callbacks ------------------------------------------------------------------------------------
def test_a_presence_callback_with_a_list_for_its_user_fails_alone(side):
    side.post(ONLINE, {"callbackCommand": ONLINE, "userID": ["x"], "platformID": 1, "seq": 1})
    side.post(ONLINE, side.fake.user_online("u1", seq=5))
    assert side.process() == 2
    (_, _, done, error), (_, _, _, fine) = side.inbox()
    assert done == 1 and error == "TypeError: userID must be a string, not list" and fine is None
    assert side.store.presence(["u1"])["u1"].online


def test_a_write_the_store_refuses_fails_that_callback_and_the_rest_go_on(side):
    with sqlite3.connect(side.store.path) as db:  # a constraint: the same write fails however often it is tried
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON presence WHEN NEW.user_id = 'poison'"
                   " BEGIN SELECT RAISE(ABORT, 'not this one'); END")
    side.post(ONLINE, side.fake.user_online("poison", seq=5))
    side.post(ONLINE, side.fake.user_online("u1", seq=5))
    assert side.process() == 2
    (_, _, _, error), (_, _, _, fine) = side.inbox()
    assert error.startswith("rejected by the store: ") and "not this one" in error and fine is None
    assert "poison" not in side.store.presence(["poison"]) and side.store.presence(["u1"])["u1"].online


def test_a_poison_callback_left_pending_by_the_previous_release_is_failed_after_a_restart(side, config, clock):
    side.services.callbacks.stop()
    store = side.store  # as the previous release left the inbox: the poison first in line, for good
    store.record_callback(ONLINE, "poison", json.dumps({"userID": ["x"], "platformID": 1, "seq": 1}), 1)
    store.record_callback(ONLINE, "fine", json.dumps(side.fake.user_online("u1", seq=5)), 2)
    side.services.close()

    restarted = create_app(config, clock=clock)
    services = restarted.extensions["bizplugin"]
    try:
        assert services.callbacks.step() == 2
        assert services.store.presence(["u1"])["u1"].online
        assert services.store.pending_callbacks(10) == []
    finally:
        services.close()


def test_a_read_of_300000_seqs_is_applied(side):
    mid = side.send_custom({"users": ["u1001"]})
    [delivery] = side.fake.deliveries_to(user="u1001")
    side.post("callbackAfterMsgSaveDBCommand", side.fake.after_msg_save_db(delivery, 299_999))
    side.process()
    read = side.fake.single_msg_read("u1001", "si_imAdmin_u1001", list(range(1, 300_001)))
    # over callbacks.max_body_bytes at the door, so stored as a release with a larger cap stored it
    side.store.record_callback("callbackAfterSingleMsgReadCommand", "big-read", json.dumps(read), 3)
    assert side.process() == 1
    assert side.inbox()[-1][3] is None and side.recipients(mid)[0]["status"] == "read"


@pytest.fixture
def body_caps(fake):
    return {"openim": {"api_url": fake.url}, "server": {"max_body_bytes": 4096},
            "callbacks": {"token": "test-callback-token-0001", "max_body_bytes": 8192}}


def test_callbacks_have_their_own_body_cap_and_a_larger_body_is_still_answered_continue(body_caps, tmp_path,
                                                                                         clock):
    from conftest import write_config
    from openim_bizplugin.config import load_config
    from test_metrics import scrape

    app = create_app(load_config(write_config(tmp_path, body_caps)), clock=clock)
    client, store = app.test_client(), app.extensions["bizplugin"].store
    url = "/openim/callback/test-callback-token-0001/" + ONLINE
    under = {"userID": "u1", "platformID": 1, "seq": 1, "pad": "x" * 6_000}  # over server.max_body_bytes
    over = {"userID": "u2", "platformID": 1, "seq": 1, "pad": "x" * 9_000}
    assert client.post(url, json=under).get_json() == CONTINUE
    assert client.post(url, json=over).get_json() == CONTINUE
    assert [json.loads(c.body)["userID"] for c in store.pending_callbacks(10)] == ["u1"]
    assert scrape(app).value("bizplugin_callbacks_received_total", command=ONLINE, result="too-large") == 1
    app.extensions["bizplugin"].close()


# -- the store's errors -------------------------------------------------------------------------------
def test_the_store_tells_a_refused_write_from_a_failure_of_the_moment(tmp_path):
    store = SqliteStore(tmp_path / "x.db", busy_timeout_ms=20)
    with pytest.raises(StorageRejected, match="binding"):
        with store._write() as db:
            db.execute("INSERT INTO presence VALUES (?, 1, 1, 1, 1)", (["x"],))
    over = sqlite3.connect(":memory:").getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) + 1  # this build's
    with pytest.raises(StorageRejected, match="too many SQL variables"):
        store._read("SELECT 1 WHERE 1 IN (%s)" % ",".join("?" * over), tuple(range(over)))
    locker = sqlite3.connect(store.path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    with pytest.raises(StorageUnavailable, match="locked") as caught:
        store.update_presence("u1", 1, True, 1, 1)
    assert not isinstance(caught.value, StorageRejected)
    locker.execute("ROLLBACK")
    assert store.update_presence("u1", 1, True, 1, 1)
    locker.close(), store.close()


# -- delivery -----------------------------------------------------------------------------------------
def _accept_two(side) -> tuple[str, str]:
    ids = [side.signed.post(message(to={"users": [user]}), as_client="ops").get_json()["id"] for user in ("u1", "u2")]
    return ids[0], ids[1]


@pytest.mark.parametrize("column, value", [("delivery", "not json"), ("delivery", "[1]"), ("priority", "urgent")])
def test_a_malformed_stored_message_fails_alone_and_the_round_delivers_the_rest(side, column, value):
    bad, good = _accept_two(side)
    with sqlite3.connect(side.store.path) as db:
        db.execute(f"UPDATE messages SET {column} = ? WHERE id = ?", (value, bad))
    assert side.services.engine.step() == 2
    assert side.recipients(good)[0]["status"] == "sent" and side.fake.deliveries_to(user="u2")
    [failed] = side.recipients(bad)
    assert failed["status"] == "failed" and "could not be sent: its stored" in failed["reason"]
    assert not side.fake.deliveries_to(user="u1")


class _RaisingFor(Sender):
    """A sender whose call for one user raises what OpenIM's answers never do (a bug, a value it cannot encode)."""

    def send_unit(self, unit, decide):
        if unit[0].target == "u1":
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        return super().send_unit(unit, decide)


def test_a_recipient_whose_send_raises_fails_alone(side):
    bad, good = _accept_two(side)
    engine = build_engine(side.services.config, side.store, side.services.openim, side.services.release,
                          side.services.clock, "w")
    engine.sender = _RaisingFor(side.services.config, side.services.openim, side.store, side.services.release,
                                side.services.clock)
    assert engine.step() == 2
    assert side.recipients(good)[0]["status"] == "sent"
    [failed] = side.recipients(bad)
    assert failed["status"] == "failed" and "UnicodeEncodeError" in failed["last_error"]
