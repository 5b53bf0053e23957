"""``pull`` and ``hf://`` sources: download only what is needed, verify it, hand back local paths."""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path, PurePosixPath

from .._io import check_outputs
from ..compact_format import is_compact_file, read_compact, read_compact_metadata
from ..errors import SaeCompressError
from .client import content_ids, hub_errors, is_offline, make_api, transport_errors
from .layout import CFG_NAME, COMPACT_NAME
from .uri import HfUri, parse_hf_uri

log = logging.getLogger(__name__)

SOURCE_SUFFIXES = ("*.json", "*.safetensors", "*.pt")  # what a loader may need: configs and weights


def _patterns(hookpoint: str | None, suffixes: tuple[str, ...] | None) -> list[str] | None:
    """``allow_patterns`` for a hookpoint (a subfolder, or one file) or the whole repo (``None`` = all)."""
    if hookpoint is None:
        return list(suffixes) if suffixes else None
    escaped = glob.escape(hookpoint)
    return [escaped] + [f"{escaped}/{s}" for s in (suffixes or ("*",))]


def _verify(local: Path, entry, ref: HfUri) -> None:
    """Check a downloaded file against the sha256 (LFS) or git blob id the Hub lists for it."""
    got, expected = content_ids(local, entry)
    if got != expected:
        target = local.resolve()
        local.unlink(missing_ok=True)
        target.unlink(missing_ok=True)  # the cache blob behind the symlink, so a retry downloads afresh
        raise SaeCompressError(f"{ref.repo_id}@{ref.revision or 'main'}: {entry.path} failed its integrity check "
                               f"(got {got[:12]}…, the Hub lists {expected[:12]}…); the corrupt download was "
                               "removed: pull again, and tell the repo owner if it persists")


def _cached_files(root: Path, patterns: list[str] | None) -> list[Path]:
    """The files of a cached snapshot matching ``patterns`` (used when the Hub is not asked)."""
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    names = [n for n in filter_repo_objects(names, allow_patterns=patterns) if not n.startswith(".cache/")]
    if not names:
        raise LocalEntryNotFoundError(f"no cached files match {patterns}")
    return [root / n for n in sorted(names)]


def _wanted(api, ref: HfUri, rev: str, sha: str, patterns: list[str] | None) -> tuple[dict, list[str]]:
    """The repo's files at commit ``sha`` and the names ``patterns`` select; none is an error."""
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    tree = {f.path: f for f in api.list_repo_tree(ref.repo_id, revision=sha, recursive=True)
            if isinstance(f, RepoFile)}
    wanted = sorted(filter_repo_objects(list(tree), allow_patterns=patterns))
    if not wanted:
        folders = sorted({p.split("/")[0] for p in tree if "/" in p})
        what = f"no hookpoint {ref.hookpoint!r}" if ref.hookpoint else "no SAE files"
        raise SaeCompressError(f"{ref.repo_id}@{rev} has {what} (hookpoint folders: "
                               f"{', '.join(folders) or 'none'}); pick one as hf://{ref.repo_id}/<hookpoint>")
    return tree, wanted


