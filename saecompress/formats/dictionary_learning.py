"""saprmarks/dictionary_learning ``AutoEncoderTopK``: ``ae.pt`` + ``config.json`` per trainer folder.

``ae.pt`` is a ``state_dict()``: ``encoder.weight [F, D]``, ``encoder.bias [F]``,
``decoder.weight [D, F]``, ``b_dec [D]``, buffers ``k`` (int) and ``threshold``. ``config.json``
is ``{"trainer": {"dict_class": "AutoEncoderTopK", "k", "activation_dim", "dict_size",
"lm_name", "layer", "submodule_name", …}, "buffer": {…}}``. Math (``encode`` without threshold)::

    pre = ReLU(encoder(x - b_dec))        # ReLU first,
    z   = top-k(pre)                      # then TopK
    x̂   = decoder(z) + b_dec

``BatchTopKSAE`` / ``MatryoshkaBatchTopKSAE`` run a learned threshold at inference: refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import SaeCompressError
from ..models import TopKSAE
from ._common import build_topk, dims_of, int_value, read_json, read_torch, refuse, source_dtype, tensor

WEIGHTS = "ae.pt"
CONFIG = "config.json"
_TOPK_CLASSES = ("AutoEncoderTopK",)


def matches(folder: Path) -> bool:
    """Whether ``folder`` holds a dictionary_learning trainer output."""
    return (folder / WEIGHTS).is_file() and (folder / CONFIG).is_file()


def read(folder: Path, hookpoint: str | None = None) -> tuple[TopKSAE, dict[str, Any]]:
    """Load the ``AutoEncoderTopK`` in ``folder`` as a ``TopKSAE``, and its provenance."""
    cfg_path, weights_path = folder / CONFIG, folder / WEIGHTS
    trainer = read_json(cfg_path).get("trainer")
    if not isinstance(trainer, dict):
        raise SaeCompressError(f"{cfg_path}: no 'trainer' section; not a dictionary_learning config.json")
    dict_class = trainer.get("dict_class")
    if dict_class not in _TOPK_CLASSES:
        raise refuse(cfg_path, f"dict_class {dict_class!r} is not AutoEncoderTopK")
    sd = read_torch(weights_path)
    n, m = dims_of(sd, "encoder.weight", weights_path, 2)
    k = int_value(sd["k"] if "k" in sd else trainer.get("k"), "k", weights_path)
    for key, expected in (("activation_dim", m), ("dict_size", n)):
        if key in trainer and trainer[key] != expected:
            raise SaeCompressError(
                f"{cfg_path}: {key}={trainer[key]} but {weights_path.name} has {expected}; "
                "config and weights do not match"
            )
    return build_topk(
        W_enc=tensor(sd, "encoder.weight", weights_path, (n, m)).T,
        W_dec=tensor(sd, "decoder.weight", weights_path, (m, n)).T,
        b_enc=tensor(sd, "encoder.bias", weights_path, (n,)),
        b_dec=tensor(sd, "b_dec", weights_path, (m,)), k=k, activation="relu_topk",
        provenance={
            "library": "dictionary_learning",
            "path": str(folder),
            "hookpoint": hookpoint or trainer.get("submodule_name"),
            "model_name": trainer.get("lm_name"),
            "submodule_name": trainer.get("submodule_name"),
            "layer": trainer.get("layer"),
            "source_dtype": source_dtype(sd),
        },
    )
