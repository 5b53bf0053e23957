"""Nothing lost, nothing surprising: outputs never replace inputs and are checked before any work,
write errors name the output, closed pipes end quietly, JSON is valid, files hold no local paths."""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import constants, hf_hub_download

from saecompress.cli.main import cli
from saecompress.compact import compact_metadata, compact_tensors, read_compact_metadata, save_compact, write_safetensors
from saecompress.errors import SaeCompressError
from saecompress.models import ExpanderSAE

M, N, K = 16, 64, 4
CLI = [sys.executable, "-m", "saecompress"]


def error_line(*args: str) -> str:
    """Run a command that must fail: exit 2, nothing on stdout, exactly one ``error:`` line (no traceback)."""
    res = CliRunner().invoke(cli, list(map(str, args)))
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert res.stdout == "", res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and res.stderr.endswith(lines[0] + "\n"), res.stderr
    return lines[0]


def ok(*args: str):
    res = CliRunner().invoke(cli, list(map(str, args)))
    assert res.exit_code == 0, res.output
    return res


def strict_json(text: str):
    """Parse JSON as RFC 8259 defines it: bare NaN / Infinity are errors."""
    def refuse(token: str):
        raise ValueError(f"invalid JSON constant {token}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def acts(tmp_path) -> Path:
    path = tmp_path / "acts.npy"
    np.save(path, np.random.default_rng(0).normal(size=(3000, M)).astype(np.float32) + 0.5)
    return path


@pytest.fixture
def compact(tmp_path) -> Path:
    torch.manual_seed(0)
    sae = ExpanderSAE(M, N, 4, K, seed=0)
    with torch.no_grad():
        sae.values.normal_()
        sae.b_enc.normal_()
    return save_compact(sae, tmp_path / "sae.safetensors")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ 1. an output never replaces an input

def test_convert_refuses_outputs_that_are_or_lie_inside_the_source(dense_io, tmp_path, acts):
    saelens = dense_io.write_saelens(tmp_path / "saelens", dense_io.weights(0, M, N), K)
    sparsify = dense_io.write_sparsify(tmp_path / "repo" / "layers.3", dense_io.weights(1, M, N), K)
    before = snapshot(tmp_path)
    assert "lies inside the input folder" in error_line("convert", saelens, saelens / "sae_weights.safetensors")
    assert "lies inside the input folder" in error_line("convert", sparsify, sparsify / "sae.safetensors")
    assert "is the input" in error_line("convert", tmp_path / "repo", tmp_path / "repo")  # convert-all into itself
    link = tmp_path / "link.safetensors"
    link.symlink_to(saelens / "sae_weights.safetensors")
    assert "lies inside the input folder" in error_line("convert", saelens, link)  # resolved through the symlink
    assert "is the input" in error_line("convert", saelens, tmp_path / "x" / ".." / "acts.npy", "--acts", acts)
    link.unlink()
    assert snapshot(tmp_path) == before
    ok("convert", saelens, tmp_path / "out.safetensors")  # anywhere else is fine


def test_export_train_finetune_refuse_to_write_over_their_inputs(dense_io, tmp_path, acts, compact):
    before = snapshot(tmp_path)
    assert "is the input" in error_line("export", compact, compact)
    assert "is the input" in error_line("train", "--acts", acts, "--n", N, "--out", acts)
    assert "is the input" in error_line("train", "--acts", acts, "--init", compact, "--out", compact)
    teacher = dense_io.write_saelens(tmp_path / "teacher", dense_io.weights(0, M, N), K)
    before = snapshot(tmp_path)
    assert "is the input" in error_line("train", "--acts", acts, "--teacher", teacher, "--out", teacher)
    assert "lies inside the input folder" in error_line("train", "--acts", acts, "--teacher", teacher,
                                                        "--out", teacher / "cfg.json")
    # finetune refuses OUT = SRC before it loads the LM (an empty folder here: loading it would fail differently)
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "t.txt").write_text("some text " * 50)
    ft = ["--model", tmp_path / "not-a-model", "--text", tmp_path / "t.txt", "--layer", "0"]
    assert "is the input" in error_line("finetune", compact, *ft, "--out", compact)
    assert "is the input" in error_line("finetune", compact, *ft, "--out", tmp_path / "t.txt")
    (tmp_path / "not-a-model").rmdir()
    (tmp_path / "t.txt").unlink()
    assert snapshot(tmp_path) == before


