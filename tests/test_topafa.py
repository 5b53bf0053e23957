"""Top-AFA (``topafa``): the norm-matching rule in every spelling (torch encode of both models,
the chunked running merge, the sparse and dense training steps, ONNX graphs, the monitor), training,
files.

The reference states the rule in float64 numpy, independently of ``models.afa_count``:
``a = ReLU(pre)``, ``s = a·‖decoder row‖`` sorted descending, ``c_j = √(Σ_{l≤j} s_l²)``, keep the
``argmin_j |c_j − ‖x' − b_dec‖|`` largest (first minimum) over ``j ≤ k``; a row overflows when the
same argmin over all ``n`` is past ``k``. Rows whose choice is not clear in float32 (near-equal
errors at the chosen count, or near-equal scores at the cut) are left out of exact comparisons.
"""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from saecompress import SaeCompressError, convert
from saecompress.cli.main import cli
from saecompress.compact import load_compact, save_compact
from saecompress.exporters.onnx import EncodeLayout, build_onnx
from saecompress.models import ExpanderSAE, TopKSAE, active_counts, l0_cap, select_afa
from saecompress.objective import dense_forward
from saecompress.runtime import Monitor
from saecompress.sources import load
from saecompress.sparse_ops import MaskLayout, sparse_forward
from saecompress.train import train
from saecompress.trainer import TrainConfig

M, N, D, K = 32, 256, 5, 8
MARGIN = 1e-4


def make_sae(kind: str = "seed", encoder: str = "untied", n: int = N, k: int = K, seed: int = 0):
    """A topafa SAE with decoder rows of varied norms and a typical row keeping about k latents."""
    torch.manual_seed(seed)
    if kind == "dense":
        sae = TopKSAE(M, n, k, activation="topafa")
        rows = sae.W_dec
    else:
        indices = torch.stack([torch.randperm(M)[:D] for _ in range(n)]) if kind == "explicit" else None
        sae = ExpanderSAE(M, n, D, k, seed=seed, activation="topafa", encoder=encoder, indices=indices)
        rows = sae.values
    with torch.no_grad():
        rows.mul_(torch.rand(n, 1) * 1.5 + 0.5)
        if kind != "dense" and encoder == "tied":  # the encoder scales too: this puts rows around the cap
            rows.mul_(0.75)
        sae.b_enc.normal_(-0.5, 0.3)
        sae.b_dec.normal_(0, 0.3)
    return sae.requires_grad_(False)


def inputs(rows: int = 64, seed: int = 1) -> np.ndarray:
    g = np.random.default_rng(seed)
    return (g.standard_normal((rows, M)) * g.uniform(0.5, 3.0, (rows, 1))).astype(np.float32)


def afa_reference(pre: np.ndarray, norms: np.ndarray, target: np.ndarray, k: int):
    """Float64 ``(code [B, n], count [B], overflow [B], uncapped count [B], clear [B])``."""
    a = np.maximum(pre, 0.0)
    s = a * norms
    order = np.argsort(-s, axis=1, kind="stable")
    ranked = np.take_along_axis(s, order, 1)
    err = np.abs(np.sqrt(np.cumsum(ranked**2, axis=1)) - target[:, None])
    full = err.argmin(1) + 1
    count = err[:, :k].argmin(1) + 1
    code = np.zeros_like(a)
    rows = np.arange(len(a))
    for j in range(k):
        keep = j < count
        code[rows[keep], order[keep, j]] = a[rows[keep], order[keep, j]]
    # clear: the chosen error beats its neighbours below the cap, the scores at the cut differ, and
    # so do the errors the overflow compares, by MARGIN (a zero score next is an exact tie: fine)
    padded = np.concatenate([np.full((len(a), 1), np.inf), err, np.full((len(a), 1), np.inf)], 1)
    nxt = np.minimum(count, ranked.shape[1] - 1)
    right = np.where((count < k) & (ranked[rows, nxt] > 0), padded[rows, count + 1], np.inf)
    gap = np.minimum(padded[rows, count - 1], right) - err[rows, count - 1]
    cut = np.where(count < ranked.shape[1], ranked[rows, count - 1] - ranked[rows, nxt], np.inf)
    spill = np.abs(err[:, min(k, ranked.shape[1] - 1)] - err[:, k - 1]) if k < ranked.shape[1] else np.inf
    scale = MARGIN * np.maximum(target, 1e-12)
    clear = (gap > scale) & (cut > scale) & (spill > scale)
    return code, count, full > k, full, clear


