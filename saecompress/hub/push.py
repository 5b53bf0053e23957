"""``push``: upload compact files (one per hookpoint subfolder), optional ONNX exports and a model card."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from ..compact import is_compact_file, load_compact, parse_compact_metadata, read_compact_metadata, shareable_copy
from .._json import dumps
from ..errors import SaeCompressError
from ..exporters.onnx import export_onnx
from ..provenance import shareable
from .card import CardEntry, render_card
from .client import content_ids, hub_errors, is_missing_xet_error, make_api, plain_lfs_uploads, xet_disabled_by_env
from .layout import CARD_NAME, CFG_NAME, COMPACT_NAME, ONNX_NAME
from .uri import check_repo_id

log = logging.getLogger(__name__)



@dataclass
class PushResult:
    """What a push did: the branch head after it, and which repo paths changed or were already there."""

    repo_id: str
    revision: str
    commit_sha: str
    commit_url: str
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def created_commit(self) -> bool:
        return bool(self.uploaded)

    def to_dict(self) -> dict:
        return asdict(self) | {"created_commit": self.created_commit}


@dataclass(frozen=True)
class _Local:
    hookpoint: str
    path: Path
    meta: dict

    @property
    def folder(self) -> str:
        return f"{self.hookpoint}/" if self.hookpoint else ""


def _check_hookpoint(hookpoint: str, origin: Path) -> str:
    hookpoint = hookpoint.strip("/")
    parts = PurePosixPath(hookpoint).parts if hookpoint else ()
    if any(p in ("..", ".") for p in parts) or "@" in hookpoint or "\\" in hookpoint:
        raise SaeCompressError(f"{origin}: hookpoint {hookpoint!r} cannot be a folder in a repo; "
                               "give a plain name with --path-in-repo (e.g. layers.3)")
    return hookpoint


def collect(path: Path, path_in_repo: str | None = None) -> list[_Local]:
    """The compact files to push from ``path`` (a file, or a folder of them) with their hookpoints.

    A file goes to ``path_in_repo``, else to its source hookpoint, else to the repo root. In a
    folder, a file in a subfolder goes to that subfolder's path, and a top-level file to its source
    hookpoint (else its file name without suffix); ``path_in_repo`` is then a prefix.
    """
    if path.is_file():
        meta = read_compact_metadata(path)
        hookpoint = path_in_repo if path_in_repo is not None else meta["source"].get("hookpoint") or ""
        return [_Local(_check_hookpoint(str(hookpoint), path), path, meta)]
    if not path.is_dir():
        raise SaeCompressError(f"{path}: no such file or folder; give a compact .safetensors file or a folder of them")
    found = sorted(p for p in path.rglob("*.safetensors") if is_compact_file(p))
    if not found:
        raise SaeCompressError(f"{path}: no compact saecompress files in this folder; "
                               "create them with `saecompress convert` or `saecompress train`")
    prefix = (path_in_repo or "").strip("/")
    locals_: dict[str, _Local] = {}
    for file in found:
        meta = read_compact_metadata(file)
        rel = file.relative_to(path)
        own = rel.parent.as_posix() if rel.parent != Path(".") else (meta["source"].get("hookpoint") or file.stem)
        hookpoint = _check_hookpoint(f"{prefix}/{own}" if prefix else str(own), file)
        if hookpoint in locals_:
            raise SaeCompressError(f"{path}: {locals_[hookpoint].path.name} and {rel} both map to hookpoint "
                                   f"{hookpoint!r}; put each file in its own hookpoint subfolder")
        locals_[hookpoint] = _Local(hookpoint, file, meta)
    return list(locals_.values())


def _without_local_paths(local: _Local, folder: Path) -> _Local:
    """``local``, or a copy in ``folder`` whose metadata holds no local path (files from older versions)."""
    if local.meta["source"] == shareable(local.meta["source"]):
        return local
    copy = shareable_copy(local.path, folder / (local.hookpoint.replace("/", "__") or "root") / COMPACT_NAME)
    return _Local(local.hookpoint, copy, read_compact_metadata(copy))


def _unchanged(local: Path, entry) -> bool:
    """True when the repo already holds ``local``'s content at that path (``entry``: its listing, or None)."""
    if entry is None:
        return False
    got, listed = content_ids(local, entry)
    return got == listed


def _remote_card_entries(api, repo_id: str, sha: str, tree: dict, skip: set[str]) -> list[CardEntry]:
    """Card rows for compact files already in the repo that this push does not replace."""
    entries = []
    for path, entry in tree.items():
        if PurePosixPath(path).name != COMPACT_NAME or path in skip:
            continue
        raw = api.parse_safetensors_file_metadata(repo_id, path, revision=sha).metadata
        try:
            meta = parse_compact_metadata(Path(f"hf://{repo_id}/{path}"), raw)
        except SaeCompressError as err:
            log.warning("leaving %s out of the model card: %s", path, err)
            continue
        size = entry.lfs.size if entry.lfs is not None else entry.size
        entries.append(CardEntry(str(PurePosixPath(path).parent).strip("."), path, size, meta))
    return entries


