"""Readers: small SAEs written the way each library writes them, read back and checked against
each library's documented forward pass, restated here in float64."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from saecompress.errors import SaeCompressError
from saecompress.formats import detect_format, list_hookpoints, read_sae
from saecompress.formats.paper import read_paper_checkpoint
from saecompress.models import ExpanderSAE, TopKSAE

M, N, K = 16, 64, 6


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    err = float((got.detach().double() - want).norm() / want.norm())
    assert err < rtol, f"relative error {err:.2e}"


# ----------------------------------------------------------------------------- SAELens

def test_saelens_v6_round_trip(dense_io, tmp_path):
    w = dense_io.weights()
    folder = dense_io.write_saelens(tmp_path / "blocks.8.hook_resid_pre", w)
    assert detect_format(folder) == "saelens"
    assert list_hookpoints(folder) == [""]
    sae, provenance = read_sae(folder)
    assert isinstance(sae, TopKSAE) and (sae.m, sae.n, sae.k, sae.activation) == (M, N, K, "topk_relu")
    x = dense_io.inputs()
    close(sae(x.float()), dense_io.saelens_forward(x, w, K))
    assert provenance["library"] == "saelens"
    assert provenance["model_name"] == "gpt2"
    assert provenance["hookpoint"] == "blocks.8.hook_resid_pre"


def test_saelens_bf16_source_is_read_exactly(dense_io, tmp_path):
    w = {name: t.to(torch.bfloat16).double() for name, t in dense_io.weights(3).items()}
    folder = dense_io.write_saelens(tmp_path / "sae", w, dtype=torch.bfloat16)
    sae, provenance = read_sae(folder / "sae_weights.safetensors")  # the weights file works as a path too
    assert provenance["source_dtype"] == "bfloat16"
    assert sae.W_dec.dtype == torch.float32
    x = dense_io.inputs()
    close(sae(x.float()), dense_io.saelens_forward(x, w, K))


def test_saelens_pre6_config(dense_io, tmp_path):
    w = dense_io.weights(1)
    sae, provenance = read_sae(dense_io.write_saelens(tmp_path / "old", w, version=5))
    assert sae.k == K and provenance["model_name"] == "pythia-70m-deduped"
    x = dense_io.inputs()
    close(sae(x.float()), dense_io.saelens_forward(x, w, K))


def test_saelens_folds_b_dec_layer_norm_scalings(dense_io, tmp_path):
    w = dense_io.weights(2)
    x = dense_io.inputs(4)
    sae, _ = read_sae(dense_io.write_saelens(tmp_path / "nobdec", w, apply_b_dec_to_input=False))
    close(sae(x.float()), dense_io.saelens_forward(x, w, K, apply_b_dec=False))
    sae, _ = read_sae(dense_io.write_saelens(tmp_path / "ln", w, normalize_activations="layer_norm"))
    assert sae.normalize_input
    close(sae(x.float()), dense_io.saelens_forward(x, w, K, layer_norm=True), rtol=1e-4)
    sae, _ = read_sae(dense_io.write_saelens(tmp_path / "scaled", w, normalize_activations="expected_average_only_in",
                                    norm_scaling_factor=0.37))
    close(sae(x.float()), dense_io.saelens_forward(x, w, K, scale_in=0.37))
    scaling = torch.rand(N, dtype=torch.float64) + 0.5
    sae, _ = read_sae(dense_io.write_saelens(tmp_path / "ft", w, version=5, tensors={"scaling_factor": scaling},
                                    finetuning_scaling_factor=True))
    close(sae(x.float()), dense_io.saelens_forward(x, w, K, scaling=scaling.float().double()))
    w_big = dict(w, W_dec=w["W_dec"] * (torch.rand(N, 1, dtype=torch.float64) + 0.5))
    sae, _ = read_sae(dense_io.write_saelens(tmp_path / "rescale", w_big, rescale_acts_by_decoder_norm=True))
    close(sae(x.float()), dense_io.saelens_forward(x, w_big, K, rescale=True))


@pytest.mark.parametrize("architecture", ["batchtopk", "standard", "gated"])
def test_saelens_non_topk_refused(dense_io, tmp_path, architecture):
    folder = dense_io.write_saelens(tmp_path / "s", dense_io.weights(), architecture=architecture)
    with pytest.raises(SaeCompressError, match="TopK"):
        read_sae(folder)


def test_saelens_refuses_unfoldable_normalisation(dense_io, tmp_path):
    with pytest.raises(SaeCompressError, match="scaling factor"):
        read_sae(dense_io.write_saelens(tmp_path / "a", dense_io.weights(), normalize_activations="expected_average_only_in"))
    with pytest.raises(SaeCompressError, match="constant_norm_rescale"):
        read_sae(dense_io.write_saelens(tmp_path / "b", dense_io.weights(), normalize_activations="constant_norm_rescale"))


def test_saelens_missing_tensor_and_shape_mismatch(dense_io, tmp_path):
    folder = dense_io.write_saelens(tmp_path / "s", dense_io.weights())
    w = dense_io.weights()
    save_file({"W_enc": w["W_enc"].float().contiguous(), "W_dec": w["W_dec"].float(), "b_dec": w["b_dec"].float()},
              str(folder / "sae_weights.safetensors"))
    with pytest.raises(SaeCompressError, match="'b_enc' is missing"):
        read_sae(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    dense_io.write_saelens(folder, w)
    (folder / "cfg.json").write_text(json.dumps(dict(cfg, d_sae=N + 1)))
    with pytest.raises(SaeCompressError, match="shape"):
        read_sae(folder)


def test_corrupt_files_give_clear_errors(dense_io, tmp_path):
    folder = dense_io.write_saelens(tmp_path / "s", dense_io.weights())
    data = (folder / "sae_weights.safetensors").read_bytes()
    (folder / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SaeCompressError, match="sae_weights.safetensors"):
        read_sae(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(SaeCompressError, match="cfg.json"):
        read_sae(folder)
    w = dense_io.weights()
    w["W_dec"][3, 2] = float("nan")
    with pytest.raises(SaeCompressError, match="NaN"):
        read_sae(dense_io.write_saelens(tmp_path / "nan", w))


# ----------------------------------------------------------------------------- sparsify

def test_sparsify_hookpoint_round_trip(dense_io, tmp_path):
    w = dense_io.weights(5)
    folder = dense_io.write_sparsify(tmp_path / "layers.6", w)
    assert detect_format(folder) == "sparsify"
    sae, provenance = read_sae(folder)
    assert sae.activation == "relu_topk" and provenance["hookpoint"] == "layers.6"
    x = dense_io.inputs()
    close(sae(x.float()), dense_io.sparsify_forward(x, w, K))


def test_sparsify_bf16_and_num_latents(dense_io, tmp_path):
    w = {name: t.to(torch.bfloat16).double() for name, t in dense_io.weights(6).items()}
    folder = dense_io.write_sparsify(tmp_path / "h", w, dtype=torch.bfloat16, num_latents=N, expansion_factor=32)
    sae, _ = read_sae(folder)
    x = dense_io.inputs()
    close(sae(x.float()), dense_io.sparsify_forward(x, w, K))


def test_sparsify_repo_with_many_hookpoints(dense_io, tmp_path):
    repo = tmp_path / "repo"
    for layer in (10, 0, 2):
        dense_io.write_sparsify(repo / f"layers.{layer}", dense_io.weights(layer))
    (repo / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-160m"}))
    assert list_hookpoints(repo) == ["layers.0", "layers.2", "layers.10"]
    assert detect_format(repo) == "sparsify"
    sae, provenance = read_sae(repo, "layers.2")
    assert provenance["hookpoint"] == "layers.2"
    assert provenance["model_name"] == "EleutherAI/pythia-160m"
    x = dense_io.inputs()
    close(sae(x.float()), dense_io.sparsify_forward(x, dense_io.weights(2), K))
    with pytest.raises(SaeCompressError, match="--hookpoint"):
        read_sae(repo)
    with pytest.raises(SaeCompressError, match="hookpoint 'layers.5' not found.*layers.10"):
        read_sae(repo, "layers.5")


@pytest.mark.parametrize("cfg", [{"activation": "groupmax"}, {"signed": True}, {"transcode": True}])
def test_sparsify_non_topk_refused(dense_io, tmp_path, cfg):
    with pytest.raises(SaeCompressError, match="TopK"):
        read_sae(dense_io.write_sparsify(tmp_path / "h", dense_io.weights(), **cfg))


# ----------------------------------------------------------------------------- openai

@pytest.mark.parametrize("postact", ["ReLU", "Identity"])
def test_openai_round_trip_with_layer_norm(dense_io, tmp_path, postact):
    w = dense_io.weights(7)
    path = dense_io.write_openai(tmp_path / "v5_32k_layer_6.pt", w, postact=postact)
    assert detect_format(path) == "openai"
    sae, _ = read_sae(path)
    assert sae.normalize_input
    assert sae.activation == ("topk_relu" if postact == "ReLU" else "signed_topk")
    x = dense_io.inputs()
    want = dense_io.openai_forward(x, w, K, torch.relu if postact == "ReLU" else (lambda v: v))
    close(sae(x.float()), want, rtol=1e-4)


def test_openai_layer_norm_at_small_activation_scale(dense_io, tmp_path):
    w = dense_io.weights(7)
    sae, _ = read_sae(dense_io.write_openai(tmp_path / "small.pt", w))
    x = 1e-3 * dense_io.inputs()
    close(sae(x.float()), dense_io.openai_forward(x, w, K), rtol=1e-4)


def test_openai_relu_checkpoint_refused(dense_io, tmp_path):
    with pytest.raises(SaeCompressError, match="TopK"):
        read_sae(dense_io.write_openai(tmp_path / "relu.pt", dense_io.weights(), activation="ReLU"))


# ----------------------------------------------------------------------------- dictionary_learning

def test_dictionary_learning_round_trip(dense_io, tmp_path):
    w = dense_io.weights(8)
    folder = dense_io.write_dictionary_learning(tmp_path / "resid_post_layer_3" / "trainer_0", w)
    assert detect_format(folder) == "dictionary_learning"
    assert list_hookpoints(tmp_path) == ["resid_post_layer_3/trainer_0"]
    sae, provenance = read_sae(tmp_path)  # the only SAE below the folder is picked
    assert sae.activation == "relu_topk"
    assert provenance["model_name"] == "EleutherAI/pythia-70m-deduped"
    x = dense_io.inputs()
    pre = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    close(sae(x.float()), dense_io.topk_then(pre, K, lambda v: v) @ w["W_dec"] + w["b_dec"])


def test_dictionary_learning_batchtopk_read_others_refused_and_config_required(dense_io, tmp_path):
    folder = dense_io.write_dictionary_learning(tmp_path / "t", dense_io.weights(), dict_class="BatchTopKSAE")
    assert read_sae(folder)[0].activation == "batchtopk"
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "GatedAutoEncoder"}}))
    with pytest.raises(SaeCompressError, match="dict_class 'GatedAutoEncoder'"):
        read_sae(folder)
    (folder / "config.json").unlink()
    with pytest.raises(SaeCompressError, match="config.json"):
        read_sae(folder)


# ----------------------------------------------------------------------------- paper

def test_paper_checkpoint_import_is_exact(dense_io, tmp_path):
    path = tmp_path / "expander_tied_m16_n64_d3_k5_seed0.pt"
    sd = dense_io.write_paper(path)
    assert detect_format(path) == "paper"
    sae, provenance = read_paper_checkpoint(path)
    assert isinstance(sae, ExpanderSAE)
    assert (provenance["library"], provenance["arch"], provenance["paper_seed"]) == ("paper", "expander_tied", 0)
    assert (sae.d, sae.k, sae.activation, sae.encoder, sae.mask_seed) == (3, 5, "signed_topk", "tied", None)
    want_idx = sd["mask"].T.nonzero()[:, 1].reshape(N, 3)
    assert torch.equal(sae.indices, want_idx)
    x = dense_io.inputs()
    close(sae(x.float()), dense_io.paper_forward(x, sd, 5))
    assert isinstance(read_sae(path)[0], ExpanderSAE)
    dense = read_sae(path)[0].to_dense()
    assert isinstance(dense, TopKSAE)
    close(dense(x.float()), dense_io.paper_forward(x, sd, 5))


def test_paper_k_from_argument_or_error(dense_io, tmp_path):
    path = tmp_path / "checkpoint.pt"
    sd = dense_io.write_paper(path)
    with pytest.raises(SaeCompressError, match="--k"):
        read_paper_checkpoint(path)
    sae, _ = read_paper_checkpoint(path, k=7)
    x = dense_io.inputs()
    close(sae(x.float()), dense_io.paper_forward(x, sd, 7))
    signed = tmp_path / "expander_tied_m16_n64_d3_k5_seed0_topksigned.pt"
    dense_io.write_paper(signed)
    with pytest.raises(SaeCompressError, match="TopK"):
        read_paper_checkpoint(signed)


@pytest.mark.parametrize("independent_encoder", [False, True])
def test_paper_dense_baselines(dense_io, tmp_path, independent_encoder):
    g = torch.Generator().manual_seed(11)
    sd = {"W_dec_param": torch.randn(M, N, generator=g), "b_dec": torch.randn(M, generator=g),
          "b_enc": torch.randn(N, generator=g) - 1.0}
    if independent_encoder:
        sd["W_enc_param"] = torch.randn(N, M, generator=g)
    path = tmp_path / f"dense_{'warmtied' if independent_encoder else 'tied'}_m16_n64_d16_k4_seed0.pt"
    torch.save(sd, path)
    assert detect_format(path) == "paper"
    sae, _ = read_sae(path)
    assert isinstance(sae, TopKSAE) and (sae.k, sae.activation) == (4, "signed_topk")
    W_dec = sd["W_dec_param"].double() / sd["W_dec_param"].double().norm(dim=0, keepdim=True)
    W_enc = sd["W_enc_param"].double() if independent_encoder else W_dec.T
    x = dense_io.inputs()
    pre = (x - sd["b_dec"].double()) @ W_enc.T + sd["b_enc"].double()
    want = dense_io.topk_then(pre, 4, lambda v: v) @ W_dec.T + sd["b_dec"].double()
    close(sae(x.float()), want)


# ----------------------------------------------------------------------------- detection

def test_unknown_folder_lists_contents_and_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(SaeCompressError) as err:
        detect_format(tmp_path)
    message = str(err.value)
    assert "notes.txt" in message and "weights.safetensors" in message
    assert "SAELens" in message and "sparsify" in message and "dictionary_learning" in message
    assert "\n" not in message


def test_foreign_torch_file_refused(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "model.pt")
    with pytest.raises(SaeCompressError, match="unrecognised state dict"):
        read_sae(tmp_path / "model.pt")
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(SaeCompressError, match="weights_only"):
        read_sae(tmp_path / "pickle.pt")
