"""Fidelity of expander SAEs vs their dense TopK baseline on real activations (not in CI).

SmolLM2-135M-Instruct, residual stream after block 15 (activations from ``saecompress acts``).
Trains a dense TopK SAE (n=4608, k=32), then for each d:

- ``native``: an expander SAE trained from scratch on the seeded expander mask;
- ``convert``: the dense SAE converted (``--mask``, default topd) without training;
- ``retrain``: the converted SAE trained further on reconstruction (``train --init``);
- ``distill``: the converted SAE trained with the dense SAE as teacher (latent-matching term);
- ``… +ft`` (for ``--finetune-ds``): the native and retrained SAEs KL-fine-tuned through the LM
  (``finetune.py``) on ``--train-text-list`` text.

Prints held-out FVU, dead fraction, latent agreement with the dense SAE, file bytes and CE-loss
recovered (zero ablation; SAE spliced into the LM on held-out text), also as a fraction of the
dense SAE's. Held-out metrics use ``--eval-acts`` (activations harvested from the held-out text)
when given, else the last ``--held-out`` rows of ``--acts``. Token budgets are flags; the table
names them.

    python benchmarks/fidelity.py --acts data/smollm2-l15 --eval-acts data/smollm2-l15-eval \\
        --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --text-list data/eval_files.txt --train-text-list data/train_files.txt \\
        [--dense-from data/dense-n4608-k32-1m]    # reuse a dense SAE trained by an earlier run
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch

from saecompress.activations import open_activations
from saecompress.texts import read_texts
from saecompress.compact import save_compact
from saecompress.convert import convert
from saecompress.distill import latent_agreement
from saecompress.metrics import evaluate
from saecompress.train import TrainConfig, train


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size


def _texts(list_file: str, shuffle_seed: int | None = None):
    files = [Path(line.strip()) for line in Path(list_file).read_text().splitlines() if line.strip()]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(files)
    return read_texts(files)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--acts", required=True, help="training activations (a folder from `saecompress acts`)")
    p.add_argument("--eval-acts", default=None, help="held-out activations (from held-out text) for the metrics")
    p.add_argument("--model", default=None, help="LM (GGUF file or folder) for CE-loss recovered; omit to skip CE")
    p.add_argument("--text-list", default=None, help="file listing held-out text files for CE (one path a line)")
    p.add_argument("--train-text-list", default=None, help="file listing training text files for --finetune-ds")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--n", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--ds", default="7,16,32")
    p.add_argument("--mask", default="topd", choices=["expander", "topd", "search"], help="convert/distill mask")
    p.add_argument("--dense-tokens", type=int, default=1_000_000)
    p.add_argument("--native-tokens", type=int, default=1_000_000)
    p.add_argument("--retrain-tokens", type=int, default=3_000_000)
    p.add_argument("--distill-tokens", type=int, default=500_000)
    p.add_argument("--finetune-ds", default="7", help="d values whose native and retrained SAEs get a KL fine-tune")
    p.add_argument("--finetune-tokens", type=int, default=307_200)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--held-out", type=int, default=8192)
    p.add_argument("--ce-tokens", type=int, default=16_384)
    p.add_argument("--out", default="fidelity-run", help="folder for the trained SAEs")
    p.add_argument("--skip-native", action="store_true")
    p.add_argument("--encoder", choices=["tied", "untied"], default="untied", help="expander encoder")
    p.add_argument("--lr", type=float, default=None,
                   help="expander learning rate, native and distill [default: the trainer's, 3e-3/sqrt(n/16384)]")
    p.add_argument("--dense-from", default=None, help="reuse this dense SAE (SAELens folder) instead of training one")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    source = open_activations(a.acts)
    held = open_activations(a.eval_acts) if a.eval_acts else source.split(min(a.held_out, source.num_rows // 10))[1]
    print(f"activations: {source.num_rows} rows, m={source.m}; held out {held.num_rows}", flush=True)

    rows: dict[str, dict] = {}
    saes: dict[str, torch.nn.Module] = {}

    def record(name: str, sae, path: Path, tokens: int, seconds: float, teacher=None) -> None:
        sae.eval()
        m = evaluate(sae, held)
        row = {"tokens": tokens, "train_s": round(seconds, 1), "fvu": m["fvu"], "dead": m["dead_fraction"],
               "l0": m["l0"], "bytes": _bytes(path)}
        if teacher is not None:
            row["agreement"] = latent_agreement(teacher, sae, held)["agreement"]
        rows[name], saes[name] = row, sae
        print(name, json.dumps(row), flush=True)

    lm = None
    if a.model:
        from saecompress.lm import load_model
        lm = load_model(a.model)

    def finetuned(name: str, sae, teacher=None) -> None:
        from saecompress.finetune import FinetuneConfig, finetune
        t0 = time.time()
        path = out / f"{name.replace(' ', '-').replace('=', '')}-ft.safetensors"
        tuned, _ = finetune(sae, *lm, _texts(a.train_text_list, shuffle_seed=1), a.layer,
                            cfg=FinetuneConfig(tokens=a.finetune_tokens), out=path)
        record(f"{name} +ft", tuned, path, a.finetune_tokens, time.time() - t0, teacher)

    t0 = time.time()
    if a.dense_from:
        from saecompress.sources import load
        dense = load(a.dense_from)
        record("dense", dense, Path(a.dense_from), a.dense_tokens, 0.0)
    else:
        dense_cfg = TrainConfig(d=None, n=a.n, k=a.k, tokens=a.dense_tokens, batch_size=a.batch,
                                held_out_rows=a.held_out)
        dense, _ = train(source, out / "dense", dense_cfg)
        record("dense", dense, out / "dense", a.dense_tokens, time.time() - t0)
    dense.requires_grad_(False)
    tune = {int(v) for v in a.finetune_ds.split(",") if v} if lm and a.train_text_list else set()

    for d in [int(v) for v in a.ds.split(",")]:
        if not a.skip_native:
            t0 = time.time()
            cfg = TrainConfig(d=d, n=a.n, k=a.k, tokens=a.native_tokens, batch_size=a.batch,
                              held_out_rows=a.held_out, encoder=a.encoder, lr=a.lr)
            sae, _ = train(source, out / f"native-d{d}.safetensors", cfg)
            record(f"native d={d}", sae, out / f"native-d{d}.safetensors", a.native_tokens, time.time() - t0)
            if d in tune:
                finetuned(f"native d={d}", copy.deepcopy(sae))
        conv = convert(dense, d, mask=a.mask, encoder=a.encoder)
        save_compact(conv, out / f"convert-d{d}.safetensors")
        record(f"convert d={d}", conv, out / f"convert-d{d}.safetensors", 0, 0.0, teacher=dense)
        t0 = time.time()
        cfg = TrainConfig(d=d, tokens=a.retrain_tokens, batch_size=a.batch, held_out_rows=a.held_out,
                          encoder=a.encoder, lr=a.lr)
        sae, _ = train(source, out / f"retrain-d{d}.safetensors", cfg, init=str(out / f"convert-d{d}.safetensors"))
        record(f"retrain d={d}", sae, out / f"retrain-d{d}.safetensors", a.retrain_tokens, time.time() - t0,
               teacher=dense)
        if d in tune:
            finetuned(f"retrain d={d}", copy.deepcopy(sae), teacher=dense)
        t0 = time.time()
        cfg = TrainConfig(d=d, tokens=a.distill_tokens, batch_size=a.batch, held_out_rows=a.held_out,
                          encoder=a.encoder, lr=a.lr, mask=a.mask)
        sae, _ = train(source, out / f"distill-d{d}.safetensors", cfg, teacher=dense)
        record(f"distill d={d}", sae, out / f"distill-d{d}.safetensors", a.distill_tokens, time.time() - t0,
               teacher=dense)

    if lm is not None:
        from saecompress.lm import ce_eval_many
        with torch.no_grad():
            ce = ce_eval_many(*lm, _texts(a.text_list), saes, a.layer, tokens=a.ce_tokens)
        for name, r in ce.items():
            rows[name].update(ce_recovered=r["ce_recovered"], ce_spliced=r["ce_spliced"],
                              ce_clean=r["ce_clean"], ce_zero=r["ce_zero"], ce_tokens=r["ce_tokens"])
        for row in rows.values():
            row["ce_vs_dense"] = row["ce_recovered"] / rows["dense"]["ce_recovered"]

    (out / "fidelity.json").write_text(json.dumps(rows, indent=2))
    lr = a.lr if a.lr is not None else TrainConfig().learning_rate(a.n)
    print(f"\nSmolLM2-135M L{a.layer} resid, n={a.n} k={a.k}, expander encoder {a.encoder}, lr {lr:.2g}, "
          f"convert/distill mask {a.mask}; {held.num_rows} held-out rows; "
          f"{source.num_rows} activation rows (epochs repeat)")
    head = f"{'model':<18}{'tokens':>9}{'FVU':>8}{'dead':>8}{'agree':>8}{'bytes':>11}{'CE rec':>8}{'vs dense':>9}"
    print(head)
    for name, r in rows.items():
        agree = f"{r['agreement']:.1%}" if "agreement" in r else "-"
        ce = f"{r['ce_recovered']:.3f}" if "ce_recovered" in r else "-"
        rel = f"{r['ce_vs_dense']:.1%}" if "ce_vs_dense" in r else "-"
        print(f"{name:<18}{r['tokens']:>9}{r['fvu']:>8.4f}{r['dead']:>8.2%}{agree:>8}{r['bytes']:>11,}{ce:>8}{rel:>9}")


if __name__ == "__main__":
    main()
