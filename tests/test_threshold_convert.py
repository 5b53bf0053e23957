"""Converting threshold SAEs (JumpReLU, BatchTopK): projection with θ copied, recalibration of θ and
the cap k on activations, the report, ``info`` on compact files and dense sources, and bad inputs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import saecompress
from saecompress.activations import open_activations
from saecompress.cli.main import cli
from saecompress.compact import load_compact, stored_copy
from saecompress.convert import calibrate, convert, recalibrate_thresholds
from saecompress.errors import SaeCompressError
from saecompress.models import TopKSAE

FAMILIES = Path(__file__).parent / "fixtures" / "families"
# threshold families -> the activation they read as
THRESHOLD = {"saelens_jumprelu": "jumprelu", "saelens_batchtopk": "batchtopk",
             "saelens_matryoshka_batchtopk": "batchtopk", "gemma_scope_npz": "jumprelu",
             "dl_batchtopk": "batchtopk", "dl_jumprelu": "jumprelu", "dl_matryoshka_batchtopk": "batchtopk"}
M, N, ROWS = 32, 256, 1500


def run(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def dense_threshold_sae(activation: str, seed: int = 0) -> TopKSAE:
    """A random dense threshold SAE (m=32, n=256) whose latents fire on a few % of random rows;
    latent 0 never fires on them."""
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(M, N, N, activation=activation,
                  threshold=torch.full((N,), 2.0) if activation == "batchtopk" else 1.0 + torch.rand(N, generator=g))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(N, M, generator=g) / math.sqrt(M))
        sae.W_enc.copy_(sae.W_dec.T + 0.2 * torch.randn(M, N, generator=g) / math.sqrt(M))
        sae.b_enc.copy_(0.3 * torch.randn(N, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(M, generator=g))
        if activation == "jumprelu":
            sae.threshold[0] = 1e3
    return sae


def rows(seed: int = 1, n: int = ROWS, m: int = M) -> torch.Tensor:
    return 1.5 * torch.randn(n, m, generator=torch.Generator().manual_seed(seed))


def pre64(sae, x: torch.Tensor) -> torch.Tensor:
    """Float64 reference pre-activations ``[N, n]``, from the dense weights."""
    dense = sae.to_dense() if hasattr(sae, "to_dense") else sae
    return (x.double() - dense.b_dec.double()) @ dense.W_enc.detach().double() + dense.b_enc.detach().double()


def fires64(sae, x: torch.Tensor) -> torch.Tensor:
    """Float64 reference: which latents fire ``[N, n]`` (ReLU(pre)·[pre > θ] > 0)."""
    return pre64(sae, x) > sae.threshold.double().clamp_min(0)


def reachable(dense, sae, x: torch.Tensor) -> torch.Tensor:
    """Per latent: on how many rows the dense latent fires, or the rows where the expander's
    pre-activation is positive when fewer (a JumpReLU latent fires only there)."""
    return torch.minimum(fires64(dense, x).sum(0), (pre64(sae, x) > 0).sum(0))


# ----------------------------------------------------------------------------- core

def test_pre_activation_chunks_and_active_counts_match_the_full_pass(monkeypatch):
    import saecompress.models as models

    monkeypatch.setattr(models, "_CHUNK_ELEMENTS", 3000)  # many latent chunks
    dense = dense_threshold_sae("jumprelu")
    x = rows(n=40)
    for sae in (dense, convert(dense, 6, encoder="untied")):
        chunks = list(sae.pre_activation_chunks(x))
        assert len(chunks) > 3 and [start for start, _ in chunks] == sorted({start for start, _ in chunks})
        assert torch.equal(torch.cat([pre for _, pre in chunks], dim=1), sae.pre_activations(x))
        per_row, per_latent = models.active_counts(sae, x)
        fires = fires64(sae, x)
        assert torch.equal(per_row, fires.sum(1)) and torch.equal(per_latent, fires.sum(0))
    with pytest.raises(SaeCompressError, match="no threshold"):
        models.active_counts(TopKSAE(M, N, 4), x)
    assert models.l0_cap(torch.arange(1000), 64) == 64 and models.l0_cap(torch.zeros(5, dtype=torch.long), 64) == 1
    # the 99.9th percentile, rounded up to a value some row reaches: 1 outlier row in 2000 is left out, not in 1000
    assert models.l0_cap(torch.cat([torch.full((1999,), 3), torch.tensor([9])]), 64) == 3
    assert models.l0_cap(torch.cat([torch.full((999,), 3), torch.tensor([9])]), 64) == 9


@pytest.mark.parametrize("mask, encoder", [("topd", "untied"), ("expander", "tied"), ("search", "untied")])
def test_jumprelu_recalibration_matches_each_latents_firing_rate(mask, encoder):
    dense = dense_threshold_sae("jumprelu")
    x = rows()
    sae = convert(dense, 6, mask=mask, encoder=encoder)
    assert (sae.activation, sae.k, sae.threshold.dtype) == ("jumprelu", N, torch.float32)
    assert torch.equal(sae.threshold, dense.threshold)  # copied
    want = fires64(dense, x)
    facts = recalibrate_thresholds(sae, dense, x)
    got = fires64(sae, x)
    # each latent fires on as many rows as the dense one, where its pre-activation is positive often enough
    # (1 row of slack for float32 vs float64 near a cut)
    assert int((got.sum(0) - reachable(dense, sae, x)).abs().max()) <= 1
    assert int((got.sum(0) == want.sum(0)).sum()) > 0.9 * N
    assert int(got[:, 0].sum()) == 0 and bool(torch.isfinite(sae.threshold).all())
    assert float(sae.threshold[0]) > float(sae.pre_activations(x)[:, 0].detach().max())  # above what it reaches
    l0_dense, l0_after = float(want.sum(1).double().mean()), float(got.sum(1).double().mean())
    assert 1 < l0_dense and l0_after == pytest.approx(l0_dense, rel=0.05)
    assert facts["l0_dense"] == pytest.approx(l0_dense, rel=1e-6) and facts["rows"] == ROWS
    assert facts["l0_after"] == pytest.approx(l0_after, abs=2 / ROWS)
    assert facts["l0_before"] != pytest.approx(l0_dense, rel=0.05)  # the projection moved the firing rates
    cap = int(np.quantile(got.sum(1).numpy(), 0.999, method="higher"))
    assert abs(sae.k - cap) <= 1 and facts["max_l0"] == sae.k < N


def test_batchtopk_recalibration_matches_the_mean_l0_with_one_threshold():
    dense = dense_threshold_sae("batchtopk", seed=2)
    x = rows(3)
    sae = convert(dense, 5, mask="topd", encoder="untied")
    facts = recalibrate_thresholds(sae, dense, x)
    assert bool((sae.threshold == sae.threshold[0]).all()) and sae.threshold.dtype == torch.float32
    want, got = fires64(dense, x), fires64(sae, x)
    assert abs(int(got.sum()) - int(want.sum())) <= 1  # the same (latent, row) pairs fire in total
    assert facts["l0_after"] == pytest.approx(float(want.sum(1).double().mean()), abs=1 / ROWS)
    assert 1 <= sae.k < N


def test_least_squares_calibration_after_recalibration_keeps_the_codes(tmp_path):
    """calibrate comes second: it fits the decoder on the recalibrated codes and keeps them (tied: θ scales)."""
    dense = dense_threshold_sae("jumprelu", seed=4)
    x = rows(5)
    np.save(tmp_path / "x.npy", x.numpy())
    for encoder in ("tied", "untied"):
        sae = convert(dense, 6, mask="expander", encoder=encoder)
        recalibrate_thresholds(sae, dense, x)
        before = fires64(sae, x)
        fit = calibrate(sae, open_activations(tmp_path / "x.npy"))
        assert fit["scale"] != pytest.approx(1.0, abs=1e-3), encoder
        assert int((fires64(sae, x) != before).sum()) <= 2, encoder


def test_recalibration_refuses_a_top_k_sae():
    dense = dense_threshold_sae("jumprelu")
    sae = convert(dense, 4)
    with pytest.raises(SaeCompressError, match="threshold SAE"):
        recalibrate_thresholds(convert(saecompress.load(FAMILIES / "saelens_topk"), 4), dense, rows())
    with pytest.raises(SaeCompressError, match="hidden size"):
        recalibrate_thresholds(sae, dense, torch.zeros(3, M + 1))


# ----------------------------------------------------------------------------- CLI on the real families

def family_rows(name: str, path: Path) -> torch.Tensor:
    """The library's own input rows plus more of the same scale, saved at ``path``."""
    x = torch.cat([load_file(str(FAMILIES / name / "io.safetensors"))["x"], 3 * rows(7, 400, 16)])
    np.save(path, x.numpy())
    return x


