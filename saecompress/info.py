"""What SAE files hold and how much they save: the library form of ``saecompress info``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .compact_format import compression_ratio, dense_values, learned_values, read_compact
from .errors import SaeCompressError
from .provenance import shareable
from .sources import HubAccess, compact_files, resolve, what_is


def describe(src: str | os.PathLike, hub: HubAccess | None = None) -> list[dict[str, Any]]:
    """The facts of each compact file ``src`` names (a file, a folder of them, or ``hf://``), each fully
    checked, or of each dense SAE it holds (``dense_facts``)."""
    path, hookpoint = resolve(src, hub=hub)
    files = compact_files(path, hookpoint)
    if files:
        return [file_facts(file) for file in files]
    from .formats import detect_format, list_hookpoints  # dense readers need torch; compact files do not

    try:
        detect_format(path)
    except SaeCompressError:
        raise SaeCompressError(f"{src}: {what_is(path / hookpoint if hookpoint else path)} "
                               "(`info` shows compact SAE files and dense SAEs)") from None
    return [dense_facts(path, hp or None) for hp in ([hookpoint] if hookpoint else list_hookpoints(path))]


def threshold_facts(threshold: np.ndarray | None, dtype: str = "float32") -> dict[str, Any]:
    """A threshold SAE's θ (stored as ``dtype``): its dtype and range (min, median, max); nothing for a top-k SAE."""
    if threshold is None:
        return {}
    values = np.asarray(threshold, dtype=np.float64)
    return {"threshold_dtype": dtype, "threshold_min": float(values.min()),
            "threshold_median": float(np.median(values)), "threshold_max": float(values.max())}


def file_facts(compact: Path) -> dict[str, Any]:
    """Settings, sizes and metadata of the compact file ``compact`` (after every check a load makes)."""
    meta, arrays, _ = read_compact(compact)  # tensors vs metadata, finite values, mask hash
    file_bytes = compact.stat().st_size
    return {
        "hookpoint": meta["source"].get("hookpoint"), "path": str(compact),
        "m": meta["m"], "n": meta["n"], "d": meta["d"], "k": meta["k"],
        "activation": meta["activation"], **threshold_facts(arrays.get("threshold")), "encoder": meta["encoder"],
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
    from .formats import read_sae

    sae, provenance = read_sae(path, hookpoint)
    return {
        "hookpoint": provenance.get("hookpoint"), "path": str(provenance.get("path", path)),
        "format": provenance.get("library"), "m": sae.m, "n": sae.n, "d": getattr(sae, "d", None), "k": sae.k,
        "activation": sae.activation,
        **({} if sae.threshold is None else threshold_facts(sae.threshold.detach().cpu().double().numpy(),
                                                            str(sae.threshold.dtype).removeprefix("torch."))),
        "normalize_input": sae.normalize_input,
        "source_dtype": provenance.get("source_dtype"), "dense_values": dense_values(sae.m, sae.n),
        "source": shareable(provenance),
    }
