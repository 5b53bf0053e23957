"""Which latents fire: firing masks, tokens since each latent last fired, and clearing a revived
latent's optimizer moments. Training, fine-tuning and the fidelity metrics all count firing here.

A latent *fires* on a row when it is among the row's top-k with a nonzero value; it is *dead*
once it has not fired for ``dead_tokens`` tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fired(top_values: Tensor, top_indices: Tensor, n: int) -> Tensor:
    """``[n]`` bool: the latents with a nonzero value in the codes ``top_values, top_indices [..., k]``."""
    out = torch.zeros(n, dtype=torch.bool)
    out[top_indices.detach()[top_values.detach() != 0]] = True
    return out


class DeadLatents:
    """Tokens since each of ``n`` latents last fired; dead after ``dead_tokens`` of them."""

    def __init__(self, n: int, dead_tokens: int):
        self.dead_tokens = dead_tokens
        self.since_fired = torch.zeros(n, dtype=torch.int64)

    def update(self, fired: Tensor, tokens: int) -> None:
        """Count a batch of ``tokens`` in which the latents flagged in ``fired [n]`` fired."""
        self.since_fired += tokens
        self.since_fired[fired] = 0

    def mask(self) -> Tensor:
        """``[n]`` bool: the dead latents."""
        return self.since_fired >= self.dead_tokens

    def indices(self) -> Tensor:
        """The dead latents' indices."""
        return self.mask().nonzero().squeeze(1)

    def fraction(self) -> float:
        """The fraction of latents that are dead."""
        return float(self.mask().double().mean())

    def revived(self, latents: Tensor) -> None:
        """Start counting ``latents`` afresh (they were put back into the competition)."""
        self.since_fired[latents] = 0


@torch.no_grad()
def reset_moments(optimizer: torch.optim.Optimizer, param: Tensor, latents: Tensor, axis: int = 0) -> None:
    """Zero the optimizer's per-element state (Adam's moments) of ``latents`` along ``axis`` of ``param``."""
    for moment in optimizer.state.get(param, {}).values():
        if moment.shape == param.shape:  # not Adam's scalar step counter
            moment.index_fill_(axis, latents, 0)
