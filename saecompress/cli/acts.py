"""``saecompress acts``: harvest activations of a transformers causal LM over text files."""

from __future__ import annotations

import time

import click

from .._json import dumps
from ..activations import SHARD_DTYPES
from ..errors import SaeCompressError
from ..launch import process_group, run_ranks
from ..lm import SITES, check_harvest
from ..lm.harvest import harvest_files
from ..texts import text_files


def text_options(func):
    """The model/text options shared by ``acts`` and ``eval``."""
    options = [
        click.option("--gguf-file", default=None,
                     help="GGUF file to load (inside --model's folder or a path); dequantised to float32."),
        click.option("--text", "texts", multiple=True,
                     help="Text file, folder of text files, or quoted glob such as 'docs/**/*.txt' (repeatable); "
                          "read in order, documents joined by EOS."),
        click.option("--context", type=click.IntRange(min=2), default=256, show_default=True, help="Tokens per context (BOS included)."),
        click.option("--keep-first", is_flag=True,
                     help="Keep position 0 of each context (excluded by default: the attention-sink token)."),
        click.option("--outlier-factor", type=click.FloatRange(min=0), default=10.0, show_default=True,
                     help="Exclude tokens whose activation norm exceeds this multiple of the batch median "
                          "(massive activations; acts does not write them, eval keeps their clean value); "
                          "0 keeps them."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.command("acts")
@click.option("--model", "model_path", required=True,
              help="transformers causal LM: local folder, hub id, or a .gguf file.")
@text_options
@click.option("--layer", type=click.IntRange(min=0), required=True, help="Decoder block index (0-based).")
@click.option("--site", type=click.Choice(SITES), default="resid", show_default=True,
              help="resid: output of block LAYER (SAELens blocks.L.hook_resid_post = hidden_states[L+1]); "
                   "mlp_out / attn_out: output of the block's MLP / attention module.")
@click.option("--tokens", type=click.IntRange(min=1), required=True, help="Activation rows to write (kept tokens).")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Contexts per forward pass.")
@click.option("--dtype", type=click.Choice(SHARD_DTYPES), default="float32",
              show_default=True, help="Storage dtype of the shards.")
@click.option("--shard-rows", type=click.IntRange(min=1), default=65536, show_default=True, help="Rows per shard file.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder (shard-*.safetensors + manifest.json); written atomically.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it already holds files.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes on this machine, each running the LM on every N-th batch of contexts and writing its "
                   "share of the rows; one manifest (under torchrun leave it out).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead of a summary.")
def acts(model_path: str, gguf_file: str | None, texts: tuple[str, ...], context: int, keep_first: bool,
         outlier_factor: float, layer: int, site: str, tokens: int, batch: int, dtype: str, shard_rows: int,
         out: str, overwrite: bool, nproc: int, as_json: bool) -> None:
    """Harvest TOKENS activation rows at LAYER/SITE of a causal LM over text files into --out."""
    if not texts:
        raise SaeCompressError("give at least one --text FILE or folder to harvest from")
    files = text_files(texts)
    check_harvest(out, tokens, overwrite=overwrite, inputs=[model_path, gguf_file, *files])
    start = time.perf_counter()
    group = process_group(nproc)
    run = dict(tokens=tokens, out=out, context=context, batch=batch, drop_first=not keep_first,
               outlier_factor=outlier_factor or None, dtype=dtype, shard_rows=shard_rows, overwrite=overwrite,
               progress=not as_json, metadata={"model": model_path, "gguf_file": gguf_file,
                                                "texts": [str(f) for f in files]})
    if nproc > 1:
        manifest = run_ranks(nproc, harvest_files, model_path, gguf_file, files, layer, site, **run)[0]
    else:
        manifest = harvest_files(model_path, gguf_file, files, layer, site, group=group, **run)
    if not manifest:  # another rank of a torchrun run writes the manifest and reports
        return
    if as_json:
        click.echo(dumps(manifest))
        return
    dropped = manifest["dropped_first"] + manifest["dropped_massive"]
    if manifest["num_rows"] < tokens:
        click.echo(f"warning: the text ran out; wrote {manifest['num_rows']} of {tokens} rows", err=True)
    click.echo(f"{out}: {manifest['num_rows']:,} rows × m={manifest['m']} ({manifest['hookpoint']}, {dtype}) "
               f"in {len(manifest['shards'])} shard(s); {manifest['tokens_seen']:,} tokens read, {dropped:,} dropped "
               f"(position 0: {manifest['dropped_first']:,}, massive: {manifest['dropped_massive']:,}); "
               f"{time.perf_counter() - start:.0f}s")
