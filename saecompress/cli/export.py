"""``saecompress export``: an SAE source → a self-contained ONNX file."""

from __future__ import annotations

import click
import onnx

from .._json import dumps
from ..errors import SaeCompressError
from ..exporters.library import LIBRARIES, export_library
from ..exporters.onnx import CAP_ROWS, DTYPES, GRAPHS, export_onnx, read_onnx_metadata
from .options import hub_options


@click.command("export")
@click.argument("src")
@click.argument("out", type=click.Path())
@click.option("--hookpoint", default=None, help="Which SAE of a multi-SAE source.")
@hub_options
@click.option("--format", "fmt", type=click.Choice(("onnx", *LIBRARIES)), default="onnx", show_default=True,
              help="onnx: a graph for onnxruntime (OUT a file). saelens / sparsify: the dense view in that library's "
                   "folder layout (OUT a folder: cfg.json + sae_weights.safetensors / sae.safetensors), for "
                   "SAE.load_from_disk, sparsify, SAEBench and Neuronpedia.")
@click.option("--approximate", is_flag=True,
              help="--format saelens/sparsify: write a signed_topk / abs_topk SAE as the library's ReLU top-k "
                   "(negative codes become 0) instead of refusing.")
@click.option("--model-name", default=None, help="--format saelens: the LM's name in cfg.json [default: the source's].")
@click.option("--hook-name", default=None,
              help="--format saelens: the hook in cfg.json, e.g. blocks.15.hook_resid_post [default: the source's].")
@click.option("--graph", type=click.Choice(GRAPHS), default="encode", show_default=True,
              help="encode: activations -> top_indices, top_values. decode: top_indices, top_values -> "
                   "reconstruction. autoencoder: activations -> reconstruction, top_indices, top_values.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="Dtype of the graph's float inputs/outputs and stored float32 weights (float16 halves "
                   "the file; arithmetic stays float32). Values stored as float16/bfloat16/int8 in a "
                   "compact file keep that storage and are dequantised in-graph.")
@click.option("--dense-output", is_flag=True,
              help="Also output the dense codes [.., n] (zeros except the k active latents).")
@click.option("--seq", is_flag=True,
              help="Inputs [batch, seq, m] instead of [batch, m] (both axes dynamic).")
@click.option("--inline", is_flag=True,
              help="Inline the custom-domain functions (onnx's own inliner): standard ops only, for tools and "
                   "runtimes that do not take model-local functions.")
@click.option("--opset", type=int, default=18, show_default=True,
              help="ONNX opset (18..21; IR version 10). onnxruntime >= 1.16 reads opset 18.")
@click.option("--max-l0", type=click.IntRange(min=1), default=None,
              help="Threshold SAEs (jumprelu, batchtopk): latents kept per row (default: the model's k when "
                   "k < n); the graph outputs how many latents each row had beyond it (overflow).")
@click.option("--acts", type=click.Path(exists=True), default=None,
              help=f"Threshold SAEs: take max_l0 from these activations (the 99.9th percentile of the per-row "
                   f"L0 on their first {CAP_ROWS:,} rows) instead of --max-l0.")
def export(src: str, out: str, hookpoint: str | None, hub, fmt: str, approximate: bool, model_name: str | None,
           hook_name: str | None, graph: str, dtype: str, dense_output: bool, seq: bool, inline: bool, opset: int,
           max_l0: int | None, acts: str | None) -> None:
    """Export the SAE SRC (compact file, dense SAE folder/file, or hf://owner/repo[/hookpoint][@rev])
    to the ONNX file OUT.

    Expander SAEs use the custom-domain ops ai.saecompress::ExpanderEncode / ExpanderDecode, stored
    as ONNX model-local functions of standard ops: stock onnxruntime runs the file, no plugin needed.
    Dense TopK SAEs export as MatMul + TopK with the same inputs and outputs. Threshold SAEs keep the
    max_l0 largest latents of their thresholded code (index -1 where fewer fire) and add an output
    overflow. Prints one JSON object
    {"hookpoints": [summary]}, the schema of convert/info/eval --json.

    \b
    Back to SAELens / sparsify (the dense view, in the library's own layout):
      saecompress export sae.safetensors sae-saelens/ --format saelens --hook-name blocks.15.hook_resid_post
    """
    ctx = click.get_current_context()
    onnx_only = [f"--{name.replace('_', '-')}" for name in ("graph", "dtype", "dense_output", "seq", "inline", "opset",
                                                           "max_l0", "acts")
                 if ctx.get_parameter_source(name).name == "COMMANDLINE"]
    library_only = [f"--{name.replace('_', '-')}" for name in ("approximate", "model_name", "hook_name")
                    if ctx.get_parameter_source(name).name == "COMMANDLINE"]
    if fmt != "onnx":
        if onnx_only:
            raise SaeCompressError(f"{onnx_only[0]} shapes an ONNX graph; --format {fmt} writes a folder: drop it")
        if fmt == "sparsify" and {"--model-name", "--hook-name"} & set(library_only):
            raise SaeCompressError("--model-name / --hook-name go into a SAELens cfg.json; sparsify's has no such "
                                   "fields: drop them")
        folder, notes = export_library(src, out, fmt, hookpoint=hookpoint, hub=hub, approximate=approximate,
                                       model_name=model_name, hook_name=hook_name)
        for note in notes:
            click.echo(f"note: {note}", err=True)
        click.echo(dumps({"hookpoints": [{"hookpoint": hookpoint, "path": str(folder), "format": fmt,
                                          "file_bytes": sum(f.stat().st_size for f in folder.iterdir())}]}))
        return
    if library_only:
        raise SaeCompressError(f"{library_only[0]} is for --format saelens / sparsify: drop it, or add --format")
    path = export_onnx(src, out, graph, dtype=dtype, dense_output=dense_output, opset=opset, seq=seq,
                       hookpoint=hookpoint, hub=hub, max_l0=max_l0, acts=acts, inline=inline)
    cap = read_onnx_metadata(onnx.load(str(path), load_external_data=False)).get("max_l0")  # the cap used
    click.echo(dumps({"hookpoints": [{"hookpoint": hookpoint, "path": str(path), "graph": graph, "dtype": dtype,
                                           "dense_output": dense_output, "seq": seq, "inline": inline,
                                           "opset": opset,
                                           **({} if cap is None else {"max_l0": int(cap)}),
                                           "file_bytes": path.stat().st_size}]}))
