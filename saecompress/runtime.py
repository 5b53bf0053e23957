"""The onnxruntime monitor: encode activations next to a served LLM and raise alerts on features.

``Monitor(model)`` takes an exported ``.onnx`` file, any SAE source ``saecompress.load`` accepts
(compact file, dense SAE, ``hf://`` URI; exported in memory as an autoencoder graph) or an SAE
object. It runs on ``CUDAExecutionProvider`` when onnxruntime-gpu is installed and a GPU is usable,
else on CPU; ``monitor.provider`` is the provider the session really uses (onnxruntime-gpu falls
back to CPU silently when CUDA is missing, so it is read from ``session.get_providers()``).

Rows holding NaN or Inf are skipped (never sent to onnxruntime): ``encode`` gives them index -1
and value NaN, ``reconstruct`` NaN, ``scan`` no alerts; ``monitor.skipped_rows`` lists them.

Threshold SAEs (``jumprelu``, ``batchtopk``) keep at most ``k`` = max_l0 latents per row (slots
that did not fire: index -1, value 0); ``monitor.overflow`` holds each row's latents beyond the cap
(last call) and ``overflow_rows`` / ``overflow_latents`` count them over the monitor's life.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arrays import array_files
from .errors import SaeCompressError, first_line
from .exporters.metadata import read_onnx_metadata
from .kinds import VARIABLE_COUNT

BACKENDS = ("onnxruntime", "torch")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class Alert:
    """A watched feature firing at or above its threshold: flat row index, feature id, value."""

    row: int
    feature: int
    value: float


def choose_providers(requested: list[str] | None = None, available: list[str] | None = None) -> list[str]:
    """Execution providers to ask for: ``requested`` (checked), else CUDA then CPU when CUDA is offered."""
    import onnxruntime as ort

    available = list(ort.get_available_providers() if available is None else available)
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise SaeCompressError(
                f"execution provider {', '.join(missing)} is not available (this onnxruntime offers "
                f"{', '.join(available)}); install onnxruntime-gpu for CUDA (saecompress[gpu])")
        return list(requested)
    return [CUDA, CPU] if CUDA in available else [CPU]


def _load_model_bytes(model, hookpoint: str | None = None, hub=None, max_l0: int | None = None) -> bytes:
    """Serialized ONNX for ``model``: an .onnx file's bytes, or an in-memory autoencoder export."""
    if isinstance(model, (str, os.PathLike)) and str(model).endswith(".onnx"):
        path = Path(model)
        if not path.is_file():
            raise SaeCompressError(f"{path}: no such ONNX file")
        if hookpoint:
            raise SaeCompressError(f"{path}: an ONNX file holds one SAE; --hookpoint selects one of a multi-SAE "
                                   "source (drop it)")
        if max_l0 is not None:
            raise SaeCompressError(f"{path}: an exported file's max_l0 is fixed; drop --max-l0 or re-export "
                                   "with `saecompress export --max-l0`")
        return path.read_bytes()
    from .exporters.onnx import build_onnx  # exporting needs torch; running an .onnx file does not
    from .models import ExpanderSAE, TopKSAE
    from .sources import load_source

    if isinstance(model, (ExpanderSAE, TopKSAE)):
        return build_onnx(model, "autoencoder", max_l0=max_l0).SerializeToString()
    loaded = load_source(model, hookpoint, hub=hub)
    return build_onnx(loaded.model, "autoencoder", storage_dtype=loaded.storage_dtype,
                      source=loaded.provenance, max_l0=max_l0).SerializeToString()


