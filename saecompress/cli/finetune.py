"""``saecompress finetune``: KL-fine-tune an SAE through its language model (see ``finetune.py``)."""

from __future__ import annotations

import click

from .._io import check_outputs
from .._json import dumps
from ..errors import SaeCompressError
from ..finetune import FinetuneConfig
from ..finetune import finetune as run_finetune
from ..lm import SITES, load_model
from ..sources import load_source
from ..texts import read_texts, text_files
from .acts import text_options
from .options import config_option, hub_options


@click.command("finetune")
@click.argument("src")
@click.option("--model", "model_path", required=True, help="The SAE's causal LM: local folder, hub id, or a .gguf file.")
@text_options
@click.option("--layer", type=click.IntRange(min=0), required=True, help="Decoder block index of the SAE's hookpoint (0-based).")
@click.option("--site", type=click.Choice(SITES), default="resid", show_default=True, help="Hooked site (as for `acts`).")
@click.option("--hookpoint", default=None, help="Which SAE of a multi-SAE source.")
@hub_options
@config_option(FinetuneConfig, "tokens", "--tokens", type=click.IntRange(min=1), help="LM tokens to fine-tune on.")
@config_option(FinetuneConfig, "batch", "--batch", type=click.IntRange(min=1), help="Contexts per step.")
@config_option(FinetuneConfig, "lr", "--lr", type=float, help="Adam learning rate (cosine decay to 0).")
@config_option(FinetuneConfig, "recon_coef", "--recon-coef", type=float,
              help="Weight of the reconstruction FVU next to the KL term (0: KL only).")
@click.option("--out", required=True, type=click.Path(dir_okay=True),
              help="Output: compact .safetensors (expander SAE) or SAELens folder (dense SAE); written atomically.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's statistics as one JSON object.")
def finetune(src, model_path, gguf_file, texts, context, keep_first, outlier_factor, layer, site, hookpoint, hub,
             tokens, batch, lr, recon_coef, out, as_json) -> None:
    """Fine-tune SRC so the LM spliced with it predicts like the clean LM (KL + reconstruction).

    A threshold SAE (jumprelu, batchtopk) keeps its thresholds fixed; the rest of it learns.

    \b
    Use text the SAE will not be evaluated on, e.g.:
      saecompress finetune sae.safetensors --model lm.gguf --text train-docs/ --layer 15 \\
          --tokens 300000 --out sae-ft.safetensors
    """
    cfg = FinetuneConfig(tokens=tokens, context=context, batch=batch, lr=lr, recon_coef=recon_coef,
                         drop_first=not keep_first, outlier_factor=outlier_factor or None)
    cfg.check()
    if not texts:
        raise SaeCompressError("give at least one --text FILE or folder to fine-tune on")
    files = text_files(texts)
    check_outputs([out], [src, model_path, gguf_file, *files])
    origin = load_source(src, hookpoint=hookpoint, hub=hub)
    model, tokenizer = load_model(model_path, gguf_file)
    _, stats = run_finetune(origin.model, model, tokenizer, read_texts(files), layer, site, cfg, out=out,
                            origin=origin, progress=not as_json)
    run = stats["finetune"]
    if as_json:
        click.echo(dumps(stats))
        return
    click.echo(f"wrote {out}: {run['tokens_seen']:,} tokens in {run['steps']} steps; KL {run['kl_first']:.4f} -> "
               f"{run['kl_last']:.4f}, FVU {run['fvu_first']:.4f} -> {run['fvu_last']:.4f} (first/last tenth of steps); "
               f"{run['latents_restored']:,} restores of latents that stopped firing")