@pytest.mark.parametrize("name", sorted(THRESHOLD))
def test_threshold_families_convert_and_info_shows_the_activation(name, tmp_path):
    x = family_rows(name, tmp_path / "x.npy")
    out = tmp_path / "out.safetensors"
    result = run("convert", FAMILIES / name, out, "--d", 4, "--acts", tmp_path / "x.npy", "--json")
    assert result.exit_code == 0, result.output
    [report] = json.loads(result.stdout)["hookpoints"]
    assert (report["activation"], report["thresholds"]) == (THRESHOLD[name], "recalibrated")
    dense = saecompress.load(FAMILIES / name)
    l0_dense = float(fires64(dense, x).sum(1).double().mean())
    assert report["l0_dense"] == pytest.approx(l0_dense, rel=1e-6) == report["l0_source"]
    assert report["l0_after"] == pytest.approx(l0_dense, abs=3 / len(x))
    assert report["l0_before"] < l0_dense / 2  # the copied thresholds fire far less after the projection
    assert 1 <= report["k"] < 64 and report["l0"] <= report["l0_after"] + 1e-9
    [facts] = json.loads(run("info", out, "--json").stdout)["hookpoints"]
    assert (facts["activation"], facts["threshold_dtype"], facts["k"]) == (THRESHOLD[name], "float32", report["k"])
    theta = load_compact(out).threshold.double()
    assert (facts["threshold_min"], facts["threshold_max"]) == (float(theta.min()), float(theta.max()))
    assert facts["threshold_min"] <= facts["threshold_median"] <= facts["threshold_max"]
    assert "threshold" in run("info", out).stdout


