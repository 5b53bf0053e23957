"""``saecompress info``: what a compact file holds and how much it saves."""

from __future__ import annotations

import click

from .._json import dumps
from ..compact import dense_values, learned_values, load_compact, read_compact_metadata
from ..errors import SaeCompressError
from ..sources import HubAccess, compact_files, resolve, what_is
from .options import hub_options


def describe(src: str, hub: HubAccess | None = None) -> list[dict]:
    """The facts ``info`` prints for each compact file ``src`` names (a file, a folder of them, or ``hf://``)."""
    path, hookpoint = resolve(src, hub=hub)
    files = compact_files(path, hookpoint)
    if not files:
        raise SaeCompressError(f"{src}: {what_is(path / hookpoint if hookpoint else path)} "
                               "(`info` shows compact SAE files)")
    return [_facts(file) for file in files]


def _facts(compact) -> dict:
    load_compact(compact)  # full check: tensors vs metadata, finite values, mask hash
    meta = read_compact_metadata(compact)
    file_bytes = compact.stat().st_size
    dense = dense_values(meta["m"], meta["n"])
    return {
        "hookpoint": meta["source"].get("hookpoint"), "path": str(compact),
        "m": meta["m"], "n": meta["n"], "d": meta["d"], "k": meta["k"],
        "activation": meta["activation"], "encoder": meta["encoder"],
        "normalize_input": meta["normalize_input"], "dtype": meta["dtype"],
        "mask": meta["mask"], "mask_algorithm": meta.get("mask_algorithm"),
        "mask_seed": meta.get("mask_seed"), "indices_sha256": meta["indices_sha256"],
        "file_bytes": file_bytes,
        "learned_values": learned_values(meta["m"], meta["n"], meta["d"], meta["encoder"]),
        "dense_values": dense,
        "compression_ratio": round(4 * dense / file_bytes, 2),
        "source": meta["source"], "user": meta["user"],
    }


def _human_bytes(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    raise AssertionError


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
        ("on disk", f"{_human_bytes(facts['file_bytes'])} ({facts['file_bytes']:,} bytes)"),
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
