"""Problem answers (RFC 9457) for the app's error handlers and for the endpoints in front of it.

Each function returns ``(status, headers, body)``: the Flask handlers in
:mod:`.app` wrap it in a Response, :class:`~.messages.MessageEndpoint` hands
it to ``start_response`` as it is, so an error reads the same on every path.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from werkzeug.exceptions import HTTPException

from ..counters import Metrics
from ..errors import BizError, problem

log = logging.getLogger("openim_bizplugin.web.app")  # the logger these lines always had
PROBLEM_JSON = "application/problem+json"
Answer = tuple[int, dict[str, str], bytes]


def for_error(exc: BizError, counts: Metrics, method: str, route: str, client: str | None) -> Answer:
    """A refused request: counted, logged at a level by status, answered with its problem."""
    counts.rejected(exc.slug, exc.status)
    client = (client or "")[:64] or None
    level = logging.WARNING if exc.status >= 500 else logging.DEBUG if exc.status == 429 else logging.INFO
    log.log(level, "%s %s answered %d %s: %s", method, route, exc.status, exc.slug, exc.detail,
            extra={"event": "request.rejected", "status": exc.status, "reason": exc.slug, "method": method,
                   "route": route, "client": client})
    return exc.status, dict(exc.headers or {}), _body(problem(exc))


def for_http(exc: HTTPException, counts: Metrics) -> Answer:
    """Routing and protocol errors (404, 405, a body cut short, …) in the same format."""
    counts.rejected("routing", exc.code or 500)
    body = {"type": "about:blank", "title": exc.name, "status": exc.code, "detail": exc.description}
    headers = dict(exc.get_headers()) if exc.code == 405 else {}
    headers.pop("Content-Type", None)
    return exc.code or 500, headers, _body(body)


def unexpected() -> Answer:
    """A bug: logged with its traceback (call from an ``except`` block), answered without it."""
    log.exception("unexpected error while answering a request")
    body = {"type": "about:blank", "title": "Internal Server Error", "status": 500,
            "detail": "an unexpected error occurred; it has been logged"}
    return 500, {}, _body(body)


def _body(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()