@pytest.mark.parametrize("name", ["saelens_jumprelu", "gemma_scope_npz", "dl_batchtopk", "saelens_topk"])
def test_info_describes_dense_sources(name):
    result = run("info", FAMILIES / name, "--json")
    assert result.exit_code == 0, result.output
    [facts] = json.loads(result.stdout)["hookpoints"]
    sae = saecompress.load(FAMILIES / name)
    assert (facts["m"], facts["n"], facts["k"], facts["activation"]) == (16, 64, sae.k, sae.activation)
    assert "path" not in facts["source"] and facts["source"]["file"] == name  # shareable: no local path
    if sae.threshold is None:
        assert "threshold_dtype" not in facts
    else:
        theta = sae.threshold.double()
        assert facts["threshold_dtype"] == "float32"
        assert facts["threshold_median"] == pytest.approx(float(theta.median() if len(theta) % 2 else
                                                                theta.sort().values[31:33].mean()))
        assert (facts["threshold_min"], facts["threshold_max"]) == (float(theta.min()), float(theta.max()))
    text = run("info", FAMILIES / name).stdout
    assert sae.activation in text and ("threshold" in text) == (sae.threshold is not None)


@pytest.mark.parametrize("mask", ["topd", "expander", "search"])
@pytest.mark.parametrize("encoder", ["tied", "untied"])
def test_masks_encoders_and_dtypes_store_the_computed_thresholds_bit_for_bit(mask, encoder, tmp_path):
    dtype = "int8" if encoder == "tied" else "bfloat16"
    source = FAMILIES / "saelens_jumprelu"
    x = family_rows("saelens_jumprelu", tmp_path / "x.npy")
    out = tmp_path / "out.safetensors"
    result = run("convert", source, out, "--d", 5, "--mask", mask, "--encoder", encoder, "--dtype", dtype,
                 "--acts", tmp_path / "x.npy", "--json")
    assert result.exit_code == 0, result.output
    [report] = json.loads(result.stdout)["hookpoints"]
    # the same steps by hand: project, recalibrate at the storage precision, least squares (tied: θ·√c)
    dense = saecompress.load(source)
    stored = stored_copy(convert(dense, 5, mask=mask, encoder=encoder), dtype)
    recalibrate_thresholds(stored, dense, x)
    theta = stored.threshold.clone()
    if encoder == "tied":
        theta.mul_(math.sqrt(report["calibration_scale"]))
    loaded = load_compact(out)
    assert loaded.threshold.dtype == torch.float32 and torch.equal(loaded.threshold, theta)
    assert (loaded.activation, loaded.k, loaded.encoder, loaded.mask_seed is None) == (
        "jumprelu", stored.k, encoder, mask == "topd")
    # untied: the least-squares fit keeps the pre-activations; tied: they are rescaled and rounded again
    miss = int((fires64(loaded, x).sum(0) - reachable(dense, stored, x)).abs().sum())
    assert miss <= (2 if encoder == "untied" else 0.01 * float(fires64(dense, x).sum()))


