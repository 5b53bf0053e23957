"""Distillation from a dense teacher, and latent agreement between teacher and student.

A converted ``ExpanderSAE`` shares its latent indices with the dense SAE it came from; training
it on reconstruction alone lets latents drift to new meanings. The latent term keeps student
latent ``i`` firing like teacher latent ``i``::

    T = teacher's active set, S = student's active set (per row)
    term = [ Σ_{i∈T} (pre_s[i] − c_t[i])²  +  Σ_{i∈S∖T} z_s[i]² ] / Σ_{i∈T} c_t[i]²

where ``c_t`` are the teacher's codes scaled by its decoder-row norms (the student's rows are
unit norm) and ``pre_s`` the student's pre-activations, computed only at the teacher's ``k``
latents (O(B·k·d)).
"""

from __future__ import annotations

from typing import Any

import torch

from .activations import ActivationSource
from .errors import SaeCompressError
from .models import ExpanderSAE, SparseAutoencoder, TopKSAE
from .sparse_ops import SparseForward


class DistillTerm:
    """The latent-matching term for one dense teacher (see the module docstring)."""

    def __init__(self, teacher: TopKSAE):
        self.teacher = teacher
        self.row_norms = teacher.W_dec.detach().norm(dim=1)

    def loss(self, sae: ExpanderSAE, x: torch.Tensor, xin: torch.Tensor, out: SparseForward,
             scale: float = 1.0) -> torch.Tensor:
        """Term for the raw batch ``x``, the student's input ``xin = x * scale`` and its ``out``."""
        with torch.no_grad():
            t_vals, t_idx = self.teacher.encode(x)
            t_vals = t_vals.to(xin.dtype) * (self.row_norms[t_idx].to(xin.dtype) * scale)
        B, k_t = t_idx.shape
        rows = sae.indices[t_idx].view(B, k_t * sae.d)
        xc = (xin - sae.b_dec).gather(1, rows).view(B, k_t, sae.d)
        pre_at = (xc * sae.encoder_values[t_idx]).sum(-1) + sae.b_enc[t_idx]
        matched = (pre_at - t_vals).pow(2).sum()
        in_teacher = (out.top_idx.unsqueeze(2) == t_idx.unsqueeze(1)).any(2)
        extra = out.top_vals.masked_fill(in_teacher, 0).pow(2).sum()
        return (matched + extra) / t_vals.pow(2).sum().clamp_min(1e-12)


@torch.no_grad()
def latent_agreement(teacher: SparseAutoencoder, student: SparseAutoencoder, source: ActivationSource, *,
                     threshold: float = 0.9, batch_size: int = 2048,
                     max_rows: int | None = None) -> dict[str, Any]:
    """Fraction of teacher-alive latents whose student activations correlate ≥ ``threshold``.

    Correlation (Pearson, over the rows of ``source``) between teacher latent ``i``'s code and
    student latent ``i``'s code. Alive: the teacher latent fires at least once. Returns
    ``agreement, mean_correlation, alive, threshold, num_rows``.
    """
    n = teacher.n
    if student.n != n:
        raise SaeCompressError(f"the teacher has {n} latents but the student has {student.n}; latent agreement "
                               "compares latent i of each, so give a student converted from this teacher")
    if max_rows is not None:
        source = source.select(0, min(max_rows, source.num_rows))
    sums = torch.zeros(5, n, dtype=torch.float64)  # t, s, t², s², t·s
    fired = torch.zeros(n, dtype=torch.bool)
    rows = 0
    for x in source.iter_batches(batch_size):
        t = teacher.encode(x, dense=True).double()
        s = student.encode(x, dense=True).double()
        sums += torch.stack([t.sum(0), s.sum(0), (t * t).sum(0), (s * s).sum(0), (t * s).sum(0)])
        fired |= (t != 0).any(0)
        rows += x.shape[0]
    mt, ms, mtt, mss, mts = sums / max(rows, 1)
    cov = mts - mt * ms
    denom = ((mtt - mt * mt).clamp_min(0) * (mss - ms * ms).clamp_min(0)).sqrt()
    corr = torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))
    alive = int(fired.sum())
    agree = int((corr[fired] >= threshold).sum())
    return {"agreement": agree / alive if alive else float("nan"),
            "mean_correlation": float(corr[fired].mean()) if alive else float("nan"),
            "alive": alive, "threshold": threshold, "num_rows": rows}

