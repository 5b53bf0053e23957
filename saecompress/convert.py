"""Prune a dense TopK SAE to an Expander SAE: keep ``d`` decoder entries per latent.

Masks (which ``d`` model dims each latent keeps):

- ``expander``: the seeded expander mask (``mask.expander_mask``); only the seed is stored.
- ``topd``: each latent's ``d`` largest-|w| decoder entries (data-aware; explicit indices).
- ``search``: ``search_seeds`` expander seeds ``seed, seed+1, …``; keeps the seed whose mask
  keeps the most decoder energy (data-aware choice, seed-only storage).

Values are the dense decoder entries on the mask, rescaled so each latent keeps its decoder-row
norm. The encoder is tied (same values), or ``untied``: the dense encoder's entries on the same
support. Biases, activation ordering and input normalisation are carried over unchanged.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .compact import STORAGE_DTYPES, dense_values, learned_values, load_compact, save_compact
from ._io import check_outputs, output_errors
from .errors import SaeCompressError
from .formats import list_hookpoints, read_sae
from .mask import expander_mask
from .models import ENCODERS, ExpanderSAE, TopKSAE
from .sources import resolve

MASKS = ("expander", "topd", "search")
DEFAULT_D = 7
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
def convert(dense: TopKSAE, d: int, *, mask: str = "expander", seed: int = 0, search_seeds: int = 64,
            encoder: str = "tied") -> ExpanderSAE:
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
    kept = W.gather(1, sae.indices)
    kept_norm = kept.norm(dim=1, keepdim=True)
    scale = torch.where(kept_norm > 0, W.norm(dim=1, keepdim=True) / kept_norm, torch.zeros_like(kept_norm))
    sae.values.copy_(kept * scale)
    if sae.enc_values is not None:
        sae.enc_values.copy_(dense.W_enc.detach().to(torch.float32).T.gather(1, sae.indices))
    sae.b_enc.copy_(dense.b_enc.detach())
    sae.b_dec.copy_(dense.b_dec.detach())
    sae.provenance = dict(dense.provenance)
    sae.metadata = {"conversion": {"mask": mask, "d": d, "kept_energy": kept_energy(dense, sae.indices),
                                   **({"search_seeds": search_seeds} if mask == "search" else {})}}
    return sae


@dataclass
class ConvertReport:
    """What one conversion kept and cost; ``to_dict`` is the ``--json`` object."""

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
    FVU, L0 and dead fraction of both (via ``saecompress.metrics.evaluate``).

    ``storage_ratio`` counts values (dense ``2mn + m + n`` vs learned ``nd (+nd untied) + n + m``);
    ``compression_ratio`` (set by ``convert_path``) compares bytes on disk, indices included.
    """
    learned = learned_values(sparse.m, sparse.n, sparse.d, sparse.encoder)
    report = ConvertReport(
        source_format=source_format, hookpoint=dense.provenance.get("hookpoint"), m=sparse.m, n=sparse.n,
        d=sparse.d, k=sparse.k, activation=sparse.activation,
        mask=mask or sparse.metadata.get("conversion", {}).get("mask", "explicit"), mask_seed=sparse.mask_seed,
        encoder=sparse.encoder, dtype=dtype, kept_energy=kept_energy(dense, sparse.indices),
        dense_values=dense_values(dense.m, dense.n), learned_values=learned,
        storage_ratio=dense_values(dense.m, dense.n) / learned, convert_seconds=seconds,
    )
    if acts is not None:
        from .activations import open_activations
        from .metrics import evaluate

        source = open_activations(acts) if isinstance(acts, (str, os.PathLike)) else acts
        before = evaluate(dense, source, batch_size=batch_size, max_rows=max_rows)
        after = evaluate(sparse, source, batch_size=batch_size, max_rows=max_rows)
        report.num_rows = after["num_rows"]
        report.fvu_source, report.fvu = before["fvu"], after["fvu"]
        report.l0_source, report.l0 = before["l0"], after["l0"]
        report.dead_fraction_source, report.dead_fraction = before["dead_fraction"], after["dead_fraction"]
    return report


