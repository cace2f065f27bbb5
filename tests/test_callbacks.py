"""OpenIM callbacks: answered at once with "continue", stored once, processed after.

Payloads come from fixture files named by callbackCommand (shaped exactly
like OpenIM's, OPENIM.md §5) or from :class:`FakeOpenIM`'s builders, and are
posted the way OpenIM posts them: through Flask's test client, or over real
HTTP with ``FakeOpenIM.post_callback``. The processor is stepped by hand.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from werkzeug.serving import make_server

from conftest import message
from openim_bizplugin.callbacks.processing import CHUNK_SIZE, HANDLERS, PRUNE_EVERY_SECONDS, CallbackProcessor, natural_key
from openim_bizplugin.store.sqlite import SqliteStore
from openim_bizplugin.callbacks.subscribers import EVENT_TYPES
from openim_bizplugin.testing import FakeOpenIM

FIXTURES = Path(__file__).parent / "fixtures" / "callbacks"
CONTINUE = {"actionCode": 0, "errCode": 0, "errMsg": "", "errDlt": "", "nextCode": 0}
USERS = ("u1001", "u1", "u2", "imAdmin")


@pytest.fixture
def fake():
    with FakeOpenIM(users=USERS, groups={"g_ops": ["u1001", "u1"]}, online=USERS[:3]) as im:
        yield im


@pytest.fixture
def config_overrides(fake):
    return {"openim": {"api_url": fake.url, "timeout_seconds": 2.0},
            "delivery": {"workers": 1, "backoff_base_seconds": 1.0, "lease_seconds": 30.0}}


@pytest.fixture
def side(app, store, signed, fake):
    """The app with its callback blueprint and processor."""
    services = app.extensions["bizplugin"]
    services.store.event_types = EVENT_TYPES  # as if a subscriber listened to every event
    side = Side(app, services, signed, fake)
    yield side
    services.callbacks.stop()


class Side:
    """The sidecar under test and a few ways to talk to it."""

    def __init__(self, app, services, signed, fake) -> None:
        self.app, self.services, self.signed, self.fake = app, services, signed, fake
        self.store, self.processor, self.client = services.store, services.callbacks, app.test_client()
        self.token = services.config.callback_token

    def post(self, command: str, body: bytes | dict, token: str | None = None) -> Any:
        """POST like OpenIM's webhook client: Go JSON with a trailing newline, operationID header."""
        raw = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode() + b"\n"
        return self.client.post(f"/openim/callback/{token or self.token}/{command}", data=raw,
                                headers={"Content-Type": "application/json; charset=utf-8",
                                         "operationID": "op-test"})

    def process(self) -> int:
        self.services.spool.drain()  # callbacks that met a busy inbox wait in the spool
        total = 0
        while (done := self.processor.step()):
            total += done
        return total

    def inbox(self) -> list[tuple]:
        """(command, natural_key, done, error) of every stored callback."""
        with sqlite3.connect(self.store._inbox.path) as db:
            return db.execute("SELECT command, natural_key, done, error FROM callbacks ORDER BY id").fetchall()

    def recipient_column(self, server_msg_id: str, column: str) -> Any:
        with sqlite3.connect(self.store.path) as db:
            return db.execute(f"SELECT {column} FROM recipients WHERE server_msg_id = ?",
                              (server_msg_id,)).fetchone()[0]

    def send_custom(self, to: dict) -> str:
        """A custom-mode message through the API, delivered to the fake by one engine step."""
        response = self.signed.post(message(mode="custom", to=to), as_client="ops")
        assert response.status_code == 202, response.get_data(as_text=True)
        assert self.services.engine.step()
        return response.get_json()["id"]

    def recipients(self, message_id: str) -> list[dict]:
        return self.signed.get(f"/v1/messages/{message_id}", as_client="ops").get_json()["recipients"]

    def events(self, type_: str) -> list[dict]:
        return [e.data for e in self.store.events_after(0, 10_000) if e.type == type_]


def fixture_text(name: str) -> str:
    return (FIXTURES / f"{name}.json").read_text()


