"""Prune a dense TopK SAE to an Expander SAE: keep ``d`` decoder entries per latent.

Masks (which ``d`` model dims each latent keeps):

- ``expander``: the seeded expander mask (``mask.expander_mask``); only the seed is stored.
- ``topd``: each latent's ``d`` largest-|w| decoder entries (data-aware; explicit indices).
- ``search``: ``search_seeds`` expander seeds ``seed, seed+1, …``; keeps the seed whose mask
  keeps the most decoder energy (data-aware choice, seed-only storage).

Decoder values are the dense decoder entries on the mask: for each latent, ``s·P(w)`` (``P``: keep
the ``d`` masked entries) is closest to the dense row ``w`` at ``s = 1``, so no rescaling (restoring
the row's norm instead makes the kept entries overshoot). The encoder is ``untied`` (the default:
the dense encoder's entries on the same support) or tied (the decoder's values). Biases,
activation ordering and input normalisation are carried over.

The defaults (``topd`` mask, untied encoder) are the recipe that keeps the most of the dense SAE.
``calibrate`` fits, on activations, one reconstruction scale and the output bias by least squares;
``encode`` stays the same (tied: up to the same positive factor), so the fit can only lower the
error on those rows, to at most predicting their mean (FVU ≤ 1).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .activations import ActivationSource, open_activations
from .compact import STORAGE_DTYPES, dense_values, learned_values, load_compact, save_compact, with_metrics
from ._io import check_outputs, output_errors
from .errors import SaeCompressError
from .formats import list_hookpoints, read_sae
from .mask import expander_mask
from .models import ENCODERS, ExpanderSAE, TopKSAE, layer_norm
from .sources import HubAccess, resolve

MASKS = ("expander", "topd", "search")
DEFAULT_D = 7
DEFAULT_MASK = "topd"
DEFAULT_ENCODER = "untied"
# A conversion whose FVU on --acts exceeds its source's by more than this needs `train --init` / `finetune`.
FVU_MARGIN = 0.1
_ROW_CHUNK = 8192  # decoder rows per chunk for |W| top-d (bounds the temporary to chunk × m)


def _decoder(dense: TopKSAE) -> torch.Tensor:
    return dense.W_dec.detach().to(torch.float32)


def kept_energy(dense: TopKSAE, indices: torch.Tensor) -> float:
    """Fraction of the decoder's squared Frobenius norm on the mask ``indices [n, d]``."""
    W = _decoder(dense)
    total = float(W.norm(dim=1).double().pow(2).sum())
    kept = float(W.gather(1, indices).double().pow(2).sum())
    return kept / total if total > 0 else 0.0


def topd_indices(W_dec: torch.Tensor, d: int) -> torch.Tensor:
    """Each row's ``d`` largest-|w| columns, ascending, ``[n, d]`` int64."""
    parts = [chunk.abs().topk(d, dim=1).indices for chunk in W_dec.split(_ROW_CHUNK)]
    return torch.cat(parts).sort(dim=1).values


def search_seed(W_dec: torch.Tensor, d: int, seeds: range) -> tuple[int, float]:
    """``(seed, kept squared norm)`` of the expander seed in ``seeds`` keeping the most decoder energy.

    Each candidate costs one mask and one ``[n, d]`` gather — no ``[n, m]`` temporary. Ties go to
    the smallest seed.
    """
    n, m = W_dec.shape
    best_seed, best = seeds[0], -1.0
    for seed in seeds:
        idx = torch.from_numpy(expander_mask(m, n, d, seed))
        energy = float(W_dec.gather(1, idx).double().pow(2).sum())
        if energy > best:
            best_seed, best = seed, energy
    return best_seed, best