def source_bytes(path: Path) -> int:
    """Bytes of a source SAE: the file, or the files directly in its folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _output_name(hookpoint: str) -> str:
    stem = hookpoint.removesuffix(".pt").removesuffix(".pth").removesuffix(".ckpt")
    return stem.replace("/", "__") + ".safetensors"


def _convert_one(src: Path, out: Path, hookpoint: str | None, *, d: int | None, mask: str | None, seed: int,
                 search_seeds: int, encoder: str, dtype: str, acts: Any, k: int | None,
                 batch_size: int, max_rows: int | None) -> ConvertReport:
    native = read_sae(src, hookpoint, k=k)
    start = time.perf_counter()
    if isinstance(native, ExpanderSAE) and d in (None, native.d) and mask is None and encoder == "tied":
        sparse, dense, used_mask = native, native.to_dense(), "imported"
    else:
        dense = native.to_dense() if isinstance(native, ExpanderSAE) else native
        used_mask = mask or "expander"
        sparse = convert(dense, DEFAULT_D if d is None else d, mask=used_mask, seed=seed,
                         search_seeds=search_seeds, encoder=encoder)
    seconds = time.perf_counter() - start
    stored = sparse
    if acts is not None and dtype != "float32":  # measure fidelity at the stored precision
        with tempfile.TemporaryDirectory() as tmp:
            stored = load_compact(save_compact(sparse, Path(tmp) / "stored.safetensors", dtype=dtype))
    report = conversion_report(dense, stored, source_format=native.provenance.get("library"), mask=used_mask,
                               dtype=dtype, seconds=seconds, acts=acts, batch_size=batch_size, max_rows=max_rows)
    metrics = {key: value for key, value in report.to_dict().items()
               if value is not None and key not in ("convert_seconds", "file_bytes")}
    save_compact(sparse, out, dtype=dtype, metadata={**sparse.metadata, "convert": metrics})
    report.file_bytes = out.stat().st_size
    report.source_bytes = source_bytes(Path(native.provenance["path"]))
    report.compression_ratio = report.source_bytes / report.file_bytes
    return report


def convert_path(src: str | os.PathLike, out: str | os.PathLike, *, hookpoint: str | None = None,
                 d: int | None = None, mask: str | None = None, seed: int = 0, search_seeds: int = 64,
                 encoder: str = "tied", dtype: str = "float32", acts: str | os.PathLike | None = None,
                 k: int | None = None, batch_size: int = 4096, max_rows: int | None = None,
                 progress: bool = True) -> list[ConvertReport]:
    """Convert the SAE(s) at ``src`` into compact file(s) at ``out``; the library form of ``saecompress convert``.

    ``src``: a local file/folder in any layout of ``saecompress.formats`` (or an ``hf://`` URI).
    Without ``hookpoint``, a source holding many hookpoints converts all of them into the folder
    ``out`` (one ``<hookpoint>.safetensors`` each, ``/`` written as ``__``); otherwise ``out`` is
    one file. ``d``/``mask`` default to 7/``expander``; an Expander-SAE paper checkpoint given with
    neither is imported exactly. ``acts`` adds FVU/L0/dead metrics (single SAE only). ``out`` is
    checked before any work (it must not be, hold or lie inside ``src`` or ``acts``: see
    ``_io.check_outputs``); an existing file of the same name is replaced. Nothing is written
    unless every conversion succeeds.
    """
    if dtype not in STORAGE_DTYPES:
        raise SaeCompressError(f"unknown --dtype {dtype!r}; use one of {', '.join(STORAGE_DTYPES)}")
    if mask is not None and mask not in MASKS:
        raise SaeCompressError(f"unknown --mask {mask!r}; use one of {', '.join(MASKS)}")
    check_outputs([out], [src, acts])
    local, hookpoint = resolve(src, hookpoint)
    out = Path(out)
    options = dict(d=d, mask=mask, seed=seed, search_seeds=search_seeds, encoder=encoder, dtype=dtype, k=k,
                   batch_size=batch_size, max_rows=max_rows)
    hookpoints = [hookpoint] if hookpoint else list_hookpoints(local)
    if hookpoints == [""] or hookpoint:
        if out.is_dir():
            raise SaeCompressError(f"{out} is a folder; give a file name like {out / 'sae.safetensors'}")
        return [_convert_one(local, out, hookpoint, acts=acts, **options)]
    if acts is not None:
        raise SaeCompressError(
            f"{local} holds {len(hookpoints)} hookpoints; --acts evaluates one SAE, so pick it with --hookpoint"
        )
    if out.exists() and not out.is_dir():
        raise SaeCompressError(f"{out}: {local} holds {len(hookpoints)} hookpoints, so OUT must be a folder")
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
