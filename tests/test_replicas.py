"""Replicas on one Redis: real ``serve`` processes sharing a real ``redis-server`` (issue 5).

Two or three ``openim-bizplugin serve`` children, each with its own delivery
workers, all with ``storage.url = redis://…/<db>`` (a fresh database number
per test); OpenIM is one :class:`FakeOpenIM` in this process, reached over
loopback. Messages are posted round-robin through the replicas. Waits are
bounded polls (``wait_until`` of the crash tests); "no work left" is read
from Redis itself (the ``due`` sorted set holds every recipient with work
left, docs/redis.md), and the outcome through the API of the replicas.

A delivery is identified as in the crash tests: the message id inside its
envelope and the user it reached, so "exactly once" is one accepted OpenIM
message per (message id, user).
"""

from __future__ import annotations

import contextlib
import itertools
import re
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from e2e_support import OPS_SECRET, RunningServer, config_tables, kill9, running_server, write_tables
from redis_server import RedisServer
from test_delivery_crash import (CHECK, NOTIFY, SEND_MSG, delivery_counts, envelope_id, fake,  # noqa: F401
                                 send, wait_until)
from openim_bizplugin.client import BizClient
from openim_bizplugin.testing import Call, FakeOpenIM

TOKEN = "/auth/get_admin_token"
BATCH = "/msg/batch_send_msg"
PREFIX = "bizplugin:"  # the store's default key prefix
WORKERS = 4
ANSWER_DELAY = 0.6  # seconds a slowed send_msg waits for its answer (within the 1 s timeout)
BATCH_SIZE = 100  # users per lease and per batch_send_msg: spreads the work over every replica's workers
_databases = itertools.count(1)  # Redis has 16 databases; each test takes a fresh one


# -- set-up -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A Redis database of this test's own, empty at the start."""
    url = f"redis://127.0.0.1:{redis_server.port}/{next(_databases)}"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
        yield url


def write_replica_configs(directory: Path, redis_url: str, openim: FakeOpenIM, count: int,
                          **delivery: Any) -> list[Path]:
    """One config file per replica (so each has its own stderr log), all on *redis_url*."""
    tables = config_tables(directory / "unused.db", max_body_bytes=1 << 20)
    tables["storage"] = {"url": redis_url}
    tables["openim"].update(api_url=openim.url, timeout_seconds=1)
    tables["delivery"] = {"workers": WORKERS, "batch_size": BATCH_SIZE, "lease_seconds": 2,
                          "backoff_base_seconds": 0.05, "backoff_max_seconds": 0.2, "max_attempts": 20,
                          **delivery}
    return [write_tables(directory / f"replica{n}.toml", tables) for n in range(count)]


@contextlib.contextmanager
def running_replicas(configs: list[Path]) -> Iterator[list[RunningServer]]:
    """``serve`` on every config, started at the same time (so they race for the admin token)."""
    managers = [running_server(config) for config in configs]
    with contextlib.ExitStack() as stack:
        with ThreadPoolExecutor(len(managers)) as pool:
            futures = [pool.submit(manager.__enter__) for manager in managers]
        servers, errors = [], []
        for manager, future in zip(managers, futures):
            if future.exception() is None:
                servers.append(future.result())
                stack.push(manager)  # its __exit__ stops the process
            else:
                errors.append(future.exception())
        if errors:
            raise errors[0]
        yield servers


def work_left(redis_url: str) -> int:
    """Recipients with work left (queued, held or leased), straight from Redis."""
    with redis.Redis.from_url(redis_url) as client:
        return client.zcard(PREFIX + "due")


def wait_no_work_left(redis_url: str, replicas: list[RunningServer], openim: FakeOpenIM) -> None:
    def settled() -> bool:
        for replica in replicas:
            assert replica.process.poll() is None, f"{replica.config_path.name} exited: {replica.stderr()[-3000:]}"
        return work_left(redis_url) == 0

    def explain() -> str:
        logs = "".join(f"--- {r.config_path.name}\n{r.stderr()[-2000:]}" for r in replicas)
        return f"{work_left(redis_url)} recipients left, the fake OpenIM took {len(openim.delivered)}\n{logs}"

    wait_until(settled, "every recipient reaches a final status", explain)


