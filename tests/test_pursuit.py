"""Matching-pursuit encoding of Expander SAEs (``encoder="pursuit"``): the maths against a float64 numpy
reference, the compact file, ``convert --encoder pursuit``, the ONNX graph (``ExpanderPursuit``) in onnxruntime,
the monitors and the command that refuses it."""

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from saecompress.activations import write_activations
from saecompress.cli.main import cli
from saecompress.compact import load_compact, read_compact_metadata, save_compact
from saecompress.exporters.onnx import build_onnx
from saecompress.models import ACTIVATIONS, ExpanderSAE, atom_overlaps, pursue, pursuit_gram
from saecompress.runtime import Monitor

M, N, D, K = 24, 96, 4, 6


def reference_pursuit(sae: ExpanderSAE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 matching pursuit over the dense decoder, with every correlation recomputed from the residual."""
    dec = np.zeros((sae.n, sae.m))
    dec[np.arange(sae.n)[:, None], sae.indices.numpy()] = sae.values.detach().double().numpy()
    norms = np.linalg.norm(dec, axis=1)
    atoms = dec / norms[:, None]
    relu_kept = sae.activation in ("relu_topk", "topk_relu")
    codes, latents = np.zeros((len(x), sae.k)), np.zeros((len(x), sae.k), dtype=np.int64)
    for b, row in enumerate(x.astype(np.float64) - sae.b_dec.detach().double().numpy()):
        residual, used = row.copy(), []
        for t in range(sae.k):
            c = atoms @ residual
            score = {"abs_topk": np.abs(c), "relu_topk": np.maximum(c, 0)}.get(sae.activation, c.copy())
            score[used] = -np.inf
            i = int(score.argmax())
            kept = max(c[i], 0.0) if relu_kept else c[i]
            residual -= kept * atoms[i]
            used.append(i)
            codes[b, t], latents[b, t] = kept / norms[i], i
    return codes, latents


def pursuit_sae(activation: str = "abs_topk", seed: int = 0) -> ExpanderSAE:
    torch.manual_seed(seed)
    sae = ExpanderSAE(M, N, D, K, seed=seed, activation=activation, encoder="pursuit").double()
    with torch.no_grad():
        sae.values.mul_(torch.rand(N, 1, dtype=torch.float64) + 0.5)  # rows of unequal norm
        sae.b_dec.copy_(0.1 * torch.randn(M, dtype=torch.float64))
    return sae


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_pursuit_matches_a_float64_reference(activation):
    sae = pursuit_sae(activation)
    x = np.random.default_rng(1).normal(size=(40, M))
    values, latents = sae.encode(torch.from_numpy(x))
    ref_codes, ref_latents = reference_pursuit(sae, x)
    np.testing.assert_array_equal(latents.numpy(), ref_latents)
    np.testing.assert_allclose(values.detach().numpy(), ref_codes, rtol=1e-10, atol=1e-12)
    recon = sae(torch.from_numpy(x)).detach().numpy()
    assert np.linalg.norm(recon - x) < np.linalg.norm(x - sae.b_dec.detach().numpy())  # it reconstructs something


def test_each_latent_is_picked_once_and_float32_agrees_with_float64():
    sae = pursuit_sae()
    x = torch.randn(64, M, dtype=torch.float64)
    values, latents = sae.encode(x)
    assert all(len(set(row.tolist())) == K for row in latents)
    values32, latents32 = copy.deepcopy(sae).float().encode(x.float())
    agree = (latents32 == latents).all(1)
    assert agree.float().mean() > 0.9  # float ties aside, the same picks
    np.testing.assert_allclose(values32[agree].detach().double().numpy(), values[agree].detach().numpy(),
                               rtol=1e-4, atol=1e-5)


def test_atom_overlaps_is_the_decoder_gram_matrix():
    sae = pursuit_sae()
    atoms = sae.values.detach() / sae.values.detach().norm(dim=1, keepdim=True)
    neighbours, gram = atom_overlaps(atoms, sae.indices)
    dense = torch.zeros(N, M, dtype=torch.float64)
    dense[torch.arange(N)[:, None], sae.indices] = atoms
    full = dense @ dense.T
    rebuilt = torch.zeros(N, N, dtype=torch.float64).scatter_add_(1, neighbours, gram)
    torch.testing.assert_close(rebuilt, full, rtol=1e-12, atol=1e-12)
    assert neighbours.shape[1] < N  # sparse: no row meets every other


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_the_sparse_and_dense_gram_forms_pick_alike(activation):
    sae = pursuit_sae(activation)
    atoms = sae.values.detach() / sae.values.detach().norm(dim=1, keepdim=True)
    dense = pursuit_gram(atoms, sae.indices)
    assert dense[0] is None and dense[1].shape == (N, N)  # wide rows at this size: the dense form
    x = torch.randn(50, M, dtype=torch.float64) - sae.b_dec.detach()
    by_dense = pursue(x, sae.values.detach(), sae.indices, K, activation, dense)
    by_sparse = pursue(x, sae.values.detach(), sae.indices, K, activation, atom_overlaps(atoms, sae.indices))
    assert torch.equal(by_dense[1], by_sparse[1])
    torch.testing.assert_close(by_dense[0], by_sparse[0], rtol=1e-12, atol=1e-12)


def test_the_kept_gram_matrix_follows_the_decoder():
    sae = pursuit_sae()
    x = torch.randn(32, M, dtype=torch.float64)
    before = sae.encode(x)
    assert sae._decoder_overlaps() is sae._decoder_overlaps()  # made once per decoder
    with torch.no_grad():
        sae.values.add_(0.5 * torch.randn_like(sae.values))  # in place, as an optimizer step
    after = sae.encode(x)
    fresh = sae.with_pursuit().encode(x)  # a new module: nothing kept
    assert torch.equal(after[1], fresh[1]) and not torch.equal(after[1], before[1])
    torch.testing.assert_close(after[0], fresh[0], rtol=1e-12, atol=1e-12)


def test_codes_are_differentiable_along_the_picks():
    sae = pursuit_sae()
    x = torch.randn(8, M, dtype=torch.float64)
    latents = sae.encode(x)[1]
    values = sae.values.detach().clone().requires_grad_(True)

    def codes(v):
        out, picked = pursue(x - sae.b_dec.detach(), v, sae.indices, K, sae.activation)
        assert torch.equal(picked, latents)  # small steps keep the picks
        return out

    assert torch.autograd.gradcheck(codes, (values,), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_pursuit_file_stores_no_encoder_and_round_trips(tmp_path, dtype):
    sae = pursuit_sae().float()
    tied = ExpanderSAE(M, N, D, K, seed=0, activation="abs_topk", encoder="tied")
    path = save_compact(sae, tmp_path / "p.safetensors", dtype=dtype)
    tied_path = save_compact(tied, tmp_path / "t.safetensors", dtype=dtype)
    assert read_compact_metadata(path)["encoder"] == "pursuit"
    assert tied_path.stat().st_size - path.stat().st_size >= 4 * N  # no b_enc
    loaded = load_compact(path)
    assert loaded.encoder == "pursuit" and loaded.enc_values is None and loaded.mask_seed == 0
    x = torch.randn(32, M)
    if dtype == "float32":
        for a, b in zip(loaded.encode(x), sae.encode(x)):
            assert torch.equal(a, b)


def test_pursuit_refuses_what_it_has_no_form_for():
    with pytest.raises(Exception, match="pursuit encoder picks k latents"):
        ExpanderSAE(M, N, D, K, activation="jumprelu", encoder="pursuit")
    sae = pursuit_sae()
    with pytest.raises(Exception, match="no dense TopK equivalent"):
        sae.to_dense()
    with pytest.raises(Exception, match="no encoder pre-activations"):
        sae.pre_activations(torch.randn(2, M, dtype=torch.float64))


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def error_of(res) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def test_convert_keeps_a_native_sae_decoder_and_seed(tmp_path):
    torch.manual_seed(3)
    native = ExpanderSAE(M, N, D, K, seed=5, activation="abs_topk", encoder="untied")
    with torch.no_grad():
        native.b_enc.normal_()
    src = save_compact(native, tmp_path / "native.safetensors")
    acts = write_activations(tmp_path / "acts.safetensors", torch.randn(256, M))
    out = tmp_path / "pursuit.safetensors"
    res = run("convert", src, out, "--encoder", "pursuit", "--acts", acts, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)["hookpoints"][0]
    assert report["encoder"] == "pursuit" and "matching pursuit" in report["advice"]
    meta = read_compact_metadata(out)
    assert (meta["mask"], meta["mask_seed"], meta["encoder"]) == ("seed", 5, "pursuit")
    pursuit = load_compact(out)
    assert torch.equal(pursuit.values, native.values.detach()) and torch.equal(pursuit.b_dec, native.b_dec.detach())
    x = torch.randn(16, M)
    torch.testing.assert_close(pursuit.encode(x)[0], native.with_pursuit().encode(x)[0])
    assert report["fvu"] < report["fvu_source"]  # pursuit fits the decoder's span better than the random encoder


def test_the_pursuit_rule_is_chosen_or_refused(tmp_path):
    native = ExpanderSAE(M, N, D, K, seed=2, activation="signed_topk", encoder="untied")
    src = save_compact(native, tmp_path / "native.safetensors")
    out = tmp_path / "p.safetensors"
    assert run("convert", src, out, "--encoder", "pursuit", "--pursuit-rule", "relu_topk").exit_code == 0
    assert load_compact(out).activation == "relu_topk"
    again = tmp_path / "again.safetensors"
    assert run("convert", out, again, "--encoder", "pursuit", "--pursuit-rule", "signed_topk").exit_code == 0
    assert load_compact(again).activation == "signed_topk"  # a pursuit file's rule changes when asked
    assert run("convert", src, out, "--encoder", "pursuit").exit_code == 0
    assert load_compact(out).activation == "abs_topk"  # the default rule, whatever the source's activation
    assert "--pursuit-rule is for --encoder pursuit" in error_of(
        run("convert", src, tmp_path / "q.safetensors", "--pursuit-rule", "abs_topk"))
    assert "already a compact Expander SAE file" in error_of(run("convert", src, tmp_path / "q.safetensors"))


def test_train_refuses_a_pursuit_sae_and_says_what_to_do(tmp_path):
    src = save_compact(pursuit_sae().float(), tmp_path / "p.safetensors")
    acts = write_activations(tmp_path / "acts.safetensors", torch.randn(2048, M))
    line = error_of(run("train", "--acts", acts, "--d", D, "--n", N, "--encoder", "pursuit", "--tokens", 1024,
                        "--out", tmp_path / "t.safetensors"))
    assert "--encoder pursuit" in line and "convert" in line
    line = error_of(run("train", "--acts", acts, "--init", src, "--tokens", 1024, "--out", tmp_path / "t.safetensors"))
    assert "does not train pursuit-encoded SAEs" in line


def test_the_torch_monitor_runs_a_pursuit_file(tmp_path):
    sae = pursuit_sae().float()
    path = save_compact(sae, tmp_path / "p.safetensors")
    monitor = Monitor(path, backend="torch", device="cpu")
    x = np.random.default_rng(0).normal(size=(10, M)).astype(np.float32)
    indices, values = monitor.encode(x)
    ref_values, ref_indices = sae.encode(torch.from_numpy(x))
    np.testing.assert_array_equal(indices, ref_indices.numpy())
    np.testing.assert_allclose(values, ref_values.detach().numpy(), rtol=1e-6)


def session_outputs(model, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"activations": x})))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("rows", [1, 37])  # the single-row branch and the batched one
def test_the_onnx_graph_matches_the_float64_reference(activation, rows):
    sae = pursuit_sae(activation)
    x = np.random.default_rng(2).normal(size=(rows, M))
    out = session_outputs(build_onnx(sae.float(), "autoencoder"), x.astype(np.float32))
    ref_codes, ref_latents = reference_pursuit(sae, x)
    agree = (out["top_indices"] == ref_latents).all(1)
    assert agree.mean() >= 0.9  # float32 near-ties aside, the same picks in the same order
    np.testing.assert_allclose(out["top_values"][agree], ref_codes[agree], rtol=1e-4, atol=1e-5)
    torch_recon = sae(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(out["reconstruction"][agree], torch_recon[agree], rtol=1e-4, atol=1e-4)


def test_onnx_export_of_a_pursuit_file_keeps_its_storage_and_runs_in_the_monitor(tmp_path):
    sae = pursuit_sae().float()
    path = save_compact(sae, tmp_path / "p.safetensors", dtype="int8")
    onnx_path = tmp_path / "p.onnx"
    assert run("export", path, onnx_path, "--graph", "autoencoder").exit_code == 0
    x = np.random.default_rng(3).normal(size=(20, M)).astype(np.float32)
    stored = load_compact(path)  # the int8 values, dequantised: what the graph holds
    values, indices = stored.encode(torch.from_numpy(x))
    for monitor in (Monitor(onnx_path), Monitor(path)):  # the exported file, and the graph built in memory
        got_indices, got_values = monitor.encode(x)
        agree = (got_indices == indices.numpy()).all(1)
        assert agree.mean() >= 0.9
        np.testing.assert_allclose(got_values[agree], values.detach().numpy()[agree], rtol=1e-4, atol=1e-5)
    stored_weights = {t.name: t.data_type for t in onnx.load(onnx_path).graph.initializer}
    assert stored_weights["values"] == onnx.TensorProto.INT8 and "enc_values" not in stored_weights  # as the file


def test_train_names_the_pursuit_step_after_a_top_k_expander(tmp_path):
    acts = write_activations(tmp_path / "acts.safetensors", torch.randn(512, M))
    out = tmp_path / "native.safetensors"
    res = run("train", "--acts", acts, "--d", D, "--n", N, "--k", K, "--tokens", 1024, "--batch-size", 64,
              "--held-out", 64, "--out", out)
    assert res.exit_code == 0, res.output
    assert f"saecompress convert {out} PURSUIT.safetensors --encoder pursuit" in res.stdout
    dense = run("train", "--acts", acts, "--dense", "--n", N, "--k", K, "--tokens", 1024, "--batch-size", 64,
                "--held-out", 64, "--out", tmp_path / "dense")
    assert dense.exit_code == 0 and "--encoder pursuit" not in dense.stdout
