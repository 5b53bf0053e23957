"""Prune a dense SAE (TopK, JumpReLU or BatchTopK) to an Expander SAE: keep ``d`` decoder entries per latent.

Masks (which ``d`` model dims each latent keeps):

- ``expander``: the seeded expander mask (``mask.expander_mask``); only the seed is stored.
- ``topd``: each latent's ``d`` largest-|w| decoder entries (data-aware; explicit indices).
- ``search``: ``search_seeds`` expander seeds ``seed, seed+1, …``; keeps the seed whose mask
  keeps the most decoder energy (data-aware choice, seed-only storage).

Decoder values are the dense decoder entries on the mask: for each latent, ``s·P(w)`` (``P``: keep
the ``d`` masked entries) is closest to the dense row ``w`` at ``s = 1``, so no rescaling (restoring
the row's norm instead makes the kept entries overshoot). The encoder is ``untied`` (the default:
the dense encoder's entries on the same support) or tied (the decoder's values). Biases,
activation ordering and input normalisation are carried over.

The defaults (``topd`` mask, untied encoder) are the recipe that keeps the most of the dense SAE.
``calibrate`` fits, on activations, one reconstruction scale and the output bias by least squares;
``encode`` stays the same (tied: up to the same positive factor), so the fit can only lower the
error on those rows, to at most predicting their mean (FVU ≤ 1).

Threshold SAEs (``jumprelu``, ``batchtopk``) keep their activation and copy θ, but the projected
pre-activations differ from the dense ones, so θ no longer fires as often. With activations,
``recalibrate_thresholds`` comes first: it sets θ so that every latent (``batchtopk``: the one
global θ, the mean L0) fires as often as the dense SAE's on those rows, and the cap ``k`` from the
result's per-row L0 (``models.l0_cap``). ``calibrate`` then fits the decoder on the codes those
thresholds give, and keeps them (tied: θ scales with the encoder).
"""

from __future__ import annotations

import math

import torch

from ..activations import ActivationSource
from ..errors import SaeCompressError, check_choice
from ..mask import expander_mask
from ..models import ENCODERS, ExpanderSAE, TopKSAE, active_counts, l0_cap

MASKS = ("expander", "topd", "search")
DEFAULT_D = 7
DEFAULT_MASK = "topd"
DEFAULT_PURSUIT_RULE = "abs_topk"  # a pursuit encoder's rule: |correlation|, signed codes (docs/FIDELITY.md)
DEFAULT_ENCODER = "untied"
_ROW_CHUNK = 8192  # decoder rows per chunk for |W| top-d (bounds the temporary to chunk × m)


def _decoder(dense: TopKSAE) -> torch.Tensor:
    return dense.W_dec.detach().to(torch.float32)


def kept_energy(dense: TopKSAE, indices: torch.Tensor) -> float:
    """Fraction of the decoder's squared Frobenius norm on the mask ``indices [n, d]``."""
    W = _decoder(dense)
    total = float(W.norm(dim=1).double().pow(2).sum())
    kept = float(W.gather(1, indices).double().pow(2).sum())
    return kept / total if total > 0 else 0.0


def topd_indices(W_dec: torch.Tensor, d: int) -> torch.Tensor:
    """Each row's ``d`` largest-|w| columns, ascending, ``[n, d]`` int64."""
    parts = [chunk.abs().topk(d, dim=1).indices for chunk in W_dec.split(_ROW_CHUNK)]
    return torch.cat(parts).sort(dim=1).values


def search_seed(W_dec: torch.Tensor, d: int, seeds: range) -> tuple[int, float]:
    """``(seed, kept squared norm)`` of the expander seed in ``seeds`` keeping the most decoder energy.

    Each candidate costs one mask and one ``[n, d]`` gather — no ``[n, m]`` temporary. Ties go to
    the smallest seed.
    """
    n, m = W_dec.shape
    best_seed, best = seeds[0], -1.0
    for seed in seeds:
        idx = torch.from_numpy(expander_mask(m, n, d, seed))
        energy = float(W_dec.gather(1, idx).double().pow(2).sum())
        if energy > best:
            best_seed, best = seed, energy
    return best_seed, best


