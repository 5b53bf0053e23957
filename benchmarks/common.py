"""Shared benchmark helpers: median timings and plain-text tables."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print rows as an aligned Markdown table (pastes into notes and docs)."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |")
        if index == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def plain_dense_graph(W_enc, b_enc, b_dec, k: int):
    """The encode graph a user would write for a dense TopK SAE: ``TopK(MatMul(x − b_dec, W_enc) + b_enc)`` then
    ReLU on the kept values (outputs ``top_indices``, ``top_values``; float32 numpy weights)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    m, n = W_enc.shape
    nodes = [helper.make_node("Sub", ["activations", "b_dec"], ["centred"]),
             helper.make_node("MatMul", ["centred", "W_enc"], ["product"]),
             helper.make_node("Add", ["product", "b_enc"], ["pre"]),
             helper.make_node("TopK", ["pre", "k"], ["top", "indices"], axis=-1),
             helper.make_node("Relu", ["top"], ["top_values"]),
             helper.make_node("Identity", ["indices"], ["top_indices"])]
    inits = [numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)
             for name, a in (("W_enc", W_enc), ("b_enc", b_enc), ("b_dec", b_dec))]
    inits.append(numpy_helper.from_array(np.array([k], dtype=np.int64), "k"))
    graph = helper.make_graph(nodes, "plain_dense_encode",
                              [helper.make_tensor_value_info("activations", TensorProto.FLOAT, ["batch", m])],
                              [helper.make_tensor_value_info("top_indices", TensorProto.INT64, ["batch", k]),
                               helper.make_tensor_value_info("top_values", TensorProto.FLOAT, ["batch", k])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