@torch.no_grad()
def convert(dense: TopKSAE, d: int, *, mask: str = DEFAULT_MASK, seed: int = 0, search_seeds: int = 64,
            encoder: str = DEFAULT_ENCODER) -> ExpanderSAE:
    """Project ``dense`` onto a ``d``-per-latent mask; returns the ``ExpanderSAE``.

    ``sae.metadata["conversion"]`` records the mask strategy and the kept decoder energy.
    """
    if not isinstance(dense, TopKSAE):
        raise SaeCompressError(f"convert needs a dense TopKSAE, got {type(dense).__name__}")
    if mask not in MASKS:
        raise SaeCompressError(f"unknown mask {mask!r}; use one of {', '.join(MASKS)}")
    if encoder not in ENCODERS:
        raise SaeCompressError(f"unknown encoder {encoder!r}; use tied or untied")
    if not isinstance(d, int) or not 1 <= d <= dense.m:
        raise SaeCompressError(f"--d {d} must be between 1 and the model dim m={dense.m}")
    if search_seeds < 1:
        raise SaeCompressError(f"--search-seeds must be at least 1, got {search_seeds}")
    W = _decoder(dense)
    common = dict(activation=dense.activation, encoder=encoder, normalize_input=dense.normalize_input)
    if mask == "topd":
        sae = ExpanderSAE(dense.m, dense.n, d, dense.k, indices=topd_indices(W, d), **common)
    else:
        if mask == "search":
            seed = search_seed(W, d, range(seed, seed + search_seeds))[0]
        sae = ExpanderSAE(dense.m, dense.n, d, dense.k, seed=seed, **common)
    sae.values.copy_(W.gather(1, sae.indices))
    if sae.enc_values is not None:
        sae.enc_values.copy_(dense.W_enc.detach().to(torch.float32).T.gather(1, sae.indices))
    sae.b_enc.copy_(dense.b_enc.detach())
    sae.b_dec.copy_(dense.b_dec.detach())
    sae.provenance = dict(dense.provenance)
    sae.metadata = {"conversion": {"mask": mask, "d": d, "kept_energy": kept_energy(dense, sae.indices),
                                   **({"search_seeds": search_seeds} if mask == "search" else {})}}
    return sae


@torch.no_grad()
def calibrate(sae: ExpanderSAE, source: ActivationSource, *, batch_size: int = 4096,
              max_rows: int | None = None) -> float:
    """Fit ``x̂ = b + c·r`` (``r``: the decode without ``b_dec``) to ``source`` by least squares, in place.

    In the SAE's input space (after its layer norm, if any) over the first ``max_rows`` rows:
    ``c = cov(x, r) / var(r)`` (clipped at 0), ``b = mean(x) − c·mean(r)``. Decoder values are
    scaled by ``c`` (tied: values and ``b_enc`` by ``√c``, which keeps the top-k choice) and
    ``b_dec`` becomes ``b``, with ``b_enc`` shifted by ``<e_i, Δb>`` so every pre-activation, hence
    the code, is unchanged. ``c = 0`` predicts the mean, so the fitted error is at most the
    variance. Returns ``c``.
    """
    if max_rows is not None:
        source = source.select(0, min(max_rows, source.num_rows))
    if source.num_rows < 2:
        raise SaeCompressError(f"{source.path}: calibrating needs at least 2 activation rows")
    sums = torch.zeros(2, sae.m, dtype=torch.float64)  # Σx, Σr
    xr = rr = 0.0
    for x in source.iter_batches(batch_size):
        x = (layer_norm(x)[0] if sae.normalize_input else x).to(sae.b_dec.dtype)
        values, indices = sae._encode_topk(x - sae.b_dec)
        r = (sae._decode(values, indices) - sae.b_dec).double()
        x = x.double()
        sums += torch.stack([x.sum(0), r.sum(0)])
        xr += float((x * r).sum())
        rr += float((r * r).sum())
    rows = source.num_rows
    mean_x, mean_r = sums / rows
    var_r = rr - rows * float(mean_r @ mean_r)
    c = max(0.0, (xr - rows * float(mean_x @ mean_r)) / var_r) if var_r > 0 else 0.0
    enc_scale = 1.0 if sae.enc_values is not None else math.sqrt(c)
    shift = (mean_x - c * mean_r).to(sae.b_dec.dtype) - sae.b_dec
    sae.b_enc.add_((sae.encoder_values * shift[sae.indices]).sum(1)).mul_(enc_scale)
    sae.values.mul_(c / enc_scale if enc_scale > 0 else 0.0)
    sae.b_dec.add_(shift)
    sae.metadata.setdefault("conversion", {})["calibration"] = {"scale": c, "rows": rows}
    return c


