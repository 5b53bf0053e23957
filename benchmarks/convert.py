"""Time ``convert`` (expander / topd / search / untied) on a random dense TopK SAE.

    python benchmarks/convert.py            # n=65536, m=2048, d=7 (targets: < 30 s expander/topd, < 60 s search)
    python benchmarks/convert.py --quick    # n=4096, m=512: CI-size smoke run

Prints one row per strategy: median seconds over ``--repeats`` runs, kept decoder energy, compact
file size and the storage ratio against the dense float32 SAE (``2mn + m + n`` values).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import median_seconds, print_table

from saecompress.compact import dense_values, save_compact
from saecompress.convert import convert, kept_energy
from saecompress.models import TopKSAE


def random_dense(m: int, n: int, k: int, seed: int = 0) -> TopKSAE:
    """A dense TopK SAE with unit-norm random decoder rows and encoder = decoderᵀ + noise."""
    torch.manual_seed(seed)
    sae = TopKSAE(m, n, k)
    with torch.no_grad():
        sae.W_enc.add_(0.01 * torch.randn(m, n))
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    return sae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (n=4096, m=512)")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--m", type=int, default=None)
    parser.add_argument("--d", type=int, default=7)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--search-seeds", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    m = args.m or (512 if args.quick else 2048)
    n = args.n or (4096 if args.quick else 65536)
    torch.set_num_threads(args.threads)
    dense = random_dense(m, n, args.k)
    dense_bytes = 4 * dense_values(m, n)
    print(f"convert: m={m} n={n} d={args.d} k={args.k}, {args.threads} threads, median of {args.repeats}; "
          f"dense float32 = {dense_bytes / 2**20:.1f} MiB")
    cases = [("expander", {"mask": "expander", "encoder": "tied"}), ("topd", {"mask": "topd", "encoder": "tied"}),
             (f"search N={args.search_seeds}", {"mask": "search", "search_seeds": args.search_seeds, "encoder": "tied"}),
             ("topd untied (default)", {"mask": "topd", "encoder": "untied"})]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs in cases:
            seconds = median_seconds(lambda: convert(dense, args.d, **kwargs), args.repeats, warmup=0)
            sae = convert(dense, args.d, **kwargs)
            size = save_compact(sae, Path(tmp) / "out.safetensors").stat().st_size
            rows.append((name, seconds, kept_energy(dense, sae.indices), size / 2**20,
                         f"{dense_bytes / size:.0f}x"))
    print_table(["strategy", "seconds", "kept energy", "file MiB", "ratio"], rows)

if __name__ == "__main__":
    main()
