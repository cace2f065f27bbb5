"""The delivery engine: leased work from the store, turned into OpenIM calls.

Each worker loop leases due recipients (highest priority first), sends them
and records one :class:`~.store.base.Outcome` per recipient; a recorder
thread commits each call's outcomes while the worker makes its next call.
Work is leased, never deleted on pick-up: a worker that dies mid-send leaves
a lease that runs out, and the recipient is handed out again. Before
re-sending a ``send_msg`` whose outcome is unknown, the worker asks OpenIM
whether that operationID arrived (``/msg/check_msg_is_send_success``) so a
retry does not duplicate it. Retry timing is a pure function of the attempt
number.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from ..background import IDLE_POLL_SECONDS, BackgroundLoop
from ..config import Config
from ..counters import DISCARD, Metrics
from ..errors import StorageRejected, StorageUnavailable
from ..openim.client import OpenIMClient, OpenIMError
from ..openim.release import OpenIMRelease
from ..retry import backoff_seconds
from ..store.base import PRIORITY_RANK, Outcome, Store, WorkItem
from .sending import Results, Sender

log = logging.getLogger(__name__)
PREEMPT_CHECK_MS = 50


@dataclass
class DeliveryEngine:
    """Leases work and delivers it; ``step()`` is one round, ``start()`` runs threads."""

    config: Config
    store: Store
    sender: Sender
    clock: Callable[[], float] = time.time
    owner: str = "worker"
    rand: Callable[[], float] = random.random
    on_events: Callable[[], None] = lambda: None  # outcomes emitted subscriber events
    metrics: Metrics = DISCARD  # the app's, once metrics.install() hands it over

    def __post_init__(self) -> None:
        self.loop = BackgroundLoop("delivery", self.step, self._idle_seconds)
        self.recorder = _Recorder(self._record)
        self._last_preempt_check_ms = 0

    # -- one round -------------------------------------------------------------
    def step(self) -> int:
        """Lease one batch of due recipients and deliver it; returns how many.

        Outcomes are recorded after every OpenIM call, not at the end of the
        round: the recorder commits them while this thread makes its next
        call, and the thread waits for that commit before handing it the next
        outcomes. A crash mid-round re-sends at most two calls per thread (the
        one in flight and the one being recorded), and the round ends with
        everything recorded. Before each call the worker makes sure it still
        holds the lease (renewing it when less than one OpenIM timeout is
        left), so a slow round never sends what another worker has taken over.
        """
        if not self._warm_token():
            return 0
        lease_ms = int(self.config.delivery.lease_seconds * 1000)
        items = self.store.lease(self._now_ms(), self.config.delivery.batch_size, lease_ms, self.owner,
                                 self.sender.openim.new_operation_id,
                                 aging_ms=int(self.config.delivery.priority_aging_seconds * 1000))
        if not items:
            return 0
        lease = _Lease(self, items, self._now_ms() + lease_ms)
        settled, to_send = self._prepare(items)
        self._record(settled)
        lease.done(item for item, _ in settled)
        recording: Future | None = None  # the last call's outcomes, being committed
        try:
            for unit in self.sender.units(to_send):
                if self._should_yield(unit):
                    self.sender.throttle.give_back(list(lease.open.values()))
                    released = self.store.release(list(lease.open.values()), self._now_ms())
                    log.info("gave back %d leased recipients (%s)", released,
                             "shutting down" if self.loop.stopping else "higher-priority work is due")
                    break
                unit = lease.keep(unit)
                if unit:
                    results = self._send(unit)
                    if recording is not None:
                        recording.result()  # at most one call's outcomes waiting per thread
                    recording = self.recorder.submit(results)
                    lease.done(unit)
        finally:
            if recording is not None:
                recording.result()
        return sum(item.size for item in items)

    # -- one bad item fails alone -------------------------------------------------------
    def _prepare(self, items: list[WorkItem]) -> tuple[Results, list[WorkItem]]:
        """The sender's checks over the round; items whose stored row is unusable fail first.
        When the checks raise for the round, they run again item by item, so the one item
        that raises fails and the others go on."""
        settled: Results = [(item, _unusable(item, item.defect)) for item in items if item.defect]
        usable = [item for item in items if not item.defect]
        try:
            found, to_send = self.sender.prepare(usable, self._decide)
            return settled + found, to_send
        except Exception as exc:
            _raise_if_passing(exc)  # the store of the moment: the leases run out and the work comes back
            log.exception("checks before sending failed for a round of %d; checking one by one", len(usable))
        to_send = []
        for item in usable:
            try:
                found, ready = self.sender.prepare([item], self._decide)
            except Exception as exc:
                _raise_if_passing(exc)
                found, ready = [(item, _unusable(item, f"{type(exc).__name__}: {exc}"))], []
            settled += found
            to_send += ready
        return settled, to_send

    def _send(self, unit: list[WorkItem]) -> Results:
        """One OpenIM call's outcomes; a call that raises (not an OpenIM answer: a bug, a value
        it cannot send) fails its own items only."""
        try:
            return self.sender.send_unit(unit, self._decide)
        except Exception as exc:
            _raise_if_passing(exc)
            log.exception("message %s: sending to %s raised; its recipients fail", unit[0].message_id,
                          unit[0].target, extra={"event": "delivery.error", "message_id": unit[0].message_id})
            return [(item, _unusable(item, f"{type(exc).__name__}: {exc}")) for item in unit]

    def _should_yield(self, unit: list[WorkItem]) -> bool:
        """Stop this round early: on shutdown, or when better-priority work is waiting.

        A round may hold batch_size recipients; without this, a high message
        arriving behind a backlog of normal ones waited for the whole round.
        Checked at most every PREEMPT_CHECK_MS (one indexed query).
        """
        if self.loop.stopping:
            return True
        rank = PRIORITY_RANK[unit[0].priority]
        now_ms = self._now_ms()
        if rank == 0 or now_ms - self._last_preempt_check_ms < PREEMPT_CHECK_MS:
            return False
        self._last_preempt_check_ms = now_ms
        return self.store.higher_due(rank, now_ms)

    def _warm_token(self) -> bool:
        """Fetch (or wait for) the admin token before leasing, and learn which OpenIM release
        this is (a probe, once), so neither eats into the leases; other failures surface on the
        calls. False while OpenIM refuses the token: nothing can be sent, so nothing is leased
        (and no attempt spent)."""
        try:
            self.sender.openim.admin_token()
        except OpenIMError as error:
            return not error.token_refused
        self.sender.release.get()
        return True

    def _record(self, results: Results) -> None:
        if not results:
            return
        recorded = self.store.complete(results, self._now_ms())
        self.metrics.outcomes(results)
        self.on_events()
        if recorded < len(results):
            log.warning("%d outcomes were not recorded: their lease had passed to another worker",
                        len(results) - recorded)

    def _decide(self, item: WorkItem, error: OpenIMError) -> Outcome:
        """Turn a failed attempt into a retry or a final failure."""
        settings = self.config.delivery
        text = str(error)
        if error.token_refused:  # the deployment's state, not this recipient's: wait, spend nothing
            return Outcome.waiting(f"waiting: OpenIM refuses the admin token ({text})",
                                   self._now_ms() + int(self.config.openim.token_recheck_seconds * 1000))
        if not error.retryable:
            return Outcome.failed(text, f"OpenIM refused it (errCode {error.err_code})")
        if item.attempts >= settings.max_attempts:
            return Outcome.failed(text, f"gave up after {item.attempts} attempts")
        delay = backoff_seconds(item.attempts, settings.backoff_base_seconds, settings.backoff_max_seconds,
                                self.rand)
        # the error names the attempt that may have arrived (a token refresh repeats a call once)
        unknown = (error.operation_id or item.operation_id) if error.outcome_unknown else None
        return Outcome.retry(text, self._now_ms() + int(delay * 1000), unknown)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _idle_seconds(self) -> float:
        """Until the earliest waiting recipient is due (the loop caps it)."""
        due = self.store.next_due_ms()
        return IDLE_POLL_SECONDS if due is None else (due - self._now_ms()) / 1000

    # -- threads -----------------------------------------------------------------
    def wake(self) -> None:
        """New work was stored: let an idle worker look now instead of at its next poll."""
        self.loop.wake()

    def start(self, workers: int) -> None:
        """Run *workers* delivery threads in this process, and their recorder."""
        self.recorder.start()
        self.loop.start(workers)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking work and let rounds in flight finish (their leases cover the rest)."""
        self.loop.stop(timeout)
        self.recorder.stop()


