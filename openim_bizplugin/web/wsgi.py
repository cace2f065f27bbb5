"""WSGI entry point for production servers, e.g.
``gunicorn 'openim_bizplugin.web.wsgi:create()'`` with ``BIZPLUGIN_CONFIG`` set.

Serves HTTP only: run ``openim-bizplugin worker`` beside it for delivery,
callback processing and subscriber events (docs/deployment.md).
"""

from __future__ import annotations

import os
import sys

from flask import Flask

from .. import logs
from ..config import config_path, load_config
from ..errors import ConfigError
from .app import create_app
from .server import freeze_startup_heap


def create() -> Flask:
    """The app for the config named by ``BIZPLUGIN_CONFIG``, logging JSON lines to stderr."""
    try:
        config = load_config(config_path(None))
        logs.setup(os.environ.get("BIZPLUGIN_LOG_LEVEL", "INFO").upper(), config)
        app = create_app(config)
    except ConfigError as exc:  # one clear line, not a traceback per gunicorn worker
        print(f"openim-bizplugin: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    freeze_startup_heap()
    return app
