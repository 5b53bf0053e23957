"""The two SAE models: ``TopKSAE`` (dense reference) and ``ExpanderSAE`` (d nonzeros per latent).

Both compute, for activations ``x [..., m]``::

    x'   = layer_norm(x) if normalize_input else x          # OpenAI-style inputs
    pre  = (x' - b_dec) @ W_enc + b_enc                     # [..., n]
    z    = top-k of pre, ordered by `activation`            # k (value, index) pairs
    x̂'   = z @ W_dec + b_dec;  x̂ = x̂' un-normalised

``activation`` is the ordering the source library used: ``topk_relu`` (top-k by value, then ReLU
on the kept values), ``relu_topk`` (ReLU, then top-k), ``signed_topk`` (top-k by value, no ReLU) or
``abs_topk`` (the k of largest |pre|, sign kept: AbsTopK);
or a threshold activation: ``jumprelu`` (per-latent threshold θ [n], code = ReLU(pre)·[pre > θ],
as SAELens / Gemma Scope / dictionary_learning JumpReLU) or ``batchtopk`` (BatchTopK inference: the
same with one global θ, stored as the [n] buffer filled with that value). θ is a float32 buffer
whatever the values' dtype (``.to(dtype)`` leaves it float32). A threshold SAE fires a variable
number of latents; ``k`` caps what ``encode`` returns (the top-k of the thresholded code): where
fewer fire, the remaining slots hold value 0 at latents that did not fire. Readers set ``k = n``;
with data, ``l0_cap`` sets it from the per-row L0 (``active_counts``).
A threshold model built without ``threshold`` starts at θ = 0.
``topafa`` (top-AFA, Lee et al. 2025) also fires a variable number, chosen per row by norm matching
(``select_afa``): no threshold; ``k`` is its cap in the same way. ``VARIABLE_COUNT`` names the
activations whose ``k`` is a cap (threshold ones and ``topafa``).

An ``ExpanderSAE``'s decoder row ``i`` is zero except ``values[i, j]`` at dim ``indices[i, j]``;
its encoder column ``i`` has the same support, with the same values (``encoder="tied"``) or its
own ``enc_values`` (``"untied"``). Encoding is a gather-and-reduce over latents in chunks, and
decoding a scatter-add of the k active rows: no m×n matrix is ever built. ``encoder="pursuit"`` has
no encoder at all: k rounds of matching pursuit over the decoder rows (:func:`pursue`; no ``b_enc``,
no pre-activations, a top-k ``activation`` only).

Models hold parameters and configuration only: where one came from and how a file stores it
travel beside it (``sources.Loaded``; writers take them explicitly).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .errors import SaeCompressError, check_choice
from .kinds import (ACTIVATIONS, ALL_ACTIVATIONS, ENCODERS, ORDERINGS, THRESHOLD_ACTIVATIONS,  # noqa: F401 (re-exported)
                    VARIABLE_COUNT)
from .mask import MASK_ALGORITHM, expander_mask

# A variable-count SAE's cap k, set on data: this quantile of its per-row L0 (``l0_cap``).
L0_CAP_QUANTILE = 0.999
Activation = Literal["topk_relu", "relu_topk", "signed_topk", "abs_topk", "jumprelu", "batchtopk", "topafa"]

LAYER_NORM_EPS = 1e-5
# Encode works on this many (latent, row) pre-activations at a time: bounds memory at any n.
_CHUNK_ELEMENTS = 1 << 22
_DENSE_GRAM_ELEMENTS = 1 << 26  # pursuit: the largest n·n Gram matrix kept dense (256 MiB in float32)


MATMUL_DECODE_LATENTS = 8192  # up to this many latents a dense SAE decodes its codes as one [B, n] @ [n, m] matmul
# (faster on CPU than gathering k decoder rows per token, in training and inference); above it, it gathers


def layer_norm(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OpenAI sparse_autoencoder's input normalisation: ``((x - mu) / (std + eps), mu, std)``."""
    mu = x.mean(dim=-1, keepdim=True)
    centred = x - mu
    std = centred.std(dim=-1, keepdim=True)
    return centred / (std + LAYER_NORM_EPS), mu, std


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    """``w`` with each row scaled to unit L2 norm (zero rows stay zero)."""
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def topk_scores(pre: torch.Tensor, activation: str, threshold: torch.Tensor | None = None,
                row_norms: torch.Tensor | None = None) -> torch.Tensor:
    """What top-k ranks under ``activation``: ``pre``, ``ReLU(pre)`` for ``relu_topk``, ``|pre|``
    for ``abs_topk``, the thresholded code ``ReLU(pre)·[pre > threshold]`` for a threshold activation,
    or ``ReLU(pre)·row_norms`` (each latent's share of the reconstruction norm) for ``topafa``."""
    if activation == "topafa":
        return torch.relu(pre) * row_norms.to(pre.dtype)
    if activation in THRESHOLD_ACTIVATIONS:
        return torch.relu(pre) * (pre > threshold)  # compared in float32: θ never rounds to pre's dtype
    rank = ORDERINGS[activation][0]
    return torch.relu(pre) if rank == "relu" else pre.abs() if rank == "abs" else pre


