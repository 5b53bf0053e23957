"""``saecompress pull``: download compact SAEs from the Hugging Face Hub and print their local paths."""

from __future__ import annotations

import click

from .options import hub_options


@click.command()
@click.argument("ref", metavar="REPO_ID[/HOOKPOINT][@REVISION]")
@click.option("--out", metavar="DIR", default=None, type=click.Path(file_okay=False),
              help="Download into DIR instead of the Hugging Face cache ($HF_HUB_CACHE).")
@hub_options
def pull(ref: str, out: str | None, hub) -> None:
    """Download REPO_ID (owner/name), or one HOOKPOINT folder of it, at REVISION (branch, tag or commit sha).

    Only the hookpoint's files are fetched when one is given. Every file is checked against the
    sha256 the Hub lists and every compact file is loaded once to verify it. Prints one local path
    per line. With HF_HUB_OFFLINE=1 the cache is used without network access.
    """
    from ..hub import pull as pull_from_hub

    for path in pull_from_hub(ref, out=out, endpoint=hub.endpoint, token=hub.token):
        click.echo(str(path))
