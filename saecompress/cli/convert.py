"""``saecompress convert``: dense TopK or threshold SAE(s) → compact Expander SAE file(s)."""

from __future__ import annotations

import click

from .._json import dumps
from ..compact import STORAGE_DTYPES
from ..convert import DEFAULT_D, DEFAULT_ENCODER, DEFAULT_MASK, MASKS, convert_path
from ..models import ACTIVATIONS, ENCODERS
from .options import hub_options


@click.command("convert")
@click.argument("src")
@click.argument("out", type=click.Path(dir_okay=True, file_okay=True))
@click.option("--hookpoint", default=None,
              help="Which SAE of a multi-SAE source (e.g. layers.10, or a SAELens SAE id folder). "
                   "Omit to convert every hookpoint into the folder OUT.")
@click.option("--d", "d", type=click.IntRange(min=1), default=None,
              help=f"Nonzeros kept per latent. Default {DEFAULT_D}; an Expander-SAE paper checkpoint "
                   "keeps its own d (exact import).")
@click.option("--mask", type=click.Choice(MASKS), default=None,
              help=f"Default {DEFAULT_MASK}. topd: each latent's d largest-|w| decoder entries, stored as "
                   "explicit indices (keeps the most). expander: seeded expander mask, only the seed is "
                   "stored. search: try --search-seeds expander seeds and keep the one that keeps the most "
                   "decoder energy.")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Expander mask seed, with --mask expander or search (the first seed tried) [default: 0].")
@click.option("--search-seeds", type=click.IntRange(min=1), default=None,
              help="Seeds tried by --mask search [default: 64].")
@click.option("--encoder", type=click.Choice(ENCODERS), default=None,
              help=f"Default {DEFAULT_ENCODER}. untied: keep the dense encoder's entries on the same support "
                   "(twice the values, much better fidelity). tied: the encoder uses the decoder's values. "
                   "pursuit: no encoder; codes by k rounds of matching pursuit over the decoder rows (from an "
                   "expander SRC with no --d/--mask: its own mask and decoder, e.g. a seed-only native SAE).")
@click.option("--pursuit-rule", type=click.Choice(ACTIVATIONS), default=None,
              help="With --encoder pursuit: how each round picks and codes a latent. abs_topk: the largest "
                   "|correlation|, signed codes (the best fidelity); relu_topk: the largest positive one, codes "
                   ">= 0 (as SAELens's matching-pursuit SAE). Default: abs_topk.")
@click.option("--dtype", type=click.Choice(STORAGE_DTYPES), default="float32", show_default=True,
              help="Storage dtype of the values (int8: symmetric per-latent scales).")
@hub_options
@click.option("--acts", type=click.Path(exists=True), default=None,
              help="Activations (.npy, .safetensors or a shard folder): fit the reconstruction scale and "
                   "output bias to them by least squares (the codes do not change; the fit never does worse "
                   "than predicting their mean), then report FVU, L0 and dead fraction of source and result "
                   "on the same rows. A JumpReLU / BatchTopK SAE's thresholds are recalibrated on them first "
                   "(each latent fires as often as in the dense SAE; the rows are held in memory) and k is "
                   "set to cap the active latents.")
@click.option("--no-calibrate", is_flag=True,
              help="With --acts: only measure, do not fit (thresholds stay uncalibrated).")
@click.option("--max-rows", type=click.IntRange(min=1), default=None,
              help="Use at most this many rows of --acts.")
@click.option("--k", "k", type=click.IntRange(min=1), default=None,
              help="TopK k, for Expander-SAE paper checkpoints whose file name does not carry _k<k>_ "
                   "(other layouts store k).")
@click.option("--json", "as_json", is_flag=True,
              help='Print one JSON object {"out": OUT, "hookpoints": [report, ...]} instead of text.')
def convert(src: str, out: str, hookpoint: str | None, d: int | None, mask: str | None, seed: int | None,
            search_seeds: int | None, encoder: str | None, pursuit_rule: str | None, dtype: str, hub,
            acts: str | None, no_calibrate: bool, max_rows: int | None, k: int | None, as_json: bool) -> None:
    """Convert the dense TopK, JumpReLU or BatchTopK SAE at SRC into a compact Expander SAE file OUT.

    SRC: a SAELens, sparsify, dictionary_learning or openai/sparse_autoencoder SAE, an Expander-SAE
    paper checkpoint, a folder holding many of them, or hf://owner/repo[/hookpoint][@revision].
    OUT: a .safetensors file, or a folder (one file per hookpoint) when converting many.

    The defaults (--mask topd --encoder untied) keep the most of the dense SAE, but at small d a
    converted SAE usually still needs `saecompress train --init OUT` and `saecompress finetune`
    before use: the report says so (measure with --acts). A threshold SAE's thresholds need --acts
    to be recalibrated after the projection.
    """
    reports = convert_path(src, out, hookpoint=hookpoint, d=d, mask=mask, seed=seed, search_seeds=search_seeds,
                           encoder=encoder, pursuit_rule=pursuit_rule, dtype=dtype, acts=acts,
                           calibrate_on_acts=not no_calibrate, k=k, max_rows=max_rows, hub=hub, progress=not as_json)
    if as_json:
        click.echo(dumps({"out": out, "hookpoints": [r.to_dict() for r in reports]}))
        return
    for r in reports:
        line = (f"{r.hookpoint or src}: {r.source_format} m={r.m} n={r.n} k={r.k} -> d={r.d} ({r.mask}, "
                f"{r.encoder} encoder), kept energy {r.kept_energy:.3f}, {r.file_bytes:,} bytes "
                f"({r.source_ratio:.1f}x smaller than the source)")
        if r.fvu is not None:
            line += (f"; FVU {r.fvu_source:.4f} -> {r.fvu:.4f}, L0 {r.l0:.1f}, "
                     f"dead {r.dead_fraction_source:.1%} -> {r.dead_fraction:.1%}")
        click.echo(line)
        if r.thresholds == "recalibrated":
            click.echo(f"  {r.activation} thresholds recalibrated on {r.num_rows} rows: L0 {r.l0_dense:.2f} dense, "
                       f"{r.l0_before:.2f} with the copied thresholds, {r.l0_after:.2f} after; k={r.k} caps the "
                       "active latents (99.9th percentile of the per-row L0)")
        elif r.thresholds == "uncalibrated":
            click.echo(f"  {r.activation} thresholds uncalibrated (copied from the dense SAE)"
                       + ("; this result needs --acts to recalibrate them" if r.num_rows is None else
                          " under --no-calibrate"))
        click.echo(f"  {'needs training: ' if r.needs_training else ''}{r.advice}")
