"""Subscriber events: signed, filtered, in order, retried until taken, each exactly once.

Every request goes to a real HTTP receiver on 127.0.0.1 that verifies it with the
``standardwebhooks`` library, as a subscriber's own service would. Events come from
real store operations (presence reports, delivery outcomes). The dispatcher's clock
starts at the real time, because receivers check ``webhook-timestamp`` against theirs
(5 minutes either way); backoff is passed by moving that clock, never by sleeping.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import socket
import threading
import time
from collections import deque
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from conftest import Clock, message
from openim_bizplugin.background import IDLE_POLL_SECONDS
from openim_bizplugin.config import SubscriberConfig
from openim_bizplugin.errors import ConfigError
from openim_bizplugin.store.base import Outcome
from openim_bizplugin.callbacks.subscribers import SubscriberDispatcher, rfc3339, sign

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
MESSAGE_EVENTS = ("message.sent", "message.failed", "message.expired", "message.read", "receipt.received")
PRESENCE_EVENTS = ("user.online", "user.offline")


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


@dataclasses.dataclass
class Received:
    id: str
    timestamp: str
    payload: Any  # the verified JSON, or None when verification failed
    error: str | None
    status: int


class Receiver:
    """A subscriber's endpoint: verifies each request with standardwebhooks, answers as scripted."""

    def __init__(self, secret: str) -> None:
        self.webhook = Webhook(secret)
        self.statuses: deque[int] = deque()  # answered in order, then 200 (400 when unverified)
        self.hang = threading.Event()  # set: hold each answer until released
        self.release = threading.Event()
        self.requests: list[Received] = []
        self.server = make_server("127.0.0.1", 0, self._wsgi, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks?team=ops"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def _wsgi(self, environ: dict, start_response: Any) -> Any:
        request = Request(environ)
        body, headers = request.get_data(), dict(request.headers)
        try:
            payload, error = self.webhook.verify(body, headers), None
        except WebhookVerificationError as exc:
            payload, error = None, str(exc)
        status = self.statuses.popleft() if self.statuses else (200 if error is None else 400)
        self.requests.append(Received(headers.get("Webhook-Id", ""), headers.get("Webhook-Timestamp", ""),
                                      payload, error, status))
        if self.hang.is_set():
            self.release.wait(5)
        return Response("ok", status=status)(environ, start_response)

    @property
    def taken(self) -> list[Received]:
        """Requests verified and answered 2xx: what the subscriber's service acted on."""
        return [r for r in self.requests if r.error is None and r.status < 300]

    def types(self) -> list[str]:
        return [r.payload["type"] for r in self.taken]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.thread.join(5)


@pytest.fixture
def clock() -> Clock:
    return Clock(time.time())  # overrides conftest's fixed clock: receivers compare with real time


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make(secret: str | None = None) -> tuple[Receiver, str]:
        secret = secret or new_secret()
        made.append(Receiver(secret))
        return made[-1], secret
    yield make
    for receiver in made:
        receiver.close()


@pytest.fixture
def dispatcher(config, store, clock):
    """Builds a dispatcher for the given subscribers and lets it register (take its cursors)."""
    def make(*subscribers: SubscriberConfig, register: bool = True, **options: Any) -> SubscriberDispatcher:
        options.setdefault("timeout_seconds", 2.0)
        store.event_types = frozenset(e for sub in subscribers for e in sub.events)  # as Services.build does
        d = SubscriberDispatcher(dataclasses.replace(config, subscribers=subscribers), store, clock=clock,
                                 rand=lambda: 0.5, **options)
        if register:
            assert d.step() == 0  # nothing yet: new subscribers start after the newest event
        return d
    return make


def now_ms(clock: Clock) -> int:
    return int(clock() * 1000)


def presence(store, clock: Clock, user: str, *reports: bool) -> None:
    """Presence reports for *user* on one platform: each True/False flips online/offline."""
    for seq, online in enumerate(reports, start=1):
        assert store.update_presence(user, 1, online, seq, now_ms(clock))


def deliver(signed, store, clock: Clock, *, failed: tuple[str, ...] = ("u2",)) -> str:
    """Accept a message to u1 and u2 through the API and record its delivery outcomes."""
    message_id = signed.post(message(), as_client="ops").get_json()["id"]
    items = store.lease(now_ms(clock), 10, 30_000, "worker", lambda hint: f"op-{hint}-{time.monotonic_ns()}")
    results = [(item, Outcome.failed("errCode 1004", "OpenIM refused it") if item.target in failed
                else Outcome.sent(f"srv-{item.target}", f"cli-{item.target}", now_ms(clock)))
               for item in items]
    assert store.complete(results, now_ms(clock)) == len(items) == 2
    return message_id


def drain(d: SubscriberDispatcher, rounds: int = 50) -> None:
    for _ in range(rounds):
        if not d.step():
            return
    raise AssertionError("the dispatcher kept finding work")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- signing --------------------------------------------------------------------------------
def test_sign_is_what_standardwebhooks_verifies_and_a_wrong_secret_is_refused():
    secret, body, now = new_secret(), b'{"type":"user.online","data":{"user_id":"\xc3\xa9"}}', int(time.time())
    headers = {"webhook-id": "evt_1", "webhook-timestamp": str(now),
               "webhook-signature": sign(secret, "evt_1", now, body)}
    assert Webhook(secret).verify(body, headers)["type"] == "user.online"
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, {**headers, "webhook-id": "evt_2"})


