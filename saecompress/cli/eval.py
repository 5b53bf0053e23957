"""``saecompress eval``: fidelity (FVU, L0, dead, cosine) and, with a model, CE-loss recovered."""

from __future__ import annotations

import math

import click

from .._json import dumps
from ..activations import open_activations
from ..errors import SaeCompressError
from ..lm import SITES, ce_eval, load_model
from ..metrics import evaluate
from ..sources import load_source
from ..texts import read_texts, text_files
from .acts import text_options
from .options import hub_options

_TABLE = ("fvu", "explained_variance", "cosine", "mse", "l0", "dead_fraction", "num_rows",
          "ce_clean", "ce_zero", "ce_mean", "ce_spliced", "ce_recovered", "ce_recovered_mean_ablation",
          "kl_zero", "kl_spliced", "kl_recovered", "ce_tokens", "ce_excluded_first", "ce_excluded_massive")


@click.command("eval")
@click.argument("src")
@click.option("--acts", "acts_path", required=True, type=click.Path(exists=True),
              help="Activations [N, m]: .npy, .safetensors, or a folder written by `saecompress acts`.")
@click.option("--hookpoint", default=None, help="Which SAE of a multi-SAE source.")
@hub_options
@click.option("--max-rows", type=click.IntRange(min=1), default=None,
              help="Evaluate on at most this many rows of --acts.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4096, show_default=True, help="Activation rows per batch.")
@click.option("--model", "model_path", default=None,
              help="Causal LM (folder, hub id or .gguf) for CE-loss recovered; needs --text.")
@text_options
@click.option("--layer", type=click.IntRange(min=0), default=None, help="Block index of the hooked site (default: from --acts manifest).")
@click.option("--site", type=click.Choice(SITES), default=None,
              help="Hooked site (default: from --acts manifest, else resid).")
@click.option("--ce-tokens", type=click.IntRange(min=1), default=8192, show_default=True, help="Tokens of --text for the CE evaluation.")
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True, help="Contexts per forward pass in the CE evaluation.")
@click.option("--json", "as_json", is_flag=True,
              help='Print one JSON object {"hookpoints": [report]} instead of a table.')
def eval(src: str, acts_path: str, hookpoint: str | None, hub, max_rows: int | None, batch_size: int,
         model_path: str | None, gguf_file: str | None, texts: tuple[str, ...], context: int, keep_first: bool,
         outlier_factor: float, layer: int | None, site: str | None, ce_tokens: int, batch: int,
         as_json: bool) -> None:
    """Evaluate the SAE at SRC (compact file, dense SAE in any known layout, or hf://…) on --acts.

    With --model and --text, also splice the SAE into the model at --layer/--site and report
    next-token CE clean, zero-/mean-ablated and spliced, and CE-loss recovered.
    """
    if bool(model_path) != bool(texts):
        raise SaeCompressError("CE-loss recovered needs both --model and --text FILE (the text to compute CE on)")
    source = open_activations(acts_path)
    loaded = load_source(src, hookpoint, hub=hub)
    sae = loaded.model
    if sae.m != source.m:
        raise SaeCompressError(f"{src} has hidden size m={sae.m} but {acts_path} holds m={source.m} activations; "
                               "evaluate it on activations from its own model and hookpoint")
    report = evaluate(sae, source, batch_size=batch_size, max_rows=max_rows, progress=not as_json)
    if model_path:
        layer = source.manifest.get("layer") if layer is None else layer
        site = site or source.manifest.get("site", "resid")
        if layer is None:
            raise SaeCompressError("--layer is needed (the --acts folder has no manifest saying which layer)")
        model, tokenizer = load_model(model_path, gguf_file)
        report.update(ce_eval(model, tokenizer, read_texts(text_files(texts)), sae, layer, site,
                              tokens=ce_tokens, context=context, batch=batch, drop_first=not keep_first,
                              outlier_factor=outlier_factor or None, progress=not as_json))
    if as_json:
        if "hookpoint" in report:  # the LM site CE was measured at; "hookpoint" names the SAE in its source
            report["ce_hookpoint"] = report.pop("hookpoint")
        click.echo(dumps({"hookpoints": [{"hookpoint": loaded.provenance.get("hookpoint"), **report}]}))
        return
    rows = [(key, report[key]) for key in _TABLE if key in report]
    width = max(len(key) for key, _ in rows)
    click.echo(f"{src} on {acts_path}" + (f" + {model_path} {report['hookpoint']}" if model_path else ""))
    for key, value in rows:
        shown = f"{value:,}" if isinstance(value, int) else ("nan" if math.isnan(value) else f"{value:.4f}")
        click.echo(f"  {key:<{width}}  {shown:>12}")
