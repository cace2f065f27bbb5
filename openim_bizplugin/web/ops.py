"""Operations endpoints: ``/healthz`` (alive) and ``/readyz`` (able to work).

Ready means the store takes a write and OpenIM answers an admin call now (see
:mod:`~openim_bizplugin.openim.readiness`: asked of OpenIM itself at most a
few seconds ago, never judged from a cached token). Both checks have a
bound, so ``/readyz`` answers within a few seconds even when OpenIM hangs
(orchestrators time out probes).
"""

from __future__ import annotations

import threading
from typing import Any

from flask import Blueprint, current_app, jsonify

from ..errors import BizError
from ..openim.client import OpenIMError

bp = Blueprint("ops", __name__)
READY_TIMEOUT_SECONDS = 3.0


@bp.get("/healthz")
def healthz() -> Any:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Any:
    services = current_app.extensions["bizplugin"]
    checks = {"storage": _check(services.store.check_writable), "openim": services.openim_readiness.check().detail}
    ready = all(result == "ok" for result in checks.values())
    if checks["openim"] == "ok":
        _check(services.release.get)  # which OpenIM release: probed once per process, then known
    return jsonify({"status": "ready" if ready else "not ready", "checks": checks,
                    "openim_release": services.release.describe()}), 200 if ready else 503


def _check(action: Any) -> str:
    """'ok', or one line saying what failed; gives up after READY_TIMEOUT_SECONDS."""
    outcome: list[str] = []

    def run() -> None:
        try:
            action()
            outcome.append("ok")
        except (BizError, OpenIMError) as exc:
            outcome.append(str(exc.detail if isinstance(exc, BizError) else exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(READY_TIMEOUT_SECONDS)
    return outcome[0] if outcome else f"no answer within {READY_TIMEOUT_SECONDS:g} s"
