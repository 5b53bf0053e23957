"""``saecompress sweep``: the frontier grid, its baselines, the per-point cache and its refusals."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from saecompress.activations import open_activations, write_activations
from saecompress.cli.main import cli
from saecompress.compact import dense_bytes, load_compact, read_compact_metadata
from saecompress.metrics import evaluate
from saecompress.sweep import RECIPES, matched_latents

M, N, K, HELD = 32, 128, 8, 500
SMALL = ["--k", K, "--n", N, "--tokens", 2048, "--batch-size", 256, "--held-out", HELD]


def run(*args):
    return CliRunner().invoke(cli, ["sweep", *map(str, args)])


def one_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def acts(tmp_path_factory) -> Path:
    """Sparse combinations of 128 unit features in m=32, a mean offset and a little noise."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(128, M, generator=g)
    features /= features.norm(dim=1, keepdim=True)
    active = torch.randint(128, (3000, 4), generator=g)
    size = torch.rand(3000, 4, generator=g) * 3 + 1
    x = torch.einsum("ra,ram->rm", size, features[active]) + 0.05 * torch.randn(3000, M, generator=g) + 1.0
    return write_activations(tmp_path_factory.mktemp("acts") / "acts.npy", x.float())


def frontier(out: Path) -> dict:
    return json.loads((out / "frontier.json").read_text())


def stamps(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()}


