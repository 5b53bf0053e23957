"""``saecompress pull``: download compact SAEs from the Hugging Face Hub and print their local paths."""

from __future__ import annotations

import click

from .options import hub_options


@click.command()
@click.argument("ref", metavar="REPO_ID[/HOOKPOINT][@REVISION]")
@click.option("--local-dir", "local_dir", metavar="DIR", default=None, type=click.Path(file_okay=False),
              help="Download into DIR instead of the Hugging Face cache ($HF_HUB_CACHE), as `hf download --local-dir`.")
@click.option("--out", metavar="DIR", default=None, type=click.Path(file_okay=False), hidden=True,
              help="Older spelling of --local-dir.")
@hub_options
def pull(ref: str, local_dir: str | None, out: str | None, hub) -> None:
    """Download REPO_ID (owner/name), or one HOOKPOINT folder of it, at REVISION (branch, tag or commit sha).

    Only the hookpoint's files are fetched when one is given. Every file is checked against the
    sha256 the Hub lists and every compact file is loaded once to verify it. Prints one local path
    per line. With HF_HUB_OFFLINE=1 the cache is used without network access.
    """
    from ..errors import SaeCompressError
    from ..hub import pull as pull_from_hub

    if out is not None:
        if local_dir is not None:
            raise SaeCompressError("give the download folder once: --local-dir (or the older --out)")
        click.echo("note: --out is the older spelling of --local-dir; it works until the next release", err=True)
    for path in pull_from_hub(ref, out=local_dir or out, endpoint=hub.endpoint, token=hub.token):
        click.echo(str(path))
