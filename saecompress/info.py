"""What compact files hold and how much they save: the library form of ``saecompress info``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .compact import compression_ratio, dense_values, learned_values, load_compact, read_compact_metadata
from .errors import SaeCompressError
from .sources import HubAccess, compact_files, resolve, what_is


def describe(src: str | os.PathLike, hub: HubAccess | None = None) -> list[dict[str, Any]]:
    """The facts of each compact file ``src`` names (a file, a folder of them, or ``hf://``), each fully checked."""
    path, hookpoint = resolve(src, hub=hub)
    files = compact_files(path, hookpoint)
    if not files:
        raise SaeCompressError(f"{src}: {what_is(path / hookpoint if hookpoint else path)} "
                               "(`info` shows compact SAE files)")
    return [file_facts(file) for file in files]


def file_facts(compact: Path) -> dict[str, Any]:
    """Settings, sizes and metadata of the compact file ``compact`` (after a full ``load_compact`` check)."""
    load_compact(compact)  # full check: tensors vs metadata, finite values, mask hash
    meta = read_compact_metadata(compact)
    file_bytes = compact.stat().st_size
    return {
        "hookpoint": meta["source"].get("hookpoint"), "path": str(compact),
        "m": meta["m"], "n": meta["n"], "d": meta["d"], "k": meta["k"],
        "activation": meta["activation"], "encoder": meta["encoder"],
        "normalize_input": meta["normalize_input"], "dtype": meta["dtype"],
        "mask": meta["mask"], "mask_algorithm": meta.get("mask_algorithm"),
        "mask_seed": meta.get("mask_seed"), "indices_sha256": meta["indices_sha256"],
        "file_bytes": file_bytes,
        "learned_values": learned_values(meta["m"], meta["n"], meta["d"], meta["encoder"]),
        "dense_values": dense_values(meta["m"], meta["n"]),
        "compression_ratio": round(compression_ratio(meta["m"], meta["n"], file_bytes), 2),
        "source": meta["source"], "user": meta["user"],
    }
