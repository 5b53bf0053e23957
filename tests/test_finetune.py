"""KL fine-tuning through a tiny transformers model built in-process."""

import json

import pytest
import torch
from click.testing import CliRunner

from saecompress.cli.main import cli
from saecompress.compact import load_compact, read_compact_metadata, save_compact
from saecompress.errors import SaeCompressError
from saecompress.finetune import FinetuneConfig, _LatentKeeper, finetune
from saecompress.lm import capture, ce_eval, load_model, token_contexts
from saecompress.models import ExpanderSAE, TopKSAE
from saecompress.sources import Loaded, load

CFG = dict(context=32, batch=2, lr=1e-2)


@pytest.fixture(scope="module")
def lm(tiny_llama):
    model, tokenizer = load_model(tiny_llama)
    return tiny_llama, model, tokenizer


def start_sae(tiny_lm, model, tokenizer, dense: bool = False):
    """A random SAE with b_dec at the data mean: a poor but finite starting point."""
    torch.manual_seed(0)
    sae = TopKSAE(tiny_lm.HIDDEN, 96, 6) if dense else ExpanderSAE(tiny_lm.HIDDEN, 96, 4, 6, seed=1, encoder="untied")
    ids = torch.stack(list(token_contexts(tokenizer, tiny_lm.texts(), 32)))
    with torch.no_grad():
        sae.b_dec.copy_(capture(model, ids, 1, "resid").reshape(-1, tiny_lm.HIDDEN).mean(0))
    return sae


def kl(tiny_lm, model, tokenizer, sae) -> float:
    return ce_eval(model, tokenizer, tiny_lm.texts(seed=5), sae, 1, tokens=32 * 8, context=32, progress=False)["kl_spliced"]


@pytest.mark.parametrize("dense", [False, True])
def test_finetune_lowers_held_out_kl_and_writes_the_model(tiny_lm, lm, tmp_path, dense):
    _, model, tokenizer = lm
    sae = start_sae(tiny_lm, model, tokenizer, dense)
    origin = Loaded(sae, {"library": "test"}, user={"held_out": {"fvu": 0.5}, "training": {"steps": 7}})
    indices = sae.indices.clone() if not dense else None
    before = kl(tiny_lm, model, tokenizer, sae)
    out = tmp_path / ("dense" if dense else "ft.safetensors")
    tuned, stats = finetune(sae, model, tokenizer, tiny_lm.texts(12), 1, "resid", FinetuneConfig(tokens=32 * 2 * 40, **CFG),
                            out=out, origin=origin, progress=False)
    after = kl(tiny_lm, model, tokenizer, tuned)
    assert after < 0.7 * before, (before, after)  # on texts it was not tuned on
    run = stats["finetune"]
    assert run["steps"] == 40 and run["tokens_seen"] == 32 * 2 * 40
    assert run["kl_last"] < run["kl_first"]
    assert all(not p.requires_grad for p in model.parameters())
    saved = load(out)
    assert kl(tiny_lm, model, tokenizer, saved) == pytest.approx(after, rel=1e-5)
    if not dense:
        assert torch.equal(saved.indices, indices)  # the mask never moves
        meta = read_compact_metadata(out)
        user = meta["user"]
        assert meta["source"] == {"library": "test"} and meta["dtype"] == "float32"
        assert user["finetune"]["steps"] == 40 and user["training"] == {"steps": 7}
        assert user["held_out_before_finetune"] == {"fvu": 0.5} and "held_out" not in user  # no stale metrics


