"""The custom-domain ops of saecompress's ONNX graphs, as model-local functions of standard ops.

Domain ``ai.saecompress`` (version 1). Stock onnxruntime inlines each function (CPU and CUDA EP
alike); a runtime that registers a native kernel for ``ai.saecompress::ExpanderEncode`` overrides
it. The bodies are specialised to the exported model's sizes (chunk boundaries, k); the node
attributes ``k`` and ``activation`` carry what a native kernel needs. See docs/ONNX.md.

``ExpanderEncode(x [B, m], indices [n, d] int64, values [n, d], b_enc [n]) -> (top_values [B, k],
top_indices [B, k] int64)``: ``pre = gather-reduce(x, indices, values) + b_enc``, then top-k. For a
threshold activation it takes ``threshold [n]`` (float32) as a fifth input, ranks the thresholded
code ``ReLU(pre)·[pre > θ]``, gives index -1 to kept slots that did not fire and has a third
output ``overflow [B]`` int64 (latents that fired beyond the k = max_l0 kept). ``topafa`` takes the
decoder row norms ``row_norms [n]`` (float32) as the fifth input instead, keeps the count its
norm-matching rule picks among the top max_l0 (+1) of ``ReLU(pre)·row_norms`` (``models.afa_count``)
with index -1 past it, and ``overflow`` is 1 on rows where the uncapped rule would keep more.
``ExpanderPursuit`` (a pursuit-encoded SAE: no encoder) is k rounds of matching pursuit over the
decoder rows in one ``Loop`` (:func:`expander_pursuit_function`).
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

from ..models import LAYER_NORM_EPS, ORDERINGS, THRESHOLD_ACTIVATIONS, VARIABLE_COUNT
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

    def group_for(self, n: int, k: int, activation: str = "") -> int:
        """The group size used at ``n`` latents: ``group`` when it divides n and n/group ≥ k (k + 1 for
        ``topafa``, whose overflow needs one more candidate), else 1."""
        k = k + 1 if activation == "topafa" else k
        return self.group if self.group > 1 and n % self.group == 0 and n // self.group >= k else 1


def thresholded(b: GraphBuilder, pre: str, threshold: str) -> tuple[str, str]:
    """``(code, fired)``: the code ``ReLU(pre)·[pre > θ]`` of float32 ``pre`` against float32
    ``threshold`` (broadcast), spelled ``Where(pre > max(θ, 0), pre, 0)``, and that boolean mask."""
    zero = b.const(np.array(0, dtype=np.float32))
    fired = b.op("Greater", pre, b.op("Max", threshold, zero))  # max(θ, 0): a constant, θ is an initializer
    return b.op("Where", fired, pre, zero), fired


def count_fired(b: GraphBuilder, fired: str, axes: tuple[int, ...] = (-1,)) -> str:
    """How many latents ``fired`` (a boolean mask) flags, summed over ``axes`` (int64)."""
    return b.op("ReduceSum", b.op("Cast", fired, to=TensorProto.INT64), b.ints(*axes), keepdims=0)


def select_topk(b: GraphBuilder, pre: str, k: int, activation: str, threshold: str | None = None,
                ids: str | None = None) -> tuple[str, str]:
    """``(values, indices)`` of the top-k of ``pre [B, N]`` under ``activation``: the graph form of
    ``models.select_topk``, from the same ``ORDERINGS`` table (what top-k ranks, ReLU after).
    A threshold activation ranks ``thresholded(pre, threshold)`` (:func:`select_fired`).
    ``ids [B, N]``: the latent id of each column of ``pre`` (default: the column)."""
    if activation in THRESHOLD_ACTIVATIONS:
        return select_fired(b, thresholded(b, pre, threshold)[0], k, ids)
    rank, relu_after = ORDERINGS[activation]
    scores = b.op("Relu", pre) if rank == "relu" else b.op("Abs", pre) if rank == "abs" else pre
    values, indices = b.op("TopK", scores, b.ints(k), outputs=2, axis=-1, largest=1, sorted=1)
    if rank == "abs":  # the kept values keep their sign
        values = b.op("GatherElements", pre, indices, axis=-1)
    if relu_after:
        values = b.op("Relu", values)
    return values, indices if ids is None else b.op("GatherElements", ids, indices, axis=1)


def select_fired(b: GraphBuilder, code: str, k: int, ids: str | None = None) -> tuple[str, str]:
    """``(values, indices)`` of the k largest of a thresholded ``code``; slots that did not fire
    (value 0) get index -1."""
    values, indices = b.op("TopK", code, b.ints(k), outputs=2, axis=-1, largest=1, sorted=1)
    if ids is not None:
        indices = b.op("GatherElements", ids, indices, axis=1)
    fired = b.op("Greater", values, b.const(np.array(0, dtype=np.float32)))
    return values, b.op("Where", fired, indices, b.const(np.array(-1, dtype=np.int64)))


def norm_of_rows(b: GraphBuilder, x: str) -> str:
    """``‖x‖`` of each row of ``x [B, m]``: ``[B]`` (top-AFA's target norm, of the centred input)."""
    return b.op("Sqrt", b.op("ReduceSum", b.op("Mul", x, x), b.ints(1), keepdims=0))


def select_afa(b: GraphBuilder, pre: str, width: int, k: int, row_norms: str, target: str,
               ids: str | None = None) -> tuple[str, str, str]:
    """``(values, indices, overflow)`` of top-AFA on ``pre [B, width]``: the graph form of
    ``models.select_afa``; ``row_norms`` broadcasts against ``pre``, ``target [B]``; kept slots past
    the rule's count (or of value 0) get index -1, ``overflow`` is 1 where the uncapped rule keeps more."""
    relu = b.op("Relu", pre)
    wide = min(k + 1, width)
    scores, pos = b.op("TopK", b.op("Mul", relu, row_norms), b.ints(wide), outputs=2, axis=-1, largest=1, sorted=1)
    values = b.op("GatherElements", relu, pos, axis=1)
    indices = pos if ids is None else b.op("GatherElements", ids, pos, axis=1)
    cum = b.op("Sqrt", b.op("CumSum", b.op("Mul", scores, scores), b.const(np.array(1, dtype=np.int64))))
    err = b.op("Abs", b.op("Sub", cum, b.op("Unsqueeze", target, b.ints(1))))

    def column(start: int, stop: int) -> str:
        return b.op("Slice", err, b.ints(start), b.ints(stop), b.ints(1))

    count = b.op("Add", b.op("ArgMin", column(0, k), axis=1, keepdims=1), b.ints(1))  # [B, 1]: first minimum
    slots = b.const(np.arange(k, dtype=np.int64).reshape(1, k))
    zero = b.const(np.array(0, dtype=np.float32))
    values = b.op("Slice", values, b.ints(0), b.ints(k), b.ints(1))
    kept = b.op("And", b.op("Less", slots, count), b.op("Greater", values, zero))
    values = b.op("Where", kept, values, zero)
    indices = b.op("Where", kept, b.op("Slice", indices, b.ints(0), b.ints(k), b.ints(1)),
                   b.const(np.array(-1, dtype=np.int64)))
    more = b.op("Less", column(k, k + 1), column(k - 1, k)) if wide > k else b.op("Less", count, count)
    return values, indices, b.op("Cast", b.op("Squeeze", more, b.ints(1)), to=TensorProto.INT64)


def select_counted(b: GraphBuilder, pre: str, k: int, activation: str, gate: str | None,
                   target: str | None = None, width: int = 0) -> tuple[str, str, str | None]:
    """:func:`select_topk` of ``pre [B, width]`` plus, for a variable-count activation, the overflow
    ``[B]``; ``gate``: θ of a threshold activation, or ``row_norms`` with ``target`` for ``topafa``."""
    if activation == "topafa":
        return select_afa(b, pre, width, k, gate, target)
    if gate is None:
        return (*select_topk(b, pre, k, activation), None)
    code, fired = thresholded(b, pre, gate)
    return (*select_fired(b, code, k), overflow(b, count_fired(b, fired), k))


def overflow(b: GraphBuilder, fired: str, k: int) -> str:
    """``max(fired - k, 0)``: the latents of each row that fired beyond the k kept."""
    return b.op("Max", b.op("Sub", fired, b.ints(k)), b.ints(0))


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


def _chunked_group_max(b: GraphBuilder, x_t: str, indices_aug: str, values_aug: str, n: int, width: int,
                       layout: EncodeLayout, group: int, activation: str,
                       threshold: str | None) -> tuple[str, str | None]:
    """Group maxima ``[B, n/group]`` of what top-k ranks (``|pre|`` for ``abs_topk``, the
    thresholded code with its count of fired latents ``[B]`` for a threshold activation,
    ``ReLU(pre)·row_norms`` for ``topafa`` (``threshold`` then names the row norms), else
    ``pre``); with group = 1, the pre-activations themselves (and no count)."""
    absolute = ORDERINGS.get(activation, ("",))[0] == "abs"
    maxima, counts = [], []
    for start in range(0, n, layout.chunk):
        stop = min(start + layout.chunk, n)
        latents, groups = stop - start, (stop - start) // group
        bounds = (b.ints(start), b.ints(stop), b.ints(0))
        idx = b.op("Slice", indices_aug, *bounds)  # [latents, d+1]
        val = b.op("Reshape", b.op("Slice", values_aug, *bounds), b.ints(latents, 1, width))
        rows = b.op("Gather", x_t, idx, axis=0)  # [latents, d+1, B]
        pre = b.op("Reshape", b.op("MatMul", val, rows), b.ints(groups, group, -1))  # [groups, G, B]
        if group == 1:
            maxima.append(pre)
            continue
        if activation == "topafa":
            norms = b.op("Reshape", b.op("Slice", threshold, *bounds), b.ints(groups, group, 1))
            ranked = b.op("Mul", b.op("Relu", pre), norms)
        elif threshold is not None:
            bound = b.op("Reshape", b.op("Slice", threshold, *bounds), b.ints(groups, group, 1))
            ranked, fired = thresholded(b, pre, bound)
            counts.append(b.op("Unsqueeze", count_fired(b, fired, (0, 1)), b.ints(0)))  # [1, B]
        else:
            ranked = b.op("Abs", pre) if absolute else pre
        maxima.append(b.op("ReduceMax", ranked, b.ints(1), keepdims=1))  # [groups, 1, B]
    stacked = b.op("Concat", *maxima, axis=0) if len(maxima) > 1 else maxima[0]
    fired = None
    if counts:
        fired = b.op("ReduceSum", b.op("Concat", *counts, axis=0) if len(counts) > 1 else counts[0],
                     b.ints(0), keepdims=0)
    return b.op("Transpose", b.op("Squeeze", stacked, b.ints(1)), perm=[1, 0]), fired


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


def _encode_batched(b: GraphBuilder, x: str, indices_aug: str, values_aug: str, n: int, d: int, k: int,
                    activation: str, layout: EncodeLayout, threshold: str | None) -> tuple[str, ...]:
    group = layout.group_for(n, k, activation)
    target = norm_of_rows(b, x) if activation == "topafa" else None
    x_aug = _ones_column(b, x)
    ones = b.op("Expand", b.const(np.ones((1, 1), dtype=np.float32)),
                b.op("Concat", b.ints(1), b.op("Shape", x, start=0, end=1), axis=0))
    x_t = b.op("Concat", b.op("Transpose", x, perm=[1, 0]), ones, axis=0)  # [m+1, B]
    maxima, fired = _chunked_group_max(b, x_t, indices_aug, values_aug, n, d + 1, layout, group,
                                       activation, threshold)
    if group == 1:
        return _outputs(*select_counted(b, maxima, k, activation, threshold, target, n))
    wide = k + 1 if activation == "topafa" else k
    _, group_ids = b.op("TopK", maxima, b.ints(wide), outputs=2, axis=-1, largest=1, sorted=0)
    pre, candidates = _recompute_candidates(b, x_aug, indices_aug, values_aug, group_ids, group)
    if activation == "topafa":
        norms = b.op("Gather", threshold, candidates, axis=0)
        return select_afa(b, pre, wide * group, k, norms, target, ids=candidates)
    bound = None if threshold is None else b.op("Gather", threshold, candidates, axis=0)
    values, indices = select_topk(b, pre, k, activation, bound, ids=candidates)
    return _outputs(values, indices, None if fired is None else overflow(b, fired, k))


def _outputs(values: str, indices: str, spilled: str | None) -> tuple[str, ...]:
    return (values, indices) if spilled is None else (values, indices, spilled)


def _encode_single_row(b: GraphBuilder, x: str, indices_t: str, values_t: str, n: int, d: int,
                       k: int, activation: str, threshold: str | None) -> tuple[str, ...]:
    """One row: per mask column j, ``GatherElements`` x at ``indices[:, j]``, scale, accumulate.

    ``indices_t``/``values_t`` are ``[d+1, 1, n]`` (the last row is the bias: index m, value b_enc).
    """
    columns = b.op("Split", indices_t, b.ints(*[1] * (d + 1)), axis=0, outputs=d + 1)
    scales = b.op("Split", values_t, b.ints(*[1] * (d + 1)), axis=0, outputs=d + 1)
    pre = b.op("Squeeze", scales[d], b.ints(0))  # the bias row
    for j in range(d):
        gathered = b.op("GatherElements", x, b.op("Squeeze", columns[j], b.ints(0)), axis=1)  # [1, n]
        pre = b.op("Add", pre, b.op("Mul", gathered, b.op("Squeeze", scales[j], b.ints(0))))
    target = norm_of_rows(b, x) if activation == "topafa" else None
    return _outputs(*select_counted(b, pre, k, activation, threshold, target, n))


_OUTPUT_TYPES = (("values", TensorProto.FLOAT, [None, None]), ("indices", TensorProto.INT64, [None, None]),
                 ("overflow", TensorProto.INT64, [None]))


def _branch(b: GraphBuilder, name: str, outputs: tuple[str, ...]) -> object:
    """A subgraph of ``b``'s nodes whose outputs are ``(values, indices[, overflow])``."""
    names = [b.name(hint) for hint, _, _ in _OUTPUT_TYPES[:len(outputs)]]
    nodes = b.nodes + [helper.make_node("Identity", [src], [dst], name=b.name("Identity"))
                       for src, dst in zip(outputs, names)]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(dst, elem, shape)
                                               for dst, (_, elem, shape) in zip(names, _OUTPUT_TYPES)])


