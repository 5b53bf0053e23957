"""Float arrays on disk, read with numpy only (no torch): ``.npy`` and ``.safetensors`` files memory-mapped, and
the shard folders ``saecompress acts`` writes. ``activations.py`` serves them to training as torch tensors;
the torch-free runtime (``monitor``) reads them here.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SaeCompressError

MANIFEST = "manifest.json"
SHARD_SUFFIXES = (".safetensors", ".npy")
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values held as their uint16 bit patterns, as float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class ArrayFile:
    """One memory-mapped ``[rows, m]`` array; ``bf16`` arrays are mapped as uint16 bit patterns."""

    path: Path
    array: np.ndarray
    bf16: bool

    @property
    def rows(self) -> int:
        return self.array.shape[0]

    def floats(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a float32 (or float64) copy, NaN/inf included."""
        return self._floats(np.array(self.array[start:stop], copy=True))

    def floats_at(self, rows: np.ndarray) -> np.ndarray:
        """The rows at the sorted indices ``rows``, as ``floats`` gives them."""
        return self._floats(np.asarray(self.array[rows]))

    def _floats(self, a: np.ndarray) -> np.ndarray:
        return bf16_to_float32(a) if self.bf16 else a.astype(np.float32, copy=False)


def _open_npy(path: Path) -> ArrayFile:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/OSError/EOFError for truncated or foreign files
        raise SaeCompressError(f"{path}: not a readable .npy array ({e}); re-create the file") from None
    if not np.issubdtype(arr.dtype, np.floating):
        raise SaeCompressError(f"{path}: dtype {arr.dtype} is not floating point; store activations as float16/32/64")
    return ArrayFile(path, arr, bf16=False)


# safetensors dtype names -> numpy (bfloat16 mapped as its uint16 bit patterns)
ST_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
            "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8}


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """``(header, data_start)`` of a safetensors file: its JSON header (``__metadata__`` included) and where
    the tensor bytes start. Raises ``ValueError`` for a file that is not one."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise ValueError("header longer than the file")
        header = json.loads(f.read(header_len))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, 8 + header_len


def safetensors_array(path: Path, info: dict[str, Any], data_start: int) -> np.ndarray:
    """One tensor of a safetensors file (its header ``info``), memory-mapped (bfloat16 as uint16 bit patterns).
    Raises ``ValueError`` for an unknown dtype or a byte range that does not fit."""
    dtype = ST_NUMPY.get(info.get("dtype"))
    if dtype is None:
        raise ValueError(f"unknown dtype {info.get('dtype')}")
    shape = tuple(info["shape"])
    begin, end = info["data_offsets"]
    if end - begin != math.prod(shape) * np.dtype(dtype).itemsize:
        raise ValueError("its byte range does not match its shape")
    if data_start + end > path.stat().st_size:
        raise ValueError(f"the file is truncated ({path.stat().st_size} bytes, needs {data_start + end})")
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


def _open_safetensors(path: Path) -> ArrayFile:
    try:
        header, data_start = safetensors_header(path)
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise SaeCompressError(f"{path}: not a valid safetensors file ({e}); re-create the file") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if "activations" in tensors:
        name = "activations"
    elif len(tensors) == 1:
        (name,) = tensors
    else:
        raise SaeCompressError(
            f"{path}: holds tensors {sorted(tensors)}; expected one named 'activations' (or a single tensor)"
        )
    info = tensors[name]
    if info.get("dtype") not in _ST_DTYPES:
        raise SaeCompressError(
            f"{path}: tensor '{name}' has dtype {info.get('dtype')}; activations must be F16, BF16, F32 or F64"
        )
    if len(info["shape"]) < 1:
        raise SaeCompressError(f"{path}: tensor '{name}' is a scalar; activations must be [..., m]")
    try:
        arr = safetensors_array(path, info, data_start)
    except ValueError as e:
        raise SaeCompressError(f"{path}: tensor '{name}': {e}; re-create the file") from None
    return ArrayFile(path, arr, bf16=info["dtype"] == "BF16")


def open_array_file(path: str | os.PathLike) -> ArrayFile:
    """A memory-mapped float array from a ``.npy`` or ``.safetensors`` file, as ``[rows, m]``.

    A safetensors file must hold a tensor ``activations`` or exactly one tensor. ``[m]`` is one
    row; leading axes of ``[..., m]`` are flattened.
    """
    path = Path(path)
    if not path.is_file():
        raise SaeCompressError(f"{path}: no such activation file (give a .npy or .safetensors file)")
    if path.suffix == ".npy":
        shard = _open_npy(path)
    elif path.suffix == ".safetensors":
        shard = _open_safetensors(path)
    else:
        raise SaeCompressError(f"{path}: unknown activation file type; use .npy or .safetensors shards")
    shape = shard.array.shape
    if len(shape) < 1 or shape[-1] < 1:
        raise SaeCompressError(f"{path}: array has shape {list(shape)}; activations must be [..., m] with m >= 1")
    if len(shape) != 2:
        shard = ArrayFile(path, shard.array.reshape(-1, shape[-1]), shard.bf16)
    return shard


def array_files(path: str | os.PathLike) -> tuple[list[ArrayFile], dict[str, Any], Path]:
    """The arrays of a ``.npy``/``.safetensors`` file or a folder of shards, its manifest (``{}`` without one) and
    its path. In a folder with ``manifest.json`` the manifest's shard list (and row counts) is used;
    otherwise every ``*.safetensors``/``*.npy`` file, in name order."""
    p = Path(path)
    if not p.exists():
        raise SaeCompressError(f"{p}: no such activation file or directory")
    if p.is_file():
        return [open_array_file(p)], {}, p
    manifest_path = p / MANIFEST
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
            files = [entry["file"] for entry in manifest["shards"]]
        except (ValueError, KeyError, TypeError) as e:
            raise SaeCompressError(f"{manifest_path}: unreadable manifest ({e}); re-run `saecompress acts`") from None
        missing = [f for f in files if not (p / f).is_file()]
        if missing:
            raise SaeCompressError(f"{p}: shard {missing[0]} listed in manifest.json is missing; re-run `saecompress acts`")
        shards = [open_array_file(p / f) for f in files]
        for entry, shard in zip(manifest["shards"], shards):
            if "rows" in entry and entry["rows"] != shard.rows:
                raise SaeCompressError(
                    f"{shard.path}: has {shard.rows} rows but manifest.json says {entry['rows']}; re-run `saecompress acts`"
                )
        widths = {shard.array.shape[1] for shard in shards}
        if "m" in manifest and widths and manifest["m"] not in widths:
            raise SaeCompressError(f"{manifest_path}: says m={manifest['m']} but the shards have m={widths.pop()}")
        return shards, manifest, p
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in SHARD_SUFFIXES and not f.name.startswith("."))
    return [open_array_file(f) for f in files], {}, p
