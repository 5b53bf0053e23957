"""What SAE files hold and how much they save: the library form of ``saecompress info``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .compact import compression_ratio, dense_values, learned_values, load_compact, read_compact_metadata
from .errors import SaeCompressError
from .formats import detect_format, list_hookpoints, read_sae
from .provenance import shareable
from .sources import HubAccess, compact_files, resolve, what_is


def describe(src: str | os.PathLike, hub: HubAccess | None = None) -> list[dict[str, Any]]:
    """The facts of each compact file ``src`` names (a file, a folder of them, or ``hf://``), each fully
    checked, or of each dense SAE it holds (``dense_facts``)."""
    path, hookpoint = resolve(src, hub=hub)
    files = compact_files(path, hookpoint)
    if files:
        return [file_facts(file) for file in files]
    try:
        detect_format(path)
    except SaeCompressError:
        raise SaeCompressError(f"{src}: {what_is(path / hookpoint if hookpoint else path)} "
                               "(`info` shows compact SAE files and dense SAEs)") from None
    return [dense_facts(path, hp or None) for hp in ([hookpoint] if hookpoint else list_hookpoints(path))]


def threshold_facts(threshold: torch.Tensor | None) -> dict[str, Any]:
    """A threshold SAE's θ: its dtype and range (min, median, max); nothing for a top-k SAE."""
    if threshold is None:
        return {}
    values = threshold.detach().cpu().double().numpy()
    return {"threshold_dtype": str(threshold.dtype).removeprefix("torch."), "threshold_min": float(values.min()),
            "threshold_median": float(np.median(values)), "threshold_max": float(values.max())}


def file_facts(compact: Path) -> dict[str, Any]:
    """Settings, sizes and metadata of the compact file ``compact`` (after a full ``load_compact`` check)."""
    sae = load_compact(compact)  # full check: tensors vs metadata, finite values, mask hash
    meta = read_compact_metadata(compact)
    file_bytes = compact.stat().st_size
    return {
        "hookpoint": meta["source"].get("hookpoint"), "path": str(compact),
        "m": meta["m"], "n": meta["n"], "d": meta["d"], "k": meta["k"],
        "activation": meta["activation"], **threshold_facts(sae.threshold), "encoder": meta["encoder"],
        "normalize_input": meta["normalize_input"], "dtype": meta["dtype"],
        "mask": meta["mask"], "mask_algorithm": meta.get("mask_algorithm"),
        "mask_seed": meta.get("mask_seed"), "indices_sha256": meta["indices_sha256"],
        "file_bytes": file_bytes,
        "learned_values": learned_values(meta["m"], meta["n"], meta["d"], meta["encoder"]),
        "dense_values": dense_values(meta["m"], meta["n"]),
        "compression_ratio": round(compression_ratio(meta["m"], meta["n"], file_bytes), 2),
        "source": meta["source"], "user": meta["user"],
    }


def dense_facts(path: Path, hookpoint: str | None = None) -> dict[str, Any]:
    """Settings of the SAE in a dense layout at ``path`` (``hookpoint`` of a multi-SAE source), as its reader
    loads it (``d``: ``None`` but for Expander-SAE paper checkpoints)."""
    sae, provenance = read_sae(path, hookpoint)
    return {
        "hookpoint": provenance.get("hookpoint"), "path": str(provenance.get("path", path)),
        "format": provenance.get("library"), "m": sae.m, "n": sae.n, "d": getattr(sae, "d", None), "k": sae.k,
        "activation": sae.activation, **threshold_facts(sae.threshold), "normalize_input": sae.normalize_input,
        "source_dtype": provenance.get("source_dtype"), "dense_values": dense_values(sae.m, sae.n),
        "source": shareable(provenance),
    }
