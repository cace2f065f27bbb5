"""Configuration: one TOML file, read and checked in one place.

Every key is documented in ``config.example.toml``. Secrets may be written as
``env:NAME`` to read an environment variable. Any problem raises
:class:`~openim_bizplugin.errors.ConfigError` with one line that names the key
(``openim.secret``) or the file, so start-up can refuse cleanly.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .catalog.registry import RateLimit
from .errors import ConfigError

CONFIG_ENV = "BIZPLUGIN_CONFIG"
_REQUIRED = object()
_TABLES = ("server", "openim", "callbacks", "storage", "schemas", "delivery", "clients", "subscribers", "ui",
           "retention")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# RFC 3986 unreserved characters: OpenIM calls url + "/" + command, so the token is one path
# segment sent as written; "/", "%", "?", "#" or a space would make every callback miss the route.
_URL_PATH_SAFE = re.compile(r"[A-Za-z0-9._~-]+")
OPENIM_VERSIONS = ("auto", "3.8", "main")  # [openim] version: see openim/release.py


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 2 * 1024 * 1024
    max_recipients: int = 10_000
    signature_max_age_seconds: int = 300
    signature_skew_seconds: int = 30
    idempotency_retention_seconds: int = 86_400
    workers: int | None = None  # HTTP worker processes of `serve`; None: the CPU count
    threads: int = 8  # request threads per worker process
    max_connections: int = 1000  # open connections per worker process (more wait in the listen backlog)
    header_timeout_seconds: float = 10.0  # a request's headers must arrive within this
    body_timeout_seconds: float = 30.0  # a whole request (headers and body) must arrive within this
    keepalive_seconds: float = 30.0  # an idle kept-alive connection is closed after this
    shutdown_seconds: float = 10.0  # SIGTERM: requests in flight get this long to finish

    @property
    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1


@dataclass(frozen=True)
class OpenIMConfig:
    api_url: str
    secret: str
    admin_user_id: str
    sender_id: str
    timeout_seconds: float = 10.0
    check_recipients: bool = False
    token_recheck_seconds: float = 5.0  # while OpenIM refuses the admin token, ask again this often
    version: str = "auto"  # which OpenIM API: "auto" (probed at start), "3.8" or "main" (openim/release.py)


@dataclass(frozen=True)
class StorageConfig:
    url: str
    sqlite_path: Path | None  # set for sqlite:// URLs, resolved against the config folder; None for redis://
    # how long accepting a message waits for SQLite's write lock (this process's other writers, then
    # another process's) before answering 503 with Retry-After; a lock wait is at most twice this
    lock_wait_seconds: float = 4.0


@dataclass(frozen=True)
class DeliveryConfig:
    workers: int = 4
    max_attempts: int = 8
    batch_size: int = 500
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 300.0
    lease_seconds: float = 30.0
    hold_recheck_seconds: float = 60.0
    presence_max_age_seconds: float = 300.0
    priority_aging_seconds: float = 300.0


@dataclass(frozen=True)
class RetentionConfig:
    """How long finished data is kept, and how often the sweep runs (SPEC §2 ``[retention]``)."""

    finished_seconds: int = 604_800  # a message all of whose recipients are final, after it finished
    dead_letter_seconds: int = 2_592_000  # the same for a message with failed recipients
    sweep_seconds: int = 60


@dataclass(frozen=True)
class ClientConfig:
    client_id: str
    secrets: tuple[str, ...]
    allowed_types: tuple[str, ...]
    rate_limit: str | None = None


@dataclass(frozen=True)
class SubscriberConfig:
    url: str
    secret: str
    events: tuple[str, ...]


@dataclass(frozen=True)
class Config:
    path: Path
    server: ServerConfig
    openim: OpenIMConfig
    callback_token: str
    storage: StorageConfig
    schemas_dir: Path
    delivery: DeliveryConfig
    clients: dict[str, ClientConfig]
    subscribers: tuple[SubscriberConfig, ...] = ()
    ui_token: str | None = None
    callback_retention_seconds: int = 3_600  # processed callbacks (and their dedupe keys) kept this long
    ui_secure_cookie: bool = False  # the operator page's cookie is Secure even over plain HTTP (TLS ends at a proxy)
    callback_spool_dir: Path | None = None  # None: beside the SQLite file, or a temp folder for Redis
    callback_spool_max_bytes: int = 64 * 1024 * 1024  # per process
    retention: RetentionConfig = RetentionConfig()
    # a callback body larger than this is answered "continue" and not stored (OpenIM's are small)
    callback_max_body_bytes: int = 256 * 1024


class _Section:
    """Reads the keys of one TOML table, naming ``section.key`` in every error."""

    def __init__(self, name: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{name}: must be a table")
        self.name, self.data, self.seen = name, data, set()

    def _get(self, key: str, default: Any) -> Any:
        self.seen.add(key)
        if key in self.data:
            return self.data[key]
        if default is _REQUIRED:
            raise ConfigError(f"{self.name}.{key}: missing (required)")
        return default

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.name}.{key}: {problem}")

    def str(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default)
        if value is not default and (not isinstance(value, str) or not value.strip()):
            raise self.fail(key, "must be a non-empty string")
        return value

    def secret(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.str(key, default)
        return value if value is None else _resolve_secret(f"{self.name}.{key}", value)

    def int(self, key: str, default: int, minimum: int = 1, maximum: int | None = None) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, "must be an integer")
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and at most {maximum}" if maximum is not None else ""
            raise self.fail(key, f"must be at least {minimum}{upper}")
        return value

    def float(self, key: str, default: float) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise self.fail(key, "must be a positive number")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, "must be true or false")
        return value

    def str_list(self, key: str, default: Any = _REQUIRED) -> tuple[str, ...]:
        value = self._get(key, default)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, "must be a non-empty list of strings")
        return tuple(value)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise self.fail(unknown[0], "unknown key")


def _resolve_secret(key: str, value: str) -> str:
    if not value.startswith("env:"):
        return value
    name = value[4:]
    resolved = os.environ.get(name, "")
    if not name or not resolved:
        raise ConfigError(f"{key}: environment variable {name or '(empty name)'} is not set")
    return resolved


def config_path(explicit: str | None) -> Path:
    """The config file named by ``-c/--config`` or ``BIZPLUGIN_CONFIG``."""
    chosen = explicit or os.environ.get(CONFIG_ENV)
    if not chosen:
        raise ConfigError(f"no configuration: pass -c/--config PATH or set {CONFIG_ENV}")
    return Path(chosen)


def load_config(path: str | Path) -> Config:
    """Read, check and resolve the TOML file at *path*."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return parse_config(data, path.resolve())


