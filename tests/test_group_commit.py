"""Group commit: concurrent acceptances of one process share a transaction, and each keeps its own answer."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import threading
from collections.abc import Callable

import pytest

from test_store_sqlite import _new
from openim_bizplugin.errors import StorageBusy
from openim_bizplugin.store.base import IdempotencyMismatch
from openim_bizplugin.store.sqlite import SqliteStore


def _count_transactions(store: SqliteStore) -> list[int]:
    """Counts the store's outer write transactions (each one commit and one fsync)."""
    begun: list[int] = []
    transaction = store._db._transaction

    def counted(db, synchronous, *args):
        begun.append(1)
        return transaction(db, synchronous, *args)

    store._db._transaction = counted
    return begun


def _accept_while_the_file_is_held(store: SqliteStore, calls: list[Callable[[], object]],
                                   held: contextlib.AbstractContextManager | None = None) -> list[object]:
    """Run *calls* in threads while this thread holds the store's write lock (or *held*), then let go.

    The first call starts alone and takes the lead, waiting for the lock; the others start once
    it does, and queue beside it: the group is taken once the lock is held."""
    answers: list[object] = [None] * len(calls)
    group = store._accepting

    def run(n: int) -> None:
        try:
            answers[n] = calls[n]()
        except Exception as exc:  # the test looks at it
            answers[n] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(calls))]
    with held or store._db.write():
        threads[0].start()
        _wait_until(lambda: group._leading and len(group._queue) == 1)
        for thread in threads[1:]:
            thread.start()
        _wait_until(lambda: len(group._queue) == len(calls))
    for thread in threads:
        thread.join(10)
    return answers


def _wait_until(check: Callable[[], bool]) -> None:
    for _ in range(1000):
        if check():
            return
        threading.Event().wait(0.005)
    raise AssertionError("the callers did not queue")


def test_callers_that_arrive_while_a_write_is_in_progress_are_committed_together(tmp_path):
    store = SqliteStore(tmp_path / "x.db", lock_wait_seconds=5)
    begun = _count_transactions(store)
    answers = _accept_while_the_file_is_held(
        store, [lambda i=i: store.accept(_new(i), None, retention_ms=1) for i in range(6)])
    assert [a.message_id for a in answers] == [f"m{i}" for i in range(6)] and all(a.created for a in answers)
    assert len(begun) == 1 + 1  # the test's hold; then one transaction for the six that waited for it
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone() == (6,)


def test_an_idempotency_conflict_in_a_group_fails_only_its_caller(tmp_path):
    store = SqliteStore(tmp_path / "x.db", lock_wait_seconds=5)
    first = store.accept(_new(0, key="k"), None, retention_ms=60_000)
    answers = _accept_while_the_file_is_held(store, [
        lambda: store.accept(_new(1), None, retention_ms=60_000),
        lambda: store.accept(_new(2, key="k", digest="other body"), None, retention_ms=60_000),
        lambda: store.accept(_new(3, key="k"), None, retention_ms=60_000),  # the same request again
        lambda: store.accept(_new(4), None, retention_ms=60_000),
    ])
    assert isinstance(answers[1], IdempotencyMismatch) and answers[1].args[0] == first.message_id
    assert (answers[2].message_id, answers[2].created) == (first.message_id, False)
    assert [(a.message_id, a.created) for a in (answers[0], answers[3])] == [("m1", True), ("m4", True)]
    assert store.get_message("m2") is None and store.get_message("m3") is None


def test_the_same_idempotency_key_twice_in_one_group_stores_one_message(tmp_path):
    store = SqliteStore(tmp_path / "x.db", lock_wait_seconds=5)
    answers = _accept_while_the_file_is_held(store, [
        lambda: store.accept(_new(9), None, retention_ms=60_000),
        lambda: store.accept(_new(1, key="k"), None, retention_ms=60_000),
        lambda: store.accept(dataclasses.replace(_new(2, key="k"), id="m2"), None, retention_ms=60_000),
    ])
    assert {a.message_id for a in answers[1:]} in ({"m1"}, {"m2"})  # whichever was written first
    assert sorted(a.created for a in answers[1:]) == [False, True]


def test_a_group_that_cannot_get_the_lock_stores_none_of_its_callers(tmp_path):
    store = SqliteStore(tmp_path / "x.db", lock_wait_seconds=2)
    other_program = sqlite3.connect(store.path, isolation_level=None)
    other_program.execute("BEGIN IMMEDIATE")  # e.g. the sqlite3 shell, which knows nothing of our gate
    try:
        answers = _accept_while_the_file_is_held(
            store, [lambda i=i: store.accept(_new(i), None, retention_ms=1) for i in range(3)], contextlib.nullcontext())
    finally:
        other_program.execute("ROLLBACK")
    assert all(isinstance(a, StorageBusy) and int(a.headers["Retry-After"]) >= 1 for a in answers), answers
    assert len({id(a) for a in answers}) == 3  # each caller raises an exception of its own
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone() == (0,)
    assert store.accept(_new(7), None, retention_ms=1).created  # and the store goes on afterwards


def test_a_caller_still_queued_at_its_deadline_is_answered_busy_and_never_written(tmp_path):
    store = SqliteStore(tmp_path / "x.db", lock_wait_seconds=0.2)
    leader_writes, leader_may_go = threading.Event(), threading.Event()
    slow = store._accepting

    def slow_write(db):  # the leader's own write takes longer than the followers' wait
        leader_writes.set()
        leader_may_go.wait(10)
        return "written"

    leader = threading.Thread(target=lambda: slow.run(slow_write))
    leader.start()
    _wait_until(leader_writes.is_set)  # its group is taken: a caller from now on waits for the next
    with pytest.raises(StorageBusy):
        store.accept(_new(1), None, retention_ms=1)
    leader_may_go.set()
    leader.join(10)
    assert store._accepting._queue == [] and store.get_message("m1") is None