class Monitor:
    """Encode / reconstruct activations with onnxruntime and raise alerts on watched features.

    ``batch_size`` rows go to onnxruntime per call; ``threads`` sets intra-op threads (default:
    onnxruntime's choice); ``providers`` forces execution providers (default: CUDA if usable, else CPU).
    ``hookpoint`` and ``hub`` (a ``sources.HubAccess``) pick the SAE of a source, as for ``saecompress.load``;
    ``max_l0`` caps a threshold SAE exported in memory (as ``build_onnx``). ``backend="torch"`` runs the SAE
    itself with torch on ``device`` (default: cuda when available), for a service that already holds torch
    and a GPU next to its LLM; the outputs are the graphs' (unfired slots -1, overflow counted).
    """

    def __init__(self, model, providers: list[str] | None = None, batch_size: int = 512,
                 threads: int | None = None, hookpoint: str | None = None, hub=None,
                 max_l0: int | None = None, backend: str = "onnxruntime", device: str | None = None) -> None:
        if batch_size < 1:
            raise SaeCompressError(f"batch_size must be >= 1, got {batch_size}")
        if backend not in BACKENDS:
            raise SaeCompressError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        self.batch_size = int(batch_size)
        if backend == "torch":
            if providers:
                raise SaeCompressError("providers choose onnxruntime's execution providers; the torch backend runs "
                                       "on device= (default: cuda when available)")
            meta = self._start_torch(model, hookpoint, hub, max_l0, device, threads)
        else:
            if device is not None:
                raise SaeCompressError("device= is for backend='torch'; onnxruntime takes providers=")
            meta = self._start_onnxruntime(model, providers, hookpoint, hub, max_l0, threads)
        self.graph = meta["graph"]
        if self.graph == "decode":
            raise SaeCompressError(f"{model}: a decode-only graph cannot monitor activations; "
                                   "export --graph encode or autoencoder")
        self.m, self.n, self.k = int(meta["m"]), int(meta["n"]), int(meta["k"])
        self.metadata = meta
        self.variable_count = meta.get("activation") in VARIABLE_COUNT
        self._thresholds = np.full(self.n, np.inf, dtype=np.float32)
        self.watched: dict[int, float] = {}
        self.skipped_rows: np.ndarray = np.zeros(0, dtype=np.int64)
        self.overflow: np.ndarray = np.zeros(0, dtype=np.int64)
        self.overflow_rows = self.overflow_latents = 0

    def _start_onnxruntime(self, model, providers, hookpoint, hub, max_l0, threads) -> dict[str, str]:
        import onnxruntime as ort

        data = _load_model_bytes(model, hookpoint, hub, max_l0)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3  # onnxruntime-gpu without CUDA: fall back quietly, we report it
        wanted = choose_providers(providers)
        try:
            self.session = ort.InferenceSession(data, options, providers=wanted)
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            raise SaeCompressError(f"{model}: onnxruntime cannot load this model "
                                   f"({first_line(err)[:200]}); re-export it with `saecompress export`") from None
        self.provider = self.session.get_providers()[0]
        if providers and self.provider != providers[0]:
            raise SaeCompressError(f"{providers[0]} was requested but onnxruntime runs on {self.provider} "
                                   "(CUDA/cuDNN libraries missing or no GPU); drop --provider to use CPU")
        meta = read_onnx_metadata(self.session.get_modelmeta().custom_metadata_map)
        if "graph" not in meta:
            raise SaeCompressError(f"{model}: not an ONNX file exported by saecompress (no saecompress.* "
                                   "metadata); export it with `saecompress export`")
        first = self.session.get_inputs()[0]
        self._input_rank = len(first.shape)
        self._input_dtype = np.float16 if "float16" in first.type else np.float32
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._forward = lambda names, batch: self.session.run(names, {first.name: batch})
        return meta

    def _start_torch(self, model, hookpoint, hub, max_l0, device, threads) -> dict[str, str]:
        import torch

        from .exporters.onnx import kept_latents
        from .models import ExpanderSAE, TopKSAE, active_counts
        from .sources import load_source

        if isinstance(model, (str, os.PathLike)) and str(model).endswith(".onnx"):
            raise SaeCompressError(f"{model}: the torch backend runs an SAE (compact file, dense SAE, hf://…), not "
                                   "an ONNX graph; give the SAE, or use backend='onnxruntime'")
        sae = model if isinstance(model, (ExpanderSAE, TopKSAE)) else load_source(model, hookpoint, hub=hub).model
        if sae.activation == "topafa":
            raise SaeCompressError("the torch backend does not count top-AFA's overflow yet; use backend='onnxruntime'")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise SaeCompressError(f"device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise SaeCompressError(f"device {device!r}: torch sees no CUDA GPU here; use --device cpu")
        if threads is not None:
            torch.set_num_threads(int(threads))
        sae = copy.deepcopy(sae).float().eval().to(device)
        sae.k = kept_latents(sae, max_l0)
        variable = sae.activation in VARIABLE_COUNT

        @torch.inference_mode()
        def forward(names: list[str], batch: np.ndarray) -> list[np.ndarray]:
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
            recon, values, indices = sae.reconstruct(x)
            if variable:  # as the graphs: unfired slots -1 / 0, the latents beyond the cap counted
                indices = torch.where(values != 0, indices, -1)
            out = {"top_indices": indices, "top_values": values, "reconstruction": recon}
            if variable and "overflow" in names:
                out["overflow"] = (active_counts(sae, x)[0].to(device) - sae.k).clamp_min(0)
            return [out[name].cpu().numpy() for name in names]

        self.provider = f"torch:{device}"
        self._input_rank, self._input_dtype = 2, np.float32
        self._outputs = ["reconstruction", "top_indices", "top_values"]
        self._forward = forward
        return {"graph": "autoencoder", "m": str(sae.m), "n": str(sae.n), "k": str(sae.k),
                "activation": sae.activation}

    def __repr__(self) -> str:
        return f"Monitor(graph={self.graph}, m={self.m}, n={self.n}, k={self.k}, provider={self.provider})"

    # ------------------------------------------------------------------ input handling
    def _rows(self, x) -> tuple[np.ndarray, tuple[int, ...], np.ndarray]:
        """``x`` as ``[rows, m]`` in the model's dtype, its leading shape, and a finite-row mask."""
        if hasattr(x, "detach"):  # a torch tensor
            x = x.detach().cpu().float().numpy() if x.dtype.is_floating_point else x.detach().cpu().numpy()
        x = np.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self.m:
            raise SaeCompressError(f"activations have shape {list(x.shape)} but this SAE expects [..., {self.m}]; "
                                   "use the SAE trained for this model and hookpoint")
        if not np.issubdtype(x.dtype, np.floating):
            raise SaeCompressError(f"activations have dtype {x.dtype}; expected floating point "
                                   "(float16/float32/float64)")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.m)
        finite = np.isfinite(flat).all(axis=1)
        self.skipped_rows = np.flatnonzero(~finite)
        return flat, lead, finite

    def _run(self, flat: np.ndarray, finite: np.ndarray, names: list[str]) -> list[np.ndarray]:
        """Run ``names`` outputs over the finite rows of ``flat`` in batches; skipped rows stay unset."""
        good = np.flatnonzero(finite)
        results: list[np.ndarray] | None = None
        for start in range(0, len(good), self.batch_size):
            rows = good[start:start + self.batch_size]
            batch = flat[rows].astype(self._input_dtype, copy=False)
            if self._input_rank == 3:
                batch = batch[None]
            outs = self._forward(names, batch)
            if results is None:
                results = [np.empty((len(flat), *o.shape[self._input_rank - 1:]), dtype=_wide(o.dtype)) for o in outs]
            for result, out in zip(results, outs):
                result[rows] = out.reshape(len(rows), *out.shape[self._input_rank - 1:])
        return results if results is not None else []

    # ------------------------------------------------------------------ public API
    def encode(self, x) -> tuple[np.ndarray, np.ndarray]:
        """``(top_indices [..., k] int64, top_values [..., k] float32)``; skipped rows: -1 / NaN.
        A threshold SAE's slots that did not fire are -1 / 0; its overflow per row goes to
        ``overflow`` (leading shape of ``x``) and the counters."""
        flat, lead, finite = self._rows(x)
        indices = np.full((len(flat), self.k), -1, dtype=np.int64)
        values = np.full((len(flat), self.k), np.nan, dtype=np.float32)
        spilled = np.zeros(len(flat), dtype=np.int64)
        out = self._run(flat, finite, ["top_indices", "top_values"] + (["overflow"] if self.variable_count else []))
        if out:
            indices[finite], values[finite] = out[0][finite], out[1][finite]
            if self.variable_count:
                spilled[finite] = out[2][finite]
        self.overflow = spilled.reshape(lead)
        self.overflow_rows += int((spilled > 0).sum())
        self.overflow_latents += int(spilled.sum())
        return indices.reshape(*lead, self.k), values.reshape(*lead, self.k)

    def reconstruct(self, x) -> np.ndarray:
        """Reconstruction ``[..., m]`` (float32; skipped rows NaN). Needs an autoencoder graph."""
        if "reconstruction" not in self._outputs:
            raise SaeCompressError("this ONNX file has no reconstruction output; export it with "
                                   "`saecompress export --graph autoencoder` (or give the compact file)")
        flat, lead, finite = self._rows(x)
        recon = np.full((len(flat), self.m), np.nan, dtype=np.float32)
        out = self._run(flat, finite, ["reconstruction"])
        if out:
            recon[finite] = out[0][finite]
        return recon.reshape(*lead, self.m)

    def watch(self, thresholds: dict[int, float]) -> Monitor:
        """Watch features: ``scan`` alerts when feature ``f`` is active with value ≥ ``thresholds[f]``."""
        for feature, threshold in thresholds.items():
            feature, threshold = int(feature), float(threshold)
            if not 0 <= feature < self.n:
                raise SaeCompressError(f"feature {feature} does not exist; this SAE has features 0..{self.n - 1}")
            if not np.isfinite(threshold):
                raise SaeCompressError(f"threshold for feature {feature} must be a finite number, got {threshold}")
            self.watched[feature] = threshold
            self._thresholds[feature] = threshold
        return self

    def scan(self, x) -> list[Alert]:
        """Alerts for watched features, in row order then descending value (skipped rows: none)."""
        if not self.watched:
            raise SaeCompressError("no features are watched; call watch({feature: threshold}) first")
        indices, values = self.encode(x)
        indices, values = indices.reshape(-1, self.k), values.reshape(-1, self.k)
        safe = np.where(indices >= 0, indices, 0)
        hits = (indices >= 0) & (values >= self._thresholds[safe])
        rows, slots = np.nonzero(hits)
        order = np.lexsort((-values[rows, slots], rows))
        return [Alert(int(rows[i]), int(indices[rows[i], slots[i]]), float(values[rows[i], slots[i]]))
                for i in order]


