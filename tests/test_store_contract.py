"""The storage contract (:mod:`store_contract`) on every backend, plus what is Redis's own.

The Redis tests run against a real ``redis-server`` started once per session
on a free loopback port and flushed before each test.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import redis
import responses

from conftest import write_config
from redis_server import RedisServer, free_port
from store_contract import DAY, T0, StoreContract, answered, new, swept_all
from openim_bizplugin.store.base import Outcome, ReplayKey, Swept
from openim_bizplugin.config import OpenIMConfig, StorageConfig, load_config
from openim_bizplugin.errors import ConfigError
from openim_bizplugin.openim.client import TOKEN_NAME, OpenIMClient
from openim_bizplugin.store import open_store
from openim_bizplugin.store.redis import RedisStore, durability_plan
from openim_bizplugin.store.sqlite import SqliteStore


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushdb()
    return redis_server.url


def _opened(make: Callable[[frozenset[str]], Any]) -> Iterator[Callable[[frozenset[str]], Any]]:
    stores: list[Any] = []

    def new_store(event_types: frozenset[str] = frozenset()) -> Any:
        stores.append(make(event_types))
        return stores[-1]

    yield new_store
    for store in stores:
        store.close()


class TestSqliteStore(StoreContract):
    @pytest.fixture
    def new_store(self, tmp_path: Path) -> Iterator[Callable[[frozenset[str]], Any]]:
        yield from _opened(lambda events: SqliteStore(tmp_path / "shared.db", events))

    @pytest.fixture
    def replica_code(self, tmp_path: Path) -> str:
        return ("import sys\nfrom openim_bizplugin.store.sqlite import SqliteStore\n"
                f"store = SqliteStore({str(tmp_path / 'shared.db')!r})")

    @pytest.fixture
    def corrupt(self, tmp_path: Path) -> Callable[[str, str | None, Any], None]:
        def corrupt(message_id: str, field: str | None, value: Any) -> None:
            with sqlite3.connect(tmp_path / "shared.db") as db:
                if field is None:
                    db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
                else:
                    db.execute(f"UPDATE messages SET {field} = ? WHERE id = ?", (value, message_id))
        return corrupt


class TestRedisStore(StoreContract):
    @pytest.fixture
    def new_store(self, redis_url: str) -> Iterator[Callable[[frozenset[str]], Any]]:
        yield from _opened(lambda events: RedisStore(redis_url, events))

    @pytest.fixture
    def replica_code(self, redis_url: str) -> str:
        return f"import sys\nfrom openim_bizplugin.store.redis import RedisStore\nstore = RedisStore({redis_url!r})"

    @pytest.fixture
    def corrupt(self, redis_url: str) -> Iterator[Callable[[str, str | None, Any], None]]:
        client = redis.Redis.from_url(redis_url)

        def corrupt(message_id: str, field: str | None, value: Any) -> None:
            if field is None:
                client.delete(f"bizplugin:m:{message_id}")
            else:
                client.hset(f"bizplugin:m:{message_id}", field, value)
        yield corrupt
        client.close()


# -- Redis only ------------------------------------------------------------------------------
def test_keys_use_the_prefix_so_two_deployments_can_share_a_redis(redis_url):
    one, two = RedisStore(redis_url, prefix="one:"), RedisStore(redis_url, prefix="two:")
    one.accept(new("m1"), None, retention_ms=0)
    assert two.get_message("m1") is None and two.next_due_ms() is None
    assert all(key.startswith("one:") for key in redis.Redis.from_url(redis_url, decode_responses=True).keys())
    one.close(), two.close()


@pytest.mark.parametrize(("url", "problem"), [
    ("redis://127.0.0.1:6379/0", None), ("rediss://:pw@cache.internal:6380/2", None), ("redis://cache", None),
    ("redis:///0", "needs a host"), ("redis://cache:port/0", "bad port"), ("redis://cache:6379/zero", "database"),
])
def test_the_config_takes_redis_urls(tmp_path, url, problem):
    path = write_config(tmp_path, {"storage": {"url": url}})
    if problem is None:
        assert load_config(path).storage == StorageConfig(url, None)
    else:
        with pytest.raises(ConfigError, match=f"^storage.url: .*{problem}") as caught:
            load_config(path)
        assert "pw" not in str(caught.value)


def test_open_store_picks_redis_for_a_redis_url(redis_url):
    store = open_store(StorageConfig(redis_url, None), frozenset({"message.sent"}))
    assert isinstance(store, RedisStore) and store.event_types == {"message.sent"}
    store.close()


def test_an_unreachable_redis_is_a_config_error_naming_storage_url():
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    with pytest.raises(ConfigError, match=r"^storage\.url: redis: .*redis://:\*\*\*@127\.0\.0\.1") as caught:
        open_store(StorageConfig(url, None))
    assert "hunter2" not in str(caught.value)


def test_replicas_on_one_redis_share_one_admin_token_fetched_once(redis_url):
    saved = threading.Event()

    class Replica(RedisStore):  # says when the refreshing replica has stored the token
        def save_token(self, name: str, token: str, expires_ms: int) -> None:
            super().save_token(name, token, expires_ms)
            saved.set()

    waiting = threading.Semaphore(0)

    def wait_for_the_refresher(seconds: float) -> None:
        waiting.release()
        saved.wait(10)

    stores = [Replica(redis_url), Replica(redis_url)]
    config = OpenIMConfig(api_url="http://openim.test:10002", secret="s", admin_user_id="imAdmin", sender_id="b")
    clients = [OpenIMClient(config, stores[n % 2], clock=lambda: T0 / 1000, owner=f"replica-{n}",
                            sleep=wait_for_the_refresher) for n in range(4)]

    def token(request: Any) -> tuple[int, dict, str]:
        for _ in range(3):  # the other three found the refresh lock taken and wait for this token
            assert waiting.acquire(timeout=10)
        return 200, {}, json.dumps({"errCode": 0, "errMsg": "", "data": {"token": "tok", "expireTimeSeconds": 86400}})

    got: list[str] = []
    with responses.RequestsMock() as rsps:
        rsps.add_callback(responses.POST, "http://openim.test:10002/auth/get_admin_token", callback=token)
        threads = [threading.Thread(target=lambda c=c: got.append(c.admin_token())) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert got == ["tok"] * 4 and len(rsps.calls) == 1
    assert stores[1].load_token(TOKEN_NAME) == ("tok", T0 + 86_400_000)
    for store in stores:
        store.close()


def test_the_store_reads_what_durability_redis_is_configured_for(redis_url):
    client = redis.Redis.from_url(redis_url)
    plain = RedisStore(redis_url)
    assert "no AOF" in plain.durability  # the test server runs without persistence
    plain.close()
    client.config_set("appendonly", "yes"), client.config_set("appendfsync", "always")
    try:
        store = RedisStore(redis_url)
        assert not store._wait_aof and "fsync always" in store.durability
        store.close()
    finally:
        client.config_set("appendonly", "no"), client.config_set("appendfsync", "everysec")
        client.close()


@pytest.mark.parametrize(("version", "appendonly", "appendfsync", "wait", "says"), [
    ("7.0.15", "no", "everysec", False, "no AOF"),
    ("7.0.15", "yes", "everysec", False, "can lose the last second"),
    ("7.0.15", "yes", "always", False, "on disk before the 202"),
    ("7.2.4", "yes", "everysec", True, "WAITAOF"),
    ("7.4.0", "yes", "no", False, "can lose"),
    ("7.2.4", None, None, False, "unknown"),
])
def test_durability_before_the_202_follows_the_redis_settings(version, appendonly, appendfsync, wait, says):
    planned, what = durability_plan(version, appendonly, appendfsync)
    assert planned is wait and says in what


# -- Redis retention ---------------------------------------------------------------------------
def test_a_swept_message_leaves_no_key_behind(redis_url):
    store = RedisStore(redis_url, frozenset())
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    before = set(client.keys())
    store.accept(new("m1", "u1", "ü2", key="k1", collapse="c1", delivery={"rate_limit": "5/minute"}),
                 ReplayKey("crm", "v", 1), retention_ms=DAY)
    items = store.lease(T0, 10, 1_000, "w", lambda mid: "op", aging_ms=DAY)
    store.complete(answered(items, T0 + 1), T0 + 1)
    store.record_saved_seq("s-u1", "si_admin_u1", 3)
    store.update_presence("u1", 1, True, 1, T0 + 1)
    swept_all(store, T0 + 1)
    assert swept_all(store, T0 + 2 + DAY + 60_000).messages == 1
    # what stays is global: counters, the (empty) work indexes, locks, presence (its own retention)
    left = {key.removeprefix("bizplugin:") for key in set(client.keys()) - before}
    assert left <= {"accepted", "leases:profile.updated", "sweep:legacy", "presence:u1", "users:known",
                    "users:online"}, left
    client.close(), store.close()


def test_messages_stored_before_retention_are_counted_once_then_swept(redis_url):
    store = RedisStore(redis_url, frozenset())
    for mid in ("old", "waiting"):
        store.accept(new(mid, "u1", "u2"), None, retention_ms=0)
    items = [i for i in store.lease(T0, 10, 1_000, "w", lambda mid: "op", aging_ms=DAY) if i.message_id == "old"]
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    for mid in ("old", "waiting"):  # as the previous release stored them: no count of the work left
        client.hdel(f"bizplugin:m:{mid}", "active")
    store.complete([(item, Outcome.sent("s", "c", T0 + 1)) for item in items], T0 + 1)
    swept_all(store, T0 + 5)  # counted: "old" has no work left, so it finished now
    assert client.hget("bizplugin:m:waiting", "active") == "2"
    assert swept_all(store, T0 + 5 + DAY) == Swept(messages=1, recipients=2)
    assert store.get_message("old") is None and store.get_message("waiting") is not None
    client.close(), store.close()