@torch.no_grad()
def convert(dense: TopKSAE, d: int, *, mask: str = DEFAULT_MASK, seed: int = 0, search_seeds: int = 64,
            encoder: str = DEFAULT_ENCODER) -> ExpanderSAE:
    """Project ``dense`` onto a ``d``-per-latent mask; returns the ``ExpanderSAE``."""
    if not isinstance(dense, TopKSAE):
        raise SaeCompressError(f"convert needs a dense TopKSAE, got {type(dense).__name__}")
    check_choice("mask", mask, MASKS)
    check_choice("encoder", encoder, ENCODERS)
    if not isinstance(d, int) or not 1 <= d <= dense.m:
        raise SaeCompressError(f"--d {d} must be between 1 and the model dim m={dense.m}")
    if search_seeds < 1:
        raise SaeCompressError(f"--search-seeds must be at least 1, got {search_seeds}")
    W = _decoder(dense)
    common = dict(activation=dense.activation, encoder=encoder, normalize_input=dense.normalize_input,
                  threshold=dense.threshold)
    if mask == "topd":
        sae = ExpanderSAE(dense.m, dense.n, d, dense.k, indices=topd_indices(W, d), **common)
    else:
        if mask == "search":
            seed = search_seed(W, d, range(seed, seed + search_seeds))[0]
        sae = ExpanderSAE(dense.m, dense.n, d, dense.k, seed=seed, **common)
    sae.values.copy_(W.gather(1, sae.indices))
    if sae.enc_values is not None:
        sae.enc_values.copy_(dense.W_enc.detach().to(torch.float32).T.gather(1, sae.indices))
    if encoder != "pursuit":
        sae.b_enc.copy_(dense.b_enc.detach())
    sae.b_dec.copy_(dense.b_dec.detach())
    return sae


@torch.no_grad()
def calibrate(sae: ExpanderSAE, source: ActivationSource, *, batch_size: int = 4096,
              max_rows: int | None = None) -> dict[str, float | int]:
    """Fit ``x̂ = b + c·r`` (``r``: the decode without ``b_dec``) to ``source`` by least squares, in place.

    In the SAE's input space (after its layer norm, if any) over the first ``max_rows`` rows:
    ``c = cov(x, r) / var(r)`` (clipped at 0), ``b = mean(x) − c·mean(r)``. Decoder values are
    scaled by ``c`` (tied: values and ``b_enc`` by ``√c``, which keeps the top-k choice) and
    ``b_dec`` becomes ``b``, with ``b_enc`` shifted by ``<e_i, Δb>`` so every pre-activation, hence
    the code, is unchanged (a threshold θ scales with the tied encoder). ``c = 0`` predicts the
    mean, so the fitted error is at most the variance. Returns the fit: ``{"scale": c, "rows": rows used}``.
    """
    if max_rows is not None:
        source = source.select(0, min(max_rows, source.num_rows))
    if source.num_rows < 2:
        raise SaeCompressError(f"{source.path}: calibrating needs at least 2 activation rows")
    sums = torch.zeros(2, sae.m, dtype=torch.float64)  # Σx, Σr
    xr = rr = 0.0
    for x in source.iter_batches(batch_size):
        values, indices = sae.encode(x)
        r = (sae.decode(values, indices) - sae.b_dec).double()
        x = sae.normalise(x.to(sae.b_dec.dtype))[0].double()
        sums += torch.stack([x.sum(0), r.sum(0)])
        xr += float((x * r).sum())
        rr += float((r * r).sum())
    rows = source.num_rows
    mean_x, mean_r = sums / rows
    var_r = rr - rows * float(mean_r @ mean_r)
    c = max(0.0, (xr - rows * float(mean_x @ mean_r)) / var_r) if var_r > 0 else 0.0
    enc_scale = 1.0 if sae.enc_values is not None else math.sqrt(c)
    shift = (mean_x - c * mean_r).to(sae.b_dec.dtype) - sae.b_dec
    if sae.encoder != "pursuit":  # pursuit codes follow the residual: nothing to shift
        sae.b_enc.add_((sae.encoder_values * shift[sae.indices]).sum(1)).mul_(enc_scale)
    sae.values.mul_(c / enc_scale if enc_scale > 0 else 0.0)
    sae.b_dec.add_(shift)
    if sae.threshold is not None:
        sae.threshold.mul_(enc_scale)
    return {"scale": c, "rows": rows}


