"""The ``saecompress`` command line (click); one module per command, loaded on first use."""
