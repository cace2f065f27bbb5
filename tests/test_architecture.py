"""The package's layering: only the web edge (and the entry points) load Flask or Werkzeug."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

import openim_bizplugin

PACKAGE = pathlib.Path(openim_bizplugin.__file__).parent
ENTRY_POINTS = {"cli", "demo", "__main__"}  # they start the web edge themselves


def _modules_outside_web() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[1:2] == ("web",) or (len(parts) == 2 and parts[1] in ENTRY_POINTS):
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


CHECK = ("import importlib, sys; importlib.import_module(sys.argv[1]); "
         "print(sorted(m for m in ('flask', 'werkzeug') if m in sys.modules))")


@pytest.mark.parametrize("module", _modules_outside_web())
def test_module_outside_the_web_edge_imports_alone_without_flask(module: str) -> None:
    done = subprocess.run([sys.executable, "-c", CHECK, module], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"{module} loads {done.stdout.strip()}"


def test_the_list_of_modules_covers_every_subpackage() -> None:
    names = _modules_outside_web()
    for room in ("catalog", "delivery", "openim", "callbacks", "store"):
        assert any(n.startswith(f"openim_bizplugin.{room}.") for n in names), room


def test_public_names_keep_working() -> None:
    from openim_bizplugin.client import BizClient
    from openim_bizplugin.testing import FakeOpenIM
    from openim_bizplugin.web.wsgi import create

    assert BizClient and FakeOpenIM and callable(create)
