"""Sparse training step (gradients vs a dense masked reference), trainer, distillation, resume."""

from __future__ import annotations

import pytest
import torch

from saecompress.models import ExpanderSAE
from saecompress.sparse_ops import MaskLayout, sparse_forward


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _dense_masked_loss(sae: ExpanderSAE, V, EV, b_enc, b_dec, x, target, dead, k_aux):
    """The paper's computation: W = mask ⊙ V as an n×m dense matrix, dense matmuls, dense top-k."""
    n, m = sae.n, sae.m
    W_dec = torch.zeros(n, m, dtype=x.dtype).scatter(1, sae.indices, V)
    W_enc = torch.zeros(n, m, dtype=x.dtype).scatter(1, sae.indices, EV).T
    pre = (x - b_dec) @ W_enc + b_enc
    relu = sae.activation != "signed_topk"
    vals, idx = pre.topk(sae.k, dim=-1)
    vals = vals.clamp_min(0) if relu else vals
    z = torch.zeros_like(pre).scatter(1, idx, vals)
    recon = z @ W_dec + b_dec
    loss = (recon - target).pow(2).sum()
    if k_aux:
        aux_vals, aux_idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
        aux_vals = aux_vals.clamp_min(0) if relu else aux_vals
        z_aux = torch.zeros_like(pre).scatter(1, aux_idx, aux_vals)
        loss = loss + 0.5 * (z_aux @ W_dec - (target - recon.detach())).pow(2).sum()
    return loss


@pytest.mark.parametrize("encoder", ["tied", "untied"])
@pytest.mark.parametrize("activation", ["signed_topk", "topk_relu"])
def test_sparse_gradients_match_dense_masked_reference(encoder, activation):
    torch.manual_seed(0)
    m, n, d, k, B, k_aux = 24, 96, 5, 6, 40, 8
    sae = ExpanderSAE(m, n, d, k, seed=3, encoder=encoder, activation=activation).double()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.5)
    x = torch.randn(B, m, dtype=torch.float64)
    target = torch.randn(B, m, dtype=torch.float64)
    dead = torch.rand(n) < 0.3
    layout = MaskLayout.from_indices(sae.indices, m)

    out = sparse_forward(sae, x, layout, dead, k_aux)
    loss = (out.recon - target).pow(2).sum()
    loss = loss + 0.5 * (out.aux_recon - (target - out.recon.detach())).pow(2).sum()
    params = [sae.values, sae.b_enc, sae.b_dec] + ([sae.enc_values] if encoder == "untied" else [])
    grads = torch.autograd.grad(loss, params)

    V = sae.values.detach().clone().requires_grad_()
    EV = V if encoder == "tied" else sae.enc_values.detach().clone().requires_grad_()
    b_enc = sae.b_enc.detach().clone().requires_grad_()
    b_dec = sae.b_dec.detach().clone().requires_grad_()
    ref_loss = _dense_masked_loss(sae, V, EV, b_enc, b_dec, x, target, dead, k_aux)
    ref_params = [V, b_enc, b_dec] + ([EV] if encoder == "untied" else [])
    ref_grads = torch.autograd.grad(ref_loss, ref_params)

    assert abs(float(loss.detach()) - float(ref_loss.detach())) <= 1e-12 * float(ref_loss.detach())
    for name, g, r in zip(["values", "b_enc", "b_dec", "enc_values"], grads, ref_grads):
        assert float(r.norm()) > 0, name
        assert _rel_err(g, r) < 1e-10, name
    # the sparse code equals the model's own (chunked) encoder
    ref_vals, ref_idx = sae.encode(x)
    code = torch.zeros(B, n, dtype=x.dtype).scatter(1, out.top_idx, out.top_vals)
    assert _rel_err(code, torch.zeros(B, n, dtype=x.dtype).scatter(1, ref_idx, ref_vals)) < 1e-12
