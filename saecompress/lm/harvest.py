"""Harvest activations: a causal LM run over text, the rows at one site written as activation shards."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .._io import check_outputs
from ..activations import ShardWriter, check_shard_folder
from ..arrays import open_array_file
from ..distributed import LOCAL, Group
from ..errors import SaeCompressError
from .model import capture, context_batches, hookpoint, keep_mask, site_module


def check_harvest(out: str | os.PathLike, tokens: int, *, overwrite: bool = False,
                  inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """What :func:`harvest` refuses before reading any text; call it before loading the model.

    ``tokens < 1``, and an ``out`` folder that holds files (unless ``overwrite``), holds or lies
    inside one of ``inputs``, or cannot be written.
    """
    if tokens <= 0:
        raise SaeCompressError(f"--tokens must be positive, got {tokens}")
    check_outputs([out], inputs, kind="folder")
    check_shard_folder(out, overwrite)


def harvest(model: nn.Module, tokenizer: Any, texts: Iterable[str], layer: int, site: str = "resid", *,
            tokens: int, out: str | os.PathLike, context: int = 256, batch: int = 8,
            drop_first: bool = True, outlier_factor: float | None = 10.0, dtype: str = "float32",
            shard_rows: int = 65536, overwrite: bool = False, metadata: dict[str, Any] | None = None,
            progress: bool = True, group: Group = LOCAL, run_id: str = "") -> dict[str, Any]:
    """Write ``tokens`` activation rows at ``(layer, site)`` as shards + ``manifest.json`` in ``out``.

    Rows are the tokens :func:`keep_mask` keeps, in text order. If the texts run out first, fewer
    rows are written (``num_rows`` in the returned manifest says how many). Returns the manifest.

    With several ranks (``group``; ``run_id`` names the run, the same on every rank) rank ``r`` runs the LM on
    every ``world``-th batch of contexts, from the ``r``-th on, and writes its share of the rows as
    ``shard-r<r>-*`` files into one temporary folder; rank 0 writes the one manifest (rank 0's shards first)
    and moves the folder into place once every rank is done.
    """
    check_harvest(out, tokens, overwrite=overwrite)
    site_module(model, layer, site)  # validate before reading any text
    world, rank = group.world, group.rank
    wanted = tokens // world + (rank < tokens % world)
    stats = {"tokens_seen": 0, "dropped_first": 0, "dropped_massive": 0}
    writer: ShardWriter | None = None
    staging = f".{Path(out).name}.{run_id or 'ranks'}.tmp" if world > 1 else None
    bar = tqdm(total=tokens, unit="tok", desc=f"acts {hookpoint(layer, site)}", disable=not (progress and group.main))
    try:
        written = 0
        for index, ids in enumerate(context_batches(tokenizer, texts, context, batch)):
            if index % world != rank:
                continue
            acts = capture(model, ids, layer, site)
            keep, first, massive = keep_mask(acts, drop_first=drop_first, outlier_factor=outlier_factor)
            rows = acts[keep][: wanted - written]
            if writer is None:
                writer = ShardWriter(out, acts.shape[-1], dtype=dtype, shard_rows=shard_rows, overwrite=overwrite,
                                     staging=staging, prefix=f"shard-r{rank}" if world > 1 else "shard")
            writer.add(rows)
            stats["tokens_seen"] += ids.numel()
            stats["dropped_first"] += first
            stats["dropped_massive"] += massive
            written += rows.shape[0]
            bar.update(rows.shape[0] * world)
            bar.set_postfix(dropped=stats["dropped_first"] + stats["dropped_massive"])
            if written >= wanted:
                break
        if writer is None:
            raise SaeCompressError("the given texts yield no complete context for this process; give more text or "
                                   "fewer processes")
        shards = writer.flush()
        if world > 1:  # every rank's counts (and a barrier: each rank's shards are on disk)
            counts = group.sum(torch.tensor([stats[name] for name in stats], dtype=torch.int64))
            stats = {name: int(value) for name, value in zip(stats, counts)}
            if not group.main:
                return {}
            shards = [{"file": f.name, "rows": open_array_file(f).rows}
                      for f in sorted(writer.folder.glob("shard-r*.safetensors"), key=_shard_order)]
        meta = {"model": getattr(model.config, "_name_or_path", None) or type(model).__name__,
                "architecture": type(model).__name__, "layer": layer, "site": site,
                "hookpoint": hookpoint(layer, site), "context": context, "drop_first": drop_first,
                "outlier_factor": outlier_factor, **stats, **({"processes": world} if world > 1 else {}),
                **(metadata or {})}
        writer.write_manifest(shards, meta)
        return {"m": writer.m, "num_rows": sum(s["rows"] for s in shards), "dtype": dtype, **meta, "shards": shards}
    except BaseException:
        if writer is not None and group.main:
            writer.discard()
        raise
    finally:
        bar.close()


def _shard_order(path: Path) -> tuple[int, str]:
    return int(path.name.split("-")[1][1:]), path.name


def harvest_files(model_path: str, gguf_file: str | None, files: list[Path], layer: int, site: str,
                  **kwargs: Any) -> dict[str, Any]:
    """``harvest`` with the model loaded and the text files read here (what each rank of ``acts --nproc N``
    runs); ``kwargs`` go to ``harvest``."""
    from ..launch import run_id
    from ..texts import read_texts
    from .model import load_model

    model, tokenizer = load_model(model_path, gguf_file)
    return harvest(model, tokenizer, read_texts(files), layer, site, run_id=run_id(), **kwargs)
