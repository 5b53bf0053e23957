"""What a native ExpanderEncode kernel could reach: benchmarks/native_encode.cpp (gather and multiply-add fused
over blocks of 16 rows, latents in cache-sized chunks, a running top-k per row), built with g++ -O3, against the
plain dense graph a user would write (MatMul + Add + TopK) and our expander graph on onnxruntime, one thread,
rounds alternated. Not a shipped kernel: the evidence for docs/ONNX.md's "what can get past the graph's floor".

    python benchmarks/native_encode.py            # m=2048, n=65536, d=7, k=64, batch 1/64/512
    python benchmarks/native_encode.py --quick    # tiny sizes (CI)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from common import median_seconds, plain_dense_graph, print_table
from saecompress.exporters.onnx import build_onnx
from saecompress.models import ExpanderSAE

SOURCE = Path(__file__).with_name("native_encode.cpp")


def build(folder: Path) -> Path:
    binary = folder / "native_encode"
    subprocess.run(["g++", "-O3", "-march=native", "-std=c++17", str(SOURCE), "-o", str(binary)], check=True)
    return binary


def session(model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    m, n, d, k, batches, calls = 2048, 65536, 7, 64, [1, 64, 512], 3
    if a.quick:
        m, n, d, k, batches, calls, a.rounds = 64, 1024, 4, 8, [1, 64], 2, 1
    if shutil.which("g++") is None:
        print_table(["engine", "rows/s"], [["native kernel", "not built: no g++ on this machine"]])
        return
    torch.manual_seed(0)
    sae = ExpanderSAE(m, n, d, k, activation="topk_relu")
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    dense = sae.to_dense()
    expander_sess = session(build_onnx(sae))
    plain_sess = session(plain_dense_graph(dense.W_enc.detach().numpy(), dense.b_enc.detach().numpy(),
                                           dense.b_dec.detach().numpy(), k))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        binary = build(folder)
        for batch in batches:
            x = np.random.default_rng(1).standard_normal((batch, m)).astype(np.float32)
            problem, out = folder / f"problem-{batch}.bin", folder / f"out-{batch}.bin"
            with open(problem, "wb") as f:  # b_dec is folded in: the kernel takes x − b_dec
                np.array([m, n, d, k, batch], np.int32).tofile(f)
                sae.indices.numpy().astype(np.int32).tofile(f)
                sae.encoder_values.detach().numpy().astype(np.float32).tofile(f)
                sae.b_enc.detach().numpy().astype(np.float32).tofile(f)
                (x - sae.b_dec.detach().numpy()).astype(np.float32).tofile(f)

            def native() -> float:
                done = subprocess.run([str(binary), str(problem), str(out), str(calls)], check=True,
                                      capture_output=True, text=True)
                return float(done.stdout)

            native()
            got = np.fromfile(out, np.float32, batch * k).reshape(batch, k)
            want = expander_sess.run(["top_values"], {"activations": x})[0]
            np.testing.assert_allclose(np.sort(got, 1), np.sort(want, 1), rtol=1e-4, atol=1e-4)  # ties aside
            times = {"native kernel": [], "ORT expander graph": [], "ORT plain dense": []}
            feeds = {"activations": x}
            for _ in range(a.rounds):
                times["native kernel"].append(native())
                times["ORT expander graph"].append(median_seconds(lambda: expander_sess.run(None, feeds), calls, warmup=0))
                times["ORT plain dense"].append(median_seconds(lambda: plain_sess.run(None, feeds), calls, warmup=0))
            plain = statistics.median(times["ORT plain dense"])
            for name, samples in times.items():
                rows.append([batch, name, batch / statistics.median(samples), f"{plain / statistics.median(samples):.1f}x"])
    print(f"encode rows/s, m={m}, n={n}, d={d}, k={k}, one thread, median of {a.rounds} alternated rounds "
          f"(top values checked against the graph's)")
    print_table(["batch", "engine", "rows/s", "vs plain dense"], rows)


if __name__ == "__main__":
    main()