def reference(sae, x: np.ndarray, k: int):
    """The float64 reference on ``sae``'s own pre-activations, norms and centred inputs."""
    ref = sae.to_dense() if isinstance(sae, ExpanderSAE) else sae
    ref = ref.double().requires_grad_(False)
    xt = torch.from_numpy(x).double()
    pre = ref.pre_activations(xt).numpy()
    target = (ref.normalise(xt)[0] - ref.b_dec).norm(dim=1).numpy()
    return afa_reference(pre, ref.W_dec.detach().norm(dim=1).numpy(), target, k)


def rel_err(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got, dtype=np.float64) - want) / np.linalg.norm(want))


def test_notebook_case_with_our_target():
    """The reference notebook's acts and decoder rows; x_i = t_i·e_i with W_enc row i = acts_i / t_i,
    so pre = acts and the target is t_i (ours: ‖x' − b_dec‖, not the notebook's ‖acts·W_dec‖)."""
    acts = torch.tensor([[5.0, 4, 3], [1, 1, 1], [1, 10, 2]], dtype=torch.float64)
    t = torch.tensor([30.0, 1.0, 60.0], dtype=torch.float64)
    sae = TopKSAE(3, 3, 3, activation="topafa").double()
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 2, 0], [3, 4, 0], [5, 6, 0]]))  # norms √5, 5, √61
        sae.W_enc.copy_(acts / t[:, None])
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.diag(t)
    # s = acts·norms; row 0: c = 23.4, 30.8, 32.8 -> 2 kept; row 1: c1 = 7.8 > 1 -> 1; row 2: c = 50, 52.4, 52.4 -> 3
    want = torch.tensor([[0.0, 4, 3], [0, 0, 1], [1, 10, 2]], dtype=torch.float64)
    assert torch.equal(sae.encode(x, dense=True), want)
    sae.k = 2  # the cap: row 2 keeps its 2 largest and overflows
    values, indices, overflow = select_afa(sae.pre_activations(x), 2, sae.row_norms(), t)
    assert torch.equal(torch.zeros(3, 3, dtype=torch.float64).scatter(1, indices, values),
                       torch.tensor([[0.0, 4, 3], [0, 0, 1], [0, 10, 2]], dtype=torch.float64))
    assert overflow.tolist() == [False, False, True]
    assert active_counts(sae, x)[0].tolist() == [2, 1, 3]
    out = ort.InferenceSession(build_onnx(sae, "encode").SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"activations": x.float().numpy()})
    got = dict(zip(["top_indices", "top_values", "overflow"], out))
    assert got["overflow"].tolist() == [0, 0, 1]
    assert got["top_indices"].tolist() == [[2, 1], [2, -1], [1, 2]]


@pytest.mark.parametrize("kind", ["dense", "seed"])
def test_torch_encode_matches_float64_rule(kind, monkeypatch):
    monkeypatch.setattr("saecompress.models._CHUNK_ELEMENTS", 256 * 40)  # 7 chunks: the running merge runs
    sae = make_sae(kind)
    x = inputs(256)
    code, count, overflow, full, clear = reference(sae, x, K)
    assert clear.mean() > 0.95
    assert overflow.any() and (~overflow).any() and (count < K).any()  # both sides of the cap occur
    got = sae.encode(torch.from_numpy(x), dense=True).double().numpy()
    assert np.allclose(got[clear], code[clear], rtol=1e-4, atol=1e-5)
    assert rel_err(got, code) < 1e-3
    centred = sae.normalise(torch.from_numpy(x))[0] - sae.b_dec
    _, _, spilled = select_afa(sae.pre_activations(torch.from_numpy(x)), K, sae.row_norms(), centred.norm(dim=1))
    assert np.array_equal(spilled.numpy()[clear], overflow[clear])
    per_row, per_latent = active_counts(sae, torch.from_numpy(x))  # uncapped
    below = clear & ~overflow  # the uncapped count past the cap is not checked for clarity: only that it is
    assert np.array_equal(per_row.numpy()[below], full[below]) and (per_row.numpy()[clear & overflow] > K).all()
    assert int(per_latent.sum()) == int(per_row.sum())