def expander_encode_function(m: int, n: int, d: int, k: int, activation: str, opset: int,
                             layout: EncodeLayout = EncodeLayout()) -> FunctionProto:
    """``ai.saecompress::ExpanderEncode`` specialised to ``(m, n, d, k, activation)``; a variable-count
    activation adds the input ``threshold`` (``row_norms`` for ``topafa``) and the output ``overflow``
    (k is then max_l0)."""
    b = GraphBuilder("enc", function=True)
    threshold = ("threshold" if activation in THRESHOLD_ACTIVATIONS else "row_norms" if activation in VARIABLE_COUNT
                 else None)
    indices_aug, values_aug = _augmented(b, m, n)
    if layout.single_row_branch:
        # outside the If, so onnxruntime folds them into initializers once; int32: half the index bytes per row
        indices_t = b.op("Unsqueeze", b.op("Transpose", indices_aug, perm=[1, 0]), b.ints(1))
        indices_t = b.op("Cast", indices_t, to=TensorProto.INT32)
        values_t = b.op("Unsqueeze", b.op("Transpose", values_aug, perm=[1, 0]), b.ints(1))
        is_single = b.op("Equal", b.op("Shape", "x", start=0, end=1), b.ints(1))
        single, batched = GraphBuilder("enc1", function=True), GraphBuilder("encb", function=True)
        then_graph = _branch(single, "single_row", _encode_single_row(
            single, "x", indices_t, values_t, n, d, k, activation, threshold))
        else_graph = _branch(batched, "batched", _encode_batched(
            batched, "x", indices_aug, values_aug, n, d, k, activation, layout, threshold))
        results = b.op("If", is_single, outputs=2 if threshold is None else 3,
                       then_branch=then_graph, else_branch=else_graph)
    else:
        results = _encode_batched(b, "x", indices_aug, values_aug, n, d, k, activation, layout, threshold)
    names = ["top_values", "top_indices", "overflow"][:len(results)]
    for src, dst in zip(results, names):
        b.op("Identity", src, outputs=[dst])
    inputs = ["x", "indices", "values", "b_enc"] + ([threshold] if threshold else [])
    return b.function_proto(DOMAIN, "ExpanderEncode", inputs, names, opset, attributes=["k", "activation"],
                            doc="Top-k of x·W_enc + b_enc for an expander-masked W_enc (see docs/ONNX.md).")


