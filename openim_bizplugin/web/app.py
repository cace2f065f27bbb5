"""The application factory: build the services once, register the surfaces."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, current_app, json, request
from werkzeug.exceptions import HTTPException

from ..config import Config
from ..errors import BizError, problem
from ..services import Services
from . import api, callbacks, metrics, ops, ui
from .openapi import build_openapi

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"


def create_app(config: Config, *, clock: Callable[[], float] = time.time,
               services: Services | None = None) -> Flask:
    """A Flask app serving *config*; raises ConfigError when it cannot start."""
    app = Flask(__name__)
    app.json.sort_keys = False
    svc = services or Services.build(config, clock=clock)
    app.extensions["bizplugin"] = svc
    app.extensions["bizplugin.openapi"] = build_openapi(svc.catalog)
    app.extensions[metrics.EXTENSION] = metrics.install(svc)  # one registry per app, shared by its workers
    app.register_blueprint(api.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(metrics.bp)
    if config.ui_token:  # the operator page; without [ui] token it does not exist (a plain 404)
        ui.init_app(app, config.ui_token, secure_cookie=config.ui_secure_cookie)  # session key, cookie flags
    app.add_url_rule("/openapi.json", "openapi", _openapi)
    app.wsgi_app = callbacks.CallbackEndpoint(app.wsgi_app, svc, app.extensions[metrics.EXTENSION])  # type: ignore[method-assign]
    app.register_error_handler(BizError, _problem_response)
    app.register_error_handler(HTTPException, _http_problem)
    app.register_error_handler(Exception, _unexpected)
    return app


def _openapi() -> Any:
    return current_app.extensions["bizplugin.openapi"]


def _render(body: dict[str, Any], status: int, headers: dict[str, str] | None = None) -> Response:
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM_JSON)
    response.headers.update(headers or {})
    return response


def _problem_response(exc: BizError) -> Response:
    metrics.current().rejected(exc.slug, exc.status)
    # the route's rule, not the path: a callback path holds the token
    route = request.url_rule.rule if request.url_rule else "-"
    client = (request.headers.get("X-Biz-Client") or "")[:64] or None
    level = logging.WARNING if exc.status >= 500 else logging.DEBUG if exc.status == 429 else logging.INFO
    log.log(level, "%s %s answered %d %s: %s", request.method, route, exc.status, exc.slug, exc.detail,
            extra={"event": "request.rejected", "status": exc.status, "reason": exc.slug, "method": request.method,
                   "route": route, "client": client})
    return _render(problem(exc), exc.status, exc.headers)


def _http_problem(exc: HTTPException) -> Response:
    """Routing errors (404, 405, …) in the same problem format."""
    metrics.current().rejected("routing", exc.code or 500)
    body = {"type": "about:blank", "title": exc.name, "status": exc.code, "detail": exc.description}
    headers = dict(exc.get_headers()) if exc.code == 405 else {}
    headers.pop("Content-Type", None)
    return _render(body, exc.code or 500, headers)


def _unexpected(exc: Exception) -> Response:
    log.exception("unexpected error while answering a request")
    body = {"type": "about:blank", "title": "Internal Server Error", "status": 500,
            "detail": "an unexpected error occurred; it has been logged"}
    return _render(body, 500)