def _masked_dense_loss(sae, V, EV, b_enc, b_dec, x, target, dead, k_aux):
    """Float64 masked-dense top-AFA loss: W = mask ⊙ V, all n scored, the rule over j ≤ sae.k."""
    W_dec = torch.zeros(sae.n, sae.m, dtype=x.dtype).scatter(1, sae.indices, V)
    W_enc = torch.zeros(sae.n, sae.m, dtype=x.dtype).scatter(1, sae.indices, EV).T
    xc = x - b_dec
    a = torch.relu(xc @ W_enc + b_enc)
    code, _, _, _, _ = afa_reference((xc @ W_enc + b_enc).detach().numpy(), W_dec.detach().norm(dim=1).numpy(),
                                     xc.detach().norm(dim=1).numpy(), sae.k)
    z = a * torch.from_numpy(code > 0)
    recon = z @ W_dec + b_dec
    loss = (recon - target).pow(2).sum()
    aux_idx = a.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1).indices
    z_aux = torch.zeros_like(a).scatter(1, aux_idx, a.gather(1, aux_idx))
    return loss + 0.5 * (z_aux @ W_dec - (target - recon.detach())).pow(2).sum()


@pytest.mark.parametrize("encoder", ["tied", "untied"])
def test_sparse_gradients_match_masked_dense_reference(encoder):
    torch.manual_seed(0)
    sae = make_sae("seed", encoder, n=96, k=12).double().requires_grad_(True)
    x = torch.from_numpy(inputs(40)).double()
    target = torch.randn(40, M, dtype=torch.float64)
    dead = torch.rand(sae.n) < 0.3
    out = sparse_forward(sae, x, MaskLayout.from_indices(sae.indices, M), dead, 8)
    assert ((out.top_vals > 0).sum(1) < sae.k).any()  # the rule keeps fewer than the cap on some rows
    loss = (out.recon - target).pow(2).sum() + 0.5 * (out.aux_recon - (target - out.recon.detach())).pow(2).sum()
    params = [sae.values, sae.b_enc, sae.b_dec] + ([sae.enc_values] if encoder == "untied" else [])
    grads = torch.autograd.grad(loss, params)
    V = sae.values.detach().clone().requires_grad_()
    EV = V if encoder == "tied" else sae.enc_values.detach().clone().requires_grad_()
    b_enc, b_dec = (p.detach().clone().requires_grad_() for p in (sae.b_enc, sae.b_dec))
    ref_loss = _masked_dense_loss(sae, V, EV, b_enc, b_dec, x, target, dead, 8)
    ref_grads = torch.autograd.grad(ref_loss, [V, b_enc, b_dec] + ([EV] if encoder == "untied" else []))
    assert abs(float(loss.detach()) - float(ref_loss.detach())) <= 1e-12 * float(ref_loss.detach())
    for g, r in zip(grads, ref_grads):
        assert float(r.norm()) > 0 and float((g - r).norm() / r.norm()) < 1e-10
    # the dense training forward keeps the same code
    dense = sae.to_dense().requires_grad_(False)
    ref = dense_forward(dense, x, None, 0)
    both = [torch.zeros(40, sae.n, dtype=x.dtype).scatter(1, o.top_idx, o.top_vals.detach()) for o in (out, ref)]
    assert float((both[0] - both[1]).norm() / both[1].norm()) < 1e-12


def run(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"activations": x})))


