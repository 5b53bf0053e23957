"""EleutherAI sparsify hookpoint folders: ``cfg.json`` + ``sae.safetensors``.

A repo holds one such folder per hookpoint (``layers.0/``, ``layers.1/`` …). Math
(``sparsify.SparseCoder``)::

    pre = ReLU((x - b_dec) @ encoder.weightᵀ + encoder.bias)     # ReLU first,
    z   = top-k(pre)                                             # then TopK
    x̂   = Σ z_i W_dec[i] + b_dec

Tensors: ``encoder.weight [n, d_in]``, ``encoder.bias [n]``, ``W_dec [n, d_in]``, ``b_dec [d_in]``.
cfg: ``d_in``, ``k``, ``num_latents`` (0 ⇒ ``d_in * expansion_factor``), ``activation``
(``topk``; ``groupmax`` refused), ``transcode`` / ``skip_connection`` (refused), and in old
(``EleutherAI/sae``) repos ``signed`` (top-k by |pre|: refused).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from .._io import atomic_path, output_errors
from .._json import dumps
from ..errors import SaeCompressError
from ..models import TopKSAE
from ._common import build_dense, int_value, read_json, read_safetensors, refuse, source_dtype, tensor

CFG = "cfg.json"
WEIGHTS = "sae.safetensors"


def matches(folder: Path) -> bool:
    """Whether ``folder`` holds one sparsify hookpoint."""
    return (folder / CFG).is_file() and (folder / WEIGHTS).is_file()


def _model_name(folder: Path) -> str | None:
    """The LM name from the training run's ``config.json`` one level up, when present."""
    run_cfg = folder.parent / "config.json"
    if not run_cfg.is_file():
        return None
    try:
        model = read_json(run_cfg).get("model")
    except SaeCompressError:
        return None
    return model if isinstance(model, str) else None


def read(folder: Path, hookpoint: str | None = None) -> tuple[TopKSAE, dict[str, Any]]:
    """Load the sparsify sparse coder in ``folder`` as a ``TopKSAE``, and its provenance."""
    cfg_path, weights_path = folder / CFG, folder / WEIGHTS
    cfg = read_json(cfg_path)
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise refuse(cfg_path, f"activation {activation!r} is not TopK")
    if cfg.get("signed"):
        raise refuse(cfg_path, "signed=true selects the top-k by |pre-activation|, which saecompress does not model")
    for flag in ("transcode", "skip_connection", "embed_skip", "gram_lookup"):
        if cfg.get(flag):
            raise refuse(cfg_path, f"{flag}=true (not a plain autoencoder)")
    d_in = int_value(cfg.get("d_in"), "cfg d_in", cfg_path)
    k = int_value(cfg.get("k"), "cfg k", cfg_path)
    expansion = int_value(cfg.get("expansion_factor", 32), "expansion_factor", cfg_path)
    n = int_value(cfg.get("num_latents") or d_in * expansion, "num_latents", cfg_path)

    sd = read_safetensors(weights_path)
    if "W_skip" in sd:
        raise refuse(weights_path, "it has a skip connection (W_skip)")
    enc = tensor(sd, "encoder.weight", weights_path, (n, d_in))
    bias = tensor(sd, "encoder.bias", weights_path, (n,))
    W_dec = tensor(sd, "W_dec", weights_path, (n, d_in))
    b_dec = tensor(sd, "b_dec", weights_path, (d_in,))
    return build_dense(
        W_enc=enc.T, W_dec=W_dec, b_enc=bias, b_dec=b_dec, k=k, activation="relu_topk",
        provenance={
            "library": "sparsify",
            "path": str(folder),
            "hookpoint": hookpoint or folder.name,
            "model_name": _model_name(folder),
            "source_dtype": source_dtype(sd),
        },
    )


def save(sae: TopKSAE, folder: str | os.PathLike) -> Path:
    """Write a ReLU-then-TopK ``sae`` (no layer norm, no threshold) as a sparsify hookpoint folder that sparsify's
    ``SparseCoder.load_from_disk`` and :func:`read` load."""
    if sae.activation not in ("relu_topk", "topk_relu") or sae.normalize_input:
        raise SaeCompressError(f"sparsify holds ReLU-then-TopK SAEs without layer norm; this one is {sae.activation}"
                               f"{' with layer norm' if sae.normalize_input else ''}")
    folder = Path(folder)
    with output_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    cfg = {"activation": "topk", "expansion_factor": max(1, sae.n // sae.m), "normalize_decoder": True,
           "num_latents": sae.n, "k": sae.k, "multi_topk": False, "skip_connection": False, "transcode": False,
           "d_in": sae.m}
    tensors = {"encoder.weight": sae.W_enc.detach().T.float().contiguous(),
               "encoder.bias": sae.b_enc.detach().float().contiguous(),
               "W_dec": sae.W_dec.detach().float().contiguous(), "b_dec": sae.b_dec.detach().float().contiguous()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(folder / CFG) as tmp:
        tmp.write_text(dumps(cfg, indent=2))
    return folder
