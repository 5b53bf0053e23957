"""Truly sparse autograd functions for training expander SAEs.

An expander SAE's encoder and decoder have ``d`` nonzeros per latent (``indices [n, d]``), so a
training step needs no ``m×n`` matrix at all:

* :class:`SparseEncodeTopK` computes the pre-activations as sparse-CSR × dense products over
  blocks of batch rows (``n·d`` nonzeros times the block, MKL on CPU), picks the top-k under the
  SAE's ordering (``models.select_topk``; for AuxK also the top-k_aux among dead latents), and
  saves only the centred batch and the chosen indices. Its backward touches the ``k (+ k_aux)``
  chosen latents per row: O(B·k·d) work, no ``[B, n]`` gradient.
* :class:`SparseDecode` is a scatter-add of the ``k`` active latents' ``d`` values per row; its
  backward is the matching gather, again O(B·k·d).

Both functions take plain tensors; :func:`sparse_forward` wires them to an ``ExpanderSAE``.

Threshold SAEs train with the same step. **JumpReLU** (Rajamanoharan et al. 2024, "Jumping
Ahead"): the encode returns, per row, the pre-activations of a training cap of candidates (the
latents that fire, ``pre > θ``, largest first, then those just below θ, inside the rectangle
window of width ``bandwidth``); :class:`JumpReLU` gates them (``pre·[pre > θ]``) with the
straight-through pseudo-derivative ``−(θ/ε)·K((pre − θ)/ε)`` wrt θ, and :class:`L0` is the batch
mean of ``Σ_i [pre_i > θ_i]`` with pseudo-derivative ``−(1/ε)·K`` (K: the rectangle kernel), from
per-latent counts the encode takes over all ``n``. **BatchTopK** (Bussmann et al. 2024): the
encode keeps a cap of ``ReLU(pre)`` per row and :func:`batch_topk` keeps the ``B·k`` largest of the
batch. **top-AFA** (Lee et al. 2025): the encode returns the pre-activations of a cap of candidates
ranked by ``ReLU(pre)·‖decoder row‖``; :func:`gated_code` keeps the count its norm-matching rule picks
(``models.afa_kept``), the gradient flowing through the kept ``ReLU(pre)`` as for top-k.
Gradients equal those of the dense masked model (``W = mask ⊙ V``) exactly up to rounding
(checked in float64 by ``tests/test_train.py``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .models import VARIABLE_COUNT, afa_kept, relu_cuts, select_topk, topk_scores

_ROW_BLOCK = 256  # batch rows per CSR product in sparse_pre_activations
BANDWIDTH = 1e-3  # JumpReLU's rectangle window ε at unit mean squared input norm (the papers' scale)


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel K(u) = [|u| < 1/2]."""
    return (u.abs() < 0.5).to(u.dtype)


def threshold_candidates(pre: Tensor, threshold: Tensor, cap: int, bandwidth: float) -> Tensor:
    """``[B, cap]`` latents per row: those firing (``pre > θ``), largest first, then those inside the
    rectangle window below θ (their θ gradient needs them), then any other."""
    theta = threshold.to(pre.dtype)
    score = torch.where(pre > theta, pre, torch.where(pre > theta - bandwidth / 2, -1.0, -2.0))
    return score.topk(cap, dim=-1, sorted=False).indices


