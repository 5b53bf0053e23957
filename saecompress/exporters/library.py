"""Back to the ecosystem: an SAE written in SAELens's or sparsify's own folder layout (the dense view).

SAELens and sparsify hold dense SAEs, so an Expander SAE is written as its ``to_dense()`` equivalent
(the same function, ``n·m`` floats per matrix). What each library can hold:

* SAELens: TopK (``topk_relu``; ``relu_topk`` keeps the same codes), JumpReLU and BatchTopK (as
  ``architecture: "jumprelu"`` with θ; SAELens applies no cap on latents per row, which the notes say),
  layer norm. Not top-AFA.
* sparsify: ReLU-then-TopK without layer norm.

``signed_topk`` and ``abs_topk`` keep negative codes, which neither library has: they are refused unless
``approximate``, which writes the ReLU version and says so (the codes differ on rows where a kept
pre-activation is negative).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from .._io import check_outputs
from ..errors import SaeCompressError
from ..formats import saelens, sparsify
from ..models import THRESHOLD_ACTIVATIONS, ExpanderSAE, TopKSAE
from ..sources import load_source

LIBRARIES = ("saelens", "sparsify")
_RELU_TOPK = ("topk_relu", "relu_topk")


def library_view(sae: ExpanderSAE | TopKSAE, library: str, *, approximate: bool = False) -> tuple[TopKSAE, list[str]]:
    """The dense ``TopKSAE`` that ``library`` holds for ``sae``, and notes on what differs (only with
    ``approximate``)."""
    if library not in LIBRARIES:
        raise SaeCompressError(f"unknown library {library!r}; use one of {', '.join(LIBRARIES)}")
    dense = sae.to_dense() if isinstance(sae, ExpanderSAE) else copy.deepcopy(sae)
    notes = []
    name = "SAELens" if library == "saelens" else "sparsify"
    if sae.activation == "topafa":
        raise SaeCompressError(f"{name} has no top-AFA SAEs; keep it as a compact file or an ONNX graph")
    if library == "sparsify" and sae.activation in THRESHOLD_ACTIVATIONS:
        raise SaeCompressError(f"sparsify has no {sae.activation} SAEs; export it --format saelens (as SAELens's "
                               "jumprelu architecture)")
    if library == "sparsify" and sae.normalize_input:
        raise SaeCompressError("sparsify SAEs have no input layer norm; export it --format saelens")
    if sae.activation not in (*_RELU_TOPK, *THRESHOLD_ACTIVATIONS):
        if not approximate:
            raise SaeCompressError(f"{name} keeps ReLU(top-k) codes; this SAE is {sae.activation}, whose negative "
                                   "codes it cannot hold: pass --approximate to write the ReLU version anyway")
        notes.append(f"{sae.activation} written as {name}'s ReLU top-k: negative codes become 0")
        dense.activation = "topk_relu" if library == "saelens" else "relu_topk"
    if sae.activation in THRESHOLD_ACTIVATIONS and sae.k < sae.n:
        notes.append(f"SAELens keeps every latent above its threshold: the cap of {sae.k} latents per row is not "
                     "applied")
    return dense, notes


def export_library(src: str | os.PathLike, out: str | os.PathLike, library: str, *, hookpoint: str | None = None,
                   hub=None, approximate: bool = False, model_name: str | None = None,
                   hook_name: str | None = None) -> tuple[Path, list[str]]:
    """Write the SAE ``src`` (any source) to the folder ``out`` in ``library``'s layout; returns ``(out, notes)``.
    ``model_name`` / ``hook_name`` (SAELens metadata) default to what the source records."""
    check_outputs([out], [src], kind="folder")
    loaded = load_source(src, hookpoint, hub=hub)
    dense, notes = library_view(loaded.model, library, approximate=approximate)
    if library == "sparsify":
        return sparsify.save(dense, out), notes
    training = loaded.user.get("training") or {}
    facts = {"model_name": model_name or loaded.provenance.get("model_name"),
             "hook_name": hook_name or training.get("hookpoint") or loaded.provenance.get("hookpoint")}
    return saelens.save_dense(dense, out, {"exported_from": "saecompress"}, loaded.provenance,
                              {key: value for key, value in facts.items() if value}), notes
