"""The custom-domain ops of saecompress's ONNX graphs, as model-local functions of standard ops.

Domain ``ai.saecompress`` (version 1). Stock onnxruntime inlines each function (CPU and CUDA EP
alike); a runtime that registers a native kernel for ``ai.saecompress::ExpanderEncode`` overrides
it. The bodies are specialised to the exported model's sizes (chunk boundaries, k); the node
attributes ``k`` and ``activation`` carry what a native kernel needs. See docs/ONNX.md.

``ExpanderEncode(x [B, m], indices [n, d] int64, values [n, d], b_enc [n]) -> (top_values [B, k],
top_indices [B, k] int64)``: ``pre = gather-reduce(x, indices, values) + b_enc``, then top-k.
Fast path (``EncodeLayout``, measured in benchmarks/onnx_encode.py):

* ``xᵀ [m+1, B]`` (a row of ones appended, so the bias is one more "input" of every latent);
* latents in chunks of ``chunk``: ``Gather`` rows of ``xᵀ`` (contiguous ``B`` floats each) into
  ``[chunk/G, G, d+1, B]``, one batched ``MatMul`` with the values, ``ReduceMax`` over groups of
  ``G`` latents: only ``n/G`` group maxima per row ever leave the cache;
* ``TopK`` over group maxima picks k groups that contain the top-k latents (each of the top-k
  lies in a group whose maximum beats all but < k groups); their ``k·G`` candidates are
  recomputed exactly from ``x`` (``GatherElements``) and a final ``TopK`` picks the k;
* a batch of one row takes another branch (``If``): for each mask column j, ``GatherElements``
  of x at ``indices[:, j]`` (int32: half the index bytes), ``Mul`` by ``values[:, j]``, ``Add``
  into the running sum (no reduction over a short axis), then ``TopK``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import FunctionProto, TensorProto, helper

from ..models import LAYER_NORM_EPS, ORDERINGS
from .onnx_graph import GraphBuilder

DOMAIN = "ai.saecompress"
DOMAIN_VERSION = 1


@dataclass(frozen=True)
class EncodeLayout:
    """How ``ExpanderEncode`` is spelled in standard ops (see docs/ONNX.md for the measurements).

    ``chunk``: latents per gather chunk; ``group``: latents per group-max (1 = TopK over all n
    pre-activations); ``single_row_branch``: an ``If`` that encodes batches of one row with
    per-mask-column ``GatherElements`` (int32 indices).
    """

    chunk: int = 256
    group: int = 16
    single_row_branch: bool = True

    def group_for(self, n: int, k: int) -> int:
        """The group size used at ``n`` latents: ``group`` when it divides n and n/group ≥ k, else 1."""
        return self.group if self.group > 1 and n % self.group == 0 and n // self.group >= k else 1


def select_topk(b: GraphBuilder, pre: str, k: int, activation: str) -> tuple[str, str]:
    """``(values, indices)`` of the top-k of ``pre [B, N]`` under ``activation``: the graph form of
    ``models.select_topk``, from the same ``ORDERINGS`` table (what top-k ranks, ReLU after)."""
    rank, relu_after = ORDERINGS[activation]
    scores = b.op("Relu", pre) if rank == "relu" else b.op("Abs", pre) if rank == "abs" else pre
    values, indices = b.op("TopK", scores, b.ints(k), outputs=2, axis=-1, largest=1, sorted=1)
    if rank == "abs":  # the kept values keep their sign
        values = b.op("GatherElements", pre, indices, axis=-1)
    if relu_after:
        values = b.op("Relu", values)
    return values, indices


def _augmented(b: GraphBuilder, m: int, n: int) -> tuple[str, str]:
    """``indices_aug [n, d+1]`` (extra column = m, the ones row) and ``values_aug [n, d+1]`` (+ b_enc)."""
    column = b.op("Expand", b.const(np.array([[m]], dtype=np.int64)), b.ints(n, 1))
    indices_aug = b.op("Concat", "indices", column, axis=1)
    values_aug = b.op("Concat", "values", b.op("Unsqueeze", "b_enc", b.ints(1)), axis=1)
    return indices_aug, values_aug


def _ones_column(b: GraphBuilder, x: str) -> str:
    """``x [B, m]`` with a column of ones appended: ``[B, m+1]``."""
    rows = b.op("Shape", x, start=0, end=1)
    ones = b.op("Expand", b.const(np.ones((1, 1), dtype=np.float32)), b.op("Concat", rows, b.ints(1), axis=0))
    return b.op("Concat", x, ones, axis=1)


def _chunked_group_max(b: GraphBuilder, x_t: str, indices_aug: str, values_aug: str,
                       n: int, width: int, layout: EncodeLayout, group: int, absolute: bool) -> str:
    """Group maxima ``[B, n/group]`` (of ``|pre|`` when ``absolute``; the pre-activations themselves
    when group = 1)."""
    maxima = []
    for start in range(0, n, layout.chunk):
        stop = min(start + layout.chunk, n)
        latents, groups = stop - start, (stop - start) // group
        bounds = (b.ints(start), b.ints(stop), b.ints(0))
        idx = b.op("Slice", indices_aug, *bounds)  # [latents, d+1]
        val = b.op("Reshape", b.op("Slice", values_aug, *bounds), b.ints(latents, 1, width))
        rows = b.op("Gather", x_t, idx, axis=0)  # [latents, d+1, B]
        pre = b.op("Reshape", b.op("MatMul", val, rows), b.ints(groups, group, -1))  # [groups, G, B]
        if group > 1:
            ranked = b.op("Abs", pre) if absolute else pre
            maxima.append(b.op("ReduceMax", ranked, b.ints(1), keepdims=1))  # [groups, 1, B]
        else:
            maxima.append(pre)
    stacked = b.op("Concat", *maxima, axis=0) if len(maxima) > 1 else maxima[0]
    return b.op("Transpose", b.op("Squeeze", stacked, b.ints(1)), perm=[1, 0])


def _recompute_candidates(b: GraphBuilder, x_aug: str, indices_aug: str, values_aug: str,
                          group_ids: str, group: int) -> tuple[str, str]:
    """Exact pre-activations of the ``k·G`` latents of the chosen groups: ``(pre, latent ids)``."""
    first = b.op("Mul", b.op("Unsqueeze", group_ids, b.ints(2)), b.const(np.array(group, dtype=np.int64)))
    members = b.op("Add", first, b.const(np.arange(group, dtype=np.int64).reshape(1, 1, group)))
    candidates = b.op("Reshape", members, b.ints(0, -1))  # [B, k·G]
    dims = b.op("Gather", indices_aug, candidates, axis=0)  # [B, k·G, d+1]
    vals = b.op("Gather", values_aug, candidates, axis=0)
    gathered = b.op("GatherElements", x_aug, b.op("Reshape", dims, b.ints(0, -1)), axis=1)
    gathered = b.op("Reshape", gathered, b.op("Shape", dims))
    pre = b.op("ReduceSum", b.op("Mul", gathered, vals), b.ints(2), keepdims=0)
    return pre, candidates


def _encode_batched(b: GraphBuilder, x: str, indices_aug: str, values_aug: str,
                    n: int, d: int, k: int, activation: str, layout: EncodeLayout) -> tuple[str, str]:
    group = layout.group_for(n, k)
    x_aug = _ones_column(b, x)
    ones = b.op("Expand", b.const(np.ones((1, 1), dtype=np.float32)),
                b.op("Concat", b.ints(1), b.op("Shape", x, start=0, end=1), axis=0))
    x_t = b.op("Concat", b.op("Transpose", x, perm=[1, 0]), ones, axis=0)  # [m+1, B]
    maxima = _chunked_group_max(b, x_t, indices_aug, values_aug, n, d + 1, layout, group,
                                ORDERINGS[activation][0] == "abs")
    if group == 1:
        return select_topk(b, maxima, k, activation)
    _, group_ids = b.op("TopK", maxima, b.ints(k), outputs=2, axis=-1, largest=1, sorted=0)
    pre, candidates = _recompute_candidates(b, x_aug, indices_aug, values_aug, group_ids, group)
    values, positions = select_topk(b, pre, k, activation)
    return values, b.op("GatherElements", candidates, positions, axis=1)


def _encode_single_row(b: GraphBuilder, x: str, indices_t: str, values_t: str, d: int,
                       k: int, activation: str) -> tuple[str, str]:
    """One row: per mask column j, ``GatherElements`` x at ``indices[:, j]``, scale, accumulate.

    ``indices_t``/``values_t`` are ``[d+1, 1, n]`` (the last row is the bias: index m, value b_enc).
    """
    columns = b.op("Split", indices_t, b.ints(*[1] * (d + 1)), axis=0, outputs=d + 1)
    scales = b.op("Split", values_t, b.ints(*[1] * (d + 1)), axis=0, outputs=d + 1)
    pre = b.op("Squeeze", scales[d], b.ints(0))  # the bias row
    for j in range(d):
        gathered = b.op("GatherElements", x, b.op("Squeeze", columns[j], b.ints(0)), axis=1)  # [1, n]
        pre = b.op("Add", pre, b.op("Mul", gathered, b.op("Squeeze", scales[j], b.ints(0))))
    return select_topk(b, pre, k, activation)


def _branch(b: GraphBuilder, name: str, outputs: tuple[str, str]) -> object:
    """A subgraph of ``b``'s nodes whose outputs are ``(values, indices)``."""
    names = (b.name("values"), b.name("indices"))
    nodes = b.nodes + [helper.make_node("Identity", [src], [dst], name=b.name("Identity"))
                       for src, dst in zip(outputs, names)]
    return helper.make_graph(nodes, name, [], [
        helper.make_tensor_value_info(names[0], TensorProto.FLOAT, [None, None]),
        helper.make_tensor_value_info(names[1], TensorProto.INT64, [None, None])])


