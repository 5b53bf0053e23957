"""``saecompress push``: upload compact SAEs and a model card to the Hugging Face Hub."""

from __future__ import annotations

import click

from .._json import dumps
from .options import hub_options


@click.command()
@click.argument("repo_id")
@click.argument("local_path", type=click.Path())
@click.argument("path_in_repo_arg", metavar="[PATH_IN_REPO]", required=False)
@click.option("--path-in-repo", "path_in_repo", metavar="HOOKPOINT", default=None, hidden=True,
              help="Older spelling of the PATH_IN_REPO argument.")
@click.option("--revision", metavar="BRANCH", default=None, help="Branch to commit to (created if missing). Default: main.")
@click.option("--private", is_flag=True, help="Create the repo as private (an existing repo keeps its visibility).")
@hub_options
@click.option("--commit-message", "commit_message", metavar="M", default=None,
              help="Commit message. Default: 'saecompress push: <hookpoints>'.")
@click.option("--message", "-m", "message", metavar="M", default=None, hidden=True,
              help="Older spelling of --commit-message.")
@click.option("--with-onnx", is_flag=True, help="Also upload an ONNX export of each encoder as <hookpoint>/encode.onnx.")
def push(repo_id: str, local_path: str, path_in_repo_arg: str | None, path_in_repo: str | None,
         revision: str | None, private: bool, hub, commit_message: str | None, message: str | None,
         with_onnx: bool) -> None:
    """Upload the compact file or folder LOCAL_PATH to the model repo REPO_ID (owner/name), as `hf upload`
    takes them: REPO_ID LOCAL_PATH [PATH_IN_REPO].

    Each compact file goes to <hookpoint>/expander.safetensors (one subfolder per hookpoint, like
    SAELens and sparsify repos), with a SAELens-style <hookpoint>/cfg.json beside it, and README.md
    becomes a model card listing every hookpoint in the repo. PATH_IN_REPO: the hookpoint folder of a
    single file (default: the hookpoint recorded in the file, else the repo root), or a prefix for a folder's
    hookpoint folders. Only files that differ from the repo are uploaded; if nothing differs, no commit is
    made. Prints one JSON object: repo_id, revision, commit_sha, commit_url, uploaded, unchanged,
    created_commit. Set HF_HUB_DISABLE_XET=1 to force plain Git LFS uploads.
    """
    from pathlib import Path

    from ..errors import SaeCompressError
    from ..hub import push as push_to_hub

    if Path(repo_id).exists() and not Path(local_path).exists():  # the order before `hf upload`'s
        click.echo("note: `push LOCAL_PATH REPO_ID` is the old order; write `push REPO_ID LOCAL_PATH` (as `hf upload` "
                   "does); the old order works until the next release", err=True)
        repo_id, local_path = local_path, repo_id
    if not Path(local_path).exists():
        raise SaeCompressError(f"{local_path}: no such file or folder; give `push REPO_ID LOCAL_PATH [PATH_IN_REPO]`")
    if path_in_repo is not None:
        if path_in_repo_arg is not None:
            raise SaeCompressError("give the path in the repo once: as PATH_IN_REPO or (the older) --path-in-repo")
        click.echo("note: --path-in-repo is the older spelling; give PATH_IN_REPO after LOCAL_PATH", err=True)
    if message is not None:
        if commit_message is not None:
            raise SaeCompressError("give the commit message once: --commit-message (or the older --message)")
        click.echo("note: --message/-m is the older spelling of --commit-message", err=True)
    result = push_to_hub(local_path, repo_id, path_in_repo=path_in_repo_arg or path_in_repo, revision=revision,
                         private=private, endpoint=hub.endpoint, token=hub.token, message=commit_message or message,
                         with_onnx=with_onnx)
    click.echo(dumps(result.to_dict()))
