"""Options several commands share, defined once."""

from __future__ import annotations

import dataclasses
import functools

import click

from ..sources import HubAccess


def config_option(config: type, field: str, *names: str, **kwargs):
    """A click option for the dataclass ``config``'s ``field``: its default (shown in ``--help``) is the field's."""
    [spec] = [f for f in dataclasses.fields(config) if f.name == field]
    return click.option(*names, default=spec.default, show_default=True, **kwargs)


def hub_options(func):
    """``--endpoint`` / ``--token`` for commands that read ``hf://`` sources or talk to the Hub.

    The command receives them as one ``hub: HubAccess`` argument.
    """

    @click.option("--endpoint", metavar="URL", default=None,
                  help="Hub URL for hf:// sources. Default: $HF_ENDPOINT or https://huggingface.co.")
    @click.option("--token", metavar="T", default=None,
                  help="Hub access token (private repos; write access for push). Default: $HF_TOKEN or "
                       "the saved login.")
    @functools.wraps(func)
    def wrapper(*args, endpoint: str | None, token: str | None, **kwargs):
        return func(*args, hub=HubAccess(endpoint, token), **kwargs)

    return wrapper