def expander_encode_function(m: int, n: int, d: int, k: int, activation: str, opset: int,
                             layout: EncodeLayout = EncodeLayout()) -> FunctionProto:
    """``ai.saecompress::ExpanderEncode`` specialised to ``(m, n, d, k, activation)``."""
    b = GraphBuilder("enc", function=True)
    indices_aug, values_aug = _augmented(b, m, n)
    if layout.single_row_branch:
        # outside the If, so onnxruntime folds them into initializers once; int32: half the index bytes per row
        indices_t = b.op("Unsqueeze", b.op("Transpose", indices_aug, perm=[1, 0]), b.ints(1))
        indices_t = b.op("Cast", indices_t, to=TensorProto.INT32)
        values_t = b.op("Unsqueeze", b.op("Transpose", values_aug, perm=[1, 0]), b.ints(1))
        is_single = b.op("Equal", b.op("Shape", "x", start=0, end=1), b.ints(1))
        single, batched = GraphBuilder("enc1", function=True), GraphBuilder("encb", function=True)
        then_graph = _branch(single, "single_row", _encode_single_row(
            single, "x", indices_t, values_t, d, k, activation))
        else_graph = _branch(batched, "batched", _encode_batched(
            batched, "x", indices_aug, values_aug, n, d, k, activation, layout))
        values, indices = b.op("If", is_single, outputs=2, then_branch=then_graph, else_branch=else_graph)
    else:
        values, indices = _encode_batched(b, "x", indices_aug, values_aug, n, d, k, activation, layout)
    b.op("Identity", values, outputs=["top_values"])
    b.op("Identity", indices, outputs=["top_indices"])
    return b.function_proto(DOMAIN, "ExpanderEncode", ["x", "indices", "values", "b_enc"],
                            ["top_values", "top_indices"], opset, attributes=["k", "activation"],
                            doc="Top-k of x·W_enc + b_enc for an expander-masked W_enc (see docs/ONNX.md).")