def fixture(name: str) -> dict:
    return json.loads(fixture_text(name))


def command_of(path: Path) -> str:
    return path.name.split(".", 1)[0]


ALL_FIXTURES = sorted(FIXTURES.glob("*.json"))


# -- every command --------------------------------------------------------------------------
@pytest.mark.parametrize("path", ALL_FIXTURES, ids=lambda p: p.stem)
def test_every_fixture_is_answered_with_continue_and_processed_cleanly(side, path):
    command = command_of(path)
    assert json.loads(path.read_text())["callbackCommand"] == command
    response = side.post(command, path.read_bytes() + b"\n")
    assert response.status_code == 200 and response.get_json() == CONTINUE
    assert response.mimetype == "application/json"
    side.process()
    if command in HANDLERS:
        assert [(c, done, error) for c, _key, done, error in side.inbox()] == [(command, 1, None)]
    else:  # understood and ignored: not stored
        assert side.inbox() == []


def test_fixture_fields_match_what_fake_openim_sends(fake):
    """Two independent readings of OpenIM's structs agree on names and order of the fields."""
    receipt = fake.receipt_message("u1001", "imAdmin", {"id": "m1", "status": "done"})
    built = {"callbackAfterSendSingleMsgCommand": fake.after_send_single_msg(receipt),
             "callbackAfterSendSingleMsgCommand.receipt": fake.after_send_single_msg(receipt),
             "callbackAfterSendGroupMsgCommand": fake.after_send_group_msg(receipt),
             "callbackAfterMsgSaveDBCommand": fake.after_msg_save_db(receipt, 17),
             "callbackAfterSingleMsgReadCommand": fake.single_msg_read("u1001", "si_imAdmin_u1001", [17]),
             "callbackAfterGroupMsgReadCommand": fake.group_msg_read("u1001", 42),
             "callbackAfterUserOnlineCommand": fake.user_online("u1001"),
             "callbackAfterUserOfflineCommand": fake.user_offline("u1001")}
    for name, payload in built.items():
        assert list(fixture(name)) == list(payload), name
    for path in ALL_FIXTURES:
        assert not path.read_text().endswith("\n"), f"{path.name}: one JSON object, no trailing newline"


def test_natural_keys():
    read = fixture("callbackAfterSingleMsgReadCommand")
    assert natural_key("callbackAfterSingleMsgReadCommand", read) == \
        natural_key("callbackAfterSingleMsgReadCommand", {**read, "Seqs": [17, 16]})
    online = fixture("callbackAfterUserOnlineCommand")
    assert natural_key("callbackAfterUserOnlineCommand", online) != \
        natural_key("callbackAfterUserOnlineCommand", {**online, "seq": online["seq"] + 1})
    assert natural_key("callbackAfterUserKickOffCommand", online) is None
    assert natural_key("callbackAfterSendSingleMsgCommand", {"sendID": "x"}).startswith("sha256:")


# -- what is refused, ignored or survived ----------------------------------------------------------
def test_wrong_token_is_404_and_nothing_is_stored(side):
    body = fixture_text("callbackAfterUserOnlineCommand").encode()
    for token in ("wrong", side.token[:-1], side.token + "x", side.token.upper()):
        response = side.post("callbackAfterUserOnlineCommand", body, token=token)
        assert response.status_code == 404
        assert response.mimetype == "application/problem+json"
        assert side.token not in response.get_data(as_text=True)
    assert side.inbox() == []


def test_unknown_command_answers_continue_and_stores_nothing(side):
    response = side.post("callbackAfterUserKickOffCommand", {"callbackCommand": "callbackAfterUserKickOffCommand",
                                                             "userID": "u1001", "seq": 1})
    assert response.get_json() == CONTINUE
    assert side.inbox() == []


@pytest.mark.parametrize("body", [b"", b"not json", b"\xff\xfe{}", b"[1, 2]", b"{" * 10, b"[" * 60_000, b"x" * 70_000],
                         ids=["empty", "text", "not-utf8", "array", "truncated", "too-deep", "over-the-limit"])
