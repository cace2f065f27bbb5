"""``python -m openim_bizplugin`` runs the CLI."""

from .cli import main

main()
