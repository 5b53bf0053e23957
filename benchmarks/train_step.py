"""Training-step throughput and peak memory: truly sparse step vs masked-dense (paper-style) step.

Both variants train the same tied expander SAE (signed top-k, FVU loss, Adam) on random data:

* sparse: ``saecompress.trainer.Trainer.train_step`` (CSR gather-reduce encoder, top-k, sparse
  decode; gradients only on the mask at the k active latents; unit-norm rows; AuxK is enabled
  but no latent is dead yet during the timed steps, so its extra top-k does not run).
* masked-dense: the paper's computation, ``W = colnorm(M ⊙ V)`` with dense ``M, V [m, n]``, dense
  matmuls for encode and decode, autograd and Adam over the dense ``V``.

Each variant runs in its own subprocess (so peak memory is its own); memory is that
subprocess's peak resident set size (``resource.getrusage(...).ru_maxrss``), reported as the
total and as the growth over the RSS measured after set-up (model, optimizer and batch
allocated, before the first step). Throughput is tokens/s from the median step time.

    python benchmarks/train_step.py            # m=2048 n=16384 d=7 k=64 batch 1024
    python benchmarks/train_step.py --quick    # CI-size
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from common import print_table


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sparse_step(m, n, d, k, batch):
    from saecompress.models import ExpanderSAE
    from saecompress.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    sae = ExpanderSAE(m, n, d, k, seed=0)
    trainer = Trainer(sae, TrainConfig(k=k, d=d, n=n, batch_size=batch, tokens=batch * 1000), 1000)
    return lambda x: trainer.train_step(x)


def _masked_dense_step(m, n, d, k, batch):
    from saecompress.mask import expander_mask

    torch.manual_seed(0)
    idx = torch.from_numpy(expander_mask(m, n, d, 0))
    mask = torch.zeros(m, n).scatter_(0, idx.T.contiguous(), 1.0)
    V = torch.nn.Parameter(torch.randn(m, n) * mask)
    b_enc = torch.nn.Parameter(torch.zeros(n))
    b_dec = torch.nn.Parameter(torch.zeros(m))
    opt = torch.optim.Adam([V, b_enc, b_dec], lr=2e-4)

    def step(x):
        W = mask * V
        W = W / W.norm(dim=0, keepdim=True).clamp_min(1e-12)
        pre = (x - b_dec) @ W + b_enc
        vals, top = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(1, top, vals)
        recon = z @ W.T + b_dec
        loss = (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([V, b_enc, b_dec], 1.0)
        opt.step()
    return step


def run_variant(variant: str, m: int, n: int, d: int, k: int, batch: int, steps: int, warmup: int) -> dict:
    make = _sparse_step if variant == "sparse" else _masked_dense_step
    step = make(m, n, d, k, batch)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(batch, m, generator=gen) for _ in range(2)]
    rss0 = _rss_mb()
    for i in range(warmup):
        step(batches[i % 2])
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(batches[i % 2])
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"variant": variant, "step_s": med, "tokens_per_s": batch / med, "peak_rss_mb": _peak_mb(),
            "step_peak_growth_mb": _peak_mb() - rss0, "steps": steps, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-size: m=256 n=2048 d=7 k=16 batch 256")
    p.add_argument("--m", type=int, default=2048)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--d", type=int, default=7)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 5, dense 3)")
    p.add_argument("--rounds", type=int, default=1, help="alternate sparse/dense subprocesses this many times")
    p.add_argument("--variant", choices=["sparse", "dense"], help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.m, a.n, a.d, a.k, a.batch = 256, 2048, 7, 16, 256
    if a.variant:
        steps = a.steps or (5 if a.variant == "sparse" else 3)
        print(json.dumps(run_variant(a.variant, a.m, a.n, a.d, a.k, a.batch, steps, warmup=2 if a.variant == "sparse" else 1)))
        return
    results: dict[str, list[dict]] = {"sparse": [], "dense": []}
    for _ in range(a.rounds):
        for variant in ("sparse", "dense"):
            cmd = [sys.executable, __file__, "--variant", variant, "--m", str(a.m), "--n", str(a.n),
                   "--d", str(a.d), "--k", str(a.k), "--batch", str(a.batch)]
            if a.steps:
                cmd += ["--steps", str(a.steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[variant].append(json.loads(out.strip().splitlines()[-1]))
    summary = {v: {key: statistics.median(r[key] for r in rs) for key in
                   ("step_s", "tokens_per_s", "peak_rss_mb", "step_peak_growth_mb")} for v, rs in results.items()}
    summary["speedup"] = summary["dense"]["step_s"] / summary["sparse"]["step_s"]
    summary["config"] = {"m": a.m, "n": a.n, "d": a.d, "k": a.k, "batch": a.batch, "rounds": a.rounds,
                         "threads": results["sparse"][0]["threads"]}
    if a.json:
        print(json.dumps(summary))
        return
    c = summary["config"]
    print(f"train step, m={c['m']} n={c['n']} d={c['d']} k={c['k']} batch={c['batch']}, "
          f"{c['threads']} threads, median of {a.rounds} round(s)")
    print_table(["variant", "step s", "tokens/s", "peak RSS MB", "step growth MB"],
                [(name, summary[v]["step_s"], summary[v]["tokens_per_s"], summary[v]["peak_rss_mb"],
                  summary[v]["step_peak_growth_mb"]) for v, name in (("sparse", "sparse"), ("dense", "masked-dense"))])
    print(f"speedup: {summary['speedup']:.1f}x")


if __name__ == "__main__":
    main()
