"""``openim-bizplugin demo``: the whole loop on one machine, no OpenIM needed.

Starts the fake OpenIM from :mod:`openim_bizplugin.testing` and a sidecar
wired to it (temporary SQLite file, in-process workers), sends one message of
each type in the catalogue, and shows each one's lifecycle and the exact
payload a client app receives from its OpenIM SDK.
"""

from __future__ import annotations

import json
import secrets
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from werkzeug.serving import WSGIRequestHandler, make_server

from .client import BizClient
from .config import ClientConfig, Config, DeliveryConfig, OpenIMConfig, ServerConfig, StorageConfig
from .openim.fake import FakeOpenIM
from .store.base import ACTIVE_STATUSES
from .web.app import create_app

DEMO_USERS = ("alice", "bob")


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any) -> None:  # the demo prints its own story
        pass

DEMO_GROUP = "g_demo"
WAIT_SECONDS = 20.0


def demo_config(schemas_dir: Path, folder: Path, openim_url: str, secret: str) -> Config:
    """A sidecar config pointing at the fake OpenIM, with fast retries."""
    return Config(
        path=folder / "demo.toml",
        server=ServerConfig(port=0),
        openim=OpenIMConfig(api_url=openim_url, secret="openIM123", admin_user_id="imAdmin",
                            sender_id="imAdmin", timeout_seconds=5, check_recipients=True),
        callback_token=secrets.token_urlsafe(16),
        storage=StorageConfig(f"sqlite:///{folder / 'demo.db'}", folder / "demo.db"),
        schemas_dir=schemas_dir,
        delivery=DeliveryConfig(workers=2, backoff_base_seconds=0.05, backoff_max_seconds=0.5, lease_seconds=5),
        clients={"demo": ClientConfig("demo", (secret,), ("*",))},
    )


def run_demo(schemas_dir: Path, out: TextIO) -> int:
    """Run the demo, printing as it goes; returns 0 when every message was delivered."""
    secret = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory() as tmp, FakeOpenIM(users=DEMO_USERS + ("imAdmin",),
                                                          groups={DEMO_GROUP: DEMO_USERS}) as fake:
        for user in DEMO_USERS:  # online, so types with offline = "hold" go out at once
            fake.set_online(user, [1])
        config = demo_config(schemas_dir, Path(tmp), fake.url, secret)
        app = create_app(config)
        services = app.extensions["bizplugin"]
        server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        services.engine.start(config.delivery.workers)
        print(f"fake OpenIM at {fake.url}; sidecar at http://127.0.0.1:{server.port}\n", file=out)
        try:
            client = BizClient(f"http://127.0.0.1:{server.port}", "demo", secret)
            delivered = [_show_one(client, fake, message_type, out) for message_type in services.catalog.types()]
        finally:
            server.shutdown()
            services.close()
    print(f"{sum(delivered)} of {len(delivered)} messages delivered.", file=out)
    return 0 if all(delivered) else 1


def _show_one(client: BizClient, fake: FakeOpenIM, message_type: Any, out: TextIO) -> bool:
    version = message_type.versions[-1]
    example = message_type.schemas[version]["examples"][0]
    to_group = message_type.defaults.mode == "custom"
    target = {"groups": [DEMO_GROUP]} if to_group else {"users": [DEMO_USERS[0]]}
    answer = client.send(message_type.name, version, example, **target)
    print(f"── {message_type.name} v{version} ({message_type.defaults.mode} mode) → "
          f"{'group ' + DEMO_GROUP if to_group else 'user ' + DEMO_USERS[0]}", file=out)
    print(f"   POST /v1/messages → 202 {json.dumps(answer)}", file=out)
    status = _follow(client, answer["id"], out)
    recipient = status["recipients"][0]
    if recipient["status"] != "sent":
        print(f"   not delivered: {recipient['status']} ({recipient['last_error'] or recipient['reason']})\n",
              file=out)
        return False
    delivery = next(d for d in reversed(fake.delivered) if answer["id"] in json.dumps(d.content or d.data))
    _print_app_view(message_type.defaults.mode, delivery, out)
    return True


def _follow(client: BizClient, message_id: str, out: TextIO) -> dict[str, Any]:
    """Poll the status, printing each change, until no recipient has work left."""
    start, seen, status = time.monotonic(), None, {}
    while time.monotonic() - start < WAIT_SECONDS:
        status = client.status(message_id)
        states = [r["status"] for r in status["recipients"]]
        if states != seen:
            print(f"   +{(time.monotonic() - start) * 1000:5.0f} ms  {', '.join(states)}", file=out)
            seen = states
        if not set(states) & set(ACTIVE_STATUSES):
            break
        time.sleep(0.01)
    return status


def _print_app_view(mode: str, delivery: Any, out: TextIO) -> None:
    if mode == "notification":
        detail = json.dumps({"key": delivery.key, "data": delivery.data}, ensure_ascii=False)
        print("   the app's OnCustomBusinessListener.onRecvCustomBusinessMessage receives:", file=out)
        print(f"     {detail}", file=out)
        print(f"   where data is the envelope:\n     {delivery.data}\n", file=out)
    else:
        print("   the app's OnAdvancedMsgListener.onRecvNewMessage gets a message with contentType 110 and",
              file=out)
        print(f"     customElem = {json.dumps(delivery.content, ensure_ascii=False)}\n", file=out)