@dataclass
class ConvertReport:
    """What one conversion kept and cost; ``to_dict`` is the ``--json`` object.

    ``needs_training``: the result should be retrained (``train --init``) and fine-tuned before
    use — always when it was not measured (no ``acts``), else when its FVU exceeds the source's
    by more than ``FVU_MARGIN``; ``advice`` says so in words.
    """

    source_format: str | None
    hookpoint: str | None
    m: int
    n: int
    d: int
    k: int
    activation: str
    mask: str
    mask_seed: int | None
    encoder: str
    dtype: str
    kept_energy: float
    dense_values: int
    learned_values: int
    storage_ratio: float
    convert_seconds: float
    needs_training: bool = True
    advice: str = ""
    calibration_scale: float | None = None
    file_bytes: int | None = None
    source_bytes: int | None = None
    compression_ratio: float | None = None
    num_rows: int | None = None
    fvu_source: float | None = None
    fvu: float | None = None
    l0_source: float | None = None
    l0: float | None = None
    dead_fraction_source: float | None = None
    dead_fraction: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict."""
        return asdict(self)


def conversion_report(dense: TopKSAE, sparse: ExpanderSAE, *, source_format: str | None = None,
                      mask: str | None = None, dtype: str = "float32", seconds: float = 0.0,
                      acts: Any = None, batch_size: int = 4096, max_rows: int | None = None) -> ConvertReport:
    """Kept energy and storage of ``sparse`` vs ``dense``; with ``acts`` (path or ActivationSource) also
    FVU, L0 and dead fraction of both (via ``saecompress.metrics.evaluate``), and the verdict
    ``needs_training`` / ``advice``.

    ``storage_ratio`` counts values (dense ``2mn + m + n`` vs learned ``nd (+nd untied) + n + m``);
    ``compression_ratio`` (set by ``convert_path``) compares bytes on disk, indices included.
    """
    learned = learned_values(sparse.m, sparse.n, sparse.d, sparse.encoder)
    conversion = sparse.metadata.get("conversion", {})
    report = ConvertReport(
        source_format=source_format, hookpoint=dense.provenance.get("hookpoint"), m=sparse.m, n=sparse.n,
        d=sparse.d, k=sparse.k, activation=sparse.activation,
        mask=mask or conversion.get("mask", "explicit"), mask_seed=sparse.mask_seed,
        encoder=sparse.encoder, dtype=dtype, kept_energy=kept_energy(dense, sparse.indices),
        dense_values=dense_values(dense.m, dense.n), learned_values=learned,
        storage_ratio=dense_values(dense.m, dense.n) / learned, convert_seconds=seconds,
        calibration_scale=conversion.get("calibration", {}).get("scale"),
    )
    if acts is not None:
        from .metrics import evaluate

        source = open_activations(acts) if isinstance(acts, (str, os.PathLike)) else acts
        before = evaluate(dense, source, batch_size=batch_size, max_rows=max_rows)
        after = evaluate(sparse, source, batch_size=batch_size, max_rows=max_rows)
        report.num_rows = after["num_rows"]
        report.fvu_source, report.fvu = before["fvu"], after["fvu"]
        report.l0_source, report.l0 = before["l0"], after["l0"]
        report.dead_fraction_source, report.dead_fraction = before["dead_fraction"], after["dead_fraction"]
    report.needs_training, report.advice = _verdict(report)
    return report


def _verdict(report: ConvertReport) -> tuple[bool, str]:
    """``(needs_training, advice)`` for a finished report (see ``ConvertReport``)."""
    retrain = ("retrain it with `saecompress train --acts ACTS --init OUT --out RETRAINED`, then "
               "`saecompress finetune RETRAINED ...`, before use")
    if report.mask == "imported":
        return False, "exact import of an Expander SAE checkpoint"
    if report.fvu is None:
        return True, (f"not measured: pass --acts to measure FVU; a converted SAE at d={report.d} usually "
                      f"needs training: {retrain}")
    if report.fvu_source is None or not report.fvu <= report.fvu_source + FVU_MARGIN:
        return True, f"FVU {report.fvu:.4f} against the source's {report.fvu_source:.4f}: {retrain}"
    return False, f"FVU {report.fvu:.4f} is within {FVU_MARGIN} of the source's {report.fvu_source:.4f}"


def source_bytes(path: Path) -> int:
    """Bytes of a source SAE: the file, or the files directly in its folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _output_name(hookpoint: str) -> str:
    stem = hookpoint.removesuffix(".pt").removesuffix(".pth").removesuffix(".ckpt")
    return stem.replace("/", "__") + ".safetensors"