def expander_decode_function(opset: int) -> FunctionProto:
    """``ai.saecompress::ExpanderDecode(top_values [B, k], top_indices [B, k], indices, values, b_dec)``.

    ``x̂ = b_dec + Σ_a top_values[a] · W_dec[top_indices[a]]``: gather the k active latents'
    ``d`` (dim, value) pairs and ``ScatterElements(reduction="add")`` them onto ``b_dec``.
    """
    b = GraphBuilder("dec", function=True)
    dims = b.op("Gather", "indices", "top_indices", axis=0)  # [B, k, d]
    vals = b.op("Gather", "values", "top_indices", axis=0)
    contrib = b.op("Mul", vals, b.op("Unsqueeze", "top_values", b.ints(2)))
    rows = b.op("Shape", "top_values", start=0, end=1)
    base = b.op("Expand", b.op("Unsqueeze", "b_dec", b.ints(0)),
                b.op("Concat", rows, b.op("Shape", "b_dec"), axis=0))
    b.op("ScatterElements", base, b.op("Reshape", dims, b.ints(0, -1)),
         b.op("Reshape", contrib, b.ints(0, -1)), axis=1, reduction="add", outputs=["reconstruction"])
    return b.function_proto(DOMAIN, "ExpanderDecode",
                            ["top_values", "top_indices", "indices", "values", "b_dec"],
                            ["reconstruction"], opset,
                            doc="b_dec + sum of the active latents' sparse decoder rows.")


def layer_norm_function(opset: int) -> FunctionProto:
    """``ai.saecompress::LayerNorm(x [B, m]) -> (x_norm, mu, std)``: OpenAI's input normalisation.

    ``mu`` = mean over the last axis, ``std`` = unbiased standard deviation (as ``torch.std``),
    ``x_norm = (x - mu) / (std + 1e-5)``.
    """
    b = GraphBuilder("ln", function=True)
    b.op("ReduceMean", "x", b.ints(-1), keepdims=1, outputs=["mu"])
    centred = b.op("Sub", "x", "mu")
    squares = b.op("ReduceSum", b.op("Mul", centred, centred), b.ints(-1), keepdims=1)
    dof = b.op("Cast", b.op("Sub", b.op("Shape", "x", start=-1), b.ints(1)), to=TensorProto.FLOAT)
    b.op("Sqrt", b.op("Div", squares, dof), outputs=["std"])
    eps = b.const(np.array(LAYER_NORM_EPS, dtype=np.float32))
    b.op("Div", centred, b.op("Add", "std", eps), outputs=["x_norm"])
    return b.function_proto(DOMAIN, "LayerNorm", ["x"], ["x_norm", "mu", "std"], opset,
                            doc="OpenAI sparse_autoencoder input normalisation (unbiased std, eps 1e-5).")
