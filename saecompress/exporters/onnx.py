"""Export SAEs to self-contained ONNX files (contract: docs/ONNX.md).

``export_onnx(sae, path, graph=...)`` writes one of three graphs:

* ``encode``: ``activations [..., m]`` → ``top_indices [..., k]`` (int64), ``top_values [..., k]``
  (and ``codes [..., n]`` with ``dense_output``; and ``overflow [...]`` for a threshold SAE, whose
  k is the cap ``max_l0``: slots that did not fire hold index -1, value 0);
* ``decode``: ``top_indices``, ``top_values`` → ``reconstruction [..., m]`` (normalised space when
  the SAE normalises its inputs, as ``model.decode``);
* ``autoencoder``: ``activations`` → ``reconstruction`` (original space), ``top_indices``,
  ``top_values`` (and ``codes``).

Expander SAEs use the custom-domain functions of ``onnx_functions``; their weights are stored as
in the compact file (mask as int16/int32, values as float32/float16/bfloat16 or int8 + per-latent
scale) and dequantised in-graph (onnxruntime folds that at session start). Dense TopK SAEs export
as standard ``MatMul`` + ``TopK``, with the same inputs and outputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import ModelProto, TensorProto, helper

from .._io import atomic_path, check_outputs
from .._json import dumps
from ..activations import open_activations
from ..compact import STORAGE_DTYPES, index_dtype, quantize_int8
from ..errors import SaeCompressError, check_choice
from ..models import VARIABLE_COUNT, ExpanderSAE, TopKSAE, active_counts, l0_cap
from ..provenance import shareable
from ..sources import load_source
from .onnx_functions import (DOMAIN, DOMAIN_VERSION, EncodeLayout, expander_decode_function,
                             expander_encode_function, expander_pursuit_function, layer_norm_function, norm_of_rows,
                             select_counted, unused_slots_safe)
from .metadata import METADATA_PREFIX, read_onnx_metadata  # noqa: F401 (read_onnx_metadata re-exported)
from .onnx_graph import GraphBuilder

GRAPHS = ("encode", "decode", "autoencoder")
DTYPES = ("float32", "float16")
IR_VERSION = 10
OPSETS = range(18, 22)  # ReduceMax with axes as an input needs 18; IR 10 covers up to 21
CAP_ROWS = 65_536  # activation rows export reads to set a threshold SAE's cap (--acts)

_ELEM = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


def export_onnx(sae, path: str | os.PathLike, graph: str = "encode", *, dtype: str = "float32",
                dense_output: bool = False, opset: int = 18, seq: bool = False, hookpoint: str | None = None,
                hub=None, storage_dtype: str | None = None, source: dict | None = None,
                max_l0: int | None = None, acts=None, max_rows: int = CAP_ROWS, inline: bool = False) -> Path:
    """Write ``sae`` (a model, or any source ``saecompress.load`` accepts) as an ONNX file.

    ``dtype`` is the dtype of the graph's float inputs/outputs and of the float32 weights it
    stores (float16 halves the file; arithmetic stays float32). Inputs are ``[batch, m]``, or
    ``[batch, seq, m]`` with ``seq=True`` (both axes dynamic). ``hookpoint`` and ``hub`` (a
    ``sources.HubAccess``) are passed to ``sources.load_source`` for a source, whose stored
    precision and provenance are used unless ``storage_dtype`` / ``source`` are given (see
    :func:`build_onnx`; ``max_l0`` too). A threshold SAE without ``max_l0`` takes its cap from ``acts``
    (activations: a path or an ``ActivationSource``; the first ``max_rows`` rows) when given:
    ``models.l0_cap`` of its per-row L0 there. ``path`` is checked first (it must not be or lie inside
    the source or ``acts``: see ``_io.check_outputs``) and replaced if it exists; written atomically.
    """
    inputs = [src for src in (sae, acts) if isinstance(src, (str, os.PathLike))]
    check_outputs([path], inputs, kind="file")
    if not isinstance(sae, (ExpanderSAE, TopKSAE)):
        loaded = load_source(sae, hookpoint, hub=hub)
        sae, storage_dtype = loaded.model, storage_dtype or loaded.storage_dtype
        source = loaded.provenance if source is None else source
    if acts is not None:
        max_l0 = _cap_from_acts(sae, max_l0, acts, max_rows)
    model = build_onnx(sae, graph, dtype=dtype, dense_output=dense_output, opset=opset, seq=seq,
                       storage_dtype=storage_dtype or "float32", source=source, max_l0=max_l0)
    if inline:
        model = inlined(model)
    with atomic_path(path) as tmp:
        tmp.write_bytes(model.SerializeToString())
    return Path(path)


def inlined(model: ModelProto) -> ModelProto:
    """``model`` with its model-local functions inlined (``onnx.inliner``): standard ops only, no functions."""
    from onnx import inliner

    flat = inliner.inline_local_functions(model)
    del flat.functions[:]
    keep = [entry for entry in flat.opset_import if entry.domain != DOMAIN]
    del flat.opset_import[:]
    flat.opset_import.extend(keep)
    return flat


def build_onnx(sae: ExpanderSAE | TopKSAE, graph: str = "encode", *, dtype: str = "float32",
               dense_output: bool = False, opset: int = 18, seq: bool = False,
               layout: EncodeLayout = EncodeLayout(), storage_dtype: str = "float32",
               source: dict | None = None, max_l0: int | None = None) -> ModelProto:
    """The ONNX model ``export_onnx`` writes (in memory). ``layout`` picks the encode formulation.

    A threshold SAE (``jumprelu``, ``batchtopk``) keeps the ``max_l0`` largest latents of its
    thresholded code per row (default: the model's k when k < n) and reports the rest in ``overflow``.

    An Expander SAE's values are stored as ``storage_dtype`` (a compact file's: ``STORAGE_DTYPES``)
    and dequantised in-graph; dense SAEs have none. ``source`` (the SAE's provenance) goes into the
    metadata through ``provenance.shareable``.
    """
    if not isinstance(sae, (ExpanderSAE, TopKSAE)):
        raise SaeCompressError(f"build_onnx takes an ExpanderSAE or TopKSAE, not {type(sae).__name__}; "
                               "load a source with saecompress.load first")
    check_choice("graph", graph, GRAPHS)
    check_choice("ONNX dtype", dtype, DTYPES)
    check_choice("storage dtype", storage_dtype, STORAGE_DTYPES)
    if storage_dtype != "float32" and not isinstance(sae, ExpanderSAE):
        raise SaeCompressError(f"storage dtype {storage_dtype} is for Expander SAE values; a dense SAE's "
                               "weights are stored in the graph dtype")
    if opset not in OPSETS:
        raise SaeCompressError(f"opset {opset} is not supported; use {OPSETS.start}..{OPSETS.stop - 1}")
    k = sae.k if graph == "decode" and max_l0 is None else kept_latents(sae, max_l0)  # decode takes any j
    model = _Exporter(sae, dtype, opset, layout, ["batch", "seq"] if seq else ["batch"], storage_dtype,
                      source or {}, k).model(graph, dense_output)
    if model.ByteSize() >= 2**31:
        raise SaeCompressError(f"the {graph} graph of this SAE is {model.ByteSize() / 2**30:.1f} GiB, over "
                               "ONNX's 2 GiB single-file limit; export --graph encode or decode alone, "
                               "--dtype float16, or convert it to an Expander SAE first")
    return model


def _cap_from_acts(sae: ExpanderSAE | TopKSAE, max_l0: int | None, acts, max_rows: int) -> int:
    """``max_l0`` of a variable-count SAE from its per-row L0 on the first ``max_rows`` rows of ``acts``."""
    if sae.activation not in VARIABLE_COUNT:
        raise SaeCompressError(f"--acts sets the cap of a variable-count SAE; this {sae.activation} SAE keeps "
                               f"k={sae.k} latents (drop --acts)")
    if max_l0 is not None:
        raise SaeCompressError("give the cap as --max-l0 or take it from --acts, not both")
    source = open_activations(acts) if isinstance(acts, (str, os.PathLike)) else acts
    x = source.read(0, min(max_rows, source.num_rows))
    return l0_cap(active_counts(sae, x)[0], sae.n)


def kept_latents(sae: ExpanderSAE | TopKSAE, max_l0: int | None) -> int:
    """The k of the graph: the model's k, or for a variable-count SAE its cap ``max_l0`` (given, or the
    model's k when k < n)."""
    if sae.activation not in VARIABLE_COUNT:
        if max_l0 is not None:
            raise SaeCompressError(f"max_l0 is the cap of a variable-count SAE; this {sae.activation} SAE always "
                                   f"keeps k={sae.k} latents (drop --max-l0)")
        return sae.k
    if max_l0 is None:
        if sae.k == sae.n:
            raise SaeCompressError(
                f"this {sae.activation} SAE has no cap on its active latents (k = n = {sae.n}, as read from a "
                "dense file); pass --max-l0 N, or --acts ACTS to use the 99.9th percentile of L0 there")
        return sae.k
    if not 1 <= max_l0 <= sae.n:
        raise SaeCompressError(f"--max-l0 {max_l0} must be between 1 and the number of latents n={sae.n}")
    return int(max_l0)


class _Exporter:
    """Builds the main graph of one SAE: weights as initializers, then the requested graph."""

    def __init__(self, sae: ExpanderSAE | TopKSAE, dtype: str, opset: int, layout: EncodeLayout,
                 lead: list[str], storage_dtype: str, source: dict, k: int) -> None:
        self.sae, self.dtype, self.opset, self.layout, self.lead = sae, dtype, opset, layout, lead
        self.storage_dtype, self.source, self.k = storage_dtype, source, k
        self.variable = sae.activation in VARIABLE_COUNT
        self.expander = isinstance(sae, ExpanderSAE)
        self.b = GraphBuilder("main")
        self.functions: dict[str, onnx.FunctionProto] = {}
        self._weights: dict[str, str] = {}

    # ------------------------------------------------------------------ weights
    def _float(self, name: str, tensor: torch.Tensor) -> str:
        """A float weight stored in the export dtype, as a float32 value in the graph."""
        array = tensor.detach().cpu().float().numpy()
        if self.dtype == "float16":
            return self.b.op("Cast", self.b.initializer(name, array.astype(np.float16)), to=TensorProto.FLOAT)
        return self.b.initializer(name, array)

    def _values(self, name: str, tensor: torch.Tensor) -> str:
        """Expander values in their storage dtype, dequantised to float32 in-graph."""
        storage = self.storage_dtype
        if storage == "float32":
            return self._float(name, tensor)
        if storage == "int8":
            q, scale = quantize_int8(tensor)  # bit-exact re-quantisation of the loaded values
            stored = self.b.op("Cast", self.b.initializer(name, q.numpy()), to=TensorProto.FLOAT)
            scale = self.b.initializer(f"{name}_scale", scale.numpy()[:, None])
            return self.b.op("Mul", stored, scale)
        if storage == "float16":
            stored = self.b.initializer(name, tensor.detach().cpu().to(torch.float16).numpy())
        else:  # bfloat16
            raw = tensor.detach().cpu().to(torch.bfloat16).contiguous().view(torch.int16).numpy()
            stored = self.b.initializer(name, helper.make_tensor(
                name, TensorProto.BFLOAT16, list(raw.shape), raw.tobytes(), raw=True))
        return self.b.op("Cast", stored, to=TensorProto.FLOAT)

    def _as_stored(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (float32) as the graph stores it: rounded to the storage or export dtype."""
        storage = self.storage_dtype if self.expander else "float32"
        if storage == "int8":
            q, scale = quantize_int8(tensor)
            return q.float() * scale.float().unsqueeze(1)
        stored = tensor.detach().cpu().float()
        if storage in ("float16", "bfloat16"):
            return stored.to(getattr(torch, storage)).float()
        return stored.half().float() if self.dtype == "float16" else stored

    def weight(self, key: str) -> str:
        """The float32 (int64 for the mask) graph value of weight ``key``, created once."""
        if key not in self._weights:
            sae = self.sae
            if key == "indices":
                stored = self.b.initializer("mask_indices", sae.indices.cpu().to(index_dtype(sae.m)).numpy())
                self._weights[key] = self.b.op("Cast", stored, to=TensorProto.INT64)
            elif key == "enc_values":
                if sae.enc_values is None:
                    return self.weight("values")
                self._weights[key] = self._values("enc_values", sae.enc_values)
            elif key == "values":
                self._weights[key] = self._values("values", sae.values)
            elif key == "threshold":  # float32 whatever the graph dtype: pre is compared in float32
                self._weights[key] = self.b.initializer(key, sae.threshold.detach().cpu().float().numpy())
            elif key == "row_norms":  # topafa: decoder row norms of the stored values, computed at export
                rows = self._as_stored(sae.values if self.expander else sae.W_dec)
                self._weights[key] = self.b.initializer(key, rows.norm(dim=1).numpy())
            else:
                self._weights[key] = self._float(key, getattr(sae, key))
        return self._weights[key]

    # ------------------------------------------------------------------ pieces
    def _call(self, function: onnx.FunctionProto, inputs: list[str], outputs: int, **attrs):
        self.functions[function.name] = function
        return self.b.op(function.name, *inputs, outputs=outputs, domain=DOMAIN, **attrs)

    def _flatten(self, name: str, width: int | str) -> tuple[str, str]:
        """``name [..., width]`` as ``[rows, width]`` float32/int64, and its leading shape."""
        lead = self.b.op("Shape", name, start=0, end=-1)
        last = self.b.ints(width) if isinstance(width, int) else self.b.op("Shape", name, start=-1)
        flat = self.b.op("Reshape", name, self.b.op("Concat", self.b.ints(-1), last, axis=0))
        return flat, lead

    def _unflatten(self, name: str, lead: str, out: str, width: int | None = None) -> None:
        last = self.b.ints(width) if width is not None else self.b.op("Shape", name, start=-1)
        self.b.op("Reshape", name, self.b.op("Concat", lead, last, axis=0), outputs=[out])

    def _to_io(self, name: str) -> str:
        return self.b.op("Cast", name, to=TensorProto.FLOAT16) if self.dtype == "float16" else name

    def _from_io(self, name: str) -> str:
        return self.b.op("Cast", name, to=TensorProto.FLOAT) if self.dtype == "float16" else name

    def encode(self, x: str) -> tuple[str, str, str | None, tuple[str, str] | None]:
        """``(top_values, top_indices, overflow or None, (mu, std) or None)`` of flattened float32 ``x [B, m]``."""
        sae, stats = self.sae, None
        if sae.normalize_input:
            x, mu, std = self._call(layer_norm_function(self.opset), [x], 3)
            stats = (mu, std)
        centred = self.b.op("Sub", x, self.weight("b_dec"))
        if self.expander and sae.encoder == "pursuit":
            function = expander_pursuit_function(sae.n, sae.d, self.k, sae.activation, self.opset)
            results = self._call(function, [centred, self.weight("indices"), self.weight("values")], 2, k=self.k,
                                 activation=sae.activation)
            return (*results, None), stats
        gate = (self.weight("row_norms") if sae.activation == "topafa" else self.weight("threshold")
                if self.variable else None)  # the function's fifth input
        if self.expander:
            function = expander_encode_function(sae.m, sae.n, sae.d, self.k, sae.activation,
                                                self.opset, self.layout)
            inputs = [centred, self.weight("indices"), self.weight("enc_values"), self.weight("b_enc")]
            results = self._call(function, inputs + ([gate] if gate else []), 3 if gate else 2,
                                 k=self.k, activation=sae.activation)
            return (*results, None) if gate is None else tuple(results), stats
        pre = self.b.op("Add", self.b.op("MatMul", centred, self.weight("W_enc")), self.weight("b_enc"))
        target = norm_of_rows(self.b, centred) if sae.activation == "topafa" else None
        return select_counted(self.b, pre, self.k, sae.activation, gate, target, sae.n), stats

    def decode(self, values: str, indices: str) -> str:
        """Reconstruction ``[B, m]`` (normalised space) of float32 ``values``, int64 ``indices`` (-1: unused)."""
        if self.expander:
            return self._call(expander_decode_function(self.opset),
                              [values, indices, self.weight("indices"), self.weight("values"),
                               self.weight("b_dec")], 1)
        indices, values = unused_slots_safe(self.b, indices, values)
        rows = self.b.op("Gather", self.weight("W_dec"), indices, axis=0)  # [B, k, m]
        weighted = self.b.op("MatMul", self.b.op("Unsqueeze", values, self.b.ints(1)), rows)
        return self.b.op("Add", self.b.op("Squeeze", weighted, self.b.ints(1)), self.weight("b_dec"))

    def codes(self, values: str, indices: str) -> str:
        """Dense codes ``[B, n]``: zeros with the k kept values added in (-1 slots add 0 at latent 0)."""
        indices, values = unused_slots_safe(self.b, indices, values)
        shape = self.b.op("Concat", self.b.op("Shape", values, start=0, end=1), self.b.ints(self.sae.n), axis=0)
        zeros = self.b.op("ConstantOfShape", shape, value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
        return self.b.op("ScatterElements", zeros, indices, values, axis=1, reduction="add")

    # ------------------------------------------------------------------ graphs
    def model(self, graph: str, dense_output: bool) -> ModelProto:
        sae, b, io = self.sae, self.b, _ELEM[self.dtype]
        inputs, outputs = [], []

        def value(name: str, elem: int, width: int | str) -> onnx.ValueInfoProto:
            return helper.make_tensor_value_info(name, elem, [*self.lead, width])

        if graph in ("encode", "autoencoder"):
            inputs.append(value("activations", io, sae.m))
            flat, lead = self._flatten("activations", sae.m)
            (values, indices, spilled), stats = self.encode(self._from_io(flat))
            if graph == "autoencoder":
                recon = self.decode(values, indices)
                if stats is not None:
                    mu, std = stats
                    recon = b.op("Add", b.op("Mul", recon, std), mu)
                self._unflatten(self._to_io(recon), lead, "reconstruction", sae.m)
                outputs.append(value("reconstruction", io, sae.m))
            self._unflatten(indices, lead, "top_indices", self.k)
            self._unflatten(self._to_io(values), lead, "top_values", self.k)
            outputs += [value("top_indices", TensorProto.INT64, self.k),
                        value("top_values", io, self.k)]
            if dense_output:
                self._unflatten(self._to_io(self.codes(values, indices)), lead, "codes", sae.n)
                outputs.append(value("codes", io, sae.n))
            if spilled is not None:
                b.op("Reshape", spilled, lead, outputs=["overflow"])
                outputs.append(helper.make_tensor_value_info("overflow", TensorProto.INT64, self.lead))
        else:
            inputs += [value("top_indices", TensorProto.INT64, "k"),
                       value("top_values", io, "k")]
            indices, lead = self._flatten("top_indices", "last")
            values, _ = self._flatten("top_values", "last")
            self._unflatten(self._to_io(self.decode(self._from_io(values), indices)), lead,
                            "reconstruction", sae.m)
            outputs.append(value("reconstruction", io, sae.m))
        proto = b.graph(f"saecompress_{graph}", inputs, outputs)
        opsets = [helper.make_opsetid("", self.opset)]
        if self.functions:
            opsets.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
        model = helper.make_model(proto, opset_imports=opsets, ir_version=IR_VERSION,
                                  functions=list(self.functions.values()),
                                  producer_name="saecompress", doc_string=_DOC[graph])
        helper.set_model_props(model, self.metadata(graph, dense_output))
        return model

    def metadata(self, graph: str, dense_output: bool) -> dict[str, str]:
        sae = self.sae
        meta = {"graph": graph, "kind": "expander" if self.expander else "dense", "m": sae.m,
                "n": sae.n, "k": self.k, "activation": sae.activation,
                "normalize_input": str(sae.normalize_input).lower(), "dtype": self.dtype,
                "dense_output": str(dense_output).lower(), "source": dumps(shareable(self.source), sort_keys=True)}
        if self.variable:
            meta["max_l0"] = self.k
        if self.expander:
            meta |= {"d": sae.d, "encoder": sae.encoder, "storage_dtype": self.storage_dtype,
                     "mask_seed": "" if sae.mask_seed is None else sae.mask_seed}
            if graph != "decode" and sae.encoder != "pursuit":
                group = self.layout.group_for(sae.n, self.k, sae.activation)
                meta |= {"layout": f"chunk={self.layout.chunk},group={group},"
                                   f"single_row_branch={str(self.layout.single_row_branch).lower()}"}
        return {METADATA_PREFIX + key: str(value) for key, value in meta.items()}


_DOC = {
    "encode": "saecompress SAE encoder: activations [..., m] -> top_indices [..., k] (int64), top_values [..., k] "
              "(threshold SAEs: k = max_l0, index -1 where fewer fire, overflow [...]).",
    "decode": "saecompress SAE decoder: top_indices, top_values [..., k] -> reconstruction [..., m].",
    "autoencoder": "saecompress SAE: activations [..., m] -> reconstruction [..., m], top_indices, top_values.",
}


__all__ = ["GRAPHS", "DTYPES", "IR_VERSION", "EncodeLayout", "build_onnx", "export_onnx",
           "read_onnx_metadata"]
