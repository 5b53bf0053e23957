"""``saecompress convert``: dense TopK SAE(s) → compact Expander SAE file(s)."""

from __future__ import annotations

import click

from .._json import dumps
from ..compact import STORAGE_DTYPES
from ..convert import DEFAULT_D, MASKS, convert_path


@click.command("convert")
@click.argument("src")
@click.argument("out", type=click.Path(dir_okay=True, file_okay=True))
@click.option("--hookpoint", default=None,
              help="Which SAE of a multi-SAE source (e.g. layers.10, or a SAELens SAE id folder). "
                   "Omit to convert every hookpoint into the folder OUT.")
@click.option("--d", "d", type=int, default=None,
              help=f"Nonzeros kept per latent. Default {DEFAULT_D}; an Expander-SAE paper checkpoint "
                   "keeps its own d (exact import).")
@click.option("--mask", type=click.Choice(MASKS), default=None,
              help="expander: seeded expander mask, only the seed is stored (default). topd: each latent's d "
                   "largest-|w| decoder entries, stored as explicit indices. search: try --search-seeds "
                   "expander seeds and keep the one that keeps the most decoder energy.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Expander mask seed (with --mask search: the first seed tried).")
@click.option("--search-seeds", type=int, default=64, show_default=True,
              help="Seeds tried by --mask search.")
@click.option("--encoder", type=click.Choice(["tied", "untied"]), default="tied", show_default=True,
              help="tied: the encoder uses the decoder's values. untied: keep the dense encoder's entries "
                   "on the same support (twice the values).")
@click.option("--dtype", type=click.Choice(STORAGE_DTYPES), default="float32", show_default=True,
              help="Storage dtype of the values (int8: symmetric per-latent scales).")
@click.option("--acts", type=click.Path(exists=True), default=None,
              help="Activations [N, m] (.npy, .safetensors or a shard folder): report FVU, L0 and dead "
                   "fraction of the source and of the result.")
@click.option("--max-rows", type=int, default=None, help="Evaluate on at most this many rows of --acts.")
@click.option("--k", "k", type=int, default=None,
              help="TopK k, for Expander-SAE paper checkpoints whose file name does not carry _k<k>_.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def convert(src: str, out: str, hookpoint: str | None, d: int | None, mask: str | None, seed: int,
            search_seeds: int, encoder: str, dtype: str, acts: str | None, max_rows: int | None,
            k: int | None, as_json: bool) -> None:
    """Convert the dense TopK SAE at SRC into a compact Expander SAE file OUT.

    SRC: a SAELens, sparsify, dictionary_learning or openai/sparse_autoencoder SAE, an Expander-SAE
    paper checkpoint, a folder holding many of them, or hf://owner/repo[/hookpoint][@revision].
    OUT: a .safetensors file, or a folder (one file per hookpoint) when converting many.
    """
    reports = convert_path(src, out, hookpoint=hookpoint, d=d, mask=mask, seed=seed, search_seeds=search_seeds,
                           encoder=encoder, dtype=dtype, acts=acts, k=k, max_rows=max_rows,
                           progress=not as_json)
    if as_json:
        rows = [r.to_dict() for r in reports]
        click.echo(dumps(rows[0] if len(rows) == 1 else {"out": out, "hookpoints": rows}))
        return
    for r in reports:
        line = (f"{r.hookpoint or src}: {r.source_format} m={r.m} n={r.n} k={r.k} -> d={r.d} ({r.mask}), "
                f"kept energy {r.kept_energy:.3f}, {r.file_bytes:,} bytes ({r.compression_ratio:.1f}x smaller)")
        if r.fvu is not None:
            line += (f"; FVU {r.fvu_source:.4f} -> {r.fvu:.4f}, L0 {r.l0:.1f}, "
                     f"dead {r.dead_fraction_source:.1%} -> {r.dead_fraction:.1%}")
        click.echo(line)