@pytest.mark.parametrize("kind,encoder,storage,layout", [
    ("seed", "tied", "float32", EncodeLayout()),
    ("explicit", "untied", "bfloat16", EncodeLayout()),
    ("seed", "untied", "bfloat16", EncodeLayout(chunk=100, group=1)),
    ("seed", "untied", "float32", EncodeLayout(chunk=64, group=4, single_row_branch=False)),
    ("dense", None, "float32", EncodeLayout()),
])
def test_onnx_matches_the_float64_rule(tmp_path, kind, encoder, storage, layout):
    sae = make_sae(kind, encoder or "untied")
    if kind != "dense":  # the values the file stores
        sae = load_compact(save_compact(sae, tmp_path / "sae.safetensors", dtype=storage))
    model = build_onnx(sae, "autoencoder", dense_output=True, storage_dtype=storage, layout=layout, max_l0=4)
    onnx.checker.check_model(model, full_check=True)
    x = inputs(256)
    code, _, overflow, _, clear = reference(sae, x, 4)
    assert overflow.any() and (~overflow).any()
    sae.k = 4
    recon = sae.double()(torch.from_numpy(x).double()).detach().numpy()
    for rows in (slice(0, 1), slice(None)):  # one row takes the If's single-row branch
        out = run(model, x[rows])
        idx, vals = out["top_indices"], out["top_values"]
        assert idx.dtype == np.int64 and ((idx == -1) == (vals == 0)).all()
        got = np.zeros_like(code[rows])
        hit = np.nonzero(idx >= 0)
        got[hit[0], idx[hit]] = vals[hit]
        ok = clear[rows]
        assert np.allclose(got[ok], code[rows][ok], rtol=1e-4, atol=1e-5)
        assert np.array_equal(out["overflow"][ok], overflow[rows][ok].astype(np.int64))
        assert rel_err(out["codes"], code[rows]) < 1e-3
        assert rel_err(out["reconstruction"], recon[rows]) < 1e-3


def test_monitor_counts_overflow_rows():
    sae = make_sae("seed")
    x = inputs()
    _, _, overflow, _, clear = reference(sae, x, 4)
    mon = Monitor(sae, max_l0=4, batch_size=16)
    assert mon.k == 4 and mon.variable_count
    mon.encode(x)
    assert np.array_equal(mon.overflow[clear], overflow[clear].astype(np.int64))
    assert mon.overflow_rows == mon.overflow_latents == int(mon.overflow.sum()) > 0


