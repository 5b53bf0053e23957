"""Causal LMs from transformers: load one, cut text into contexts, hook a site.

**Sites and layer numbering.** Layers count decoder blocks from 0. At layer ``L``:

- ``resid``: the output of block ``L`` (the residual stream after it) — SAELens
  ``blocks.L.hook_resid_post``, sparsify ``layers.L``. With ``output_hidden_states`` this is
  ``hidden_states[L + 1]`` (``hidden_states[0]`` is the embedding output).
- ``mlp_out`` / ``attn_out``: the output of block ``L``'s MLP / attention module (before it is
  added to the residual) — SAELens ``blocks.L.hook_mlp_out`` / ``blocks.L.hook_attn_out``.

The decoder block list is found generically (the ``ModuleList`` holding
``config.num_hidden_layers`` blocks), so Llama, Qwen, GPT-NeoX and GPT-2 style models all work.

**Text.** Texts are tokenized in order, documents joined by the EOS token, and cut into
contexts of ``context`` tokens, each starting with BOS when the tokenizer has one.

**Massive-activation tokens.** Position 0 (the attention sink) and tokens whose activation norm
exceeds ``outlier_factor`` × the median norm of the forward batch dominate the variance of some
models' residual streams. :func:`keep_mask` finds both; by default ``harvest`` does not write
them, and ``ce_eval`` and ``finetune`` keep their clean value when ablating or splicing. Set
``drop_first=False`` / ``outlier_factor=None`` to keep them. The counts are reported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SaeCompressError, check_choice, first_line

SITES = ("resid", "mlp_out", "attn_out")
_SITE_HOOKS = {"resid": "hook_resid_post", "mlp_out": "hook_mlp_out", "attn_out": "hook_attn_out"}
_SUBMODULES = {"mlp_out": ("mlp", "feed_forward", "ffn"),
               "attn_out": ("self_attn", "attention", "attn", "self_attention")}
_TEXT_PIECE_CHARS = 50_000


def load_model(path_or_id: str | os.PathLike, gguf_file: str | None = None, *,
               dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local folder, a hub id, or a GGUF file (dequantised to ``dtype``).

    ``path_or_id`` may itself be a ``.gguf`` file; otherwise ``gguf_file`` names the GGUF inside
    the folder/repo. Everything goes through ``AutoModelForCausalLM`` / ``AutoTokenizer``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(path_or_id)
    if path.endswith(".gguf") and Path(path).is_file():
        path, gguf_file = str(Path(path).parent), Path(path).name
    elif gguf_file and Path(gguf_file).is_file() and not Path(path, gguf_file).is_file():
        path, gguf_file = str(Path(gguf_file).parent), Path(gguf_file).name
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise SaeCompressError(f"cannot load a causal LM from {path_or_id}: {first_line(e)}") from None
    model.to(device).eval()
    return model, tokenizer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (the ModuleList of ``config.num_hidden_layers`` modules)."""
    count = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise SaeCompressError(f"cannot find the decoder layers of {type(model).__name__}; "
                           "expected a ModuleList of config.num_hidden_layers blocks")


def site_module(model: nn.Module, layer: int, site: str) -> nn.Module:
    """The module whose forward output *is* the activation at ``(layer, site)``."""
    check_choice("site", site, SITES)
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise SaeCompressError(f"layer {layer} is out of range; {type(model).__name__} has layers 0..{len(layers) - 1}")
    block = layers[layer]
    if site == "resid":
        return block
    for name in _SUBMODULES[site]:
        if isinstance(getattr(block, name, None), nn.Module):
            return getattr(block, name)
    raise SaeCompressError(f"block {layer} of {type(model).__name__} has no {site} submodule "
                           f"(looked for {', '.join(_SUBMODULES[site])})")


def hookpoint(layer: int, site: str) -> str:
    """The SAELens name of a site, e.g. ``blocks.15.hook_resid_post``."""
    return f"blocks.{layer}.{_SITE_HOOKS[site]}"


class _Stop(Exception):
    """Raised inside a hook to end a forward pass once the wanted activation is captured."""


