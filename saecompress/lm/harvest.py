"""Harvest activations: a causal LM run over text, the rows at one site written as activation shards."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from .._io import check_outputs
from ..activations import ShardWriter, check_shard_folder
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
            progress: bool = True) -> dict[str, Any]:
    """Write ``tokens`` activation rows at ``(layer, site)`` as shards + ``manifest.json`` in ``out``.

    Rows are the tokens :func:`keep_mask` keeps, in text order. If the texts run out first, fewer
    rows are written (``num_rows`` in the returned manifest says how many). Returns the manifest.
    """
    check_harvest(out, tokens, overwrite=overwrite)
    site_module(model, layer, site)  # validate before reading any text
    stats = {"tokens_seen": 0, "dropped_first": 0, "dropped_massive": 0}
    writer: ShardWriter | None = None
    bar = tqdm(total=tokens, unit="tok", desc=f"acts {hookpoint(layer, site)}", disable=not progress)
    try:
        written = 0
        for ids in context_batches(tokenizer, texts, context, batch):
            acts = capture(model, ids, layer, site)
            keep, first, massive = keep_mask(acts, drop_first=drop_first, outlier_factor=outlier_factor)
            rows = acts[keep][: tokens - written]
            if writer is None:
                writer = ShardWriter(out, acts.shape[-1], dtype=dtype, shard_rows=shard_rows, overwrite=overwrite)
            writer.add(rows)
            stats["tokens_seen"] += ids.numel()
            stats["dropped_first"] += first
            stats["dropped_massive"] += massive
            written += rows.shape[0]
            bar.update(rows.shape[0])
            bar.set_postfix(dropped=stats["dropped_first"] + stats["dropped_massive"])
            if written >= tokens:
                break
        meta = {"model": getattr(model.config, "_name_or_path", None) or type(model).__name__,
                "architecture": type(model).__name__, "layer": layer, "site": site,
                "hookpoint": hookpoint(layer, site), "context": context, "drop_first": drop_first,
                "outlier_factor": outlier_factor, **stats, **(metadata or {})}
        writer.close(meta)
        return {"m": writer.m, "num_rows": writer.num_rows, "dtype": dtype, **meta, "shards": writer.shards}
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    finally:
        bar.close()