def test_acts_checks_its_output_and_tokens_before_loading_the_model(tmp_path):
    (tmp_path / "empty-model").mkdir()
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("some text " * 50)
    base = ["acts", "--model", tmp_path / "empty-model", "--text", texts, "--layer", "0"]
    assert "'--tokens': 0 is not in the range" in error_line(*base, "--tokens", 0, "--out", tmp_path / "acts")
    (tmp_path / "full" / "x").mkdir(parents=True)
    assert "not empty" in error_line(*base, "--tokens", 10, "--out", tmp_path / "full")
    assert "holds the input" in error_line(*base, "--tokens", 10, "--out", texts, "--overwrite")
    # a valid request gets as far as the model, which cannot load from an empty folder
    assert "cannot load a causal LM" in error_line(*base, "--tokens", 10, "--out", tmp_path / "acts")
    assert (texts / "a.txt").read_text() == "some text " * 50


def test_no_output_inside_the_hugging_face_cache(tmp_path, monkeypatch, compact):
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    # refused before any download (no hub is reachable here)
    assert "Hugging Face cache" in error_line("convert", "hf://alice/dense", cache / "models--a--b" / "x.safetensors")
    assert "Hugging Face cache" in error_line("pull", "alice/sae", "--local-dir", cache / "mine")
    assert "Hugging Face cache" in error_line("export", compact, cache / "sae.onnx")
    assert not cache.exists()


# ------------------------------------------------------ 2. output locations are checked before heavy work

def test_train_checks_out_before_training(tmp_path, acts):
    res = CliRunner().invoke(cli, ["train", "--acts", str(acts), "--n", str(N), "--k", str(K), "--tokens", "20480",
                                   "--batch", "256", "--out", str(acts / "sae.safetensors")])
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.startswith(f"error: cannot write {acts / 'sae.safetensors'}: ") and "is a file" in res.stderr
    assert "tok/s" not in res.stderr  # no training step ran
    dense_out = tmp_path / "dense-out"
    dense_out.write_text("a file where --dense wants a folder")
    assert "is a file" in error_line("train", "--acts", acts, "--dense", "--n", N, "--out", dense_out)
    assert not list(tmp_path.glob("*.ckpt"))


# ---------------------------------------------------------------------- 4. one error line, no traceback

