"""``POST /v1/messages`` (SPEC §4), answered in front of the Flask app.

It is the one route of the signed API that takes traffic at volume, and
Flask's per-request machinery (contexts, routing over every rule, a Response
object) cost ~0.1 ms of the ~1 ms the app spends on a message (bench_intake).
So it is answered here, like OpenIM's callbacks (:mod:`.callbacks`), with the
same checks, answers, problems, metrics and log lines as every other route.
Any other method on the path gets a 405 naming POST (OPTIONS too: Flask
answered that one itself); other paths go to the app.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wsgi import get_content_length, get_input_stream

from ..counters import Metrics
from ..errors import BizError
from ..intake import accept_message
from ..services import Services
from . import problems
from .wire import LOGGED, read_body, verified_caller

PATH = "/v1/messages"


class MessageEndpoint:
    """WSGI middleware in front of the Flask app that answers ``POST /v1/messages``."""

    def __init__(self, app: Callable[..., Iterable[bytes]], services: Services, counts: Metrics) -> None:
        self.app, self.services, self.metrics = app, services, counts

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != PATH:
            return self.app(environ, start_response)
        content_type = "application/json"
        try:
            if environ.get("REQUEST_METHOD") != "POST":
                raise MethodNotAllowed(valid_methods=["POST"])
            status, headers, body = self.accept(environ)
            environ[LOGGED] = True  # accept_message logged it: one line per request
        except BizError as exc:
            content_type = problems.PROBLEM_JSON
            status, headers, body = problems.for_error(exc, self.metrics, environ.get("REQUEST_METHOD", "-"), PATH,
                                                       environ.get("HTTP_X_BIZ_CLIENT"))
        except HTTPException as exc:  # 405 above, or the body cut short (ClientDisconnected)
            content_type = problems.PROBLEM_JSON
            status, headers, body = problems.for_http(exc, self.metrics)
        except Exception:
            content_type = problems.PROBLEM_JSON
            status, headers, body = problems.unexpected()
        start_response(f"{status} {HTTP_STATUS_CODES.get(status, 'Unknown').upper()}", [
            ("Content-Type", content_type), ("Content-Length", str(len(body))), *headers.items()])
        return [body]

    def accept(self, environ: dict[str, Any]) -> problems.Answer:
        """Read, verify and store one message: its 202 answer, or a BizError."""
        svc = self.services
        body = read_body(get_input_stream(environ), get_content_length(environ), svc.config.server.max_body_bytes)
        verified = verified_caller(svc, environ, body)
        answer = accept_message(svc, verified, body, environ.get("CONTENT_TYPE"), environ.get("HTTP_IDEMPOTENCY_KEY"))
        if answer.accepted.created:
            self.metrics.accepted(verified.client_id, answer.message_type)
        # as Flask's jsonify writes it: compact, ASCII, with a final newline
        text = json.dumps(answer.accepted.answer(), separators=(",", ":")) + "\n"
        return 202, answer.headers, text.encode()
