"""Shared test settings (deterministic torch, few threads: CI has 2 cores) and shared helpers as fixtures.

Fixtures: ``dense_io`` (dense SAEs written the way each library writes them, with their float64
forward passes), ``tiny_lm`` (tiny transformers LMs built in-process) and ``tiny_llama`` (one,
saved once per session), ``hub`` / ``hub_server`` / ``isolated_hf`` / ``upload_folder`` /
``hub_sae`` / ``hub_file`` (the real hub server in hub_server.py, huggingface_hub pointed at it), ``float64_sae``
(a float64 numpy reference of any SAE's encode and reconstruction), ``read_until`` (a subprocess
pipe read with a deadline).
"""

import os

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import json  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import select  # noqa: E402
import string  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from huggingface_hub import HfApi, constants  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from hub_server import HubServer  # noqa: E402 - tests/ is on sys.path while pytest loads this conftest
from saecompress.compact import save_compact  # noqa: E402
from saecompress.lm import token_contexts  # noqa: E402
from saecompress.models import LAYER_NORM_EPS, ExpanderSAE  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not stall on a busy 2-core CI machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------ dense SAEs in each library's layout

M, N, K = 16, 64, 6


def weights(seed: int = 0, m: int = M, n: int = N) -> dict[str, torch.Tensor]:
    """Random float64 weights; b_enc is shifted negative so some rows have < k positive pre-acts."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(n, m, generator=g, dtype=torch.float64)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    return {
        "W_dec": W_dec,
        "W_enc": (W_dec.T + 0.3 * torch.randn(m, n, generator=g, dtype=torch.float64)),
        "b_enc": torch.randn(n, generator=g, dtype=torch.float64) - 2.5,
        "b_dec": 0.5 * torch.randn(m, generator=g, dtype=torch.float64),
    }


def inputs(seed: int = 1, rows: int = 32, m: int = M) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(rows, m, generator=g, dtype=torch.float64) + 0.3


def topk_then(pre: torch.Tensor, k: int, post) -> torch.Tensor:
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, post(top.values))


def ln(x: torch.Tensor, eps: float = 1e-5):
    mu = x.mean(dim=-1, keepdim=True)
    x = x - mu
    std = x.std(dim=-1, keepdim=True)
    return x / (std + eps), mu, std


def write_saelens(folder: Path, w: dict, k: int = K, *, dtype=torch.float32, version: int = 6, **cfg_extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: w[name].to(dtype).contiguous() for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    tensors.update({name: value.to(dtype) for name, value in cfg_extra.pop("tensors", {}).items()})
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    m, n = w["W_enc"].shape
    if version >= 6:
        cfg = {"architecture": "topk", "d_in": m, "d_sae": n, "dtype": str(dtype).removeprefix("torch."),
               "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
               "reshape_activations": "none", "k": k,
               "metadata": {"model_name": "gpt2", "hook_name": "blocks.8.hook_resid_pre",
                            "sae_lens_version": "6.5.1"}}
    else:
        cfg = {"architecture": "standard", "d_in": m, "d_sae": n, "dtype": "float32", "device": "cpu",
               "model_name": "pythia-70m-deduped", "hook_name": "blocks.3.hook_resid_post", "hook_layer": 3,
               "activation_fn_str": "topk", "activation_fn_kwargs": {"k": k}, "apply_b_dec_to_input": True,
               "finetuning_scaling_factor": False, "normalize_activations": "none",
               "sae_lens_training_version": "5.3.0"}
    cfg.update(cfg_extra)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def saelens_forward(x, w, k, *, apply_b_dec=True, layer_norm=False, scale_in=1.0, scaling=None, rescale=False):
    if layer_norm:
        x, mu, std = ln(x)
    x = x * scale_in
    pre = (x - w["b_dec"] * apply_b_dec) @ w["W_enc"] + w["b_enc"]
    norms = w["W_dec"].norm(dim=1)
    if rescale:
        pre = pre * norms
    z = topk_then(pre, k, torch.relu)
    if scaling is not None:
        z = z * scaling
    if rescale:
        z = z / norms
    out = z @ w["W_dec"] + w["b_dec"]
    if layer_norm:
        out = out * std + mu
    return out / scale_in


def write_sparsify(folder: Path, w: dict, k: int = K, *, dtype=torch.float32, **cfg_extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    m, n = w["W_enc"].shape
    save_file({"encoder.weight": w["W_enc"].T.to(dtype).contiguous(), "encoder.bias": w["b_enc"].to(dtype),
               "W_dec": w["W_dec"].to(dtype).contiguous(), "b_dec": w["b_dec"].to(dtype)},
              str(folder / "sae.safetensors"))
    cfg = {"activation": "topk", "expansion_factor": n // m, "normalize_decoder": True, "num_latents": 0,
           "k": k, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": m}
    cfg.update(cfg_extra)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def sparsify_forward(x, w, k):
    pre = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    top = pre.topk(k, dim=-1)
    return (top.values.unsqueeze(-1) * w["W_dec"][top.indices]).sum(-2) + w["b_dec"]


def write_openai(path: Path, w: dict, k: int = K, *, activation: str = "TopK", postact: str = "ReLU") -> Path:
    m, n = w["W_enc"].shape
    sd = {"pre_bias": w["b_dec"].float(), "latent_bias": w["b_enc"].float(),
          "stats_last_nonzero": torch.zeros(n, dtype=torch.long),
          "latents_activation_frequency": torch.ones(n), "latents_mean_square": torch.zeros(n),
          "encoder.weight": w["W_enc"].T.float().contiguous(), "decoder.weight": w["W_dec"].T.float().contiguous(),
          "activation": activation}
    if activation == "TopK":
        sd["activation_state_dict"] = {"k": k, "postact_fn": postact}
    torch.save(sd, path)
    return path


def openai_forward(x, w, k, postact=torch.relu):
    x, mu, std = ln(x)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    out = topk_then(pre, k, postact) @ w["W_dec"] + w["b_dec"]
    return out * std + mu


def write_dictionary_learning(folder: Path, w: dict, k: int = K, *, dict_class: str = "AutoEncoderTopK") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    m, n = w["W_enc"].shape
    torch.save({"k": torch.tensor(k, dtype=torch.int), "threshold": torch.tensor(-1.0),
                "decoder.weight": w["W_dec"].T.float().contiguous(),
                "encoder.weight": w["W_enc"].T.float().contiguous(),
                "encoder.bias": w["b_enc"].float(), "b_dec": w["b_dec"].float()}, folder / "ae.pt")
    trainer = {"trainer_class": "TopKTrainer", "dict_class": dict_class, "lr": 0.0003, "steps": 1000,
               "activation_dim": m, "dict_size": n, "k": k, "device": "cpu", "layer": 3,
               "lm_name": "EleutherAI/pythia-70m-deduped", "wandb_name": "TopKTrainer",
               "submodule_name": "resid_post_layer_3"}
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"d_submodule": m}}))
    return folder


def write_paper(path: Path, m: int = M, n: int = N, d: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(m, n)
    for j in range(n):
        mask[torch.randperm(m, generator=g)[:d], j] = 1.0
    sd = {"mask": mask, "decoder_vals": torch.randn(m, n, generator=g) / d**0.5,
          "b_dec": 0.3 * torch.randn(m, generator=g), "b_enc": torch.randn(n, generator=g) - 1.0}
    torch.save(sd, path)
    return sd


def paper_forward(x, sd, k):
    W = sd["mask"].double() * sd["decoder_vals"].double()
    W = W / W.norm(dim=0, keepdim=True).clamp(min=1e-8)
    pre = (x - sd["b_dec"].double()) @ W + sd["b_enc"].double()
    vals, idx = pre.topk(k, dim=-1)
    h = torch.zeros_like(pre).scatter(-1, idx, vals)
    return h @ W.T + sd["b_dec"].double()


@pytest.fixture(scope="session")
def dense_io():
    """Writers of dense SAEs in each library's layout, random weights and inputs, float64 forwards."""
    return SimpleNamespace(
        weights=weights, inputs=inputs, topk_then=topk_then, ln=ln,
        write_saelens=write_saelens, saelens_forward=saelens_forward,
        write_sparsify=write_sparsify, sparsify_forward=sparsify_forward,
        write_openai=write_openai, openai_forward=openai_forward,
        write_dictionary_learning=write_dictionary_learning,
        write_paper=write_paper, paper_forward=paper_forward)


