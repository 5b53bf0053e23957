"""ExpanderSAE (one-shot encoder and matching pursuit) vs TopKSAE encode/decode in torch on CPU.

Rounds alternate between the models (``saecompress.timing.interleaved``); the table quotes the median
sample and the median of per-round ratios to the dense SAE.

    python benchmarks/encode_decode.py                             # m=2048, n=65536, d=7, k=64, batch 256
    python benchmarks/encode_decode.py --m 576 --n 4608 --k 32     # the SmolLM2 fidelity setting
    python benchmarks/encode_decode.py --quick                     # small, for CI
    python benchmarks/encode_decode.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import print_table

from saecompress import ExpanderSAE
from saecompress.timing import interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds (CI)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--m", type=int, default=2048)
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--d", type=int, default=7)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--budget", type=float, default=0.2, help="seconds of calls per sample (default 0.2)")
    args = parser.parse_args()
    if args.quick:
        args.m, args.n, args.batch, args.rounds, args.budget = 256, 4096, 64, 3, 0.01
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    expander = ExpanderSAE(args.m, args.n, args.d, args.k, seed=0, encoder="untied", activation="topk_relu")
    models = {"dense TopKSAE": expander.to_dense(), "ExpanderSAE": expander,
              "ExpanderSAE, pursuit (k rounds)": expander.with_pursuit("abs_topk")}
    x = torch.randn(args.batch, args.m)
    with torch.inference_mode():
        top_values, top_indices = expander.encode(x)
        engines = {}
        for name, sae in models.items():
            engines[(name, "encode")] = lambda sae=sae: sae.encode(x)
            engines[(name, "decode")] = lambda sae=sae: sae.decode(top_values, top_indices)
        times = interleaved(engines, args.rounds, args.budget)
    base = "dense TopKSAE"
    rows = []
    for name in models:
        row: list[object] = [name]
        for op in ("encode", "decode"):
            ratio = statistics.median(b / t for b, t in zip(times[(base, op)], times[(name, op)]))
            seconds = statistics.median(times[(name, op)])
            row += [seconds * 1e3, args.batch / seconds, ratio]
        rows.append(row)
    print(f"m={args.m} n={args.n} d={args.d} k={args.k} batch={args.batch} threads={args.threads} "
          f"rounds={args.rounds} (alternated)")
    print_table(["model", "encode ms", "encode rows/s", "encode speed-up vs dense",
                 "decode ms", "decode rows/s", "decode speed-up vs dense"], rows)


if __name__ == "__main__":
    main()
