"""``BizPlugin``: the sidecar as a Flask extension inside an existing Flask app (SPEC §9).

    app = Flask(__name__)
    biz = BizPlugin(app, config="bizplugin.toml", url_prefix="/biz")
    biz.send("order.status_changed", 1, data, users=["u1"], client="billing")

The plugin's paths are not routes of the host's app. A small WSGI middleware in
front of the host (:class:`_Dispatch`) hands every request under the prefix to
the plugin's own Flask app (:func:`~.app.plugin_app`, the one ``serve`` runs),
with the prefix moved to ``SCRIPT_NAME``. So the host's routes, error
handlers, JSON provider, session (secret key, cookie) and templates stay the
host's; problems are answered only under the prefix, routing 404s and 405s
included; OpenIM's callbacks keep their fast path (:class:`~.callbacks.CallbackEndpoint`);
and signatures cover the path as the request line has it, prefix included.
The host's ``before_request`` hooks do not run for the plugin's paths (those
are signed or token-guarded on their own), and middleware the host wraps
around ``app.wsgi_app`` sees them only when wrapped after mounting.

Background work (delivery, callback processing, subscriber events) starts in
each process on its first request or :meth:`BizPlugin.send`, so it runs in
the workers a prefork server forked, not in a master that forked them.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from flask import Flask, current_app, has_app_context
from flask.cli import AppGroup

from ..config import CONFIG_ENV, Config, config_from_mapping, config_path, load_config
from ..errors import BadRequest, ConfigError, Unauthorized
from ..intake import accept_body
from ..services import Services
from . import metrics
from .api import message_document
from .app import plugin_app
from .wire import read_body

log = logging.getLogger(__name__)

MOUNT = "bizplugin.mount"  # app.extensions key of the mount; "bizplugin" holds its Services, as in the sidecar
ConfigSource = Config | str | os.PathLike | Mapping[str, Any] | None

cli = AppGroup("bizplugin", help="openim-bizplugin, mounted in this app.")


class BizPlugin:
    """openim-bizplugin mounted in a Flask app: ``BizPlugin(app, ...)`` or ``BizPlugin(...).init_app(app)``.

    *config* is a TOML file path, the same data as a mapping (relative paths
    resolve against the current directory), or None for ``BIZPLUGIN_CONFIG``.
    Every surface of the sidecar appears under *url_prefix*. With
    *background* false, delivery and callback processing are left to
    ``flask bizplugin worker``. A config problem raises ConfigError.
    """

    def __init__(self, app: Flask | None = None, *, config: ConfigSource = None, url_prefix: str = "",
                 background: bool = True, clock: Callable[[], float] = time.time,
                 services: Services | None = None) -> None:
        self._defaults: dict[str, Any] = {"config": config, "url_prefix": url_prefix, "background": background,
                                          "clock": clock, "services": services}
        self._last: _Mount | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, **options: Any) -> None:
        """Mount on *app*; *options* (config, url_prefix, background) override the constructor's."""
        unknown = set(options) - set(self._defaults)
        if unknown:
            raise TypeError(f"init_app() got unexpected options: {', '.join(sorted(unknown))}")
        if MOUNT in app.extensions:
            raise RuntimeError("openim-bizplugin is already mounted on this app")
        settings = {**self._defaults, **options}
        services, source = settings["services"], settings["config"]
        config = services.config if services is not None and source is None else _config_from(source)
        mount = _Mount(self, app, config, _normalized(settings["url_prefix"]), settings["background"],
                       settings["clock"], services)
        app.extensions[MOUNT] = mount
        app.wsgi_app = _Dispatch(app.wsgi_app, mount)  # type: ignore[method-assign]
        app.cli.add_command(cli)
        self._last = mount

    def send(self, type: str, version: int, data: Any, *, client: str, users: Sequence[str] | None = None,
             groups: Sequence[str] | None = None, priority: str | None = None, idempotency_key: str | None = None,
             collapse_key: str | None = None, ttl_seconds: int | None = None, offline: str | None = None,
             mode: str | None = None) -> dict[str, Any]:
        """Store a message from *client*, as ``POST /v1/messages`` would, and return its 202 answer.

        The API's checks and answer, without a signature: the caller is in this
        process. Whatever the API would refuse raises its
        :class:`~openim_bizplugin.errors.BizError` (``status``, ``detail``, ``errors``).
        """
        mount = self._mount()
        mount.ensure_process()
        svc = mount.services
        if not isinstance(client, str) or client not in svc.config.clients:
            raise Unauthorized(f"Unknown client {str(client)[:64]!r}: not one of the config's [clients].")
        body: dict[str, Any] = {"type": type, "version": version, "data": data}
        recipients = {key: ids for key, ids in (("users", users), ("groups", groups)) if ids is not None}
        if recipients:  # none, or both: the envelope check explains, as it would to the API
            body["to"] = recipients
        optional = {"priority": priority, "idempotency_key": idempotency_key, "collapse_key": collapse_key,
                    "ttl_seconds": ttl_seconds, "offline": offline, "mode": mode}
        body.update((key, value) for key, value in optional.items() if value is not None)
        raw = _encoded(body)
        read_body(io.BytesIO(raw), len(raw), svc.config.server.max_body_bytes)  # the API's size limit and 413
        answer = accept_body(svc, client, raw)
        if answer.accepted.created:
            mount.metrics.accepted(client, answer.message_type)
        return answer.accepted.answer()

    def status(self, message_id: str) -> dict[str, Any]:
        """The document of ``GET /v1/messages/<id>``; NotFound (404) when there is no such message."""
        mount = self._mount()
        return message_document(mount.services, message_id, None)

    def _mount(self) -> _Mount:
        """The mount of the app in context, else the one :meth:`init_app` made last."""
        if has_app_context():
            mount = current_app.extensions.get(MOUNT)
            if mount is not None and mount.plugin is self:
                return mount
        if self._last is None:
            raise RuntimeError("BizPlugin is not mounted on an app yet: call init_app(app) first")
        return self._last


