"""The ranks of a data-parallel run and the few collectives training needs (torch.distributed).

A ``Group`` is this process's place in a run: ``rank`` of ``world`` processes. With one process
(``LOCAL``) every collective is the identity, so the trainer has one code path. With several, each
rank holds an equal, contiguous part of every global batch; the losses are normalised by the global
batch's variance, gradients summed, firing statistics combined and the rows a re-aim looks at
gathered, so every rank takes the same step as a one-process run on the whole batch (within float
rounding). The process group itself is set up by the edge (``launch.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import SaeCompressError


class RankLost(SaeCompressError):
    """Another rank of the run stopped (or could not be reached) during a collective."""


@dataclass(frozen=True)
class Group:
    """This process's ``rank`` among ``world`` processes of one run (``LOCAL``: one process)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this rank writes files and reports progress."""
        return self.rank == 0

    def part(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch (its first axis split into ``world`` equal parts)."""
        if self.world == 1:
            return rows
        if rows.shape[0] % self.world:
            raise SaeCompressError(f"a batch of {rows.shape[0]} rows does not split into {self.world} equal parts; "
                                   f"use a --batch-size that is a multiple of {self.world}")
        size = rows.shape[0] // self.world
        return rows[self.rank * size:(self.rank + 1) * size]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (in place; returned)."""
        if self.world > 1:
            _collective(dist.all_reduce, t)
        return t

    def any(self, flags: torch.Tensor) -> torch.Tensor:
        """Bool ``flags`` or-ed over the ranks."""
        return self.sum(flags.to(torch.int32)) > 0 if self.world > 1 else flags

    def smallest(self, value: int) -> int:
        """The smallest of the ranks' ``value``."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        _collective(dist.all_reduce, t, dist.ReduceOp.MIN)
        return int(t)

    def gather(self, t: torch.Tensor, owner: int | None = None) -> torch.Tensor | None:
        """Every rank's ``t [b_r, ...]`` (any ``b_r``) concatenated in rank order, on rank ``owner`` (``None``
        elsewhere), or on every rank when ``owner`` is ``None``."""
        if self.world == 1:
            return t
        counts = torch.zeros(self.world, dtype=torch.int64)
        counts[self.rank] = t.shape[0]
        self.sum(counts)
        padded = t.new_zeros((int(counts.max()), *t.shape[1:]))
        padded[:t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)] if owner in (None, self.rank) else None
        if owner is None:
            _collective(dist.all_gather, parts, padded)
        else:
            _collective(dist.gather, padded, parts, owner)
        if parts is None:
            return None
        return torch.cat([part[:count] for part, count in zip(parts, counts.tolist())])

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` on every rank (in place; returned)."""
        if self.world > 1:
            _collective(dist.broadcast, t, 0)
        return t

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the ranks, as one flat buffer (a missing gradient counts as zero)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.sum(torch.cat([g.reshape(-1) for g in grads]))
        for p, piece in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = piece.view_as(p).clone()


LOCAL = Group()


def _collective(op, *args) -> None:
    try:
        op(*args)
    except RuntimeError as e:  # gloo: a peer closed the connection or timed out
        raise RankLost(f"another rank of this run stopped ({str(e).splitlines()[0][:200]}); this rank stops too. "
                       "The last checkpoint is intact: rerun with --resume") from None
