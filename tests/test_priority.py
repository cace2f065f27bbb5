"""Priority under a backlog, and giving leases back on shutdown (real engine threads)."""

from __future__ import annotations

import json
import time

import pytest

from test_delivery import APPS, USERS, Sidecar
from openim_bizplugin.testing import FakeOpenIM

BACKLOG = [f"n{i}" for i in range(300)]


@pytest.fixture
def fake():
    with FakeOpenIM(users=USERS, online=(*APPS, *BACKLOG, "vip")) as im:
        yield im


@pytest.fixture
def sidecar(tmp_path, fake):
    # the real clock: engine threads run on their own here
    side = Sidecar(tmp_path, fake, time.time, batch_size=500)
    yield side
    side.services.close()


def _slow(fake, calls: int, seconds: float = 0.01) -> None:
    fake.delay_next("/msg/send_business_notification", seconds, times=calls)


def _send_backlog(sidecar) -> list[str]:
    return [sidecar.send(to={"users": BACKLOG[i:i + 50]}, idempotency_key=f"backlog-{i}")
            for i in range(0, len(BACKLOG), 50)]


def _wait(check, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_high_message_overtakes_a_leased_backlog(sidecar, fake):
    _slow(fake, len(BACKLOG))
    _send_backlog(sidecar)
    sidecar.engine.start(1)
    _wait(lambda: len(fake.delivered) >= 20, "the backlog to start")
    before = len(fake.delivered)
    high = sidecar.send(to={"users": ["vip"]}, priority="high", idempotency_key="vip")
    _wait(lambda: fake.deliveries_to(user="vip"), "the high message")
    order = [d.recv_id for d in fake.delivered]
    overtaken_after = order.index("vip") - before
    # within a handful of attempts (one call in flight plus the 50 ms check), not after 280 more
    assert overtaken_after <= 10, overtaken_after
    assert json.loads(fake.deliveries_to(user="vip")[0].data)["id"] == high
    _wait(lambda: len(fake.delivered) == len(BACKLOG) + 1, "the backlog to finish")
    assert [d.recv_id for d in fake.delivered].count("vip") == 1


def test_stop_gives_leases_back_within_a_bound(sidecar, fake):
    _slow(fake, len(BACKLOG), seconds=0.05)
    ids = _send_backlog(sidecar)
    sidecar.engine.start(1)
    _wait(lambda: len(fake.delivered) >= 3, "sending to start")
    started = time.monotonic()
    sidecar.engine.stop(timeout=5)
    assert time.monotonic() - started < 5
    recipients = [r for mid in ids for r in sidecar.recipients(mid)]
    assert {r["status"] for r in recipients} == {"sent", "queued"}  # nothing left "sending"
    sent = sum(r["status"] == "sent" for r in recipients)
    assert sent == len(fake.delivered) < len(BACKLOG)
