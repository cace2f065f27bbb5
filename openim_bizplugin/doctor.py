"""``openim-bizplugin doctor``: is this sidecar ready to talk to OpenIM, and OpenIM to it?

Checks the config, the catalogue and the store; asks OpenIM itself for an
admin call (bounded: a hung OpenIM is a failure after a few seconds, and a
cached token proves nothing); checks that the sender account exists; shows which OpenIM release it talks
to (configured, or probed: see openim/release.py); with
``--from``, that OpenIM's ``webhooks.yml`` points at this sidecar; with
``--public-url``, that a callback posted to that URL reaches this sidecar
(OpenIM takes a 404 for "continue" and logs success, so a wrong URL or token
would lose every callback without a trace). Without ``--from`` it prints the
sidecar's ``webhooks.yml`` keys, to be changed where they stand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

import requests

from .callbacks.subscribers import subscribers_from
from .config import Config
from .errors import BizError
from .openim.client import OpenIMError
from .services import Services
from .store import shown_url
from .webhooks import WebhooksFileError, callback_url, edit_webhooks, fragment, read_webhooks

# OpenIM posts <url>/<callbackCommand>; the sidecar answers a command it does not know
# with "continue" and stores nothing, so this one is harmless
PROBE_COMMAND = "callbackBizpluginDoctorCommand"
PROBE_TIMEOUT_SECONDS = 3.0


class CheckFailed(Exception):
    """One check failed; the message says why in one line."""


def run_doctor(config: Config, out: TextIO, public_url: str | None = None, webhooks_file: str | None = None) -> bool:
    """Print one line per check; True when every check passed."""
    ok = True

    def check(name: str, action: Callable[[], str]) -> None:
        nonlocal ok
        try:
            print(f"ok    {name}: {action()}", file=out)
        except (CheckFailed, OpenIMError, BizError, OSError, WebhooksFileError) as exc:
            ok = False
            print(f"FAIL  {name}: {exc}", file=out)

    print(f"ok    config: {config.path}", file=out)
    services = Services.build(config)
    try:
        types = services.catalog.types()
        print(f"ok    schemas: {len(types)} types in {config.schemas_dir}", file=out)
        check("storage", lambda: (services.store.ping(), shown_url(config.storage.url))[1])
        if ok:
            _unconfigured_subscribers(config, services, out)
        status = services.openim_readiness.check()  # OpenIM itself, not a token kept from earlier
        check("OpenIM admin token", lambda: _openim(status.ok, status.detail, config))
        if status.sender_registered is not None:
            check("sender account", lambda: _sender(status.sender_registered, config.openim.sender_id))
        check("OpenIM release", lambda: _release(services))
    finally:
        services.close()
    if webhooks_file is not None:
        check("webhooks.yml", lambda: _webhooks_file(config, public_url, webhooks_file))
    if public_url is not None:
        check("callback URL", lambda: _callback_reaches_sidecar(config, public_url))
    if webhooks_file is None:
        print("\n# Set these keys in OpenIM's config/webhooks.yml where they stand: do NOT append them.\n"
              "# The stock file already has every one of them, and OpenIM refuses to start when a key\n"
              "# appears twice. `openim-bizplugin webhooks -c CONFIG --from webhooks.yml` prints the\n"
              "# whole file with them changed. Keep the URL secret: it holds the callback token.", file=out)
        print(fragment(config, public_url), file=out)
    return ok


def _unconfigured_subscribers(config: Config, services: Services, out: TextIO) -> None:
    """A warning, not a failure: a subscriber removed from the config keeps its cursor, and so
    every event after it, until the operator says it is gone for good."""
    configured = {sub.name for sub in subscribers_from(config.subscribers)}
    left = [name for name in services.store.subscriber_names() if name not in configured]
    if left:
        print(f"warn  subscribers: {len(left)} no longer configured ({', '.join(map(shown_url, left))}) keep"
              f" their events: `openim-bizplugin subscribers -c {config.path} --forget-unconfigured`", file=out)


def _openim(ok: bool, detail: str, config: Config) -> str:
    if not ok:
        raise CheckFailed(detail)
    return f"OpenIM at {config.openim.api_url} accepted an admin call as {config.openim.admin_user_id} just now"


def _sender(registered: bool, sender_id: str) -> str:
    if not registered:
        raise CheckFailed(f"{sender_id!r} is not a registered OpenIM user; register it or change openim.sender_id")
    return f"{sender_id!r} is registered"


def _release(services: Services) -> str:
    """Which OpenIM API this is, and what that means for persistent notifications."""
    release = services.release
    if release.get() is None:
        raise CheckFailed(release.describe())
    if release.stores_notifications:
        return (f"{release.describe()}: OpenIM stores persistent notifications (reliabilityLevel 2), but an app"
                " syncs them only after a chat with the sender; the sidecar holds them until the user is online")
    return (f"{release.describe()}: OpenIM keeps no business notification for offline apps;"
            " the sidecar holds persistent ones until the user is online")


def _webhooks_file(config: Config, public_url: str | None, path: str) -> str:
    edited = edit_webhooks(read_webhooks(path), config, public_url, name=path)
    if edited.changed:
        raise CheckFailed(f"{path} differs in {', '.join(edited.changed)}: `openim-bizplugin webhooks -c "
                          f"{config.path} --from {path}` prints it with them changed")
    return f"{path} points at this sidecar with the hooks it uses"


def _callback_reaches_sidecar(config: Config, public_url: str) -> str:
    """Post a harmless callback where OpenIM will, and check that this sidecar answered it."""
    url = callback_url(config, public_url)
    shown = url.replace(config.callback_token, "***")  # the token is a secret
    try:
        response = requests.post(f"{url}/{PROBE_COMMAND}", json={"callbackCommand": PROBE_COMMAND},
                                 headers={"operationID": "bizplugin-doctor"}, timeout=PROBE_TIMEOUT_SECONDS,
                                 allow_redirects=False)
    except requests.RequestException as exc:
        raise CheckFailed(f"no answer from {shown} ({type(exc).__name__}); is the sidecar running there, "
                          "and does this host reach it as OpenIM does?") from None
    if response.status_code == 404:
        raise CheckFailed(f"{shown} answered 404: no sidecar with this [callbacks] token there. OpenIM takes a "
                          "404 for 'continue' and logs success, so every callback would be lost silently")
    try:
        answer = response.json()
    except ValueError:
        answer = None
    continued = isinstance(answer, dict) and (answer.get("actionCode"), answer.get("errCode"),
                                              answer.get("nextCode")) == (0, 0, 0)
    if response.status_code != 200 or not continued:
        raise CheckFailed(f"{shown} answered HTTP {response.status_code} without the sidecar's 'continue': "
                          "something else answers there")
    return f"{shown} reaches this sidecar (it answered a test callback with 'continue')"
