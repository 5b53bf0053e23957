"""``saecompress info``: what a compact file (or a dense SAE) holds and how much it saves."""

from __future__ import annotations

import click

from .._json import dumps
from ..info import describe
from ..sources import HubAccess
from ..units import human_bytes
from .options import hub_options


@click.command()
@click.argument("src")
@hub_options
@click.option("--json", "as_json", is_flag=True,
              help='Print one JSON object {"hookpoints": [facts, ...]} instead of a table.')
def info(src: str, hub: HubAccess, as_json: bool) -> None:
    """Show sizes and settings of the compact file SRC (a path, a folder of compact files, or
    hf://owner/repo[/hookpoint][@rev]), or the settings of a dense SAE (each hookpoint of a
    multi-SAE source); threshold SAEs show their thresholds' dtype and range.

    The compression ratio compares the file with an equivalent dense TopK SAE stored in float32
    (2·m·n + m + n values).
    """
    all_facts = describe(src, hub)
    if as_json:
        click.echo(dumps({"hookpoints": all_facts}))
        return
    for i, facts in enumerate(all_facts):
        if i:
            click.echo("")
        _print_table(facts)


def _print_table(facts: dict) -> None:
    compact = "mask" in facts
    layer_norm = ", layer-normed input" if facts["normalize_input"] else ""
    rows = [("file", facts["path"])]
    if compact:
        mask = (f"{facts['mask_algorithm']} seed {facts['mask_seed']}" if facts["mask"] == "seed"
                else "explicit indices")
        rows += [
            ("shape", f"m={facts['m']}  n={facts['n']}  d={facts['d']}  k={facts['k']}"),
            ("activation", f"{facts['activation']} ({facts['encoder']} encoder{layer_norm})"),
        ]
    else:
        d = f"  d={facts['d']}" if facts["d"] is not None else ""
        rows += [
            ("format", f"{facts['format']} ({facts['source_dtype']}); convert it with `saecompress convert`"),
            ("shape", f"m={facts['m']}  n={facts['n']}{d}  k={facts['k']}"),
            ("activation", facts["activation"] + (f" ({layer_norm[2:]})" if layer_norm else "")),
        ]
    if "threshold_dtype" in facts:
        rows.append(("threshold", f"{facts['threshold_dtype']}, min {facts['threshold_min']:.4g}, median "
                                  f"{facts['threshold_median']:.4g}, max {facts['threshold_max']:.4g}"))
    if compact:
        rows += [
            ("mask", mask),
            ("dtype", facts["dtype"]),
            ("on disk", f"{human_bytes(facts['file_bytes'])} ({facts['file_bytes']:,} bytes)"),
            ("learned values", f"{facts['learned_values']:,} (dense TopK SAE: {facts['dense_values']:,})"),
            ("compression", f"{facts['compression_ratio']:,}x vs dense float32"),
        ]
    if facts["source"]:
        rows.append(("source", ", ".join(f"{k}={v}" for k, v in facts["source"].items())))
    if facts.get("user"):
        rows.append(("metadata", dumps(facts["user"])))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")
