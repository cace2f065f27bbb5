"""The service's counters and the queue-depth collector, kept apart from the web edge.

What is counted (all counters end in ``_total`` on the wire)::

    bizplugin_messages_accepted{client,type}        messages stored and answered 202 (repeats are not)
    bizplugin_requests_rejected{reason,status}      requests answered with a problem: its slug, or "routing"
    bizplugin_recipients_sent{type}                 delivered: OpenIM accepted the message
    bizplugin_recipients_failed{type}               failed for good (a dead letter)
    bizplugin_recipients_retried{type}              an attempt failed and will be tried again
    bizplugin_recipients_held{type}                 held while the user is offline (offline = "hold")
    bizplugin_recipients_skipped{type}              skipped: the user was offline (offline = "drop")
    bizplugin_recipients_waiting{type}              put back without spending an attempt: OpenIM
                                                    refused the admin token (see the gauge below)
    bizplugin_recipients_throttled{type,policy}     over the type's rate limit: policy "delay" or "drop"
    bizplugin_callbacks_received{command,result}    OpenIM callbacks: stored, duplicate, spooled, spool-full, ...
    bizplugin_callbacks_processed{command,result}   stored callbacks applied ("applied") or not ("error")
    bizplugin_retention_deleted{what}               deleted past retention: messages, recipients, presence
                                                    (users), callbacks (processed ones)
    bizplugin_openim_request_duration_seconds{endpoint,err_code}   histogram, one HTTP attempt each
    bizplugin_queue_depth{priority}                 gauge: recipients with work left, read at scrape time
    bizplugin_openim_admin_token_refused{err_code}  gauge: 1 while OpenIM refuses this process the admin
                                                    token (1002 wrong secret, 1001 not an admin user id,
                                                    1004 admin user missing); delivery waits meanwhile

Each app has its own registry, not prometheus-client's global default, so
several apps in one process (tests, the demo) never collide. Within a process
the app's views, its delivery engine, callback processor and OpenIM client
all count into the same :class:`Metrics` (:func:`install` hands it to them).
``serve`` runs several processes: :func:`share_across_processes` makes every
counter of each of them a file in one folder (prometheus-client's
multiprocess mode), and a scrape adds up those files, so any of its HTTP
processes answers the totals of the whole service, the background process's
deliveries included. The ``worker`` command has no HTTP server and its counts
are not scraped; the queue depth comes from the shared store, so any ``serve``
replica's ``/metrics`` shows the whole queue.
"""

from __future__ import annotations

import logging
import os
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from .errors import StorageUnavailable
from .store.base import PRIORITY_RANK, Outcome, Store, WorkItem

if TYPE_CHECKING:
    from .services import Services

log = logging.getLogger(__name__)
_RECIPIENT_COUNTERS = (
    ("sent", "Recipients delivered: OpenIM accepted the message"),
    ("failed", "Recipients that failed for good (dead letters)"),
    ("retried", "Attempts that failed and will be tried again"),
    ("held", "Recipients held while the user is offline (offline = hold)"),
    ("skipped", "Recipients skipped because the user was offline (offline = drop)"),
    ("waiting", "Recipients put back without spending an attempt: OpenIM refused the admin token"),
)