def _download(ref: HfUri, patterns: list[str] | None, *, endpoint: str | None, token: str | None,
              cache_dir: str | os.PathLike | None, out: str | os.PathLike | None) -> tuple[Path, list[Path]]:
    """Download the files of ``ref`` matching ``patterns``; return the snapshot root and the files.

    Online, every file is checked against the Hub's listing at the resolved commit. Offline
    (``HF_HUB_OFFLINE``, or the Hub unreachable with the snapshot cached), the cache is used as
    is: its files were checked when they were pulled. What ``patterns`` select is checked before
    anything is downloaded.
    """
    from huggingface_hub import snapshot_download

    rev = ref.revision or "main"
    api = make_api(endpoint, token)
    kwargs = dict(allow_patterns=patterns, endpoint=api.endpoint, token=token, cache_dir=cache_dir)
    with hub_errors(ref.repo_id, rev, endpoint, path=ref.hookpoint):
        if is_offline():
            root = Path(snapshot_download(ref.repo_id, revision=rev, local_dir=out, **kwargs))
            return root, _cached_files(root, patterns)
        try:
            sha = api.repo_info(ref.repo_id, revision=rev).sha
        except transport_errors() as err:
            if out is not None:
                raise
            # the Hub is unreachable: like huggingface_hub, fall back to a cached snapshot (or fail clearly)
            root = Path(snapshot_download(ref.repo_id, revision=rev, **kwargs))
            files = _cached_files(root, patterns)
            log.warning("cannot reach %s (%s); using the cached snapshot of %s", api.endpoint, err, ref)
            return root, files
        tree, wanted = _wanted(api, ref, rev, sha, patterns)  # before downloading: nothing matched is an error
        if out is None:  # the cache: snapshot_download also records the branch/tag -> commit ref
            root = Path(snapshot_download(ref.repo_id, revision=rev, **kwargs))
            if root.name != sha:  # the branch moved since repo_info: check what was downloaded
                tree, wanted = _wanted(api, ref, rev, root.name, patterns)
        else:
            root = Path(snapshot_download(ref.repo_id, revision=sha, local_dir=out, **kwargs))
    for name in wanted:
        _verify(root / name, tree[name], ref)
    return root, [root / name for name in wanted]


def _hookpoint_of(root: Path, file: Path) -> str | None:
    parent = PurePosixPath(file.relative_to(root).as_posix()).parent
    return None if str(parent) == "." else str(parent)


def resolve_hf_source(uri: str, *, endpoint: str | None = None, token: str | None = None,
                      cache_dir: str | os.PathLike | None = None) -> tuple[Path, str | None]:
    """Download what the source ``hf://owner/repo[/hookpoint][@rev]`` needs; return a local path and hookpoint.

    Only configs and weights (``*.json``, ``*.safetensors``, ``*.pt``) of the hookpoint subfolder (or
    of the whole repo without one) are fetched, into the Hugging Face cache; each is checked against
    the Hub's sha256, and compact files must parse as compact files. Returns the compact file itself
    when the reference names exactly one (or a hookpoint that is a file), else the snapshot folder
    and hookpoint, for dense SAELens / sparsify / dictionary_learning layouts.
    """
    ref = parse_hf_uri(uri)
    root, files = _download(ref, _patterns(ref.hookpoint, SOURCE_SUFFIXES), endpoint=endpoint, token=token,
                            cache_dir=cache_dir, out=None)
    if ref.hookpoint and (root / ref.hookpoint).is_file():
        return root / ref.hookpoint, None
    compact = [f for f in files if f.suffix == ".safetensors" and is_compact_file(f)]
    for file in compact:
        read_compact_metadata(file)
    if len(compact) == 1 and (ref.hookpoint is None or compact[0].parent == root / ref.hookpoint):
        return compact[0], _hookpoint_of(root, compact[0])
    return root, ref.hookpoint


def pull(ref: str, *, out: str | os.PathLike | None = None, endpoint: str | None = None, token: str | None = None,
         cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Download ``owner/repo[/hookpoint][@revision]`` (everything in the hookpoint folder, or the whole repo).

    Files go into the Hugging Face cache (``cache_dir``, default ``HF_HUB_CACHE``), or into the
    folder ``out``. Every file is checked against the Hub's sha256 and every compact file is fully
    loaded once (format, shapes, finite values, mask index hash). Returns the local file paths, less the
    ``cfg.json`` that ``push`` writes beside each compact file for hub tools (downloaded, not listed: the
    compact file holds the same facts).
    ``out`` is checked first (a writable folder outside the Hugging Face cache); files already in it
    are replaced by the pulled ones of the same name.
    """
    uri = parse_hf_uri(ref if ref.startswith("hf://") else f"hf://{ref}")
    if out is not None:
        check_outputs([out], kind="folder")
    _, files = _download(uri, _patterns(uri.hookpoint, None), endpoint=endpoint, token=token,
                         cache_dir=cache_dir, out=out)
    for file in files:
        if file.suffix == ".safetensors" and is_compact_file(file):
            read_compact(file)  # every check a load makes
    return [f for f in files if not (f.name == CFG_NAME and any(g.parent == f.parent and g.name == COMPACT_NAME
                                                                 for g in files))]