def test_rfc3339_keeps_milliseconds_exactly():
    assert rfc3339(1_795_694_400_123) == "2026-11-26T12:00:00.123Z"
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"


@pytest.mark.parametrize("secret, events, problem", [
    ("whsec_not-base64!", ["user.online"], "subscribers[0].secret"),
    ("whsec_", ["user.online"], "subscribers[0].secret"),
    (None, ["message.snet"], "subscribers[0].events: unknown event 'message.snet'"),
])
def test_bad_subscriber_settings_refuse_to_start(config, store, secret, events, problem):
    sub = SubscriberConfig("http://127.0.0.1:1/x", secret or new_secret(), tuple(events))
    with pytest.raises(ConfigError, match=re.escape(problem)):
        SubscriberDispatcher(dataclasses.replace(config, subscribers=(sub,)), store)


# -- delivery ---------------------------------------------------------------------------------
def test_events_arrive_signed_in_order_filtered_per_subscriber(dispatcher, receivers, signed, store, clock):
    people, people_secret = receivers()
    ledger, ledger_secret = receivers()
    d = dispatcher(SubscriberConfig(people.url, people_secret, PRESENCE_EVENTS),
                   SubscriberConfig(ledger.url, ledger_secret, ("message.sent", "message.failed")))
    presence(store, clock, "u1", True, False, True)
    message_id = deliver(signed, store, clock)
    drain(d)

    assert people.types() == ["user.online", "user.offline", "user.online"]
    assert [r.payload["data"] for r in people.taken] == [{"user_id": "u1", "platform_id": 1}] * 3
    assert sorted(ledger.types()) == ["message.failed", "message.sent"]
    by_type = {r.payload["type"]: r.payload for r in ledger.taken}
    assert by_type["message.sent"]["data"]["message_id"] == message_id
    assert by_type["message.sent"]["data"]["user_id"] == "u1"
    assert by_type["message.failed"]["data"]["user_id"] == "u2"
    assert by_type["message.failed"]["data"]["reason"] == "OpenIM refused it"
    events = {e.id: e for e in store.events_after(0, 100)}
    for r in people.taken + ledger.taken:
        assert RFC3339_MS.match(r.payload["timestamp"])
        assert r.payload["timestamp"] == rfc3339(events[r.id].created_ms)
        assert r.payload["type"] == events[r.id].type and r.timestamp == str(int(clock()))
    assert len(people.requests) == 3 and len(ledger.requests) == 2  # nothing unsubscribed was sent
    assert d.step() == 0


def test_wrong_secret_is_refused_by_the_receiver_and_retried_later(dispatcher, receivers, store, clock):
    receiver, _ = receivers()
    d = dispatcher(SubscriberConfig(receiver.url, new_secret(), PRESENCE_EVENTS))
    presence(store, clock, "u1", True)
    assert d.step() == 0
    [attempt] = receiver.requests
    assert attempt.error == "No matching signature found" and attempt.status == 400
    cursor = store.subscriber_cursor(receiver.url)
    assert cursor.attempts == 1 and cursor.last_error == "HTTP 400 BAD REQUEST"
    assert cursor.next_attempt_ms == now_ms(clock) + 500  # full jitter, rand 0.5, base 1 s


