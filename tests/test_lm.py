"""LM harvesting and CE splicing on tiny transformers models built in-process (no downloads)."""

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from saecompress.activations import open_activations
from saecompress.cli.main import cli
from saecompress.compact import save_compact
from saecompress.errors import SaeCompressError
from saecompress.lm import (SITES, CEReference, capture, ce_eval, ce_eval_many, clean_pass, context_batches, decoder_layers, harvest, keep_mask,
                            load_model, site_module, spliced_pass, token_contexts)
from saecompress.models import ExpanderSAE, TopKSAE


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["llama", "gpt2", "neox"])
def tiny(tiny_lm, request, tmp_path_factory):
    folder = tiny_lm.save(tmp_path_factory.mktemp(request.param), request.param)
    model, tokenizer = load_model(folder)
    return folder, model, tokenizer


def identity_sae(m: int) -> TopKSAE:
    """A TopK SAE that reconstructs exactly: latents +x_j and −x_j, k = m keeps the positive one."""
    sae = TopKSAE(m, 2 * m, m)
    eye = torch.eye(m)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


def test_token_contexts_start_with_bos_and_join_documents_with_eos(tiny_lm):
    tok = tiny_lm.tokenizer()
    rows = list(token_contexts(tok, ["ab", "cd", "efgh"], 4))
    assert [r.tolist() for r in rows] == [[0, 3, 4, 1], [0, 5, 6, 1], [0, 7, 8, 9]]


def test_context_batches_limit_and_too_little_text(tiny_lm, tmp_path):
    tok = tiny_lm.tokenizer()
    rows = torch.stack(list(token_contexts(tok, tiny_lm.texts(), 16)))
    batches = list(context_batches(tok, tiny_lm.texts(), 16, 3, limit=7))
    assert [len(b) for b in batches] == [3, 3, 1]
    torch.testing.assert_close(torch.cat(batches), rows[:7], rtol=0, atol=0)
    assert torch.equal(torch.cat(list(context_batches(tok, tiny_lm.texts(), 16, 4))), rows)
    # every consumer of the contexts says why there is nothing to do
    with pytest.raises(SaeCompressError, match="no complete context"):
        next(context_batches(tok, ["too short"], 16, 4))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_lm.config("llama")).eval()
    with pytest.raises(SaeCompressError, match="no complete context"):
        ce_eval(model, tok, ["too short"], identity_sae(tiny_lm.HIDDEN), 0, context=16, progress=False)
    with pytest.raises(SaeCompressError, match="no complete context"):
        harvest(model, tok, ["too short"], 0, tokens=10, out=tmp_path / "acts", context=16, progress=False)
    assert not any(tmp_path.iterdir())  # no partial output


