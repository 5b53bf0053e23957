"""One resolver for every SAE source: compact files, dense SAEs in any known layout, ``hf://`` URIs."""

from __future__ import annotations

import os
from pathlib import Path

from .compact import is_compact_file, load_compact
from .errors import SaeCompressError
from .models import ExpanderSAE, TopKSAE


def resolve(src: str | os.PathLike, hookpoint: str | None = None) -> tuple[Path, str | None]:
    """A local path for ``src`` (downloading ``hf://owner/repo[/hookpoint][@rev]`` first) and its hookpoint."""
    text = str(src)
    if text.startswith("hf://"):
        from .hub import resolve_hf_source

        path, uri_hookpoint = resolve_hf_source(text)
        return path, hookpoint or uri_hookpoint
    path = Path(text).expanduser()
    if not path.exists():
        raise SaeCompressError(f"{text}: no such file or folder (give a local path or hf://owner/repo)")
    return path, hookpoint


def find_compact(path: Path, hookpoint: str | None = None) -> Path | None:
    """The compact file ``path`` names: itself, or the only compact file in the (hookpoint) folder."""
    if path.is_file():
        return path if is_compact_file(path) else None
    folder = path / hookpoint if hookpoint else path
    found = sorted(p for p in folder.glob("*.safetensors") if is_compact_file(p)) if folder.is_dir() else []
    return found[0] if len(found) == 1 else None


def load(src: str | os.PathLike, hookpoint: str | None = None) -> ExpanderSAE | TopKSAE:
    """Load any SAE source: a compact file or a paper checkpoint → ``ExpanderSAE``; a dense SAE → ``TopKSAE``."""
    path, hookpoint = resolve(src, hookpoint)
    compact = find_compact(path, hookpoint)
    if compact is not None:
        return load_compact(compact)
    from .formats import read_sae

    return read_sae(path, hookpoint)
