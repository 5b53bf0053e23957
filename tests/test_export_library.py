"""``export --format saelens|sparsify``: the dense view in each library's own layout, read back by the readers of
those layouts (the formats/ readers, which tests/test_formats.py checks against files the libraries write) and
computing what the compact file computes."""

import json

import pytest
import torch
from click.testing import CliRunner

from saecompress.cli.main import cli
from saecompress.compact import save_compact
from saecompress.errors import SaeCompressError
from saecompress.exporters.library import export_library
from saecompress.models import ExpanderSAE
from saecompress.sources import load_source

M, N, D, K = 24, 96, 5, 6


def expander(activation: str, *, seed: int = 0, k: int = K, **kw) -> ExpanderSAE:
    torch.manual_seed(seed)
    threshold = torch.rand(N) * 0.3 if activation in ("jumprelu", "batchtopk") else None
    sae = ExpanderSAE(M, N, D, k, seed=seed, activation=activation, encoder="untied", threshold=threshold, **kw)
    with torch.no_grad():
        sae.enc_values.normal_()
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_()
    return sae.double()


def rows(n: int = 300) -> torch.Tensor:
    return torch.randn(n, M, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2


@pytest.mark.parametrize("library,activation", [("saelens", "topk_relu"), ("saelens", "relu_topk"),
                                                ("saelens", "jumprelu"), ("sparsify", "relu_topk"),
                                                ("sparsify", "topk_relu")])
def test_the_library_folder_computes_what_the_compact_file_computes(tmp_path, library, activation):
    sae = expander(activation)
    save_compact(sae, tmp_path / "sae.safetensors", metadata={"training": {"hookpoint": "blocks.3.hook_resid_post"}})
    compact = load_source(tmp_path / "sae.safetensors").model.double()
    folder, notes = export_library(tmp_path / "sae.safetensors", tmp_path / library, library)
    assert notes == ([f"SAELens keeps every latent above its threshold: the cap of {K} latents per row is not "
                      "applied"] if activation == "jumprelu" else [])
    names = {"saelens": {"cfg.json", "sae_weights.safetensors"}, "sparsify": {"cfg.json", "sae.safetensors"}}
    assert {p.name for p in folder.iterdir()} == names[library]
    back = load_source(folder)
    assert back.provenance["library"] == library
    dense = back.model.double()
    x = rows()
    with torch.no_grad():
        want, got = compact(x), dense(x)
    assert float((want - got).norm() / want.norm()) < 1e-6
    want_codes = compact.encode(x, dense=True)
    assert torch.equal(want_codes != 0, dense.encode(x, dense=True) != 0)
    if library == "saelens":
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
        assert cfg["architecture"] == ("jumprelu" if activation == "jumprelu" else "topk")
        assert (cfg["d_in"], cfg["d_sae"]) == (M, N)


def test_what_a_library_cannot_hold_is_refused_or_said(tmp_path):
    save_compact(expander("signed_topk"), tmp_path / "signed.safetensors")
    with pytest.raises(SaeCompressError, match="--approximate"):
        export_library(tmp_path / "signed.safetensors", tmp_path / "a", "saelens")
    assert not (tmp_path / "a").exists()
    folder, notes = export_library(tmp_path / "signed.safetensors", tmp_path / "b", "sparsify", approximate=True)
    assert notes and "negative codes become 0" in notes[0]
    assert load_source(folder).model.activation == "relu_topk"
    save_compact(expander("jumprelu"), tmp_path / "jr.safetensors")
    with pytest.raises(SaeCompressError, match="--format saelens"):
        export_library(tmp_path / "jr.safetensors", tmp_path / "c", "sparsify")
    save_compact(expander("topk_relu", normalize_input=True), tmp_path / "ln.safetensors")
    with pytest.raises(SaeCompressError, match="layer norm"):
        export_library(tmp_path / "ln.safetensors", tmp_path / "d", "sparsify")


def test_cli_format_options(tmp_path):
    save_compact(expander("topk_relu").float(), tmp_path / "sae.safetensors")
    runner = CliRunner()
    result = runner.invoke(cli, ["export", str(tmp_path / "sae.safetensors"), str(tmp_path / "lens"), "--format",
                                 "saelens", "--model-name", "my-llama", "--hook-name", "blocks.1.hook_resid_post"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["hookpoints"][0]["format"] == "saelens"
    meta = json.loads((tmp_path / "lens" / "cfg.json").read_text())["metadata"]
    assert (meta["model_name"], meta["hook_name"]) == ("my-llama", "blocks.1.hook_resid_post")
    for argv, words in ((["--format", "saelens", "--graph", "decode"], "--graph"),
                        (["--approximate"], "--format"),
                        (["--format", "sparsify", "--hook-name", "x"], "sparsify"),
                        (["--format", "saelens"], "holds the input")):
        out = tmp_path if words == "holds the input" else tmp_path / "x"
        result = runner.invoke(cli, ["export", str(tmp_path / "sae.safetensors"), str(out), *argv])
        assert result.exit_code == 2 and words in result.output, (argv, result.output)


def exported(tmp_path, library: str, activation: str):
    sae = expander(activation, k=N if activation == "jumprelu" else K).float()  # SAELens has no cap on L0
    save_compact(sae, tmp_path / "sae.safetensors")
    return load_source(tmp_path / "sae.safetensors").model, export_library(tmp_path / "sae.safetensors",
                                                                          tmp_path / library, library)[0]


@pytest.mark.parametrize("activation", ["topk_relu", "jumprelu"])
def test_saelens_itself_loads_the_export(tmp_path, activation):
    """Runs where SAELens is installed (tests/check_libraries.sh makes such an environment)."""
    sae_lens = pytest.importorskip("sae_lens")
    compact, folder = exported(tmp_path, "saelens", activation)
    lens = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    x = rows().float()
    with torch.no_grad():
        want, got = compact.encode(x, dense=True), lens.encode(x)
    assert torch.equal(want != 0, got != 0)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_sparsify_itself_loads_the_export(tmp_path):
    """Runs where sparsify is installed (tests/check_libraries.sh makes such an environment)."""
    sparsify = pytest.importorskip("sparsify")
    compact, folder = exported(tmp_path, "sparsify", "relu_topk")
    coder = sparsify.SparseCoder.load_from_disk(folder, device="cpu")
    x = rows().float()
    with torch.no_grad():
        values, indices = compact.encode(x)
        out = coder.encode(x)
    want = torch.zeros(x.shape[0], N).scatter(1, indices, values)
    got = torch.zeros(x.shape[0], N).scatter(1, out.top_indices, out.top_acts)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