def statuses_through(replicas: list[RunningServer], message_ids: list[str]) -> Counter[str]:
    """Every recipient's status, each message read through another replica's API."""
    found: Counter[str] = Counter()
    for n, message_id in enumerate(message_ids):
        record = BizClient(replicas[n % len(replicas)].url, "ops", OPS_SECRET).status(message_id)
        assert record["status"] == "sent", (message_id, record["status"])
        found.update(r["status"] for r in record["recipients"])
    return found


def calls_in_flight(openim: FakeOpenIM, endpoint: str, tag: str) -> list[Call]:
    """Calls to *endpoint* by the process with *tag* that OpenIM has not answered yet: OpenIM
    answers ANSWER_DELAY s after taking them; those taken less than a quarter of that ago leave
    the test 0.45 s to kill the process before the answer comes."""
    now = time.time()  # the fake OpenIM's clock
    return [call for call in openim.calls_to(endpoint)
            if call.operation_id and operation_tag(call.operation_id) == tag and now - call.at < ANSWER_DELAY / 4]


def operation_tag(operation_id: str) -> str:
    """The process tag in ``biz-<hint>-<ms>-<tag><counter>[-<seq>]``: 6 hex digits per OpenIM client (process)."""
    return re.search(r"-\d{13}-([0-9a-f]{6})", operation_id).group(1)


def tag_of(replica: RunningServer) -> str | None:
    """The operationID tag of *replica*, from the outcomes it logged (None before it logged one)."""
    tags = Counter(operation_tag(op) for op in re.findall(r"\(operationID (biz-[\w.-]+),", replica.stderr()))
    return tags.most_common(1)[0][0] if tags else None


def post_mixed(replicas: list[RunningServer], openim: FakeOpenIM, *, notified: int, custom: int,
               custom_users: int = 1) -> tuple[list[str], dict[str, set[str]]]:
    """Post *notified* notification messages of 50 users and *custom* custom-mode messages of
    *custom_users* users, interleaved and round-robin through the replicas; returns (ids, users of each id)."""
    spread = [((n + 0.5) / notified, "notification", 50) for n in range(notified)]
    spread += [((n + 0.5) / custom, "custom", custom_users) for n in range(custom)]
    posts = [(mode, size) for _, mode, size in sorted(spread)]  # both kinds evenly through the run
    ids, users_of = [], {}
    for n, (mode, size) in enumerate(posts):
        users = [f"{mode[0]}{n}-{k}" for k in range(size)]
        for user in users:  # their apps are online: persistent notifications to offline apps are held
            openim.connect(user)
        message_id = send(replicas[n % len(replicas)].url, users=users, mode=mode)
        ids.append(message_id)
        users_of[message_id] = set(users)
    return ids, users_of


# -- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("replica_count", [2, 3])
def test_replicas_deliver_each_recipient_once_and_share_one_admin_token(tmp_path, fake, redis_url,
                                                                        replica_count):
    """5,000 recipients posted through every replica: each delivered once, each ``sent``, one token."""
    # The first replica to need a token holds the refresh lock while OpenIM answers slowly;
    # the others, started at the same moment, must wait for its token instead of fetching their own.
    fake.delay_next(TOKEN, seconds=0.5)
    configs = write_replica_configs(tmp_path, redis_url, fake, replica_count)
    with running_replicas(configs) as replicas:
        # 20 x 50 users as business notifications (one call each), 8 x 500 as custom batches
        ids, users_of = post_mixed(replicas, fake, notified=20, custom=8, custom_users=500)
        wait_no_work_left(redis_url, replicas, fake)
        assert statuses_through(replicas, ids) == {"sent": 5_000}
        tags = {tag_of(replica) for replica in replicas}
    expected = {(message_id, user) for message_id, users in users_of.items() for user in users}
    counts = delivery_counts(fake)
    assert set(counts) == expected and len(expected) == 5_000
    assert {key: n for key, n in counts.items() if n > 1} == {}, "delivered more than once"
    assert len(fake.calls_to(NOTIFY)) == 1_000 and fake.calls_to(BATCH), "custom users went out in batches"
    assert None not in tags and len(tags) == replica_count, "every replica delivered part of the work"
    assert len(fake.calls_to(TOKEN)) == 1, "one admin token for all replicas (docs/redis.md)"
    assert len({call.token for call in fake.calls if call.endpoint != TOKEN}) == 1, "and every call carries it"


