"""``openim-bizplugin init``: a deployment folder made from what the package carries.

The package ships the example catalogue and the config template in
``examples/``. In the repository those are symlinks to the top-level
``schemas/`` and ``config.example.toml``, so there is one source; a wheel or
sdist carries the files themselves.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent / "examples"
EXAMPLE_SCHEMAS = EXAMPLES / "schemas"
CONFIG_TEMPLATE = EXAMPLES / "config.example.toml"

# The template's example client secrets and callback token ("example-…-change-me…").
_PLACEHOLDER = re.compile(r'"example-[a-z0-9-]*change-me[a-z0-9-]*"')


class InitError(Exception):
    """``init`` wrote nothing; the message is the one line to print."""


def new_secret(nbytes: int = 32) -> str:
    """A random URL-safe secret as ``keygen`` prints it; also fit for a callback token."""
    return secrets.token_urlsafe(nbytes)


def render_config(template: str) -> str:
    """*template* with a fresh secret in place of each example one; comments stay."""
    rendered = _PLACEHOLDER.sub(lambda _match: f'"{new_secret()}"', template)
    return rendered.replace("config.example.toml", "config.toml")  # its "Start with:" line


def init_folder(directory: Path) -> tuple[Path, Path]:
    """Write ``config.toml`` and ``schemas/`` into *directory*; returns both paths.

    Refuses, writing nothing, when either exists already.
    """
    config, schemas = directory / "config.toml", directory / "schemas"
    for path in (config, schemas):
        if path.exists() or path.is_symlink():
            raise InitError(f"{path} already exists: nothing written (init never overwrites)")
    if directory.exists() and not directory.is_dir():
        raise InitError(f"{directory} is not a folder: nothing written")
    text = render_config(CONFIG_TEMPLATE.read_text(encoding="utf-8"))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        schemas.mkdir()  # from here on the folder is ours to remove again
        try:
            shutil.copytree(EXAMPLE_SCHEMAS, schemas, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(".*", "__pycache__"))
            _write_private(config, text)
        except OSError:
            shutil.rmtree(schemas, ignore_errors=True)  # all or nothing
            raise
    except OSError as exc:
        raise InitError(f"{exc.filename or directory}: {exc.strerror or exc}") from None
    return config, schemas


def _write_private(path: Path, text: str) -> None:
    # The file holds secrets: readable by its owner only, and never over an existing file.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def next_steps(config: Path, schemas: Path) -> str:
    """What to do after ``init``, as printed by it."""
    types = sum(1 for entry in schemas.iterdir() if entry.is_dir())
    return f"""\
wrote {config} (fresh client secrets and callback token) and {schemas}/ ({types} example types)
next:
  1. point [openim] in {config} at your OpenIM API: api_url, secret (share.yml), admin_user_id, sender_id
  2. openim-bizplugin doctor -c {config}
  3. openim-bizplugin webhooks -c {config} --from /path/to/openim/config/webhooks.yml
     (OpenIM's callbacks to this sidecar; --public-url URL when OpenIM reaches it at another address)
  4. openim-bizplugin serve -c {config}
add a message type: see {schemas / 'README.md'}"""
