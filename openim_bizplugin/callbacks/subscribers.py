"""Subscriber events (SPEC §7): the store's event outbox, POSTed to subscribers, signed.

The store writes each event in the same transaction as the change it reports
(ordered by ``seq``, each with a stable ``evt_…`` id). Every configured
subscriber has its own cursor in the store: the last ``seq`` it took (answered
2xx, or was not subscribed to) and its retry state. A round reads the events
after each due subscriber's cursor and POSTs the ones it subscribed to, in
order, saving the cursor after every success: a crash re-sends at most one
event, under the same ``webhook-id``, on which receivers deduplicate. Anything
but a 2xx stops that subscriber until its backoff has passed; the others go on
from their own cursors. Events are never given up: they wait, in order, until
the subscriber answers 2xx.

Each subscriber has its own pace: ``start()`` runs a loop per subscriber, and
every POST ends by a wall-clock deadline (``timeout_seconds``, the answer
included: :mod:`.deadline`), so one that is slow, trickles its answer or is
down never delays the others.

Requests are signed by the Standard Webhooks scheme (``webhook-id``,
``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256>``), so
receivers verify them with the ``standardwebhooks`` library.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import requests

from ..background import IDLE_POLL_SECONDS, BackgroundLoop
from ..config import Config, SubscriberConfig
from ..errors import ConfigError, StorageUnavailable
from ..retry import backoff_seconds
from ..store.base import EventRecord, Store, SubscriberCursor
from .deadline import DeadlineExceeded, DeadlineSession

log = logging.getLogger(__name__)

EVENT_TYPES = frozenset({"message.sent", "message.failed", "message.expired", "message.read",
                         "receipt.received", "user.online", "user.offline"})
SECRET_PREFIX = "whsec_"
MIN_POLL_SECONDS = 0.05  # a due subscriber another process is serving: look again soon, but do not spin
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ANSWER_LIMIT = 64 * 1024  # bytes of a subscriber's answer read so its connection can be reused


# -- signing ---------------------------------------------------------------------------
# Standard Webhooks signing is one HMAC-SHA256 over "id.timestamp.body": a few lines of
# the standard library, so the sidecar needs no dependency for it at run time. The tests
# verify every request with the ``standardwebhooks`` library, as a receiver would.
def signing_key(secret: str) -> bytes:
    """The HMAC key in a ``whsec_<base64>`` secret; ValueError when it is not one."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("must be a Standard Webhooks secret (whsec_<base64>)")
    text = secret[len(SECRET_PREFIX):]
    try:
        # strict standard base64 (padding optional, as receivers accept it): the receiver
        # library silently drops characters outside the alphabet, so a URL-safe secret
        # would give it another key than ours -- refuse it here instead
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise ValueError("the part after whsec_ must be standard base64") from None
    if not key:
        raise ValueError("the key after whsec_ is empty")
    return key


def _signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for *body*: ``v1,<base64 signature>``."""
    return _signature(signing_key(secret), msg_id, timestamp, body)


# -- payloads ----------------------------------------------------------------------------
def rfc3339(ms: int) -> str:
    """Milliseconds since the epoch as RFC 3339 UTC, e.g. ``2026-11-26T12:00:00.123Z``."""
    moment = _EPOCH + timedelta(milliseconds=ms)  # exact: no float rounding of the milliseconds
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def event_body(event: EventRecord) -> bytes:
    """The JSON a subscriber receives for *event* (SPEC §7)."""
    payload = {"type": event.type, "timestamp": rfc3339(event.created_ms), "data": event.data}
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def shown_url(url: str) -> str:
    """*url* for logs and errors: without user info, query or fragment, which may hold credentials."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


@dataclass(frozen=True)
class Subscriber:
    """One configured subscriber, ready to send to; ``name`` names its cursor in the store."""

    name: str
    url: str
    shown: str
    events: frozenset[str]
    key: bytes = field(repr=False)
    secret: str = field(repr=False)


def subscribers_from(config: tuple[SubscriberConfig, ...]) -> tuple[Subscriber, ...]:
    """Check the configured subscribers; raises ConfigError naming ``subscribers[i].key``."""
    result: list[Subscriber] = []
    for i, sub in enumerate(config):
        try:
            key = signing_key(sub.secret)
        except ValueError as exc:
            raise ConfigError(f"subscribers[{i}].secret: {exc}") from None
        unknown = sorted(set(sub.events) - EVENT_TYPES)
        if unknown:
            raise ConfigError(f"subscribers[{i}].events: unknown event {unknown[0]!r}"
                              f" (known: {', '.join(sorted(EVENT_TYPES))})")
        # the first entry for a URL keeps the plain URL as its cursor's name, so adding a
        # second entry for the same URL later does not reset the first one's position
        name = f"{sub.url}#{i}" if any(s.url == sub.url for s in result) else sub.url
        result.append(Subscriber(name, sub.url, shown_url(sub.url), frozenset(sub.events), key, sub.secret))
    return tuple(result)


