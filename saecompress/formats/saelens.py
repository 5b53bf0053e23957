"""SAELens folders: ``cfg.json`` + ``sae_weights.safetensors`` (read, and written by ``save_dense``).

Math (``sae_lens.saes.topk_sae.TopKSAE``)::

    x'  = layer_norm(x) if normalize_activations == "layer_norm" else x
    pre = (x' - b_dec * apply_b_dec_to_input) @ W_enc + b_enc
    z   = ReLU(top-k(pre))                                    # TopK, then ReLU on kept values
    z   = ReLU(pre) * (pre > threshold)                       # architecture "jumprelu" instead
    x̂'  = z @ W_dec + b_dec   (un-normalised afterwards)

``architecture: "jumprelu"`` (SAELens 5 and 6) carries ``threshold [d_sae]``; BatchTopK and
Matryoshka BatchTopK SAEs are saved that way with their global threshold repeated
(``metadata.training_architecture``, kept in the provenance): they read as ``batchtopk``, every
other one as ``jumprelu``, with ``k = d_sae``. Matryoshka latents keep their order.

SAELens ≥ 6 writes ``architecture: "topk"`` and ``k``; configs before 6.0 write
``activation_fn`` (or ``activation_fn_str``) ``"topk"`` with ``activation_fn_kwargs.k``.
Folded losslessly into the ``TopKSAE`` conventions: ``apply_b_dec_to_input: false``
(``b_enc -= b_dec @ W_enc``), a v5 ``scaling_factor`` tensor (finetuning scale, into ``W_dec``
rows), ``rescale_acts_by_decoder_norm`` (norms into the encoder, unit-norm decoder rows) and
``normalize_activations: "expected_average_only_in"`` when the config carries the dataset's
``norm_scaling_factor`` (folded so that the pre-activations, and so the thresholds, stay the same).

``architecture: "topafa"`` (with ``k``, its cap) is saecompress's own, written by ``save_dense`` for a
dense top-AFA SAE and read back here; SAELens itself does not load it.
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
from ..provenance import shareable
from ._common import build_dense, int_value, read_json, read_safetensors, refuse, source_dtype, tensor

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
_TOPK_ARCHITECTURES = ("topk", "topafa")
_REFUSED = {
    "batchtopk": "a BatchTopK training SAE (save it for inference: SAELens writes it as 'jumprelu')",
    "matryoshka_batchtopk": "a Matryoshka BatchTopK training SAE (save it for inference: SAELens writes it "
                            "as 'jumprelu')",
    "gated": "a gated SAE",
    "standard": "a standard ReLU SAE",
    "transcoder": "a transcoder",
}


def matches(folder: Path) -> bool:
    """Whether ``folder`` holds a SAELens SAE."""
    return (folder / CFG).is_file() and (folder / WEIGHTS).is_file()


def _k_and_architecture(cfg: dict, where: Path) -> int | None:
    """``k`` of a TopK SAE, ``None`` for a JumpReLU one; refuses every other architecture."""
    architecture = cfg.get("architecture")
    activation_fn = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    if architecture == "jumprelu":
        return None
    if architecture in _TOPK_ARCHITECTURES or (architecture in (None, "standard") and activation_fn == "topk"):
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))  # SAELens < 6: activation_fn_kwargs
        return int_value(k, "k (cfg k or activation_fn_kwargs.k)", where)
    if architecture in _REFUSED:
        raise refuse(where, f"architecture {architecture!r} is {_REFUSED[architecture]}")
    if architecture is None and activation_fn is None:
        raise SaeCompressError(f"{where}: neither 'architecture' nor 'activation_fn' is set; not a SAELens cfg.json")
    raise refuse(where, f"architecture {architecture!r} / activation_fn {activation_fn!r} is not TopK")


def read(folder: Path, hookpoint: str | None = None) -> tuple[TopKSAE, dict[str, Any]]:
    """Load the SAELens TopK or JumpReLU SAE in ``folder`` as a ``TopKSAE``, and its provenance."""
    cfg_path, weights_path = folder / CFG, folder / WEIGHTS
    cfg = read_json(cfg_path)
    k = _k_and_architecture(cfg, cfg_path)
    sd = read_safetensors(weights_path)
    d_in = int_value(cfg.get("d_in"), "cfg d_in", cfg_path)
    d_sae = int_value(cfg.get("d_sae"), "cfg d_sae", cfg_path)
    W_enc = tensor(sd, "W_enc", weights_path, (d_in, d_sae))
    W_dec = tensor(sd, "W_dec", weights_path, (d_sae, d_in))
    b_enc = tensor(sd, "b_enc", weights_path, (d_sae,))
    b_dec = tensor(sd, "b_dec", weights_path, (d_in,))
    threshold = None if k is not None else tensor(sd, "threshold", weights_path, (d_sae,))

    normalize = cfg.get("normalize_activations") or "none"
    if normalize == "expected_average_only_in":
        factor = cfg.get("norm_scaling_factor")
        if not isinstance(factor, (int, float)) or factor <= 0:
            raise SaeCompressError(
                f"{cfg_path}: normalize_activations='expected_average_only_in' needs the dataset scaling "
                "factor, which this folder does not store; fold it first (SAELens "
                "fold_activation_norm_scaling_factor) and re-save, or add 'norm_scaling_factor' to cfg.json"
            )
        # SAE input is factor * x: pre = (x - b_dec/f) (f W_enc) + b_enc; x̂ = z (W_dec/f) + b_dec/f.
        W_enc, W_dec, b_dec = W_enc * factor, W_dec / factor, b_dec / factor
    elif normalize not in ("none", "layer_norm"):
        raise SaeCompressError(
            f"{cfg_path}: normalize_activations={normalize!r} rescales each input by its own norm, which a "
            "TopKSAE cannot express; supported: 'none', 'layer_norm', 'expected_average_only_in'"
        )
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise SaeCompressError(
            f"{cfg_path}: reshape_activations={cfg['reshape_activations']!r} (hook_z SAEs) is not supported"
        )
    if "scaling_factor" in sd:  # SAELens < 6 finetuning scale: decode uses (z * s) @ W_dec
        W_dec = W_dec * tensor(sd, "scaling_factor", weights_path, (d_sae,))[:, None]
    if cfg.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.norm(dim=1).clamp_min(1e-12)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
        threshold = None if threshold is None else threshold * norms  # the pre-activations scale with them
    if cfg.get("apply_b_dec_to_input", True) is False:
        b_enc = b_enc + b_dec @ W_enc

    meta = cfg.get("metadata") or cfg.get("meta") or {}
    training = meta.get("training_architecture")
    activation = "topafa" if cfg.get("architecture") == "topafa" else "topk_relu"
    if threshold is not None:
        global_threshold = bool((threshold == threshold[0]).all())
        activation = "batchtopk" if "batchtopk" in str(training) and global_threshold else "jumprelu"
    details = meta.get("training_architecture_details") or {}
    if threshold is not None and meta.get("max_l0") is not None:  # written by save_dense: the known cap
        k = int_value(meta["max_l0"], "metadata max_l0", cfg_path)
    return build_dense(
        W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec, k=k, activation=activation, threshold=threshold,
        normalize_input=normalize == "layer_norm",
        provenance={
            "library": "saelens",
            "path": str(folder),
            "hookpoint": hookpoint or meta.get("hook_name") or cfg.get("hook_name"),
            "hook_name": meta.get("hook_name") or cfg.get("hook_name"),
            "model_name": meta.get("model_name") or cfg.get("model_name"),
            "architecture": cfg.get("architecture") or "topk",
            "source_dtype": source_dtype(sd),
            "sae_lens_version": meta.get("sae_lens_version") or cfg.get("sae_lens_version"),
            "training_architecture": training,
            "matryoshka_widths": details.get("matryoshka_widths"),
        },
    )


def save_dense(sae: TopKSAE, folder: str | os.PathLike, metadata: dict | None = None,
               source: dict | None = None, library: dict | None = None) -> Path:
    """Write ``sae`` as a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) that :func:`read` loads back;
    ``metadata`` goes under ``cfg.json``'s ``metadata.saecompress``, beside the scalar facts of ``source``
    (the provenance of the SAE it was made from, through ``provenance.shareable``) and ``library`` (SAELens's
    own metadata fields, such as ``model_name`` and ``hook_name``)."""
    folder = Path(folder)
    with output_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    kind = ({"architecture": "topafa" if sae.activation == "topafa" else "topk", "k": sae.k}
            if sae.threshold is None else {"architecture": "jumprelu"})
    training = {"training_architecture": "batchtopk"} if sae.activation == "batchtopk" else {}
    if sae.threshold is not None and sae.k < sae.n:  # the cap on active latents, read back by read()
        training["max_l0"] = sae.k
    cfg = {**kind, "d_in": sae.m, "d_sae": sae.n,
           "normalize_activations": "layer_norm" if sae.normalize_input else "none",
           "apply_b_dec_to_input": True, "dtype": "float32",
           "metadata": {"saecompress": metadata or {}, **training, **{k: v for k, v in shareable(source or {}).items()
                                                          if isinstance(v, (str, int, float))}, **(library or {})}}
    tensors = {name: getattr(sae, name).detach().float().contiguous()
               for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold.detach().float().contiguous()
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(folder / CFG) as tmp:
        tmp.write_text(dumps(cfg, indent=2))
    return folder
