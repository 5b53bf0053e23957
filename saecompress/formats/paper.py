"""Checkpoints of the Expander-SAE paper's code (github rodrgo/expander-sae, ``models/expander.py``).

``torch.save(model.state_dict())`` of their ``ExpanderSAE``: dense ``mask [m, n]`` (0/1, ``d``
ones per column), ``decoder_vals [m, n]``, ``b_dec [m]``, ``b_enc [n]``. Math::

    W_dec = colnorm(mask ⊙ decoder_vals)          # each latent's column, unit L2 (norm ≥ 1e-8)
    pre   = (x - b_dec) @ W_dec + b_enc           # tied: encoder = decoder
    z     = top-k(pre) by value, no ReLU          # their default "unsigned" TopK mode
    x̂     = z @ W_decᵀ + b_dec

``k`` is not in the state dict: their ``db.model_path`` names files
``{arch}_m{m}_n{n}_d{d}_k{k}_seed{seed}[_b{budget}][_topk{mode}].pt``, so ``k`` comes from the
file name, or must be given. A ``_topksigned`` file (top-k by |pre|) is refused.

The import is exact: the mask becomes explicit ``indices`` (``mask_seed=None``), the
column-normalised values become ``values``.

Their dense baselines (``models/dense.py``: ``dense_tied``, ``dense_warmtied``,
``dense_randinit``) save ``W_dec_param [m, n]`` (column-normalised like above), optionally an
independent ``W_enc_param [n, m]`` (else the encoder is ``W_decᵀ``), ``b_dec``, ``b_enc``, with
the same signed TopK; ``read_paper_dense`` loads them as a ``TopKSAE`` to be converted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..errors import SaeCompressError
from ..models import ExpanderSAE, TopKSAE
from ._common import build_dense, dims_of, int_value, known, read_torch, refuse, source_dtype, tensor

KEYS = ("mask", "decoder_vals", "b_dec", "b_enc")
DENSE_KEYS = ("W_dec_param", "b_dec", "b_enc")
_NAME = re.compile(r"_m(?P<m>\d+)_n(?P<n>\d+)_d(?P<d>\d+)_k(?P<k>\d+)_seed(?P<seed>\d+)")


def matches_state(sd: dict[str, Any]) -> bool:
    """Whether a loaded state dict is an Expander-SAE paper checkpoint (expander or dense baseline)."""
    return all(key in sd for key in KEYS) or all(key in sd for key in DENSE_KEYS)


def k_from_name(path: Path) -> int | None:
    """``k`` from a file name written by the paper's ``db.model_path``, else None."""
    match = _NAME.search(path.name)
    return int(match["k"]) if match else None


def _checked_k(path: Path, k: int | None) -> int:
    if "_topksigned" in path.name:
        raise refuse(path, "it was trained with top-k by |pre-activation| (topk_mode 'signed')")
    named_k = k_from_name(path)
    if k is not None and named_k is not None and k != named_k:
        raise SaeCompressError(f"{path}: --k {k} contradicts k={named_k} in the file name")
    k = k if k is not None else named_k
    if k is None:
        raise SaeCompressError(
            f"{path}: paper checkpoints do not store k and the file name has no '_k<k>_'; pass --k"
        )
    return int_value(k, "k", path)


def _provenance(path: Path, sd: dict[str, Any], **extra: Any) -> dict[str, Any]:
    match = _NAME.search(path.name)
    return known({"library": "paper", "path": str(path), "arch": path.name[: match.start()] if match else None,
                  "paper_seed": int(match["seed"]) if match else None, "source_dtype": source_dtype(sd), **extra})


def _colnorm(W: torch.Tensor) -> torch.Tensor:
    W = W.to(torch.float64)
    return W / W.norm(dim=0, keepdim=True).clamp(min=1e-8)


def _open(path: str | Path, k: int | None, sd: dict[str, Any] | None,
          key: str) -> tuple[Path, int, dict[str, Any], int, int]:
    """``(path, k, state dict, m, n)`` of a paper checkpoint whose ``[m, n]`` tensor ``key`` gives the dims."""
    path = Path(path)
    k = _checked_k(path, k)
    sd = read_torch(path) if sd is None else sd
    return (path, k, sd, *dims_of(sd, key, path, 2))


def read_paper_dense(path: str | Path, k: int | None = None,
                     sd: dict[str, Any] | None = None) -> tuple[TopKSAE, dict[str, Any]]:
    """A paper dense-baseline checkpoint (``W_dec_param`` …) as a ``TopKSAE`` (``signed_topk``), and its
    provenance."""
    path, k, sd, m, n = _open(path, k, sd, "W_dec_param")
    W_dec = _colnorm(tensor(sd, "W_dec_param", path, (m, n)))
    W_enc = tensor(sd, "W_enc_param", path, (n, m)).T if "W_enc_param" in sd else W_dec
    return build_dense(W_enc=W_enc, W_dec=W_dec.T, b_enc=tensor(sd, "b_enc", path, (n,)),
                      b_dec=tensor(sd, "b_dec", path, (m,)), k=k, activation="signed_topk",
                      provenance=_provenance(path, sd))


def read_paper_checkpoint(path: str | Path, k: int | None = None,
                          sd: dict[str, Any] | None = None) -> tuple[ExpanderSAE, dict[str, Any]]:
    """Exact ``ExpanderSAE`` (explicit indices, tied, ``signed_topk``) from a paper checkpoint, and its provenance.

    ``k`` overrides/supplies the TopK size when the file name does not carry it.
    """
    path, k, sd, m, n = _open(path, k, sd, "mask")
    support = tensor(sd, "mask", path, (m, n)) != 0
    W = _colnorm(tensor(sd, "decoder_vals", path, (m, n)) * support)
    degrees = support.sum(dim=0)
    d = int(degrees.max())
    if d == 0:
        raise SaeCompressError(f"{path}: the mask is all zeros; not a trained Expander SAE")
    # Columns with fewer than d ones (none in their sampler) are padded with zero-valued dims.
    indices = support.T.to(torch.float32).topk(d, dim=1).indices.sort(dim=1).values
    values = W.T.gather(1, indices)
    sae = ExpanderSAE(m, n, d, k, activation="signed_topk", encoder="tied", indices=indices)
    with torch.no_grad():
        sae.values.data = values.to(torch.float32)
        sae.b_enc.data = tensor(sd, "b_enc", path, (n,))
        sae.b_dec.data = tensor(sd, "b_dec", path, (m,))
    return sae, _provenance(path, sd, padded_latents=int((degrees < d).sum()) or None)
