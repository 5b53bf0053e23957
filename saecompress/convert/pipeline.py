"""The conversion pipeline: SAE sources in, compact files and a report (``ConvertReport``) out."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .._io import AtomicDirectory, check_outputs, output_errors
from ..activations import open_activations
from ..compact import (STORAGE_DTYPES, compression_ratio, dense_values, is_compact_file, learned_values, save_compact,
                       stored_copy, with_metrics)
from ..errors import SaeCompressError, check_choice
from ..formats import list_hookpoints, read_sae
from ..metrics import evaluate
from ..models import ExpanderSAE, TopKSAE
from ..sources import HubAccess, load_source, resolve
from .project import (DEFAULT_D, DEFAULT_ENCODER, DEFAULT_MASK, DEFAULT_PURSUIT_RULE, MASKS, calibrate, convert,
                      kept_energy, recalibrate_thresholds)

# A conversion whose FVU on --acts exceeds its source's by more than this needs `train --init` / `finetune`.
FVU_MARGIN = 0.1


@dataclass
class ConvertReport:
    """What one conversion kept and cost; ``to_dict`` is the ``--json`` object.

    ``needs_training``: the result should be retrained (``train --init``) and fine-tuned before
    use — always when it was not measured (no ``acts``) or its thresholds were not recalibrated,
    else when its FVU exceeds the source's by more than ``FVU_MARGIN``; ``advice`` says so in words.

    Threshold SAEs: ``thresholds`` is ``"recalibrated"`` (on ``acts``; ``l0_dense``, ``l0_before``
    with θ as copied, ``l0_after`` on those rows before the cap, and ``k`` the cap) or
    ``"uncalibrated"`` (θ copied from the dense SAE; ``k = n``); ``None`` for top-k SAEs.
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
    source_ratio: float | None = None
    num_rows: int | None = None
    fvu_source: float | None = None
    fvu: float | None = None
    l0_source: float | None = None
    l0: float | None = None
    dead_fraction_source: float | None = None
    dead_fraction: float | None = None
    thresholds: str | None = None
    l0_dense: float | None = None
    l0_before: float | None = None
    l0_after: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict."""
        return asdict(self)


def conversion_report(dense: TopKSAE, sparse: ExpanderSAE, *, source_format: str | None = None,
                      hookpoint: str | None = None, mask: str | None = None, dtype: str = "float32",
                      seconds: float = 0.0, calibration_scale: float | None = None,
                      thresholds: dict[str, Any] | None = None, acts: Any = None,
                      batch_size: int = 4096, max_rows: int | None = None) -> ConvertReport:
    """Kept energy and storage of ``sparse`` vs ``dense`` (the source: a dense SAE, or the expander whose decoder
    ``sparse`` keeps); with ``acts`` (path or ActivationSource) also
    FVU, L0 and dead fraction of both (via ``saecompress.metrics.evaluate``), and the verdict
    ``needs_training`` / ``advice``. ``source_format``, ``hookpoint``, ``mask`` (how the mask was
    chosen, default ``explicit``), ``calibration_scale`` and ``thresholds`` (the result of
    ``recalibrate_thresholds``, if it ran) are reported as given.

    ``storage_ratio`` counts values (dense ``2mn + m + n`` vs learned ``nd (+nd untied) + n + m``);
    ``convert_path`` sets the byte ratios: ``compression_ratio`` (the dense TopK SAE in float32
    over the file, as ``info`` and model cards show) and ``source_ratio`` (the source's bytes over
    the file's).
    """
    learned = learned_values(sparse.m, sparse.n, sparse.d, sparse.encoder)
    report = ConvertReport(
        source_format=source_format, hookpoint=hookpoint, m=sparse.m, n=sparse.n,
        d=sparse.d, k=sparse.k, activation=sparse.activation, mask=mask or "explicit", mask_seed=sparse.mask_seed,
        encoder=sparse.encoder, dtype=dtype,
        # an expander source keeps its own mask whole
        kept_energy=kept_energy(dense, sparse.indices) if isinstance(dense, TopKSAE) else 1.0,
        dense_values=dense_values(dense.m, dense.n), learned_values=learned,
        storage_ratio=dense_values(dense.m, dense.n) / learned, convert_seconds=seconds,
        calibration_scale=calibration_scale,
    )
    if sparse.threshold is not None:
        report.thresholds = "recalibrated" if thresholds else "uncalibrated"
        if thresholds:
            report.l0_dense, report.l0_before, report.l0_after = (
                thresholds["l0_dense"], thresholds["l0_before"], thresholds["l0_after"])
    if acts is not None:
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
    if report.mask == "imported" and report.encoder == "pursuit":
        return False, "the source's mask and decoder, encoded by matching pursuit (k rounds; no encoder stored)"
    if report.mask == "imported":
        return False, "exact import of an Expander SAE checkpoint"
    if report.thresholds == "uncalibrated":
        how = ("convert again with --acts to recalibrate them" if report.fvu is None
               else "convert again without --no-calibrate to recalibrate them on --acts")
        return True, (f"the {report.activation} thresholds are uncalibrated (copied from the dense SAE; the "
                      f"projection changes the pre-activations, so latents fire at other rates): {how}; "
                      f"then {retrain}")
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
                 search_seeds: int, encoder: str | None, pursuit_rule: str | None, dtype: str, acts: Any,
                 calibrate_on_acts: bool, k: int | None, batch_size: int, max_rows: int | None) -> ConvertReport:
    if hookpoint is None and src.suffix == ".safetensors" and is_compact_file(src):  # re-encoded by pursuit
        loaded = load_source(src)
        native, provenance = loaded.model, {**loaded.provenance, "library": "saecompress", "path": str(src)}
    else:
        native, provenance = read_sae(src, hookpoint, k=k)
    library = provenance.get("library")
    if k is not None and library != "paper":
        raise SaeCompressError(f"--k is only for Expander-SAE paper checkpoints; this {library} "
                               f"SAE stores its own k={native.k} (drop --k)")
    start = time.perf_counter()
    fit = thresholds = None
    same_mask = isinstance(native, ExpanderSAE) and d in (None, native.d) and mask is None
    if same_mask and encoder == "pursuit" and (native.encoder != "pursuit" or pursuit_rule is not None):
        sparse, dense, used_mask = native.with_pursuit(pursuit_rule or DEFAULT_PURSUIT_RULE), native, "imported"
    elif same_mask and (encoder in (None, "tied") or encoder == native.encoder):
        sparse, used_mask = native, "imported"
        dense = native if native.encoder == "pursuit" else native.to_dense()
    else:
        dense = native.to_dense() if isinstance(native, ExpanderSAE) else native
        used_mask = mask or DEFAULT_MASK
        sparse = convert(dense, DEFAULT_D if d is None else d, mask=used_mask, seed=seed,
                         search_seeds=search_seeds, encoder=encoder or DEFAULT_ENCODER)
        if sparse.encoder == "pursuit":
            sparse = sparse.with_pursuit(pursuit_rule or DEFAULT_PURSUIT_RULE)
        if acts is not None and calibrate_on_acts:
            acts = open_activations(acts) if isinstance(acts, (str, os.PathLike)) else acts
            sparse = stored_copy(sparse, dtype)  # fitted at the precision the file stores the encoder in
            if sparse.threshold is not None:  # first, so the least-squares fit sees the final codes
                held = acts.select(0, min(max_rows, acts.num_rows)) if max_rows is not None else acts
                thresholds = recalibrate_thresholds(sparse, dense, held.read(0, held.num_rows))  # rows in memory
            fit = calibrate(sparse, acts, batch_size=batch_size, max_rows=max_rows)
    seconds = time.perf_counter() - start
    stored = stored_copy(sparse, dtype) if acts is not None else sparse  # measured at the stored precision
    report = conversion_report(dense, stored, source_format=library, hookpoint=provenance.get("hookpoint"),
                               mask=used_mask, dtype=dtype, seconds=seconds,
                               calibration_scale=fit["scale"] if fit else None, thresholds=thresholds, acts=acts,
                               batch_size=batch_size, max_rows=max_rows)
    metrics = {key: value for key, value in report.to_dict().items()
               if value is not None and key not in ("convert_seconds", "file_bytes", "advice")}
    measured = {key: metrics[key] for key in ("fvu", "l0", "dead_fraction", "num_rows") if key in metrics}
    user = {"convert": metrics}
    if used_mask != "imported":  # how the projection was made
        user["conversion"] = {"mask": used_mask, "d": report.d, "kept_energy": report.kept_energy,
                              **({"search_seeds": search_seeds} if used_mask == "search" else {}),
                              **({"calibration": fit} if fit else {}),
                              **({"thresholds": thresholds} if thresholds else {})}
    save_compact(sparse, out, dtype=dtype, metadata=with_metrics(user, measured), source=provenance)
    report.file_bytes = out.stat().st_size
    report.source_bytes = source_bytes(Path(provenance["path"]))
    report.compression_ratio = compression_ratio(sparse.m, sparse.n, report.file_bytes)
    report.source_ratio = report.source_bytes / report.file_bytes
    return report


def convert_path(src: str | os.PathLike, out: str | os.PathLike, *, hookpoint: str | None = None,
                 d: int | None = None, mask: str | None = None, seed: int | None = None,
                 search_seeds: int | None = None, encoder: str | None = None, pursuit_rule: str | None = None,
                 dtype: str = "float32", acts: str | os.PathLike | None = None, calibrate_on_acts: bool = True,
                 k: int | None = None, batch_size: int = 4096, max_rows: int | None = None,
                 hub: HubAccess | None = None, progress: bool = True) -> list[ConvertReport]:
    """Convert the SAE(s) at ``src`` into compact file(s) at ``out``; the library form of ``saecompress convert``.

    ``src``: a local file/folder in any layout of ``saecompress.formats`` (or an ``hf://`` URI).
    Without ``hookpoint``, a source holding many hookpoints converts all of them into the folder
    ``out`` (one ``<hookpoint>.safetensors`` each, ``/`` written as ``__``); otherwise ``out`` is
    one file. ``d``/``mask``/``encoder`` default to 7/``topd``/``untied``; an Expander-SAE paper
    checkpoint given none of them is imported exactly. ``acts`` (single SAE only) first ``calibrate``s
    the result on those rows at its storage precision (unless ``calibrate_on_acts=False``; a threshold
    SAE's thresholds and cap are recalibrated before, see ``project``), then adds FVU/L0/dead metrics
    of source and result. ``seed`` (default 0) and ``search_seeds`` (default 64) apply only to the
    masks that use them, ``k`` only to paper checkpoints and ``max_rows`` only with ``acts``: given
    elsewhere they are refused, not ignored. ``hub`` says where ``hf://`` sources come from.
    ``out`` is checked before any work (it must not be, hold or lie inside ``src`` or ``acts``: see
    ``_io.check_outputs``); an existing file of the same name is replaced. Nothing is written
    unless every conversion succeeds.
    """
    check_choice("--dtype", dtype, STORAGE_DTYPES)
    if mask is not None:
        check_choice("--mask", mask, MASKS)
    used_mask = mask or DEFAULT_MASK
    if seed is not None and used_mask == "topd":
        raise SaeCompressError("--seed picks an expander mask; --mask topd has none (give --mask expander or search)")
    if search_seeds is not None and used_mask != "search":
        raise SaeCompressError(f"--search-seeds is for --mask search, not --mask {used_mask}")
    if pursuit_rule is not None and encoder != "pursuit":
        raise SaeCompressError("--pursuit-rule is for --encoder pursuit; other encoders keep the source's activation")
    if max_rows is not None and acts is None:
        raise SaeCompressError("--max-rows limits the rows of --acts; give --acts too")
    seed, search_seeds = seed or 0, 64 if search_seeds is None else search_seeds
    check_outputs([out], [src, acts])
    local, hookpoint = resolve(src, hookpoint, hub)
    out = Path(out)
    options = dict(d=d, mask=mask, seed=seed, search_seeds=search_seeds, encoder=encoder, pursuit_rule=pursuit_rule,
                   dtype=dtype, k=k, batch_size=batch_size, max_rows=max_rows, calibrate_on_acts=calibrate_on_acts)
    compact = is_compact_file(local)
    if compact and (encoder != "pursuit" or d is not None or mask is not None):
        raise SaeCompressError(f"{src}: already a compact Expander SAE file; use it directly (convert takes one "
                               "only to re-encode it by matching pursuit: --encoder pursuit, no --d or --mask)")
    hookpoints = [hookpoint] if hookpoint else [""] if compact else list_hookpoints(local)
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
    with AtomicDirectory(out, merge=True) as staging, output_errors(out):  # errors name OUT, never the staging
        return [_convert_one(local, staging / _output_name(hp), hp, acts=None, **options)
                for hp in tqdm(hookpoints, desc="convert", unit="sae", disable=not progress)]