def test_unusable_bodies_still_answer_continue(side, body):
    response = side.post("callbackAfterSendSingleMsgCommand", body)
    assert response.status_code == 200 and response.get_json() == CONTINUE
    assert side.inbox() == []


def test_a_callback_the_store_refuses_is_answered_and_stored_once_the_store_recovers(side):
    with sqlite3.connect(side.store._inbox.path) as db:
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON callbacks BEGIN SELECT RAISE(FAIL, 'disk on fire'); END")
    response = side.post("callbackAfterUserOnlineCommand", fixture_text("callbackAfterUserOnlineCommand").encode())
    assert response.status_code == 200 and response.get_json() == CONTINUE
    assert side.services.spool.drain() == 0 and side.inbox() == []  # still refused: it waits in the spool
    with sqlite3.connect(side.store._inbox.path) as db:
        db.execute("DROP TRIGGER refuse")
    assert side.process() == 1
    assert side.inbox() == [("callbackAfterUserOnlineCommand", natural_key(
        "callbackAfterUserOnlineCommand", fixture("callbackAfterUserOnlineCommand")), 1, None)]
    assert side.store.presence(["u1001"])["u1001"].online


def test_an_unexpected_error_still_answers_continue(side, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")
    monkeypatch.setattr("openim_bizplugin.web.callbacks.take_callback", broken)
    response = side.post("callbackAfterUserOnlineCommand", fixture_text("callbackAfterUserOnlineCommand").encode())
    assert response.status_code == 200 and response.get_json() == CONTINUE
    assert "callback callbackAfterUserOnlineCommand lost: unexpected error" in caplog.text


class _LockedFromChunk(SqliteStore):
    """The app's files as another process sees them while a third one holds the main file's write
    lock (from the *locked_from*-th chunk of callbacks on): its writes wait 50 ms, then give up."""

    def __init__(self, path: str, locked_from: int) -> None:
        super().__init__(path, busy_timeout_ms=50)
        self.locker = sqlite3.connect(path, isolation_level=None)
        self.locked_from, self.chunks = locked_from, 0

    def batch(self):
        self.chunks += 1
        if self.chunks == self.locked_from:
            self.locker.execute("BEGIN IMMEDIATE")
        return super().batch()

    def unlock(self) -> None:
        self.locker.execute("ROLLBACK")


def test_storage_failure_while_processing_leaves_the_callback_for_later(side):
    side.post("callbackAfterUserOnlineCommand", side.fake.user_online("u1", 1, seq=9))
    locked = _LockedFromChunk(side.store.path, locked_from=1)
    processor = CallbackProcessor(side.services.config, locked, side.processor.clock)
    assert processor.step() == 0  # "database is locked": a failure of the moment
    assert [done for _, _, done, _ in side.inbox()] == [0]
    locked.unlock()
    assert processor.step() == 1
    assert side.store.presence(["u1"])["u1"].online
    locked.close()


def test_a_storage_failure_mid_round_keeps_what_was_applied_before_it(side):
    for n in range(CHUNK_SIZE + 1):
        side.post("callbackAfterUserOnlineCommand", side.fake.user_online(f"u{n}", 1, seq=9))
    locked = _LockedFromChunk(side.store.path, locked_from=2)
    processor = CallbackProcessor(side.services.config, locked, side.processor.clock)
    assert processor.step() == CHUNK_SIZE  # the round's chunks commit one by one, up to the failure
    assert [done for _, _, done, _ in side.inbox()] == [1] * CHUNK_SIZE + [0]
    assert side.store.presence(["u0"])["u0"].online and f"u{CHUNK_SIZE}" not in side.store.presence([f"u{CHUNK_SIZE}"])
    locked.unlock()
    assert processor.step() == 1
    locked.close()


def test_duplicate_callbacks_are_processed_once(side):
    body = fixture_text("callbackAfterUserOnlineCommand").encode()
    for _ in range(3):
        assert side.post("callbackAfterUserOnlineCommand", body).get_json() == CONTINUE
    assert side.process() == 1
    assert [e["user_id"] for e in side.events("user.online")] == ["u1001"]


def test_a_failing_callback_is_marked_and_the_rest_go_on(side):
    side.post("callbackAfterSendSingleMsgCommand", {"sendID": "imAdmin", "recvID": "u1001"})  # no serverMsgID
    side.post("callbackAfterUserOnlineCommand", side.fake.user_online("u1", seq=5))
    assert side.process() == 2
    (_, _, _, error), (_, _, _, fine) = side.inbox()
    assert "serverMsgID" in error and fine is None
    assert side.store.presence(["u1"])["u1"].online


def test_random_chat_to_the_sender_account_is_ignored_quietly(side):
    chat = fixture("callbackAfterSendSingleMsgCommand.receipt")
    contents = ("", "{}", '{"data":"hello"}', '{"data":"{\\"receipt\\":\\"x\\"}"}', '{"data":"{\\"ok\\":1}"}',
                json.dumps({"data": json.dumps({"receipt": {"id": ""}})}), json.dumps({"data": "[" * 60_000}))
    for n, content in enumerate(contents):
        side.post(chat["callbackCommand"], {**chat, "content": content, "serverMsgID": f"s-{n}"})
    side.post(chat["callbackCommand"], {**chat, "contentType": 101, "serverMsgID": "text"})
    assert side.process() == len(contents) + 1
    assert all(error is None for *_, error in side.inbox())
    assert side.events("receipt.received") == []


# -- presence -------------------------------------------------------------------------------------
def test_presence_is_ordered_by_seq_not_by_arrival(side):
    fake = side.fake
    side.post("callbackAfterUserOnlineCommand", fake.user_online("u1", 1, seq=200))
    side.post("callbackAfterUserOfflineCommand", fake.user_offline("u1", 1, seq=100))  # older, arrives later
    side.process()
    assert side.store.presence(["u1"])["u1"].online
    side.post("callbackAfterUserOfflineCommand", fake.user_offline("u1", 5, seq=300))  # another platform
    side.process()
    assert side.store.presence(["u1"])["u1"].online
    side.post("callbackAfterUserOfflineCommand", fake.user_offline("u1", 1, seq=400))
    side.process()
    assert not side.store.presence(["u1"])["u1"].online
    assert [e["user_id"] for e in side.events("user.offline")] == ["u1"]


# -- what callbacks tell about sent messages ----------------------------------------------------------
def test_after_send_and_online_push_of_a_custom_message(side):
    mid = side.send_custom({"users": ["u1001"]})
    [recipient] = side.recipients(mid)
    server_id, client_id = recipient["server_msg_id"], recipient["client_msg_id"]
    sent = fixture("callbackAfterSendSingleMsgCommand")
    side.post(sent["callbackCommand"], {**sent, "serverMsgID": server_id, "clientMsgID": client_id})
    push = fixture("callbackBeforeOnlinePushCommand")
    side.post(push["callbackCommand"], {**push, "clientMsgID": client_id})
    assert side.process() == 2
    assert side.recipient_column(server_id, "confirmed_ms") is not None
    assert side.recipient_column(server_id, "pushed_ms") is not None


def test_after_send_group_confirms_a_group_send(side):
    mid = side.send_custom({"groups": ["g_ops"]})
    [delivery] = side.fake.deliveries_to(group="g_ops")
    side.post("callbackAfterSendGroupMsgCommand", side.fake.after_send_group_msg(delivery))
    side.process()
    assert side.recipient_column(delivery.server_msg_id, "confirmed_ms") is not None
    assert side.recipients(mid)[0]["server_msg_id"] == delivery.server_msg_id


def test_read_flow_saved_seq_then_read(side):
    mid = side.send_custom({"users": ["u1001"]})
    [delivery] = side.fake.deliveries_to(user="u1001")
    side.post("callbackAfterMsgSaveDBCommand", side.fake.after_msg_save_db(delivery, 17))
    side.process()
    assert side.recipient_column(delivery.server_msg_id, "conversation_id") == "si_imAdmin_u1001"
    assert side.recipient_column(delivery.server_msg_id, "confirmed_ms") is not None
    side.post("callbackAfterSingleMsgReadCommand", side.fake.single_msg_read("u1001", "si_imAdmin_u1001", [17]))
    side.process()
    assert side.recipients(mid)[0]["status"] == "read"
    assert [e["message_id"] for e in side.events("message.read")] == [mid]


def test_callbacks_and_receipts_reach_each_user_of_a_custom_fan_out(side):
    mid = side.send_custom({"users": ["u1001", "u1", "u2"]})
    [call] = side.fake.calls_to("/msg/batch_send_msg")
    assert call.body["recvIDs"] == ["u1001", "u1", "u2"]  # one call for all three
    [first] = side.fake.deliveries_to(user="u1001")
    [second] = side.fake.deliveries_to(user="u1")
    side.post("callbackAfterSendSingleMsgCommand", side.fake.after_send_single_msg(first))
    side.post("callbackAfterMsgSaveDBCommand", side.fake.after_msg_save_db(first, 17))
    push = fixture("callbackBeforeOnlinePushCommand")
    side.post(push["callbackCommand"], {**push, "clientMsgID": second.client_msg_id, "userIDList": ["u1"],
                                        "content": json.dumps(second.content)})
    receipt = side.fake.receipt_message("u2", "imAdmin", {"id": mid, "status": "done"})
    side.post("callbackAfterSendSingleMsgCommand", side.fake.after_send_single_msg(receipt))
    assert side.process() == 4
    assert side.recipient_column(first.server_msg_id, "confirmed_ms") is not None
    assert first.client_msg_id == second.client_msg_id  # OpenIM builds a batch's message once
    assert side.recipient_column(second.server_msg_id, "pushed_ms") is not None
    assert side.recipient_column(first.server_msg_id, "pushed_ms") is None  # pushed to u1, not to u1001
    side.post("callbackAfterSingleMsgReadCommand", side.fake.single_msg_read("u1001", "si_imAdmin_u1001", [17]))
    side.process()
    recipients = {r["user_id"]: r for r in side.recipients(mid)}
    assert {user: r["status"] for user, r in recipients.items()} == {"u1001": "read", "u1": "sent",
                                                                       "u2": "acknowledged"}
    assert [recipients[u]["server_msg_id"] for u in ("u1001", "u1")] == [first.server_msg_id, second.server_msg_id]
    assert recipients["u2"]["server_msg_id"] == side.fake.deliveries_to(user="u2")[0].server_msg_id


def test_a_group_push_marks_the_group_recipient_only(side):
    mid = side.send_custom({"groups": ["g_ops"]})
    [delivery] = side.fake.deliveries_to(group="g_ops")
    push = fixture("callbackBeforeGroupOnlinePushCommand")
    side.post(push["callbackCommand"], {**push, "clientMsgID": delivery.client_msg_id, "groupID": "g_other"})
    side.post(push["callbackCommand"], {**push, "clientMsgID": delivery.client_msg_id, "groupID": "g_ops"})
    assert side.process() == 2
    assert all(error is None for *_, error in side.inbox())
    assert side.recipient_column(delivery.server_msg_id, "pushed_ms") is not None
    assert side.recipients(mid)[0]["status"] == "sent"


def test_a_read_callback_with_null_seqs_is_a_no_op_not_a_failure(side):
    mid = side.send_custom({"users": ["u1001"]})
    read = side.fake.single_msg_read("u1001", "si_imAdmin_u1001", [])
    side.post(read["callbackCommand"], {**read, "Seqs": None})  # the SDK sends nil when nothing is marked
    assert side.process() == 1
    assert [error for *_, error in side.inbox()] == [None]
    assert side.recipients(mid)[0]["status"] == "sent"


# -- over real HTTP -----------------------------------------------------------------------------------
@pytest.fixture
def webhook_url(side):
    """The sidecar on a real loopback port; the URL an operator puts in webhooks.yml."""
    server = make_server("127.0.0.1", 0, side.app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.port}/openim/callback/{side.token}"
    server.shutdown()
    server.server_close()


def test_receipt_flow_to_acknowledged(side, webhook_url):
    mid = side.send_custom({"users": ["u1001"]})
    receipt = side.fake.receipt_message("u1001", "imAdmin", {"id": mid, "status": "done", "choice": "accepted"})
    status, reply = side.fake.post_callback(webhook_url, "callbackAfterSendSingleMsgCommand",
                                            side.fake.after_send_single_msg(receipt))
    assert (status, reply) == (200, CONTINUE)
    side.process()
    [recipient] = side.recipients(mid)
    assert recipient["status"] == "acknowledged"
    assert recipient["receipt"] == {"id": mid, "status": "done", "choice": "accepted"}
    [event] = side.events("receipt.received")
    assert (event["message_id"], event["user_id"]) == (mid, "u1001")


def test_a_round_that_applied_callbacks_says_so(side):
    woken = []
    processor = CallbackProcessor(side.services.config, side.store, side.services.clock,
                                  on_change=lambda: woken.append(1))
    assert processor.step() == 0 and woken == []
    side.post("callbackAfterUserOnlineCommand", side.fake.user_online("u1", 1, seq=7))
    assert processor.step() == 1 and woken == [1]


def test_processed_callbacks_are_forgotten_after_the_retention(side):
    side.post("callbackAfterUserOnlineCommand", side.fake.user_online("u1", 1, seq=7))
    side.post("callbackAfterUserOfflineCommand", side.fake.user_offline("u1", 1, seq=8))
    processor = CallbackProcessor(side.services.config, side.store, side.services.clock)
    processor.step()
    assert len(side.inbox()) == 2  # kept for callbacks.retention_seconds (default 3,600 s)
    side.services.clock.advance(3_600 + PRUNE_EVERY_SECONDS)
    side.post("callbackAfterUserOnlineCommand", side.fake.user_online("u1", 1, seq=9))
    processor.step()  # applies the new one, then forgets the two old ones (the store contract
    assert [row[:3] for row in side.inbox()] == [  # shows unprocessed ones are never forgotten)
        ("callbackAfterUserOnlineCommand", natural_key("callbackAfterUserOnlineCommand",
                                                       side.fake.user_online("u1", 1, seq=9)), 1)]
    assert side.store.presence(["u1"])["u1"].online  # what they said stays applied


def test_presence_over_http_with_the_processor_running(side, webhook_url):
    side.processor.start()
    status, reply = side.fake.post_callback(webhook_url, "callbackAfterUserOnlineCommand",
                                            side.fake.user_online("u2", 2))
    assert (status, reply) == (200, CONTINUE)
    deadline = time.monotonic() + 5
    while "u2" not in side.store.presence(["u2"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert side.store.presence(["u2"])["u2"].online


def test_a_burst_while_delivery_is_busy_is_answered_fast_and_all_processed(side, webhook_url):
    fake, burst = side.fake, 500
    for n in range(4):
        side.signed.post(message(to={"users": ["u1", "u2"]}, idempotency_key=f"busy-{n}"), as_client="ops")
    fake.delay_next("/msg/send_business_notification", 0.25, times=8)
    side.services.engine.start(2)
    try:
        def post(n: int) -> tuple[float, int, Any]:
            started = time.perf_counter()
            status, reply = fake.post_callback(webhook_url, "callbackAfterUserOnlineCommand",
                                               fake.user_online(f"burst{n}", 1 + n % 5, seq=1_000 + n))
            return time.perf_counter() - started, status, reply

        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(post, range(burst)))
        busy = len(fake.calls_to("/msg/send_business_notification"))
    finally:
        side.services.engine.stop()
    assert busy >= 1, "the delivery engine was sending during the burst"
    assert all(status == 200 and reply == CONTINUE for _, status, reply in answers)
    assert max(seconds for seconds, _, _ in answers) < 2.0
    assert side.process() == burst
    inbox = side.inbox()
    assert len(inbox) == burst and all(done == 1 and error is None for *_, done, error in inbox)
    users = [f"burst{n}" for n in range(burst)]
    assert all(state.online for state in side.store.presence(users).values())
    assert len(side.store.presence(users)) == burst
