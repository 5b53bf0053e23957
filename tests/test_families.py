"""SAEs of each family as the real libraries write them (``tests/fixtures/families/``, made by
``tests/fixtures/make_families.py`` with sae-lens and dictionary-learning; neither is needed here).

Each folder holds the library's own files and ``io.safetensors``: an input ``x`` and the library's
own ``codes`` (encode) and ``recon`` (decode of those codes) in float64. These tests pin the layout
the libraries actually wrote and check every reader against the libraries' own outputs; the threshold
families (JumpReLU, BatchTopK, Matryoshka) are read (converted: ``test_threshold_convert.py``), and the
commands that cannot take them yet say so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import saecompress
from saecompress.cli.main import cli
from saecompress.formats import saelens
from saecompress.models import TopKSAE
from saecompress.sources import load_source

FAMILIES = Path(__file__).parent / "fixtures" / "families"
D_IN, D_SAE, K, ROWS = 16, 64, 4, 32
F32 = torch.float32

_SAELENS_TENSORS = {"W_enc": ((D_IN, D_SAE), F32), "W_dec": ((D_SAE, D_IN), F32),
                    "b_enc": ((D_SAE,), F32), "b_dec": ((D_IN,), F32)}
_JUMPRELU_TENSORS = {**_SAELENS_TENSORS, "threshold": ((D_SAE,), F32)}
_SAELENS_V6_KEYS = {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                    "normalize_activations", "reshape_activations", "metadata"}
_DL_LINEAR = {"encoder.weight": ((D_SAE, D_IN), F32), "encoder.bias": ((D_SAE,), F32),
              "decoder.weight": ((D_IN, D_SAE), F32), "b_dec": ((D_IN,), F32),
              "k": ((), torch.int32), "threshold": ((), F32)}
_DL_PARAMS = {"W_enc": ((D_IN, D_SAE), F32), "b_enc": ((D_SAE,), F32), "W_dec": ((D_SAE, D_IN), F32),
              "b_dec": ((D_IN,), F32)}

# folder -> (files, tensors file, {tensor: (shape, dtype)})
LAYOUTS = {
    "saelens_topk": ({"cfg.json", "sae_weights.safetensors"}, "sae_weights.safetensors", _SAELENS_TENSORS),
    "saelens_topk_v5cfg": ({"cfg.json", "sae_weights.safetensors"}, "sae_weights.safetensors", _SAELENS_TENSORS),
    "saelens_jumprelu": ({"cfg.json", "sae_weights.safetensors"}, "sae_weights.safetensors", _JUMPRELU_TENSORS),
    "saelens_batchtopk": ({"cfg.json", "sae_weights.safetensors"}, "sae_weights.safetensors", _JUMPRELU_TENSORS),
    "saelens_matryoshka_batchtopk": ({"cfg.json", "sae_weights.safetensors"}, "sae_weights.safetensors",
                                     _JUMPRELU_TENSORS),
    "gemma_scope_npz": ({"params.npz"}, "params.npz", _JUMPRELU_TENSORS),
    "dl_topk": ({"ae.pt", "config.json"}, "ae.pt", _DL_LINEAR),
    "dl_batchtopk": ({"ae.pt", "config.json"}, "ae.pt", _DL_LINEAR),
    "dl_jumprelu": ({"ae.pt", "config.json"}, "ae.pt", {**_DL_PARAMS, "threshold": ((D_SAE,), F32)}),
    "dl_matryoshka_batchtopk": ({"ae.pt", "config.json"}, "ae.pt",
                                {**_DL_PARAMS, "k": ((), torch.int32), "threshold": ((), F32),
                                 "group_sizes": ((3,), torch.int64)}),
}
TOPK = ("saelens_topk", "saelens_topk_v5cfg", "dl_topk")
# threshold families -> the activation they read as
THRESHOLD = {
    "saelens_jumprelu": "jumprelu",
    "saelens_batchtopk": "batchtopk",  # SAELens saves BatchTopK as JumpReLU with a repeated global threshold
    "saelens_matryoshka_batchtopk": "batchtopk",
    "gemma_scope_npz": "jumprelu",
    "dl_batchtopk": "batchtopk",
    "dl_jumprelu": "jumprelu",
    "dl_matryoshka_batchtopk": "batchtopk",
}


def _tensors(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".npz":
        with np.load(file, allow_pickle=False) as data:
            return {name: torch.from_numpy(data[name]) for name in data.files}
    if file.suffix == ".pt":
        return torch.load(file, map_location="cpu", weights_only=True)
    return load_file(str(file))


def _io(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FAMILIES / name / "io.safetensors"))


def _json(name: str, file: str) -> dict:
    return json.loads((FAMILIES / name / file).read_text())


def test_every_fixture_folder_is_pinned_here():
    assert {p.name for p in FAMILIES.iterdir() if p.is_dir()} == set(LAYOUTS)
    assert set(THRESHOLD) | set(TOPK) == set(LAYOUTS)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_fixture_files_are_what_the_library_wrote(name):
    files, weights, expected = LAYOUTS[name]
    folder = FAMILIES / name
    assert {p.name for p in folder.iterdir()} == files | {"io.safetensors"}
    assert all(p.stat().st_size < 100_000 for p in folder.iterdir())
    found = _tensors(folder / weights)
    assert {key: (tuple(t.shape), t.dtype) for key, t in found.items()} == expected
    for key, value in found.items():
        assert bool(torch.isfinite(value.double()).all()), key
        if value.ndim == 2:
            assert torch.linalg.matrix_rank(value.double()) == min(value.shape), key  # non-degenerate
    if "threshold" in found and name != "dl_topk":
        assert bool((found["threshold"] > 0).all())
    io = _io(name)
    assert {key: (tuple(t.shape), t.dtype) for key, t in io.items()} == {
        "x": ((ROWS, D_IN), F32), "codes": ((ROWS, D_SAE), torch.float64), "recon": ((ROWS, D_IN), torch.float64)}
    fired = (io["codes"] != 0).sum(-1)
    if name in TOPK:
        assert bool((fired == K).all())
    else:  # the threshold decides: a varying handful of latents per row
        assert 1 <= int(fired.min()) < int(fired.max()) <= 20


def test_saelens_v6_cfg_as_written():
    topk = _json("saelens_topk", "cfg.json")
    assert set(topk) == _SAELENS_V6_KEYS | {"k", "rescale_acts_by_decoder_norm"}
    assert (topk["architecture"], topk["k"], topk["d_in"], topk["d_sae"]) == ("topk", K, D_IN, D_SAE)
    # the training runner folds the decoder norms into the encoder on save but keeps the flag
    assert topk["rescale_acts_by_decoder_norm"] is True
    W_dec = load_file(str(FAMILIES / "saelens_topk" / "sae_weights.safetensors"))["W_dec"].double()
    assert torch.allclose(W_dec.norm(dim=1), torch.ones(D_SAE, dtype=torch.float64), atol=1e-6)
    for name, training in (("saelens_jumprelu", "jumprelu"), ("saelens_batchtopk", "batchtopk"),
                           ("saelens_matryoshka_batchtopk", "matryoshka_batchtopk")):
        cfg = _json(name, "cfg.json")
        assert set(cfg) == _SAELENS_V6_KEYS and cfg["architecture"] == "jumprelu", name
        assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none", name
        assert cfg["metadata"]["training_architecture"] == training, name
        assert cfg["metadata"]["sae_lens_version"] == "6.54.12", name
    details = _json("saelens_matryoshka_batchtopk", "cfg.json")["metadata"]["training_architecture_details"]
    assert details["matryoshka_widths"] == [16, 32, 64] and details["k"] == K
    for name in ("saelens_batchtopk", "saelens_matryoshka_batchtopk"):  # one global threshold, per latent
        threshold = load_file(str(FAMILIES / name / "sae_weights.safetensors"))["threshold"]
        assert bool((threshold == threshold[0]).all()), name
    threshold = load_file(str(FAMILIES / "saelens_jumprelu" / "sae_weights.safetensors"))["threshold"]
    assert len(set(threshold.tolist())) == D_SAE


def test_saelens_pre6_cfg_spelling():
    cfg = _json("saelens_topk_v5cfg", "cfg.json")
    assert "architecture" not in cfg and "metadata" not in cfg
    assert (cfg["activation_fn_str"], cfg["activation_fn_kwargs"]) == ("topk", {"k": K})
    assert cfg["hook_point"] == "blocks.0.hook_resid_post"


def test_dictionary_learning_config_as_written():
    expected = {"dl_topk": ("TopKTrainer", "AutoEncoderTopK"), "dl_batchtopk": ("BatchTopKTrainer", "BatchTopKSAE"),
                "dl_jumprelu": ("JumpReluTrainer", "JumpReluAutoEncoder"),
                "dl_matryoshka_batchtopk": ("MatryoshkaBatchTopKTrainer", "MatryoshkaBatchTopKSAE")}
    for name, (trainer_class, dict_class) in expected.items():
        config = _json(name, "config.json")
        assert set(config) == {"trainer", "buffer"}, name
        trainer = config["trainer"]
        assert (trainer["trainer_class"], trainer["dict_class"]) == (trainer_class, dict_class), name
        assert (trainer["activation_dim"], trainer["dict_size"], trainer["layer"]) == (D_IN, D_SAE, 0), name
        assert trainer["submodule_name"] == "resid_post_layer_0", name
        assert ("k" in trainer) == (name != "dl_jumprelu"), name
    matryoshka = _json("dl_matryoshka_batchtopk", "config.json")["trainer"]
    assert matryoshka["group_sizes"] == [16, 16, 32] and matryoshka["group_fractions"] == [0.25, 0.25, 0.5]
    state = torch.load(FAMILIES / "dl_matryoshka_batchtopk" / "ae.pt", weights_only=True)
    assert state["group_sizes"].tolist() == [16, 16, 32] and int(state["k"]) == K


def test_fixtures_hold_no_local_path():
    for file in FAMILIES.glob("*/*.json"):
        text = file.read_text()
        assert "/work" not in text and "/tmp" not in text and "/home" not in text, file


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    err = float((got.detach().double() - want).norm() / want.norm())
    assert err < rtol, f"relative error {err:.2e}"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_readers_match_the_library_forward(name):
    sae = saecompress.load(FAMILIES / name)
    assert isinstance(sae, TopKSAE) and (sae.m, sae.n) == (D_IN, D_SAE)
    if name in TOPK:
        assert sae.k == K and sae.threshold is None
    else:  # nothing above threshold is dropped
        assert (sae.k, sae.activation, sae.threshold.dtype) == (D_SAE, THRESHOLD[name], F32)
    io = _io(name)
    codes = sae.encode(io["x"], dense=True)
    assert torch.equal(codes != 0, io["codes"] != 0)  # the same latents fire (no ties in this data)
    _close(codes, io["codes"])
    _close(sae(io["x"]), io["recon"])


@pytest.mark.parametrize("name", ["saelens_batchtopk", "dl_jumprelu"])
def test_threshold_saes_save_as_saelens_jumprelu_and_read_back(name, tmp_path):
    sae = saecompress.load(FAMILIES / name)
    saelens.save_dense(sae, tmp_path / "saved")
    back = saecompress.load(tmp_path / "saved")
    assert (back.activation, back.k) == (sae.activation, sae.n)
    assert torch.equal(back.threshold, sae.threshold)
    x = _io(name)["x"]
    assert torch.equal(back.encode(x, dense=True), sae.encode(x, dense=True))


def test_threshold_families_keep_what_they_were_trained_as():
    facts = {name: load_source(FAMILIES / name).provenance for name in THRESHOLD}
    assert facts["saelens_jumprelu"]["training_architecture"] == "jumprelu"
    assert facts["saelens_batchtopk"]["training_architecture"] == "batchtopk"
    assert facts["saelens_matryoshka_batchtopk"]["training_architecture"] == "matryoshka_batchtopk"
    assert facts["saelens_matryoshka_batchtopk"]["matryoshka_widths"] == [16, 32, 64]
    assert facts["dl_matryoshka_batchtopk"]["group_sizes"] == [16, 16, 32]
    assert facts["gemma_scope_npz"]["library"] == "gemma_scope"
    for name in ("saelens_matryoshka_batchtopk", "dl_matryoshka_batchtopk"):  # latent order kept: nested groups
        sae = saecompress.load(FAMILIES / name)
        weights = _tensors(FAMILIES / name / LAYOUTS[name][1])
        assert torch.equal(sae.W_dec, weights["W_dec"]), name


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_eval_runs_on_every_family(name, tmp_path):
    io = _io(name)
    acts = tmp_path / "x.npy"
    np.save(acts, io["x"].numpy())
    result = CliRunner().invoke(cli, ["eval", str(FAMILIES / name), "--acts", str(acts), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["hookpoints"][0]
    assert report["l0"] == pytest.approx(float((io["codes"] != 0).sum(-1).double().mean()))
    x = io["x"].double()
    fvu = float((x - io["recon"]).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert report["fvu"] == pytest.approx(fvu, rel=1e-4)


def test_norm_scaling_factor_is_folded_into_weights_and_thresholds(tmp_path):
    """Llama Scope style: the SAE sees ``factor · x``. Folded, the thresholds act on the right scale."""
    factor = 5.0
    folder = tmp_path / "scaled"
    shutil.copytree(FAMILIES / "saelens_jumprelu", folder)
    cfg = _json("saelens_jumprelu", "cfg.json") | {"normalize_activations": "expected_average_only_in",
                                                    "norm_scaling_factor": factor}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    io = _io("saelens_jumprelu")
    x = io["x"] / factor  # raw activations whose scaled version the library's outputs are for
    sae = saecompress.load(folder)
    codes = sae.encode(x, dense=True)
    assert torch.equal(codes != 0, io["codes"] != 0)
    _close(codes, io["codes"])
    _close(sae(x), io["recon"] / factor)
    unscaled = saecompress.load(FAMILIES / "saelens_jumprelu")  # the same thresholds, the factor ignored
    l0 = float((io["codes"] != 0).sum(-1).double().mean())
    assert float((unscaled.encode(x, dense=True) != 0).sum(-1).double().mean()) < l0 / 3


def _one_error_line(args: list[str], *needles: str, unwritten: Path) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not unwritten.exists()


def _edit_threshold(folder: Path, value) -> None:
    weights = folder / "sae_weights.safetensors"
    tensors = load_file(str(weights))
    if value is None:
        del tensors["threshold"]
    else:
        tensors["threshold"] = value
    save_file(tensors, str(weights))


BAD = {
    "no threshold": (None, "tensor 'threshold' is missing"),
    "wrong shape": (torch.ones(D_SAE - 1), "'threshold' has shape (63,), expected (64,)"),
    "nan threshold": (torch.full((D_SAE,), float("nan")), "'threshold' contains NaN"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_threshold_files_are_one_error_line(case, tmp_path):
    value, message = BAD[case]
    folder = tmp_path / "sae"
    shutil.copytree(FAMILIES / "saelens_jumprelu", folder)
    _edit_threshold(folder, value)
    out = tmp_path / "out"
    _one_error_line(["convert", str(folder), str(out / "sae.safetensors")], message, unwritten=out)
    _one_error_line(["export", str(folder), str(out)], message, unwritten=out)


def test_unknown_activation_in_a_config_is_one_error_line(tmp_path):
    folder = tmp_path / "sae"
    shutil.copytree(FAMILIES / "saelens_jumprelu", folder)
    (folder / "cfg.json").write_text(json.dumps(_json("saelens_jumprelu", "cfg.json") | {"architecture": "mystery"}))
    out = tmp_path / "out.safetensors"
    _one_error_line(["convert", str(folder), str(out)], "architecture 'mystery'", unwritten=out)


@pytest.mark.parametrize("name", sorted(THRESHOLD))
def test_threshold_families_export_and_monitor_like_the_library(name, tmp_path):
    """ONNX codes and reconstruction match the library's own; a small max_l0 counts the rest as overflow."""
    io = _io(name)
    x, fired = io["x"].numpy(), (io["codes"] != 0).sum(-1).numpy()
    acts = tmp_path / "x.npy"
    np.save(acts, x)
    out = tmp_path / "sae.onnx"
    _one_error_line(["export", str(FAMILIES / name), str(out)], "no cap", "--max-l0", unwritten=out)
    _one_error_line(["monitor", str(FAMILIES / name), "--input", str(acts)], "--max-l0", unwritten=out)
    assert max(fired) <= 20 < D_SAE and (fired > 3).any()
    for max_l0 in (3, 20):  # 20: every row's latents fit, the codes are the library's
        result = CliRunner().invoke(cli, ["export", str(FAMILIES / name), str(out), "--graph", "autoencoder",
                                          "--dense-output", "--max-l0", str(max_l0)])
        assert result.exit_code == 0, result.output
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"activations": x})))
        np.testing.assert_array_equal(got["overflow"], np.maximum(fired - max_l0, 0))
        assert ((got["top_indices"] == -1) == (got["top_values"] == 0)).all()
    assert np.array_equal(got["codes"] != 0, io["codes"].numpy() != 0)
    _close(torch.from_numpy(got["codes"]), io["codes"])
    _close(torch.from_numpy(got["reconstruction"]), io["recon"])
    result = CliRunner().invoke(cli, ["monitor", str(FAMILIES / name), "--input", str(acts), "--max-l0", "3",
                                      "--jsonl"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stderr.strip().splitlines()[-1])["summary"]
    assert summary["overflow_rows"] == int((fired > 3).sum())
    assert summary["overflow_latents"] == int(np.maximum(fired - 3, 0).sum())


