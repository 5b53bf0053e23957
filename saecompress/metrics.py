"""Reconstruction fidelity of an SAE on activations: FVU, explained variance, L0, dead, cosine.

Definitions (SAELens / SAEBench):

- explained variance ``= 1 − E‖x − x̂‖² / (E‖x‖² − Σ_j (E x_j)²)``; FVU ``= 1 −`` explained variance.
  The expectations run over *all* rows of the window (not a per-batch average).
- L0: mean number of nonzero latents per row.
- dead fraction: fraction of latents never active (nonzero) over the window.
- cosine: mean over rows of ``cos(x, x̂)``.
- mse: mean squared error per element, ``E‖x − x̂‖² / m``.

All sums are accumulated in float64, so streaming over batches gives the same numbers as one
pass over the whole window. A window without variance (every row the same) is refused: its FVU
is undefined.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from .activations import ActivationSource
from .errors import SaeCompressError
from .latents import fired
from .models import SparseAutoencoder


class FidelityAccumulator:
    """Streaming float64 sums for the fidelity metrics; ``update`` per batch, ``result`` at the end.

    ``n`` (number of latents) enables the dead fraction; codes are optional per update.
    """

    def __init__(self, n: int | None = None):
        self.n = n
        self.rows = 0
        self.sum_x: torch.Tensor | None = None
        self.sum_sq = 0.0
        self.sum_err = 0.0
        self.sum_cos = 0.0
        self.sum_l0 = 0.0
        self.code_rows = 0
        self.fired = torch.zeros(n, dtype=torch.bool) if n else None

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, top_values: torch.Tensor | None = None,
               top_indices: torch.Tensor | None = None) -> None:
        """Add a batch ``x, x̂ [B, m]`` and optionally its codes ``top_values, top_indices [B, k]``."""
        x = x.detach().reshape(-1, x.shape[-1]).double()
        x_hat = x_hat.detach().reshape(-1, x.shape[-1]).double()
        s = x.sum(dim=0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.rows += x.shape[0]
        self.sum_sq += float((x * x).sum())
        self.sum_err += float(((x - x_hat) ** 2).sum())
        self.sum_cos += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum())
        if top_values is not None:
            nz = top_values.detach().reshape(-1, top_values.shape[-1]) != 0
            self.sum_l0 += float(nz.sum())
            self.code_rows += nz.shape[0]
            if self.fired is not None and top_indices is not None:
                self.fired |= fired(top_values, top_indices, self.n)

    def result(self) -> dict[str, Any]:
        """The metrics so far: ``fvu, explained_variance, mse, cosine`` (+ ``l0, dead_fraction``)."""
        if self.rows == 0:
            raise SaeCompressError("no activation rows to evaluate; the window is empty")
        mean = self.sum_x / self.rows
        variance = self.sum_sq / self.rows - float((mean * mean).sum())
        err = self.sum_err / self.rows
        if not variance > 1e-12 * self.sum_sq / self.rows:  # zero up to rounding
            raise SaeCompressError(f"every activation row is the same (zero variance over {self.rows} rows), so "
                                   "FVU is undefined; evaluate on real activations (more rows)")
        ev = 1.0 - err / variance
        out: dict[str, Any] = {"fvu": 1.0 - ev, "explained_variance": ev, "mse": err / self.sum_x.numel(),
                               "cosine": self.sum_cos / self.rows, "num_rows": self.rows}
        if self.code_rows:
            out["l0"] = self.sum_l0 / self.code_rows
        if self.fired is not None and self.code_rows:
            out["dead_fraction"] = 1.0 - float(self.fired.double().mean())
        return out


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, source: ActivationSource, *, batch_size: int = 4096,
             max_rows: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Fidelity of ``sae`` (TopKSAE or ExpanderSAE) on the first ``max_rows`` rows of ``source``.

    Returns ``fvu, explained_variance, l0, dead_fraction, cosine, mse, num_rows``.
    """
    if sae.m != source.m:
        raise SaeCompressError(
            f"SAE hidden size m={sae.m} does not match activations m={source.m} in {source.path}; "
            "use activations from the model and hookpoint the SAE was trained on"
        )
    if max_rows is not None:
        source = source.select(0, min(max_rows, source.num_rows))
    acc = FidelityAccumulator(sae.n)
    bar = tqdm(total=source.num_rows, unit="tok", desc="eval", disable=not progress, leave=False)
    for x in source.iter_batches(batch_size):
        x_hat, values, indices = sae.reconstruct(x)
        acc.update(x, x_hat, values, indices)
        bar.update(x.shape[0])
    bar.close()
    try:
        return acc.result()
    except SaeCompressError as err:
        raise SaeCompressError(f"{source.path or 'activations'}: {err}") from None
