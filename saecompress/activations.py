"""Activation datasets on disk: ``[N, m]`` float arrays streamed in batches.

A source is a ``.npy`` file, a ``.safetensors`` file (tensor ``activations``, or its only tensor),
or a directory of such shards (optionally with the ``manifest.json`` that ``saecompress acts``
writes). Every command reads activations through ``open_activations``: an array ``[m]`` is one row,
``[N, m]`` N rows, and ``[B, T, m]`` (any leading axes) is flattened to ``[B·T, m]`` rows. Every shard is memory-mapped; batches are read on demand and converted to float32, so
a dataset never has to fit in memory.

Rows holding NaN or inf are rejected (``SaeCompressError`` naming the file and the row) when the
batch that contains them is read; ``ActivationSource.check()`` scans everything up front.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._io import AtomicDirectory, atomic_path, output_errors
from ._json import dumps
from .arrays import MANIFEST, ArrayFile, array_files
from .compact import write_safetensors
from .errors import SaeCompressError, check_choice

FORMAT_NAME = "saecompress-activations"
FORMAT_VERSION = 1
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHARD_DTYPES = tuple(_TORCH_DTYPES)  # storage dtypes of activation shards


class _Shard:
    """One ``arrays.ArrayFile`` read as float32 torch rows, NaN/inf refused."""

    def __init__(self, file: ArrayFile):
        self.file, self.path, self.array = file, file.path, file.array

    @property
    def rows(self) -> int:
        return self.file.rows

    def read_raw(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` (along the first axis) as a float32 tensor, NaN/inf included."""
        return torch.from_numpy(self.file.floats(start, stop))

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` as a float32 tensor; raises on NaN/inf."""
        return self._finite(self.read_raw(start, stop), np.arange(start, stop))

    def read_at(self, rows: np.ndarray) -> torch.Tensor:
        """The rows at the sorted indices ``rows`` as a float32 tensor; raises on NaN/inf."""
        return self._finite(torch.from_numpy(self.file.floats_at(rows)), rows)

    def _finite(self, t: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        finite = torch.isfinite(t).all(dim=1)
        if not bool(finite.all()):
            row = int(rows[int((~finite).nonzero()[0, 0])])
            raise SaeCompressError(
                f"{self.path}: row {row} contains NaN or inf; re-harvest the activations or remove the bad rows"
            )
        return t


def shuffled_batches(num_rows: int, m: int, batch_size: int, *, seed: int = 0, buffer_rows: int | None = None,
                     chunk_rows: int = 1024, drop_last: bool = False) -> Iterator[torch.Tensor]:
    """Row indices ``[batch_size]`` of one shuffled epoch over ``num_rows`` rows of width ``m``.

    Contiguous chunks of ``chunk_rows`` rows are visited in a seeded random order and poured into a
    buffer of ``buffer_rows`` rows (default: 256 MiB of float32 rows, at least two batches); whenever
    the buffer is full it is permuted and all but about half a buffer is emitted, so a reader holds
    about 1.5 buffers of nearby rows. The same seed gives the same order; every rank of a
    data-parallel run computes it and reads only its own part of each batch.
    """
    gen = torch.Generator().manual_seed(seed)
    buffer_rows = max(buffer_rows or (1 << 28) // (4 * m), 2 * batch_size)
    chunk_rows = min(chunk_rows, buffer_rows)
    buf = torch.empty(0, dtype=torch.int64)
    for c in torch.randperm(-(-num_rows // chunk_rows), generator=gen).tolist():
        buf = torch.cat([buf, torch.arange(c * chunk_rows, min((c + 1) * chunk_rows, num_rows))])
        if len(buf) >= buffer_rows:
            perm = torch.randperm(len(buf), generator=gen)
            emit = (len(buf) - buffer_rows // 2) // batch_size * batch_size  # keeps < buffer_rows rows
            for i in range(0, emit, batch_size):
                yield buf[perm[i:i + batch_size]]
            buf = buf[perm[emit:]]
    perm = torch.randperm(len(buf), generator=gen)
    for i in range(0, len(buf), batch_size):
        if len(buf) - i < batch_size and drop_last:
            return
        yield buf[perm[i:i + batch_size]]


class ActivationSource:
    """A read-only view of rows ``[start, stop)`` of a list of ``[N_i, m]`` shards.

    Attributes: ``m`` (activation width), ``num_rows``, ``manifest`` (dict; empty without one),
    ``path``.
    """

    def __init__(self, shards: list[_Shard], manifest: dict[str, Any] | None = None, path: Path | None = None,
                 start: int = 0, stop: int | None = None):
        if not shards:
            raise SaeCompressError(f"{path}: no activation shards (.safetensors or .npy) found")
        widths = {s.array.shape[1] for s in shards}
        if len(widths) != 1:
            raise SaeCompressError(f"{path}: shards have different widths {sorted(widths)}; all must share m")
        self._shards = shards
        self._offsets = np.cumsum([0] + [s.rows for s in shards])
        total = int(self._offsets[-1])
        self.start = start
        self.stop = total if stop is None else stop
        self.m = int(widths.pop())
        self.num_rows = self.stop - self.start
        self.manifest = dict(manifest or {})
        self.path = path

    @classmethod
    def of_rows(cls, rows: torch.Tensor, name: str) -> ActivationSource:
        """A source over the float32 rows ``[N, m]`` held in memory (``name`` stands for a path in messages)."""
        array = rows.detach().float().contiguous().numpy()
        return cls([_Shard(ArrayFile(Path(name), array, bf16=False))], path=Path(name))

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return f"ActivationSource({self.path}, rows={self.num_rows}, m={self.m})"

    # -- views ------------------------------------------------------------------------------
    def select(self, start: int, stop: int) -> ActivationSource:
        """The view of rows ``[start, stop)`` of this source (indices relative to this view)."""
        if not 0 <= start <= stop <= self.num_rows:
            raise SaeCompressError(f"row range [{start}, {stop}) is outside 0..{self.num_rows} of {self.path}")
        return ActivationSource(self._shards, self.manifest, self.path, self.start + start, self.start + stop)

    def split(self, held_out_rows: int) -> tuple[ActivationSource, ActivationSource]:
        """``(train, held_out)``: the held-out part is the *last* ``held_out_rows`` rows.

        ``acts`` writes rows in text order, so the held-out rows come from the end of the corpus
        and never overlap the training rows.
        """
        if not 0 < held_out_rows < self.num_rows:
            raise SaeCompressError(
                f"held-out rows must be between 1 and {self.num_rows - 1} for {self.path} ({self.num_rows} rows)"
            )
        cut = self.num_rows - held_out_rows
        return self.select(0, cut), self.select(cut, self.num_rows)

    # -- reading ----------------------------------------------------------------------------
    def read(self, start: int, stop: int, *, finite: bool = True) -> torch.Tensor:
        """Rows ``[start, stop)`` of this view as one float32 ``[stop - start, m]`` tensor.

        NaN/inf rows raise unless ``finite=False`` (the monitor reports and skips them itself).
        """
        if not 0 <= start <= stop <= self.num_rows:
            raise SaeCompressError(f"row range [{start}, {stop}) is outside 0..{self.num_rows} of {self.path}")
        a, b = self.start + start, self.start + stop
        parts = []
        i = int(np.searchsorted(self._offsets, a, side="right")) - 1
        while a < b:
            lo = int(self._offsets[i])
            hi = min(b, int(self._offsets[i + 1]))
            if hi > a:
                shard = self._shards[i]
                parts.append(shard.read(a - lo, hi - lo) if finite else shard.read_raw(a - lo, hi - lo))
                a = hi
            i += 1
        if not parts:
            return torch.empty(0, self.m)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def read_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows at the indices ``rows [B]`` of this view, in that order, as float32 ``[B, m]``; raises on NaN/inf."""
        if rows.numel() == 0:
            return torch.empty(0, self.m)
        if int(rows.min()) < 0 or int(rows.max()) >= self.num_rows:
            raise SaeCompressError(f"row indices outside 0..{self.num_rows} of {self.path}")
        order = torch.argsort(rows)
        wanted = rows[order].numpy() + self.start
        out = torch.empty(len(wanted), self.m)
        bounds = np.searchsorted(wanted, self._offsets)
        for i, shard in enumerate(self._shards):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            if hi > lo:
                out[lo:hi] = shard.read_at(wanted[lo:hi] - int(self._offsets[i]))
        return out[torch.argsort(order)]

    def iter_batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                     buffer_rows: int | None = None, chunk_rows: int = 1024,
                     drop_last: bool = False) -> Iterator[torch.Tensor]:
        """One epoch of float32 ``[batch_size, m]`` batches; every row exactly once.

        Without ``shuffle`` rows come in order; with it, in the order of ``shuffled_batches`` (same
        arguments). The last batch may be short unless ``drop_last``.
        """
        if batch_size <= 0:
            raise SaeCompressError(f"batch size must be positive, got {batch_size}")
        if not shuffle:
            for s in range(0, self.num_rows, batch_size):
                e = min(s + batch_size, self.num_rows)
                if e - s < batch_size and drop_last:
                    return
                yield self.read(s, e)
            return
        for rows in shuffled_batches(self.num_rows, self.m, batch_size, seed=seed, buffer_rows=buffer_rows,
                                     chunk_rows=chunk_rows, drop_last=drop_last):
            yield self.read_rows(rows)

    def check(self) -> None:
        """Read every row once; raises ``SaeCompressError`` on the first NaN/inf row."""
        for _ in self.iter_batches(65536):
            pass


def open_activations(path: str | os.PathLike) -> ActivationSource:
    """Open a ``.npy``/``.safetensors`` file or a directory of shards as an :class:`ActivationSource`
    (``arrays.array_files`` lists them)."""
    shards, manifest, p = array_files(path)
    return ActivationSource([_Shard(shard) for shard in shards], manifest, p)


def check_shard_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an ``out_dir`` that already holds files unless ``overwrite`` (it is then replaced whole)."""
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise SaeCompressError(f"{out}: already exists and is not empty; choose another --out or remove it")


class ShardWriter:
    """Write ``[rows, m]`` activations as safetensors shards into a directory, atomically.

    Everything is written into a hidden temporary directory beside ``out_dir``; ``close()`` writes
    ``manifest.json`` last and renames the directory into place, so ``out_dir`` either holds a
    complete dataset or nothing. Use as a context manager (an exception discards the output).
    """

    def __init__(self, out_dir: str | os.PathLike, m: int, *, dtype: str = "float32",
                 shard_rows: int = 65536, overwrite: bool = False, staging: str | None = None, prefix: str = "shard"):
        """``staging``: the name of a temporary folder beside ``out_dir`` that several writers share (each with
        its own shard ``prefix``); one of them writes the manifest (``write_manifest``) and commits it."""
        check_choice("activation dtype", dtype, SHARD_DTYPES)
        self.out_dir = Path(out_dir)
        check_shard_folder(self.out_dir, overwrite)
        self.m = m
        self.dtype = dtype
        self.shard_rows = shard_rows
        self.overwrite = overwrite
        self.prefix = prefix
        self._staging = AtomicDirectory(self.out_dir, name=staging)
        self._tmp = self._staging.path
        self._pending: list[torch.Tensor] = []
        self._pending_rows = 0
        self.shards: list[dict[str, Any]] = []
        self.num_rows = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()

    def add(self, rows: torch.Tensor) -> None:
        """Append float rows ``[r, m]``; full shards are flushed to disk."""
        if rows.ndim != 2 or rows.shape[1] != self.m:
            raise SaeCompressError(f"activation rows must be [r, {self.m}], got {list(rows.shape)}")
        self._pending.append(rows.detach().to("cpu", _TORCH_DTYPES[self.dtype]))
        self._pending_rows += rows.shape[0]
        while self._pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        data = torch.cat(self._pending)
        shard, rest = data[:rows].contiguous(), data[rows:]
        self._pending = [rest] if len(rest) else []
        self._pending_rows = len(rest)
        name = f"{self.prefix}-{len(self.shards):05d}.safetensors"
        with output_errors(self.out_dir):
            write_safetensors(self._tmp / name, {"activations": shard}, {})
        self.shards.append({"file": name, "rows": int(shard.shape[0])})
        self.num_rows += int(shard.shape[0])

    @property
    def folder(self) -> Path:
        """The temporary folder the shards are written into until the manifest is."""
        return self._tmp

    def flush(self) -> list[dict[str, Any]]:
        """Write the rows still held; returns every shard written (``file``, ``rows``)."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        return self.shards

    def close(self, metadata: dict[str, Any] | None = None) -> Path:
        """Flush, write ``manifest.json`` (``metadata`` merged in) and move the directory into place."""
        return self.write_manifest(self.flush(), metadata)

    def write_manifest(self, shards: list[dict[str, Any]], metadata: dict[str, Any] | None = None) -> Path:
        """Write ``manifest.json`` listing ``shards`` (``metadata`` merged in) and move the directory into place."""
        manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "m": self.m,
                    "num_rows": sum(shard["rows"] for shard in shards), "dtype": self.dtype, **(metadata or {}),
                    "shards": shards}
        with output_errors(self.out_dir):
            (self._tmp / MANIFEST).write_text(dumps(manifest, indent=2) + "\n")
        return self._staging.commit()

    def discard(self) -> None:
        """Remove the partial output."""
        self._staging.discard()


def write_activations(path: str | os.PathLike, rows: torch.Tensor | np.ndarray) -> Path:
    """Write one ``[N, m]`` array as a single ``.safetensors`` or ``.npy`` file (by suffix), atomically.

    safetensors keeps float16/bfloat16/float32 (float64 is stored as float32); ``.npy`` keeps
    float16/32/64 (bfloat16 is stored as float32).
    """
    p = Path(path)
    t = torch.as_tensor(rows)
    if t.ndim != 2 or not t.is_floating_point():
        raise SaeCompressError(f"{p}: activations must be a float [N, m] array, got {t.dtype} {list(t.shape)}")
    if p.suffix == ".safetensors":
        write_safetensors(p, {"activations": t.float() if t.dtype == torch.float64 else t}, {})
    elif p.suffix == ".npy":
        if t.dtype == torch.bfloat16:
            t = t.float()
        with atomic_path(p) as tmp, open(tmp, "wb") as f:
            np.save(f, t.numpy())
    else:
        raise SaeCompressError(f"{p}: use a .safetensors or .npy file name for activations")
    return p
