"""Data-parallel training on torch.distributed (gloo, real processes): the README's launch lines as written,
the result equal to one process on the same global batch, a killed rank, and what is refused."""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from saecompress.compact import load_compact
from saecompress.distributed import Group
from saecompress.errors import SaeCompressError
from saecompress.launch import run_ranks
from saecompress.models import ExpanderSAE
from saecompress.train import TrainConfig, train
from saecompress.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
M = 16


def planted(path: Path, rows: int = 8192, seed: int = 0) -> Path:
    """Sparse codes over 200 random directions plus noise and an offset: something to learn."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((200, M))
    codes = rng.standard_normal((rows, 200)) * (rng.random((rows, 200)) < 0.05)
    x = codes @ basis + 0.1 * rng.standard_normal((rows, M)) + 3.0
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, x.astype(np.float32))
    return path


def model(path: Path) -> ExpanderSAE:
    loaded = load_compact(path)
    return loaded[0] if isinstance(loaded, tuple) else loaded


def assert_same_model(a: ExpanderSAE, b: ExpanderSAE) -> None:
    for name, x in a.state_dict().items():
        y = b.state_dict()[name]
        scale = float(x.abs().max()) or 1.0
        assert float((x.double() - y.double()).abs().max()) <= 1e-4 * scale, name


def readme_line(start: str, holding: str) -> list[str]:
    """The README's command line that starts with ``start`` and holds ``holding``, split as a shell would."""
    lines = [line for line in (ROOT / "README.md").read_text().splitlines()
             if line.startswith(start) and holding in line]
    assert len(lines) == 1, f"README should show one line starting with {start!r}"
    return shlex.split(lines[0])


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_two_ranks_train_what_one_process_trains(tmp_path):
    acts = planted(tmp_path / "acts.npy")
    cfg = TrainConfig(d=4, n=256, k=8, tokens=256 * 40, batch_size=256, held_out_rows=1024, checkpoint_every=10,
                      reaim_every=2)
    one, metrics_one = train(acts, tmp_path / "one.safetensors", cfg, progress=False)
    two, metrics_two = run_ranks(2, train, acts, tmp_path / "two.safetensors", cfg, progress=False, threads=1)[0]
    assert metrics_one["training"]["train_dead_fraction"] > 0  # re-aiming had work to do (and was gathered)
    assert_same_model(one, two)
    assert_same_model(one, model(tmp_path / "two.safetensors"))
    assert metrics_two["held_out"]["fvu"] == pytest.approx(metrics_one["held_out"]["fvu"], rel=1e-4)
    assert metrics_two["training"]["train_dead_fraction"] == metrics_one["training"]["train_dead_fraction"]


def test_readme_launch_lines_as_written(tmp_path):
    """``saecompress train --nproc 2`` and the torchrun line (its ``--`` keeps torchrun's parser off ``--d``)."""
    planted(tmp_path / "acts" / "acts.npy")
    short = ["--tokens", "8192", "--held-out", "1024"]  # appended: the last value of an option wins
    cfg = TrainConfig(d=7, k=32, expansion=8, tokens=8192, held_out_rows=1024)
    reference, _ = train(tmp_path / "acts", tmp_path / "one.safetensors", cfg, progress=False)
    for start, holding in (("saecompress train", "--nproc 2"), ("torchrun --standalone", "-m saecompress -- train")):
        argv = readme_line(start, holding)
        if argv[0] == "torchrun":
            argv[0] = str(Path(sys.executable).with_name("torchrun"))
        (tmp_path / "native.safetensors").unlink(missing_ok=True)
        done = subprocess.run(argv + short, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "wrote native.safetensors" in done.stdout
        assert done.stdout.count("wrote ") == 1  # rank 0 alone reports
        assert_same_model(reference, model(tmp_path / "native.safetensors"))


def spawned_ranks(parent: int) -> list[int]:
    """The pids of the processes ``parent`` spawned for its ranks."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return sorted(pids)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank processes in /proc")
def test_a_killed_rank_stops_the_run_and_the_checkpoint_resumes(tmp_path):
    acts = planted(tmp_path / "acts.npy")
    out = tmp_path / "sae.safetensors"
    ckpt = tmp_path / "sae.safetensors.ckpt"
    argv = [sys.executable, "-m", "saecompress", "train", "--acts", str(acts), "--d", "4", "--n", "256", "--k", "8",
            "--batch-size", "256", "--tokens", str(256 * 600), "--held-out", "1024", "--checkpoint-every", "5",
            "--nproc", "2", "--out", str(out)]
    proc = subprocess.Popen(argv, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    ranks = spawned_ranks(proc.pid)
    assert ckpt.exists() and len(ranks) == 2, proc.communicate()[1][-2000:]
    os.kill(ranks[-1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "killed by SIGKILL" in errors[0] and str(ckpt) in errors[0], err[-2000:]
    assert "--resume" in errors[0] and "Traceback" not in err
    assert not out.exists()
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < step < 600
    done = subprocess.run(argv + ["--resume"], env=env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.load(ckpt, weights_only=True)["step"] == 600 and out.exists()


def test_what_data_parallel_training_refuses(tmp_path):
    acts = planted(tmp_path / "acts.npy", rows=2048)
    cfg = TrainConfig(d=4, n=64, k=8, tokens=1000, batch_size=255)
    with pytest.raises(SaeCompressError, match="multiple of 2"):
        train(acts, tmp_path / "a.safetensors", cfg, progress=False, group=Group(0, 2))
    jumprelu = ExpanderSAE(M, 64, 4, 32, activation="jumprelu")
    with pytest.raises(SaeCompressError, match="one process"):
        Trainer(jumprelu, TrainConfig(d=4), 10, target_l0=8, group=Group(0, 2))