def test_native_grid_baselines_outputs_and_resume(acts, tmp_path):
    out = tmp_path / "frontier"
    done = run("--acts", acts, "--d", "4,7", *SMALL, "--dtype", "float32,int8", "--out", out)
    assert done.exit_code == 0, done.output
    result = frontier(out)
    assert result["y"] == "explained_variance" and result["held_out_rows"] == HELD
    points = {(p["recipe"], p["d"], p["dtype"]): p for p in result["points"] if p["recipe"] != "dense-matched"}
    native = ("native", "native-pursuit")  # every recipe without a dense SAE or an LM
    assert set(points) == {(r, d, t) for r in native for d in (4, 7) for t in ("float32", "int8")} | \
        {("dense", None, t) for t in ("float32", "int8")}
    held = open_activations(acts).split(HELD)[1]
    for (recipe, d, dtype), p in points.items():
        assert (p["n"], p["k"]) == (N, K)
        if recipe in native:  # the file it names is the point, measured on the held-out rows
            sae = load_compact(out / p["sae"])
            assert p["file_bytes"] == (out / p["sae"]).stat().st_size
            meta = read_compact_metadata(out / p["sae"])
            assert (meta["dtype"], meta["mask"], sae.d) == (dtype, "seed", d)
            assert sae.encoder == ("pursuit" if recipe == "native-pursuit" else "untied")
            assert evaluate(sae, held)["fvu"] == pytest.approx(p["fvu"], rel=1e-6)
        else:
            assert p["file_bytes"] == dense_bytes(M, N, dtype)
    assert points[("native", 4, "int8")]["file_bytes"] < points[("native", 4, "float32")]["file_bytes"]
    for d in (4, 7):  # pursuit reads the native decoder (one training per d) and stores no encoder
        untied, pursuit = (load_compact(out / points[(r, d, "float32")]["sae"]) for r in native)
        assert torch.equal(pursuit.values, untied.values) and torch.equal(pursuit.indices, untied.indices)
        assert points[("native-pursuit", d, "float32")]["file_bytes"] < points[("native", d, "float32")]["file_bytes"]
        assert len(list((out / "work").glob(f"native-d{d}-*.safetensors"))) == 1
    # the honest baseline: for each expander point the largest dense SAE that fits in its bytes
    matched = [p for p in result["points"] if p["recipe"] == "dense-matched"]
    assert sorted(key for p in matched for key in p["matches"]) == \
        sorted(p["key"] for p in points.values() if p["recipe"] in native)
    for p in matched:
        [target] = [q for q in points.values() if q["key"] in p["matches"]]
        assert dense_bytes(M, p["n"], p["dtype"]) <= target["file_bytes"] < dense_bytes(M, p["n"] + 1, p["dtype"])
        assert p["n"] == matched_latents(M, target["file_bytes"], p["dtype"]) and K <= p["n"] < N
    versus = {row["key"]: row for row in result["versus_matched"]}
    assert set(versus) == {p["key"] for p in points.values() if p["recipe"] in native}
    for p in matched:
        for key in p["matches"]:
            assert versus[key]["difference"] == pytest.approx(versus[key]["explained_variance"] - p["explained_variance"])
            assert versus[key]["dense_n"] == p["n"]
    with (out / "frontier.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["key"] for r in rows] == [p["key"] for p in result["points"]]
    assert all(float(r["explained_variance"]) == pytest.approx(p["explained_variance"])
               for r, p in zip(rows, result["points"]))
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert any("matplotlib" in note for note in result["notes"])

    before = stamps(out)  # a rerun makes nothing; a new d makes exactly its points
    again = run("--acts", acts, "--d", "4,7", *SMALL, "--dtype", "float32,int8", "--out", out)
    assert again.exit_code == 0, again.output
    assert stamps(out) == before and frontier(out)["points"] == result["points"]
    lost = next((out / "points").glob("native-d4-int8-*.json"))  # as if interrupted before that point
    lost.unlink()
    work = {p.name: p.stat().st_mtime_ns for p in (out / "work").iterdir()}
    again = run("--acts", acts, "--d", "4,7", *SMALL, "--dtype", "float32,int8", "--out", out)
    assert again.exit_code == 0, again.output
    assert {name for name, stamp in stamps(out).items() if before.get(name) != stamp} == \
        {lost.name, lost.name.replace(".json", ".safetensors")}  # only that point, from the trained model
    assert {p.name: p.stat().st_mtime_ns for p in (out / "work").iterdir()} == work
    before = stamps(out)
    more = run("--acts", acts, "--d", "4,7,16", *SMALL, "--dtype", "float32,int8", "--out", out)
    assert more.exit_code == 0, more.output
    after = stamps(out)
    assert all(after[name] == stamp for name, stamp in before.items())
    new = {name for name in after if name not in before and name.endswith(".json")}
    assert {name.rsplit("-", 1)[0] for name in new if name.startswith("native")} == \
        {f"{r}-d16-{t}" for r in native for t in ("float32", "int8")}
    added = [p for p in frontier(out)["points"] if f"{p['key']}.json" in new]
    assert all(p["d"] == 16 or set(p.get("matches", [])) <= {q["key"] for q in added} for p in added)


def test_dense_recipes_finetune_and_ce(tiny_llama, tmp_path):
    from saecompress.lm import ce_eval, harvest, load_model
    from saecompress.sources import load_source
    from saecompress.texts import read_texts
    from saecompress.train import TrainConfig, train

    train_text, held_text = tmp_path / "train.txt", tmp_path / "held.txt"
    train_text.write_text("the cat sat on a mat. a quiet dog ran far.\n" * 60)
    held_text.write_text("a zebra ran on the mat. the dog sat.\n" * 20)
    model, tokenizer = load_model(tiny_llama)
    harvest(model, tokenizer, read_texts([train_text]), 1, tokens=2600, out=tmp_path / "acts", context=64,
            progress=False)
    dense = tmp_path / "dense"
    train(tmp_path / "acts", dense, TrainConfig(d=None, n=N, k=K, tokens=2048, batch_size=256, held_out_rows=300),
          progress=False)
    other_text = tmp_path / "other.txt"  # another domain: held-out rows and CE text
    other_text.write_text("numbers: one two three four five six seven.\n" * 20)
    harvest(model, tokenizer, read_texts([other_text]), 1, tokens=400, out=tmp_path / "other-acts", context=64,
            progress=False)
    out = tmp_path / "frontier"
    done = run("--acts", tmp_path / "acts", "--dense", dense, "--model", tiny_llama, "--text", train_text,
               "--eval-text", held_text, "--ood-acts", tmp_path / "other-acts", "--ood-text", other_text,
               "--context", 64, "--d", 4, "--tokens", 1024, "--batch-size", 256,
               "--held-out", 300, "--finetune-tokens", 512, "--ce-tokens", 256, "--out", out)
    assert done.exit_code == 0, done.output
    assert "ood ce_recovered" in done.output
    result = frontier(out)
    for p in result["points"]:  # every point measured on both domains, the shared passes once per text
        assert p["ood_num_rows"] == 400 and 0 <= p["ood_dead_fraction"] <= 1 and p["ood_fvu"] > 0
        assert p["ood_ce_clean"] != p["ce_clean"] and isinstance(p["ood_ce_recovered"], float)
    dense_point = next(p for p in result["points"] if p["recipe"] == "dense")
    direct = ce_eval(model, tokenizer, read_texts([other_text]), load_source(dense).model, 1, tokens=256, context=64,
                     progress=False)
    for name in ("ce_clean", "ce_zero", "ce_spliced", "ce_recovered", "kl_recovered"):
        assert dense_point["ood_" + name] == pytest.approx(direct[name], rel=1e-5)
    assert any(row.get("ood_difference") is not None for row in result["versus_matched"])
    assert result["y"] == "ce_recovered" and (result["n"], result["k"]) == (N, K)  # from the dense SAE
    by = {p["recipe"]: p for p in result["points"]}
    assert set(by) == set(RECIPES) | {"dense", "dense-matched"}  # every recipe: the inputs allow them all
    assert all(isinstance(p["ce_recovered"], float) and p["ce_clean"] < p["ce_zero"] for p in by.values())
    assert by["native"]["mask"] == "expander" and by["topd-retrain"]["mask"] == "topd"
    assert by["topd-retrain"]["file_bytes"] > by["native"]["file_bytes"]  # explicit indices
    assert by["topd-retrain-finetune"]["seconds"] > by["topd-retrain"]["seconds"]  # the chain's time
    assert by["dense"]["seconds"] is None and by["dense"]["file_bytes"] == dense_bytes(M, N, "float32")
    for recipe in ("topd-retrain-finetune", "native-pursuit-finetune", "topd-retrain-pursuit-finetune"):
        assert "finetune" in read_compact_metadata(out / by[recipe]["sae"])["user"]
        assert by[recipe]["seconds"] > by[recipe.removesuffix("-finetune")]["seconds"]
    for recipe in ("native-pursuit", "native-pursuit-finetune"):
        meta = read_compact_metadata(out / by[recipe]["sae"])
        assert (meta["encoder"], meta["mask"], by[recipe]["mask"]) == ("pursuit", "seed", "expander")
    assert by["native-pursuit"]["file_bytes"] < by["native"]["file_bytes"]
    for base in ("native", "topd-retrain"):  # trained once, read by pursuit and fine-tuned from it
        assert len(list((out / "work").glob(f"{base}-d4-*.safetensors"))) == 1
    assert not list((out / "work").glob("*.ckpt"))


@pytest.mark.parametrize("args, message", [
    (["--d", "4,32"], "--d 32 is not below the activations' width m=32"),
    (["--d", "4", "--k", "200"], "--k 200 is more than the 128 latents"),
    (["--d", ""], "the grid is empty"),
    (["--d", "4", "--recipes", ""], "the grid is empty"),
    (["--d", "4,x"], "--d takes comma-separated whole numbers"),
    (["--d", "4", "--recipes", "topd-retrain"], "recipe topd-retrain needs --dense SRC"),
    (["--d", "4", "--recipes", "native,nope"], "unknown recipe 'nope'"),
    (["--d", "4", "--recipes", "native-pursuit-finetune"], "recipe native-pursuit-finetune needs --model and --text"),
    (["--d", "4", "--dtype", "float8"], "unknown --dtype 'float8'"),
])
def test_bad_grids_are_one_error_line_before_any_work(acts, tmp_path, args, message):
    out = tmp_path / "frontier"
    assert message in one_error(run("--acts", acts, *SMALL, *args, "--out", out))  # the last --k counts
    assert not out.exists()


def test_outputs_and_missing_settings_are_refused(acts, tmp_path):
    assert "holds the input" in one_error(run("--acts", acts, "--d", 4, *SMALL, "--out", acts.parent))
    assert "--n N" in one_error(run("--acts", acts, "--d", 4, "--out", tmp_path / "o"))
    assert "--model and --text" in one_error(run("--acts", acts, "--d", 4, *SMALL, "--model", "x", "--out",
                                                 tmp_path / "o"))
    bad = tmp_path / "nan.npy"  # measurement rows are read before any training
    np.save(bad, np.full((64, M), np.nan, dtype=np.float32))
    assert "contains NaN or inf" in one_error(run("--acts", acts, "--ood-acts", bad, "--d", 4, *SMALL,
                                                  "--out", tmp_path / "o"))
    (tmp_path / "ood").mkdir()
    np.save(tmp_path / "ood" / "rows.npy", np.random.default_rng(0).normal(size=(64, M)).astype(np.float32))
    assert "holds the input" in one_error(run("--acts", acts, "--ood-acts", tmp_path / "ood" / "rows.npy", "--d", 4,
                                              *SMALL, "--out", tmp_path / "ood"))
    assert not (tmp_path / "o").exists()
