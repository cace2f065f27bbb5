"""The WSGI entry point gunicorn uses."""

from __future__ import annotations

import gc
import subprocess
import sys

from conftest import write_config


def test_create_builds_the_app_from_the_environment(tmp_path, monkeypatch):
    from openim_bizplugin.web.wsgi import create

    monkeypatch.setenv("BIZPLUGIN_CONFIG", str(write_config(tmp_path)))
    app = create()
    try:
        assert app.test_client().get("/healthz").get_json() == {"status": "ok"}
        assert gc.get_freeze_count() > 0  # start-up's objects are out of the collector's full passes
    finally:
        gc.unfreeze()  # (this test process goes on)
        app.extensions["bizplugin"].close()


def test_bad_config_is_one_line_without_a_traceback(tmp_path):
    path = write_config(tmp_path, {"server": {"port": "x"}})
    result = subprocess.run([sys.executable, "-c", "from openim_bizplugin.web.wsgi import create; create()"],
                            env={"BIZPLUGIN_CONFIG": str(path), "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "openim-bizplugin: config error: server.port: must be an integer"
