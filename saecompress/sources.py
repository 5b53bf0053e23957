"""One resolver for every SAE source: compact files, dense SAEs in any known layout, ``hf://`` URIs;
and ``save``, the one writer of a model a command produces.

Models carry no file state: ``load_source`` returns a source's facts (provenance, user metadata,
storage dtype) beside its model as a ``Loaded``, and writers take them explicitly."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .arrays import array_files
from .compact_format import is_compact_file, read_compact_metadata
from .errors import SaeCompressError

if TYPE_CHECKING:  # the models need torch; resolving and describing sources does not (the torch-free runtime)
    from .models import ExpanderSAE, TopKSAE


@dataclass(frozen=True)
class HubAccess:
    """Where ``hf://`` sources come from: ``endpoint`` (default ``HF_ENDPOINT``) and ``token`` (default ``HF_TOKEN``)."""

    endpoint: str | None = None
    token: str | None = None


@dataclass(frozen=True)
class Loaded:
    """A model and the facts of the file it came from.

    ``provenance``: where it came from (a dense reader's, which may hold the local ``path``, or a
    compact file's ``source``); whatever is written goes through ``provenance.shareable``.
    ``user``: a compact file's user metadata. ``storage_dtype``: the precision a compact file stores
    the values at (dense readers give float32 models).
    """

    model: ExpanderSAE | TopKSAE
    provenance: dict[str, Any] = field(default_factory=dict)
    user: dict[str, Any] = field(default_factory=dict)
    storage_dtype: str = "float32"


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
    """What a local file or folder that is not a compact file or a dense SAE holds, and which command takes it."""
    if path.suffix.lower() == ".onnx":
        return f"an ONNX model; run it with `saecompress monitor {path} --input ACTS`"
    try:
        arrays = array_files(path)[0]
        rows, m = sum(a.rows for a in arrays), arrays[0].array.shape[1]
    except (SaeCompressError, IndexError):
        return "not a compact SAE file, a dense SAE or activations saecompress reads"
    return f"activations [{rows}, {m}]; measure an SAE on them with `saecompress eval SAE --acts {path}`"


def find_compact(path: Path, hookpoint: str | None = None) -> Path | None:
    """The compact file ``path`` names: itself, or the only compact file in the (hookpoint) folder."""
    if path.is_file():
        return path if is_compact_file(path) else None
    folder = path / hookpoint if hookpoint else path
    found = sorted(p for p in folder.glob("*.safetensors") if is_compact_file(p)) if folder.is_dir() else []
    return found[0] if len(found) == 1 else None


def load_source(src: str | os.PathLike, hookpoint: str | None = None, *,
                hub: HubAccess | None = None) -> Loaded:
    """Load any SAE source (as :func:`load`) with the facts of its file beside the model."""
    from .compact import load_compact
    from .formats import read_sae

    path, hookpoint = resolve(src, hookpoint, hub)
    compact = find_compact(path, hookpoint)
    if compact is not None:
        meta = read_compact_metadata(compact)
        return Loaded(load_compact(compact), meta["source"], meta["user"], meta["dtype"])
    return Loaded(*read_sae(path, hookpoint))


def load(src: str | os.PathLike, hookpoint: str | None = None, *,
         hub: HubAccess | None = None) -> ExpanderSAE | TopKSAE:
    """Load any SAE source: a compact file or a paper checkpoint → ``ExpanderSAE``; a dense SAE → ``TopKSAE``."""
    return load_source(src, hookpoint, hub=hub).model


def save(sae: ExpanderSAE | TopKSAE, out: str | os.PathLike, metadata: dict, origin: Loaded | None = None) -> Path:
    """Write ``sae`` to ``out`` atomically: a compact file for an ``ExpanderSAE``, a SAELens folder for a dense one.

    ``origin`` is the source ``sae`` was made from: its provenance is recorded, and a compact file
    keeps its storage dtype (else float32).
    """
    from .compact import save_compact
    from .formats.saelens import save_dense
    from .models import ExpanderSAE

    source = origin.provenance if origin is not None else {}
    if isinstance(sae, ExpanderSAE):
        dtype = origin.storage_dtype if origin is not None else "float32"
        return save_compact(sae, out, dtype=dtype, metadata=metadata, source=source)
    return save_dense(sae, out, metadata, source=source)
