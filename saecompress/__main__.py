"""``python -m saecompress`` runs the CLI."""

from .cli.main import main

main()
