"""CE-loss recovered and KL: next-token predictions with an SAE spliced in at a site.

Each batch of contexts gets one clean pass, which also yields the activation at the site and the
tokens :func:`keep_mask` keeps, then one spliced pass per variant: zero-ablated, mean-ablated and
each SAE's reconstruction replace the kept tokens' activation; excluded tokens keep their clean value.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import SaeCompressError
from ..models import SparseAutoencoder
from .model import Prefix, capture, clean_pass, context_batches, hookpoint, keep_mask, site_module, spliced_pass


def next_token_kl(clean_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ patched) of the next-token distributions at each predicted position ``[B, T-1]``.

    ``clean_logp`` is ``log_softmax`` of the clean logits without their last position.
    """
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return (clean_logp.exp() * (clean_logp - logp)).sum(-1)


def _ce_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token cross-entropy over all predicted positions (float64 sum)."""
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                             reduction="none")
    return float(losses.double().sum())


def _recovered(ablated: float, spliced: float, clean: float) -> float:
    return (ablated - spliced) / (ablated - clean) if ablated != clean else float("nan")


def _site_mean(model: nn.Module, batches: list[torch.Tensor], layer: int, site: str,
               saes: dict[str, SparseAutoencoder], keep_args: dict[str, Any], progress: bool) -> torch.Tensor:
    """The mean activation at the site over the kept tokens (passes that stop at the site); checks each SAE's m."""
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
        keep = keep_mask(acts, **keep_args)[0]
        s = acts[keep].double().sum(0)
        total = s if total is None else total + s
        count += int(keep.sum())
    return (total / max(count, 1)).float()


class CEReference:
    """The passes every SAE scored at one site on the same contexts shares, made once.

    Holds the contexts, the clean activation at the site, the input of the site's block (so spliced passes
    skip the blocks before it: ``model.spliced_pass`` with a ``Prefix``) and the kept-token mask of each
    batch, the clean / zero- / mean-ablated CE and KL sums, and (``keep_logp``) the clean next-token
    log-probs, so that :meth:`score` runs one spliced pass of the blocks from the site's on per SAE and
    batch (without ``keep_logp``, a clean pass more; kept, they take ``tokens × vocabulary × 4`` bytes).
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, tokenizer: Any, texts: Iterable[str], layer: int, site: str = "resid", *,
                 tokens: int = 8192, context: int = 256, batch: int = 4, drop_first: bool = True,
                 outlier_factor: float | None = 10.0, keep_logp: bool = False, progress: bool = True,
                 check: dict[str, SparseAutoencoder] | None = None):
        """``check``: SAEs whose ``m`` must match the site's width (refused with a clear error otherwise)."""
        self.model, self.layer, self.site, self.progress = model, layer, site, progress
        self.module = site_module(model, layer, site)
        batches = list(context_batches(tokenizer, texts, context, batch, limit=-(-tokens // context)))
        keep_args = {"drop_first": drop_first, "outlier_factor": outlier_factor}
        self.mean = _site_mean(model, batches, layer, site, check or {}, keep_args, progress)
        self.ce = dict.fromkeys(["clean", "zero", "mean"], 0.0)
        self.kl = dict.fromkeys(["zero", "mean"], 0.0)
        self.batches: list[tuple[torch.Tensor, torch.Tensor, Prefix, torch.Tensor, torch.Tensor | None]] = []
        self.excluded_first = self.excluded_massive = 0
        for ids in tqdm(batches, desc="ce clean", unit="batch", disable=not progress, leave=False):
            ids = ids.to(model.device)
            logits, act, prefix = clean_pass(model, self.module, ids, prefix_layer=layer)
            keep, first, massive = keep_mask(act, **keep_args)
            self.excluded_first += first
            self.excluded_massive += massive
            self.ce["clean"] += _ce_sum(logits, ids)
            clean_logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
            del logits
            for variant, new in (("zero", torch.zeros_like(act)), ("mean", self.mean.to(act).expand_as(act))):
                self._add(variant, ids, act, prefix, keep, new, clean_logp, self.ce, self.kl)
            self.batches.append((ids, act, prefix, keep, clean_logp if keep_logp else None))
        self.predicted = sum(ids[:, 1:].numel() for ids in batches)
        self.tokens = sum(ids.numel() for ids in batches)

    def _add(self, variant: str, ids: torch.Tensor, act: torch.Tensor, prefix: Prefix, keep: torch.Tensor,
             new: torch.Tensor, clean_logp: torch.Tensor, ce: dict[str, float], kl: dict[str, float]) -> None:
        logits = spliced_pass(self.model, self.module, ids, torch.where(keep.unsqueeze(-1), new, act), prefix)
        ce[variant] = ce.get(variant, 0.0) + _ce_sum(logits, ids)
        kl[variant] = kl.get(variant, 0.0) + float(next_token_kl(clean_logp, logits).double().sum())

    @torch.no_grad()
    def score(self, saes: dict[str, SparseAutoencoder]) -> dict[str, dict[str, Any]]:
        """``{name: report}`` for each SAE spliced in (the report :func:`ce_eval` describes)."""
        ce: dict[str, float] = {}
        kl: dict[str, float] = {}
        for ids, act, prefix, keep, clean_logp in tqdm(self.batches, desc="ce eval", unit="batch",
                                                       disable=not self.progress, leave=False):
            if clean_logp is None:
                logits, _, _ = clean_pass(self.model, self.module, ids)
                clean_logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
                del logits
            for name, sae in saes.items():
                new = sae(act.to(next(sae.parameters()).dtype)).to(act.dtype)
                self._add(name, ids, act, prefix, keep, new, clean_logp, ce, kl)
        ref = {k: v / self.predicted for k, v in self.ce.items()}
        ref_kl = {k: v / self.predicted for k, v in self.kl.items()}
        reports = {}
        for name in saes:
            spliced, kl_spliced = ce[name] / self.predicted, kl[name] / self.predicted
            reports[name] = {
                "ce_clean": ref["clean"], "ce_zero": ref["zero"], "ce_mean": ref["mean"], "ce_spliced": spliced,
                "ce_recovered": _recovered(ref["zero"], spliced, ref["clean"]),
                "ce_recovered_mean_ablation": _recovered(ref["mean"], spliced, ref["clean"]),
                "kl_zero": ref_kl["zero"], "kl_mean": ref_kl["mean"], "kl_spliced": kl_spliced,
                "kl_recovered": _recovered(ref_kl["zero"], kl_spliced, 0.0),
                "ce_tokens": self.tokens, "ce_excluded_first": self.excluded_first,
                "ce_excluded_massive": self.excluded_massive, "hookpoint": hookpoint(self.layer, self.site)}
        return reports


def ce_eval_many(model: nn.Module, tokenizer: Any, texts: Iterable[str], saes: dict[str, SparseAutoencoder],
                 layer: int, site: str = "resid", *, tokens: int = 8192, context: int = 256, batch: int = 4,
                 drop_first: bool = True, outlier_factor: float | None = 10.0,
                 progress: bool = True) -> dict[str, dict[str, Any]]:
    """:func:`ce_eval` for several SAEs at one site, sharing the clean and ablated passes (:class:`CEReference`).

    Returns ``{name: report}``; each report is what :func:`ce_eval` returns for that SAE.
    """
    reference = CEReference(model, tokenizer, texts, layer, site, tokens=tokens, context=context, batch=batch,
                            drop_first=drop_first, outlier_factor=outlier_factor, progress=progress, check=saes)
    return reference.score(saes)


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