class Metrics:
    """The counters of one app and the components it runs; ``exposition()`` is the scrape."""

    def __init__(self, store: Store | None = None) -> None:
        self.registry = r = CollectorRegistry()
        self._accepted = Counter("bizplugin_messages_accepted", "Messages stored and answered 202 (repeats not "
                                 "counted)", ["client", "type"], registry=r)
        self._rejected = Counter("bizplugin_requests_rejected", "Requests answered with a problem document, by "
                                 "problem slug (routing: unknown path or method) and HTTP status",
                                 ["reason", "status"], registry=r)
        self._recipients = {name: Counter(f"bizplugin_recipients_{name}", text, ["type"], registry=r)
                            for name, text in _RECIPIENT_COUNTERS}
        self._throttled = Counter("bizplugin_recipients_throttled", "Recipients over their type's rate limit, "
                                  "delayed or dropped", ["type", "policy"], registry=r)
        self._callbacks = Counter("bizplugin_callbacks_received", "OpenIM callbacks received, by command and what "
                                  "became of them", ["command", "result"], registry=r)
        self._processed = Counter("bizplugin_callbacks_processed", "Stored OpenIM callbacks applied or failed",
                                  ["command", "result"], registry=r)
        self._deleted = Counter("bizplugin_retention_deleted", "What the retention sweep deleted: messages, their "
                                "recipients, users' presence reports, processed callbacks", ["what"], registry=r)
        self._openim = Histogram("bizplugin_openim_request_duration_seconds", "One HTTP attempt to OpenIM's REST "
                                 "API, by endpoint and errCode (http-<status> without an OpenIM answer, network "
                                 "without any)", ["endpoint", "err_code"], registry=r)
        self._token_refused = Gauge("bizplugin_openim_admin_token_refused", "1 while OpenIM refuses this process "
                                    "the admin token, by errCode (1002 wrong secret, 1001 not an admin user id, "
                                    "1004 admin user missing): delivery waits", ["err_code"], registry=r,
                                    multiprocess_mode="max")
        self._refused_code: str | None = None
        self._store = store
        if store is not None:
            r.register(QueueDepth(store))

    # -- what the components count ----------------------------------------------------
    def accepted(self, client: str, type_: str) -> None:
        self._accepted.labels(client, type_).inc()

    def rejected(self, reason: str, status: int) -> None:
        self._rejected.labels(reason, str(status)).inc()

    def outcomes(self, results: Iterable[tuple[WorkItem, Outcome]]) -> None:
        """Count the outcomes of a delivery round (one increment per kind and type, not per item)."""
        tally: Tally[tuple[str, str]] = Tally()
        for item, outcome in results:  # a batch's outcome counts each of its users
            tally[_outcome_kind(item, outcome)] += outcome.recipients(item)
        for (kind, type_), count in tally.items():
            if kind.startswith("throttled:"):
                self._throttled.labels(type_, kind.partition(":")[2]).inc(count)
            else:
                self._recipients[kind].labels(type_).inc(count)

    def callback_received(self, command: str, result: str) -> None:
        self._callbacks.labels(command, result).inc()

    def callback_processed(self, command: str, applied: bool) -> None:
        self._processed.labels(command, "applied" if applied else "error").inc()

    def openim_call(self, endpoint: str, err_code: str, seconds: float) -> None:
        self._openim.labels(endpoint, err_code).observe(seconds)

    def admin_token_refused(self, err_code: int | None) -> None:
        """OpenIM refuses the admin token with *err_code*, or (None) grants it again."""
        # one refusal at a time: the gauge names the current one (set back to 0, not cleared:
        # under multiprocess mode a cleared child would keep its last value in its file)
        if self._refused_code is not None:
            self._token_refused.labels(self._refused_code).set(0)
        self._refused_code = None if err_code is None else str(err_code)
        if self._refused_code is not None:
            self._token_refused.labels(self._refused_code).set(1)

    def deleted(self, what: str, count: int) -> None:
        """The retention sweep deleted *count* of *what* (messages, recipients, presence, callbacks)."""
        if count:
            self._deleted.labels(what).inc(count)

    def exposition(self) -> bytes:
        """The Prometheus text of this registry, as ``GET /metrics`` answers it: under
        :func:`share_across_processes`, the counters of every process of the service."""
        if _SHARED_DIR not in os.environ:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        if self._store is not None:
            registry.register(QueueDepth(self._store))
        return generate_latest(registry)


class _Discard(Metrics):
    """What components count into until :func:`install` gives them their app's metrics: nothing."""

    def __init__(self) -> None:  # no registry: nothing here is ever scraped
        pass

    def accepted(self, client: str, type_: str) -> None:
        pass

    def rejected(self, reason: str, status: int) -> None:
        pass

    def outcomes(self, results: Iterable[tuple[WorkItem, Outcome]]) -> None:
        pass

    def callback_received(self, command: str, result: str) -> None:
        pass

    def callback_processed(self, command: str, applied: bool) -> None:
        pass

    def openim_call(self, endpoint: str, err_code: str, seconds: float) -> None:
        pass

    def admin_token_refused(self, err_code: int | None) -> None:
        pass

    def deleted(self, what: str, count: int) -> None:
        pass

    def exposition(self) -> bytes:
        return b""


DISCARD: Metrics = _Discard()
_SHARED_DIR = "PROMETHEUS_MULTIPROC_DIR"


def share_across_processes(directory: str) -> None:
    """Keep the counters made from now on (in this process and the processes it forks) in
    files in *directory*, which must be empty; a scrape adds up every process's files."""
    os.environ[_SHARED_DIR] = directory
    values.ValueClass = values.MultiProcessValue()


def _outcome_kind(item: WorkItem, outcome: Outcome) -> tuple[str, str]:
    """Which counter an outcome adds to: a retry carries its error, a rate-limit delay does not."""
    if outcome.status == "queued":
        kind = ("waiting" if outcome.uncounted else "retried") if outcome.error else "throttled:delay"
    elif outcome.status == "throttled":
        kind = "throttled:drop"
    else:
        kind = outcome.status if outcome.status in ("sent", "failed", "held", "skipped") else "retried"
    return kind, item.type


class QueueDepth:
    """A collector: recipients with work left per priority, asked of the store at each scrape.

    Aged recipients count at the priority they are now served at. When the
    store does not answer, the gauge is left out of that scrape (and a warning
    logged) instead of failing the counters with it.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    def describe(self) -> Iterator[Metric]:  # registering must not query the store
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        try:
            depth = self.store.queue_depth()
        except StorageUnavailable as exc:
            log.warning("queue depth left out of /metrics: %s", exc.detail, extra={"event": "metrics.queue_depth"})
            return
        family = self._family()
        for priority in PRIORITY_RANK:
            family.add_metric([priority], depth.get(priority, 0))
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("bizplugin_queue_depth", "Recipients with work left (queued, held, sending) "
                                 "by the priority they are served at", labels=["priority"])


def install(services: Services) -> Metrics:
    """One :class:`Metrics` for *services*, handed to every component that counts; returns it."""
    metrics = Metrics(services.store)
    services.openim.metrics = metrics
    services.engine.metrics = metrics
    services.callbacks.metrics = metrics
    services.retention.metrics = metrics
    return metrics

