"""SAEs of each family as the real libraries write them (``tests/fixtures/families/``, made by
``tests/fixtures/make_families.py`` with sae-lens and dictionary-learning; neither is needed here).

Each folder holds the library's own files and ``io.safetensors``: an input ``x`` and the library's
own ``codes`` (encode) and ``recon`` (decode of those codes) in float64. These tests pin the layout
the libraries actually wrote, check the TopK readers against the libraries' own outputs, and record
that the threshold families are refused today (issue 15 turns those into full support).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import saecompress
from saecompress.cli.main import cli
from saecompress.models import TopKSAE

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
# threshold families -> what today's refusal names
REFUSED = {
    "saelens_jumprelu": "architecture 'jumprelu'",
    "saelens_batchtopk": "architecture 'jumprelu'",  # SAELens saves BatchTopK as JumpReLU
    "saelens_matryoshka_batchtopk": "architecture 'jumprelu'",
    "gemma_scope_npz": "params.npz",  # no reader: the folder is not recognised as an SAE at all
    "dl_batchtopk": "dict_class 'BatchTopKSAE'",
    "dl_jumprelu": "dict_class 'JumpReluAutoEncoder'",
    "dl_matryoshka_batchtopk": "dict_class 'MatryoshkaBatchTopKSAE'",
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
    assert set(REFUSED) | set(TOPK) == set(LAYOUTS)


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


@pytest.mark.parametrize("name", TOPK)
def test_topk_readers_match_the_library_forward(name):
    sae = saecompress.load(FAMILIES / name)
    assert isinstance(sae, TopKSAE) and (sae.m, sae.n, sae.k) == (D_IN, D_SAE, K)
    io = _io(name)
    codes = sae.encode(io["x"], dense=True)
    assert torch.equal(codes != 0, io["codes"] != 0)  # the same latents fire (no ties in this data)
    _close(codes, io["codes"])
    _close(sae(io["x"]), io["recon"])


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_threshold_families_are_refused_today(name, tmp_path):
    """Current behaviour until issue 15: one ``error:`` line, exit 2, naming what was found."""
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(cli, ["convert", str(FAMILIES / name), str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert REFUSED[name] in lines[0]
    assert not out.exists()