def config_from_mapping(data: Mapping[str, Any]) -> Config:
    """Check and resolve config *data* shaped like the TOML file (``{"openim": {...}, ...}``).

    Relative paths resolve against the current directory, as there is no file.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: must be a TOML file path or a mapping, not {type(data).__name__}")
    return parse_config(_plain(data), Path.cwd().resolve() / "<mapping>")


def _plain(value: Any) -> Any:
    """*value* with every mapping a dict and every tuple a list, as ``tomllib`` returns them."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def parse_config(data: dict[str, Any], path: Path) -> Config:
    """Build a :class:`Config` from parsed TOML; *path* anchors relative paths."""
    base = path.parent
    unknown = sorted(set(data) - set(_TABLES))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown table or key")
    server = _server(_Section("server", data.get("server", {})))
    openim = _openim(_Section("openim", _required_table(data, "openim")))
    callbacks = _Section("callbacks", _required_table(data, "callbacks"))
    callback_token = callbacks.secret("token")
    if len(callback_token) < 16:
        raise callbacks.fail("token", "must be at least 16 characters (it guards the callback URL)")
    if not _URL_PATH_SAFE.fullmatch(callback_token):
        raise callbacks.fail("token", "must be URL-path safe: only A-Z a-z 0-9 . _ ~ - (it is one segment of"
                                      " the callback URL in OpenIM's webhooks.yml)")
    callback_retention_seconds = callbacks.int("retention_seconds", Config.callback_retention_seconds)
    spool_dir = callbacks.str("spool_dir", None)
    spool_max_bytes = callbacks.int("spool_max_bytes", Config.callback_spool_max_bytes, minimum=64 * 1024)
    callback_max_body_bytes = callbacks.int("max_body_bytes", Config.callback_max_body_bytes, minimum=1024)
    callbacks.done()
    storage = _storage(_Section("storage", data.get("storage", {})), base)
    schemas = _Section("schemas", data.get("schemas", {}))
    schemas_dir = base / schemas.str("dir", "schemas")
    schemas.done()
    delivery = _delivery(_Section("delivery", data.get("delivery", {})))
    clients = _clients(_required_table(data, "clients"))
    subscribers = _subscribers(data.get("subscribers", []))
    ui = _Section("ui", data.get("ui", {}))
    ui_token = ui.secret("token", None)
    if ui_token is not None and len(ui_token) < 16:
        raise ui.fail("token", "must be at least 16 characters (it guards the operator page)")
    ui_secure_cookie = ui.bool("secure_cookie", False)
    ui.done()
    retention = _retention(_Section("retention", data.get("retention", {})))
    window = server.idempotency_retention_seconds
    for key in ("finished_seconds", "dead_letter_seconds"):
        if getattr(retention, key) < window:  # a repeat inside the window would be stored and sent again
            raise ConfigError(f"retention.{key}: must be at least server.idempotency_retention_seconds ({window}):"
                              " a repeated request within that window must still find its message")
    return Config(path, server, openim, callback_token, storage, schemas_dir, delivery,
                  clients, subscribers, ui_token, callback_retention_seconds, ui_secure_cookie,
                  callback_spool_dir=base / spool_dir if spool_dir else None,
                  callback_spool_max_bytes=spool_max_bytes, retention=retention,
                  callback_max_body_bytes=callback_max_body_bytes)


