"""What someone who installs the package gets: build the wheel, install it, use it (issue 20).

The wheel is built from a copy of this tree's build inputs, installed into a
fresh venv, and run from an empty folder: ``demo``, ``init``, ``schemas
check`` and ``serve`` on what ``init`` wrote, then ``init`` again. Marked
``slow`` (about 15 s: a wheel build, a venv, a server start) but part of the
normal run. The venv borrows this interpreter's site-packages for the
dependencies (a ``.pth`` file added after the install), so nothing but the
build backend is downloaded, and only when this setuptools cannot build a
wheel by itself.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from conftest import REPO
from test_init import same_tree

pytestmark = pytest.mark.slow

# What setup.cfg needs to build the wheel; openim_bizplugin/examples/ links to the two example sources.
BUILD_INPUTS = ("pyproject.toml", "setup.cfg", "README.md", "config.example.toml", "schemas", "openim_bizplugin")
START_TIMEOUT = 30.0


def _env() -> dict[str, str]:
    """No PYTHONPATH (it would run the source tree) and no inherited config."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "BIZPLUGIN_CONFIG")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _builds_offline() -> bool:
    """Whether this setuptools builds wheels by itself (70.1 and later, or beside the wheel package)."""
    try:
        version = tuple(int(part) for part in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return version >= (70, 1) or (version >= (61, 0) and importlib.util.find_spec("wheel") is not None)


def _build_wheel(root: Path) -> Path:
    source = root / "source"  # a copy, so no build/ or egg-info lands in the checkout
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            (source / name).write_bytes((REPO / name).read_bytes())
    isolation = ["--no-build-isolation"] if _builds_offline() else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(root / "dist"),
                    str(source)], check=True, env=_env(), timeout=300)
    (wheel,) = (root / "dist").glob("openim_bizplugin-*.whl")
    return wheel


def _install(wheel: Path, venv: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, env=_env(), timeout=120)
    # The dependencies come from this interpreter; added after the install, so pip saw an empty venv.
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True, env=_env()).stdout.strip()
    dependencies = [*site.getsitepackages(), site.getusersitepackages()]
    Path(purelib, "_test_dependencies.pth").write_text("\n".join(dependencies) + "\n", encoding="utf-8")
    return venv / "bin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin folder of a fresh venv holding the wheel built from this tree."""
    root = tmp_path_factory.mktemp("wheel")
    return _install(_build_wheel(root), root / "venv")


def _run(bin_dir: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bin_dir / "openim-bizplugin"), *argv], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=120)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int] | None]:
    return {str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns) if path.is_file() else None
            for path in sorted(folder.rglob("*"))}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _serving(bin_dir: Path, cwd: Path) -> Iterator[str]:
    """``serve -c config.toml`` in *cwd* until /healthz answers; stopped with SIGTERM."""
    port = _free_port()
    log = cwd.parent / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen([str(bin_dir / "openim-bizplugin"), "serve", "-c", "config.toml",
                                    "--port", str(port)], cwd=cwd, env=_env(), stdout=out, stderr=out,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert process.poll() is None, f"serve exited with {process.returncode}: {log.read_text()}"
            assert time.monotonic() < deadline, f"/healthz never answered: {log.read_text()}"
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        finally:
            with contextlib.suppress(ProcessLookupError):  # whatever serve started and left behind
                os.killpg(process.pid, signal.SIGKILL)


def test_the_installed_package_carries_the_repository_examples(installed):
    # cwd: not the checkout, whose openim_bizplugin `python -c` would import first
    where = subprocess.run([installed / "python", "-c", "import openim_bizplugin.scaffold as s; print(s.EXAMPLES)"],
                           cwd=installed, check=True, capture_output=True, text=True, env=_env()).stdout.strip()
    examples = Path(where)
    assert examples.is_relative_to(installed.parent) and not examples.is_symlink()  # the wheel's copy
    assert (examples / "config.example.toml").read_bytes() == (REPO / "config.example.toml").read_bytes()
    assert same_tree(examples / "schemas", REPO / "schemas")


def test_from_an_empty_folder_demo_init_check_serve_and_init_again(installed, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    demo = _run(installed, folder, "demo")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "4 of 4 messages delivered." in demo.stdout and not list(folder.iterdir())

    init = _run(installed, folder, "init")
    assert init.returncode == 0, init.stderr
    assert "openim-bizplugin serve -c config.toml" in init.stdout
    assert same_tree(folder / "schemas", REPO / "schemas")

    check = _run(installed, folder, "schemas", "check", "-c", "config.toml")
    assert check.returncode == 0 and "all valid" in check.stdout, check.stdout + check.stderr
    with _serving(installed, folder) as url:
        assert requests.get(f"{url}/healthz", timeout=5).status_code == 200

    before = _snapshot(folder)
    again = _run(installed, folder, "init")
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.strip() == "openim-bizplugin: init: config.toml already exists: nothing written (init never overwrites)"
    assert _snapshot(folder) == before
