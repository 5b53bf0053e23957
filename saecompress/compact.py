"""The compact file: one ``.safetensors`` file per Expander SAE (spec: ``docs/FORMAT.md``).

Tensors: ``values [n, d]`` (float32 / float16 / bfloat16, or int8 with ``values_scale [n]``),
optional ``enc_values`` (untied encoders, same scheme), ``b_enc [n]`` and ``b_dec [m]`` (float32),
``threshold [n]`` (float32) for the threshold activations, and ``indices [n, d]`` only when the mask
is not seed-generated. The header's ``__metadata__``
holds the configuration, the mask seed and the sha256 of the index array, checked on load.

Files are written canonically (sorted header keys, tensors in a fixed order), so saving the same
model twice gives the same bytes, and written atomically (temp file + rename).
"""

from __future__ import annotations

import copy
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ._io import atomic_path
from ._json import dumps
from .errors import SaeCompressError, check_choice
from .compact_format import (FORMAT_NAME, FORMAT_VERSION, ITEMSIZE, STORAGE_DTYPES, compression_ratio,  # noqa: F401
                             dense_values, is_compact_file, learned_values, parse_compact_metadata, raw_metadata,
                             read_compact, read_compact_metadata, stored_floats)
from .mask import MASK_ALGORITHM, indices_sha256
from .models import ExpanderSAE, TopKSAE
from .provenance import shareable


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int8: "I8", torch.int16: "I16", torch.int32: "I32"}


# --------------------------------------------------------------------------- writing