def _raise_if_passing(exc: Exception) -> None:
    """Re-raise a storage failure of the moment (a lock, the disk); anything else fails the item."""
    if isinstance(exc, StorageUnavailable) and not isinstance(exc, StorageRejected):
        raise exc


def _unusable(item: WorkItem, error: str | None) -> Outcome:
    """A failed outcome for an item that cannot be sent as stored (a dead letter, replayable)."""
    return Outcome.failed((error or "unusable")[:500], "could not be sent: " + (error or "unusable")[:200])


class _Recorder:
    """Commits delivery outcomes on a thread of its own.

    A worker's next OpenIM call then overlaps the commit of its last one
    instead of following it (bench_delivery, custom mode: the threads had
    spent ~40% of their time recording, much of it queued for the writer
    lock). Outcomes of several threads that wait together go in one
    transaction. Until :meth:`start`, outcomes are recorded on the caller's
    thread (tests that call ``step()`` themselves).
    """

    def __init__(self, record: Callable[[Results], None]) -> None:
        self._record = record
        self._jobs: queue.SimpleQueue[tuple[Results, Future] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # a job is queued only while the thread will take it

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="delivery-recorder", daemon=True)
                self._thread.start()

    def submit(self, results: Results) -> Future:
        """Record *results*; the future is done once they are committed (or failed to be)."""
        job: tuple[Results, Future] = (results, Future())
        with self._lock:
            if self._thread is not None:
                self._jobs.put(job)
                return job[1]
        self._commit([job])  # not started, or stopped while a worker's round went on
        return job[1]

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            jobs = []
            while job is not None:
                jobs.append(job)
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
            if jobs:
                self._commit(jobs)
            if job is None:  # stop(): every job queued before it is committed
                return

    def _commit(self, jobs: list[tuple[Results, Future]]) -> None:
        try:
            self._record([result for results, _ in jobs for result in results])
        except BaseException as exc:  # handed to each waiting worker, whose round fails as before
            for _, future in jobs:
                future.set_exception(exc)
        else:
            for _, future in jobs:
                future.set_result(None)

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)  # after every job queued so far
            thread.join(timeout)


