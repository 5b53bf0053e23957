"""Fidelity metrics against float64 numpy references, streaming vs one-shot, both SAE kinds."""

import numpy as np
import pytest
import torch

from saecompress.activations import write_activations, open_activations
from saecompress.errors import SaeCompressError
from saecompress.latents import fired
from saecompress.metrics import FidelityAccumulator, evaluate
from saecompress.models import ExpanderSAE, TopKSAE


def ref_explained_variance(x: np.ndarray, x_hat: np.ndarray) -> float:
    x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
    err = ((x - x_hat) ** 2).sum(1).mean()
    total = (x ** 2).sum(1).mean() - (x.mean(0) ** 2).sum()
    return 1 - err / total


def ref_cosine(x: np.ndarray, x_hat: np.ndarray) -> float:
    x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
    return float(((x * x_hat).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(x_hat, axis=1)).mean())


def data(n=600, m=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(m, generator=g) * 3  # a large mean: the variance must be centred
    x = torch.randn(n, m, generator=g) * torch.rand(m, generator=g).add(0.5) + offset
    x_hat = x + 0.3 * torch.randn(n, m, generator=g)
    return x, x_hat


def test_accumulator_matches_numpy():
    x, x_hat = data()
    ev = ref_explained_variance(x.numpy(), x_hat.numpy())
    acc = FidelityAccumulator()
    acc.update(x, x_hat)
    result = acc.result()
    assert result["explained_variance"] == pytest.approx(ev, rel=1e-9)
    assert result["fvu"] == pytest.approx(1 - ev, rel=1e-9)
    assert result["cosine"] == pytest.approx(ref_cosine(x.numpy(), x_hat.numpy()), rel=1e-9)
    # the centring matters: the uncentred ratio would be far closer to 1
    err = ((x - x_hat) ** 2).sum(1).mean().item()
    assert abs((1 - err / (x ** 2).sum(1).mean().item()) - ev) > 0.01


def test_l0_and_dead_fraction():
    values = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.2, 0.0]])
    indices = torch.tensor([[0, 3, 4], [4, 1, 5]])
    # fired: 0, 4, 1 (latents 3 and 5 only with zero values) -> 3 of 8 alive
    assert fired(values, indices, 8).nonzero().flatten().tolist() == [0, 1, 4]
    x, x_hat = data(n=2)
    acc = FidelityAccumulator(8)
    acc.update(x, x_hat, values, indices)
    assert acc.result()["l0"] == pytest.approx(2.0)
    assert acc.result()["dead_fraction"] == pytest.approx(5 / 8)


def test_streaming_equals_one_shot():
    x, x_hat = data(n=1001)
    acc = FidelityAccumulator()
    for xs, hs in zip(x.split(97), x_hat.split(97)):
        acc.update(xs, hs)
    one = FidelityAccumulator()
    one.update(x, x_hat)
    a, b = acc.result(), one.result()
    for key in ("fvu", "explained_variance", "cosine", "mse"):
        assert a[key] == pytest.approx(b[key], rel=1e-12)
    assert a["num_rows"] == 1001
    assert a["mse"] == pytest.approx(float(((x.double() - x_hat.double()) ** 2).mean()), rel=1e-9)
    with pytest.raises(SaeCompressError, match="empty"):
        FidelityAccumulator().result()


def make_saes(m=24, n=96, k=6):
    torch.manual_seed(0)
    dense = TopKSAE(m, n, k)
    with torch.no_grad():
        dense.b_enc[: n // 4] = -1e4  # a quarter of the latents can never fire
        dense.b_dec.copy_(torch.randn(m))
    expander = ExpanderSAE(m, n, 5, k, seed=1, activation="topk_relu")
    with torch.no_grad():
        expander.b_enc[-10:] = -1e4
    normed = TopKSAE(m, n, k, activation="relu_topk", normalize_input=True)
    return [dense, expander, normed]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_evaluate_matches_reference(tmp_path, index):
    sae = make_saes()[index]
    x, _ = data(n=700)
    write_activations(tmp_path / "acts.npy", x)
    report = evaluate(sae, open_activations(tmp_path / "acts.npy"), batch_size=64)
    with torch.no_grad():
        x_hat = sae(x)
        values, indices = sae.encode(x)
    xn, hn = x.numpy(), x_hat.numpy()
    assert report["explained_variance"] == pytest.approx(ref_explained_variance(xn, hn), rel=1e-6)
    assert report["fvu"] == pytest.approx(1 - ref_explained_variance(xn, hn), rel=1e-6)
    assert report["cosine"] == pytest.approx(ref_cosine(xn, hn), rel=1e-6)
    nz = values.numpy() != 0
    assert report["l0"] == pytest.approx(nz.sum(1).mean(), rel=1e-12)
    fired = np.zeros(sae.n, bool)
    fired[indices.numpy()[nz]] = True
    assert report["dead_fraction"] == pytest.approx(1 - fired.mean(), abs=1e-12)
    if index == 0:
        assert report["dead_fraction"] >= 0.25
    assert report["num_rows"] == 700
    limited = evaluate(sae, open_activations(tmp_path / "acts.npy"), batch_size=64, max_rows=100)
    assert limited["num_rows"] == 100


def test_reconstruct_matches_float64_reference(float64_sae):
    x, _ = data(n=50)
    for sae in make_saes():
        with torch.no_grad():
            x_hat, values, indices = sae.reconstruct(x)
        assert values.shape == indices.shape == (50, sae.k)
        top, vals, want = float64_sae(sae, x.numpy())
        want_code = np.zeros((50, sae.n))
        np.put_along_axis(want_code, top, vals, 1)
        code = np.zeros((50, sae.n))
        np.put_along_axis(code, indices.numpy(), values.double().numpy(), 1)
        assert np.linalg.norm(code - want_code) / np.linalg.norm(want_code) < 1e-5
        assert np.linalg.norm(x_hat.double().numpy() - want) / np.linalg.norm(want) < 1e-5
        torch.testing.assert_close(sae(x), x_hat, rtol=0, atol=0)  # forward is reconstruct's x̂


def test_expander_and_its_dense_twin_score_the_same(tmp_path):
    sae = make_saes()[1]
    x, _ = data(n=300)
    write_activations(tmp_path / "a.npy", x)
    src = open_activations(tmp_path / "a.npy")
    a, b = evaluate(sae, src), evaluate(sae.to_dense(), src)
    for key in ("fvu", "l0", "dead_fraction", "cosine"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7)


def test_hidden_size_mismatch(tmp_path):
    write_activations(tmp_path / "a.npy", torch.randn(10, 16))
    with pytest.raises(SaeCompressError, match="m=24 does not match activations m=16"):
        evaluate(make_saes()[0], open_activations(tmp_path / "a.npy"))