def test_without_acts_the_report_says_the_thresholds_are_uncalibrated(tmp_path):
    out = tmp_path / "out.safetensors"
    result = run("convert", FAMILIES / "gemma_scope_npz", out, "--json")
    assert result.exit_code == 0, result.output
    [report] = json.loads(result.stdout)["hookpoints"]
    assert (report["thresholds"], report["needs_training"], report["k"]) == ("uncalibrated", True, 64)
    assert "uncalibrated" in report["advice"] and "--acts" in report["advice"]
    assert report["l0_before"] is None and report["l0_after"] is None
    assert torch.equal(load_compact(out).threshold, saecompress.load(FAMILIES / "gemma_scope_npz").threshold)
    text = run("convert", FAMILIES / "gemma_scope_npz", tmp_path / "again.safetensors").stdout
    assert "thresholds uncalibrated" in text and "needs --acts" in text and "needs training" in text
    family_rows("gemma_scope_npz", tmp_path / "x.npy")
    measured = run("convert", FAMILIES / "gemma_scope_npz", out, "--acts", tmp_path / "x.npy", "--no-calibrate",
                   "--json")
    [report] = json.loads(measured.stdout)["hookpoints"]
    assert (report["thresholds"], report["needs_training"]) == ("uncalibrated", True)
    assert "--no-calibrate" in report["advice"] and report["l0"] < report["l0_source"]


def test_a_top_k_source_converts_as_before(tmp_path):
    family_rows("saelens_topk", tmp_path / "x.npy")
    result = run("convert", FAMILIES / "saelens_topk", tmp_path / "o.safetensors", "--acts", tmp_path / "x.npy",
                 "--json")
    [report] = json.loads(result.stdout)["hookpoints"]
    assert (report["k"], report["activation"], report["thresholds"], report["l0_after"]) == (4, "topk_relu", None,
                                                                                              None)
    assert "threshold" not in run("convert", FAMILIES / "saelens_topk", tmp_path / "p.safetensors").stdout


# ----------------------------------------------------------------------------- bad inputs

def _edit(folder: Path, name: str, value) -> None:
    """Replace (``None``: drop) tensor ``name`` in the folder's weights file, in the library's own format."""
    [weights] = [p for p in folder.iterdir() if p.name in ("params.npz", "ae.pt", "sae_weights.safetensors")]
    if weights.suffix == ".npz":
        with np.load(weights) as data:
            tensors = {key: data[key] for key in data.files}
        tensors.pop(name) if value is None else tensors.__setitem__(name, value.numpy())
        np.savez(weights, **tensors)
        return
    tensors = torch.load(weights, weights_only=True) if weights.suffix == ".pt" else load_file(str(weights))
    tensors.pop(name) if value is None else tensors.__setitem__(name, value)
    if weights.suffix == ".pt":
        torch.save(tensors, weights)
    else:
        from safetensors.torch import save_file
        save_file(tensors, str(weights))


BAD = {
    "no threshold": (None, "tensor 'threshold' is missing"),
    "wrong shape": (torch.ones(63), "'threshold' has shape (63,), expected (64,)"),
    "nan threshold": (torch.full((64,), float("nan")), "'threshold' contains NaN"),
    "integer threshold": (torch.ones(64, dtype=torch.int32), "'threshold' is not a floating-point tensor"),
}


@pytest.mark.parametrize("name", ["gemma_scope_npz", "dl_jumprelu", "saelens_jumprelu"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_thresholds_are_one_error_line_in_convert_and_info(name, case, tmp_path):
    value, message = BAD[case]
    folder = tmp_path / "sae"
    shutil.copytree(FAMILIES / name, folder)
    _edit(folder, "threshold", value)
    family_rows(name, tmp_path / "x.npy")
    out = tmp_path / "out"
    one_error_line(run("convert", folder, out / "sae.safetensors", "--acts", tmp_path / "x.npy"), message)
    one_error_line(run("info", folder), message)
    assert not out.exists()


def test_unknown_activation_names_are_one_error_line(tmp_path):
    folder = tmp_path / "dl"
    shutil.copytree(FAMILIES / "dl_jumprelu", folder)
    config = json.loads((folder / "config.json").read_text())
    config["trainer"]["dict_class"] = "GatedJumpAutoEncoder"
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out.safetensors"
    one_error_line(run("convert", folder, out), "dict_class 'GatedJumpAutoEncoder'")
    one_error_line(run("info", folder), "dict_class 'GatedJumpAutoEncoder'")
    assert not out.exists()
