"""``GET /metrics``: Prometheus text from the app's :class:`~openim_bizplugin.counters.Metrics`."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST

from ..counters import DISCARD, Metrics, install

__all__ = ["EXTENSION", "Metrics", "bp", "current", "install"]

bp = Blueprint("metrics", __name__)
EXTENSION = "bizplugin.metrics"


def current() -> Metrics:
    """The metrics of the app handling this request."""
    return current_app.extensions.get(EXTENSION, DISCARD)


@bp.get("/metrics")
def scrape() -> Any:
    return Response(current().exposition(), mimetype=None, content_type=CONTENT_TYPE_LATEST)