def _convert_one(src: Path, out: Path, hookpoint: str | None, *, d: int | None, mask: str | None, seed: int,
                 search_seeds: int, encoder: str | None, dtype: str, acts: Any, calibrate_on_acts: bool,
                 k: int | None, batch_size: int, max_rows: int | None) -> ConvertReport:
    native = read_sae(src, hookpoint, k=k)
    if k is not None and native.provenance.get("library") != "paper":
        raise SaeCompressError(f"--k is only for Expander-SAE paper checkpoints; this {native.provenance.get('library')} "
                               f"SAE stores its own k={native.k} (drop --k)")
    start = time.perf_counter()
    if isinstance(native, ExpanderSAE) and d in (None, native.d) and mask is None and encoder in (None, "tied"):
        sparse, dense, used_mask = native, native.to_dense(), "imported"
    else:
        dense = native.to_dense() if isinstance(native, ExpanderSAE) else native
        used_mask = mask or DEFAULT_MASK
        sparse = convert(dense, DEFAULT_D if d is None else d, mask=used_mask, seed=seed,
                         search_seeds=search_seeds, encoder=encoder or DEFAULT_ENCODER)
        if acts is not None and calibrate_on_acts:
            acts = open_activations(acts) if isinstance(acts, (str, os.PathLike)) else acts
            calibrate(sparse, acts, batch_size=batch_size, max_rows=max_rows)
    seconds = time.perf_counter() - start
    stored = sparse
    if acts is not None and dtype != "float32":  # measure fidelity at the stored precision
        with tempfile.TemporaryDirectory() as tmp:
            stored = load_compact(save_compact(sparse, Path(tmp) / "stored.safetensors", dtype=dtype))
    report = conversion_report(dense, stored, source_format=native.provenance.get("library"), mask=used_mask,
                               dtype=dtype, seconds=seconds, acts=acts, batch_size=batch_size, max_rows=max_rows)
    metrics = {key: value for key, value in report.to_dict().items()
               if value is not None and key not in ("convert_seconds", "file_bytes", "advice")}
    measured = {key: metrics[key] for key in ("fvu", "l0", "dead_fraction", "num_rows") if key in metrics}
    save_compact(sparse, out, dtype=dtype, metadata=with_metrics({**sparse.metadata, "convert": metrics}, measured))
    report.file_bytes = out.stat().st_size
    report.source_bytes = source_bytes(Path(native.provenance["path"]))
    report.compression_ratio = report.source_bytes / report.file_bytes
    return report