def ranked_values(pre: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor, activation: str) -> torch.Tensor:
    """The values of the top-k ``scores`` at ``indices`` of ``pre``: the scores themselves, the
    signed pre-activations under ``abs_topk``, or ``ReLU(pre)`` under ``topafa``."""
    if activation == "topafa":
        return torch.relu(pre.gather(-1, indices))
    return pre.gather(-1, indices) if ORDERINGS.get(activation, ("",))[0] == "abs" else scores


def topk_kept(values: torch.Tensor, activation: str) -> torch.Tensor:
    """The kept values under ``activation``: the ranked values, or their ReLU for ``topk_relu``."""
    return torch.relu(values) if activation in ORDERINGS and ORDERINGS[activation][1] else values


def relu_cuts(activation: str) -> bool:
    """Whether a ReLU (before or after top-k, or a threshold) zeroes some kept values' gradient."""
    return activation in VARIABLE_COUNT or ORDERINGS[activation][0] == "relu" or ORDERINGS[activation][1]


def select_topk(pre: torch.Tensor, k: int, activation: str, *, sorted: bool = True,
                threshold: torch.Tensor | None = None,
                among: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k kept ``(values, indices)`` of pre-activations ``pre [..., n]`` under ``activation``
    (``threshold [n]`` for the threshold activations), only among the latents flagged in ``among``
    when given (the others rank last; their values may be ``-inf``)."""
    scores = topk_scores(pre, activation, threshold)
    if among is not None:
        scores = scores.masked_fill(~among, float("-inf"))
    scores, indices = scores.topk(k, dim=-1, sorted=sorted)
    return topk_kept(ranked_values(pre, scores, indices, activation), activation), indices


def afa_count(scores: torch.Tensor, target: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(count [B], overflow [B] bool)`` of the top-AFA norm-matching rule on ``scores [B, c]``
    sorted descending (``c`` ≥ ``k``): with ``c_j = √(Σ_{l≤j} s_l²)``, ``count = argmin_{j≤k} |c_j − t|``
    (1-based, first minimum) for the target norm ``t = target [B]``; a row overflows when ``c > k``
    and ``|c_{k+1} − t| < |c_k − t|`` (the uncapped rule would keep more than ``k``)."""
    dtype = torch.promote_types(scores.dtype, torch.float32)
    cum = scores.detach().to(dtype).square().cumsum(-1).sqrt()
    err = (cum - target.detach().to(dtype).unsqueeze(-1)).abs()
    count = err[:, :k].argmin(-1) + 1
    if scores.shape[-1] > k:
        return count, err[:, k] < err[:, k - 1]
    return count, torch.zeros_like(count, dtype=torch.bool)


def afa_kept(values: torch.Tensor, scores: torch.Tensor, target: torch.Tensor,
             k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [B, k] past each row's count zeroed, overflow [B])``: the top-AFA rule
    (:func:`afa_count`) on candidates ``values``, ``scores [B, c]`` sorted by descending score."""
    count, overflow = afa_count(scores, target, k)
    keep = torch.arange(k, device=values.device) < count.unsqueeze(-1)
    return values[:, :k] * keep, overflow


def select_afa(pre: torch.Tensor, k: int, row_norms: torch.Tensor,
               target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values [B, k], indices [B, k], overflow [B])`` of top-AFA on ``pre [B, n]``: the ``k`` (+1 to
    see overflow) largest ``ReLU(pre)·row_norms``, then :func:`afa_kept` with ``target = ‖x' − b_dec‖``."""
    scores, indices = topk_scores(pre, "topafa", row_norms=row_norms).topk(min(k + 1, pre.shape[-1]), dim=-1)
    values, overflow = afa_kept(ranked_values(pre, scores, indices, "topafa"), scores, target, k)
    return values, indices[:, :k], overflow


def atom_overlaps(atoms: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(neighbours [n, w], gram [n, w])``: for each expander row, the rows sharing a dim with it and their
    inner products ``<A_i, A_l>`` (``atoms [n, d]`` on ``indices [n, d]``), padded with index 0 / value 0 to the
    widest row: the decoder's sparse Gram matrix (rows on d random dims of m meet few others)."""
    n, d = atoms.shape
    dims, order = indices.reshape(-1).sort(stable=True)
    latent, weight = order // d, atoms.reshape(-1)[order]
    per_dim = torch.bincount(dims)
    group = per_dim[dims]  # each entry pairs with every entry on its dim (itself included)
    left = torch.repeat_interleave(torch.arange(dims.numel(), device=dims.device), group)
    offset = torch.arange(left.numel(), device=dims.device) - torch.repeat_interleave(group.cumsum(0) - group, group)
    right = (per_dim.cumsum(0) - per_dim)[dims[left]] + offset
    key, where = torch.unique(latent[left] * n + latent[right], return_inverse=True)
    value = torch.zeros(key.numel(), dtype=atoms.dtype, device=atoms.device).index_add_(
        0, where, weight[left] * weight[right])
    row, col = key // n, key % n
    counts = torch.bincount(row, minlength=n)
    pos = torch.arange(row.numel(), device=row.device) - (counts.cumsum(0) - counts)[row]
    neighbours = torch.zeros(n, int(counts.max()), dtype=torch.long, device=row.device)
    gram = torch.zeros(n, int(counts.max()), dtype=atoms.dtype, device=row.device)
    neighbours[row, pos], gram[row, pos] = col, value
    return neighbours, gram


def pursuit_gram(atoms: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The decoder's Gram matrix in the form :func:`pursue` updates through: :func:`atom_overlaps`' sparse
    rows, or, when they are wide (over a quarter of n) and ``n²`` fits ``_DENSE_GRAM_ELEMENTS``, the dense
    ``[n, n]`` matrix with ``None`` for the neighbours (a round's update is then one contiguous row)."""
    neighbours, gram = atom_overlaps(atoms, indices)
    n = atoms.shape[0]
    if 4 * neighbours.shape[1] > n and n * n <= _DENSE_GRAM_ELEMENTS:
        return None, torch.zeros(n, n, dtype=gram.dtype, device=gram.device).scatter_add_(1, neighbours, gram)
    return neighbours, gram


def pursue(centred: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, k: int, activation: str,
           overlaps: tuple[torch.Tensor | None, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Matching pursuit over an expander's decoder rows: ``(codes [B, k], latents [B, k])`` for ``centred
    [B, m]`` (``x' − b_dec``), the k distinct latents in the order they were picked.

    Each round scores every latent's correlation ``c_i = <r, D_i>/‖D_i‖`` with the residual ``r``
    (:func:`topk_scores` under ``activation``: ``|c|`` for ``abs_topk``, ``c`` or ``ReLU(c)`` for the
    others), picks the best latent not yet picked, takes its code from :func:`topk_kept` (signed under
    ``abs_topk`` / ``signed_topk``, ≥ 0 under the ReLU orderings) and subtracts that code times its row
    from ``r``. Picking needs no gradient and no residual: one O(n·d) gather per row gives every ``c``,
    and each round updates them through the rows that overlap the picked one (:func:`atom_overlaps`).
    The codes are then recomputed along the picked latents from the residual, exactly and differentiably
    in ``centred`` and ``values`` (O(k·(m + d)) per row). ``overlaps``: :func:`pursuit_gram` (or
    :func:`atom_overlaps`) of these values, when the caller already has them."""
    norms = values.norm(dim=1).clamp_min(1e-12)
    atoms = values / norms.unsqueeze(1)

    def picked_code(corr: torch.Tensor) -> torch.Tensor:  # [B, 1] correlations of the picks -> their unit codes
        at = torch.zeros_like(corr, dtype=torch.long)
        return topk_kept(ranked_values(corr, topk_scores(corr, activation), at, activation), activation)

    with torch.no_grad():
        neighbours, gram = overlaps or pursuit_gram(atoms.detach(), indices)
        corr = F.embedding_bag(indices, centred.detach().T.contiguous(), mode="sum",
                               per_sample_weights=atoms.detach()).T.contiguous()
        scores = topk_scores(corr, activation)
        latents = []
        for _ in range(k):
            best = scores.argmax(dim=1, keepdim=True)
            kept = picked_code(corr.gather(1, best))
            if neighbours is None:  # a dense Gram matrix: every latent's correlation moves
                corr.sub_(kept * gram[best[:, 0]])
                scores = topk_scores(corr, activation)
            else:
                touched = neighbours[best[:, 0]]
                corr.scatter_add_(1, touched, -kept * gram[best[:, 0]])
                scores.scatter_(1, touched, topk_scores(corr.gather(1, touched), activation))
            latents.append(best[:, 0])
            scores.scatter_(1, torch.stack(latents, 1), float("-inf"))  # each latent is picked once
    residual, codes = centred, []
    for best in latents:
        dims, atom = indices[best], atoms[best]
        kept = picked_code((residual.gather(1, dims) * atom).sum(1, keepdim=True))
        residual = residual.scatter_add(1, dims, -kept * atom)
        codes.append(kept[:, 0] / norms[best])
    return torch.stack(codes, 1), torch.stack(latents, 1)


@torch.no_grad()
def active_counts(sae: SparseAutoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per_row [B], per_latent [n])``: how many latents each row of a variable-count SAE fires on
    ``x`` (flattened to ``[B, m]``) before the cap ``k``, and on how many rows each latent fires (int64)."""
    if sae.activation not in VARIABLE_COUNT:
        raise SaeCompressError(f"activation {sae.activation!r} has no threshold and keeps k latents; active counts "
                               f"are for {', '.join(VARIABLE_COUNT)}")
    per_latent = torch.zeros(sae.n, dtype=torch.int64)
    if sae.activation == "topafa":  # uncapped: the rule over all n latents, in blocks of rows
        centred = sae._prepare(sae._flatten(x)[0])
        step = max(1, _CHUNK_ELEMENTS // sae.n)
        per_row = []
        for block in centred.split(step):
            values, indices, _ = select_afa(sae._pre_activations(block), sae.n, sae.row_norms(), block.norm(dim=-1))
            kept = indices[values > 0]
            per_latent.index_add_(0, kept, torch.ones_like(kept))
            per_row.append((values > 0).sum(1))
        return torch.cat(per_row), per_latent
    per_row = None
    for start, pre in sae.pre_activation_chunks(x):
        fires = topk_scores(pre, sae.activation, sae.threshold[start:start + pre.shape[1]]) > 0
        per_latent[start:start + pre.shape[1]] = fires.sum(0)
        per_row = fires.sum(1) if per_row is None else per_row + fires.sum(1)
    return per_row, per_latent


def l0_cap(per_row: torch.Tensor, n: int) -> int:
    """The cap ``k`` of a variable-count SAE from its per-row L0 on data: their ``L0_CAP_QUANTILE`` quantile
    (a value some row reaches), at least 1 and at most ``n``."""
    return min(n, max(1, int(np.quantile(per_row.cpu().numpy(), L0_CAP_QUANTILE, method="higher"))))


def require_topk(activation: str, command: str, why: str) -> None:
    """Refuse a variable-count activation in ``command``, which supports the top-k orderings only so far
    (``why``: what it still needs)."""
    if activation in VARIABLE_COUNT:
        raise SaeCompressError(
            f"activation {activation!r} (a variable-count SAE) is not supported by {command} yet ({why}); "
            f"it supports the top-k activations {', '.join(ACTIVATIONS)}"
        )


def require_trainable_encoder(encoder: str, command: str) -> None:
    """Refuse to train a pursuit-encoded SAE in ``command`` (activation-space training needs an encoder)."""
    if encoder == "pursuit":
        raise SaeCompressError(
            f"{command} does not train pursuit-encoded SAEs yet: {command} an untied expander (the default), then "
            "store its decoder with a pursuit encoder: `saecompress convert SAE.safetensors OUT.safetensors "
            "--encoder pursuit` (`saecompress finetune` then tunes it through the LM)")


def _checked_threshold(threshold: torch.Tensor | None, n: int, activation: str) -> torch.Tensor | None:
    if activation not in THRESHOLD_ACTIVATIONS:
        if threshold is not None:
            raise SaeCompressError(f"activation {activation!r} takes no threshold; "
                                   f"thresholds go with {', '.join(THRESHOLD_ACTIVATIONS)}")
        return None
    if threshold is None:
        return torch.zeros(n)
    threshold = torch.as_tensor(threshold)
    if not threshold.dtype.is_floating_point or tuple(threshold.shape) != (n,):
        raise SaeCompressError(f"a {activation} threshold must be a float tensor of shape ({n},), "
                               f"got {threshold.dtype} {tuple(threshold.shape)}")
    threshold = threshold.detach().to(torch.float32).clone()
    if not bool(torch.isfinite(threshold).all()):
        raise SaeCompressError(f"the {activation} threshold contains NaN or inf")
    if activation == "batchtopk" and not bool((threshold == threshold[0]).all()):
        raise SaeCompressError("a batchtopk threshold is one global value; got different values per latent "
                               "(use activation 'jumprelu' for per-latent thresholds)")
    return threshold


def _check_config(m: int, n: int, k: int, activation: str) -> None:
    if m < 1 or n < 1:
        raise SaeCompressError(f"an SAE needs m >= 1 and n >= 1, got m={m}, n={n}")
    if not 1 <= k <= n:
        raise SaeCompressError(f"k={k} must be between 1 and the number of latents n={n}")
    check_choice("activation", activation, ALL_ACTIVATIONS)


class SparseAutoencoder(nn.Module):
    """What the two models share: input handling, top-k selection and the forward pass."""

    m: int
    n: int
    k: int
    activation: str
    normalize_input: bool

    def _init_common(self, m: int, n: int, k: int, activation: str, normalize_input: bool,
                     threshold: torch.Tensor | None) -> None:
        _check_config(m, n, k, activation)
        self.m, self.n, self.k = int(m), int(n), int(k)
        self.activation = activation
        self.normalize_input = bool(normalize_input)
        self.register_buffer("threshold", _checked_threshold(threshold, n, activation))

    def _apply(self, fn, recurse=True):
        """Move and cast as ``nn.Module`` does, but keep ``threshold`` float32 (only its device follows)."""
        threshold = self.threshold
        super()._apply(fn, recurse)
        if threshold is not None:
            self._buffers["threshold"] = threshold.to(self.b_enc.device)
        return self

    def _flatten(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        if x.shape[-1] != self.m:
            raise SaeCompressError(
                f"activations have hidden size {x.shape[-1]} but this SAE expects m={self.m}; "
                "use the SAE trained for this model and hookpoint"
            )
        return x.reshape(-1, self.m), x.shape[:-1]

    def normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``(x', stats)``: the SAE's input ``x'`` (layer-normed if ``normalize_input``) and the
        ``(mu, std)`` that :meth:`unnormalise` maps reconstructions back with (``None``: identity)."""
        if not self.normalize_input:
            return x, None
        x, mu, std = layer_norm(x)
        return x, (mu, std)

    @staticmethod
    def unnormalise(x_hat: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """A reconstruction in the original space: ``x̂'·std + mu`` (OpenAI / SAELens use std, not std + eps)."""
        if stats is None:
            return x_hat
        mu, std = stats
        return x_hat * std + mu

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened, (optionally) normalised, centred input ``x' - b_dec`` of shape ``[B, m]``."""
        return self.normalise(x.to(self.b_dec.dtype))[0] - self.b_dec

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations ``[..., n]`` (materialises all n per row)."""
        flat, lead = self._flatten(x)
        return self._pre_activations(self._prepare(flat)).reshape(*lead, self.n)

    def pre_activation_chunks(self, x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, pre)`` over consecutive latent ranges: ``pre [B, c]`` holds the pre-activations of
        latents ``start:start + c`` for the rows of ``x`` flattened to ``[B, m]``; memory O(B·chunk) at any n."""
        return self._pre_chunks(self._prepare(self._flatten(x)[0]))

    def _latent_chunks(self, rows: int) -> list[tuple[int, int]]:
        """``(start, stop)`` latent ranges of about ``_CHUNK_ELEMENTS / rows`` latents each."""
        step = max(1, _CHUNK_ELEMENTS // max(rows, 1))
        return [(s, min(s + step, self.n)) for s in range(0, self.n, step)]

    def encode(
        self, x: torch.Tensor, dense: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """``(top_values, top_indices)`` of shape ``[..., k]``, or the dense code ``[..., n]``."""
        flat, lead = self._flatten(x)
        values, indices = self._encode_topk(self._prepare(flat))
        if dense:
            code = values.new_zeros(values.shape[0], self.n).scatter_(1, indices, values)
            return code.reshape(*lead, self.n)
        return values.reshape(*lead, self.k), indices.reshape(*lead, self.k)

    def decode(self, top_values: torch.Tensor, top_indices: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., m]`` from k-sparse codes (in normalised space if normalize_input)."""
        lead = top_values.shape[:-1]
        out = self._decode(top_values.reshape(-1, top_values.shape[-1]),
                           top_indices.reshape(-1, top_indices.shape[-1]).long())
        return out.reshape(*lead, self.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``x`` (in its original space, also when inputs are normalised)."""
        return self.reconstruct(x)[0]

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x̂, top_values, top_indices)`` from one encode; ``x̂`` is in the original space."""
        flat, lead = self._flatten(x)
        flat, stats = self.normalise(flat.to(self.b_dec.dtype))
        values, indices = self._encode_topk(flat - self.b_dec)
        out = self.unnormalise(self._decode(values, indices), stats)
        return (out.reshape(*lead, self.m), values.reshape(*lead, self.k),
                indices.reshape(*lead, self.k))

    def row_norms(self) -> torch.Tensor:
        """``[n]`` decoder row norms (what top-AFA weighs each latent's activation by)."""
        return self.decoder_rows.detach().norm(dim=1)

    def _encode_topk(self, centred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.activation == "topafa":
            return select_afa(self._pre_activations(centred), self.k, self.row_norms(), centred.norm(dim=-1))[:2]
        return select_topk(self._pre_activations(centred), self.k, self.activation, threshold=self.threshold)

    @property
    def decoder_rows(self) -> nn.Parameter:
        """The decoder's per-latent rows (latent axis 0): ``W_dec [n, m]`` or ``values [n, d]``."""
        raise NotImplementedError

    def _pre_activations(self, centred: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _pre_chunks(self, centred: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        raise NotImplementedError

    def _decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TopKSAE(SparseAutoencoder):
    """A dense TopK SAE: ``W_enc [m, n]``, ``W_dec [n, m]``, ``b_enc [n]``, ``b_dec [m]``."""

    def __init__(
        self, m: int, n: int, k: int, *, activation: Activation = "topk_relu",
        normalize_input: bool = False, threshold: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self._init_common(m, n, k, activation, normalize_input, threshold)
        W_dec = unit_rows(torch.randn(n, m))
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(m))

    @property
    def decoder_rows(self) -> nn.Parameter:
        return self.W_dec

    def _pre_activations(self, centred: torch.Tensor) -> torch.Tensor:
        return centred @ self.W_enc + self.b_enc

    def _pre_chunks(self, centred: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        for start, stop in self._latent_chunks(centred.shape[0]):
            yield start, centred @ self.W_enc[:, start:stop] + self.b_enc[start:stop]

    def _decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if self.n > MATMUL_DECODE_LATENTS:  # gather the k rows of each token
            return (values.unsqueeze(-1) * self.W_dec[indices]).sum(dim=-2) + self.b_dec
        unfired = indices < 0  # −1 slots (value 0) of variable-count codes
        code = values.new_zeros(*values.shape[:-1], self.n).scatter_add(
            -1, indices.clamp_min(0), values.masked_fill(unfired, 0))
        return code @ self.W_dec + self.b_dec

    def extra_repr(self) -> str:
        return f"m={self.m}, n={self.n}, k={self.k}, activation={self.activation}"


class ExpanderSAE(SparseAutoencoder):
    """An SAE whose latents each touch ``d`` model dims, on a seeded expander mask.

    ``indices [n, d]`` (buffer) come from ``expander_mask(m, n, d, seed)`` unless given
    explicitly (then ``mask_seed`` is ``None``). Learned: ``values [n, d]``, ``enc_values [n, d]``
    (untied encoders only), ``b_enc [n]``, ``b_dec [m]``.
    """

    def __init__(
        self, m: int, n: int, d: int, k: int, *, seed: int = 0,
        activation: Activation = "signed_topk", encoder: str = "tied",
        indices: torch.Tensor | None = None, normalize_input: bool = False,
        threshold: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self._init_common(m, n, k, activation, normalize_input, threshold)
        check_choice("encoder", encoder, ENCODERS)
        if encoder == "pursuit" and activation not in ACTIVATIONS:
            raise SaeCompressError(f"a pursuit encoder picks k latents by correlation: activation {activation!r} "
                                   f"does not apply (use one of {', '.join(ACTIVATIONS)})")
        self.d = int(d)
        self.encoder = encoder
        if indices is None:
            indices = torch.from_numpy(expander_mask(m, n, d, seed))
            self.mask_seed: int | None = int(seed)
            self.mask_algorithm: str | None = MASK_ALGORITHM
        else:
            indices = _checked_indices(torch.as_tensor(indices), m, n, d)
            self.mask_seed, self.mask_algorithm = None, None
        self.register_buffer("indices", indices)
        values = unit_rows(torch.randn(n, d))
        self.values = nn.Parameter(values)
        self.enc_values = nn.Parameter(values.clone()) if encoder == "untied" else None
        if encoder == "pursuit":  # no encoder bias: zeros, so code that reads b_enc (devices, dtypes) still can
            self.register_buffer("b_enc", torch.zeros(n))
        else:
            self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(m))

    @property
    def encoder_values(self) -> torch.Tensor:
        """The encoder's ``[n, d]`` values: ``values`` when tied, ``enc_values`` when untied."""
        return self.values if self.enc_values is None else self.enc_values

    @property
    def decoder_rows(self) -> nn.Parameter:
        return self.values

    def _chunk_pre(self, x_t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Pre-activations of latents ``start:stop`` as ``[stop - start, B]``, from ``x_t [m, B]``."""
        # Row i of the result is sum_j e[i, j] * x_t[idx[i, j]]: one fused gather-reduce.
        pre = F.embedding_bag(self.indices[start:stop], x_t, mode="sum",
                              per_sample_weights=self.encoder_values[start:stop])
        return pre + self.b_enc[start:stop, None]

    def _pre_activations(self, centred: torch.Tensor) -> torch.Tensor:
        return torch.cat([pre for _, pre in self._pre_chunks(centred)], dim=1)

    def _pre_chunks(self, centred: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        if self.encoder == "pursuit":
            raise SaeCompressError("a pursuit-encoded SAE has no encoder pre-activations (it picks latents by "
                                   "matching pursuit); use encode(), or an SAE with a tied or untied encoder")
        x_t = centred.T.contiguous()
        for start, stop in self._latent_chunks(centred.shape[0]):
            yield start, self._chunk_pre(x_t, start, stop).T

    def _encode_topk(self, centred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k over latent chunks with a running merge: memory O(B·(chunk + k)), not O(B·n).
        ``topafa`` merges ``k + 1`` candidates, then applies its rule (``afa_kept``); a pursuit encoder
        runs :func:`pursue` on blocks of rows (memory O(block·n))."""
        if self.encoder == "pursuit":
            step = max(1, _CHUNK_ELEMENTS // self.n)
            overlaps = self._decoder_overlaps()
            parts = [pursue(block, self.values, self.indices, self.k, self.activation, overlaps)
                     for block in centred.split(step)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        afa = self.activation == "topafa"
        keep = self.k + 1 if afa else self.k
        norms = self.row_norms() if afa else None
        best_scores = best_vals = best_idx = None
        for start, pre in self._pre_chunks(centred):
            stop = start + pre.shape[1]
            threshold = None if self.threshold is None else self.threshold[start:stop]
            scores, idx = topk_scores(pre, self.activation, threshold, None if norms is None else norms[start:stop]
                                      ).topk(min(keep, stop - start), dim=-1)
            vals = ranked_values(pre, scores, idx, self.activation)
            idx = idx + start
            if best_scores is not None:
                scores, pos = torch.cat([best_scores, scores], 1).topk(
                    min(keep, best_scores.shape[1] + scores.shape[1]), dim=-1)
                vals = torch.cat([best_vals, vals], 1).gather(1, pos)
                idx = torch.cat([best_idx, idx], 1).gather(1, pos)
            best_scores, best_vals, best_idx = scores, vals, idx
        if afa:
            return afa_kept(best_vals, best_scores, centred.norm(dim=-1), self.k)[0], best_idx[:, :self.k]
        return topk_kept(best_vals, self.activation), best_idx

    @torch.no_grad()
    def _decoder_overlaps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``pursuit_gram`` of the unit decoder rows, kept until ``values`` change (in place or replaced)."""
        stamp = (self.values.data_ptr(), self.values._version, self.values.dtype, self.values.device)
        cached = self.__dict__.get("_overlaps")
        if cached is None or cached[0] != stamp:
            cached = (stamp, pursuit_gram(unit_rows(self.values), self.indices))
            self.__dict__["_overlaps"] = cached
        return cached[1]

    def _decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        rows = values.shape[0]
        dims = self.indices[indices].reshape(rows, -1)
        contrib = (values.unsqueeze(-1) * self.values[indices]).reshape(rows, -1)
        out = self.b_dec.expand(rows, self.m).clone()
        return out.scatter_add(1, dims, contrib)

    @torch.no_grad()
    def with_pursuit(self, activation: str | None = None) -> ExpanderSAE:
        """A copy that encodes by matching pursuit over these decoder rows (``encoder="pursuit"``): the same
        mask, ``values`` and ``b_dec``; no encoder. ``activation`` (default: this SAE's) is the pursuit's rule."""
        sae = ExpanderSAE(self.m, self.n, self.d, self.k, seed=self.mask_seed or 0,
                          activation=activation or self.activation, encoder="pursuit",
                          indices=None if self.mask_seed is not None else self.indices,
                          normalize_input=self.normalize_input).to(self.values.dtype)
        sae.values.copy_(self.values)
        sae.b_dec.copy_(self.b_dec)
        return sae

    @torch.no_grad()
    def to_dense(self) -> TopKSAE:
        """The equivalent dense ``TopKSAE`` (same outputs; ``n·m`` floats per matrix)."""
        if self.encoder == "pursuit":
            raise SaeCompressError("a pursuit-encoded SAE has no dense TopK equivalent (its codes come from "
                                   "matching pursuit, not one matmul); use the tied or untied SAE it came from")
        dense = TopKSAE(self.m, self.n, self.k, activation=self.activation,
                        normalize_input=self.normalize_input, threshold=self.threshold)
        dtype = self.values.dtype
        rows = torch.arange(self.n).unsqueeze(1).expand(-1, self.d)
        W_dec = torch.zeros(self.n, self.m, dtype=dtype)
        W_dec[rows, self.indices] = self.values
        W_enc = torch.zeros(self.n, self.m, dtype=dtype)
        W_enc[rows, self.indices] = self.encoder_values
        dense.W_dec = nn.Parameter(W_dec)
        dense.W_enc = nn.Parameter(W_enc.T.contiguous())
        dense.b_enc = nn.Parameter(self.b_enc.detach().clone())
        dense.b_dec = nn.Parameter(self.b_dec.detach().clone())
        return dense

    def extra_repr(self) -> str:
        return (f"m={self.m}, n={self.n}, d={self.d}, k={self.k}, activation={self.activation}, "
                f"encoder={self.encoder}, mask_seed={self.mask_seed}")


def _checked_indices(indices: torch.Tensor, m: int, n: int, d: int) -> torch.Tensor:
    if indices.shape != (n, d):
        raise SaeCompressError(f"mask indices have shape {tuple(indices.shape)}, expected ({n}, {d})")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise SaeCompressError(f"mask indices must be integers, got {indices.dtype}")
    indices = indices.long()
    if n and (int(indices.min()) < 0 or int(indices.max()) >= m):
        raise SaeCompressError(f"mask indices must lie in [0, {m}); found values outside")
    ordered = indices.sort(dim=1).values
    if d > 1 and bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise SaeCompressError("mask indices repeat a dim within a latent; each latent needs d distinct dims")
    return indices.contiguous()