# -- the dispatcher ---------------------------------------------------------------------------
class SubscriberDispatcher:
    """Sends outbox events to every configured subscriber; ``step()`` is one round."""

    def __init__(self, config: Config, store: Store, *,
                 clock: Callable[[], float] = time.time, rand: Callable[[], float] = random.random,
                 timeout_seconds: float = 10.0, batch_size: int = 100, round_seconds: float = 5.0,
                 owner: str | None = None) -> None:
        self.config, self.store, self.clock, self.rand = config, store, clock, rand
        self.subscribers = subscribers_from(config.subscribers)
        self.timeout_seconds, self.batch_size, self.round_seconds = timeout_seconds, batch_size, round_seconds
        self.owner = owner or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._sessions = {sub.name: DeadlineSession() for sub in self.subscribers}  # one connection pool each
        # serve and worker processes may both run this loop: a lock per subscriber keeps one
        # sender at a time, so events stay in order and are not sent twice. It is renewed
        # before every POST and outlives one, so a holder that died frees it soon.
        self._lock_ms = int((2 * timeout_seconds + 5) * 1000)
        self.loops = [BackgroundLoop(f"subscriber-{n}", functools.partial(self._serve, sub),
                                     functools.partial(self._idle_for, sub))
                      for n, sub in enumerate(self.subscribers)]

    def enrol(self) -> None:
        """Give each configured subscriber its place in the outbox now, as the service starts: a new
        subscriber gets the events after it was added, and under ``serve`` the process that sends
        them may start after the HTTP processes have accepted (and delivered) the first messages."""
        try:
            for sub in self.subscribers:
                self.store.subscriber_cursor(sub.name)
        except StorageUnavailable as exc:  # the loop enrols them on its first round instead
            log.warning("subscribers not enrolled at start: %s", exc.detail, extra={"event": "subscribers.enrol"})

    # -- one round -----------------------------------------------------------------------
    def step(self) -> int:
        """Send up to ``batch_size`` events to each due subscriber; returns how many were taken."""
        return sum(self._serve(sub) for sub in self.subscribers)

    def idle_seconds(self) -> float:
        """Until the earliest subscriber with events waiting is due (at most the loop's poll)."""
        return min([IDLE_POLL_SECONDS] + [self._idle_for(sub) for sub in self.subscribers])

    def _idle_for(self, sub: Subscriber) -> float:
        """Until *sub* is due, when it has events waiting (at most the loop's poll)."""
        cursor = self.store.subscriber_cursor(sub.name)
        if not self.store.events_after(cursor.last_seq, 1):
            return IDLE_POLL_SECONDS
        return min(max((cursor.next_attempt_ms - self._now_ms()) / 1000, MIN_POLL_SECONDS), IDLE_POLL_SECONDS)

    def _serve(self, sub: Subscriber) -> int:
        """One subscriber's share of a round, under its lock."""
        cursor = self.store.subscriber_cursor(sub.name)  # a new subscriber starts after the newest event
        if cursor.next_attempt_ms > self._now_ms() or not self.store.events_after(cursor.last_seq, 1):
            return 0
        lock = f"subscriber:{sub.name}"
        if not self.store.try_lock(lock, self.owner, self._lock_ms):
            return 0  # another process is sending to it
        try:
            cursor = self.store.subscriber_cursor(sub.name)  # read again: the last holder may have moved it
            if cursor.next_attempt_ms > self._now_ms():
                return 0
            return self._send_batch(sub, cursor, self.store.events_after(cursor.last_seq, self.batch_size), lock)
        finally:
            self.store.unlock(lock, self.owner)

    def _send_batch(self, sub: Subscriber, cursor: SubscriberCursor, events: list[EventRecord], lock: str) -> int:
        """Send *events* in order until one fails, the batch ends or the round's time is up."""
        started, saved, taken = time.monotonic(), cursor, 0
        for event in events:
            if event.type in sub.events:
                # bounded in time too: a slow subscriber holds up the others for round_seconds and one call at most
                if taken and time.monotonic() - started > self.round_seconds:
                    break
                if not self.store.try_lock(lock, self.owner, self._lock_ms):
                    break  # our lock ran out and another process took over
                error = self._post(sub, event)
                if error is not None:
                    self._failed(sub, cursor, event, error)
                    return taken
                if cursor.attempts:
                    log.info("subscriber %s answers again after %d failed attempts", sub.shown, cursor.attempts)
                cursor = saved = SubscriberCursor(sub.name, event.seq)  # success resets the retry state
                self.store.save_subscriber_cursor(cursor)  # after each success: a crash re-sends one at most
            else:
                cursor = replace(cursor, last_seq=event.seq)  # not subscribed: step over it
            taken += 1
        if cursor != saved:
            self.store.save_subscriber_cursor(cursor)
        return taken

    def _failed(self, sub: Subscriber, cursor: SubscriberCursor, event: EventRecord, error: str) -> None:
        """Stop sending to *sub* until its backoff passes; *event* stays next in line."""
        settings = self.config.delivery
        attempts = cursor.attempts + 1
        delay = backoff_seconds(attempts, settings.backoff_base_seconds, settings.backoff_max_seconds, self.rand)
        self.store.save_subscriber_cursor(replace(
            cursor, attempts=attempts, next_attempt_ms=self._now_ms() + int(delay * 1000), last_error=error))
        log.warning("event %s (%s%s) to subscriber %s failed, attempt %d: %s; next try in %.1fs", event.id,
                    event.type, _about(event), sub.shown, attempts, error, delay)

    # -- the HTTP edge -------------------------------------------------------------------------
    def _post(self, sub: Subscriber, event: EventRecord) -> str | None:
        """POST one event: None on 2xx, else one line saying why (never the secret)."""
        body = event_body(event)
        timestamp = int(self.clock())  # the time of this attempt; the webhook-id stays the event's
        headers = {"Content-Type": "application/json", "webhook-id": event.id,
                   "webhook-timestamp": str(timestamp),
                   "webhook-signature": _signature(sub.key, event.id, timestamp, body)}
        try:
            # redirects count as failures: re-POSTing a signed event elsewhere is the operator's call;
            # the whole POST, answer included, ends by the deadline (a body trickled after a 2xx is cut)
            status, reason = self._sessions[sub.name].post(
                sub.url, self.timeout_seconds, _drain, data=body, headers=headers, timeout=self.timeout_seconds,
                allow_redirects=False)
        except DeadlineExceeded as exc:
            return f"DeadlineExceeded: {exc} (a wall-clock deadline)"
        except requests.RequestException as exc:
            return _scrub(f"{type(exc).__name__}: {exc}", sub)
        if not 200 <= status < 300:
            return _scrub(f"HTTP {status} {reason or ''}", sub)
        log.info("event %s (%s%s) delivered to subscriber %s", event.id, event.type, _about(event), sub.shown)
        return None

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- threads -----------------------------------------------------------------------------
    def wake(self) -> None:
        """New events were stored: look now instead of at the next poll."""
        for loop in self.loops:
            loop.wake()

    def start(self) -> None:
        """Serve each subscriber in a thread of its own: one slow subscriber never delays another."""
        for loop in self.loops:
            loop.start(1)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the POSTs in flight (each ends by its deadline); unsent events stay in the outbox."""
        for loop in self.loops:
            loop.stop(timeout)
        for session in self._sessions.values():
            session.close()


def _drain(resp: requests.Response) -> tuple[int, str]:
    """Read a small answer, so its connection goes back to the pool; drop a big one; returns the
    status and reason.

    The status decides the outcome, so a broken (or cut) answer body does not matter here.
    """
    read = 0
    try:
        for chunk in resp.iter_content(8192):
            read += len(chunk)
            if read > _ANSWER_LIMIT:
                break
    except requests.RequestException:
        pass
    finally:
        resp.close()
    return resp.status_code, resp.reason


def _about(event: EventRecord) -> str:
    """The message or user an event is about, for log lines."""
    data = event.data
    if "message_id" in data:
        return f", message {data['message_id']} to {data.get('user_id') or data.get('group_id')}"
    return f", user {data['user_id']}" if "user_id" in data else ""


def _scrub(text: str, sub: Subscriber) -> str:
    """One line of at most 300 characters, without the secret or the URL's credentials."""
    parts = urlsplit(sub.url)
    for hidden in (sub.secret, parts.query, parts.password):
        if hidden:
            text = text.replace(hidden, "***")
    return " ".join(text.replace(sub.url, sub.shown).split())[:300]
