"""The compact file read with numpy only (spec: ``docs/FORMAT.md``): its metadata, and every check a load makes
(tensors against the metadata, finite values, the mask's index hash), for ``compact.load_compact`` and for the
torch-free runtime (``info``, ``pull``).

Arrays come back memory-mapped in their stored dtype (bfloat16 as uint16 bit patterns: ``arrays.bf16_to_float32``).
"""

from __future__ import annotations

import json
import struct
import os
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import bf16_to_float32, safetensors_array, safetensors_header
from .errors import SaeCompressError, first_line
from .kinds import ALL_ACTIVATIONS, ENCODERS, THRESHOLD_ACTIVATIONS
from .mask import MASK_ALGORITHM, expander_mask, indices_sha256

FORMAT_NAME = "saecompress.expander"
FORMAT_VERSION = 1
STORAGE_DTYPES = ("float32", "float16", "bfloat16", "int8")
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}  # bytes per stored value
_REQUIRED_KEYS = ("format", "format_version", "m", "n", "d", "k", "activation", "encoder",
                  "normalize_input", "mask", "indices_sha256", "dtype")


def _fail(path: Path, problem: str, hint: str = "") -> SaeCompressError:
    return SaeCompressError(f"{path}: {problem}" + (f"; {hint}" if hint else ""))


def read_compact_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed metadata of a compact file (ints as int, ``source``/``user`` as dicts).

    Raises ``SaeCompressError`` for a file that is not a compact saecompress file.
    """
    path = Path(path)
    raw = raw_metadata(path)
    return parse_compact_metadata(path, raw)


def raw_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's ``__metadata__`` strings, unparsed."""
    return _header(path)[0].get("__metadata__") or {}


def _header(path: Path) -> tuple[dict[str, Any], int]:
    if not path.is_file():
        raise _fail(path, "no such file")
    try:
        return safetensors_header(path)
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as err:
        raise _fail(path, f"not a readable safetensors file ({first_line(err)})",
                    "the file may be truncated or corrupt: re-download or re-create it") from None


def is_compact_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a safetensors file whose metadata names the compact format.

    Raises ``SaeCompressError`` when ``path`` is a ``.safetensors`` file that cannot be read
    (truncated, corrupt), so the caller reports that rather than "unknown format".
    """
    path = Path(path)
    try:
        return raw_metadata(path).get("format") == FORMAT_NAME
    except SaeCompressError:
        if path.suffix == ".safetensors":
            raise
        return False


def parse_compact_metadata(path: Path, raw: dict[str, str]) -> dict[str, Any]:
    """Validate and parse a compact file's raw ``__metadata__`` strings; ``path`` names it in errors."""
    if raw.get("format") != FORMAT_NAME:
        raise _fail(path, f"not a compact saecompress file (format={raw.get('format')!r})",
                    "convert a dense SAE with `saecompress convert`")
    missing = [key for key in _REQUIRED_KEYS if key not in raw]
    if missing:
        raise _fail(path, f"metadata lacks {', '.join(missing)}", "the file is damaged; re-create it")
    if raw["format_version"] != str(FORMAT_VERSION):
        raise _fail(path, f"unknown format version {raw['format_version']!r} (this saecompress reads "
                          f"version {FORMAT_VERSION})", "upgrade saecompress")
    meta: dict[str, Any] = dict(raw)
    try:
        for key in ("m", "n", "d", "k") + (("mask_seed",) if raw["mask"] == "seed" else ()):
            meta[key] = int(raw[key])
        meta["source"] = json.loads(raw.get("source", "{}"))
        meta["user"] = json.loads(raw.get("user", "{}"))
    except (KeyError, ValueError) as err:
        raise _fail(path, f"malformed metadata ({first_line(err)})", "the file is damaged; re-create it") from None
    meta["normalize_input"] = raw["normalize_input"] == "true"
    checks = [
        (meta["activation"] in ALL_ACTIVATIONS, f"unknown activation {meta['activation']!r}"),
        (meta["encoder"] in ENCODERS, f"unknown encoder {meta['encoder']!r}"),
        (meta["dtype"] in STORAGE_DTYPES, f"unknown dtype {meta['dtype']!r}"),
        (meta["mask"] in ("seed", "explicit"), f"unknown mask kind {meta['mask']!r}"),
        (meta["mask"] != "seed" or raw.get("mask_algorithm") == MASK_ALGORITHM,
         f"unknown mask algorithm {raw.get('mask_algorithm')!r}"),
        (min(meta["m"], meta["n"], meta["k"], meta["d"]) >= 1 and meta["d"] <= meta["m"]
         and meta["k"] <= meta["n"], "impossible sizes m/n/d/k"),
    ]
    for ok, problem in checks:
        if not ok:
            raise _fail(path, problem, "upgrade saecompress, or re-create the file")
    return meta


