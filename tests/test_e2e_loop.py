"""The whole loop over real HTTP: a sidecar process, the fake OpenIM, and a subscriber.

A message goes out through OpenIM; the app's receipt comes back as OpenIM's
after-send callback; the recipient turns ``acknowledged``; the subscriber
receives a ``receipt.received`` event that the ``standardwebhooks`` library
verifies as any receiver would. And a held message waits for the user's
online callback.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from e2e_support import (CALLBACK_TOKEN, config_tables, running_server, signed_get, signed_post, wait_for,
                          write_tables)
from openim_bizplugin.testing import FakeOpenIM

SUBSCRIBER_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class Subscriber:
    """A loopback receiver that verifies every event like a real subscriber would."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.rejected = 0
        self._hook = Webhook(SUBSCRIBER_SECRET)
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.port}/events"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _app(self, environ, start_response):
        request = Request(environ)
        try:
            self.events.append(self._hook.verify(request.get_data(), dict(request.headers)))
        except WebhookVerificationError:
            self.rejected += 1
            return Response("bad signature", status=400)(environ, start_response)
        return Response("", status=204)(environ, start_response)

    def close(self) -> None:
        self._server.shutdown()


@pytest.fixture
def fake() -> Iterator[FakeOpenIM]:
    with FakeOpenIM(users=["u1", "imAdmin"], online=["u1"]) as im:
        yield im


@pytest.fixture
def subscriber() -> Iterator[Subscriber]:
    receiver = Subscriber()
    yield receiver
    receiver.close()


@pytest.fixture
def server(tmp_path: Path, fake: FakeOpenIM, subscriber: Subscriber):
    tables = config_tables(tmp_path / "bizplugin.db")
    tables["openim"].update(api_url=fake.url, timeout_seconds=1)
    tables["delivery"].update(workers=2, backoff_base_seconds=0.05, backoff_max_seconds=0.2, lease_seconds=5)
    path = write_tables(tmp_path / "config.toml", tables)
    with path.open("a") as fh:
        fh.write(f'[[subscribers]]\nurl = "{subscriber.url}"\nsecret = "{SUBSCRIBER_SECRET}"\n'
                 'events = ["message.sent", "receipt.received"]\n')
    with running_server(path) as running:
        yield running


def _send(server, **body) -> str:
    raw = json.dumps({"version": 1, "to": {"users": ["u1"]}, **body}).encode()
    response = signed_post(server.url, raw, client="ops")
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _recipient(server, message_id: str) -> dict:
    return signed_get(server.url, f"/v1/messages/{message_id}", client="ops").json()["recipients"][0]


def _callback(fake: FakeOpenIM, server, command: str, payload: dict) -> None:
    status, reply = fake.post_callback(f"{server.url}/openim/callback/{CALLBACK_TOKEN}", command, payload)
    assert (status, reply["actionCode"], reply["nextCode"]) == (200, 0, 0)


def test_receipt_flows_from_callback_to_acknowledged_to_a_verified_event(server, fake, subscriber):
    message_id = _send(server, type="action.required", data={
        "action": "verify_identity", "title": "Verify", "body": "Tap to verify", "deep_link": "app://verify"})
    wait_for("the message to be sent", lambda: _recipient(server, message_id)["status"] == "sent")

    receipt = fake.receipt_message("u1", "imAdmin", {"id": message_id, "status": "done", "choice": "ok"})
    _callback(fake, server, "callbackAfterSendSingleMsgCommand", fake.after_send_single_msg(receipt))

    acknowledged = wait_for("the receipt", lambda: (r := _recipient(server, message_id))["status"] == "acknowledged"
                            and r)
    assert acknowledged["receipt"] == {"id": message_id, "status": "done", "choice": "ok"}
    events = wait_for("both events", lambda: len(subscriber.events) >= 2 and subscriber.events)
    assert [e["type"] for e in events] == ["message.sent", "receipt.received"]
    assert events[1]["data"]["message_id"] == message_id and events[1]["data"]["user_id"] == "u1"
    assert events[1]["data"]["receipt"]["status"] == "done"
    assert subscriber.rejected == 0


def test_held_message_goes_out_when_the_online_callback_arrives(server, fake):
    fake.set_online("u1", [])
    message_id = _send(server, type="profile.updated", data={"fields": ["nickname"]}, offline="hold")
    wait_for("the recipient to be held", lambda: _recipient(server, message_id)["status"] == "held")
    assert fake.deliveries_to(user="u1") == []

    fake.set_online("u1", [1])
    _callback(fake, server, "callbackAfterUserOnlineCommand", fake.user_online("u1", 1))
    wait_for("delivery after the online callback", lambda: _recipient(server, message_id)["status"] == "sent")
    assert len(fake.deliveries_to(user="u1")) == 1


def test_a_read_is_tracked_from_the_hooks_openim_fires_itself(server, fake):
    # main: sending fires afterSendSingleMsg and (stored) afterMsgSaveDB with the seq read callbacks name
    hooks = fake.fire_hooks(f"{server.url}/openim/callback/{CALLBACK_TOKEN}")
    message_id = _send(server, type="action.required", data={
        "action": "verify_identity", "title": "Verify", "body": "Tap to verify", "deep_link": "app://verify"})
    wait_for("the message to be sent", lambda: _recipient(server, message_id)["status"] == "sent")
    assert hooks.join()
    posted = {result.command: result for result in hooks.results}  # two workers: in either order
    assert sorted(posted) == ["callbackAfterMsgSaveDBCommand", "callbackAfterSendSingleMsgCommand"]
    assert all(result.status == 200 for result in posted.values())
    seq = posted["callbackAfterMsgSaveDBCommand"].payload["seq"]
    hooks.push("callbackAfterSingleMsgReadCommand", fake.single_msg_read("u1", "si_imAdmin_u1", [seq]))
    wait_for("the read", lambda: _recipient(server, message_id)["status"] == "read")
