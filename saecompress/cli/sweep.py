"""``saecompress sweep``: the storage–fidelity frontier over a grid of recipes, d values and dtypes."""

from __future__ import annotations

from pathlib import Path

import click

from .._json import dumps
from ..compact import STORAGE_DTYPES
from ..finetune import FinetuneConfig
from ..lm import SITES
from ..sweep import RECIPES, SweepConfig, parse_d, parse_list
from ..sweep import sweep as run_sweep
from ..units import human_bytes
from .acts import text_options
from .options import config_option, hub_options


@click.command("sweep")
@click.option("--acts", required=True, type=click.Path(exists=True),
              help="Training activations [N, m] (.npy, .safetensors or a shard folder); the last --held-out rows "
                   "are held out for the measurements unless --eval-acts is given.")
@click.option("--eval-acts", type=click.Path(exists=True), default=None,
              help="Held-out activations to measure on (then every row of --acts trains).")
@click.option("--dense", default=None,
              help="A dense TopK SAE source: enables the topd recipes and is the dense point (else a dense SAE "
                   "is trained at --n).")
@click.option("--model", "model_path", default=None,
              help="Causal LM (folder, hub id or .gguf) for CE-loss recovered and the finetune recipe; needs --text.")
@text_options
@click.option("--eval-text", "eval_texts", multiple=True,
              help="Text to measure CE-loss recovered on (repeatable) [default: --text, which the finetune "
                   "recipe trains on].")
@click.option("--ood-acts", type=click.Path(exists=True), default=None,
              help="Held-out activations of another domain than the training text (e.g. prose for docs): "
                   "every point is measured on them too (ood_* fields, and a second panel in frontier.png).")
@click.option("--ood-text", "ood_texts", multiple=True,
              help="Held-out text of another domain for CE-loss recovered there (repeatable; needs --model).")
@click.option("--layer", type=click.IntRange(min=0), default=None,
              help="Block index of the hooked site (default: from the --acts manifest).")
@click.option("--site", type=click.Choice(SITES), default=None, help="Hooked site (default: from the --acts manifest, else resid).")
@click.option("--d", "d", default=",".join(map(str, SweepConfig.d)), show_default=True,
              help="Nonzeros per latent: comma-separated values, each below m.")
@click.option("--recipes", default=None,
              help=f"Comma-separated, of {', '.join(RECIPES)} [default: all the inputs allow: topd-* need --dense, "
                   "finetune --model].")
@click.option("--dtype", "dtypes", default=",".join(SweepConfig.dtypes), show_default=True,
              help=f"Storage dtypes, comma-separated, of {', '.join(STORAGE_DTYPES)}.")
@click.option("--k", type=click.IntRange(min=1), default=None, help="Active latents per token [default: the dense SAE's k, else 32].")
@click.option("--n", type=click.IntRange(min=1), default=None, help="Latents of every expander SAE [default: the dense SAE's n].")
@config_option(SweepConfig, "tokens", "--tokens", type=click.IntRange(min=1), help="Training tokens of every trained SAE.")
@config_option(SweepConfig, "batch_size", "--batch-size", type=click.IntRange(min=1), help="Activation rows per training step.")
@click.option("--held-out", type=click.IntRange(min=0), default=None,
              help="Rows at the end of --acts held out for the measurements [default: 8192, at most a tenth].")
@config_option(SweepConfig, "seed", "--seed", type=click.IntRange(min=0), help="Seed of every training run.")
@config_option(FinetuneConfig, "tokens", "--finetune-tokens", type=click.IntRange(min=1),
               help="LM tokens of the finetune recipe.")
@config_option(SweepConfig, "ce_tokens", "--ce-tokens", type=click.IntRange(min=1), help="Tokens of the CE evaluation.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: points/ (the cache), work/, frontier.json, frontier.csv, frontier.png.")
@hub_options
@click.option("--json", "as_json", is_flag=True, help="Print the frontier as one JSON object.")
def sweep(acts, eval_acts, dense, model_path, gguf_file, texts, context, keep_first, outlier_factor, eval_texts,
          ood_acts, ood_texts, layer, site, d, recipes, dtypes, k, n, tokens, batch_size, held_out, seed, finetune_tokens, ce_tokens,
          out, hub, as_json) -> None:
    """Make, measure and plot Expander SAEs over a grid of recipes, d values and dtypes, with dense baselines.

    \b
    Smallest:  saecompress sweep --acts acts/ --d 4,7 --k 16 --n 1024 --tokens 16384 --out frontier/
    Full:      saecompress sweep --acts acts/ --dense ./dense-sae --model lm.gguf --text train-docs/ \\
                   --eval-text held-out-docs/ --ood-acts prose-acts/ --ood-text prose.txt \\
                   --d 4,7,16,32,64 --dtype float32,int8 --out frontier/
    Every point is cached in OUT/points: a rerun (or an interrupted run) makes only the points it lacks.
    """
    cfg = SweepConfig(d=parse_d(d), recipes=parse_list(recipes) if recipes is not None else None,
                      dtypes=parse_list(dtypes), k=k, n=n, tokens=tokens, batch_size=batch_size,
                      held_out_rows=held_out, seed=seed, finetune_tokens=finetune_tokens, ce_tokens=ce_tokens,
                      context=context, drop_first=not keep_first, outlier_factor=outlier_factor or None)
    frontier = run_sweep(acts, out, cfg, eval_acts=eval_acts, dense=dense, model=model_path, gguf_file=gguf_file,
                         texts=texts, eval_texts=eval_texts, ood_acts=ood_acts, ood_texts=ood_texts, layer=layer, site=site, hub=hub, progress=not as_json)
    if as_json:
        click.echo(dumps(frontier))
        return
    y = frontier["y"]
    ood = any(p.get("ood_dead_fraction") is not None or p.get("ood_" + y) is not None for p in frontier["points"])
    click.echo(f"{'recipe':<22} {'d':>3} {'dtype':<8} {'latents':>9} {'bytes':>11} {y:>18} {'dead':>7}"
               + (f" {'ood ' + y:>22} {'ood dead':>8}" if ood else ""))

    def cell(value, form: str) -> str:
        return "-" if value is None else format(value, form)

    for p in frontier["points"]:
        click.echo(f"{p['recipe']:<22} {p['d'] or '-':>3} {p['dtype']:<8} {p['n']:>9,} "
                   f"{human_bytes(p['file_bytes']):>11} {cell(p.get(y), '.4f'):>18} {p['dead_fraction']:>7.2%}"
                   + (f" {cell(p.get('ood_' + y), '.4f'):>22} {cell(p.get('ood_dead_fraction'), '.2%'):>8}"
                      if ood else ""))
    for row in frontier["versus_matched"]:
        where = "above" if row["difference"] > 0 else "below" if row["difference"] < 0 else "level with"
        click.echo(f"{row['recipe']} d={row['d']} {row['dtype']} ({row['n']:,} latents, {human_bytes(row['file_bytes'])}) "
                   f"is {where} the dense SAE of as many bytes ({row['dense_n']:,} latents) by {row['difference']:+.4f}")
    for note in frontier["notes"]:
        click.echo(f"note: {note}")
    made = ", ".join(name for name in ("frontier.json", "frontier.csv", "frontier.png") if Path(out, name).is_file())
    click.echo(f"wrote {made} in {out}")
