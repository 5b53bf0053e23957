"""openai/sparse_autoencoder ``.pt`` state dicts (``Autoencoder.state_dict()`` saved with torch.save).

Tensors: ``pre_bias [d]``, ``encoder.weight [n, d]``, ``latent_bias [n]``, ``decoder.weight [d, n]``
(plus statistics buffers), and the entries ``activation`` (class name, ``"TopK"``) and
``activation_state_dict`` (``{"k": int, "postact_fn": "ReLU" | "Identity"}``). Math::

    x', mu, std = LN(x)            # TopK checkpoints only: mean-centre, / (unbiased std + 1e-5)
    z  = postact(top-k(encoder(x' - pre_bias) + latent_bias))
    x̂  = (decoder(z) + pre_bias) * std + mu

``from_state_dict`` enables the layer norm exactly when ``activation == "TopK"``; so do we.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import SaeCompressError
from ..models import TopKSAE
from ._common import build_dense, dims_of, int_value, read_torch, refuse, source_dtype, tensor

KEYS = ("pre_bias", "latent_bias", "encoder.weight", "decoder.weight")
_POSTACT = {"ReLU": "topk_relu", "Identity": "signed_topk"}


def matches_state(sd: dict[str, Any]) -> bool:
    """Whether a loaded state dict is an openai/sparse_autoencoder checkpoint."""
    return all(key in sd for key in KEYS)


def read(path: Path, hookpoint: str | None = None,
         sd: dict[str, Any] | None = None) -> tuple[TopKSAE, dict[str, Any]]:
    """Load an openai/sparse_autoencoder TopK checkpoint as a ``TopKSAE``, and its provenance."""
    sd = read_torch(path) if sd is None else sd
    activation = sd.get("activation", "ReLU")
    if activation != "TopK":
        raise refuse(path, f"activation {activation!r} is not TopK")
    act_sd = sd.get("activation_state_dict") or {}
    k = int_value(act_sd.get("k"), "activation_state_dict k", path)
    postact = act_sd.get("postact_fn", "ReLU")
    if postact not in _POSTACT:
        raise SaeCompressError(f"{path}: unsupported TopK postact_fn {postact!r}; expected ReLU or Identity")
    n, d = dims_of(sd, "encoder.weight", path, 2)
    enc = tensor(sd, "encoder.weight", path, (n, d))
    dec = tensor(sd, "decoder.weight", path, (d, n))
    return build_dense(
        W_enc=enc.T, W_dec=dec.T, b_enc=tensor(sd, "latent_bias", path, (n,)),
        b_dec=tensor(sd, "pre_bias", path, (d,)), k=k, activation=_POSTACT[postact],
        normalize_input=True,
        provenance={
            "library": "openai",
            "path": str(path),
            "hookpoint": hookpoint,
            "source_dtype": source_dtype(sd),
        },
    )