def test_subscriber_down_for_a_while_then_gets_every_event_once(dispatcher, receivers, store, clock):
    receiver, secret = receivers()
    d = dispatcher(SubscriberConfig(receiver.url, secret, PRESENCE_EVENTS))
    presence(store, clock, "u1", True, False)
    receiver.statuses.extend([200, 503, 502, 503])  # takes the first, then down for three attempts
    assert d.step() == 1
    cursor = store.subscriber_cursor(receiver.url)
    assert (cursor.attempts, cursor.last_error) == (1, "HTTP 503 SERVICE UNAVAILABLE")
    assert cursor.last_seq == store.events_after(0, 1)[0].seq  # the first one's success is kept

    presence(store, clock, "u2", True, False)  # more events while it is down
    assert d.step() == 0 and len(receiver.requests) == 2  # backing off: no request before it is due
    for expected_attempts in (2, 3):
        clock.advance(10)
        assert d.step() == 0
        assert store.subscriber_cursor(receiver.url).attempts == expected_attempts
    clock.advance(10)
    drain(d)

    events = [e.id for e in store.events_after(0, 100)]
    assert [r.id for r in receiver.taken] == events  # all, in order, each once
    assert [r.id for r in receiver.requests[1:5]] == [events[1]] * 4  # the retries kept the webhook-id
    assert len({r.timestamp for r in receiver.requests[1:5]}) == 4  # ... with each attempt's own timestamp
    cursor = store.subscriber_cursor(receiver.url)
    assert (cursor.attempts, cursor.last_error, cursor.last_seq) == (0, None, store.events_after(0, 100)[-1].seq)


def test_a_down_subscriber_does_not_delay_a_healthy_one(dispatcher, receivers, store, clock):
    healthy, secret = receivers()
    down_url = f"http://127.0.0.1:{free_port()}/hooks?token=sekrit"
    down_secret = new_secret()
    d = dispatcher(SubscriberConfig(down_url, down_secret, PRESENCE_EVENTS),
                   SubscriberConfig(healthy.url, secret, PRESENCE_EVENTS))
    presence(store, clock, "u1", True, False)
    assert d.step() == 2
    assert healthy.types() == ["user.online", "user.offline"]
    cursor = store.subscriber_cursor(down_url)
    assert cursor.attempts == 1 and cursor.last_error.startswith("ConnectionError: ")
    assert "\n" not in cursor.last_error and "sekrit" not in cursor.last_error
    assert down_secret not in cursor.last_error and down_secret[6:] not in cursor.last_error
    presence(store, clock, "u2", True)
    assert d.step() == 1 and healthy.types()[-1] == "user.online"


def test_log_lines_name_event_and_subscriber_but_no_secret(dispatcher, receivers, store, clock, caplog):
    healthy, secret = receivers()
    port = free_port()
    down_url = f"http://user:pa55word@127.0.0.1:{port}/hooks?token=sekrit"
    d = dispatcher(SubscriberConfig(down_url, new_secret(), PRESENCE_EVENTS),
                   SubscriberConfig(healthy.url, secret, PRESENCE_EVENTS))
    presence(store, clock, "u1", True)
    with caplog.at_level("DEBUG", logger="openim_bizplugin.callbacks.subscribers"):
        d.step()
    [event] = store.events_after(0, 1)
    lines = [r.getMessage() for r in caplog.records]
    assert any(event.id in line and "user u1" in line and healthy.url.split("?")[0] in line for line in lines)
    assert any(event.id in line and f"http://127.0.0.1:{port}/hooks " in line for line in lines)
    for line in caplog.text.splitlines():
        assert "sekrit" not in line and "pa55word" not in line and secret[6:] not in line
        for sub in d.subscribers:
            assert sub.secret[6:] not in line


def test_a_hanging_subscriber_times_out_and_others_still_get_theirs(dispatcher, receivers, store, clock):
    slow, slow_secret = receivers()
    fast, fast_secret = receivers()
    slow.hang.set()
    d = dispatcher(SubscriberConfig(slow.url, slow_secret, PRESENCE_EVENTS),
                   SubscriberConfig(fast.url, fast_secret, PRESENCE_EVENTS), timeout_seconds=0.3)
    presence(store, clock, "u1", True)
    started = time.monotonic()
    assert d.step() == 1
    assert time.monotonic() - started < 2
    # the read timeout and the POST's wall-clock deadline are both 0.3 s here: either ends it
    assert store.subscriber_cursor(slow.url).last_error.startswith(("ReadTimeout: ", "DeadlineExceeded: "))
    assert fast.types() == ["user.online"]


