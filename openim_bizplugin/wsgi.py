"""WSGI entry point for production servers, e.g.
``gunicorn 'openim_bizplugin.wsgi:create()'`` with ``BIZPLUGIN_CONFIG`` set."""

from __future__ import annotations

from flask import Flask

from .app import create_app
from .config import config_path, load_config


def create() -> Flask:
    """The app for the config named by ``BIZPLUGIN_CONFIG``."""
    return create_app(load_config(config_path(None)))
