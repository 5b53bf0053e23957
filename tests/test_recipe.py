"""The README's recipe end to end through the CLI on a tiny LM: an OpenAI-style layer-normed dense SAE
is converted (``--mask topd``), retrained (``train --init``), fine-tuned through the LM, evaluated with
CE, pushed and pulled; ``train --teacher`` takes a local folder and an ``hf://`` URI alike."""

import json
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

import saecompress
from saecompress.cli.main import cli
from saecompress.compact import load_compact, read_compact_metadata

pytestmark = pytest.mark.usefixtures("one_thread")

N, K, D = 128, 8, 4
LM_ARGS = ("--layer", "1", "--context", "32")


def ok(*args) -> str:
    """Run a command that must succeed; its stdout."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def tensors(sae) -> dict[str, torch.Tensor]:
    return {name: t.detach() for name, t in sae.state_dict().items()}


def assert_same_sae(a, b) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


@pytest.fixture(scope="module")
def world(tiny_llama, tiny_lm, dense_io, tmp_path_factory):
    """The tiny LM, training and held-out text, harvested activations of both, and dense SAEs."""
    root = tmp_path_factory.mktemp("recipe")
    train_text, held_text = root / "train.txt", root / "held.txt"
    train_text.write_text("".join(tiny_lm.texts(12)))
    held_text.write_text("".join(tiny_lm.texts(6, seed=7)))
    ok("acts", "--model", tiny_llama, "--text", train_text, *LM_ARGS, "--tokens", 2000, "--out", root / "acts")
    ok("acts", "--model", tiny_llama, "--text", held_text, *LM_ARGS, "--tokens", 600, "--out", root / "eval-acts")
    w = dense_io.weights(0, tiny_lm.HIDDEN, N)
    return SimpleNamespace(root=root, model=tiny_llama, train_text=train_text, held_text=held_text,
                           acts=root / "acts", eval_acts=root / "eval-acts", weights=w,
                           openai=dense_io.write_openai(root / "openai.pt", w, K),
                           saelens=dense_io.write_saelens(root / "saelens" / "blocks.1.hook_resid_post", w, K))


def evaluate(world, path, ce: bool = False) -> dict:
    extra = ("--model", world.model, "--text", world.held_text, *LM_ARGS, "--ce-tokens", 128) if ce else ()
    [report] = json.loads(ok("eval", path, "--acts", world.eval_acts, *extra, "--json"))["hookpoints"]
    return report


def assert_topd_support(sae, W_dec: torch.Tensor, d: int) -> None:
    """Each latent keeps the d dims where the dense decoder row is largest in magnitude."""
    want = W_dec.abs().topk(d, dim=1).indices
    assert [set(r) for r in sae.indices.tolist()] == [set(r) for r in want.tolist()]


def test_readme_recipe_convert_topd_train_init_finetune_on_a_layer_normed_sae(world, hub, tmp_path):
    start, retrained, tuned = (tmp_path / f"{name}.safetensors" for name in ("start", "retrained", "tuned"))
    ok("convert", world.openai, start, "--d", D, "--mask", "topd", "--json")
    converted = load_compact(start)
    assert converted.normalize_input and converted.mask_seed is None  # LN kept, explicit top-d indices
    assert_topd_support(converted, world.weights["W_dec"], D)

    ok("train", "--acts", world.acts, "--init", start, "--tokens", 8192, "--batch", 256, "--held-out", 500,
       "--out", retrained, "--json")
    trained = load_compact(retrained)
    assert trained.normalize_input and torch.equal(trained.indices, converted.indices)  # support kept
    assert read_compact_metadata(retrained)["user"]["held_out"]["fvu"] >= 0
    before, after = evaluate(world, start), evaluate(world, retrained, ce=True)
    assert after["fvu"] < before["fvu"], (before["fvu"], after["fvu"])  # on held-out text's activations

    stats = json.loads(ok("finetune", retrained, "--model", world.model, "--text", world.train_text, *LM_ARGS,
                          "--tokens", 32 * 2 * 20, "--batch", 2, "--lr", "1e-2", "--out", tuned, "--json"))
    assert stats["finetune"]["steps"] == 20
    final = load_compact(tuned)
    assert final.normalize_input and torch.equal(final.indices, converted.indices)
    user = read_compact_metadata(tuned)["user"]
    assert user["finetune"]["steps"] == 20 and "held_out_before_finetune" in user
    report = evaluate(world, tuned, ce=True)
    assert isinstance(report["ce_recovered"], float)
    # fine-tuning through the LM brings the spliced LM's loss on held-out text closer to the clean one
    assert report["ce_spliced"] < after["ce_spliced"], (after["ce_spliced"], report["ce_spliced"])
    assert report["ce_clean"] == pytest.approx(after["ce_clean"], rel=1e-6)

    # the files train and finetune wrote go to the hub and come back unchanged
    folder = tmp_path / "release"
    for name, path in (("retrained", retrained), ("tuned", tuned)):
        (folder / name).mkdir(parents=True)
        (folder / name / "sae.safetensors").write_bytes(path.read_bytes())
    pushed = json.loads(ok("push", "alice/recipe", folder))
    assert pushed["created_commit"]
    for name, path in (("retrained", retrained), ("tuned", tuned)):
        [pulled] = [p for p in ok("pull", f"alice/recipe/{name}", "--local-dir", tmp_path / "dl").split()
                    if p.endswith(".safetensors")]
        assert open(pulled, "rb").read() == path.read_bytes()
        assert_same_sae(saecompress.load(f"hf://alice/recipe/{name}"), load_compact(path))


def test_train_teacher_as_a_path_and_as_an_hf_uri(world, hub, upload_folder, tmp_path):
    upload_folder(hub, "bob/dense-tiny", world.saelens.parent)
    outs = {}
    for how, teacher in (("path", world.saelens), ("hf", "hf://bob/dense-tiny/blocks.1.hook_resid_post")):
        outs[how] = tmp_path / f"{how}.safetensors"
        ok("train", "--acts", world.acts, "--d", D, "--teacher", teacher, "--tokens", 1024, "--batch", 256,
           "--held-out", 500, "--out", outs[how])
    local, remote = load_compact(outs["path"]), load_compact(outs["hf"])
    assert_topd_support(local, world.weights["W_dec"], D)  # the teacher was really read
    assert_same_sae(local, remote)