def quantize_int8(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-latent int8: ``values ≈ q * scale[:, None]``, ``|q| ≤ 127``.

    The scale is rounded up to 17 significant bits, so ``q * scale`` is exact in float32 and
    re-quantising dequantised values gives back the same ``q`` and ``scale`` (a bit-exact round trip).
    """
    absmax = values.detach().abs().amax(dim=1).double()
    mantissa, exponent = torch.frexp(absmax / 127)
    scale = torch.ldexp(torch.ceil(mantissa * 2**17) / 2**17, exponent).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(values.detach().float() / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _stored_values(name: str, values: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    if dtype == "int8":
        q, scale = quantize_int8(values)
        return {name: q, f"{name}_scale": scale}
    return {name: values.detach().to(_TORCH_DTYPES[dtype]).contiguous()}


def index_dtype(m: int) -> torch.dtype:
    """The integer type of stored mask indices for model dim ``m``: int16 while it fits, else int32."""
    return torch.int16 if m <= torch.iinfo(torch.int16).max else torch.int32


def compact_tensors(sae: ExpanderSAE, dtype: str) -> dict[str, torch.Tensor]:
    """The tensors a compact file holds for ``sae`` stored as ``dtype``."""
    tensors = _stored_values("values", sae.values, dtype)
    if sae.enc_values is not None:
        tensors |= _stored_values("enc_values", sae.enc_values, dtype)
    if sae.encoder != "pursuit":
        tensors["b_enc"] = sae.b_enc.detach().float().contiguous()
    tensors["b_dec"] = sae.b_dec.detach().float().contiguous()
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold.detach().float().contiguous()
    if sae.mask_seed is None:
        tensors["indices"] = sae.indices.to(index_dtype(sae.m)).contiguous()
    return tensors


def _json(value: Any) -> str:
    return dumps(value, sort_keys=True, separators=(",", ":"))


def compact_metadata(sae: ExpanderSAE, dtype: str, user: dict | None = None,
                     source: dict | None = None) -> dict[str, str]:
    """The ``__metadata__`` strings of a compact file (see docs/FORMAT.md); ``source`` is written
    through ``provenance.shareable``."""
    meta = {
        "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
        "m": str(sae.m), "n": str(sae.n), "d": str(sae.d), "k": str(sae.k),
        "activation": sae.activation, "encoder": sae.encoder,
        "normalize_input": "true" if sae.normalize_input else "false",
        "mask": "explicit" if sae.mask_seed is None else "seed",
        "indices_sha256": indices_sha256(sae.indices.cpu().numpy()),
        "dtype": dtype, "source": _json(shareable(source or {})), "user": _json(user or {}),
    }
    if sae.mask_seed is not None:
        meta["mask_algorithm"] = sae.mask_algorithm or MASK_ALGORITHM
        meta["mask_seed"] = str(sae.mask_seed)
    return meta


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str]) -> None:
    """Write a safetensors file canonically and atomically.

    The header is JSON with sorted keys and no spaces, padded with spaces to a multiple of 8
    bytes; tensors are laid out by element size (largest first), then name, so every tensor is
    aligned to its element size.
    """
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in order:
        tensor = tensors[name].detach().cpu().contiguous()
        blob = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def save_compact(sae: ExpanderSAE, path: str | os.PathLike, dtype: str = "float32",
                 metadata: dict | None = None, source: dict | None = None) -> Path:
    """Write ``sae`` as a compact file storing its values as ``dtype``.

    ``metadata`` is free JSON-serialisable user metadata (e.g. fidelity metrics); ``source`` the
    provenance of the SAE it was made from (written without local paths: ``provenance.shareable``).
    """
    check_choice("storage dtype", dtype, STORAGE_DTYPES)
    _check_finite(Path(path), {n: t for n, t in sae.state_dict().items() if t.is_floating_point()})
    write_safetensors(path, compact_tensors(sae, dtype), compact_metadata(sae, dtype, metadata, source))
    return Path(path)


def with_metrics(user: dict, metrics: dict | None) -> dict:
    """``user`` metadata whose ``metrics`` record (docs/FORMAT.md) is the numbers in ``metrics``:
    fidelity of the model as stored, on held-out activations. ``None`` drops the record (the model
    changed and was not measured again)."""
    out = {key: value for key, value in user.items() if key != "metrics"}
    if metrics:
        out["metrics"] = {key: value for key, value in metrics.items()
                          if isinstance(value, (int, float)) and not isinstance(value, bool)}
    return out


def shareable_copy(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Copy the compact file ``path`` to ``out`` with a shareable ``source`` (files written before
    sources were recorded without local paths); tensors and other metadata are copied unchanged."""
    path = Path(path)
    raw = raw_metadata(path)
    meta = parse_compact_metadata(path, raw)
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    write_safetensors(out, tensors, {**raw, "source": _json(shareable(meta["source"]))})
    return Path(out)


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SaeCompressError(f"{path}: tensor {name} contains NaN or Inf; re-train or re-convert the SAE")


def _dequantized(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    stored = tensors[name]
    if stored.dtype == torch.int8:
        return stored.float() * tensors[f"{name}_scale"][:, None]
    return stored.float()


# --------------------------------------------------------------------------- reading

def load_compact(path: str | os.PathLike) -> ExpanderSAE:
    """Load a compact file as an ``ExpanderSAE`` (float32 values) after every check of
    ``compact_format.read_compact``; the file's facts (storage dtype, source, user metadata) are
    :func:`read_compact_metadata`'s."""
    meta, arrays, indices = read_compact(path)
    m, n, d, dtype = meta["m"], meta["n"], meta["d"], meta["dtype"]
    threshold = torch.from_numpy(np.array(arrays["threshold"])) if "threshold" in arrays else None
    sae = ExpanderSAE(m, n, d, meta["k"], seed=meta.get("mask_seed", 0), activation=meta["activation"],
                      encoder=meta["encoder"], normalize_input=meta["normalize_input"],
                      indices=None if meta["mask"] == "seed" else torch.from_numpy(indices),
                      threshold=threshold)
    with torch.no_grad():
        sae.values.copy_(torch.from_numpy(stored_floats(arrays, "values", dtype)))
        if sae.enc_values is not None:
            sae.enc_values.copy_(torch.from_numpy(stored_floats(arrays, "enc_values", dtype)))
        if "b_enc" in arrays:
            sae.b_enc.copy_(torch.from_numpy(np.array(arrays["b_enc"])))
        sae.b_dec.copy_(torch.from_numpy(np.array(arrays["b_dec"])))
    return sae


@torch.no_grad()
def stored_copy(sae: ExpanderSAE | TopKSAE, dtype: str) -> ExpanderSAE | TopKSAE:
    """A copy of ``sae`` holding the values a compact file of ``dtype`` stores (what ``load_compact`` gives back).

    A dense ``TopKSAE`` gets the same scheme per latent (``W_dec`` rows, ``W_enc`` columns; biases
    float32): the dense SAE stored at ``dtype``, with ``dense_bytes`` bytes of weights.
    """
    check_choice("storage dtype", dtype, STORAGE_DTYPES)
    stored = copy.deepcopy(sae)

    def kept(name: str, rows: torch.Tensor) -> torch.Tensor:  # [n, ·] rows as the file stores them
        return _dequantized(_stored_values(name, rows, dtype), name)

    if isinstance(sae, TopKSAE):
        stored.W_dec.copy_(kept("values", sae.W_dec))
        stored.W_enc.copy_(kept("enc_values", sae.W_enc.T).T)
        return stored
    for name in ("values", "enc_values"):
        if getattr(sae, name) is not None:
            getattr(stored, name).copy_(kept(name, getattr(sae, name)))
    return stored


def compact_size_bound(n: int, m: int, d: int, dtype: str) -> int:
    """Upper bound on a seed-mask compact file's size: ``n·d·bytes(dtype) + 4·(n + m) + 64 KiB``."""
    itemsize = ITEMSIZE[dtype]
    extra = 4 * n if dtype == "int8" else 0  # per-latent int8 scales
    return n * d * itemsize + 4 * (n + m) + extra + 64 * 1024


def dense_bytes(m: int, n: int, dtype: str) -> int:
    """Bytes of a dense TopK SAE's weights stored as ``dtype`` in the compact file's scheme (``stored_copy``):
    ``2·m·n`` values (int8: plus a float32 scale per latent and matrix) and float32 biases; no header."""
    check_choice("storage dtype", dtype, STORAGE_DTYPES)
    itemsize = ITEMSIZE[dtype]
    scales = 2 * 4 * n if dtype == "int8" else 0
    return 2 * m * n * itemsize + scales + 4 * (n + m)


__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "STORAGE_DTYPES", "save_compact", "load_compact",
           "read_compact_metadata", "parse_compact_metadata", "is_compact_file", "write_safetensors", "quantize_int8",
           "compact_size_bound", "dense_bytes", "dense_values", "learned_values", "compression_ratio", "stored_copy",
           "with_metrics"]
