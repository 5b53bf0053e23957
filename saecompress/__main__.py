"""``python -m saecompress`` runs the CLI."""

from .cli.main import main

if __name__ == "__main__":  # not when a spawned rank of `train --nproc` imports this module
    main()