def _columns(b: GraphBuilder, matrix: str, d: int) -> list[str]:
    """The ``d`` columns of ``matrix [n, d]``, each as a ``[1, n]`` row."""
    rows = b.op("Transpose", matrix, perm=[1, 0])
    return [rows] if d == 1 else b.op("Split", rows, b.ints(*[1] * d), axis=0, outputs=d)


def _pursuit_rounds(b: GraphBuilder, x: str, indices: str, atoms: str, inverse: str, n: int, d: int, k: int,
                    activation: str, single_row: bool) -> tuple[str, str]:
    """The k rounds of ``ExpanderPursuit`` on ``x [B, m]``, as one ``Loop`` (residual and picked-latent mask
    carried, each round's code and latent scanned out); ``single_row``: the gather spelled for B = 1
    (per mask column, ``GatherElements`` + ``Mul`` + ``Add``, as ``ExpanderEncode``'s one-row branch) instead
    of the batched one (``Gather`` of ``rᵀ`` rows, one batched ``MatMul``)."""
    rank, relu_after = ORDERINGS[activation]
    rows = b.op("Shape", x, start=0, end=1)
    taken = b.op("ConstantOfShape", b.op("Concat", rows, b.ints(n), axis=0),
                 value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    excluded = b.op("Expand", b.const(np.full((1, 1), -np.inf, dtype=np.float32)),
                    b.op("Concat", rows, b.ints(1), axis=0))
    atoms_3d = None if single_row else b.op("Reshape", atoms, b.ints(n, 1, d))
    body = GraphBuilder(f"{b.prefix}_round", function=True)
    residual, picked = "residual_in", "taken_in"
    if single_row:  # per mask column j: GatherElements of r at indices[:, j], times atoms[:, j], summed
        columns = _columns(b, b.op("Cast", indices, to=TensorProto.INT32), d)
        scales = _columns(b, atoms, d)
        corr = None
        for column, scale in zip(columns, scales):  # [1, n] each
            term = body.op("Mul", body.op("GatherElements", residual, column, axis=1), scale)
            corr = term if corr is None else body.op("Add", corr, term)
    else:
        gathered = body.op("Gather", body.op("Transpose", residual, perm=[1, 0]), indices, axis=0)  # [n, d, B]
        corr = body.op("Transpose", body.op("Reshape", body.op("MatMul", atoms_3d, gathered), body.ints(n, -1)),
                       perm=[1, 0])  # [B, n]
    scores = body.op("Relu", corr) if rank == "relu" else body.op("Abs", corr) if rank == "abs" else corr
    best = body.op("ArgMax", body.op("Add", scores, picked), axis=1, keepdims=1)  # [B, 1]
    kept = body.op("GatherElements", corr, best, axis=1)
    if relu_after:
        kept = body.op("Relu", kept)
    body.op("Mul", kept, body.op("Gather", inverse, best, axis=0), outputs=["code_out"])
    body.op("Identity", best, outputs=["latent_out"])
    latent = body.op("Squeeze", best, body.ints(1))
    step = body.op("Mul", body.op("Neg", kept), body.op("Gather", atoms, latent, axis=0))  # [B, d]
    body.op("ScatterElements", residual, body.op("Gather", indices, latent, axis=0), step, axis=1,
            reduction="add", outputs=["residual_out"])
    body.op("ScatterElements", picked, best, excluded, axis=1, outputs=["taken_out"])
    body.op("Identity", "cond_in", outputs=["cond_out"])

    def info(name: str, elem: int) -> object:
        return helper.make_tensor_value_info(name, elem, None)

    graph = helper.make_graph(
        body.nodes, "pursuit_round",
        [helper.make_tensor_value_info("round", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         info("residual_in", TensorProto.FLOAT), info("taken_in", TensorProto.FLOAT)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), info("residual_out", TensorProto.FLOAT),
         info("taken_out", TensorProto.FLOAT), info("code_out", TensorProto.FLOAT),
         info("latent_out", TensorProto.INT64)])
    true = b.const(np.array(True))
    _, _, codes, latents = b.op("Loop", b.const(np.array(k, dtype=np.int64)), true, x, taken, outputs=4,
                                body=graph)  # scanned: [k, B, 1]
    return (b.op("Transpose", b.op("Squeeze", codes, b.ints(2)), perm=[1, 0]),
            b.op("Transpose", b.op("Squeeze", latents, b.ints(2)), perm=[1, 0]))


def expander_pursuit_function(n: int, d: int, k: int, activation: str, opset: int) -> FunctionProto:
    """``ai.saecompress::ExpanderPursuit(x [B, m], indices [n, d], values [n, d]) -> (top_values [B, k],
    top_indices [B, k])``: k rounds of matching pursuit over the decoder rows (``models.pursue``).

    Each round gathers every latent's correlation with the residual, ``c_i = <r, D_i>/‖D_i‖`` (a
    gather-reduce with the unit rows), ranks it under ``activation``'s ordering with the latents already
    picked at −inf, takes the ``ArgMax``, keeps its value (ReLU'd under a ReLU ordering), outputs
    ``kept/‖D_i‖`` and subtracts ``kept · D_i/‖D_i‖`` from the residual (``ScatterElements`` add). The
    rounds are one ``Loop``; each costs one gather-reduce over all n latents (no Gram matrix is stored).
    """
    b = GraphBuilder("mp", function=True)
    squares = b.op("ReduceSum", b.op("Mul", "values", "values"), b.ints(1), keepdims=1)
    norms = b.op("Max", b.op("Sqrt", squares), b.const(np.array(1e-12, dtype=np.float32)))  # [n, 1]
    atoms = b.op("Div", "values", norms)
    inverse = b.op("Reciprocal", b.op("Squeeze", norms, b.ints(1)))  # [n]
    is_single = b.op("Equal", b.op("Shape", "x", start=0, end=1), b.ints(1))
    single, batched = GraphBuilder("mp1", function=True), GraphBuilder("mpb", function=True)
    results = b.op("If", is_single, outputs=2,
                   then_branch=_branch(single, "single_row", _pursuit_rounds(
                       single, "x", "indices", atoms, inverse, n, d, k, activation, True)),
                   else_branch=_branch(batched, "batched", _pursuit_rounds(
                       batched, "x", "indices", atoms, inverse, n, d, k, activation, False)))
    for src, dst in zip(results, ("top_values", "top_indices")):
        b.op("Identity", src, outputs=[dst])
    return b.function_proto(DOMAIN, "ExpanderPursuit", ["x", "indices", "values"], ["top_values", "top_indices"],
                            opset, attributes=["k", "activation"],
                            doc="k rounds of matching pursuit over expander decoder rows (see docs/ONNX.md).")


def unused_slots_safe(b: GraphBuilder, indices: str, values: str) -> tuple[str, str]:
    """``(indices, values)`` with the -1 slots (latents that did not fire) at latent 0 with value 0."""
    unused = b.op("Less", indices, b.const(np.array(0, dtype=np.int64)))
    return (b.op("Max", indices, b.const(np.array(0, dtype=np.int64))),
            b.op("Where", unused, b.const(np.array(0, dtype=np.float32)), values))


def expander_decode_function(opset: int) -> FunctionProto:
    """``ai.saecompress::ExpanderDecode(top_values [B, k], top_indices [B, k], indices, values, b_dec)``.

    ``x̂ = b_dec + Σ_a top_values[a] · W_dec[top_indices[a]]``: gather the k active latents'
    ``d`` (dim, value) pairs and ``ScatterElements(reduction="add")`` them onto ``b_dec``.
    Slots with index -1 contribute nothing.
    """
    b = GraphBuilder("dec", function=True)
    latents, weights = unused_slots_safe(b, "top_indices", "top_values")
    dims = b.op("Gather", "indices", latents, axis=0)  # [B, k, d]
    vals = b.op("Gather", "values", latents, axis=0)
    contrib = b.op("Mul", vals, b.op("Unsqueeze", weights, b.ints(2)))
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
