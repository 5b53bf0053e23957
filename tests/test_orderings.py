"""One top-k definition per ordering: every spelling (chunked encode, sparse training ops, dense
training forward, ONNX graphs) keeps the same latents and values as ``models.select_topk``, which
in turn matches a float64 statement of each ordering.

Rows where the k-th and (k+1)-th scores nearly tie are left out of the index comparison (float32
rounding may swap them); under ``relu_topk`` the latents kept with value 0 are arbitrary, so only
the codes (values at their latents) are compared there.
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from saecompress.exporters.onnx import build_onnx, read_onnx_metadata
from saecompress.models import ACTIVATIONS, ExpanderSAE, select_topk
from saecompress.objective import dense_forward
from saecompress.sparse_ops import MaskLayout, sparse_forward

M, D, K, ROWS = 32, 4, 8, 4096  # ROWS x n pre-activations exceed one encode chunk: the running merge runs
MARGIN = 1e-3


def make_sae(n: int, activation: str) -> ExpanderSAE:
    torch.manual_seed(0)
    sae = ExpanderSAE(M, n, D, K, seed=1, activation=activation, encoder="untied")
    with torch.no_grad():
        sae.b_enc.normal_(-3.0, 0.5)  # most latents negative: many rows have fewer than k positive
        sae.b_dec.normal_(0, 0.3)
    return sae.requires_grad_(False)


def inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(ROWS, M, generator=g) * torch.rand(ROWS, 1, generator=g).mul(2.5).add(0.5)


def reference(sae: ExpanderSAE, x: torch.Tensor):
    """Float64 pre-activations, each ordering stated directly, and the rows whose choice is clear."""
    dense = sae.to_dense().double()
    pre = (x.double() - dense.b_dec) @ dense.W_enc + dense.b_enc
    scores = {"relu_topk": pre.clamp_min(0), "abs_topk": pre.abs()}.get(sae.activation, pre)
    ordered = scores.topk(K + 1, dim=1)
    idx = ordered.indices[:, :K]
    vals = pre.gather(1, idx) if sae.activation == "abs_topk" else ordered.values[:, :K]
    if sae.activation == "topk_relu":
        vals = vals.clamp_min(0)
    clear = ordered.values[:, K - 1] - ordered.values[:, K] > MARGIN
    if sae.activation == "relu_topk":  # fewer than k positive: the codes are clear, the kept zeros arbitrary
        clear |= vals[:, -1] == 0
    return pre, vals, idx, clear


def by_latent(values, indices, activation: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, values)`` of each row sorted by latent; under ``relu_topk`` the kept zeros become latent n."""
    values, indices = torch.as_tensor(values).double(), torch.as_tensor(indices).long()
    if activation == "relu_topk":
        indices = indices.masked_fill(values == 0, n)
    indices, order = indices.sort(dim=1)
    return indices, values.gather(1, order)


def assert_same_choice(values, indices, ref_vals, ref_idx, clear, activation, n):
    got_idx, got_vals = by_latent(values, indices, activation, n)
    want_idx, want_vals = by_latent(ref_vals, ref_idx, activation, n)
    assert torch.equal(got_idx[clear], want_idx[clear])
    torch.testing.assert_close(got_vals[clear], want_vals[clear], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_spelling_keeps_the_same_topk(activation, one_thread):
    sae, x = make_sae(2048, activation), inputs()
    pre, ref_vals, ref_idx, clear = reference(sae, x)
    assert float(clear.double().mean()) > 0.9
    few_positive = ((pre > 0).sum(1) < K)
    assert 0.2 < float(few_positive.double().mean()) < 0.9  # rows on which the orderings differ
    if activation in ("signed_topk", "abs_topk"):
        assert bool((ref_vals[few_positive] < 0).any())
    else:
        assert bool((ref_vals[few_positive] == 0).any())

    def check(values, indices):
        assert_same_choice(values, indices, ref_vals, ref_idx, clear, activation, sae.n)

    check(*select_topk(pre, K, activation))  # the definition itself, sorted ...
    check(*select_topk(pre, K, activation, sorted=False))  # ... or not
    check(*sae.encode(x))  # chunked gather-reduce with a running top-k merge
    dense = sae.to_dense()
    check(*dense.encode(x))
    forward = sparse_forward(sae, x, MaskLayout.from_indices(sae.indices, sae.m))
    check(forward.top_vals, forward.top_idx)
    forward = dense_forward(dense, x, None, 0)
    check(forward.top_vals, forward.top_idx)

    for exported in (sae, dense):
        model = build_onnx(exported, "encode")
        if exported is sae:
            assert "group=16" in read_onnx_metadata(model)["layout"]  # group maxima, then exact candidates
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        indices, values = session.run(["top_indices", "top_values"], {"activations": x.numpy()})
        check(values, indices)
        one_row = [session.run(["top_indices", "top_values"], {"activations": x[i:i + 1].numpy()})
                   for i in range(16)]  # the single-row branch of the expander graph
        rows = slice(0, 16)
        assert_same_choice(np.concatenate([v for _, v in one_row]), np.concatenate([i for i, _ in one_row]),
                           ref_vals[rows], ref_idx[rows], clear[rows], activation, sae.n)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_ungrouped_onnx_encode_keeps_the_same_topk(activation, one_thread):
    """n not a multiple of the group size: the ONNX encode takes TopK over all n pre-activations."""
    sae, x = make_sae(2040, activation), inputs()[:256]
    _, ref_vals, ref_idx, clear = reference(sae, x)
    model = build_onnx(sae, "encode")
    assert "group=1," in read_onnx_metadata(model)["layout"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    indices, values = session.run(["top_indices", "top_values"], {"activations": x.numpy()})
    assert_same_choice(values, indices, ref_vals, ref_idx, clear, activation, sae.n)
