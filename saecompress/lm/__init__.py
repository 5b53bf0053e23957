"""Causal LMs from transformers: loading, token contexts and hook sites (``model``), activation
harvesting (``harvest``), and CE / KL with an SAE spliced in (``ce``)."""

from .ce import CEReference, ce_eval, ce_eval_many, next_token_kl
from .harvest import check_harvest, harvest
from .model import (
    SITES,
    capture,
    capture_sites,
    clean_pass,
    context_batches,
    decoder_layers,
    hooked,
    hookpoint,
    keep_mask,
    load_model,
    site_module,
    skipping,
    spliced_pass,
    token_contexts,
)

__all__ = [
    "CEReference", "SITES", "capture", "capture_sites", "ce_eval", "ce_eval_many", "check_harvest", "clean_pass", "context_batches",
    "decoder_layers", "harvest", "hooked", "hookpoint", "keep_mask", "load_model", "next_token_kl",
    "site_module", "skipping", "spliced_pass", "token_contexts",
]