def test_a_new_subscriber_starts_after_existing_events(dispatcher, receivers, store, clock):
    receiver, secret = receivers()
    presence(store, clock, "u1", True, False)  # before the subscriber existed
    d = dispatcher(SubscriberConfig(receiver.url, secret, PRESENCE_EVENTS), register=False)
    assert d.step() == 0 and receiver.requests == []
    presence(store, clock, "u2", True)
    drain(d)
    assert [r.payload["data"]["user_id"] for r in receiver.taken] == ["u2"]


def test_each_round_is_bounded_and_skips_unsubscribed_events(dispatcher, receivers, store, clock):
    receiver, secret = receivers()
    d = dispatcher(SubscriberConfig(receiver.url, secret, ("user.online",)), batch_size=2)
    store.event_types = PRESENCE_EVENTS  # as if another subscriber listened to user.offline
    presence(store, clock, "u1", True, False, True, False, True)  # online, offline, online, offline, online
    assert [d.step() for _ in range(4)] == [2, 2, 1, 0]
    assert receiver.types() == ["user.online"] * 3 and len(receiver.requests) == 3
    assert store.subscriber_cursor(receiver.url).last_seq == store.events_after(0, 100)[-1].seq


def test_two_entries_for_one_url_keep_separate_cursors(dispatcher, receivers, signed, store, clock):
    receiver, secret = receivers()
    d = dispatcher(SubscriberConfig(receiver.url, secret, ("user.online",)),
                   SubscriberConfig(receiver.url, secret, ("message.sent",)))
    presence(store, clock, "u1", True)
    deliver(signed, store, clock)
    drain(d)
    assert sorted(receiver.types()) == ["message.sent", "user.online"]
    events = store.events_after(0, 100)
    assert store.subscriber_cursor(receiver.url).last_seq == events[-1].seq
    assert store.subscriber_cursor(receiver.url + "#1").last_seq == events[-1].seq


def test_a_subscriber_another_process_is_serving_is_left_alone(dispatcher, receivers, store, clock):
    receiver, secret = receivers()
    d = dispatcher(SubscriberConfig(receiver.url, secret, PRESENCE_EVENTS))
    presence(store, clock, "u1", True)
    assert store.try_lock(f"subscriber:{receiver.url}", "other-process", 60_000)
    assert d.step() == 0 and receiver.requests == []
    store.unlock(f"subscriber:{receiver.url}", "other-process")
    assert d.step() == 1 and receiver.types() == ["user.online"]


def test_idle_seconds_waits_for_the_earliest_due_subscriber(dispatcher, receivers, store, clock):
    receiver, secret = receivers()
    d = dispatcher(SubscriberConfig(receiver.url, secret, PRESENCE_EVENTS))
    assert d.idle_seconds() == IDLE_POLL_SECONDS  # nothing waiting
    receiver.statuses.append(503)
    presence(store, clock, "u1", True)
    assert d.step() == 0
    assert d.idle_seconds() == pytest.approx(0.5)  # its backoff
    clock.advance(0.5)
    assert d.idle_seconds() > 0  # due now (served by the next step), but never a busy spin


def test_the_loop_delivers_in_a_thread_when_woken(dispatcher, receivers, store, clock):
    receiver, secret = receivers()
    d = dispatcher(SubscriberConfig(receiver.url, secret, PRESENCE_EVENTS))
    d.start()
    try:
        presence(store, clock, "u1", True)
        d.wake()
        deadline = time.monotonic() + 5
        while not receiver.taken and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        d.stop()
    assert receiver.types() == ["user.online"]


def test_a_subscriber_gets_events_from_before_its_sender_first_looked(dispatcher, receivers, store, clock):
    # serve: the HTTP processes may deliver (and record message.sent) before the background
    # process's dispatcher takes its first round; the subscriber was added when the service started
    receiver, secret = receivers()
    d = dispatcher(SubscriberConfig(receiver.url, secret, PRESENCE_EVENTS), register=False)
    d.enrol()  # Services.build, as the service starts
    presence(store, clock, "u2", True)
    drain(d)
    assert [r.payload["data"]["user_id"] for r in receiver.taken] == ["u2"]