def convert_path(src: str | os.PathLike, out: str | os.PathLike, *, hookpoint: str | None = None,
                 d: int | None = None, mask: str | None = None, seed: int | None = None,
                 search_seeds: int | None = None, encoder: str | None = None, dtype: str = "float32",
                 acts: str | os.PathLike | None = None, calibrate_on_acts: bool = True, k: int | None = None,
                 batch_size: int = 4096, max_rows: int | None = None, hub: HubAccess | None = None,
                 progress: bool = True) -> list[ConvertReport]:
    """Convert the SAE(s) at ``src`` into compact file(s) at ``out``; the library form of ``saecompress convert``.

    ``src``: a local file/folder in any layout of ``saecompress.formats`` (or an ``hf://`` URI).
    Without ``hookpoint``, a source holding many hookpoints converts all of them into the folder
    ``out`` (one ``<hookpoint>.safetensors`` each, ``/`` written as ``__``); otherwise ``out`` is
    one file. ``d``/``mask``/``encoder`` default to 7/``topd``/``untied``; an Expander-SAE paper
    checkpoint given none of them is imported exactly. ``acts`` (single SAE only) first ``calibrate``s
    the result on those rows (unless ``calibrate_on_acts=False``), then adds FVU/L0/dead metrics of
    source and result. ``seed`` (default 0) and ``search_seeds`` (default 64) apply only to the
    masks that use them, ``k`` only to paper checkpoints and ``max_rows`` only with ``acts``: given
    elsewhere they are refused, not ignored. ``hub`` says where ``hf://`` sources come from.
    ``out`` is checked before any work (it must not be, hold or lie inside ``src`` or ``acts``: see
    ``_io.check_outputs``); an existing file of the same name is replaced. Nothing is written
    unless every conversion succeeds.
    """
    if dtype not in STORAGE_DTYPES:
        raise SaeCompressError(f"unknown --dtype {dtype!r}; use one of {', '.join(STORAGE_DTYPES)}")
    if mask is not None and mask not in MASKS:
        raise SaeCompressError(f"unknown --mask {mask!r}; use one of {', '.join(MASKS)}")
    used_mask = mask or DEFAULT_MASK
    if seed is not None and used_mask == "topd":
        raise SaeCompressError("--seed picks an expander mask; --mask topd has none (give --mask expander or search)")
    if search_seeds is not None and used_mask != "search":
        raise SaeCompressError(f"--search-seeds is for --mask search, not --mask {used_mask}")
    if max_rows is not None and acts is None:
        raise SaeCompressError("--max-rows limits the rows of --acts; give --acts too")
    seed, search_seeds = seed or 0, 64 if search_seeds is None else search_seeds
    check_outputs([out], [src, acts])
    local, hookpoint = resolve(src, hookpoint, hub)
    out = Path(out)
    options = dict(d=d, mask=mask, seed=seed, search_seeds=search_seeds, encoder=encoder, dtype=dtype, k=k,
                   batch_size=batch_size, max_rows=max_rows, calibrate_on_acts=calibrate_on_acts)
    hookpoints = [hookpoint] if hookpoint else list_hookpoints(local)
    if hookpoints == [""] or hookpoint:
        if out.is_dir():
            raise SaeCompressError(f"{out} is a folder; give a file name like {out / 'sae.safetensors'}")
        return [_convert_one(local, out, hookpoint, acts=acts, **options)]
    if acts is not None:
        raise SaeCompressError(
            f"{local} holds {len(hookpoints)} hookpoints; --acts evaluates one SAE, so pick it with --hookpoint"
        )
    if out.suffix == ".safetensors" or (out.exists() and not out.is_dir()):
        raise SaeCompressError(f"{src} holds {len(hookpoints)} hookpoints ({', '.join(hookpoints[:5])}"
                               f"{', …' if len(hookpoints) > 5 else ''}): pass --hookpoint to convert one into "
                               f"{out}, or give a folder as OUT to convert them all")
    with output_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with output_errors(out):  # names OUT, never the staging folder
            reports = [_convert_one(local, staging / _output_name(hp), hp, acts=None, **options)
                       for hp in tqdm(hookpoints, desc="convert", unit="sae", disable=not progress)]
            out.mkdir(exist_ok=True)
            for hp in hookpoints:
                os.replace(staging / _output_name(hp), out / _output_name(hp))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return reports
