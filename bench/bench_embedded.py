"""What mounting costs: OpenIM callbacks and a host's own route, through WSGI in this process.

Requirement (issue 19): under a prefix, OpenIM's callbacks keep their fast path
(the WSGI endpoint in front of Flask), and the host's own routes pay next to
nothing for the plugin being mounted.

    python bench/bench_embedded.py [--calls 3000] [--rounds 3]

Sides, each called as a WSGI app with a prepared environ (no sockets, so the
figures are the Python work per request, not the HTTP server's):

- callbacks: ``POST …/openim/callback/<token>/callbackAfterUserOnlineCommand``
  with a fresh presence payload each time (stored in SQLite, like in
  production) to (1) the plugin's own app, (2) ``create_app`` (what ``serve``
  runs: BizPlugin mounted at the root of a bare app) and (3) a host app with
  100 routes of its own, the plugin mounted under ``/biz``;
- host route: ``GET /hello`` of that host, without and with the plugin mounted.

Prints microseconds per call (the median of ``--rounds``) and the ratio to the
first row of its group. Exit 0 unless the run broke (a wrong answer).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TOKEN = "bench-callback-token-0123456789"


def config_data(folder: Path) -> dict[str, Any]:
    return {
        "openim": {"api_url": "http://127.0.0.1:9", "secret": "openIM123", "admin_user_id": "imAdmin",
                   "sender_id": "imAdmin"},
        "callbacks": {"token": TOKEN},
        "storage": {"url": f"sqlite:///{folder / 'bench.db'}"},
        "schemas": {"dir": str(REPO / "schemas")},
        "delivery": {"workers": 0},
        "clients": {"ops": {"secrets": ["bench-ops-secret-0123456789"], "allowed_types": ["*"]}},
    }


def host_app() -> Any:
    from flask import Flask

    app = Flask("host")
    for n in range(100):
        app.add_url_rule(f"/area{n}/<item>", f"area{n}", lambda item: {"item": item})
    app.add_url_rule("/hello", "hello", lambda: {"hello": "world"})
    return app


def environ(method: str, path: str, body: bytes = b"") -> dict[str, Any]:
    return {"REQUEST_METHOD": method, "PATH_INFO": path, "SCRIPT_NAME": "", "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "SERVER_PROTOCOL": "HTTP/1.1",
            "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)), "HTTP_HOST": "127.0.0.1:8080",
            "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr,
            "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
            "RAW_URI": path, "REQUEST_URI": path}


def per_call(app: Callable[..., Any], make: Callable[[int], dict[str, Any]], calls: int, offset: int) -> float:
    """Microseconds per call of *app* over *calls* requests made by *make*."""
    statuses: list[str] = []

    def start_response(status: str, _headers: Any, _exc: Any = None) -> None:
        statuses.append(status)

    envs = [make(offset + n) for n in range(calls)]
    began = time.perf_counter()
    for env in envs:
        b"".join(app(env, start_response))
    elapsed = time.perf_counter() - began
    if any(not s.startswith("200") for s in statuses):
        raise SystemExit(f"PROBLEM: an answer was not 200: {sorted(set(statuses))}")
    return elapsed / calls * 1e6


def callback_maker(prefix: str) -> Callable[[int], dict[str, Any]]:
    def make(n: int) -> dict[str, Any]:
        body = json.dumps({"callbackCommand": "callbackAfterUserOnlineCommand", "operationID": f"op{n}",
                           "platformID": 1, "platform": "IOS", "userID": f"u{n % 5000:05d}", "seq": 10**12 + n,
                           "isAppBackground": False, "connID": ""}).encode()
        return environ("POST", f"{prefix}/openim/callback/{TOKEN}/callbackAfterUserOnlineCommand", body)
    return make


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from openim_bizplugin.config import config_from_mapping
    from openim_bizplugin.web import BizPlugin
    from openim_bizplugin.web.app import create_app

    with tempfile.TemporaryDirectory() as tmp:
        folders = [Path(tmp) / name for name in ("alone", "standalone", "mounted")]
        for folder in folders:
            folder.mkdir()
        standalone = create_app(config_from_mapping(config_data(folders[1])))
        plugin_only = create_app(config_from_mapping(config_data(folders[0])))
        alone = plugin_only.extensions["bizplugin.mount"].wsgi  # the plugin's app, no dispatcher in front
        bare_host, host = host_app(), host_app()
        BizPlugin(host, config=copy.deepcopy(config_data(folders[2])), url_prefix="/biz", background=False)
        groups = {
            "callbacks": [("plugin app alone", alone, callback_maker("")),
                          ("create_app (serve)", standalone, callback_maker("")),
                          ("host, mounted at /biz", host, callback_maker("/biz"))],
            "host route": [("host without the plugin", bare_host, lambda n: environ("GET", "/hello")),
                           ("host with the plugin", host, lambda n: environ("GET", "/hello"))],
        }
        print(f"{args.calls} calls per round, median of {args.rounds} rounds (µs per call)")
        for group, sides in groups.items():
            figures: dict[str, list[float]] = {name: [] for name, _, _ in sides}
            for r in range(args.rounds):
                for name, app, make in sides:
                    figures[name].append(per_call(app, make, args.calls, r * args.calls))
            baseline = statistics.median(figures[sides[0][0]])
            for name, values in figures.items():
                median = statistics.median(values)
                print(f"  {group:10}  {name:26} {median:8.1f} µs   x{median / baseline:.2f}")
        for app in (plugin_only, standalone, host):
            app.extensions["bizplugin"].close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