class _Lease:
    """This worker's hold on the items of one round."""

    def __init__(self, engine: DeliveryEngine, items: list[WorkItem], until_ms: int) -> None:
        self.engine, self.until_ms = engine, until_ms
        self.open = {id(item): item for item in items}
        # a call may take the whole OpenIM timeout: renew before less than that is left
        self.margin_ms = int((engine.config.openim.timeout_seconds + 1) * 1000)

    def keep(self, unit: list[WorkItem]) -> list[WorkItem]:
        """The items of *unit* this worker still holds, renewing the lease when it runs low."""
        now_ms = self.engine._now_ms()
        if self.until_ms - now_ms < self.margin_ms:
            lease_ms = int(self.engine.config.delivery.lease_seconds * 1000)
            held = {id(i) for i in self.engine.store.renew(list(self.open.values()), now_ms, lease_ms)}
            lost = [i for key, i in self.open.items() if key not in held]
            if lost:
                log.warning("%d recipients were taken over by another worker; not sending them", len(lost))
                self.engine.sender.throttle.give_back(lost)
            self.open = {key: i for key, i in self.open.items() if key in held}
            self.until_ms = now_ms + lease_ms
        return [item for item in unit if id(item) in self.open]

    def done(self, items) -> None:
        for item in items:
            self.open.pop(id(item), None)


def build_engine(config: Config, store: Store, openim: OpenIMClient, release: OpenIMRelease,
                 clock: Callable[[], float], owner: str,
                 on_events: Callable[[], None] = lambda: None) -> DeliveryEngine:
    """The engine with its sender, as serve and worker run it."""
    return DeliveryEngine(config, store, Sender(config, openim, store, release, clock), clock, owner,
                          on_events=on_events)

