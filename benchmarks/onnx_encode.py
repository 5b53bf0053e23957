"""ONNX encode throughput: expander graph vs dense graphs vs torch, one thread.

Prints two Markdown tables:

1. rows/s of the ORT expander encode, the ORT dense encode of the equivalent dense SAE
   (``ExpanderSAE.to_dense()``, the project's own dense export), the plain dense graph a user would
   write (``MatMul`` + ``Add`` + ``TopK``, ``common.plain_dense_graph``), the ratios, and torch
   (``ExpanderSAE`` / ``TopKSAE``) at m=2048, n ∈ {16384, 65536}, d ∈ {7, 16, 64}, k=64,
   batch ∈ {1, 64, 512}, plus file sizes;
2. the encode formulations measured (see docs/ONNX.md) at the largest n and d=7, against both dense graphs;
3. a pursuit-encoded SAE's graph (``ExpanderPursuit``) against the one-shot expander graph, the plain dense
   graph and torch, at the SmolLM2 fidelity setting (m=576, n=4608, d=7, k=32).

Timings alternate between the engines round by round (so a busy machine slows all alike) and
report medians; the ratio is the median of per-round ratios. ``--quick`` runs tiny sizes in
seconds (CI); ``--threads`` sets onnxruntime's and torch's intra-op threads (default 1).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
import onnxruntime as ort
import torch
from common import plain_dense_graph, print_table

from saecompress.exporters.onnx import EncodeLayout, build_onnx
from saecompress.models import ExpanderSAE
from saecompress.timing import interleaved

FORMULATIONS = {
    "grouped chunk=256 G=16 + 1-row branch (default)": EncodeLayout(),
    "grouped chunk=128 G=16": EncodeLayout(chunk=128),
    "grouped chunk=1024 G=16": EncodeLayout(chunk=1024),
    "grouped chunk=256 G=32": EncodeLayout(group=32),
    "grouped chunk=256 G=16, no 1-row branch": EncodeLayout(single_row_branch=False),
    "chunked chunk=256, TopK over all n (G=1)": EncodeLayout(group=1, single_row_branch=False),
}


def session(model, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def plain(dense):
    """The plain MatMul+Add+TopK graph of a dense ``TopKSAE``."""
    return plain_dense_graph(dense.W_enc.detach().numpy(), dense.b_enc.detach().numpy(),
                             dense.b_dec.detach().numpy(), dense.k)


def main_table(sizes, batches, k, threads, rounds, budget, m) -> None:
    rows = []
    for n in sizes["n"]:
        for d in sizes["d"]:
            torch.manual_seed(0)
            sae = ExpanderSAE(m, n, d, k, activation="topk_relu")
            with torch.no_grad():
                sae.b_enc.normal_(0, 0.1)
            dense = sae.to_dense()
            expander_model, dense_model = build_onnx(sae), build_onnx(dense)
            exp_bytes, dense_bytes = expander_model.ByteSize(), dense_model.ByteSize()
            exp_sess, dense_sess = session(expander_model, threads), session(dense_model, threads)
            plain_sess = session(plain(dense), threads)
            for batch in batches:
                x = np.random.default_rng(1).standard_normal((batch, m)).astype(np.float32)
                xt = torch.from_numpy(x)
                feeds = {"activations": x}
                with torch.inference_mode():
                    t = interleaved({
                        "ort_exp": lambda: exp_sess.run(None, feeds),
                        "ort_dense": lambda: dense_sess.run(None, feeds),
                        "ort_plain": lambda: plain_sess.run(None, feeds),
                        "torch_exp": lambda: sae.encode(xt),
                        "torch_dense": lambda: dense.encode(xt),
                    }, rounds, budget)
                med = {name: statistics.median(v) for name, v in t.items()}
                ratio = statistics.median(a / b for a, b in zip(t["ort_dense"], t["ort_exp"]))
                plain_ratio = statistics.median(a / b for a, b in zip(t["ort_plain"], t["ort_exp"]))
                rows.append([n, d, batch, batch / med["ort_exp"], batch / med["ort_dense"], f"{ratio:.1f}x",
                             batch / med["ort_plain"], f"{plain_ratio:.1f}x",
                             batch / med["torch_exp"], batch / med["torch_dense"],
                             f"{exp_bytes / 2**20:.1f}", f"{dense_bytes / 2**20:.0f}"])
                print(f"  n={n} d={d} batch={batch}: {ratio:.1f}x", file=sys.stderr, flush=True)
    print(f"\nEncode rows/s, m={m}, k={k}, {threads} thread(s), onnxruntime {ort.__version__} CPU\n")
    print_table(["n", "d", "batch", "ORT expander", "ORT dense export", "speedup", "ORT plain dense",
                 "speedup vs plain", "torch expander", "torch dense", "expander MiB", "dense MiB"], rows)


def formulation_table(n, d, batches, k, threads, rounds, budget, m) -> None:
    torch.manual_seed(0)
    sae = ExpanderSAE(m, n, d, k, activation="topk_relu")
    dense = sae.to_dense()
    dense_sess, plain_sess = session(build_onnx(dense), threads), session(plain(dense), threads)
    sessions = {name: session(build_onnx(sae, layout=layout), threads)
                for name, layout in FORMULATIONS.items()}
    rows = []
    for batch in batches:
        x = np.random.default_rng(1).standard_normal((batch, m)).astype(np.float32)
        feeds = {"activations": x}
        engines = {"dense export": lambda: dense_sess.run(None, feeds),
                   "plain dense (MatMul+Add+TopK)": lambda: plain_sess.run(None, feeds)}
        for name, sess in sessions.items():
            engines[name] = lambda sess=sess: sess.run(None, feeds)
        t = interleaved(engines, rounds, budget)
        for name, samples in t.items():
            ratio = statistics.median(a / b for a, b in zip(t["dense export"], samples))
            plain_ratio = statistics.median(a / b for a, b in zip(t["plain dense (MatMul+Add+TopK)"], samples))
            rows.append([batch, name, batch / statistics.median(samples), f"{ratio:.1f}x", f"{plain_ratio:.1f}x"])
    print(f"\nFormulations of ExpanderEncode, m={m}, n={n}, d={d}, k={k}, {threads} thread(s)\n")
    print_table(["batch", "formulation", "rows/s", "vs dense export", "vs plain dense"], rows)


def pursuit_table(m, n, d, k, batches, threads, rounds, budget) -> None:
    """A pursuit-encoded SAE (``ExpanderPursuit``: k unrolled rounds) against the one-shot expander graph,
    the plain dense graph and torch's ``pursue``, on the same decoder."""
    torch.manual_seed(0)
    sae = ExpanderSAE(m, n, d, k, activation="topk_relu", encoder="untied")
    pursuit = sae.with_pursuit("abs_topk")
    dense = sae.to_dense()
    sessions = {"ORT pursuit": session(build_onnx(pursuit), threads), "ORT expander": session(build_onnx(sae), threads),
                "ORT plain dense": session(plain(dense), threads)}
    rows = []
    for batch in batches:
        x = np.random.default_rng(1).standard_normal((batch, m)).astype(np.float32)
        xt, feeds = torch.from_numpy(x), {"activations": x}
        engines = {name: lambda sess=sess: sess.run(None, feeds) for name, sess in sessions.items()}
        engines["torch pursuit"] = lambda: pursuit.encode(xt)
        with torch.inference_mode():
            t = interleaved(engines, rounds, budget)
        for name, samples in t.items():
            ratio = statistics.median(a / b for a, b in zip(t["ORT plain dense"], samples))
            rows.append([batch, name, batch / statistics.median(samples), f"{ratio:.2f}x"])
    print(f"\nPursuit encode (k={k} rounds), m={m}, n={n}, d={d}, {threads} thread(s)\n")
    print_table(["batch", "engine", "rows/s", "vs plain dense"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (CI)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per cell (default 5)")
    parser.add_argument("--skip-formulations", action="store_true", help="only the main table")
    parser.add_argument("--skip-main", action="store_true", help="skip the main table")
    parser.add_argument("--skip-pursuit", action="store_true", help="skip the pursuit table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        m, sizes, batches, k, rounds, budget = 256, {"n": [2048], "d": [7]}, [1, 64], 16, 3, 0.02
    else:
        m, sizes, batches, k = 2048, {"n": [16384, 65536], "d": [7, 16, 64]}, [1, 64, 512], 64
        rounds, budget = args.rounds, 0.3
    if not args.skip_main:
        main_table(sizes, batches, k, args.threads, rounds, budget, m)
    if not args.skip_formulations:
        formulation_table(sizes["n"][-1], 7, batches, k, args.threads, rounds, budget, m)
    if not args.skip_pursuit:  # the SmolLM2 fidelity setting (docs/FIDELITY.md)
        pursuit = (256, 1024, 7, 8, [1, 64]) if args.quick else (576, 4608, 7, 32, [1, 64, 256])
        pursuit_table(*pursuit, args.threads, rounds, budget)


if __name__ == "__main__":
    main()
