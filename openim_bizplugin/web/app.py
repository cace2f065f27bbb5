"""The application factories: the plugin's own app (every surface) and the standalone sidecar."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException

from ..config import Config
from ..errors import BizError
from ..services import Services
from . import api, callbacks, messages, metrics, ops, problems, ui
from .openapi import build_openapi


def create_app(config: Config, *, clock: Callable[[], float] = time.time,
               services: Services | None = None, background: bool = False) -> Flask:
    """The standalone sidecar (what ``serve`` runs): a bare Flask app with :class:`~.plugin.BizPlugin`
    mounted at its root. Raises ConfigError when it cannot start.

    *background* as for BizPlugin; off by default, as ``serve`` and ``worker`` start it themselves.
    """
    from .plugin import BizPlugin  # the plugin builds its own app with plugin_app() below

    app = Flask(__name__)
    BizPlugin(app, config=config, clock=clock, services=services, background=background)
    return app


def plugin_app(config: Config, svc: Services) -> Flask:
    """The plugin's own Flask app: every surface, answering problems in its own JSON.

    A host app hands the plugin's paths to this app instead of routing them itself (see
    :class:`~.plugin.BizPlugin`), so the host's error pages, JSON provider, session and templates
    stay the host's.
    """
    app = Flask(__name__)
    app.json.sort_keys = False
    app.extensions["bizplugin"] = svc
    app.extensions["bizplugin.openapi"] = build_openapi(svc.catalog)
    app.extensions[metrics.EXTENSION] = metrics.install(svc)  # one registry per app, shared by its workers
    app.register_blueprint(api.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(metrics.bp)
    if config.ui_token:  # the operator page; without [ui] token it does not exist (a plain 404)
        ui.init_app(app, config.ui_token, secure_cookie=config.ui_secure_cookie)  # session key, cookie flags
    app.add_url_rule("/openapi.json", "openapi", _openapi)
    counts = app.extensions[metrics.EXTENSION]
    # the two paths that take traffic at volume are answered in front of Flask's per-request machinery
    app.wsgi_app = callbacks.CallbackEndpoint(app.wsgi_app, svc, counts)  # type: ignore[method-assign]
    app.wsgi_app = messages.MessageEndpoint(app.wsgi_app, svc, counts)  # type: ignore[method-assign]
    app.register_error_handler(BizError, _problem_response)
    app.register_error_handler(HTTPException, _http_problem)
    app.register_error_handler(Exception, _unexpected)
    return app


def _openapi() -> Any:
    document = current_app.extensions["bizplugin.openapi"]
    if request.script_root:  # mounted under a prefix: the paths start there
        document = {**document, "servers": [{"url": request.script_root}]}
    return document


def _response(answer: problems.Answer) -> Response:
    status, headers, body = answer
    response = Response(body, status=status, mimetype=problems.PROBLEM_JSON)
    response.headers.update(headers)
    return response


def _problem_response(exc: BizError) -> Response:
    # the route's rule, not the path: a callback path holds the token
    route = request.url_rule.rule if request.url_rule else "-"
    return _response(problems.for_error(exc, metrics.current(), request.method, route,
                                        request.headers.get("X-Biz-Client")))


def _http_problem(exc: HTTPException) -> Response:
    return _response(problems.for_http(exc, metrics.current()))


def _unexpected(exc: Exception) -> Response:
    return _response(problems.unexpected())