def threshold_counts(pre: Tensor, threshold: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
    """``([n] rows where each latent fires, [n] rows where it lies in the rectangle window)``."""
    theta = threshold.to(pre.dtype)
    return (pre > theta).sum(0).to(pre.dtype), rectangle((pre - theta) / bandwidth).sum(0)


class JumpReLU(torch.autograd.Function):
    """``(pre, θ, ε) -> pre·[pre > θ]`` elementwise; the θ gradient is the rectangle pseudo-derivative."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth: float):
        ctx.bandwidth = bandwidth
        ctx.save_for_backward(pre, theta)
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        g_theta = -(theta / ctx.bandwidth) * rectangle((pre - theta) / ctx.bandwidth) * g
        return g * (pre > theta), g_theta, None


class L0(torch.autograd.Function):
    """``(θ [n], fires [n], window [n], rows, ε) -> Σ fires / rows`` (mean L0) with the step
    function's pseudo-derivative ``−window / (ε·rows)`` wrt θ."""

    @staticmethod
    def forward(ctx, theta, fires, window, rows: int, bandwidth: float):
        ctx.scale = -1.0 / (bandwidth * rows)
        ctx.save_for_backward(window)
        return (fires.sum() / rows).to(theta.dtype)

    @staticmethod
    def backward(ctx, g):
        (window,) = ctx.saved_tensors
        return g * ctx.scale * window.to(g.dtype), None, None, None, None


def batch_topk(values: Tensor, k: int) -> Tensor:
    """``values [B, cap]`` with all but the ``B·k`` largest positive ones of the batch zeroed (BatchTopK)."""
    keep = min(values.numel(), values.shape[0] * k)
    cut = values.detach().flatten().topk(keep).values[-1]
    return values * ((values.detach() >= cut) & (values.detach() > 0))


def aux_activation(activation: str) -> str:
    """The ordering AuxK ranks dead latents by: the model's, or ``relu_topk`` for a variable-count SAE
    (a dead latent is below its threshold everywhere)."""
    return "relu_topk" if activation in VARIABLE_COUNT else activation


def training_rule(sae, threshold: Tensor | None, batch_k: int | None) -> tuple[str, Tensor | None]:
    """``(ordering the encode selects by, θ to gate with)`` of a training forward: BatchTopK training
    ranks ``ReLU(pre)``; a threshold SAE is gated by ``threshold``, by default its own (fixed) θ."""
    if batch_k is not None:
        return "relu_topk", None
    if threshold is None and sae.threshold is not None:
        threshold = sae.threshold
    return sae.activation, threshold


def afa_candidates(pre: Tensor, row_norms: Tensor, cap: int) -> Tensor:
    """``[B, cap]`` top-AFA candidates per row: the largest ``ReLU(pre)·row_norms``, in descending order."""
    return topk_scores(pre, "topafa", row_norms=row_norms).topk(cap, dim=-1).indices


def gated_code(top: Tensor, idx: Tensor, rows: int, threshold: Tensor | None, counts: tuple[Tensor, Tensor] | None,
               batch_k: int | None, bandwidth: float,
               afa: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
    """``(code values [B, cap], mean L0 or None)`` from the encode's ``top`` outputs: JumpReLU of the
    candidates' pre-activations with ``threshold``, the BatchTopK of ``batch_k``, top-AFA with
    ``afa = (row_norms [n], target [B])`` (candidates :func:`afa_candidates`), or ``top`` as is."""
    if afa is not None:
        code = torch.relu(top)
        return afa_kept(code, code.detach() * afa[0].to(top.dtype)[idx], afa[1], top.shape[1])[0], None
    if batch_k is not None:
        return batch_topk(top, batch_k), None
    if threshold is None:
        return top, None
    code = JumpReLU.apply(top, threshold.to(top.dtype)[idx], bandwidth)
    return code, L0.apply(threshold, counts[0], counts[1], rows, bandwidth)


def afa_inputs(sae, x: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(row_norms [n], target [B])`` of a top-AFA training forward on ``x [B, m]`` (detached), else None."""
    if sae.activation != "topafa":
        return None
    return sae.row_norms(), (x - sae.b_dec).detach().norm(dim=-1)


@dataclass(frozen=True)
class MaskLayout:
    """CSR layout of an ``[n, d]`` index array (row-sorted columns) reused every step."""

    indices: Tensor  # [n, d] int64, as stored in the model
    crow: Tensor  # [n + 1]
    col: Tensor  # [n * d] column of each CSR entry (sorted within a row)
    order: Tensor | None  # [n * d] position in ``values.flatten()`` of each CSR entry (None: identity)
    m: int

    @classmethod
    def from_indices(cls, indices: Tensor, m: int) -> MaskLayout:
        n, d = indices.shape
        sorted_cols, perm = indices.sort(dim=1)
        order = (perm + torch.arange(n).unsqueeze(1) * d).flatten()
        if torch.equal(order, torch.arange(n * d)):
            order = None
        crow = torch.arange(0, n * d + 1, d, dtype=torch.int64)
        return cls(indices, crow, sorted_cols.flatten().contiguous(), order, m)

    def csr(self, values: Tensor) -> Tensor:
        """The ``[n, m]`` sparse CSR matrix whose row i holds ``values[i]`` at ``indices[i]``."""
        flat = values.detach().reshape(-1)
        if self.order is not None:
            flat = flat[self.order]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            return torch.sparse_csr_tensor(
                self.crow, self.col, flat, (self.indices.shape[0], self.m),
                dtype=values.dtype, check_invariants=False,
            )


def sparse_pre_activations(xc: Tensor, enc_values: Tensor, b_enc: Tensor, layout: MaskLayout) -> Tensor:
    """``[B, n]`` pre-activations ``xc @ W_enc + b_enc`` of a centred batch, no ``m×n`` matrix.

    MKL's CSR product gives latent-major ``[n, rows]`` blocks; each is transposed (with the bias
    added in the same pass) into the row-major output that top-k needs. Blocks of
    ``_ROW_BLOCK`` rows keep the transpose in cache.
    """
    W = layout.csr(enc_values)
    xc, b_enc = xc.detach(), b_enc.detach()
    out = torch.empty(xc.shape[0], W.shape[0], dtype=xc.dtype)
    for start in range(0, xc.shape[0], _ROW_BLOCK):
        block = torch.sparse.mm(W, xc[start:start + _ROW_BLOCK].t())
        torch.add(block.t(), b_enc, out=out[start:start + _ROW_BLOCK])
    return out


class SparseEncodeTopK(torch.autograd.Function):
    """``(x, enc_values, b_enc, b_dec) -> (top_vals, top_idx, aux_vals, aux_idx, fires, window)``.

    ``top_*`` are the k kept pre-activations per row under ``activation`` (``models.select_topk``),
    or with a ``threshold`` the pre-activations of the k :func:`threshold_candidates` (gated later by
    :class:`JumpReLU`) and ``fires, window`` their :func:`threshold_counts` (else empty), or with
    ``row_norms`` (``topafa``) those of the k :func:`afa_candidates` (kept later by :func:`gated_code`); ``aux_*``
    the ``k_aux`` kept among latents flagged in ``dead`` (empty when ``k_aux == 0`` or ``dead`` is
    None), for the AuxK loss. Index outputs and counts are not differentiable.
    """

    @staticmethod
    def forward(ctx, x, enc_values, b_enc, b_dec, layout: MaskLayout, k: int, activation: str,
                dead: Tensor | None, k_aux: int, threshold: Tensor | None = None, bandwidth: float = BANDWIDTH,
                row_norms: Tensor | None = None):
        xc = x - b_dec
        pre = sparse_pre_activations(xc, enc_values, b_enc, layout)
        fires = window = x.new_zeros(0)
        if row_norms is not None:
            top_idx = afa_candidates(pre, row_norms, k)
            top_vals = pre.gather(1, top_idx)
        elif threshold is not None:
            top_idx = threshold_candidates(pre, threshold, k, bandwidth)
            top_vals = pre.gather(1, top_idx)
            fires, window = threshold_counts(pre, threshold, bandwidth)
        else:
            top_vals, top_idx = select_topk(pre, k, activation, sorted=False)
        if dead is not None and k_aux > 0 and bool(dead.any()):
            k_aux = min(k_aux, int(dead.sum()))
            aux_vals, aux_idx = select_topk(pre, k_aux, aux_activation(activation), sorted=False, among=dead)
            aux_vals = torch.nan_to_num(aux_vals, neginf=0.0)
        else:
            aux_vals = x.new_zeros(x.shape[0], 0)
            aux_idx = torch.zeros(x.shape[0], 0, dtype=torch.int64)
        del pre
        ctx.layout = layout
        # a ReLU before or after top-k cuts the gradient of values it zeroed (JumpReLU, top-AFA gate outside)
        ctx.relu = (threshold is None and row_norms is None and relu_cuts(activation),
                    relu_cuts(aux_activation(activation)))
        ctx.x_requires_grad = x.requires_grad
        ctx.save_for_backward(xc, enc_values, top_vals, top_idx, aux_vals, aux_idx)
        ctx.mark_non_differentiable(top_idx, aux_idx, fires, window)
        return top_vals, top_idx, aux_vals, aux_idx, fires, window

    @staticmethod
    def backward(ctx, g_top, _g_top_idx, g_aux, _g_aux_idx, _g_fires, _g_window):
        xc, enc_values, top_vals, top_idx, aux_vals, aux_idx = ctx.saved_tensors
        if g_top is None:
            g_top = torch.zeros_like(top_vals)
        if g_aux is None:
            g_aux = torch.zeros_like(aux_vals)
        if ctx.relu[0]:
            g_top = g_top * (top_vals > 0)
        if ctx.relu[1]:
            g_aux = g_aux * (aux_vals > 0)
        g = torch.cat([g_top, g_aux], dim=1)
        lat = torch.cat([top_idx, aux_idx], dim=1)  # [B, K]
        B, K = lat.shape
        d = enc_values.shape[1]
        rows = ctx.layout.indices[lat].view(B, K * d)  # input dims each chosen latent reads
        flat_lat = lat.reshape(-1)
        need_values, need_b_enc, need_b_dec = ctx.needs_input_grad[1:4]
        g_values = g_b_enc = g_b_dec = g_x = None
        if need_values:
            xg = xc.gather(1, rows).view(B, K, d)
            g_values = torch.zeros_like(enc_values).index_add_(
                0, flat_lat, (g.unsqueeze(-1) * xg).view(-1, d))
        if need_b_enc:
            g_b_enc = torch.zeros(enc_values.shape[0], dtype=g.dtype).index_add_(0, flat_lat, g.reshape(-1))
        if need_b_dec or ctx.x_requires_grad:
            contrib = (g.unsqueeze(-1) * enc_values[lat]).view(B, K * d)
            g_xc = torch.zeros_like(xc).scatter_add_(1, rows, contrib)
            g_b_dec = -g_xc.sum(0) if need_b_dec else None
            g_x = g_xc if ctx.x_requires_grad else None
        return g_x, g_values, g_b_enc, g_b_dec, None, None, None, None, None, None, None, None


class SparseDecode(torch.autograd.Function):
    """``(z [B,k], lat [B,k], values [n,d], b_dec [m] or None) -> [B, m]``: scatter-add decode."""

    @staticmethod
    def forward(ctx, z, lat, values, b_dec, layout: MaskLayout):
        B, k = lat.shape
        d = values.shape[1]
        cols = layout.indices[lat].view(B, k * d)
        contrib = (z.unsqueeze(-1) * values[lat]).view(B, k * d)
        out = z.new_zeros(B, layout.m) if b_dec is None else b_dec.detach().expand(B, -1).clone()
        out.scatter_add_(1, cols, contrib)
        ctx.layout = layout
        ctx.has_bias = b_dec is not None
        ctx.save_for_backward(z, lat, values)
        return out

    @staticmethod
    def backward(ctx, g_out):
        z, lat, values = ctx.saved_tensors
        B, k = lat.shape
        d = values.shape[1]
        cols = ctx.layout.indices[lat].view(B, k * d)
        gx = g_out.gather(1, cols).view(B, k, d)
        g_z = g_values = g_b = None
        if ctx.needs_input_grad[0]:
            g_z = (gx * values[lat]).sum(-1)
        if ctx.needs_input_grad[2]:
            g_values = torch.zeros_like(values).index_add_(0, lat.reshape(-1), (z.unsqueeze(-1) * gx).view(-1, d))
        if ctx.has_bias and ctx.needs_input_grad[3]:
            g_b = g_out.sum(0)
        return g_z, None, g_values, g_b, None


@dataclass
class SparseForward:
    """One training forward pass: reconstruction, the sparse code and (optional) AuxK parts."""

    recon: Tensor  # [B, m]
    top_vals: Tensor  # [B, k]: the code's values (0 in slots of latents that do not fire)
    top_idx: Tensor  # [B, k]
    aux_recon: Tensor | None  # [B, m] decode of the top-k_aux dead latents, without b_dec
    l0: Tensor | None = None  # JumpReLU: the batch's mean L0, differentiable wrt the threshold


def sparse_forward(sae, x: Tensor, layout: MaskLayout, dead: Tensor | None = None, k_aux: int = 0, *,
                   threshold: Tensor | None = None, batch_k: int | None = None,
                   bandwidth: float = BANDWIDTH) -> SparseForward:
    """Differentiable ExpanderSAE forward on ``x [B, m]`` (already in the SAE's input space).

    Gradients reach ``values`` (and ``enc_values`` when untied), ``b_enc`` and ``b_dec`` through
    the sparse functions above only. A threshold SAE is gated by ``threshold`` (``θ [n]``; default
    its own buffer; a learned θ gets the JumpReLU pseudo-gradients) over ``sae.k`` candidates per
    row; ``batch_k`` trains BatchTopK instead (``sae.k`` ReLU candidates per row, ``B·batch_k`` kept);
    ``topafa`` keeps what its rule picks among ``sae.k`` candidates per row.
    """
    activation, threshold = training_rule(sae, threshold, batch_k)
    afa = afa_inputs(sae, x)
    top, top_idx, aux_vals, aux_idx, fires, window = SparseEncodeTopK.apply(
        x, sae.encoder_values, sae.b_enc, sae.b_dec, layout, sae.k, activation, dead, k_aux,
        None if threshold is None else threshold.detach(), bandwidth, None if afa is None else afa[0])
    code, l0 = gated_code(top, top_idx, x.shape[0], threshold, (fires, window), batch_k, bandwidth, afa)
    recon = SparseDecode.apply(code, top_idx, sae.values, sae.b_dec, layout)
    aux_recon = None
    if aux_idx.shape[1] > 0:
        aux_recon = SparseDecode.apply(aux_vals, aux_idx, sae.values, None, layout)
    return SparseForward(recon, code, top_idx, aux_recon, l0)