def hookpoint_cfg(meta: dict, hookpoint: str) -> dict:
    """The SAELens-style ``cfg.json`` beside a compact file: what hub tools read to know what a folder holds
    (SAELens's keys ``architecture``, ``d_in``, ``d_sae``, ``k``, ``metadata.model_name`` / ``hook_name``, and the
    expander's own ``d``, mask and storage)."""
    source, training = meta["source"], meta["user"].get("training") or {}
    return {"architecture": "expander", "d_in": meta["m"], "d_sae": meta["n"], "k": meta["k"], "d": meta["d"],
            "activation": meta["activation"], "encoder": meta["encoder"], "mask": meta["mask"],
            "normalize_activations": "layer_norm" if meta["normalize_input"] else "none", "dtype": meta["dtype"],
            "format": meta["format"], "format_version": int(meta["format_version"]), "file": COMPACT_NAME,
            "metadata": {"model_name": source.get("model_name"),
                         "hook_name": training.get("hookpoint") or source.get("hookpoint") or hookpoint or None}}


def _write_cfg(local: _Local, folder: Path) -> Path:
    out = folder / (local.hookpoint.replace("/", "__") or "root") / CFG_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(hookpoint_cfg(local.meta, local.hookpoint), indent=2) + "\n")
    return out


def _export_onnx(local: _Local, folder: Path) -> Path:
    out = folder / (local.hookpoint.replace("/", "__") or "root") / ONNX_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(load_compact(local.path), out, graph="encode", storage_dtype=local.meta["dtype"],
                source=local.meta["source"])
    return out


def push(path: str | os.PathLike, repo_id: str, *, path_in_repo: str | None = None, revision: str | None = None,
         private: bool = False, endpoint: str | None = None, token: str | None = None, message: str | None = None,
         with_onnx: bool = False) -> PushResult:
    """Upload a compact file, or a folder of them (one per hookpoint subfolder), to the model repo ``repo_id``.

    Creates the repo (and the ``revision`` branch) if needed, writes a model card covering every
    compact file in the repo, and commits only what differs from the remote (compared by sha256 /
    git blob id): pushing unchanged files makes no commit. ``with_onnx`` adds an ONNX export of
    each file's encoder (``encode.onnx``). Large files go through Xet when the Hub offers it, else
    over plain Git LFS (also when ``HF_HUB_DISABLE_XET=1``).
    """
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.hf_api import RepoFile

    check_repo_id(repo_id)
    locals_ = collect(Path(path), path_in_repo)
    branch = revision or "main"
    api = make_api(endpoint, token)
    with hub_errors(repo_id, branch, endpoint):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        head = api.repo_info(repo_id, revision=branch).sha
        tree = {f.path: f for f in api.list_repo_tree(repo_id, revision=head, recursive=True) if isinstance(f, RepoFile)}

    with tempfile.TemporaryDirectory(prefix="saecompress-push-") as tmp:
        locals_ = [_without_local_paths(lp, Path(tmp) / "shareable") for lp in locals_]
        files = [(lp.path, f"{lp.folder}{COMPACT_NAME}") for lp in locals_]
        files += [(_write_cfg(lp, Path(tmp) / "cfg"), f"{lp.folder}{CFG_NAME}") for lp in locals_]
        if with_onnx:
            files += [(_export_onnx(lp, Path(tmp)), f"{lp.folder}{ONNX_NAME}") for lp in locals_]
        entries = [CardEntry(lp.hookpoint, f"{lp.folder}{COMPACT_NAME}", lp.path.stat().st_size, lp.meta)
                   for lp in locals_]
        with hub_errors(repo_id, branch, endpoint):
            entries += _remote_card_entries(api, repo_id, head, tree, {p for _, p in files})
        onnx_paths = {p for p in tree if PurePosixPath(p).name == ONNX_NAME} | {r for _, r in files if r.endswith(ONNX_NAME)}
        card = Path(tmp) / CARD_NAME
        card.write_text(render_card(repo_id, entries, sorted(onnx_paths)), encoding="utf-8")
        files.append((card, CARD_NAME))

        changed = [(local, remote) for local, remote in files if not _unchanged(local, tree.get(remote))]
        result = PushResult(repo_id, branch, head, f"{api.endpoint}/{repo_id}/commit/{head}",
                            unchanged=sorted({r for _, r in files} - {r for _, r in changed}))
        if not changed:
            log.info("nothing changed in %s@%s; no commit made", repo_id, branch)
            return result
        hookpoints = ", ".join(lp.hookpoint or "." for lp in locals_)

        def commit():
            ops = [CommitOperationAdd(path_in_repo=remote, path_or_fileobj=str(local)) for local, remote in changed]
            return api.create_commit(repo_id, ops, commit_message=message or f"saecompress push: {hookpoints}",
                                     revision=branch, parent_commit=head)

        with hub_errors(repo_id, branch, endpoint):
            with plain_lfs_uploads(xet_disabled_by_env()):
                try:
                    info = commit()
                except Exception as err:  # noqa: BLE001 - narrowed just below
                    if not is_missing_xet_error(err):
                        raise
                    log.warning("%s offers no Xet storage; uploading over plain Git LFS", api.endpoint)
                    with plain_lfs_uploads(True):
                        info = commit()
    result.commit_sha, result.commit_url = info.oid, str(info.commit_url)
    result.uploaded = sorted(remote for _, remote in changed)
    return result