def _cut(ranked: torch.Tensor, fires: torch.Tensor) -> torch.Tensor:
    """Thresholds ``[c]`` under which exactly ``fires [c]`` of each row of ``ranked [c, N]`` (sorted
    descending) lie strictly above (fewer only at ties): midway between the last value kept and the
    first one dropped; beyond the extreme value (finite) when all or none are kept."""
    last = ranked.shape[1] - 1
    kept = ranked.gather(1, (fires - 1).clamp(0, last)[:, None])[:, 0]
    dropped = ranked.gather(1, fires.clamp(0, last)[:, None])[:, 0]
    mid = dropped + (kept - dropped) / 2
    theta = torch.where(mid < kept, mid, dropped)  # adjacent floats: the dropped one, still not above
    margin = ranked.abs().amax(1) * 1e-3 + 1e-6
    theta = torch.where(fires <= 0, ranked[:, 0] + margin, theta)
    return torch.where(fires > last, ranked[:, -1] - margin, theta)


@torch.no_grad()
def recalibrate_thresholds(sae: ExpanderSAE, dense: TopKSAE, x: torch.Tensor) -> dict[str, float | int]:
    """Set the threshold θ and the cap ``k`` of the threshold SAE ``sae`` (projected from ``dense``)
    from the rows ``x [N, m]``, in place.

    ``jumprelu``: each latent's θ is the cut of its pre-activations on ``x`` above which it fires on
    as many rows as the dense latent does (a latent the dense SAE never fires: above its largest
    pre-activation there; a latent fires only where its pre-activation is positive, which can keep it
    below the dense rate). ``batchtopk``: the one θ over all pre-activations that fires as many
    (latent, row) pairs as the dense SAE, i.e. the same mean L0. Both work in latent chunks (memory
    O(N·chunk); ``batchtopk`` also keeps its N·L0 largest values). Then ``k = models.l0_cap`` of the
    per-row L0. Returns ``{"rows", "l0_dense", "l0_before" (θ as it was), "l0_after", "max_l0"}``.
    """
    if sae.threshold is None or dense.activation != sae.activation:
        raise SaeCompressError(f"recalibrating thresholds needs a threshold SAE and its dense source; got "
                               f"{sae.activation!r} and {dense.activation!r}")
    dense_rows, dense_fires = active_counts(dense, x)
    rows = dense_rows.numel()
    if rows < 1:
        raise SaeCompressError("recalibrating thresholds needs at least 1 activation row")
    before = active_counts(sae, x)[0]
    if sae.activation == "batchtopk":
        total = int(dense_fires.sum())
        best = None
        for _, pre in sae.pre_activation_chunks(x):
            pool = pre.reshape(-1) if best is None else torch.cat([best, pre.reshape(-1)])
            best = pool.topk(min(total + 1, pool.numel())).values
        theta = _cut(best[None], torch.tensor([total])).expand(sae.n)
    else:
        theta = torch.empty(sae.n)
        for start, pre in sae.pre_activation_chunks(x):
            ranked = pre.T.sort(dim=1, descending=True).values
            theta[start:start + pre.shape[1]] = _cut(ranked, dense_fires[start:start + pre.shape[1]])
    sae.threshold.copy_(theta)
    after = active_counts(sae, x)[0]
    sae.k = l0_cap(after, sae.n)
    return {"rows": rows, "l0_dense": float(dense_rows.double().mean()), "l0_before": float(before.double().mean()),
            "l0_after": float(after.double().mean()), "max_l0": sae.k}
