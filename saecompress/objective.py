"""What one optimizer step computes, for either model: the differentiable forward, the FVU loss,
the unit-norm decoder constraint and the learning-rate schedule (``train`` and ``finetune`` share them).

The forward of an ``ExpanderSAE`` goes through the truly sparse ops of ``sparse_ops.py``; a dense
``TopKSAE`` (the baseline) uses ordinary autograd. Both return a ``SparseForward`` and pick
latents with ``models.select_topk``, or for threshold SAEs with the JumpReLU / BatchTopK training
rules of ``sparse_ops.py`` (one spelling of their pseudo-gradients for both models). A pursuit-encoded
expander picks by ``models.pursue``, whose codes are differentiable in the decoder values and ``b_dec``.
"""

from __future__ import annotations

import math

import torch

from .models import SparseAutoencoder, TopKSAE, pursue, select_topk, unit_rows
from .sparse_ops import (BANDWIDTH, MaskLayout, SparseDecode, SparseForward, afa_candidates, afa_inputs, aux_activation,
                         gated_code, sparse_forward, threshold_candidates, threshold_counts, training_rule)

DECAYS = ("cosine", "linear", "constant")


def fvu_loss(target: torch.Tensor, recon: torch.Tensor, variance: torch.Tensor | None = None) -> torch.Tensor:
    """Batch FVU: squared error over the batch's total variance (the training objective); ``variance``: that
    total when the batch is larger than ``target`` (a data-parallel rank's part of it)."""
    if variance is None:
        variance = (target - target.mean(0)).pow(2).sum()
    return (recon - target).pow(2).sum() / variance.clamp_min(1e-12)


def dense_forward(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor | None, k_aux: int, *,
                  threshold: torch.Tensor | None = None, batch_k: int | None = None,
                  bandwidth: float = BANDWIDTH) -> SparseForward:
    """The dense baseline's forward (ordinary autograd, m×n matmul) with the same outputs
    (``threshold``, ``batch_k``: as for ``sparse_ops.sparse_forward``)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    activation, threshold = training_rule(sae, threshold, batch_k)
    counts = None
    afa = afa_inputs(sae, x)
    if afa is not None:
        top_idx = afa_candidates(pre.detach(), afa[0], sae.k)
        top = pre.gather(1, top_idx)
    elif threshold is not None:
        top_idx = threshold_candidates(pre.detach(), threshold.detach(), sae.k, bandwidth)
        top = pre.gather(1, top_idx)
        counts = threshold_counts(pre.detach(), threshold.detach(), bandwidth)
    else:
        top, top_idx = select_topk(pre, sae.k, activation)
    code, l0 = gated_code(top, top_idx, x.shape[0], threshold, counts, batch_k, bandwidth, afa)
    recon = sae.decode(code, top_idx)
    aux = None
    if dead is not None and k_aux > 0 and bool(dead.any()):
        aux_vals, aux_idx = select_topk(pre, min(k_aux, int(dead.sum())), aux_activation(activation), among=dead)
        aux_vals = torch.nan_to_num(aux_vals, neginf=0.0)
        aux = torch.zeros_like(pre).scatter(1, aux_idx, aux_vals) @ sae.W_dec
    return SparseForward(recon, code, top_idx, aux, l0)


def training_forward(sae: SparseAutoencoder, x: torch.Tensor, layout: MaskLayout | None,
                     dead: torch.Tensor | None = None, k_aux: int = 0, *, threshold: torch.Tensor | None = None,
                     batch_k: int | None = None, bandwidth: float = BANDWIDTH) -> SparseForward:
    """Differentiable forward of either model on ``x`` in its input space (sparse ops for expanders).

    A threshold SAE is gated by ``threshold`` (default: its buffer, fixed) over ``sae.k`` candidates
    per row; ``batch_k`` trains BatchTopK (``B·batch_k`` kept per batch). A pursuit-encoded SAE has no
    AuxK term (``dead``, ``k_aux`` unused): its latents compete through the decoder alone."""
    if getattr(sae, "encoder", None) == "pursuit":
        code, top_idx = pursue(x - sae.b_dec, sae.values, sae.indices, sae.k, sae.activation)
        return SparseForward(SparseDecode.apply(code, top_idx, sae.values, sae.b_dec, layout), code, top_idx, None)
    if layout is not None:
        return sparse_forward(sae, x, layout, dead, k_aux, threshold=threshold, batch_k=batch_k,
                              bandwidth=bandwidth)
    return dense_forward(sae, x, dead, k_aux, threshold=threshold, batch_k=batch_k, bandwidth=bandwidth)


@torch.no_grad()
def remove_parallel_grad(sae: SparseAutoencoder) -> None:
    """Project out of each decoder row's gradient its component along the (unit) row."""
    w = sae.decoder_rows
    if w.grad is not None:
        unit = unit_rows(w)
        w.grad -= (w.grad * unit).sum(1, keepdim=True) * unit


@torch.no_grad()
def normalize_decoder(sae: SparseAutoencoder) -> None:
    """Rescale each decoder row to unit L2 norm (tied expander encoders follow)."""
    w = sae.decoder_rows
    w.copy_(unit_rows(w))


def lr_factor(step: int, total: int, *, warmup: int = 0, decay: str = "cosine", final: float = 0.0) -> float:
    """Multiplier of the base learning rate at ``step`` of ``total``: linear warm-up over
    ``warmup`` steps, then ``decay`` (cosine, linear or constant) down to ``final``."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    if decay == "cosine":
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))
    if decay == "linear":
        return 1 - (1 - final) * t
    return 1.0