# ------------------------------------------------------------ a float64 reference of any SAE

def _float64_sae(sae, x: np.ndarray):
    """Float64 numpy reference: (top indices, top values, reconstruction) of ``x [B, m]``."""
    x = x.astype(np.float64)
    b_dec, b_enc = sae.b_dec.detach().double().numpy(), sae.b_enc.detach().double().numpy()
    if isinstance(sae, ExpanderSAE):
        idx = sae.indices.numpy()
        enc, dec = sae.encoder_values.detach().double().numpy(), sae.values.detach().double().numpy()
        W_enc = np.zeros((sae.m, sae.n))
        W_dec = np.zeros((sae.n, sae.m))
        rows = np.arange(sae.n)[:, None]
        W_enc[idx, rows] = enc
        W_dec[rows, idx] = dec
    else:
        W_enc, W_dec = sae.W_enc.detach().double().numpy(), sae.W_dec.detach().double().numpy()
    mu = std = None
    if sae.normalize_input:
        mu = x.mean(-1, keepdims=True)
        std = (x - mu).std(-1, ddof=1, keepdims=True)
        x = (x - mu) / (std + LAYER_NORM_EPS)
    pre = (x - b_dec) @ W_enc + b_enc
    if sae.activation == "relu_topk":
        pre = np.maximum(pre, 0)
    ranked = np.abs(pre) if sae.activation == "abs_topk" else pre  # abs_topk: largest |pre|, sign kept
    top = np.argsort(-ranked, axis=1, kind="stable")[:, :sae.k]
    vals = np.take_along_axis(pre, top, 1)
    if sae.activation == "topk_relu":
        vals = np.maximum(vals, 0)
    recon = np.einsum("bk,bkm->bm", vals, W_dec[top]) + b_dec
    if sae.normalize_input:
        recon = recon * std + mu
    return top, vals, recon