@contextlib.contextmanager
def hooked(module: nn.Module, edit: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Run ``edit(activation)`` on the module's output; a returned tensor replaces the activation."""

    def hook(_module, _inputs, output):
        act = output[0] if isinstance(output, tuple) else output
        new = edit(act)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def capture(model: nn.Module, input_ids: torch.Tensor, layer: int, site: str) -> torch.Tensor:
    """The float32 activation ``[B, T, m]`` at ``(layer, site)``; the forward stops right after it."""
    return capture_sites(model, input_ids, [(layer, site)])[0]


def capture_sites(model: nn.Module, input_ids: torch.Tensor, sites: list[tuple[int, str]]) -> list[torch.Tensor]:
    """The float32 activations ``[B, T, m]`` at each ``(layer, site)`` of one forward pass, which stops once
    the last of them is captured."""
    modules = [site_module(model, layer, site) for layer, site in sites]
    if len(set(map(id, modules))) < len(modules):
        raise SaeCompressError("a hookpoint is named twice; give each layer once")
    box: dict[int, torch.Tensor] = {}

    def grab(i: int) -> Callable[[torch.Tensor], None]:
        def keep(act: torch.Tensor) -> None:
            box[i] = act.detach().float().cpu()
            if len(box) == len(modules):
                raise _Stop
        return keep

    with contextlib.ExitStack() as hooks, torch.no_grad(), contextlib.suppress(_Stop):
        for i, module in enumerate(modules):
            hooks.enter_context(hooked(module, grab(i)))
        model(input_ids=input_ids.to(model.device), use_cache=False)
    return [box[i] for i in range(len(modules))]


@dataclass
class Prefix:
    """What a pass through decoder blocks ``0..layer-1`` gave: block ``layer``'s input hidden states and the
    form of a block's output (a tensor, or a tuple whose first item is the hidden states)."""

    layer: int
    hidden: torch.Tensor
    output_rest: tuple | None  # None: blocks return a tensor; else the items after the hidden states


def clean_pass(model: nn.Module, module: nn.Module, input_ids: torch.Tensor,
               prefix_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor, Prefix | None]:
    """``(logits, activation, prefix)`` of an unedited forward pass; ``activation`` is ``module``'s output;
    with ``prefix_layer``, ``prefix`` holds what :func:`spliced_pass` needs to skip blocks before it."""
    box: list[torch.Tensor] = []
    seen: dict[str, Any] = {}

    def keep(act: torch.Tensor) -> None:
        box.append(act.detach())

    def block_input(_module, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach()

    def block_output(_module, _inputs, output):
        seen["rest"] = tuple(output[1:]) if isinstance(output, tuple) else None

    handles = []
    if prefix_layer is not None:
        layers = decoder_layers(model)
        handles = [layers[prefix_layer].register_forward_pre_hook(block_input, with_kwargs=True),
                   layers[prefix_layer].register_forward_hook(block_output)]
    try:
        with hooked(module, keep):
            logits = model(input_ids=input_ids.to(model.device), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    prefix = Prefix(prefix_layer, seen["hidden"], seen["rest"]) if prefix_layer is not None else None
    return logits, box[0], prefix


@contextlib.contextmanager
def skipping(model: nn.Module, prefix: Prefix) -> Iterator[None]:
    """Blocks ``0..prefix.layer-1`` return ``prefix.hidden`` without computing: block ``prefix.layer`` gets the
    hidden states the clean pass gave it (embeddings, masks and position encodings are still made)."""
    layers = decoder_layers(model)
    output = prefix.hidden if prefix.output_rest is None else (prefix.hidden, *prefix.output_rest)

    def passthrough(*_args, **_kwargs):
        return output

    skipped = layers[:prefix.layer]
    own = [block.__dict__.get("forward") for block in skipped]  # a forward set on the instance (e.g. accelerate's)
    for block in skipped:
        block.forward = passthrough
    try:
        yield
    finally:
        for block, forward in zip(skipped, own):
            if forward is None:
                del block.forward  # back to the class's method
            else:
                block.forward = forward


def spliced_pass(model: nn.Module, module: nn.Module, input_ids: torch.Tensor,
                 activation: torch.Tensor, prefix: Prefix | None = None) -> torch.Tensor:
    """The logits of a forward pass in which ``module``'s output is replaced by ``activation``; with the
    ``prefix`` of the same ``input_ids`` (:func:`clean_pass`), the blocks before ``prefix.layer`` are skipped."""
    with hooked(module, lambda act: activation.to(act.dtype)), \
            (skipping(model, prefix) if prefix is not None else contextlib.nullcontext()):
        return model(input_ids=input_ids.to(model.device), use_cache=False).logits


def keep_mask(acts: torch.Tensor, *, drop_first: bool = True,
              outlier_factor: float | None = 10.0) -> tuple[torch.Tensor, int, int]:
    """``(keep [B, T] bool, dropped_first, dropped_massive)`` for activations ``[B, T, m]``.

    Drops position 0 (``drop_first``) and tokens whose norm exceeds ``outlier_factor`` times the
    median norm of the remaining tokens of this batch.
    """
    keep = torch.ones(acts.shape[:2], dtype=torch.bool, device=acts.device)
    if drop_first:
        keep[:, 0] = False
    dropped_first = int((~keep).sum())
    dropped_massive = 0
    if outlier_factor and keep.any():
        norms = acts.float().norm(dim=-1)
        massive = keep & (norms > outlier_factor * norms[keep].median())
        dropped_massive = int(massive.sum())
        keep &= ~massive
    return keep, dropped_first, dropped_massive


def token_contexts(tokenizer: Any, texts: Iterable[str], context: int) -> Iterator[torch.Tensor]:
    """Token-id rows ``[context]`` cut from the concatenated texts (EOS between texts, BOS first)."""
    if context < 2:
        raise SaeCompressError(f"context must be at least 2 tokens, got {context}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    body = context - (bos is not None)
    buf: list[int] = []
    for text in texts:
        for piece in _pieces(text):
            buf.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
            while len(buf) >= body:
                row, buf = buf[:body], buf[body:]
                yield torch.tensor(([bos] if bos is not None else []) + row, dtype=torch.long)
        if eos is not None:
            buf.append(eos)


def _pieces(text: str) -> Iterator[str]:
    """Split long texts at line breaks into pieces of about ``_TEXT_PIECE_CHARS`` characters."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + _TEXT_PIECE_CHARS)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def context_batches(tokenizer: Any, texts: Iterable[str], context: int, batch: int, *,
                    limit: int | None = None) -> Iterator[torch.Tensor]:
    """``[batch, context]`` token-id tensors from :func:`token_contexts`, at most ``limit`` contexts in all.

    The last batch may be shorter. Texts that yield no complete context raise ``SaeCompressError``.
    """
    rows = islice(token_contexts(tokenizer, texts, context), limit)
    chunk = list(islice(rows, batch))
    if not chunk:
        raise SaeCompressError("the given texts yield no complete context; give more text or a smaller --context")
    while chunk:
        yield torch.stack(chunk)
        chunk = list(islice(rows, batch))
