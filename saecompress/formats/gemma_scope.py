"""Gemma Scope's release format: a folder with ``params.npz`` (``W_enc [m, n]``, ``W_dec [n, m]``,
``b_enc [n]``, ``b_dec [m]``, ``threshold [n]``), as on google/gemma-scope-* (``layer_L/width_W/
average_l0_A/params.npz``). Math (JumpReLU, no ``b_dec`` subtraction before encoding)::

    pre = x @ W_enc + b_enc;   z = ReLU(pre) * (pre > threshold);   x̂ = z @ W_dec + b_dec

Read as a ``jumprelu`` ``TopKSAE`` with ``k = n``; ``b_dec @ W_enc`` is folded into ``b_enc``.
The file is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SaeCompressError, first_line
from ..models import TopKSAE
from ._common import build_dense, dims_of, source_dtype, tensor

WEIGHTS = "params.npz"


def matches(folder: Path) -> bool:
    """Whether ``folder`` holds a Gemma Scope ``params.npz``."""
    return (folder / WEIGHTS).is_file()


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: torch.from_numpy(np.array(data[name])) for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise SaeCompressError(f"{path}: not a readable .npz file ({first_line(e)}); re-download it") from None


def read(folder: Path, hookpoint: str | None = None) -> tuple[TopKSAE, dict[str, Any]]:
    """Load the Gemma Scope SAE in ``folder`` as a ``jumprelu`` ``TopKSAE``, and its provenance."""
    path = folder / WEIGHTS
    sd = _read_npz(path)
    m, n = dims_of(sd, "W_enc", path, 2)
    W_enc = tensor(sd, "W_enc", path, (m, n))
    b_dec = tensor(sd, "b_dec", path, (m,))
    return build_dense(
        W_enc=W_enc, W_dec=tensor(sd, "W_dec", path, (n, m)),
        b_enc=tensor(sd, "b_enc", path, (n,)) + b_dec @ W_enc, b_dec=b_dec, k=None,
        activation="jumprelu", threshold=tensor(sd, "threshold", path, (n,)),
        provenance={"library": "gemma_scope", "path": str(folder), "hookpoint": hookpoint,
                    "architecture": "jumprelu", "source_dtype": source_dtype(sd)},
    )