def test_bad_arguments_are_one_error_line(dense_io, tmp_path, acts, compact):
    for repo in ("not a repo", "a/b/c", "alice/-bad"):
        assert "is not a Hub repo id" in error_line("push", compact, repo)
    for lr in ("-1", "nan", "inf"):
        assert "--lr must be a positive number" in error_line("train", "--acts", acts, "--n", N, "--lr", lr,
                                                              "--out", tmp_path / "x.safetensors")
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, M), np.float32))
    assert "holds no activation rows" in error_line("train", "--acts", empty, "--n", N,
                                                    "--out", tmp_path / "x.safetensors")
    teacher = dense_io.write_saelens(tmp_path / "teacher", dense_io.weights(0, M, 2 * N), K)
    assert "has 64 latents but the teacher has 128" in error_line(
        "train", "--acts", acts, "--teacher", teacher, "--init", compact, "--tokens", 512, "--batch", 256,
        "--out", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------- 5. write errors name the output

def test_write_errors_name_the_output_never_a_temp_file(tmp_path, compact):
    folder = tmp_path / "taken"
    folder.mkdir()
    sae = ExpanderSAE(M, N, 4, K)
    with pytest.raises(SaeCompressError, match=f"^{re.escape(f'cannot write {folder}: is a directory')}$"):
        save_compact(sae, folder)  # the library call; the CLI checks this before any work
    assert list(folder.iterdir()) == []

    # a write that fails half-way (as on a full disk): the process may write at most 4 KiB per file
    out = tmp_path / "sae.onnx"
    proc = subprocess.run([*CLI, "export", str(compact), str(out)], capture_output=True, text=True,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"error: cannot write {out}: file too large", proc.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left behind


# ------------------------------------------------------------------ 6. a closed pipe ends quietly

def test_monitor_into_a_closed_pipe_exits_quietly(tmp_path, compact, read_until):
    rows = tmp_path / "rows.npy"
    np.save(rows, np.random.default_rng(1).normal(size=(20000, M)).astype(np.float32))
    # saecompress monitor ... | head -1
    proc = subprocess.Popen([*CLI, "monitor", str(compact), "--input", str(rows)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        first = read_until(proc.stdout, rb"\n")
        proc.stdout.close()
        err = proc.communicate(timeout=120)[1].decode()
    finally:
        proc.kill()
    assert proc.returncode == 141  # as a shell reports a Unix tool ended by SIGPIPE
    assert first.startswith(b"row 0: ")
    assert "error" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err


# --------------------------------------------------------------------- 7. valid JSON, never bare NaN

def test_zero_variance_activations_are_refused_not_nan(dense_io, tmp_path, compact):
    const = tmp_path / "const.npy"
    np.save(const, np.ones((500, M), np.float32))
    assert "zero variance" in error_line("eval", compact, "--acts", const, "--json")
    dense = dense_io.write_saelens(tmp_path / "dense", dense_io.weights(0, M, N), K)
    assert "zero variance" in error_line("convert", dense, tmp_path / "c.safetensors", "--acts", const, "--json")
    assert not (tmp_path / "c.safetensors").exists()


def test_undefined_metrics_are_null_with_a_reason(dense_io, tmp_path, acts):
    # a teacher none of whose latents ever fires: latent agreement with it is undefined (0/0)
    w = dense_io.weights(0, M, N)
    w["b_enc"] = w["b_enc"] - 1e4
    teacher = dense_io.write_saelens(tmp_path / "teacher", w, K)
    out = tmp_path / "student.safetensors"
    res = ok("train", "--acts", acts, "--teacher", teacher, "--d", 4, "--tokens", 1024, "--batch", 256,
             "--held-out", 300, "--out", out, "--json")
    held = strict_json(res.stdout.strip().splitlines()[-1])["held_out"]
    assert held["latent_agreement"] is None
    assert held["undefined"] == {"latent_agreement": "no teacher latent fires on these rows"}
    raw = out.read_bytes()
    assert b"NaN" not in raw and b"Infinity" not in raw
    user = read_compact_metadata(out)["user"]
    assert user["held_out"]["latent_agreement"] is None and "undefined" in user["held_out"]


# ------------------------------------------------------- 14. no path of this machine in files or the hub

def machine_paths(tmp_path: Path) -> list[str]:
    return [str(tmp_path), str(Path.home()), str(Path(constants.HF_HUB_CACHE).parent)]


def assert_no_machine_path(data: bytes | str, tmp_path: Path) -> None:
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    for path in machine_paths(tmp_path):
        assert path not in text, path


def test_local_conversion_records_the_file_name_not_the_path(dense_io, tmp_path, compact):
    dense = dense_io.write_saelens(tmp_path / "my-dense-sae", dense_io.weights(0, M, N), K)
    out = tmp_path / "out.safetensors"
    ok("convert", dense, out)
    assert_no_machine_path(out.read_bytes(), tmp_path)
    source = read_compact_metadata(out)["source"]
    assert source["file"] == "my-dense-sae" and source["library"] == "saelens" and "path" not in source
    onnx = tmp_path / "out.onnx"
    ok("export", dense, onnx)
    assert_no_machine_path(onnx.read_bytes(), tmp_path)
    dense_out = tmp_path / "dense-trained"
    ok("train", "--acts", write_acts(tmp_path), "--dense", "--n", N, "--k", K, "--tokens", 512, "--batch", 256,
       "--init", dense, "--out", dense_out)
    assert_no_machine_path((dense_out / "cfg.json").read_text(), tmp_path)


def write_acts(tmp_path: Path) -> Path:
    path = tmp_path / "train-acts.npy"
    np.save(path, np.random.default_rng(3).normal(size=(3000, M)).astype(np.float32))
    return path


def test_hub_conversion_and_push_hold_no_local_path(dense_io, hub, upload_folder, tmp_path):
    dense = dense_io.write_sparsify(tmp_path / "upload" / "layers.2", dense_io.weights(2, M, N), K)
    upload_folder(hub, "eleuther/sparsify-tiny", dense.parent)
    out = tmp_path / "l2.safetensors"
    ok("convert", "hf://eleuther/sparsify-tiny/layers.2", out)
    assert str(tmp_path / "hf-cache") == constants.HF_HUB_CACHE  # the download went into the test's cache
    assert_no_machine_path(out.read_bytes(), tmp_path)
    source = read_compact_metadata(out)["source"]
    assert source["repo_id"] == "eleuther/sparsify-tiny" and source["file"] == "layers.2"
    assert source["revision"] == hub.branch_head("eleuther/sparsify-tiny")

    # a file from an older saecompress that recorded the local path: push uploads a copy without it
    sae = ExpanderSAE(M, N, 4, K, seed=1)
    provenance = {"library": "saelens", "hookpoint": "layers.4", "path": str(tmp_path / "private" / "dense")}
    old = tmp_path / "old" / "layers.4.safetensors"
    meta = compact_metadata(sae, "float32") | {"source": json.dumps(provenance)}
    write_safetensors(old, compact_tensors(sae, "float32"), meta)
    for path in (out, old):
        ok("push", "alice/shared", path)
    for name in ("README.md", "layers.2/expander.safetensors", "layers.4/expander.safetensors"):
        pulled = hf_hub_download("alice/shared", name, endpoint=hub.url, cache_dir=tmp_path / "check")
        assert_no_machine_path(Path(pulled).read_bytes(), tmp_path)
    card = Path(hf_hub_download("alice/shared", "README.md", endpoint=hub.url, cache_dir=tmp_path / "check"))
    assert "`hf://eleuther/sparsify-tiny/layers.2@" in card.read_text() and "`dense`" in card.read_text()
