"""OpenIM's transport for after-callbacks, as :class:`~.fake.FakeOpenIM` models it.

Read from open-im-server (v3.8.3, v3.8.3-patch.15/16 and main: the same) and
openimsdk/tools: each OpenIM process that fires webhooks (msg RPC, msgtransfer,
msggateway, push, user, group, friend) has one ``webhook.Client`` whose
``AsyncPost`` pushes the post onto a ``memamq.MemoryQueue`` of **100 slots
served by 2 workers** (``webhookWorkerCount``, ``webhookBufferSize``). When
every slot is taken, ``Push`` **blocks the caller** — ``SendMsg`` of the msg
RPC, msgtransfer's consumer, the gateway's online-status reporting — for up to
**3 s** (``pushWait``) and then drops the callback (``ErrFull``, ignored by
``AsyncPost``). A worker posts with the hook's ``timeout`` from
``webhooks.yml`` (seconds, 5 in the stock file) as a context deadline; a
failed or late answer is logged and never retried.

So a receiver that answers slowly does not only lose callbacks: it slows the
callers, i.e. every chat message. :class:`AfterHookQueue` reproduces that with
real threads and real HTTP posts, and counts what a test needs to see it:
pushes that found the queue full (:attr:`~AfterHookQueue.blocked`), dropped
callbacks, and the answers.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

WORKERS = 2  # webhookWorkerCount
SLOTS = 100  # webhookBufferSize
PUSH_WAIT_SECONDS = 3.0  # memamq pushWait
HOOK_TIMEOUT_SECONDS = 5.0  # the stock webhooks.yml timeout of every hook

Post = Callable[..., tuple[int, Any]]  # FakeOpenIM.post_callback


@dataclass(frozen=True)
class HookResult:
    """What one posted after-callback got: HTTP status and JSON reply, or the error instead."""

    command: str
    status: int | None
    reply: Any
    error: str | None = None
    payload: dict[str, Any] | None = None  # what was posted


class AfterHookQueue:
    """Posts after-callbacks to *webhook_url* the way one OpenIM process does (see the module docs).

    ``push`` is what OpenIM's code calls where it fires the hook; it returns
    False when the callback was dropped. ``join`` waits until every queued
    callback has been posted; ``close`` stops the workers.
    """

    def __init__(self, post: Post, webhook_url: str, *, workers: int = WORKERS, slots: int = SLOTS,
                 push_wait: float = PUSH_WAIT_SECONDS, timeout: float = HOOK_TIMEOUT_SECONDS) -> None:
        self._post, self.webhook_url, self.push_wait, self.timeout = post, webhook_url, push_wait, timeout
        self._queue: queue.Queue[tuple[str, dict[str, Any], float] | None] = queue.Queue(maxsize=slots)
        self._lock = threading.Lock()
        self.pushed = self.blocked = self.dropped = 0
        self.results: list[HookResult] = []
        self._workers = [threading.Thread(target=self._work, name=f"fake-openim-hooks-{n}", daemon=True)
                         for n in range(workers)]
        for worker in self._workers:
            worker.start()

    def push(self, command: str, payload: dict[str, Any], *, timeout: float | None = None) -> bool:
        """Queue one callback (``AsyncPost``); blocks while the queue is full, at most ``push_wait``."""
        item = (command, payload, self.timeout if timeout is None else timeout)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._lock:
                self.blocked += 1  # the caller — OpenIM sending a chat message — waits here
            try:
                self._queue.put(item, timeout=self.push_wait)
            except queue.Full:
                with self._lock:
                    self.dropped += 1
                return False
        with self._lock:
            self.pushed += 1
        return True

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            command, payload, timeout = item
            try:
                status, reply = self._post(self.webhook_url, command, payload, timeout=timeout)
                result = HookResult(command, status, reply, payload=payload)
            except requests.RequestException as exc:  # a timeout or a refused connection: logged by OpenIM
                result = HookResult(command, None, None, type(exc).__name__, payload)
            with self._lock:
                self.results.append(result)
            self._queue.task_done()
        self._queue.task_done()

    @property
    def depth(self) -> int:
        """Callbacks waiting for a worker (not counting the ones being posted)."""
        return self._queue.qsize()

    def join(self, timeout: float = 60.0) -> bool:
        """Wait until every queued callback was posted and answered (or failed); False on *timeout*."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._queue.all_tasks_done.wait(remaining)
        return True

    def close(self) -> None:
        """Stop the workers after what is queued (a post in flight ends with its timeout)."""
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            worker.join(self.timeout + 1)
