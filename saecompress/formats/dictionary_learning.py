"""saprmarks/dictionary_learning TopK and threshold SAEs: ``ae.pt`` + ``config.json`` per trainer folder.

``ae.pt`` is a ``state_dict()``: ``encoder.weight [F, D]``, ``encoder.bias [F]``,
``decoder.weight [D, F]``, ``b_dec [D]``, buffers ``k`` (int) and ``threshold``. ``config.json``
is ``{"trainer": {"dict_class": "AutoEncoderTopK", "k", "activation_dim", "dict_size",
"lm_name", "layer", "submodule_name", …}, "buffer": {…}}``. Math (``encode`` without threshold)::

    pre = ReLU(encoder(x - b_dec))        # ReLU first,
    z   = top-k(pre)                      # then TopK
    x̂   = decoder(z) + b_dec

``BatchTopKSAE`` (same tensors) and ``MatryoshkaBatchTopKSAE`` (``W_enc [D, F]``, ``b_enc``,
``W_dec [F, D]``, ``b_dec``, ``k``, ``threshold``, ``group_sizes``) encode with their global
threshold, applied after the ReLU (``batchtopk``; Matryoshka latents keep their order)::

    z   = ReLU(pre) * (ReLU(pre) > threshold)

``JumpReluAutoEncoder`` (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, ``threshold [F]``) does not
subtract ``b_dec`` before encoding (folded into ``b_enc``): ``z = ReLU(pre * (pre > threshold))``
(``jumprelu``). Threshold SAEs read with ``k = F``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import SaeCompressError
from ..models import TopKSAE
from ._common import build_dense, dims_of, int_value, read_json, read_torch, refuse, source_dtype, tensor

WEIGHTS = "ae.pt"
CONFIG = "config.json"
# dict_class -> the activation it encodes with
_CLASSES = {
    "AutoEncoderTopK": "relu_topk", "BatchTopKSAE": "batchtopk",
    "MatryoshkaBatchTopKSAE": "batchtopk", "JumpReluAutoEncoder": "jumprelu",
}


def matches(folder: Path) -> bool:
    """Whether ``folder`` holds a dictionary_learning trainer output."""
    return (folder / WEIGHTS).is_file() and (folder / CONFIG).is_file()


def read(folder: Path, hookpoint: str | None = None) -> tuple[TopKSAE, dict[str, Any]]:
    """Load the SAE in ``folder`` (a dict class of ``_CLASSES``) as a ``TopKSAE``, and its provenance."""
    cfg_path, weights_path = folder / CONFIG, folder / WEIGHTS
    trainer = read_json(cfg_path).get("trainer")
    if not isinstance(trainer, dict):
        raise SaeCompressError(f"{cfg_path}: no 'trainer' section; not a dictionary_learning config.json")
    dict_class = trainer.get("dict_class")
    if dict_class not in _CLASSES:
        raise refuse(cfg_path, f"dict_class {dict_class!r} is not one of {', '.join(_CLASSES)}")
    activation = _CLASSES[dict_class]
    sd = read_torch(weights_path)
    if "encoder.weight" in sd:  # nn.Linear layers (AutoEncoderTopK, BatchTopKSAE)
        n, m = dims_of(sd, "encoder.weight", weights_path, 2)
        W_enc = tensor(sd, "encoder.weight", weights_path, (n, m)).T
        W_dec = tensor(sd, "decoder.weight", weights_path, (m, n)).T
        b_enc = tensor(sd, "encoder.bias", weights_path, (n,))
    else:  # plain parameters (MatryoshkaBatchTopKSAE, JumpReluAutoEncoder)
        m, n = dims_of(sd, "W_enc", weights_path, 2)
        W_enc = tensor(sd, "W_enc", weights_path, (m, n))
        W_dec = tensor(sd, "W_dec", weights_path, (n, m))
        b_enc = tensor(sd, "b_enc", weights_path, (n,))
    b_dec = tensor(sd, "b_dec", weights_path, (m,))
    k = threshold = None
    if activation == "relu_topk":
        k = int_value(sd["k"] if "k" in sd else trainer.get("k"), "k", weights_path)
    elif activation == "batchtopk":
        threshold = tensor(sd, "threshold", weights_path, ()).expand(n)
    else:
        threshold = tensor(sd, "threshold", weights_path, (n,))
        b_enc = b_enc + b_dec @ W_enc  # JumpReluAutoEncoder encodes x, not x - b_dec
    for key, expected in (("activation_dim", m), ("dict_size", n)):
        if key in trainer and trainer[key] != expected:
            raise SaeCompressError(
                f"{cfg_path}: {key}={trainer[key]} but {weights_path.name} has {expected}; "
                "config and weights do not match"
            )
    group_sizes = sd.get("group_sizes")
    return build_dense(
        W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec, k=k, activation=activation, threshold=threshold,
        provenance={
            "library": "dictionary_learning",
            "path": str(folder),
            "hookpoint": hookpoint or trainer.get("submodule_name"),
            "model_name": trainer.get("lm_name"),
            "submodule_name": trainer.get("submodule_name"),
            "layer": trainer.get("layer"),
            "dict_class": dict_class,
            "group_sizes": None if group_sizes is None else [int(g) for g in group_sizes.tolist()],
            "source_dtype": source_dtype(sd),
        },
    )