def _expected_shapes(meta: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    n, d, m = meta["n"], meta["d"], meta["m"]
    int8 = meta["dtype"] == "int8"
    value_dtypes = ("I8",) if int8 else ({"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[meta["dtype"]],)
    names = ["values"] + (["enc_values"] if meta["encoder"] == "untied" else [])
    shapes = {}
    for name in names:
        shapes[name] = ((n, d), value_dtypes)
        if int8:
            shapes[f"{name}_scale"] = ((n,), ("F32",))
    if meta["encoder"] != "pursuit":
        shapes["b_enc"] = ((n,), ("F32",))
    shapes["b_dec"] = ((m,), ("F32",))
    if meta["activation"] in THRESHOLD_ACTIVATIONS:
        shapes["threshold"] = ((n,), ("F32",))
    if meta["mask"] == "explicit":
        shapes["indices"] = ((n, d), ("I16", "I32"))
    return shapes


def read_compact(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]:
    """``(metadata, arrays, indices)`` of a compact file after every check a load makes: each tensor's shape and
    dtype against the metadata, finite values, indices in range and their sha256 (so a drift in the mask
    algorithm is caught). ``arrays`` hold the stored tensors (bfloat16 as uint16 bit patterns); ``indices
    [n, d]`` int64 (the seed's mask, or the stored one)."""
    path = Path(path)
    header, data_start = _header(path)
    meta = parse_compact_metadata(path, header.get("__metadata__") or {})
    expected = _expected_shapes(meta)
    found = {name for name in header if name != "__metadata__"}
    if found != set(expected):
        extra, lacking = sorted(found - set(expected)), sorted(set(expected) - found)
        raise _fail(path, "tensors do not match the metadata"
                    + (f" (missing {', '.join(lacking)})" if lacking else "")
                    + (f" (unexpected {', '.join(extra)})" if extra else ""),
                    "the file is damaged; re-create it")
    arrays = {}
    for name, (shape, dtypes) in expected.items():
        info = header[name]
        if tuple(info.get("shape", ())) != shape or info.get("dtype") not in dtypes:
            raise _fail(path, f"tensor {name} is {info.get('dtype')}{list(info.get('shape', []))}, "
                              f"metadata says {'/'.join(dtypes)}{list(shape)}", "the file is damaged; re-create it")
        try:
            arrays[name] = safetensors_array(path, info, data_start)
        except (OSError, ValueError) as err:
            raise _fail(path, f"could not read tensor {name} ({first_line(err)})",
                        "the file may be truncated or corrupt: re-download or re-create it") from None
        values = bf16_to_float32(arrays[name]) if info["dtype"] == "BF16" else arrays[name]
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            raise _fail(path, f"tensor {name} contains NaN or Inf", "re-train or re-convert the SAE")
    m, n, d = meta["m"], meta["n"], meta["d"]
    if meta["mask"] == "seed":
        indices = expander_mask(m, n, d, meta["mask_seed"])
    else:
        indices = np.asarray(arrays["indices"], dtype=np.int64)
        if int(indices.min()) < 0 or int(indices.max()) >= m:
            raise _fail(path, f"mask indices outside [0, {m})", "the file is damaged; re-create it")
    if indices_sha256(indices) != meta["indices_sha256"]:
        raise _fail(path, "mask index hash mismatch (the mask differs from the one the file was saved with)",
                    "the file is corrupt or was written by an incompatible saecompress; re-create it")
    return meta, arrays, indices


def stored_floats(arrays: dict[str, np.ndarray], name: str, dtype: str) -> np.ndarray:
    """The float32 values of the stored tensor ``name`` in memory (``dtype``: the file's storage dtype; int8 times
    its per-latent scale)."""
    stored = arrays[name]
    if dtype == "int8":
        return stored.astype(np.float32) * np.asarray(arrays[f"{name}_scale"], dtype=np.float32)[:, None]
    return bf16_to_float32(stored) if dtype == "bfloat16" else np.array(stored, dtype=np.float32)


def compression_ratio(m: int, n: int, file_bytes: int) -> float:
    """How many times smaller ``file_bytes`` is than the equivalent dense TopK SAE in float32."""
    return 4 * dense_values(m, n) / max(file_bytes, 1)


def dense_values(m: int, n: int) -> int:
    """Values in an equivalent dense TopK SAE: ``2·m·n + m + n``."""
    return 2 * m * n + m + n


def learned_values(m: int, n: int, d: int, encoder: str) -> int:
    """Learned values of an Expander SAE: ``n·d`` (twice if untied) ``+ n + m`` (a pursuit encoder: ``n·d + m``)."""
    if encoder == "pursuit":
        return n * d + m
    return (2 if encoder == "untied" else 1) * n * d + n + m


