"""One resolver for every SAE source: compact files, dense SAEs in any known layout, ``hf://`` URIs;
and ``save``, the one writer of a model a command produces."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .activations import open_activations
from .compact import is_compact_file, load_compact, save_compact
from .errors import SaeCompressError
from .formats import detect_format, read_sae
from .formats.saelens import save_dense
from .models import ExpanderSAE, TopKSAE


@dataclass(frozen=True)
class HubAccess:
    """Where ``hf://`` sources come from: ``endpoint`` (default ``HF_ENDPOINT``) and ``token`` (default ``HF_TOKEN``)."""

    endpoint: str | None = None
    token: str | None = None


def resolve(src: str | os.PathLike, hookpoint: str | None = None,
            hub: HubAccess | None = None) -> tuple[Path, str | None]:
    """A local path for ``src`` (downloading ``hf://owner/repo[/hookpoint][@rev]`` first, from ``hub``)
    and its hookpoint."""
    text = str(src)
    if text.startswith("hf://"):
        from .hub.pull import resolve_hf_source

        hub = hub or HubAccess()
        path, uri_hookpoint = resolve_hf_source(text, endpoint=hub.endpoint, token=hub.token)
        return path, hookpoint or uri_hookpoint
    path = Path(text).expanduser()
    if not path.exists():
        raise SaeCompressError(f"{text}: no such file or folder (give a local path or hf://owner/repo)")
    return path, hookpoint


def compact_files(path: Path, hookpoint: str | None = None) -> list[Path]:
    """The compact files ``path`` names: itself, or every compact file under the (hookpoint) folder."""
    if path.is_file():
        return [path] if is_compact_file(path) else []
    folder = path / hookpoint if hookpoint else path
    return sorted(p for p in folder.rglob("*.safetensors") if is_compact_file(p)) if folder.is_dir() else []


def what_is(path: Path) -> str:
    """What a local file or folder that is not a compact file holds, and which command takes it."""
    if path.suffix.lower() == ".onnx":
        return f"an ONNX model; run it with `saecompress monitor {path} --input ACTS`"
    try:
        return (f"a dense {detect_format(path)} SAE; convert it with `saecompress convert {path} OUT` or "
                f"measure it with `saecompress eval {path} --acts ACTS`")
    except SaeCompressError:
        pass
    try:
        acts = open_activations(path)
    except SaeCompressError:
        return "not a compact SAE file, a dense SAE or activations saecompress reads"
    return (f"activations [{acts.num_rows}, {acts.m}]; measure an SAE on them with "
            f"`saecompress eval SAE --acts {path}`")


def find_compact(path: Path, hookpoint: str | None = None) -> Path | None:
    """The compact file ``path`` names: itself, or the only compact file in the (hookpoint) folder."""
    if path.is_file():
        return path if is_compact_file(path) else None
    folder = path / hookpoint if hookpoint else path
    found = sorted(p for p in folder.glob("*.safetensors") if is_compact_file(p)) if folder.is_dir() else []
    return found[0] if len(found) == 1 else None


def load(src: str | os.PathLike, hookpoint: str | None = None, *,
         hub: HubAccess | None = None) -> ExpanderSAE | TopKSAE:
    """Load any SAE source: a compact file or a paper checkpoint → ``ExpanderSAE``; a dense SAE → ``TopKSAE``."""
    path, hookpoint = resolve(src, hookpoint, hub)
    compact = find_compact(path, hookpoint)
    if compact is not None:
        return load_compact(compact)
    return read_sae(path, hookpoint)


def save(sae: ExpanderSAE | TopKSAE, out: str | os.PathLike, metadata: dict) -> Path:
    """Write ``sae`` to ``out`` atomically: a compact file for an ``ExpanderSAE``, a SAELens folder for a dense one."""
    if isinstance(sae, ExpanderSAE):
        return save_compact(sae, out, metadata=metadata)
    return save_dense(sae, out, metadata)