def test_save_load_and_convert_keep_the_activation(tmp_path):
    sae = make_sae("explicit", "tied")
    again = load_compact(save_compact(sae, tmp_path / "sae.safetensors"))
    assert again.activation == "topafa" and again.threshold is None and again.k == K
    x = torch.from_numpy(inputs())
    assert torch.equal(again.encode(x, dense=True), sae.encode(x, dense=True))
    projected = convert(make_sae("dense"), D)  # no reader makes a dense topafa SAE; projection keeps it
    assert projected.activation == "topafa" and projected.k == K
    assert projected.encode(x)[0].shape == (len(x), K)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Rows of two planted atoms out of 16 (unit norm, coefficients in [0.5, 2]) plus an offset."""
    g = np.random.default_rng(0)
    atoms = g.standard_normal((16, M))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    coef = np.zeros((12_000, 16))
    which = np.argsort(g.random((12_000, 16)), axis=1)[:, :2]
    np.put_along_axis(coef, which, g.uniform(0.5, 2.0, (12_000, 2)), axis=1)
    path = tmp_path_factory.mktemp("acts") / "acts.npy"
    np.save(path, (coef @ atoms + 0.01 * g.standard_normal((12_000, M)) + 0.3).astype(np.float32))
    return path


@pytest.mark.parametrize("d", [None, D])
def test_training_fits_and_sets_the_cap(planted, tmp_path, d):
    cfg = TrainConfig(k=8, d=d, n=64, activation="topafa", tokens=40_000, batch_size=256, lr=3e-3,
                      held_out_rows=2000)
    out = tmp_path / ("sae.safetensors" if d else "sae")
    sae, metrics = train(planted, out, cfg, progress=False)
    held, run_ = metrics["held_out"], metrics["training"]
    assert held["fvu"] < 0.5, held  # a fresh start explains none of the variance
    assert run_["rule"] == "topafa" and "target_l0" not in run_
    x = torch.from_numpy(np.load(planted)[-2000:])
    assert sae.k == run_["max_l0"] == l0_cap(active_counts(sae, x)[0], sae.n)
    again = load(out)  # a compact file, or a SAELens folder with saecompress's architecture "topafa"
    assert (again.activation, again.k) == ("topafa", sae.k)
    assert torch.equal(again.encode(x[:64], dense=True), sae.encode(x[:64], dense=True))


def test_cli_train_init_export_monitor(planted, tmp_path):
    runner = CliRunner()
    first = tmp_path / "first.safetensors"
    common = ["--acts", str(planted), "--n", "64", "--batch-size", "256", "--held-out", "2000", "--json"]
    result = runner.invoke(cli, ["train", *common, "--d", str(D), "--k", "8", "--activation", "topafa",
                                 "--afa-coef", "0.1", "--tokens", "10240", "--out", str(first)])
    assert result.exit_code == 0, result.output
    run_ = json.loads(result.stdout.strip().splitlines()[-1])["training"]
    assert run_["rule"] == "topafa" and run_["afa_coef"] == 0.1
    again = tmp_path / "again.safetensors"
    result = runner.invoke(cli, ["train", *common, "--init", str(first), "--tokens", "5120", "--out", str(again)])
    assert result.exit_code == 0, result.output
    assert load_compact(again).activation == "topafa"
    onnx_path = tmp_path / "sae.onnx"
    result = runner.invoke(cli, ["export", str(again), str(onnx_path), "--max-l0", "2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["monitor", str(onnx_path), "--input", str(planted), "--jsonl", "--top", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stderr.strip().splitlines()[-1])["summary"]
    assert summary["max_l0"] == 2 and summary["overflow_rows"] > 0 and "overflow_latents" not in summary
    assert f"{summary['overflow_rows']} over max_l0=2\n" in result.stderr


def test_finetune_keeps_the_rule(tiny_lm, tiny_llama, tmp_path):
    from saecompress.finetune import FinetuneConfig, finetune
    from saecompress.lm import capture, load_model, token_contexts

    model, tokenizer = load_model(tiny_llama)
    torch.manual_seed(0)
    sae = ExpanderSAE(tiny_lm.HIDDEN, 96, 4, 24, seed=1, encoder="untied", activation="topafa")
    ids = torch.stack(list(token_contexts(tokenizer, tiny_lm.texts(), 32)))
    with torch.no_grad():
        sae.b_dec.copy_(capture(model, ids, 1, "resid").reshape(-1, tiny_lm.HIDDEN).mean(0))
    out = tmp_path / "ft.safetensors"
    _, stats = finetune(sae, model, tokenizer, tiny_lm.texts(12), 1, "resid",
                        FinetuneConfig(tokens=32 * 2 * 20, context=32, batch=2, lr=1e-2), out=out, progress=False)
    run = stats["finetune"]
    assert run["steps"] == 20 and run["fvu_last"] < run["fvu_first"]
    assert (load(out).activation, load(out).k) == ("topafa", 24)


def test_afa_term_is_the_papers_term_in_fvu_units(planted, tmp_path):
    from saecompress.objective import training_forward
    from saecompress.trainer import Trainer

    x = torch.from_numpy(np.load(planted)[:128])
    steps = {}
    for coef in (0.0, 0.5):
        sae = make_sae("seed", n=96, k=12).requires_grad_(True)
        trainer = Trainer(sae, TrainConfig(k=12, d=D, n=96, activation="topafa", afa_coef=coef), total_steps=10)
        xin = trainer.inputs(x)
        with torch.no_grad():
            code = training_forward(sae, xin, trainer.layout).top_vals.double()
        target = (xin - sae.b_dec).detach().double().norm(dim=1)
        want = float(((code.norm(dim=1) - target) ** 2).mean() / (target**2).mean())
        stats = trainer.train_step(x)
        steps[coef] = sae.values.detach().clone()
        if coef:
            assert stats["afa"] == pytest.approx(want, rel=1e-5) and want > 0.01
            assert stats["loss"] == pytest.approx(stats["fvu"] + coef * want, rel=1e-5)
    assert not torch.equal(steps[0.0], steps[0.5])  # the term moves the parameters
    with pytest.raises(SaeCompressError, match="--afa-coef weighs top-AFA"):
        train(planted, tmp_path / "x.safetensors", TrainConfig(k=2, d=D, n=64, afa_coef=1.0, tokens=512,
                                                                batch_size=256), progress=False)