def test_kill9_of_one_replica_mid_run_the_others_finish(tmp_path, fake, redis_url):
    """Three replicas, deliveries slowed; one is killed with SIGKILL while a send_msg of its own is in
    flight; the other two finish everything, asking OpenIM about that send_msg instead of repeating it."""
    workers = 2
    configs = write_replica_configs(tmp_path, redis_url, fake, 3, workers=workers, batch_size=20)
    # OpenIM takes each message at once but answers later, so calls are in flight at the kill
    fake.delay_next(NOTIFY, seconds=0.1, after_processing=True, times=150)
    fake.delay_next(SEND_MSG, seconds=ANSWER_DELAY, after_processing=True, times=200)
    with running_replicas(configs) as replicas:
        victim, survivors = replicas[0], replicas[1:]
        # 8 x 50 users as notifications, 30 single-user custom messages (one send_msg each)
        ids, users_of = post_mixed(replicas, fake, notified=8, custom=30)
        total = sum(len(users) for users in users_of.values())
        in_flight: list[Call] = []

        def victim_is_sending() -> bool:
            tag = tag_of(victim)
            in_flight[:] = [] if tag is None else calls_in_flight(fake, SEND_MSG, tag)
            return bool(in_flight)

        wait_until(victim_is_sending, "the victim has a send_msg in flight", lambda: victim.stderr()[-3000:])
        kill9(victim.process)
        assert len(fake.delivered) < total, "killed mid-run, not after it"
        wait_no_work_left(redis_url, survivors, fake)
        assert statuses_through(survivors, ids) == {"sent": total}
        victim_tag = tag_of(victim)
    counts = delivery_counts(fake)
    assert set(counts) == {(message_id, user) for message_id, users in users_of.items() for user in users}
    checked = {call.operation_id for call in fake.calls_to(CHECK)}
    assert {call.operation_id for call in in_flight} <= checked, "the lost answers were asked about"
    repeated = {key: n for key, n in counts.items() if n > 1}
    custom_users = {user for mid, users in users_of.items() for user in users if user.startswith("c")}
    assert not [user for _, user in repeated if user in custom_users], \
        f"a send_msg in flight is checked (check_msg_is_send_success), never repeated: {repeated}"
    # OpenIM has no check for business notifications (OPENIM.md §3.7): a notification the victim had
    # sent but whose outcome it had not recorded when it died is sent again by a survivor. Each
    # delivery thread records its outcome after every call, so the victim had at most one such call
    # per thread, less the threads that were waiting on a send_msg; and the first copy of every
    # repeated pair must be one of the victim's calls.
    assert sum(n - 1 for n in repeated.values()) <= workers - len(in_flight), f"repeated: {repeated}"
    first_copy: dict[tuple[str, str], Any] = {}
    for delivery in fake.delivered:
        first_copy.setdefault((envelope_id(delivery), delivery.recv_id), delivery)
    assert all(operation_tag(first_copy[key].operation_id) == victim_tag for key in repeated), repeated
    assert len(fake.calls_to(TOKEN)) == 1, "the survivors keep using the one shared admin token"