def _required_table(data: dict[str, Any], name: str) -> Any:
    if name not in data:
        raise ConfigError(f"{name}: missing table [{name}] (required)")
    return data[name]


def _server(s: _Section) -> ServerConfig:
    d = ServerConfig()
    cfg = ServerConfig(
        host=s.str("host", d.host),
        port=s.int("port", d.port, minimum=0, maximum=65535),
        max_body_bytes=s.int("max_body_bytes", d.max_body_bytes, minimum=1024),
        max_recipients=s.int("max_recipients", d.max_recipients),
        signature_max_age_seconds=s.int("signature_max_age_seconds", d.signature_max_age_seconds),
        signature_skew_seconds=s.int("signature_skew_seconds", d.signature_skew_seconds, minimum=0),
        idempotency_retention_seconds=s.int("idempotency_retention_seconds", d.idempotency_retention_seconds),
        workers=s.int("workers", 0, minimum=0, maximum=256) or None,
        threads=s.int("threads", d.threads, maximum=256),
        max_connections=s.int("max_connections", d.max_connections, minimum=16),
        header_timeout_seconds=s.float("header_timeout_seconds", d.header_timeout_seconds),
        body_timeout_seconds=s.float("body_timeout_seconds", d.body_timeout_seconds),
        keepalive_seconds=s.float("keepalive_seconds", d.keepalive_seconds),
        shutdown_seconds=s.float("shutdown_seconds", d.shutdown_seconds),
    )
    s.done()
    return cfg


def _openim(s: _Section) -> OpenIMConfig:
    api_url = s.str("api_url")
    if not re.match(r"^https?://", api_url):
        raise s.fail("api_url", "must be an http:// or https:// URL")
    cfg = OpenIMConfig(
        api_url=api_url.rstrip("/"),
        secret=s.secret("secret"),
        admin_user_id=s.str("admin_user_id"),
        sender_id=s.str("sender_id"),
        timeout_seconds=s.float("timeout_seconds", 10.0),
        check_recipients=s.bool("check_recipients", False),
        token_recheck_seconds=s.float("token_recheck_seconds", 5.0),
        version=s.str("version", "auto"),
    )
    if cfg.version not in OPENIM_VERSIONS:
        raise s.fail("version", 'must be "auto", "3.8" or "main"')
    s.done()
    return cfg


