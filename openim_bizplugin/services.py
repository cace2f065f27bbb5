"""The services one sidecar process runs on, built once from the config."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .catalog import Catalog
from .config import Config
from .signing import RequestVerifier
from .store import open_store
from .store.base import Store


@dataclass
class Services:
    """Everything the views, workers and CLI share; kept in ``app.extensions``."""

    config: Config
    catalog: Catalog
    verifier: RequestVerifier
    store: Store
    clock: Callable[[], float]

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
        return cls(config, catalog, verifier, open_store(config.storage), clock)

    def close(self) -> None:
        self.store.close()
