"""``saecompress monitor``: run an SAE over activations with onnxruntime; print features or alerts."""

from __future__ import annotations

import sys

import click
import numpy as np

from .._json import dumps
from ..errors import SaeCompressError
from ..runtime import BACKENDS, Monitor, read_activation_arrays
from .options import hub_options


def parse_watch(text: str) -> dict[int, float]:
    """``"123:0.5,456:1.0"`` → ``{123: 0.5, 456: 1.0}``; both parts of each pair are required, once per feature."""
    watch: dict[int, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        feature, sep, threshold = item.partition(":")
        try:
            key, value = int(feature), float(threshold)
        except ValueError:
            hint = f" (no threshold: write e.g. {feature}:0.5)" if not sep else ""
            raise SaeCompressError(f"--watch item {item!r} is not FEATURE:THRESHOLD{hint}") from None
        if key in watch:
            raise SaeCompressError(f"--watch names feature {key} twice ({key}:{watch[key]:g} and {item}); "
                                   "give each feature one threshold")
        watch[key] = value
    if not watch:
        raise SaeCompressError("--watch is empty; give FEATURE:THRESHOLD pairs, e.g. 123:0.5,456:1.0")
    return watch


def _emit(record: dict, jsonl: bool) -> None:
    if jsonl:
        click.echo(dumps(record))
    elif "feature" in record:
        click.echo(f"row {record['row']}: feature {record['feature']} = {record['value']:.4g}")
    else:
        spilled = f"  (+{record['overflow']} over max_l0)" if "overflow" in record else ""
        click.echo(f"row {record['row']}: " + "  ".join(f"{f}={v:.4g}" for f, v in record["features"]) + spilled)


@click.command("monitor")
@click.argument("model")
@click.option("--hookpoint", default=None, help="Which SAE of a multi-SAE source.")
@hub_options
@click.option("--input", "source", required=True,
              help="Activations [m], [N, m] or [..., m] (leading axes flattened): a .npy or .safetensors "
                   "file (tensor 'activations' or the only one), a shard folder from `saecompress acts`, "
                   "or '-' to read a stream of .npy arrays from stdin (numpy.save each batch).")
@click.option("--watch", default=None,
              help="Alert on features: FEATURE:THRESHOLD pairs, comma-separated (e.g. 123:0.5,456:1.0); "
                   "a feature alerts when active with a value >= its threshold. Every feature needs a "
                   "threshold and appears once. Prints one line per alert. Without --watch, prints each "
                   "row's top features.")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True,
              help="Features printed per row (without --watch; at most k).")
@click.option("--jsonl", is_flag=True, help="Print JSON lines ({row, feature, value} or {row, features}).")
@click.option("--batch-size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Rows per onnxruntime call.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="onnxruntime intra-op threads (default: onnxruntime's choice).")
@click.option("--max-l0", type=click.IntRange(min=1), default=None,
              help="Threshold SAEs (jumprelu, batchtopk) exported in memory: latents kept per row "
                   "(default: the model's k when k < n); latents beyond it are counted as overflow.")
@click.option("--provider", default=None,
              help="Force an execution provider (e.g. CUDAExecutionProvider). Default: CUDA when "
                   "onnxruntime-gpu is installed and a GPU is usable, else CPU.")
@click.option("--backend", type=click.Choice(BACKENDS), default="onnxruntime", show_default=True,
              help="torch: run the SAE (not an .onnx file) with torch, on --device; for a service that already "
                   "holds torch and a GPU next to its LLM.")
@click.option("--device", default=None, help="--backend torch: cpu, cuda, cuda:1 … [default: cuda when available].")
def monitor(model: str, hookpoint: str | None, hub, source: str, watch: str | None, top: int, jsonl: bool,
            batch_size: int, threads: int | None, max_l0: int | None, provider: str | None, backend: str,
            device: str | None) -> None:
    """Encode activations with the SAE MODEL (an exported .onnx file, a compact file, a dense SAE
    or hf://owner/repo[/hookpoint][@rev]) on onnxruntime.

    Rows are numbered across the whole input (flattened leading axes). Rows holding NaN/Inf are
    skipped and reported on stderr; the provider in use is reported on stderr at start, the row count
    at the end (also as JSON {"summary": ...} with --jsonl). For a threshold SAE, rows with more
    active latents than max_l0 carry "overflow" (the latents beyond it) and the summary counts them.
    """
    thresholds = parse_watch(watch) if watch is not None else None
    mon = Monitor(model, providers=[provider] if provider else None, batch_size=batch_size, threads=threads,
                  hookpoint=hookpoint, hub=hub, max_l0=max_l0, backend=backend, device=device)
    if thresholds is not None:
        mon.watch(thresholds)
    click.echo(f"monitor: {mon.graph} graph, m={mon.m}, n={mon.n}, k={mon.k}, provider {mon.provider}", err=True)
    offset = skipped = 0
    stdin = sys.stdin.buffer if source == "-" else None
    for array in read_activation_arrays(source, stdin=stdin):
        if mon.watched:
            for alert in mon.scan(array):
                _emit({"row": offset + alert.row, "feature": alert.feature, "value": alert.value}, jsonl)
        else:
            indices, values = mon.encode(array)
            indices, values = indices.reshape(-1, mon.k), values.reshape(-1, mon.k)
            spilled, skipped_here = mon.overflow.reshape(-1), set(mon.skipped_rows.tolist())
            for row in range(len(indices)):
                if row in skipped_here:
                    continue
                order = [i for i in values[row].argsort()[::-1] if indices[row, i] >= 0][:top]
                record = {"row": offset + row,
                          "features": [[int(indices[row, i]), float(values[row, i])] for i in order]}
                if spilled[row]:
                    record["overflow"] = int(spilled[row])
                _emit(record, jsonl)
        for row in mon.skipped_rows:
            click.echo(dumps({"row": offset + int(row), "skipped": "NaN or Inf in the activations"}),
                       err=True)
        skipped += len(mon.skipped_rows)
        offset += int(np.prod(array.shape[:-1]))
        sys.stdout.flush()
    summary = {"rows": offset, "skipped": skipped}
    counted = mon.metadata.get("activation") != "topafa"  # topafa's overflow flags a row; the excess is not counted
    if mon.variable_count:
        summary |= {"max_l0": mon.k, "overflow_rows": mon.overflow_rows}
        summary |= {"overflow_latents": mon.overflow_latents} if counted else {}
    overflowed = (f", {mon.overflow_rows} over max_l0={mon.k}"
                  + (f" ({mon.overflow_latents} latents beyond it)" if counted else "") if mon.variable_count else "")
    click.echo(f"monitor: {offset} rows, {skipped} skipped{overflowed}", err=True)
    if jsonl:
        click.echo(dumps({"summary": summary}), err=True)