def _storage(s: _Section, base: Path) -> StorageConfig:
    url = s.str("url", "sqlite:///bizplugin.db")
    lock_wait = s.float("lock_wait_seconds", StorageConfig.lock_wait_seconds)
    s.done()
    if url.startswith("sqlite:///"):
        rest = url[len("sqlite:///"):]
        if not rest or rest == "/":
            raise s.fail("url", "sqlite URL needs a file name (sqlite:///relative.db or sqlite:////abs/path.db)")
        return StorageConfig(url, base / rest if not rest.startswith("/") else Path(rest), lock_wait)
    if url.startswith(("redis://", "rediss://")):
        problem = _redis_url_problem(url)
        if problem:
            raise s.fail("url", problem)
        return StorageConfig(url, None)
    raise s.fail("url", f"unsupported storage URL {url.split(':', 1)[0]!r}:"
                        " use sqlite:///FILE or redis://HOST:PORT/DB")


def _redis_url_problem(url: str) -> str | None:
    """What is wrong with a ``redis://host:port/db`` URL (never echoing a password), or None."""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return "redis URL has a bad port (redis://HOST:PORT/DB)"
    if not parts.hostname:
        return "redis URL needs a host (redis://HOST:PORT/DB)"
    if parts.path not in ("", "/") and not parts.path[1:].isdigit():
        return "redis URL path must be a database number (redis://HOST:PORT/0)"
    return None


def _delivery(s: _Section) -> DeliveryConfig:
    d = DeliveryConfig()
    cfg = DeliveryConfig(
        workers=s.int("workers", d.workers, minimum=0, maximum=256),
        max_attempts=s.int("max_attempts", d.max_attempts, maximum=100),
        batch_size=s.int("batch_size", d.batch_size, maximum=1000),
        backoff_base_seconds=s.float("backoff_base_seconds", d.backoff_base_seconds),
        backoff_max_seconds=s.float("backoff_max_seconds", d.backoff_max_seconds),
        lease_seconds=s.float("lease_seconds", d.lease_seconds),
        hold_recheck_seconds=s.float("hold_recheck_seconds", d.hold_recheck_seconds),
        presence_max_age_seconds=s.float("presence_max_age_seconds", d.presence_max_age_seconds),
        priority_aging_seconds=s.float("priority_aging_seconds", d.priority_aging_seconds),
    )
    s.done()
    return cfg


def _retention(s: _Section) -> RetentionConfig:
    d = RetentionConfig()
    cfg = RetentionConfig(
        finished_seconds=s.int("finished_seconds", d.finished_seconds),
        dead_letter_seconds=s.int("dead_letter_seconds", d.dead_letter_seconds),
        sweep_seconds=s.int("sweep_seconds", d.sweep_seconds),
    )
    s.done()
    return cfg


def _clients(table: Any) -> dict[str, ClientConfig]:
    if not isinstance(table, dict) or not table:
        raise ConfigError("clients: define at least one [clients.<client_id>] table")
    clients = {}
    for client_id, body in table.items():
        if not _CLIENT_ID.match(client_id):
            raise ConfigError(f"clients.{client_id}: client id must be 1-64 of A-Z a-z 0-9 _ . -")
        s = _Section(f"clients.{client_id}", body)
        secrets = tuple(_resolve_secret(f"clients.{client_id}.secrets", v) for v in s.str_list("secrets"))
        if any(len(v) < 16 for v in secrets):
            raise s.fail("secrets", "every secret must be at least 16 characters (see `openim-bizplugin keygen`)")
        rate_limit = s.str("rate_limit", None)
        if rate_limit is not None:
            try:
                RateLimit.parse(rate_limit)
            except ValueError as exc:
                raise s.fail("rate_limit", str(exc)) from None
        clients[client_id] = ClientConfig(client_id, secrets, s.str_list("allowed_types"), rate_limit)
        s.done()
    return clients


def _subscribers(items: Any) -> tuple[SubscriberConfig, ...]:
    if not isinstance(items, list):
        raise ConfigError("subscribers: must be an array of tables [[subscribers]]")
    result = []
    for i, body in enumerate(items):
        s = _Section(f"subscribers[{i}]", body)
        url = s.str("url")
        if not re.match(r"^https?://", url):
            raise s.fail("url", "must be an http:// or https:// URL")
        secret = s.secret("secret")
        if not secret.startswith("whsec_"):
            raise s.fail("secret", "must be a Standard Webhooks secret (whsec_<base64>)")
        result.append(SubscriberConfig(url, secret, s.str_list("events")))
        s.done()
    return tuple(result)
