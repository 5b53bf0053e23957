"""Causal LMs from transformers: load, hook a site, harvest activations, splice an SAE in.

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
models' residual streams (REFERENCE §4). By default both are excluded: ``harvest`` does not
write them, and ``ce_eval`` keeps their clean value when ablating or splicing. Set
``drop_first=False`` / ``outlier_factor=None`` to keep them. The counts are reported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._io import check_outputs
from .activations import ShardWriter, check_shard_folder
from .errors import SaeCompressError, first_line
from .models import SparseAutoencoder

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
    if site not in SITES:
        raise SaeCompressError(f"unknown site {site!r}; expected one of {', '.join(SITES)}")
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
    box: list[torch.Tensor] = []

    def grab(act: torch.Tensor) -> None:
        box.append(act.detach().float())
        raise _Stop

    with torch.no_grad(), hooked(site_module(model, layer, site), grab), contextlib.suppress(_Stop):
        model(input_ids=input_ids.to(model.device), use_cache=False)
    return box[0].cpu()


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


def context_batches(tokenizer: Any, texts: Iterable[str], context: int, batch: int) -> Iterator[torch.Tensor]:
    """``[batch, context]`` token-id tensors from :func:`token_contexts` (the last one may be shorter)."""
    rows: list[torch.Tensor] = []
    for row in token_contexts(tokenizer, texts, context):
        rows.append(row)
        if len(rows) == batch:
            yield torch.stack(rows)
            rows = []
    if rows:
        yield torch.stack(rows)


def check_harvest(out: str | os.PathLike, tokens: int, *, overwrite: bool = False,
                  inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """What :func:`harvest` refuses before reading any text; call it before loading the model.

    ``tokens < 1``, and an ``out`` folder that holds files (unless ``overwrite``), holds or lies
    inside one of ``inputs``, or cannot be written.
    """
    if tokens <= 0:
        raise SaeCompressError(f"--tokens must be positive, got {tokens}")
    check_outputs([out], inputs, kind="folder")
    check_shard_folder(out, overwrite)


def harvest(model: nn.Module, tokenizer: Any, texts: Iterable[str], layer: int, site: str = "resid", *,
            tokens: int, out: str | os.PathLike, context: int = 256, batch: int = 8,
            drop_first: bool = True, outlier_factor: float | None = 10.0, dtype: str = "float32",
            shard_rows: int = 65536, overwrite: bool = False, metadata: dict[str, Any] | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Write ``tokens`` activation rows at ``(layer, site)`` as shards + ``manifest.json`` in ``out``.

    Rows are kept tokens (see the module docstring on excluded tokens), in text order. If the
    texts run out first, fewer rows are written (``num_rows`` in the returned manifest says how
    many). Returns the manifest.
    """
    check_harvest(out, tokens, overwrite=overwrite)
    site_module(model, layer, site)  # validate before reading any text
    stats = {"tokens_seen": 0, "dropped_first": 0, "dropped_massive": 0}
    writer: ShardWriter | None = None
    bar = tqdm(total=tokens, unit="tok", desc=f"acts {hookpoint(layer, site)}", disable=not progress)
    try:
        written = 0
        for ids in context_batches(tokenizer, texts, context, batch):
            acts = capture(model, ids, layer, site)
            keep, first, massive = keep_mask(acts, drop_first=drop_first, outlier_factor=outlier_factor)
            rows = acts[keep][: tokens - written]
            if writer is None:
                writer = ShardWriter(out, acts.shape[-1], dtype=dtype, shard_rows=shard_rows, overwrite=overwrite)
            writer.add(rows)
            stats["tokens_seen"] += ids.numel()
            stats["dropped_first"] += first
            stats["dropped_massive"] += massive
            written += rows.shape[0]
            bar.update(rows.shape[0])
            bar.set_postfix(dropped=stats["dropped_first"] + stats["dropped_massive"])
            if written >= tokens:
                break
        if writer is None:
            raise SaeCompressError("the given texts yield no complete context; give more text or a smaller --context")
        meta = {"model": getattr(model.config, "_name_or_path", None) or type(model).__name__,
                "architecture": type(model).__name__, "layer": layer, "site": site,
                "hookpoint": hookpoint(layer, site), "context": context, "drop_first": drop_first,
                "outlier_factor": outlier_factor, **stats, **(metadata or {})}
        writer.close(meta)
        return {"m": writer.m, "num_rows": writer.num_rows, "dtype": dtype, **meta, "shards": writer.shards}
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    finally:
        bar.close()


def _ce_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token cross-entropy over all predicted positions (float64 sum)."""
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                             reduction="none")
    return float(losses.double().sum())


def next_token_kl(clean_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ patched) of the next-token distributions at each predicted position ``[B, T-1]``.

    ``clean_logp`` is ``log_softmax`` of the clean logits without their last position.
    """
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return (clean_logp.exp() * (clean_logp - logp)).sum(-1)


def _recovered(ablated: float, spliced: float, clean: float) -> float:
    return (ablated - spliced) / (ablated - clean) if ablated != clean else float("nan")


