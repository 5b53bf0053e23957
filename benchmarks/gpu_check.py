"""GPU readiness: parity and speed of the exported graphs on onnxruntime's CUDA execution provider, one table.

Run it on a CUDA machine with onnxruntime-gpu installed (and torch with CUDA for the torch rows):

    python benchmarks/gpu_check.py                # m=2048, n=65536, d=7, k=64; batch 1/64/512/4096
    python benchmarks/gpu_check.py --quick        # tiny sizes on whatever providers exist (CI: CPU EP only)

Parity: the autoencoder graph of expander SAEs (top-k, signed top-k, JumpReLU; values stored as float32,
bfloat16 and int8) on every available provider against a float64 torch reference of the same stored values
(relative error of the reconstruction; top-k ties may pick either latent, so codes are not compared one by
one), and whether the session really runs on the provider asked for (onnxruntime falls back to the CPU
silently). Speed: rows/s of the expander encode graph and of the plain dense graph a user would write
(MatMul + Add + TopK) on each provider, and of torch (``ExpanderSAE`` / ``TopKSAE``) on CPU and CUDA, rounds
alternated.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
import onnxruntime as ort
import torch

from common import plain_dense_graph, print_table
from saecompress.compact import stored_copy
from saecompress.exporters.onnx import build_onnx
from saecompress.models import ExpanderSAE
from saecompress.timing import interleaved

PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def expander(m: int, n: int, d: int, k: int, activation: str) -> ExpanderSAE:
    torch.manual_seed(0)
    threshold = torch.rand(n) * 0.2 if activation == "jumprelu" else None
    sae = ExpanderSAE(m, n, d, k, activation=activation, encoder="untied", threshold=threshold)
    with torch.no_grad():
        sae.enc_values.normal_()
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_()
    return sae


def session(model, provider: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    return ort.InferenceSession(model.SerializeToString(), options, providers=[provider])


def parity_rows(m: int, n: int, d: int, k: int, providers: list[str]) -> list[list]:
    x = np.random.default_rng(0).standard_normal((256, m)).astype(np.float32) * 2
    rows = []
    for activation in ("topk_relu", "signed_topk", "jumprelu"):
        for storage in ("float32", "bfloat16", "int8"):
            sae = expander(m, n, d, k, activation)
            with torch.no_grad():
                want = stored_copy(sae, storage).double()(torch.from_numpy(x).double()).numpy()
            model = build_onnx(sae, "autoencoder", storage_dtype=storage)
            for provider in providers:
                sess = session(model, provider)
                got = sess.run(["reconstruction"], {"activations": x})[0]
                error = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                runs_on = sess.get_providers()[0]
                ok = error < 1e-4 and runs_on == provider
                rows.append([f"{activation} {storage}", provider.replace("ExecutionProvider", ""),
                             f"{error:.1e}", runs_on.replace("ExecutionProvider", ""), "ok" if ok else "FAIL"])
    return rows


def speed_rows(m: int, n: int, d: int, k: int, batches: list[int], providers: list[str], rounds: int,
               budget: float) -> list[list]:
    sae = expander(m, n, d, k, "topk_relu")
    dense = sae.to_dense()
    plain = plain_dense_graph(dense.W_enc.detach().numpy(), dense.b_enc.detach().numpy(),
                              dense.b_dec.detach().numpy(), k)
    sessions = {p: (session(build_onnx(sae), p), session(plain, p)) for p in providers}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for batch in batches:
        x = np.random.default_rng(1).standard_normal((batch, m)).astype(np.float32)
        engines = {}
        for provider, (exp_sess, dense_sess) in sessions.items():
            short = provider.replace("ExecutionProvider", "")
            engines[f"ORT {short} expander"] = lambda s=exp_sess: s.run(None, {"activations": x})
            engines[f"ORT {short} plain dense"] = lambda s=dense_sess: s.run(None, {"activations": x})
        for device in devices:
            xt, s_dev, d_dev = torch.from_numpy(x).to(device), sae.to(device), dense.to(device)
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            engines[f"torch {device} expander"] = lambda s=s_dev, t=xt, f=sync: (s.encode(t), f())
            engines[f"torch {device} dense"] = lambda s=d_dev, t=xt, f=sync: (s.encode(t), f())
        with torch.inference_mode():
            times = interleaved(engines, rounds, budget)
        for name, samples in times.items():
            rows.append([batch, name, batch / statistics.median(samples)])
        sae.cpu(), dense.cpu()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=2048)
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--d", type=int, default=7)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batches", default="1,64,512,4096")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    budget = 0.2
    if a.quick:
        a.m, a.n, a.d, a.k, a.batches, a.rounds, budget = 32, 512, 4, 8, "1,64", 2, 0.01
    providers = [provider for provider in PROVIDERS if provider in ort.get_available_providers()]
    print(f"onnxruntime {ort.__version__}, providers {', '.join(providers)}; torch {torch.__version__}, "
          f"CUDA {'available' if torch.cuda.is_available() else 'not available'}")
    print(f"\nparity (autoencoder graph vs a float64 torch reference of the stored values), m={a.m}, n={a.n}, d={a.d}, "
          f"k={a.k}, 256 rows")
    parity = parity_rows(a.m, a.n, a.d, a.k, providers)
    print_table(["SAE", "provider", "relative error", "session runs on", "check"], parity)
    print(f"\nencode rows/s, median of {a.rounds} alternated rounds")
    print_table(["batch", "engine", "rows/s"],
                speed_rows(a.m, a.n, a.d, a.k, [int(b) for b in a.batches.split(",")], providers, a.rounds, budget))
    if any(row[-1] != "ok" for row in parity):
        sys.exit("parity FAILED: see the first table")


if __name__ == "__main__":
    main()