@pytest.mark.parametrize("site", ["resid", "mlp_out", "attn_out"])
def test_harvest_matches_hidden_states(tiny_lm, tiny, tmp_path, site):
    folder, model, tokenizer = tiny
    manifest = harvest(model, tokenizer, tiny_lm.texts(), 1, site, tokens=10_000, out=tmp_path / "acts", context=32,
                       batch=3, drop_first=False, outlier_factor=None, shard_rows=100, progress=False)
    ids = torch.stack(list(token_contexts(tokenizer, tiny_lm.texts(), 32)))
    src = open_activations(tmp_path / "acts")
    assert src.num_rows == ids.numel() == manifest["num_rows"] < 10_000  # the text ran out
    assert src.manifest["hookpoint"] == {"resid": "blocks.1.hook_resid_post", "mlp_out": "blocks.1.hook_mlp_out",
                                         "attn_out": "blocks.1.hook_attn_out"}[site]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    got = src.read(0, src.num_rows).reshape(ids.shape[0], 32, tiny_lm.HIDDEN)
    if site == "resid":
        # block 1's output; hidden_states[2] is the last one, which has the final norm applied
        torch.testing.assert_close(got, capture(model, ids, 1, "resid"))
        torch.testing.assert_close(capture(model, ids, 0, "resid"), hidden[1])
    else:
        # independent check: in these models block 0 adds exactly attn_out + mlp_out to the stream
        other = "attn_out" if site == "mlp_out" else "mlp_out"
        first = capture(model, ids, 0, site) + capture(model, ids, 0, other)
        torch.testing.assert_close(first, hidden[1] - hidden[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got, capture(model, ids, 1, site))


def test_resid_is_hidden_state_after_the_block(tiny_lm, tmp_path):
    # with more layers, hidden_states[L + 1] (not the last) is the output of block L
    from transformers import AutoModelForCausalLM

    config = tiny_lm.config("llama")
    config.num_hidden_layers = 3
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.stack(list(token_contexts(tiny_lm.tokenizer(), tiny_lm.texts(), 16)))[:2]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in (0, 1):
        torch.testing.assert_close(capture(model, ids, layer, "resid"), hidden[layer + 1])
    assert len(decoder_layers(model)) == 3


def test_harvest_drops_first_and_massive_tokens(tiny_lm, tmp_path):
    folder = tiny_lm.save(tmp_path / "lm", "llama", massive_char="z")
    model, tokenizer = load_model(folder)
    manifest = harvest(model, tokenizer, tiny_lm.texts(), 0, tokens=10_000, out=tmp_path / "acts", context=32, batch=4,
                       progress=False)
    ids = torch.stack(list(token_contexts(tokenizer, tiny_lm.texts(), 32)))
    z = tokenizer.convert_tokens_to_ids("z")
    expected_massive = int((ids[:, 1:] == z).sum())
    assert expected_massive > 0
    assert manifest["dropped_first"] == ids.shape[0]
    assert manifest["dropped_massive"] == expected_massive
    assert manifest["num_rows"] == ids.numel() - ids.shape[0] - expected_massive
    rows = open_activations(tmp_path / "acts").read(0, manifest["num_rows"])
    assert float(rows.norm(dim=1).max()) < 100 * float(rows.norm(dim=1).median())

    # a token budget stops early and exactly
    small = harvest(model, tokenizer, tiny_lm.texts(), 0, tokens=50, out=tmp_path / "small", context=32, batch=4,
                    progress=False)
    assert small["num_rows"] == 50 == open_activations(tmp_path / "small").num_rows

    # CE evaluation excludes the same tokens and reports them
    report = ce_eval(model, tokenizer, tiny_lm.texts(), identity_sae(tiny_lm.HIDDEN), 0, tokens=32 * 4, context=32, batch=2,
                     progress=False)
    assert report["ce_excluded_first"] == 4
    assert report["ce_excluded_massive"] == int((ids[:4, 1:] == z).sum())


def test_keep_mask():
    acts = torch.randn(3, 10, 8)
    acts[1, 4] *= 1000
    keep, first, massive = keep_mask(acts)
    assert (first, massive) == (3, 1)
    assert not keep[:, 0].any() and not keep[1, 4] and int(keep.sum()) == 26
    keep, first, massive = keep_mask(acts, drop_first=False, outlier_factor=None)
    assert bool(keep.all()) and (first, massive) == (0, 0)


def test_ce_eval_perfect_zero_and_random_sae(tiny_lm, tiny):
    _, model, tokenizer = tiny
    kwargs = dict(tokens=64 * 4, context=64, batch=2, progress=False)
    perfect = ce_eval(model, tokenizer, tiny_lm.texts(), identity_sae(tiny_lm.HIDDEN), 0, "resid", **kwargs)
    assert perfect["ce_spliced"] == pytest.approx(perfect["ce_clean"], rel=1e-5)
    assert perfect["ce_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert perfect["kl_spliced"] == pytest.approx(0.0, abs=1e-6)
    assert perfect["ce_zero"] > perfect["ce_clean"]
    assert perfect["kl_zero"] > 0 and perfect["kl_mean"] > 0
    assert perfect["ce_tokens"] == 256

    torch.manual_seed(1)
    noisy_sae = TopKSAE(tiny_lm.HIDDEN, 64, 2)
    noisy = ce_eval(model, tokenizer, tiny_lm.texts(), noisy_sae, 0, "resid", **kwargs)
    assert noisy["ce_clean"] == pytest.approx(perfect["ce_clean"], rel=1e-9)
    assert noisy["ce_zero"] == pytest.approx(perfect["ce_zero"], rel=1e-9)
    assert abs(noisy["ce_spliced"] - noisy["ce_clean"]) > 1e-3
    assert noisy["ce_recovered"] < 0.999
    expected = (noisy["ce_mean"] - noisy["ce_spliced"]) / (noisy["ce_mean"] - noisy["ce_clean"])
    assert noisy["ce_recovered_mean_ablation"] == pytest.approx(expected)

    both = ce_eval_many(model, tokenizer, tiny_lm.texts(), {"perfect": identity_sae(tiny_lm.HIDDEN), "noisy": noisy_sae},
                        0, "resid", **kwargs)
    for name, single in (("perfect", perfect), ("noisy", noisy)):
        for key in ("ce_clean", "ce_zero", "ce_mean", "ce_spliced", "ce_recovered", "kl_spliced"):
            assert both[name][key] == pytest.approx(single[key], rel=1e-9, abs=1e-12), (name, key)


def test_clean_and_spliced_passes(tiny_lm, tiny):
    _, model, tokenizer = tiny
    ids = torch.stack(list(token_contexts(tokenizer, tiny_lm.texts(), 32)))[:3]
    module = site_module(model, 1, "mlp_out")
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        logits, act, _ = clean_pass(model, module, ids)
        torch.testing.assert_close(logits, plain, rtol=0, atol=0)
        torch.testing.assert_close(act, capture(model, ids, 1, "mlp_out"), rtol=0, atol=0)
        torch.testing.assert_close(spliced_pass(model, module, ids, act), plain, rtol=1e-6, atol=1e-6)

        # an independent splice: a plain forward hook that writes noise into the output
        noise = torch.randn(act.shape, generator=torch.Generator().manual_seed(0))
        handle = module.register_forward_hook(lambda _m, _i, out: (noise, *out[1:]) if isinstance(out, tuple) else noise)
        try:
            expected = model(input_ids=ids).logits
        finally:
            handle.remove()
    spliced = spliced_pass(model, module, ids, noise.requires_grad_())
    torch.testing.assert_close(spliced, expected, rtol=0, atol=0)
    assert float((spliced.detach() - plain).abs().max()) > 1e-2
    spliced.sum().backward()  # gradients reach the spliced activation (what fine-tuning needs)
    assert noise.grad is not None and float(noise.grad.abs().sum()) > 0
    model.zero_grad(set_to_none=True)
    assert not module._forward_hooks  # every pass removes its hook


def test_ce_eval_matches_a_float64_reference(tiny_lm, tiny):
    """ce_clean against transformers' own loss; zero-ablation CE and KL against a hand-written hook."""
    _, model, tokenizer = tiny
    ids = torch.stack(list(token_contexts(tokenizer, tiny_lm.texts(), 32)))[:4]
    report = ce_eval(model, tokenizer, tiny_lm.texts(), identity_sae(tiny_lm.HIDDEN), 0, tokens=4 * 32, context=32, batch=3,
                     outlier_factor=None, progress=False)
    module = site_module(model, 0, "resid")

    def zero_kept(_module, _inputs, output):  # position 0 keeps its clean value
        act = output[0] if isinstance(output, tuple) else output
        act = torch.cat([act[:, :1], torch.zeros_like(act[:, 1:])], 1)
        return (act, *output[1:]) if isinstance(output, tuple) else act

    with torch.no_grad():
        clean = model(input_ids=ids, labels=ids)
        handle = module.register_forward_hook(zero_kept)
        try:
            zeroed = model(input_ids=ids).logits.double()
        finally:
            handle.remove()
    targets = ids[:, 1:].reshape(-1)
    ce_zero = F.cross_entropy(zeroed[:, :-1].reshape(-1, zeroed.shape[-1]), targets).item()
    clean_logp = F.log_softmax(clean.logits[:, :-1].double(), -1)
    kl_zero = (clean_logp.exp() * (clean_logp - F.log_softmax(zeroed[:, :-1], -1))).sum(-1).mean().item()
    assert report["ce_clean"] == pytest.approx(clean.loss.item(), rel=1e-5)
    assert report["ce_zero"] == pytest.approx(ce_zero, rel=1e-5)
    assert report["kl_zero"] == pytest.approx(kl_zero, rel=1e-4)
    assert report["ce_zero"] > report["ce_clean"] + 0.1
    assert (report["ce_tokens"], report["ce_excluded_first"], report["ce_excluded_massive"]) == (4 * 32, 4, 0)


@pytest.mark.parametrize("site", SITES)
def test_spliced_pass_skipping_the_prefix_equals_the_full_pass(tiny_lm, tiny, site):
    """With the clean pass's Prefix, blocks before the site's do not run (counted) and the logits are the same."""
    _, model, tokenizer = tiny
    ids = torch.stack(list(token_contexts(tokenizer, tiny_lm.texts(), 32)))[:3]
    layers = decoder_layers(model)
    layer = len(layers) - 1
    module = site_module(model, layer, site)
    calls = []
    inner = [next(block.children()) for block in layers]  # a block that runs calls its submodules
    handles = [child.register_forward_pre_hook(lambda m, *_: calls.append(m)) for child in inner]
    try:
        with torch.no_grad():
            _, act, prefix = clean_pass(model, module, ids, prefix_layer=layer)
            noise = act + torch.randn(act.shape, generator=torch.Generator().manual_seed(0))
            calls.clear()
            full = spliced_pass(model, module, ids, noise)
            assert set(calls) == set(inner)
            calls.clear()
            skipped = spliced_pass(model, module, ids, noise, prefix)
            assert set(calls) == {inner[layer]}  # the blocks before the site's did not run
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(skipped, full, rtol=1e-6, atol=1e-6)
    assert all(block.forward.__func__ is type(block).forward for block in layers)  # restored


def test_ce_reference_scores_as_ce_eval_with_or_without_kept_log_probs(tiny_lm, tiny):
    """One CEReference serves several SAEs, later ones too: the same numbers as ce_eval of each alone."""
    _, model, tokenizer = tiny
    torch.manual_seed(0)
    saes = {"identity": identity_sae(tiny_lm.HIDDEN), "random": TopKSAE(tiny_lm.HIDDEN, 64, 4)}
    args = dict(tokens=4 * 32, context=32, batch=3, outlier_factor=None, progress=False)
    alone = {name: ce_eval(model, tokenizer, tiny_lm.texts(), sae, 0, **args) for name, sae in saes.items()}
    for keep in (False, True):
        reference = CEReference(model, tokenizer, tiny_lm.texts(), 0, keep_logp=keep, **args)
        for name, sae in saes.items():
            report = reference.score({name: sae})[name]
            for key, value in alone[name].items():
                assert report[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key


def test_ce_eval_mlp_site_and_mismatch(tiny_lm, tiny):
    _, model, tokenizer = tiny
    report = ce_eval(model, tokenizer, tiny_lm.texts(), identity_sae(tiny_lm.HIDDEN), 1, "mlp_out", tokens=64, context=32,
                     batch=2, progress=False)
    assert report["ce_spliced"] == pytest.approx(report["ce_clean"], rel=1e-5)
    with pytest.raises(SaeCompressError, match="hidden size 32 but the SAE has m=16"):
        ce_eval(model, tokenizer, tiny_lm.texts(), identity_sae(16), 0, tokens=64, context=32, progress=False)
    with pytest.raises(SaeCompressError, match="layer 5 is out of range"):
        ce_eval(model, tokenizer, tiny_lm.texts(), identity_sae(tiny_lm.HIDDEN), 5, tokens=64, context=32, progress=False)


def test_load_model_errors(tmp_path):
    with pytest.raises(SaeCompressError, match="cannot load a causal LM"):
        load_model(tmp_path)


def test_cli_acts_and_eval(tiny_lm, tiny_llama, tmp_path):
    folder = tiny_llama
    text = tmp_path / "corpus.txt"
    text.write_text("".join(tiny_lm.texts(12)))
    runner = CliRunner()
    out = tmp_path / "acts"
    result = runner.invoke(cli, ["acts", "--model", str(folder), "--text", str(text), "--layer", "1",
                                 "--tokens", "400", "--context", "32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_rows"] == 400 and manifest["layer"] == 1 and manifest["m"] == tiny_lm.HIDDEN

    torch.manual_seed(0)
    sae = ExpanderSAE(tiny_lm.HIDDEN, 128, 4, 8, seed=3)
    save_compact(sae, tmp_path / "sae.safetensors")
    result = runner.invoke(cli, ["eval", str(tmp_path / "sae.safetensors"), "--acts", str(out), "--model", str(folder),
                                 "--text", str(text), "--ce-tokens", "64", "--context", "32", "--json"])
    assert result.exit_code == 0, result.output
    [report] = json.loads(result.stdout)["hookpoints"]
    for key in ("fvu", "explained_variance", "l0", "dead_fraction", "ce_clean", "ce_zero", "ce_spliced",
                "ce_recovered", "ce_recovered_mean_ablation"):
        assert isinstance(report[key], float), key
    assert report["ce_hookpoint"] == "blocks.1.hook_resid_post"  # layer and site from the manifest
    assert report["hookpoint"] is None  # the SAE's own hookpoint in its source (a lone compact file has none)
    assert report["l0"] == pytest.approx(8.0)

    table = runner.invoke(cli, ["eval", str(tmp_path / "sae.safetensors"), "--acts", str(out)])
    assert table.exit_code == 0 and "explained_variance" in table.output and "ce_clean" not in table.output

    save_compact(ExpanderSAE(16, 64, 4, 8), tmp_path / "small.safetensors")
    bad = runner.invoke(cli, ["eval", str(tmp_path / "small.safetensors"), "--acts", str(out)])
    assert bad.exit_code == 2
    assert bad.output.strip().count("\n") == 0 and "m=16" in bad.output and "m=32" in bad.output
