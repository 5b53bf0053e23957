"""``saecompress info``: what a compact file holds and how much it saves."""

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
    hf://owner/repo[/hookpoint][@rev]).

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
    mask = (f"{facts['mask_algorithm']} seed {facts['mask_seed']}" if facts["mask"] == "seed"
            else "explicit indices")
    rows = [
        ("file", facts["path"]),
        ("shape", f"m={facts['m']}  n={facts['n']}  d={facts['d']}  k={facts['k']}"),
        ("activation", f"{facts['activation']} ({facts['encoder']} encoder"
                       + (", layer-normed input)" if facts["normalize_input"] else ")")),
        ("mask", mask),
        ("dtype", facts["dtype"]),
        ("on disk", f"{human_bytes(facts['file_bytes'])} ({facts['file_bytes']:,} bytes)"),
        ("learned values", f"{facts['learned_values']:,} (dense TopK SAE: {facts['dense_values']:,})"),
        ("compression", f"{facts['compression_ratio']:,}x vs dense float32"),
    ]
    if facts["source"]:
        rows.append(("source", ", ".join(f"{k}={v}" for k, v in facts["source"].items())))
    if facts["user"]:
        rows.append(("metadata", dumps(facts["user"])))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")
