"""ExpanderSAE vs TopKSAE encode/decode in torch on CPU (median of repeats, side by side).

    python benchmarks/encode_decode.py            # m=2048, n=65536, d=7, k=64, batch 256
    python benchmarks/encode_decode.py --quick    # small, for CI
    python benchmarks/encode_decode.py --threads 2
"""

from __future__ import annotations

import argparse

import torch
from common import median_seconds, print_table

from saecompress import ExpanderSAE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (CI)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--m", type=int, default=2048)
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--d", type=int, default=7)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.quick:
        args.m, args.n, args.batch, args.repeats = 256, 4096, 64, 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    expander = ExpanderSAE(args.m, args.n, args.d, args.k, seed=0)
    dense = expander.to_dense()
    x = torch.randn(args.batch, args.m)
    rows = []
    with torch.inference_mode():
        top_values, top_indices = expander.encode(x)
        timings = {}
        for name, sae in (("dense TopKSAE", dense), ("ExpanderSAE", expander)):
            enc = median_seconds(lambda: sae.encode(x), args.repeats)
            dec = median_seconds(lambda: sae.decode(top_values, top_indices), args.repeats)
            timings[name] = (enc, dec)
        base_enc, base_dec = timings["dense TopKSAE"]
        for name, (enc, dec) in timings.items():
            rows.append((name, enc * 1e3, args.batch / enc, base_enc / enc,
                         dec * 1e3, args.batch / dec, base_dec / dec))
    print(f"m={args.m} n={args.n} d={args.d} k={args.k} batch={args.batch} threads={args.threads}")
    print_table(["model", "encode ms", "encode rows/s", "encode speed-up",
                 "decode ms", "decode rows/s", "decode speed-up"], rows)


if __name__ == "__main__":
    main()
