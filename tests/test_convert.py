"""Projection of dense TopK SAEs onto expander masks, and the ``saecompress convert`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from saecompress.cli.main import cli
from saecompress.compact import compact_size_bound, load_compact, read_compact_metadata, save_compact
from saecompress.convert import convert, convert_path, kept_energy
from saecompress.errors import SaeCompressError
from saecompress.mask import expander_mask
from saecompress.models import TopKSAE

M, N, K, D = 32, 256, 8, 4


@pytest.fixture
def dense_sae(dense_io):
    """``dense_sae(seed, m, n, k)``: a TopKSAE on ``dense_io.weights`` and those float64 weights."""
    def make(seed: int = 0, m: int = M, n: int = N, k: int = K) -> tuple[TopKSAE, dict]:
        w = dense_io.weights(seed, m, n)
        sae = TopKSAE(m, n, k)
        with torch.no_grad():
            for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
                getattr(sae, name).data = w[name].float().contiguous()
        return sae, w
    return make


def energy(W: torch.Tensor, idx: torch.Tensor) -> float:
    return float(W.double().gather(1, idx).pow(2).sum() / W.double().pow(2).sum())


def run(*args: str):
    return CliRunner().invoke(cli, ["convert", *map(str, args)])


# ----------------------------------------------------------------------------- projection

def test_expander_projection_keeps_mask_entries(dense_sae):
    dense, w = dense_sae()
    sae = convert(dense, D, mask="expander", seed=3, encoder="tied")
    idx = torch.from_numpy(expander_mask(M, N, D, 3))
    assert sae.mask_seed == 3 and torch.equal(sae.indices, idx)
    # s = 1 minimises |s·P(w) − w|: the decoder keeps the dense entries, unscaled
    assert torch.allclose(sae.values.double(), w["W_dec"].gather(1, idx), rtol=1e-5, atol=1e-6)
    assert sae.enc_values is None and sae.encoder == "tied"
    assert torch.equal(sae.b_enc, dense.b_enc) and torch.equal(sae.b_dec, dense.b_dec)
    assert (sae.activation, sae.k) == (dense.activation, dense.k)
    assert kept_energy(dense, sae.indices) == pytest.approx(energy(w["W_dec"], idx), rel=1e-6)


def test_conversion_is_deterministic(dense_sae, tmp_path):
    dense, _ = dense_sae(1)
    for mask in ("expander", "topd", "search"):
        a = save_compact(convert(dense, D, mask=mask, search_seeds=5), tmp_path / f"{mask}-a.safetensors")
        b = save_compact(convert(dense, D, mask=mask, search_seeds=5), tmp_path / f"{mask}-b.safetensors")
        assert a.read_bytes() == b.read_bytes()
    assert not torch.equal(convert(dense, D, mask="expander", seed=0).indices,
                           convert(dense, D, mask="expander", seed=1).indices)


def test_topd_and_search_keep_at_least_the_expander_energy(dense_sae):
    dense, w = dense_sae(2)
    expander = convert(dense, D, mask="expander", seed=10)
    topd = convert(dense, D, mask="topd")
    search = convert(dense, D, mask="search", seed=10, search_seeds=16)
    e_exp, e_topd, e_search = (kept_energy(dense, s.indices) for s in (expander, topd, search))
    assert e_topd >= e_search >= e_exp
    assert e_topd > e_exp + 0.05  # the data-aware mask is clearly better on a dense random decoder
    want_topd = w["W_dec"].abs().topk(D, dim=1).indices.sort(dim=1).values
    assert torch.equal(topd.indices, want_topd) and topd.mask_seed is None
    energies = [energy(w["W_dec"], torch.from_numpy(expander_mask(M, N, D, s))) for s in range(10, 26)]
    assert search.mask_seed == 10 + int(np.argmax(energies))


def test_untied_keeps_encoder_entries_and_full_degree_is_lossless(dense_sae, dense_io):
    dense, w = dense_sae(3)
    sae = convert(dense, D, encoder="untied")
    assert torch.allclose(sae.enc_values.double(), w["W_enc"].T.gather(1, sae.indices), atol=1e-6)
    full = convert(dense, M, encoder="untied")
    x = dense_io.inputs(m=M).float()
    with torch.no_grad():
        assert torch.allclose(full(x), dense(x), rtol=1e-4, atol=1e-4)


def test_storage_bound_and_ratio(dense_sae, dense_io, tmp_path):
    dense, _ = dense_sae(4)
    for dtype in ("float32", "float16", "int8"):
        path = save_compact(convert(dense, D, mask="expander", encoder="tied"), tmp_path / f"e-{dtype}.safetensors",
                            dtype=dtype)
        assert path.stat().st_size <= compact_size_bound(N, M, D, dtype)
    path = save_compact(convert(dense, D, mask="topd", encoder="tied"), tmp_path / "topd.safetensors")
    assert path.stat().st_size <= compact_size_bound(N, M, D, "float32") + 2 * N * D  # int16 indices
    out = tmp_path / "new" / "folder" / "out.safetensors"
    [report] = convert_path(dense_io.write_saelens(tmp_path / "sae", dense_io.weights(4, M, N), K), out, d=D, mask="expander",
                            encoder="tied", progress=False)
    assert report.storage_ratio == pytest.approx((2 * M * N + M + N) / (N * D + N + M))
    assert report.compression_ratio > 5 and report.file_bytes == out.stat().st_size


def test_bad_projection_arguments(dense_sae):
    dense, _ = dense_sae()
    for kwargs in ({"d": M + 1}, {"d": 0}, {"d": D, "mask": "random"}, {"d": D, "encoder": "shared"},
                   {"d": D, "mask": "search", "search_seeds": 0}):
        d = kwargs.pop("d")
        with pytest.raises(SaeCompressError):
            convert(dense, d, **kwargs)


# ----------------------------------------------------------------------------- convert_path and CLI

def test_cli_converts_saelens_with_activation_metrics(dense_io, tmp_path):
    w = dense_io.weights(5, M, N)
    src = dense_io.write_saelens(tmp_path / "blocks.8.hook_resid_pre", w, K)
    acts = dense_io.inputs(9, rows=300, m=M)
    np.save(tmp_path / "acts.npy", acts.float().numpy())
    out = tmp_path / "out.safetensors"
    result = run(src, out, "--d", D, "--json", "--acts", tmp_path / "acts.npy", "--dtype", "float16")
    assert result.exit_code == 0, result.output
    [report] = json.loads(result.stdout)["hookpoints"]
    for key in ("source_format", "m", "n", "d", "k", "activation", "mask", "kept_energy", "file_bytes",
                "source_bytes", "compression_ratio", "fvu_source", "fvu", "l0", "dead_fraction"):
        assert report[key] is not None, key
    got = (report["source_format"], report["m"], report["n"], report["d"], report["mask"])
    assert got == ("saelens", M, N, D, "topd")
    x = acts.float().double()
    err = (x - dense_io.saelens_forward(x, w, K)).pow(2).sum()
    want_fvu = float(err / (x - x.mean(0)).pow(2).sum())
    assert report["fvu_source"] == pytest.approx(want_fvu, rel=1e-4)
    sae = load_compact(out)
    with torch.no_grad():
        x_hat = sae(acts.float()).double()
    assert report["fvu"] == pytest.approx(float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-4)
    assert 0 < report["l0"] <= K and 0 <= report["dead_fraction"] < 1
    meta = read_compact_metadata(out)
    assert meta["dtype"] == "float16" and meta["source"]["library"] == "saelens"
    assert meta["user"]["convert"]["fvu"] == pytest.approx(report["fvu"])
    conversion = meta["user"]["conversion"]
    assert (conversion["mask"], conversion["d"], conversion["kept_energy"]) == ("topd", D, report["kept_energy"])
    assert conversion["calibration"] == {"scale": report["calibration_scale"], "rows": 300}
    again = run(out, tmp_path / "again.safetensors")
    assert again.exit_code == 2 and "already a compact" in again.stderr


def test_paper_checkpoint_converts_losslessly(dense_io, tmp_path):
    path = tmp_path / "expander_tied_m16_n64_d3_k5_seed0.pt"
    sd = dense_io.write_paper(path)
    out = tmp_path / "paper.safetensors"
    result = run(path, out, "--json")
    assert result.exit_code == 0, result.output
    [report] = json.loads(result.stdout)["hookpoints"]
    assert (report["mask"], report["d"], report["k"], report["kept_energy"]) == ("imported", 3, 5, pytest.approx(1.0))
    sae = load_compact(out)
    assert sae.mask_seed is None and read_compact_metadata(out)["mask"] == "explicit"
    x = dense_io.inputs()
    with torch.no_grad():
        got = sae(x.float()).double()
    want = dense_io.paper_forward(x, sd, 5)
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_many_hookpoints_convert_into_a_folder(dense_io, tmp_path):
    repo = tmp_path / "repo"
    for layer in range(3):
        dense_io.write_sparsify(repo / f"layers.{layer}", dense_io.weights(layer, M, N), K)
    out = tmp_path / "out"
    result = run(repo, out, "--d", D, "--mask", "search", "--search-seeds", 4, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["hookpoints"]
    assert [r["hookpoint"] for r in rows] == ["layers.0", "layers.1", "layers.2"]
    assert sorted(p.name for p in out.iterdir()) == [f"layers.{i}.safetensors" for i in range(3)]
    assert read_compact_metadata(out / "layers.1.safetensors")["source"]["hookpoint"] == "layers.1"
    one = tmp_path / "one.safetensors"
    result = run(repo, one, "--hookpoint", "layers.2", "--d", D)
    assert result.exit_code == 0 and one.is_file() and "layers.2: sparsify" in result.stdout
    assert "kept energy" in result.stdout
    # one bad hookpoint: nothing at all is written
    (repo / "layers.1" / "sae.safetensors").write_bytes(b"garbage")
    result = run(repo, tmp_path / "out2", "--d", D)
    assert result.exit_code == 2 and not (tmp_path / "out2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out2")]


def _bad_sources(dense_io, tmp_path: Path) -> dict[str, tuple[Path, tuple[str, ...], str]]:
    w = dense_io.weights(0, M, N)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "readme.md").write_text("not an SAE")
    missing = dense_io.write_saelens(tmp_path / "missing", w, K)
    from safetensors.torch import save_file

    save_file({"W_enc": w["W_enc"].float().contiguous(), "W_dec": w["W_dec"].float()},
              str(missing / "sae_weights.safetensors"))
    shape = dense_io.write_sparsify(tmp_path / "shape", w, K)
    cfg = json.loads((shape / "cfg.json").read_text())
    (shape / "cfg.json").write_text(json.dumps(dict(cfg, d_in=M + 1)))
    return {
        "wrong layout": (wrong, (), "supported layouts"),
        "missing tensors": (missing, (), "is missing"),
        "shape mismatch": (shape, (), "shape"),
        "jumprelu without threshold": (dense_io.write_saelens(tmp_path / "jumprelu", w, K, architecture="jumprelu"),
                                       (), "'threshold' is missing"),
        "gated": (dense_io.write_saelens(tmp_path / "gated", w, K, architecture="gated"), (), "TopK"),
        "ReLU openai": (dense_io.write_openai(tmp_path / "relu.pt", w, activation="ReLU"), (), "TopK"),
        "missing hookpoint": (dense_io.write_sparsify(tmp_path / "repo" / "layers.0", w, K).parent,
                              ("--hookpoint", "layers.9"), "not found"),
        "d too large": (dense_io.write_sparsify(tmp_path / "ok", w, K), ("--d", M + 1), "--d"),
        "paper without k": (tmp_path / "ckpt.pt", (), "--k"),
    }


def test_bad_inputs_exit_2_with_one_line_and_no_output(dense_io, tmp_path):
    dense_io.write_paper(tmp_path / "ckpt.pt")
    for name, (src, extra, needle) in _bad_sources(dense_io, tmp_path).items():
        out = tmp_path / f"out-{name.replace(' ', '_')}.safetensors"
        result = run(src, out, *extra)
        assert result.exit_code == 2, (name, result.output)
        message = result.stderr.strip()
        assert message.startswith("error: ") and "\n" not in message and needle in message, (name, message)
        assert not out.exists(), name
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}")], name