def _encoded(body: dict[str, Any]) -> bytes:
    """The body exactly as :class:`~openim_bizplugin.client.BizClient` would post it."""
    try:
        return json.dumps(body).encode()
    except (TypeError, ValueError) as exc:  # not JSON data at all, or a circular reference
        raise BadRequest(f"the message is not JSON data: {exc}") from None


def _config_from(source: ConfigSource) -> Config:
    if isinstance(source, Config):
        return source
    if source is None:
        try:
            return load_config(config_path(None))
        except ConfigError:
            if os.environ.get(CONFIG_ENV):
                raise
            raise ConfigError(f"no configuration: pass BizPlugin(config=PATH or mapping) or set {CONFIG_ENV}") from None
    if isinstance(source, (str, os.PathLike)):
        return load_config(source)
    return config_from_mapping(source)


def _normalized(prefix: str | None) -> str:
    prefix = (prefix or "").rstrip("/")
    if prefix and not prefix.startswith("/"):
        raise ValueError(f"url_prefix must start with '/', not {prefix!r}")
    return prefix


class _Mount:
    """The plugin in one host app: its config, and the services and app of this process."""

    def __init__(self, plugin: BizPlugin, host: Flask, config: Config, prefix: str, background: bool,
                 clock: Callable[[], float], services: Services | None) -> None:
        self.plugin, self.config, self.prefix, self.background, self.clock = plugin, config, prefix, background, clock
        self._host_extensions = host.extensions
        self._lock = threading.Lock()
        self._ready_pid = 0
        self._inherited: list[Services] = []
        self._attach(services or Services.build(config, clock=clock))

    def _attach(self, services: Services) -> None:
        self.services = services
        self.flask = plugin_app(self.config, services)
        self.wsgi = self.flask.wsgi_app
        self.metrics: metrics.Metrics = self.flask.extensions[metrics.EXTENSION]
        self._built_pid = os.getpid()
        self._host_extensions["bizplugin"] = services

    def ensure_process(self) -> None:
        """Make this process ready to serve and, with background on, start its background work (once)."""
        pid = os.getpid()
        if self._ready_pid == pid:
            return
        with self._lock:
            if self._ready_pid == pid:
                return
            if self._built_pid != pid:
                # Forked since the services were built: their SQLite handles, pooled sockets
                # to OpenIM and locks are the parent's. Fresh ones for this process; the old ones
                # stay referenced, never closed, as closing would close the parent's files under it.
                self._inherited.append(self.services)
                self._attach(Services.build(self.config, clock=self.clock))
            if self.background and self.config.delivery.workers:
                self.services.start_background()
                log.info("background work started in process %d", pid,
                         extra={"event": "background.started", "pid": pid,
                                "workers": self.config.delivery.workers})
            self._ready_pid = pid


class _Dispatch:
    """WSGI middleware in front of the host app: paths under the prefix go to the plugin's app."""

    def __init__(self, host_app: Callable[..., Iterable[bytes]], mount: _Mount) -> None:
        self.host_app, self.mount = host_app, mount

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        mount = self.mount
        mount.ensure_process()  # the first request of any kind: after a prefork server forked this worker
        path, prefix = environ.get("PATH_INFO", ""), mount.prefix
        if not path.startswith(prefix) or path[len(prefix):len(prefix) + 1] not in ("", "/"):
            return self.host_app(environ, start_response)
        environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + prefix
        environ["PATH_INFO"] = path[len(prefix):]
        return mount.wsgi(environ, start_response)


@cli.command("worker")
def _worker_command() -> None:
    """Deliver, process callbacks and send events (no HTTP) until SIGTERM or Ctrl-C."""
    from .server import run_workers

    raise SystemExit(run_workers(current_app.extensions[MOUNT].config, announce=sys.stdout))
