"""The services one sidecar process runs on, built once from the config."""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from .callbacks.processing import CallbackProcessor
from .callbacks.spool import CallbackSpool, default_spool_dir
from .callbacks.subscribers import SubscriberDispatcher
from .catalog.registry import Catalog
from .config import Config
from .delivery.engine import DeliveryEngine, build_engine
from .openim.client import OpenIMClient
from .openim.readiness import OpenIMReadiness
from .openim.release import OpenIMRelease
from .ratelimit import ClientRateLimiter
from .retention import RetentionSweeper
from .signing import RequestVerifier
from .store import open_store
from .store.base import Store


def process_owner() -> str:
    """A name for this process in leases and locks: host, pid and a random tag."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class Services:
    """Everything the views, workers and CLI share; kept in ``app.extensions``."""

    config: Config
    catalog: Catalog
    verifier: RequestVerifier
    limiter: ClientRateLimiter
    store: Store
    openim: OpenIMClient
    release: OpenIMRelease  # which OpenIM API: configured, or probed once (doctor and /readyz show it)
    engine: DeliveryEngine
    subscribers: SubscriberDispatcher
    callbacks: CallbackProcessor
    spool: CallbackSpool  # callbacks answered while the store could not take them at once
    clock: Callable[[], float]
    openim_readiness: OpenIMReadiness  # OpenIM asked itself, bounded: /readyz and doctor
    retention: RetentionSweeper

    @classmethod
    def build(cls, config: Config, *, clock: Callable[[], float] = time.time) -> Services:
        """Load the catalogue and open the store; raises ConfigError on a problem."""
        catalog = Catalog.load(config.schemas_dir)
        verifier = RequestVerifier(
            {c.client_id: c.secrets for c in config.clients.values()},
            max_age=config.server.signature_max_age_seconds,
            skew=config.server.signature_skew_seconds,
            clock=clock,
        )
        store = open_store(config.storage, frozenset(e for s in config.subscribers for e in s.events),
                           config.delivery.batch_size)
        owner = process_owner()
        openim = OpenIMClient(config.openim, store, clock=clock, owner=owner,
                              refusal_recheck_seconds=config.openim.token_recheck_seconds)
        subscribers = SubscriberDispatcher(config, store, owner=owner)
        subscribers.enrol()
        release = OpenIMRelease(openim, config.openim.version, config.openim.sender_id, clock=clock)
        engine = build_engine(config, store, openim, release, clock, owner, on_events=subscribers.wake)
        # processed callbacks emit events and may release held recipients
        callbacks = CallbackProcessor(config, store, clock, on_change=subscribers.wake,
                                      on_online=engine.wake)
        spool = CallbackSpool(config.callback_spool_dir or default_spool_dir(config.storage), store,
                              max_bytes=config.callback_spool_max_bytes, on_stored=callbacks.wake)
        limiter = ClientRateLimiter({c.client_id: c.rate_limit for c in config.clients.values()}, store, clock)
        readiness = OpenIMReadiness(openim, config.openim.sender_id, clock=clock)
        retention = RetentionSweeper(config, store, clock, owner=owner)
        return cls(config, catalog, verifier, limiter, store, openim, release, engine, subscribers, callbacks, spool,
                   clock, readiness, retention)

    def start_background(self) -> None:
        """Run delivery workers, callback processing, event dispatch and the retention sweep
        in this process (serve, worker)."""
        self.engine.start(max(self.config.delivery.workers, 1))
        self.callbacks.start(1)
        self.spool.start()  # also replays the spools of processes that ended
        if self.config.subscribers:
            self.subscribers.start()
        self.retention.start()

    def close(self) -> None:
        self.engine.stop()
        self.callbacks.stop()
        self.retention.stop()
        self.subscribers.stop()
        self.spool.close()
        self.store.close()