def test_finetune_skipping_the_prefix_trains_the_same_sae(tiny_lm, lm, monkeypatch):
    """The spliced pass starts at the site's block (the frozen blocks before it gave the same hidden states in
    the clean pass): the fine-tuned SAE equals one tuned through the whole model."""
    import contextlib

    import saecompress.finetune as finetune_module

    _, model, tokenizer = lm
    tuned = {}
    for skip in (True, False):
        if not skip:
            monkeypatch.setattr(finetune_module, "skipping", lambda *_: contextlib.nullcontext())
        sae = start_sae(tiny_lm, model, tokenizer)
        tuned[skip], _ = finetune(sae, model, tokenizer, tiny_lm.texts(12), 1, "resid",
                                  FinetuneConfig(tokens=32 * 2 * 5, **CFG), progress=False)
    for (name, a), (_, b) in zip(tuned[True].state_dict().items(), tuned[False].state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(tuned[True].values, start_sae(tiny_lm, model, tokenizer).values)  # it did train


def test_finetune_recon_term_keeps_the_reconstruction(tiny_lm, lm):
    _, model, tokenizer = lm
    runs = {}
    for coef in (0.0, 10.0):
        sae = start_sae(tiny_lm, model, tokenizer)
        _, stats = finetune(sae, model, tokenizer, tiny_lm.texts(12), 1, "resid",
                            FinetuneConfig(tokens=32 * 2 * 30, recon_coef=coef, **CFG), progress=False)
        runs[coef] = stats["finetune"]["fvu_last"]
    assert runs[10.0] < runs[0.0]


def test_finetune_errors(tiny_lm, lm, tmp_path):
    folder, model, tokenizer = lm
    with pytest.raises(SaeCompressError, match="hidden size 32 but the SAE has m=16"):
        finetune(ExpanderSAE(16, 64, 4, 8), model, tokenizer, tiny_lm.texts(), 1, cfg=FinetuneConfig(**CFG), progress=False)
    with pytest.raises(SaeCompressError, match="no complete context"):
        finetune(start_sae(tiny_lm, model, tokenizer), model, tokenizer, ["ab"], 1, cfg=FinetuneConfig(**CFG), progress=False)
    with pytest.raises(SaeCompressError, match="tokens must be at least 1"):
        FinetuneConfig(tokens=0).check()

    text = tmp_path / "corpus.txt"
    text.write_text("".join(tiny_lm.texts(12)))
    save_compact(start_sae(tiny_lm, model, tokenizer), tmp_path / "sae.safetensors")
    runner = CliRunner()
    args = ["--model", str(folder), "--text", str(text), "--layer", "1", "--tokens", "256", "--context", "32"]
    ok = runner.invoke(cli, ["finetune", str(tmp_path / "sae.safetensors"), *args,
                             "--out", str(tmp_path / "ft.safetensors"), "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["finetune"]["steps"] == 2
    assert load_compact(tmp_path / "ft.safetensors").n == 96

    save_compact(ExpanderSAE(16, 64, 4, 8), tmp_path / "small.safetensors")
    bad = runner.invoke(cli, ["finetune", str(tmp_path / "small.safetensors"), *args,
                              "--out", str(tmp_path / "bad.safetensors")])
    assert bad.exit_code == 2
    error = [line for line in bad.output.splitlines() if "error:" in line]  # transformers' load bars aside
    assert len(error) == 1 and "m=16" in error[0] and error[0].split("]")[-1].startswith("error:")
    assert not any(p.name.startswith("bad") for p in tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("dense", [False, True])
def test_latents_that_stop_firing_are_put_back(dense):
    torch.manual_seed(0)
    sae = TopKSAE(8, 16, 2) if dense else ExpanderSAE(8, 16, 3, 2, encoder="untied")
    optimizer = torch.optim.Adam(sae.parameters(), lr=0.1)
    sae(torch.randn(4, 8)).pow(2).sum().backward()
    optimizer.step()  # every parameter moves; Adam has moments
    keeper = _LatentKeeper(sae, optimizer, dead_tokens=10)
    encoder, axis = (sae.W_enc, 1) if dense else (sae.enc_values, 0)
    norms = encoder.detach().norm(dim=1 - axis)
    with torch.no_grad():
        encoder.mul_(2.0)  # a step that grows every encoder
    moved = {name: p.detach().clone() for name, p in sae.named_parameters()}
    moved["W_enc" if dense else "enc_values"] /= 2.0
    fired = torch.zeros(16, dtype=torch.bool)
    fired[:12] = True
    keeper.update(fired, 6)
    assert keeper.restored == 0
    torch.testing.assert_close(encoder.detach().norm(dim=1 - axis), norms)  # the encoders keep their norms
    fired[:] = False
    fired[:4] = True
    keeper.update(fired, 6)  # latents 12..15 have not fired for 12 >= 10 tokens
    assert keeper.restored == 4
    for name, p in sae.named_parameters():
        if name == "b_dec":
            assert torch.equal(p, moved[name])
            continue
        axis = 1 if name == "W_enc" else 0
        dead, alive = torch.arange(12, 16), torch.arange(12)
        assert torch.equal(p.index_select(axis, dead), keeper.start[name].index_select(axis, dead)), name
        assert torch.equal(p.index_select(axis, alive), moved[name].index_select(axis, alive)), name
        moments = optimizer.state[p]["exp_avg"].index_select(axis, dead)
        assert torch.count_nonzero(moments) == 0


@pytest.mark.parametrize("dense", [False, True])
def test_finetune_keeps_a_threshold_sae_and_its_thresholds(tiny_lm, lm, tmp_path, dense):
    _, model, tokenizer = lm
    start = start_sae(tiny_lm, model, tokenizer, dense)
    ids = torch.stack(list(token_contexts(tokenizer, tiny_lm.texts(), 32)))
    pre = start.pre_activations(capture(model, ids, 1, "resid").reshape(-1, tiny_lm.HIDDEN))
    theta = torch.full((96,), float(pre.relu().flatten().topk(6 * pre.shape[0]).values[-1]))  # ~6 fire per row
    kind = dict(activation="jumprelu", threshold=theta)
    sae = (TopKSAE(tiny_lm.HIDDEN, 96, 24, **kind) if dense
           else ExpanderSAE(tiny_lm.HIDDEN, 96, 4, 24, seed=1, encoder="untied", **kind))
    sae.load_state_dict(start.state_dict(), strict=False)  # the same weights; θ and k as given
    sae.threshold.copy_(theta)
    decoder = sae.decoder_rows.detach().clone()
    out = tmp_path / ("dense" if dense else "ft.safetensors")
    tuned, stats = finetune(sae, model, tokenizer, tiny_lm.texts(12), 1, "resid",
                            FinetuneConfig(tokens=32 * 2 * 20, **CFG), out=out, progress=False)
    run = stats["finetune"]
    assert run["steps"] == 20 and run["fvu_last"] < run["fvu_first"]  # it learns (the KL term alone: slow here)
    assert not torch.equal(tuned.decoder_rows, decoder)
    saved = load(out)
    assert (saved.activation, saved.k) == ("jumprelu", 24)
    assert saved.threshold.dtype == torch.float32 and torch.equal(saved.threshold, theta)  # θ stays fixed


def test_finetune_tunes_a_pursuit_sae_through_its_decoder(tiny_lm, lm, tmp_path):
    _, model, tokenizer = lm
    sae = start_sae(tiny_lm, model, tokenizer).with_pursuit("abs_topk")
    before = kl(tiny_lm, model, tokenizer, sae)
    start = sae.values.detach().clone()
    out = tmp_path / "pursuit.safetensors"
    tuned, stats = finetune(sae, model, tokenizer, tiny_lm.texts(12), 1, "resid", FinetuneConfig(tokens=32 * 2 * 40, **CFG),
                            out=out, progress=False)
    after = kl(tiny_lm, model, tokenizer, tuned)
    assert after < 0.8 * before, (before, after)  # on texts it was not tuned on
    assert not torch.equal(tuned.values, start) and stats["finetune"]["kl_last"] < stats["finetune"]["kl_first"]
    torch.testing.assert_close(tuned.values.norm(dim=1), start.norm(dim=1))  # row norms kept; pursuit ignores them
    meta = read_compact_metadata(out)
    assert (meta["encoder"], meta["mask"], meta["mask_seed"]) == ("pursuit", "seed", 1)  # still seed-only
    assert kl(tiny_lm, model, tokenizer, load_compact(out)) == pytest.approx(after, rel=1e-5)