@pytest.fixture(scope="session")
def float64_sae():
    """``float64_sae(sae, x)``: (top indices, top values, reconstruction) of rows ``x`` in float64 numpy."""
    return _float64_sae


# ------------------------------------------------------------------ tiny LMs built in-process

HIDDEN = 32
CHARS = string.ascii_lowercase + " .,\n"


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def tiny_config(arch: str):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    common = dict(vocab_size=40, bos_token_id=0, eos_token_id=1)
    if arch == "llama":
        return LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128, **common)
    return GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=128, **common)


def texts(n_docs=6, seed=0):
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "quiet", "dog", "ran", "far", "zebra"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(40, 90))) + ".\n" for _ in range(n_docs)]


def save_tiny(folder, arch, massive_char=None):
    """Save a tiny model + tokenizer, briefly trained on ``texts()`` so its predictions carry information."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    tokenizer = tiny_tokenizer()
    ids = torch.stack(list(token_contexts(tokenizer, texts(), 64)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.eval()
    if massive_char is not None:  # plant a massive-activation token: a huge embedding row
        with torch.no_grad():
            model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(massive_char)] *= 1e4
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm():
    """Tiny transformers LMs (no downloads): ``save(folder, arch)``, ``texts()``, ``config``, ``tokenizer``."""
    return SimpleNamespace(HIDDEN=HIDDEN, save=save_tiny, texts=texts, config=tiny_config, tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """One tiny trained llama folder (model + tokenizer), shared by the tests that only read it."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


# ------------------------------------------------------------------ the hub server on 127.0.0.1

@pytest.fixture
def isolated_hf(monkeypatch, tmp_path) -> None:
    """Point huggingface_hub's cache and token at test-only places; plain Git LFS uploads.

    huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE / HF_ENDPOINT once at import, so tests set
    the resulting ``constants``; HF_TOKEN and HF_HUB_DISABLE_XET are read by us or it at call time.
    """
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="session")
def hub_server():
    """The HubServer class, for tests that start their own (e.g. with tokens)."""
    return HubServer


@pytest.fixture
def hub(isolated_hf, tmp_path, monkeypatch):
    """A fresh hub server, which HF_ENDPOINT points at."""
    with HubServer(tmp_path / "server") as server:
        # what HF_ENDPOINT=<server> sets when huggingface_hub is imported
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        yield server


def _upload_folder(hub: HubServer, repo_id: str, folder: Path) -> None:
    api = HfApi(endpoint=hub.url)
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=folder)


@pytest.fixture(scope="session")
def upload_folder():
    """``upload_folder(hub, repo_id, folder)``: a new repo on ``hub`` holding ``folder``'s files."""
    return _upload_folder


def _hub_sae(seed: int, hookpoint: str, m: int = 16, n: int = 64, d: int = 4) -> ExpanderSAE:
    torch.manual_seed(seed)
    sae = ExpanderSAE(m, n, d, k=4, seed=seed)
    with torch.no_grad():
        sae.values.normal_()
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    return sae


def _hub_file(seed: int, hookpoint: str, path: Path) -> Path:
    source = {"library": "sparsify", "hookpoint": hookpoint, "model_name": "tiny-lm",
              "path": f"/home/someone/.cache/huggingface/hub/models--EleutherAI--sae-tiny/snapshots/{'a' * 40}/{hookpoint}"}
    return save_compact(_hub_sae(seed, hookpoint), path, metadata={"metrics": {"fvu": 0.125 + seed / 100, "l0": 4.0}},
                        source=source)


@pytest.fixture(scope="session")
def hub_sae():
    """``hub_sae(seed, hookpoint)``: a random expander SAE."""
    return _hub_sae


@pytest.fixture(scope="session")
def hub_file():
    """``hub_file(seed, hookpoint, path)``: ``hub_sae(seed, hookpoint)`` written to ``path`` as a compact file
    with sparsify provenance (from a hub cache path) and file metrics."""
    return _hub_file


# ------------------------------------------------------------------------------ subprocesses

def _read_until(stream, pattern: bytes, timeout: float = 120.0) -> bytes:
    """What a subprocess pipe gives until ``pattern`` (a bytes regex) matches; fails after ``timeout`` s."""
    deadline, seen = time.monotonic() + timeout, b""
    while not re.search(pattern, seen):
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            pytest.fail(f"no {pattern!r} within {timeout:.0f} s; got {seen.decode(errors='replace')!r}")
        chunk = os.read(stream.fileno(), 65536)  # unbuffered: select sees every byte not yet read
        if not chunk:
            pytest.fail(f"pipe closed before {pattern!r}; got {seen.decode(errors='replace')!r}")
        seen += chunk
    return seen


@pytest.fixture(scope="session")
def read_until():
    """``read_until(proc.stdout, rb"pattern", timeout=120)``: a pipe read that cannot hang the suite."""
    return _read_until
