"""Helpers the format readers share: safe file loading, shape checks, building a dense ``TopKSAE``.

Every reader returns ``(model, provenance)``: the model, and where it came from (``library``, the
local ``path``, ``hookpoint``, ``source_dtype`` …) beside it; models carry no file state."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import SaeCompressError, first_line
from ..models import TopKSAE


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; SaeCompressError if missing or malformed."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SaeCompressError(f"{path}: file not found; the SAE folder is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaeCompressError(f"{path}: not valid JSON ({e}); re-download or re-save the config") from None
    if not isinstance(data, dict):
        raise SaeCompressError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (CPU); SaeCompressError if missing or corrupt."""
    if not path.is_file():
        raise SaeCompressError(f"{path}: file not found; the SAE folder is incomplete")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise SaeCompressError(
            f"{path}: not a readable safetensors file ({e}); re-download or re-save it"
        ) from None


def read_torch(path: Path) -> dict[str, Any]:
    """A ``torch.save``d dict, loaded with ``weights_only=True`` (no code runs)."""
    if not path.is_file():
        raise SaeCompressError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():  # torch warns about any pickle protocol but 2; it is only a note
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) checkpoints cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated, foreign or unsafe pickles
        raise SaeCompressError(
            f"{path}: cannot be read as a torch state dict with weights_only=True ({type(e).__name__}: "
            f"{first_line(e)}); only plain tensor checkpoints are supported"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SaeCompressError(f"{path}: expected a state dict, found a {type(obj).__name__}")
    return obj


def tensor(sd: dict[str, Any], name: str, where: Path, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``sd[name]`` as a float32 tensor (lossless from bf16/f16), checked for presence, shape, NaN."""
    if name not in sd:
        found = ", ".join(sorted(str(k) for k in sd)[:12])
        raise SaeCompressError(f"{where}: tensor {name!r} is missing (found: {found}); not a complete SAE checkpoint")
    value = sd[name]
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        raise SaeCompressError(f"{where}: {name!r} is not a floating-point tensor")
    if shape is not None and tuple(value.shape) != shape:
        raise SaeCompressError(
            f"{where}: {name!r} has shape {tuple(value.shape)}, expected {shape}; the weights do not match the config"
        )
    value = value.to(torch.float32)
    if not bool(torch.isfinite(value).all()):
        raise SaeCompressError(f"{where}: {name!r} contains NaN or inf; the checkpoint is corrupt")
    return value


def dims_of(sd: dict[str, Any], name: str, where: Path, ndim: int) -> tuple[int, ...]:
    """The shape of ``sd[name]`` (checked to have ``ndim`` dims), before any config is consulted."""
    value = sd.get(name)
    if not isinstance(value, torch.Tensor):
        found = ", ".join(sorted(str(k) for k in sd)[:12])
        raise SaeCompressError(f"{where}: tensor {name!r} is missing (found: {found}); not a complete SAE checkpoint")
    if value.ndim != ndim:
        raise SaeCompressError(f"{where}: {name!r} has shape {tuple(value.shape)}, expected {ndim} dims")
    return tuple(value.shape)


def source_dtype(sd: dict[str, Any]) -> str:
    """The dtype name of the first floating tensor (``bfloat16``, ``float32`` …)."""
    for value in sd.values():
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
            return str(value.dtype).removeprefix("torch.")
    return "unknown"


def int_value(value: Any, what: str, where: Path) -> int:
    """``value`` (int, float with no fraction, or 0-d tensor) as a positive int."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SaeCompressError(f"{where}: {what} must be a positive integer, got {value!r}")
    return value


def build_dense(
    *, W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int | None,
    activation: str, normalize_input: bool = False, threshold: torch.Tensor | None = None,
    provenance: dict[str, Any],
) -> tuple[TopKSAE, dict[str, Any]]:
    """A float32 ``TopKSAE`` from weights already folded into its conventions, and its ``provenance``
    without the unknown (``None``) entries.

    ``W_enc [m, n]``, ``W_dec [n, m]``; the encoder subtracts ``b_dec`` (fold it into ``b_enc``
    first when the source does not). Threshold activations take ``threshold [n]`` and ``k=None``
    (``k = n``: every latent above its threshold is kept).
    """
    m, n = W_enc.shape
    k = n if k is None else k
    if k > n:
        raise SaeCompressError(f"{provenance.get('path')}: k={k} exceeds the number of latents n={n}")
    sae = TopKSAE(m, n, k, activation=activation, normalize_input=normalize_input, threshold=threshold)
    with torch.no_grad():
        sae.W_enc.data = W_enc.to(torch.float32).contiguous()
        sae.W_dec.data = W_dec.to(torch.float32).contiguous()
        sae.b_enc.data = b_enc.to(torch.float32).contiguous()
        sae.b_dec.data = b_dec.to(torch.float32).contiguous()
    return sae, known(provenance)


def known(facts: dict[str, Any]) -> dict[str, Any]:
    """``facts`` without the entries whose value is ``None`` (what a reader could not find out)."""
    return {key: value for key, value in facts.items() if value is not None}


def refuse(where: Path, what: str) -> SaeCompressError:
    """The error for a source that is neither a TopK nor a threshold (JumpReLU / BatchTopK) SAE."""
    return SaeCompressError(
        f"{where}: {what}; saecompress reads TopK and threshold (JumpReLU, BatchTopK, Matryoshka) SAEs only "
        "(ReLU/L1, gated and transcoder checkpoints are not supported)"
    )
