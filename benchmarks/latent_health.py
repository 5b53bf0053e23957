"""Dead, rare and bias-driven latents of SAEs on held-out activations, one table per activation set (not in CI).

A latent is **dead** on a set of rows when it never fires there, **rare** when it fires on fewer than 5
of them, and **bias-driven** when its encoder bias moves its pre-activation more than the input does:
``|b_enc_i| > 3·std_rows(w_i·(x − b_dec))`` — the input can never switch it on or off by itself, only
the competition for the k places does (the failure mode of native expanders whose revived latents end
with a vanishing encoder and a large bias). ``> 1·std`` is shown too, as the looser count.

    python benchmarks/latent_health.py SAE [SAE ...] --acts held-out-acts/ [--acts other-domain-acts/]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from saecompress.activations import ActivationSource, open_activations
from saecompress.models import SparseAutoencoder
from saecompress.sources import load_source

from common import print_table

RARE = 5


@torch.no_grad()
def latent_health(sae: SparseAutoencoder, source: ActivationSource, rows: int = 65536,
                  batch: int = 2048) -> dict[str, float]:
    """``dead, rare, bias_driven (3σ), bias_driven_1sd, median_rate`` of ``sae`` on the first ``rows`` rows."""
    n = sae.n
    counts = torch.zeros(n, dtype=torch.float64)
    total = torch.zeros(n, dtype=torch.float64)
    squares = torch.zeros(n, dtype=torch.float64)
    count = min(rows, source.num_rows)
    for start in range(0, count, batch):
        x = source.read(start, min(start + batch, count)).to(sae.b_dec.dtype)
        values, indices = sae.encode(x)
        fired = indices[values != 0]
        counts.index_add_(0, fired, torch.ones(fired.numel(), dtype=torch.float64))
        term = sae.pre_activations(x).double() - sae.b_enc.double()  # the input's part: w_i·(x − b_dec)
        total += term.sum(0)
        squares += term.pow(2).sum(0)
    std = (squares / count - (total / count) ** 2).clamp_min(0).sqrt()
    bias = sae.b_enc.double().abs()
    return {"rows": count, "dead": float((counts == 0).double().mean()), "rare": float((counts < RARE).double().mean()),
            "bias_driven": float((bias > 3 * std).double().mean()),
            "bias_driven_1sd": float((bias > std).double().mean()),
            "median_rate": float((counts / count).median())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("saes", nargs="+", help="SAE sources (compact files, dense folders)")
    p.add_argument("--acts", action="append", required=True, help="held-out activations (repeatable)")
    p.add_argument("--rows", type=int, default=65536)
    a = p.parse_args()
    for acts in a.acts:
        source = open_activations(acts)
        rows = []
        for path in a.saes:
            sae = load_source(path).model.float().eval()
            h = latent_health(sae, source, a.rows)
            rows.append([Path(path).name, f"{h['dead']:.2%}", f"{h['rare']:.2%}", f"{h['bias_driven']:.2%}",
                         f"{h['bias_driven_1sd']:.2%}", f"{h['median_rate']:.4f}"])
        print(f"\n{acts}: {min(a.rows, source.num_rows):,} rows")
        print_table(["SAE", "dead", f"rare (<{RARE})", "bias-driven (3σ)", "bias > 1σ", "median rate"], rows)


if __name__ == "__main__":
    main()
