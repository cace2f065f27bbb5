"""``openim-bizplugin doctor``: is this sidecar ready to talk to OpenIM?

Checks the config, the catalogue and the store, obtains an OpenIM admin
token, checks that the sender account exists, shows which OpenIM release it
talks to (configured, or probed: see openim/release.py), and prints the
``webhooks.yml`` lines that point OpenIM's callbacks at this sidecar.
"""

from __future__ import annotations

from typing import TextIO

from .config import Config
from .errors import BizError
from .openim.client import OpenIMError
from .services import Services
from .store import shown_url

# The callbacks the sidecar understands (SPEC §6); before-hooks stay off: they
# block OpenIM's sending whenever the sidecar is down (failedContinue is ignored).
_AFTER_HOOKS = ("afterSendSingleMsg", "afterSendGroupMsg", "afterMsgSaveDB", "afterSingleMsgRead",
                "afterGroupMsgRead", "afterUserOnline", "afterUserOffline")


def webhooks_yml(config: Config, public_url: str | None = None) -> str:
    """The fragment of OpenIM's ``config/webhooks.yml`` for this sidecar."""
    base = public_url or f"http://{config.server.host}:{config.server.port}"
    lines = [f"url: {base.rstrip('/')}/openim/callback/{config.callback_token}"]
    for hook in _AFTER_HOOKS:
        lines += [f"{hook}:", "  enable: true", "  timeout: 5"]
        if hook == "afterSendSingleMsg":
            # only receipts sent to the sender account matter; keeps chat traffic away
            lines.append(f"  attentionIds: [{config.openim.sender_id}]")
    return "\n".join(lines)


def run_doctor(config: Config, out: TextIO, public_url: str | None = None) -> bool:
    """Print one line per check; True when every check passed."""
    ok = True

    def check(name: str, action) -> None:
        nonlocal ok
        try:
            print(f"ok    {name}: {action()}", file=out)
        except (OpenIMError, BizError, OSError) as exc:
            ok = False
            print(f"FAIL  {name}: {exc}", file=out)

    print(f"ok    config: {config.path}", file=out)
    services = Services.build(config)
    try:
        types = services.catalog.types()
        print(f"ok    schemas: {len(types)} types in {config.schemas_dir}", file=out)
        check("storage", lambda: (services.store.ping(), shown_url(config.storage.url))[1])
        check("OpenIM admin token", lambda: (services.openim.admin_token(),
                                             f"obtained from {config.openim.api_url} as {config.openim.admin_user_id}")[1])
        check("sender account", lambda: _sender_exists(services, config.openim.sender_id))
        check("OpenIM release", lambda: _release(services))
    finally:
        services.close()
    print("\n# Paste into OpenIM's config/webhooks.yml (keep the URL secret: it holds the callback token)",
          file=out)
    print(webhooks_yml(config, public_url), file=out)
    return ok


def _release(services: Services) -> str:
    """Which OpenIM API this is, and what that means for persistent notifications."""
    release = services.release
    if release.get() is None:
        raise OSError(release.describe())
    if release.stores_notifications:
        return f"{release.describe()}: OpenIM stores persistent notifications (reliabilityLevel 2)"
    return (f"{release.describe()}: OpenIM keeps no business notification for offline apps;"
            " the sidecar holds persistent ones until the user is online")


def _sender_exists(services: Services, sender_id: str) -> str:
    if not services.openim.account_check([sender_id]).get(sender_id):
        raise OSError(f"{sender_id!r} is not a registered OpenIM user; register it or change openim.sender_id")
    return f"{sender_id!r} is registered"