def _wide(dtype: np.dtype) -> np.dtype:
    return np.float32 if dtype == np.float16 else dtype



def read_activation_arrays(source: str | os.PathLike, stdin=None, chunk_rows: int = 65536):
    """Yield float arrays ``[..., m]``: ``[rows, m]`` chunks of any activation source
    ``arrays.array_files`` reads (memory-mapped), or the arrays of a stream of ``.npy`` arrays
    (``source == "-"``: read ``stdin``, a binary stream, until EOF).

    Unlike training readers this keeps NaN/Inf rows: the monitor reports and skips them.
    """
    if str(source) == "-":
        yield from _npy_stream(stdin)
        return
    for file in array_files(source)[0]:
        for start in range(0, file.rows, chunk_rows):
            yield file.floats(start, min(start + chunk_rows, file.rows))


def _npy_stream(stream):
    """Consecutive ``.npy`` arrays from a buffered binary stream (no seeking: works on pipes)."""
    if not hasattr(stream, "peek"):
        import io

        stream = io.BufferedReader(stream)
    from numpy.lib import format as npy

    count = 0
    reader = _Reader(stream)  # not a "real file" to numpy: it must not seek or tell on a pipe
    while stream.peek(1):
        try:
            array = npy.read_array(reader, allow_pickle=False)
        except (ValueError, EOFError) as err:
            raise SaeCompressError(f"stdin: array {count} is not a valid .npy array ({err}); "
                                   "write each array with numpy.save to the stream") from None
        yield array
        count += 1


class _Reader:
    """A read-only view of a binary stream exposing only ``read``."""

    def __init__(self, stream) -> None:
        self.read = stream.read


__all__ = ["Alert", "Monitor", "choose_providers", "read_activation_arrays"]
