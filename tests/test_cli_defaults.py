"""Issue 13, defaults, options and shapes: what a new user meets at the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from saecompress.cli.main import cli
from saecompress.activations import ShardWriter, open_activations, write_activations
from saecompress.compact import load_compact, save_compact
from saecompress.convert import convert
from saecompress.errors import SaeCompressError
from saecompress.exporters.onnx import export_onnx
from saecompress.metrics import evaluate
from saecompress.train import TrainConfig, train

M, FEATURES, N, K = 48, 256, 512, 8
ROOT = Path(__file__).resolve().parents[1]
EXE = [sys.executable, "-m", "saecompress"]
REPO = "alice/tiny-expander"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_error(result) -> str:
    """The single ``error:`` line of a failed command (exit 2, no traceback)."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def sparse_features(seed: int, rows: int) -> torch.Tensor:
    """Activations like a residual stream: a large mean, a few high-variance dims, sparse dense features."""
    g = torch.Generator().manual_seed(0)
    scales = torch.ones(M)
    scales[:3] = 6.0
    features = torch.randn(FEATURES, M, generator=g) * scales
    features /= features.norm(dim=1, keepdim=True)
    mean = 3.0 * torch.randn(M, generator=g)
    g = torch.Generator().manual_seed(seed)
    active = torch.randint(FEATURES, (rows, 5), generator=g)
    size = torch.rand(rows, 5, generator=g) * 4 + 1
    noise = 0.05 * torch.randn(rows, M, generator=g)
    return (mean + torch.einsum("ra,ram->rm", size, features[active]) + noise).float()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dense TopK SAE trained by saecompress itself (a SAELens folder), its data and held-out data."""
    root = tmp_path_factory.mktemp("trained")
    write_activations(root / "train.npy", sparse_features(1, 6000))
    write_activations(root / "held.npy", sparse_features(2, 2000))
    cfg = TrainConfig(d=None, n=N, k=K, tokens=20480, batch_size=256, held_out_rows=500)
    dense, _ = train(root / "train.npy", root / "dense", cfg, progress=False)
    return root, dense


def held_out_fvu(sae, root: Path) -> float:
    return evaluate(sae, open_activations(root / "held.npy"))["fvu"]


# ------------------------------------------------------------------ item 3: defaults that mislead

def test_convert_default_beats_the_mean_where_the_old_default_did_not(trained, tmp_path):
    root, dense = trained
    assert held_out_fvu(dense, root) < 0.7
    old = convert(dense, 7, mask="expander", encoder="tied")  # the old default, and its norm-restoring scale
    with torch.no_grad():
        kept = dense.W_dec.gather(1, old.indices)
        old.values.copy_(kept * dense.W_dec.norm(dim=1, keepdim=True) / kept.norm(dim=1, keepdim=True))
    assert held_out_fvu(old, root) > 1

    result = run("convert", root / "dense", tmp_path / "out.safetensors", "--json")
    assert result.exit_code == 0, result.output
    [report] = json.loads(result.stdout)["hookpoints"]
    assert (report["mask"], report["encoder"], report["d"]) == ("topd", "untied", 7)
    assert held_out_fvu(load_compact(tmp_path / "out.safetensors"), root) < 1
    assert report["needs_training"] is True and "--acts" in report["advice"] and "train" in report["advice"]
    text = run("convert", root / "dense", tmp_path / "text.safetensors")
    assert "needs training" in text.stdout and "train --acts ACTS --init" in text.stdout and "finetune" in text.stdout
    assert "Default topd" in run("convert", "--help").stdout and "Default untied" in run("convert", "--help").stdout


REAL_ACTS = Path(__file__).parent / "fixtures" / "smollm2-l15-new-testament-512.safetensors"


def test_convert_default_on_a_real_sae_beats_the_mean_on_real_activations(tmp_path):
    """The shipped SmolLM2 layer-15 SAE (trained on the Old Testament) against 512 New Testament rows."""
    from saecompress.demo import DEFAULT_SAE

    out = tmp_path / "real.safetensors"
    assert run("convert", DEFAULT_SAE, out).exit_code == 0
    result = run("eval", out, "--acts", REAL_ACTS, "--json")
    assert result.exit_code == 0, result.output
    [report] = json.loads(result.stdout)["hookpoints"]
    assert report["fvu"] < 1
    dense = json.loads(run("eval", DEFAULT_SAE, "--acts", REAL_ACTS, "--json").stdout)["hookpoints"][0]
    assert dense["fvu"] < report["fvu"]


def test_convert_with_acts_fits_the_scale_and_never_does_worse_than_the_mean(trained, tmp_path):
    root, dense = trained
    out = tmp_path / "tied.safetensors"
    result = run("convert", root / "dense", out, "--mask", "expander", "--encoder", "tied", "--acts",
                 root / "train.npy", "--json")
    assert result.exit_code == 0, result.output
    [report] = json.loads(result.stdout)["hookpoints"]
    fitted = load_compact(out)
    assert report["fvu"] <= 1 and held_out_fvu(fitted, root) < 1
    assert report["fvu"] == pytest.approx(evaluate(fitted, open_activations(root / "train.npy"))["fvu"], rel=1e-4)
    assert report["calibration_scale"] > 0
    # the fit keeps the code: the same latents fire as without it
    plain = convert(dense, 7, mask="expander", encoder="tied")
    x = sparse_features(3, 64)
    assert torch.equal(plain.encode(x)[1], fitted.encode(x)[1])
    assert report["needs_training"] == (report["fvu"] > report["fvu_source"] + 0.1)
    measured = run("convert", root / "dense", tmp_path / "m.safetensors", "--acts", root / "train.npy",
                   "--no-calibrate", "--json")
    [plain_report] = json.loads(measured.stdout)["hookpoints"]
    assert plain_report["calibration_scale"] is None


def test_train_teacher_defaults_to_topd(trained, tmp_path):
    root, _ = trained
    result = run("train", "--acts", root / "train.npy", "--teacher", root / "dense", "--d", 4, "--tokens", 256,
                 "--batch", 256, "--out", tmp_path / "student.safetensors", "--json")
    assert result.exit_code == 0, result.output
    student = load_compact(tmp_path / "student.safetensors")
    assert student.mask_seed is None  # topd: explicit indices, the teacher's largest decoder entries
    assert torch.equal(student.indices, trained[1].W_dec.abs().topk(4, dim=1).indices.sort(dim=1).values)


# ------------------------------------------------------------------ item 8: options that disagree

@pytest.fixture
def repo(dense_io, tmp_path) -> Path:
    """A sparsify-style folder with two hookpoints, and activations for it."""
    folder = tmp_path / "repo"
    for layer in (0, 1):
        dense_io.write_sparsify(folder / f"layers.{layer}", dense_io.weights(layer, 16, 64), 4)
    np.save(tmp_path / "acts.npy", np.random.default_rng(0).normal(size=(20, 16)).astype(np.float32))
    return folder


def test_export_and_monitor_take_hookpoint(repo, tmp_path):
    result = run("export", repo, tmp_path / "l1.onnx", "--hookpoint", "layers.1")
    assert result.exit_code == 0, result.output
    monitor = run("monitor", repo, "--hookpoint", "layers.1", "--input", tmp_path / "acts.npy", "--jsonl")
    assert monitor.exit_code == 0, monitor.output
    assert len(monitor.stdout.splitlines()) == 20
    assert "choose one with --hookpoint" in one_error(run("export", repo, tmp_path / "x.onnx"))


def test_every_source_command_takes_the_hub_options(tmp_path, isolated_hf, hub_server, hub_sae):
    from saecompress.hub import push

    for command in ("convert", "info", "eval", "export", "monitor", "train", "finetune", "push", "pull"):
        text = run(command, "--help").stdout
        assert "--endpoint" in text and "--token" in text, command
    saes = tmp_path / "saes"
    save_compact(hub_sae(1, "layers.3"), saes / "layers.3" / "sae.safetensors")
    np.save(tmp_path / "acts.npy", np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32))
    with hub_server(tmp_path / "server", tokens={"hf_w": "write"}) as hub:
        push(saes, REPO, endpoint=hub.url, token="hf_w", private=True)
        src, auth = f"hf://{REPO}/layers.3", ("--endpoint", hub.url, "--token", "hf_w")
        assert run("info", src, *auth).exit_code == 0
        assert run("eval", src, "--acts", tmp_path / "acts.npy", *auth).exit_code == 0
        assert run("export", src, tmp_path / "e.onnx", *auth).exit_code == 0
        assert run("monitor", src, "--input", tmp_path / "acts.npy", *auth).exit_code == 0
        denied = run("info", src, "--endpoint", hub.url)  # private: no token, no access
        assert "pass --token" in one_error(denied)


# ------------------------------------------------------------------ item 9: one schema

def test_many_hookpoints_into_a_safetensors_file_is_refused(repo, tmp_path):
    out = tmp_path / "out.safetensors"
    message = one_error(run("convert", repo, out))
    assert "--hookpoint" in message and "folder" in message and not out.exists()


def test_json_is_one_schema_for_one_or_many_hookpoints(repo, tmp_path):
    one = json.loads(run("convert", repo, tmp_path / "one.safetensors", "--hookpoint", "layers.0", "--json").stdout)
    many = json.loads(run("convert", repo, tmp_path / "all", "--json").stdout)
    assert [r["hookpoint"] for r in one["hookpoints"]] == ["layers.0"]
    assert [r["hookpoint"] for r in many["hookpoints"]] == ["layers.0", "layers.1"]
    assert one.keys() == many.keys() == {"out", "hookpoints"}
    infos = json.loads(run("info", tmp_path / "all", "--json").stdout)["hookpoints"]
    assert [i["hookpoint"] for i in infos] == ["layers.0", "layers.1"]
    single = json.loads(run("info", tmp_path / "one.safetensors", "--json").stdout)
    assert list(single) == ["hookpoints"] and single["hookpoints"][0]["hookpoint"] == "layers.0"
    evaluated = json.loads(run("eval", tmp_path / "one.safetensors", "--acts", tmp_path / "acts.npy", "--json").stdout)
    assert list(evaluated) == ["hookpoints"] and "fvu" in evaluated["hookpoints"][0]
    exported = json.loads(run("export", tmp_path / "one.safetensors", tmp_path / "one.onnx").stdout)
    assert list(exported) == ["hookpoints"] and exported["hookpoints"][0]["graph"] == "encode"


# ------------------------------------------------------------------ item 10: validate, never clamp

def test_dense_training_refuses_expander_options(trained, tmp_path):
    acts_file = trained[0] / "train.npy"
    for option in (["--d", "7"], ["--encoder", "tied"], ["--mask-seed", "3"], ["--mask", "topd"]):
        result = run("train", "--acts", acts_file, "--dense", *option, "--out", tmp_path / "dense")
        assert result.exit_code == 2 and "a --dense baseline" in result.output, result.output
        assert not (tmp_path / "dense").exists()


def test_numbers_are_validated_not_clamped(repo, tmp_path):
    rows = torch.randn(2040, 16)
    write_activations(tmp_path / "a.npy", rows)
    base = ("train", "--acts", tmp_path / "a.npy", "--d", 4, "--n", 64, "--k", 4, "--batch", 256)
    held = run(*base, "--tokens", 512, "--held-out", 512, "--out", tmp_path / "h.safetensors", "--json")
    assert held.exit_code == 0, held.output
    assert json.loads(held.stdout.splitlines()[-1])["held_out"]["num_rows"] == 512
    assert "--held-out 5000" in one_error(run(*base, "--tokens", 512, "--held-out", 5000,
                                              "--out", tmp_path / "x.safetensors"))
    assert "less than one batch" in one_error(run(*base, "--tokens", 64, "--out", tmp_path / "y.safetensors"))
    src = repo / "layers.0"
    for bad in (("--k", -1), ("--d", 0), ("--d", -3), ("--search-seeds", 0), ("--max-rows", 0), ("--seed", -1)):
        result = run("convert", src, tmp_path / "c.safetensors", *bad)
        assert result.exit_code == 2 and bad[0] in result.output, (bad, result.output)
        assert not (tmp_path / "c.safetensors").exists()
    assert "--k is only for Expander-SAE paper checkpoints" in one_error(
        run("convert", src, tmp_path / "c.safetensors", "--k", 3))
    assert "--seed" in one_error(run("convert", src, tmp_path / "c.safetensors", "--seed", 3))
    assert "--search-seeds" in one_error(run("convert", src, tmp_path / "c.safetensors", "--search-seeds", 3))
    assert "--acts" in one_error(run("convert", src, tmp_path / "c.safetensors", "--max-rows", 3))
    for command in (("eval", src, "--acts", tmp_path / "a.npy", "--batch-size", 0),
                    ("monitor", src, "--input", tmp_path / "a.npy", "--batch-size", 0),
                    ("train", "--acts", tmp_path / "a.npy", "--n", 64, "--dead-tokens", 0, "--out", tmp_path / "z")):
        assert run(*command).exit_code == 2, command


# ------------------------------------------------------------------ item 11: one activation reader

def test_every_command_reads_the_same_activation_shapes(repo, tmp_path):
    src = repo / "layers.0"
    rows = np.random.default_rng(1).normal(size=(12, 16)).astype(np.float32)
    np.save(tmp_path / "flat.npy", rows)
    np.save(tmp_path / "seq.npy", rows.reshape(3, 4, 16))
    np.save(tmp_path / "row.npy", rows[0])
    with ShardWriter(tmp_path / "shards", 16, shard_rows=5) as writer:
        writer.add(torch.from_numpy(rows))
        writer.close()
    flat = json.loads(run("eval", src, "--acts", tmp_path / "flat.npy", "--json").stdout)["hookpoints"][0]
    for name in ("seq.npy", "shards"):
        got = json.loads(run("eval", src, "--acts", tmp_path / name, "--json").stdout)["hookpoints"][0]
        assert got["fvu"] == pytest.approx(flat["fvu"], rel=1e-6) and got["num_rows"] == 12, name
    converted = run("convert", src, tmp_path / "c.safetensors", "--acts", tmp_path / "seq.npy", "--json")
    assert converted.exit_code == 0 and json.loads(converted.stdout)["hookpoints"][0]["num_rows"] == 12
    want = run("monitor", src, "--input", tmp_path / "flat.npy", "--jsonl").stdout.splitlines()
    for name, count in (("seq.npy", 12), ("shards", 12), ("row.npy", 1)):
        result = run("monitor", src, "--input", tmp_path / name, "--jsonl")
        assert result.exit_code == 0, (name, result.output)
        assert result.stdout.splitlines() == want[:count], name


# ------------------------------------------------------------------ item 12: info, --watch, --debug

def test_info_says_what_a_file_is(dense_io, repo, tmp_path):
    np.save(tmp_path / "acts.npy", np.zeros((7, 16), np.float32))
    export_onnx(repo / "layers.0", tmp_path / "sae.onnx")
    dense_io.write_openai(tmp_path / "openai.pt", dense_io.weights(0, 16, 64))
    for name, needle in (("acts.npy", "activations [7, 16]"), ("sae.onnx", "an ONNX model")):
        message = one_error(run("info", tmp_path / name))
        assert needle in message and "truncated" not in message, message
    assert "saecompress eval" in one_error(run("info", tmp_path / "acts.npy"))
    for dense in (tmp_path / "openai.pt", repo / "layers.0"):  # a dense SAE: its settings, and what to do with it
        result = run("info", dense)
        assert result.exit_code == 0 and "saecompress convert" in result.stdout, result.output


def test_watch_is_checked(repo, tmp_path):
    np.save(tmp_path / "acts.npy", np.ones((2, 16), np.float32))
    base = ("monitor", repo / "layers.0", "--input", tmp_path / "acts.npy")
    assert "--watch is empty" in one_error(run(*base, "--watch", ""))
    assert "twice" in one_error(run(*base, "--watch", "3:0.5,3:1"))
    assert "no threshold" in one_error(run(*base, "--watch", "3"))
    assert run(*base, "--watch", "3:0.5").exit_code == 0


def test_debug_works_after_the_command(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    result = CliRunner().invoke(cli, ["info", str(bad), "--debug"])
    assert result.exit_code != 2 and isinstance(result.exception, SaeCompressError)
    assert one_error(CliRunner().invoke(cli, ["info", str(bad)]))


# ------------------------------------------------------------------ item 13: stderr hygiene

def subprocess_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_error_line_starts_its_own_line_after_a_progress_bar(dense_io, tmp_path):
    repo = tmp_path / "repo"
    for layer in range(3):
        dense_io.write_sparsify(repo / f"layers.{layer}", dense_io.weights(layer, 16, 64), 4)
    (repo / "layers.2" / "sae.safetensors").write_bytes(b"garbage")
    done = subprocess.run(EXE + ["convert", str(repo), str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=ROOT, env=subprocess_env(), timeout=120)
    assert done.returncode == 2 and "convert" in done.stderr  # the bar was drawn
    assert [line for line in done.stderr.split("\n") if line.startswith("error: ")], done.stderr


def test_loading_a_pt_file_prints_no_torch_warning(dense_io, tmp_path):
    w = dense_io.weights(0, 16, 64)
    src = dense_io.write_openai(tmp_path / "sae.pt", w)
    torch.save(torch.load(src, weights_only=True), src, pickle_protocol=3)  # torch warns on protocols != 2
    done = subprocess.run(EXE + ["convert", str(src), str(tmp_path / "out.safetensors")], capture_output=True,
                          text=True, cwd=ROOT, env=subprocess_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pickle protocol" not in done.stderr and "Warning" not in done.stderr


def test_pull_of_a_missing_hookpoint_prints_one_error_line(tmp_path, isolated_hf, hub_server, hub_sae):
    from saecompress.hub import push

    saes = tmp_path / "saes"
    save_compact(hub_sae(1, "layers.3"), saes / "layers.3" / "sae.safetensors")
    with hub_server(tmp_path / "server") as hub:
        push(saes, REPO, endpoint=hub.url)
        env = {k: v for k, v in subprocess_env().items() if not k.startswith(("HF_", "HUGGING"))}
        env |= {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "home"), "HF_HUB_DISABLE_XET": "1"}
        done = subprocess.run(EXE + ["pull", f"{REPO}/layers.99"], env=env, capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "No files matched" not in done.stderr
