"""``saecompress push``: upload compact SAEs and a model card to the Hugging Face Hub."""

from __future__ import annotations

import click

from .._json import dumps
from .options import hub_options


@click.command()
@click.argument("file_or_dir", type=click.Path(exists=True))
@click.argument("repo_id")
@click.option("--path-in-repo", "path_in_repo", metavar="HOOKPOINT", default=None,
              help="Hookpoint folder for a single file (default: the hookpoint recorded in the file, else the "
                   "repo root); for a folder, a prefix for its hookpoint folders.")
@click.option("--revision", metavar="BRANCH", default=None, help="Branch to commit to (created if missing). Default: main.")
@click.option("--private", is_flag=True, help="Create the repo as private (an existing repo keeps its visibility).")
@hub_options
@click.option("--message", "-m", metavar="M", default=None, help="Commit message. Default: 'saecompress push: <hookpoints>'.")
@click.option("--with-onnx", is_flag=True, help="Also upload an ONNX export of each encoder as <hookpoint>/encode.onnx.")
def push(file_or_dir: str, repo_id: str, path_in_repo: str | None, revision: str | None, private: bool,
         hub, message: str | None, with_onnx: bool) -> None:
    """Upload a compact file, or a folder of them, to the model repo REPO_ID (owner/name).

    Each compact file goes to <hookpoint>/expander.safetensors (one subfolder per hookpoint, like
    SAELens and sparsify repos) and README.md becomes a model card listing every hookpoint in the
    repo. Only files that differ from the repo are uploaded; if nothing differs, no commit is made.
    Prints one JSON object: repo_id, revision, commit_sha, commit_url, uploaded, unchanged,
    created_commit. Set HF_HUB_DISABLE_XET=1 to force plain Git LFS uploads.
    """
    from ..hub import push as push_to_hub

    result = push_to_hub(file_or_dir, repo_id, path_in_repo=path_in_repo, revision=revision, private=private,
                         endpoint=hub.endpoint, token=hub.token, message=message, with_onnx=with_onnx)
    click.echo(dumps(result.to_dict()))
