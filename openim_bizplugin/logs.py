"""JSON log lines, set up in one place: :func:`setup`.

Every line is one JSON object::

    {"ts": "2026-11-26T12:00:00.123Z", "level": "INFO", "logger": "openim_bizplugin.delivery.sending",
     "event": "delivery.outcome", "msg": "message 0193… user u1: sent (operationID biz-0193…-…-0, attempt 1)",
     "message_id": "0193…", "recipient": "u1", "client": "crm", "type": "profile.updated",
     "operation_id": "biz-0193…-…-0", "status": "sent", "attempt": 1}

``ts`` is RFC 3339 UTC; ``event`` names what happened, and the fields after
``msg`` are whatever the call site passed in ``extra=`` (``message_id``,
``recipient``, ``client``, ``operation_id``, ``type``, ``status``,
``callback``, …). The operationID the sidecar gives a delivery attempt embeds
the message id (``biz-<message id>-<ms>-<tag>-<seq>``), so one grep for a message id
finds its acceptance, its OpenIM calls, the callbacks OpenIM sends about it
(they carry that operationID) and its receipt.

No secret may reach a log line. Call sites never pass one; as a safety net
the formatter masks, in the message, the traceback and every field: the
secrets of the config (client secrets, the OpenIM secret, the callback token,
subscriber secrets, the operator token), anything shaped like a JWT (OpenIM's
admin and user tokens) or an itsdangerous token (``X-Biz-Signature`` values,
session cookies), Standard Webhooks secrets and signatures; and any ``extra``
field whose name says token, secret, signature, password, cookie or
authorization is written as ``***``.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from .config import Config

MASK = "***"
MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary words; config secrets are far longer
# What LogRecord carries by itself: everything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_SECRET_FIELD = re.compile(r"token|secret|signature|password|passwd|cookie|authorization", re.IGNORECASE)
# Secret shapes, each with a substring it cannot match without: that cheap test comes first
# (one alternation of these four patterns cost ~25 us a line; the guarded ones, next to nothing).
_SHAPES = (
    ("eyJ", re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{16,}")),  # JWT: OpenIM tokens
    # itsdangerous: X-Biz-Signature values, session cookies (value.timestamp.signature)
    (".", re.compile(r"(?<![\w.])\.?[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{4,8}\.[A-Za-z0-9_-]{27,}")),
    ("whsec_", re.compile(r"\bwhsec_[A-Za-z0-9+/=]+")),  # Standard Webhooks secrets
    ("v1,", re.compile(r"\bv1,[A-Za-z0-9+/]{40,}={0,2}")),  # Standard Webhooks signatures
)
_SHORTEST_SHAPE = 7  # "whsec_" and one character
_HANDLER_MARK = "_bizplugin_json"


class Redactor:
    """Masks known secret values and secret-shaped strings in text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        known = sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
        self._secrets = tuple(known)
        self._known = re.compile("|".join(map(re.escape, known))) if known else None
        self._shortest = min(map(len, known), default=0)

    def text(self, text: str) -> str:
        # substring tests first: most strings hold no secret, and they cost a fraction of a regex pass
        if self._known is not None and len(text) >= self._shortest and any(s in text for s in self._secrets):
            text = self._known.sub(MASK, text)
        if len(text) >= _SHORTEST_SHAPE:
            for needed, shape in _SHAPES:
                if needed in text:
                    text = shape.sub(MASK, text)
        return text

    def value(self, value: Any) -> Any:
        """A JSON-ready field value with secrets masked: scalars kept, lists walked, the rest as text."""
        if type(value) is str:
            return self.text(value)
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self.value(v) for v in value]
        if isinstance(value, dict):
            return {str(k): MASK if secret_field(str(k)) else self.value(v) for k, v in value.items()}
        return self.text(str(value))


@functools.lru_cache(maxsize=1024)
def secret_field(name: str) -> bool:
    """Whether a field of this name is written as ``***`` whatever it holds (names repeat: cached)."""
    return bool(_SECRET_FIELD.search(name))


def rfc3339(seconds: float) -> str:
    """Unix seconds as RFC 3339 UTC with milliseconds, e.g. ``2026-11-26T12:00:00.123Z``."""
    global _second
    whole = int(seconds)
    cached = _second  # one tuple, rebound at once: safe across threads
    if cached[0] != whole:  # lines come many to a second: format the date and time once per second
        cached = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{cached[1]}.{int((seconds - whole) * 1000):03d}Z"


_second: tuple[int, str] = (-1, "")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line, with secrets masked (see the module docstring)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.redactor = Redactor(secrets)

    def format(self, record: logging.LogRecord) -> str:
        redact = self.redactor
        entry: dict[str, Any] = {"ts": rfc3339(record.created), "level": record.levelname, "logger": record.name}
        event = getattr(record, "event", None)
        if event is not None:
            entry["event"] = redact.value(event)
        entry["msg"] = redact.text(record.getMessage())
        for key, value in record.__dict__.items():
            if key in _RECORD_FIELDS or key == "event" or key.startswith("_"):
                continue
            entry[key] = MASK if secret_field(key) else redact.value(value)
        if record.exc_info:
            entry["exc"] = redact.text(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = redact.text(self.formatStack(record.stack_info))
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


def config_secrets(config: Config) -> list[str]:
    """Every secret value in *config*, for the formatter to mask wherever it shows up."""
    found = [config.openim.secret, config.callback_token, config.ui_token or ""]
    found += [secret for client in config.clients.values() for secret in client.secrets]
    for subscriber in config.subscribers:
        found += [subscriber.secret, subscriber.secret.removeprefix("whsec_")]
    return [s for s in found if s]


def setup(level: int | str = logging.INFO, config: Config | None = None, *,
          stream: TextIO | None = None) -> logging.Handler:
    """Send every log record at *level* and above to *stream* (stderr) as JSON lines.

    The secrets of *config* are masked wherever they appear. Calling it again
    replaces the handler it installed before, and no other. Returns the handler.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(config_secrets(config) if config is not None else ()))
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level)
    # urllib3 logs each connection and request line at DEBUG: noise beside the sidecar's own call lines
    logging.getLogger("urllib3").setLevel(max(root.level, logging.INFO))
    return handler
