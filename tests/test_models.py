"""TopKSAE / ExpanderSAE math against float64 references, and to_dense equivalence."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from saecompress import ExpanderSAE, SaeCompressError, TopKSAE
from saecompress.models import ACTIVATIONS, LAYER_NORM_EPS, layer_norm


def _randomise(sae: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))


def reference_forward(sae: TopKSAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 restatement of the module docstring's math with a dense code."""
    x = x.double()
    W_enc, W_dec = sae.W_enc.double(), sae.W_dec.double()
    b_enc, b_dec = sae.b_enc.double(), sae.b_dec.double()
    if sae.normalize_input:
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        xin = (x - mu) / (std + 1e-5)
    else:
        xin = x
    pre = (xin - b_dec) @ W_enc + b_enc
    if sae.activation == "relu_topk":
        pre = pre.relu()
    if sae.activation == "abs_topk":
        idx = pre.abs().topk(sae.k, dim=-1).indices
        vals = pre.gather(-1, idx)
    else:
        vals, idx = pre.topk(sae.k, dim=-1)
    if sae.activation == "topk_relu":
        vals = vals.relu()
    code = torch.zeros_like(pre).scatter(-1, idx, vals)
    out = code @ W_dec + b_dec
    if sae.normalize_input:
        out = out * std + mu
    return code, out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("normalize_input", [False, True])
def test_topk_sae_matches_float64_reference(activation, normalize_input):
    sae = TopKSAE(24, 96, 6, activation=activation, normalize_input=normalize_input)
    _randomise(sae, 1)
    x = torch.randn(40, 24) * 3 + 1
    code, out = reference_forward(sae, x)
    assert _rel(sae(x), out) < 1e-5
    assert _rel(sae.encode(x, dense=True), code) < 1e-5


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("encoder", ["tied", "untied"])
@pytest.mark.parametrize("normalize_input", [False, True])
def test_expander_equals_its_dense_form(activation, encoder, normalize_input):
    sae = ExpanderSAE(48, 640, 5, 12, seed=3, activation=activation, encoder=encoder,
                      normalize_input=normalize_input)
    _randomise(sae, 2)
    dense = sae.to_dense()
    x = torch.randn(2, 33, 48) * 2 + 0.5
    code, out = reference_forward(dense, x.reshape(-1, 48))
    assert _rel(sae(x).reshape(-1, 48), out) < 1e-5
    assert _rel(dense(x).reshape(-1, 48), out) < 1e-5
    assert _rel(sae.encode(x, dense=True).reshape(-1, 640), code) < 1e-5
    values, indices = sae.encode(x)
    assert values.shape == indices.shape == (2, 33, 12) and indices.dtype == torch.int64
    # decode touches only the k active latents and agrees with the dense decoder
    assert _rel(sae.decode(values, indices), dense.decode(values, indices)) < 1e-5
    assert _rel(sae.pre_activations(x), dense.pre_activations(x)) < 1e-5


def test_expander_chunked_topk_merge_matches_full_topk(monkeypatch):
    import saecompress.models as models

    monkeypatch.setattr(models, "_CHUNK_ELEMENTS", 64)  # many tiny latent chunks
    sae = ExpanderSAE(32, 500, 4, 20, seed=5, activation="topk_relu")
    _randomise(sae, 3)
    x = torch.randn(9, 32)
    full_vals, _ = sae.pre_activations(x).topk(20, dim=-1)
    vals, idx = sae.encode(x)
    assert torch.allclose(vals, full_vals.relu(), rtol=1e-6, atol=1e-6)
    assert torch.allclose(sae.pre_activations(x).gather(1, idx).relu(), vals, rtol=1e-6, atol=1e-6)


def test_expander_structure_and_gradients():
    sae = ExpanderSAE(64, 256, 7, 8, seed=1, encoder="untied")
    assert sae.indices.shape == (256, 7) and sae.values.shape == (256, 7)
    dense = sae.to_dense()
    assert int((dense.W_dec != 0).sum()) == 256 * 7
    assert torch.allclose(dense.W_dec.norm(dim=1), torch.ones(256), atol=1e-5)
    x = torch.randn(16, 64)
    sae(x).pow(2).sum().backward()
    assert sae.values.grad is not None and sae.values.grad.abs().sum() > 0
    assert sae.enc_values.grad is not None and sae.enc_values.grad.abs().sum() > 0


def test_layer_norm_matches_openai_definition():
    """OpenAI's ``(x - mu) / (std + eps)`` with the unbiased std, checked against torch's own layer_norm."""
    m = 10
    x = torch.randn(5, m, dtype=torch.float64) * 4 + 2
    normed, mu, std = layer_norm(x)
    xn = x.numpy()
    biased, unbiased = xn.std(-1, keepdims=True), xn.std(-1, ddof=1, keepdims=True)
    np.testing.assert_allclose(mu.numpy(), xn.mean(-1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(std.numpy(), unbiased, rtol=1e-12)
    # F.layer_norm (eps=0) is (x - mu) / biased std: rescale it to OpenAI's denominator
    want = F.layer_norm(x, (m,), eps=0.0).numpy() * biased / (unbiased + LAYER_NORM_EPS)
    np.testing.assert_allclose(normed.numpy(), want, rtol=1e-10)
    assert LAYER_NORM_EPS == 1e-5  # OpenAI sparse_autoencoder's eps


def test_bad_configurations_and_inputs_are_clear_errors():
    with pytest.raises(SaeCompressError, match="k=0"):
        TopKSAE(8, 16, 0)
    with pytest.raises(SaeCompressError, match="activation"):
        ExpanderSAE(8, 16, 2, 2, activation="gated")
    with pytest.raises(SaeCompressError, match=r"shape \(16,\)"):
        ExpanderSAE(8, 16, 2, 2, activation="jumprelu", threshold=torch.ones(15))
    with pytest.raises(SaeCompressError, match="NaN"):
        TopKSAE(8, 16, 2, activation="jumprelu", threshold=torch.full((16,), float("nan")))
    with pytest.raises(SaeCompressError, match="one global value"):
        TopKSAE(8, 16, 2, activation="batchtopk", threshold=torch.arange(16.0))
    with pytest.raises(SaeCompressError, match="takes no threshold"):
        TopKSAE(8, 16, 2, threshold=torch.ones(16))
    with pytest.raises(SaeCompressError, match="d=9"):
        ExpanderSAE(8, 16, 9, 2)
    with pytest.raises(SaeCompressError, match="repeat"):
        ExpanderSAE(8, 2, 2, 1, indices=torch.tensor([[1, 1], [0, 2]]))
    with pytest.raises(SaeCompressError, match=r"\[0, 8\)"):
        ExpanderSAE(8, 2, 2, 1, indices=torch.tensor([[1, 8], [0, 2]]))
    sae = ExpanderSAE(8, 16, 2, 2)
    with pytest.raises(SaeCompressError, match="hidden size 9"):
        sae(torch.randn(3, 9))