@torch.no_grad()
def ce_eval_many(model: nn.Module, tokenizer: Any, texts: Iterable[str], saes: dict[str, SparseAutoencoder],
                 layer: int, site: str = "resid", *, tokens: int = 8192, context: int = 256, batch: int = 4,
                 drop_first: bool = True, outlier_factor: float | None = 10.0,
                 progress: bool = True) -> dict[str, dict[str, Any]]:
    """:func:`ce_eval` for several SAEs at one site, sharing the clean and ablated passes.

    Returns ``{name: report}``; each report is what :func:`ce_eval` returns for that SAE.
    """
    module = site_module(model, layer, site)
    n_ctx = -(-tokens // context)
    batches: list[torch.Tensor] = []
    for ids in context_batches(tokenizer, texts, context, batch):
        batches.append(ids[: n_ctx - sum(len(b) for b in batches)])
        if sum(len(b) for b in batches) >= n_ctx:
            break
    if not batches:
        raise SaeCompressError("the given texts yield no complete context; give more text or a smaller --context")

    # pass 1 (stops at the site): hidden size check and the mean activation over kept tokens
    total, count = None, 0
    for ids in tqdm(batches, desc="ce mean", unit="batch", disable=not progress, leave=False):
        acts = capture(model, ids, layer, site)
        for name, sae in saes.items():
            if acts.shape[-1] != sae.m:
                raise SaeCompressError(
                    f"model activations at {hookpoint(layer, site)} have hidden size {acts.shape[-1]} "
                    f"but {'the SAE' if len(saes) == 1 else f'SAE {name!r}'} has m={sae.m}; "
                    "pick the model/layer/site the SAE was trained on"
                )
        keep, _, _ = keep_mask(acts, drop_first=drop_first, outlier_factor=outlier_factor)
        s = acts[keep].double().sum(0)
        total = s if total is None else total + s
        count += int(keep.sum())
    mean = (total / max(count, 1)).float()

    modes = ["clean", "zero", "mean", *(f"sae:{name}" for name in saes)]
    ce = dict.fromkeys(modes, 0.0)
    kl = dict.fromkeys(modes, 0.0)
    stats = {"tokens": 0, "predicted": 0, "excluded_first": 0, "excluded_massive": 0}
    state: dict[str, Any] = {}

    def edit(act: torch.Tensor) -> torch.Tensor | None:
        mode = state["mode"]
        if mode == "clean":
            state["keep"], first, massive = keep_mask(act, drop_first=drop_first, outlier_factor=outlier_factor)
            stats["excluded_first"] += first
            stats["excluded_massive"] += massive
            return None
        if mode == "zero":
            new = torch.zeros_like(act)
        elif mode == "mean":
            new = mean.to(act).expand_as(act)
        else:
            sae = saes[mode[4:]]
            new = sae(act.to(next(sae.parameters()).dtype)).to(act.dtype)
        return torch.where(state["keep"].unsqueeze(-1), new, act)

    with hooked(module, edit):
        for ids in tqdm(batches, desc="ce eval", unit="batch", disable=not progress, leave=False):
            ids = ids.to(model.device)
            clean_logp = None
            for mode in modes:
                state["mode"] = mode
                logits = model(input_ids=ids, use_cache=False).logits
                ce[mode] += _ce_sum(logits, ids)
                if clean_logp is None:
                    clean_logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
                else:
                    kl[mode] += float(next_token_kl(clean_logp, logits).double().sum())
                del logits
            del clean_logp
            stats["tokens"] += ids.numel()
            stats["predicted"] += ids[:, 1:].numel()

    n = stats["predicted"]
    ce = {k: v / n for k, v in ce.items()}
    kl = {k: v / n for k, v in kl.items()}
    reports = {}
    for name in saes:
        spliced, kl_spliced = ce[f"sae:{name}"], kl[f"sae:{name}"]
        reports[name] = {
            "ce_clean": ce["clean"], "ce_zero": ce["zero"], "ce_mean": ce["mean"], "ce_spliced": spliced,
            "ce_recovered": _recovered(ce["zero"], spliced, ce["clean"]),
            "ce_recovered_mean_ablation": _recovered(ce["mean"], spliced, ce["clean"]),
            "kl_zero": kl["zero"], "kl_mean": kl["mean"], "kl_spliced": kl_spliced,
            "kl_recovered": _recovered(kl["zero"], kl_spliced, 0.0),
            "ce_tokens": stats["tokens"], "ce_excluded_first": stats["excluded_first"],
            "ce_excluded_massive": stats["excluded_massive"], "hookpoint": hookpoint(layer, site)}
    return reports


def ce_eval(model: nn.Module, tokenizer: Any, texts: Iterable[str], sae: SparseAutoencoder, layer: int,
            site: str = "resid", *, tokens: int = 8192, context: int = 256, batch: int = 4,
            drop_first: bool = True, outlier_factor: float | None = 10.0,
            progress: bool = True) -> dict[str, Any]:
    """Next-token CE with the activation at ``(layer, site)`` clean, zeroed, mean-ablated and spliced.

    Evaluates ``ceil(tokens / context)`` contexts of ``texts`` (CE averaged over every predicted
    position). The mean for mean-ablation is taken over the kept tokens of the same contexts (a
    first pass that stops at the site). Excluded tokens (position 0, massive-activation tokens)
    keep their clean value in every variant. Returns ``ce_clean, ce_zero, ce_mean, ce_spliced,
    ce_recovered = (ce_zero − ce_spliced)/(ce_zero − ce_clean), ce_recovered_mean_ablation``
    (same with ``ce_mean``), KL(clean ‖ patched) versions ``kl_zero, kl_mean, kl_spliced,
    kl_recovered = (kl_zero − kl_spliced)/kl_zero`` (the SAEBench score), token counts and
    ``hookpoint``. To score several SAEs of one site, :func:`ce_eval_many` shares the passes.
    """
    return ce_eval_many(model, tokenizer, texts, {"sae": sae}, layer, site, tokens=tokens, context=context,
                        batch=batch, drop_first=drop_first, outlier_factor=outlier_factor, progress=progress)["sae"]
