"""Expander-mask generation speed (target: >= 10M entries/s on one core).

    python benchmarks/mask_generation.py            # m=2048, n up to 1M, d in {7, 32}
    python benchmarks/mask_generation.py --quick    # seconds, for CI
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import median_seconds, print_table  # noqa: E402

from saecompress.mask import expander_mask  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (CI)")
    args = parser.parse_args()
    cases = [(2048, 16384, 7)] if args.quick else [
        (2048, 65536, 7), (2048, 1 << 20, 7), (2048, 65536, 32), (4096, 1 << 20, 7)]
    repeats = 1 if args.quick else 5
    rows = []
    for m, n, d in cases:
        seconds = median_seconds(lambda: expander_mask(m, n, d, seed=0), repeats=repeats)
        rows.append((m, n, d, n * d, seconds * 1e3, n * d / seconds / 1e6))
    print_table(["m", "n", "d", "entries", "median ms", "M entries/s"], rows)


if __name__ == "__main__":
    main()
