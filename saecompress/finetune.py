"""KL fine-tuning: train an SAE *through the LM* so the spliced model predicts like the clean one.

Activation-space training (``train.py``) minimises reconstruction error, which weighs every
direction of the residual stream alike; the LM does not. This short second phase splices the SAE
into the model at its hookpoint and minimises, per batch of contexts::

    loss = KL(clean ‖ spliced)  +  recon_coef · FVU(x, x̂)

where ``KL`` is the mean next-token KL divergence of the spliced model's predictions from the
clean model's, and ``FVU`` keeps the SAE a faithful reconstruction (the batch FVU of training).
Gradients flow through the LM's layers after the hookpoint into the SAE only (the LM is frozen);
for an ``ExpanderSAE`` they go through the truly sparse ops of ``sparse_ops.py``. Excluded tokens
(position 0, massive activations: see ``lm.keep_mask``) keep their clean value, as in ``ce_eval``.

**No latent dies.** Once a latent falls below every row's top-k threshold it gets no gradient
again. Two things keep the set of firing latents intact: each latent's encoder keeps its starting
norm (rows are rescaled after every step; the code scale can still change through the decoder),
so no latent wins the top-k by growing its encoder and raising everyone's threshold; and a latent
that has not fired for ``dead_tokens`` tokens is put back to its starting parameters (its Adam
moments reset). The fine-tune refines latents but does not lose them.

**Threshold SAEs** (``jumprelu``, ``batchtopk``) keep their thresholds θ fixed: the code is
``pre·[pre > θ]`` over the model's ``k`` candidates per row (its cap), with gradient ``[pre > θ]``
wrt ``pre``; the STE rule that learns θ (``trainer.py``) needs the target-L0 term, which a KL
fine-tune has no target for. Encoders, decoders and biases learn as for top-k SAEs. A ``topafa`` SAE
keeps what its norm-matching rule picks among its ``k`` candidates, with gradient through the kept values.
A **pursuit-encoded** expander (no encoder) learns its decoder values and ``b_dec`` through the codes of
``models.pursue``; its "encoder norms" are its decoder rows' norms, which pursuit codes do not depend on.

Each step costs two forward passes of the LM and one backward pass through the layers after the
hookpoint. Adam, cosine decay from ``lr`` to 0 (``objective.lr_factor``), gradient clipping.
Decoder rows are not renormalised (the file format does not need unit rows).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._io import check_outputs
from .compact import with_metrics
from .errors import SaeCompressError
from .latents import DeadLatents, fired, reset_moments
from .lm import clean_pass, context_batches, hooked, hookpoint, keep_mask, next_token_kl, site_module, skipping
from .models import VARIABLE_COUNT, ExpanderSAE, SparseAutoencoder
from .objective import fvu_loss, lr_factor, training_forward
from .sources import Loaded, save
from .sparse_ops import MaskLayout


@dataclass
class FinetuneConfig:
    """Settings of one KL fine-tuning run."""

    tokens: int = 300_000  # LM tokens (contexts × context length)
    context: int = 256
    batch: int = 4  # contexts per step
    lr: float = 1e-3
    recon_coef: float = 3.0
    grad_clip: float = 1.0
    dead_tokens: int | None = None  # default 32 n / L0: 32x a latent's mean firing interval (L0: k, or a
    # threshold SAE's mean L0 on the first batch)
    drop_first: bool = True
    outlier_factor: float | None = 10.0

    def check(self) -> None:
        for name in ("tokens", "context", "batch"):
            if getattr(self, name) < 1:
                raise SaeCompressError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.context < 2:
            raise SaeCompressError(f"context must be at least 2 tokens, got {self.context}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SaeCompressError(f"--lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.recon_coef) and self.recon_coef >= 0):
            raise SaeCompressError(f"--recon-coef must be a number of at least 0, got {self.recon_coef}")
        if self.dead_tokens is not None and self.dead_tokens < 1:
            raise SaeCompressError(f"dead_tokens must be at least 1, got {self.dead_tokens}")


class _Splice:
    """Forward-hook state: capture the clean activation, then replace it by the SAE's reconstruction."""

    def __init__(self, sae: SparseAutoencoder, cfg: FinetuneConfig):
        self.sae, self.cfg = sae, cfg
        self.layout = MaskLayout.from_indices(sae.indices, sae.m) if isinstance(sae, ExpanderSAE) else None
        self.splicing = False
        self.act = self.keep = None
        self.fvu: torch.Tensor | None = None
        self.fired: torch.Tensor | None = None  # [n] bool: latents active in the last splice
        self.l0 = 0.0  # mean active latents per row in the last splice

    def __call__(self, act: torch.Tensor) -> torch.Tensor | None:
        if not self.splicing:
            if act.shape[-1] != self.sae.m:
                raise SaeCompressError(f"model activations have hidden size {act.shape[-1]} but the SAE has "
                                       f"m={self.sae.m}; pick the model/layer/site the SAE was trained on")
            self.act = act.detach()
            self.keep = keep_mask(act, drop_first=self.cfg.drop_first, outlier_factor=self.cfg.outlier_factor)[0]
            return None
        xin, stats = self.sae.normalise(self.act[self.keep].to(self.sae.b_dec.dtype))
        out = training_forward(self.sae, xin, self.layout)
        self.fvu = fvu_loss(xin, out.recon)
        self.fired = fired(out.top_vals, out.top_idx, self.sae.n)
        self.l0 = float((out.top_vals.detach() != 0).sum(1).double().mean())
        spliced = self.act.clone().to(out.recon.dtype)
        spliced[self.keep] = self.sae.unnormalise(out.recon, stats)
        return spliced.to(self.act.dtype)


# The latent axis of each trainable tensor, for putting single latents back.
_LATENT_AXIS = {"values": 0, "enc_values": 0, "b_enc": 0, "W_dec": 0, "W_enc": 1}


def _encoder(sae: SparseAutoencoder) -> tuple[torch.Tensor, int]:
    """``(encoder weights, latent axis)``: ``W_enc [m, n]`` of a dense SAE, ``[n, d]`` values of an expander."""
    return (sae.W_enc, 1) if hasattr(sae, "W_enc") else (sae.encoder_values, 0)


class _LatentKeeper:
    """Keeps every latent in the top-k competition (see the module docstring)."""

    def __init__(self, sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, dead_tokens: int):
        self.params = {name: p for name, p in sae.named_parameters() if name in _LATENT_AXIS}
        self.start = {name: p.detach().clone() for name, p in self.params.items()}
        self.encoder, self.axis = _encoder(sae)
        self.encoder_norms = self.encoder.detach().norm(dim=1 - self.axis, keepdim=True)
        self.optimizer = optimizer
        self.dead = DeadLatents(sae.n, dead_tokens)
        self.restored = 0

    @torch.no_grad()
    def update(self, fired: torch.Tensor, tokens: int) -> None:
        """After an optimizer step: fix encoder norms, count ``tokens`` and restore latents dead since."""
        norms = self.encoder.norm(dim=1 - self.axis, keepdim=True)
        self.encoder.mul_(torch.where(norms > 0, self.encoder_norms / norms.clamp_min(1e-12), 1.0))
        self.dead.update(fired, tokens)
        dead = self.dead.indices()
        if dead.numel() == 0:
            return
        for name, p in self.params.items():
            axis = _LATENT_AXIS[name]
            p.index_copy_(axis, dead, self.start[name].index_select(axis, dead))
            reset_moments(self.optimizer, p, dead, axis)
        self.dead.revived(dead)
        self.restored += int(dead.numel())


def finetune(sae: SparseAutoencoder, model: nn.Module, tokenizer: Any, texts: Iterable[str], layer: int,
             site: str = "resid", cfg: FinetuneConfig | None = None, *, out: str | os.PathLike | None = None,
             origin: Loaded | None = None, progress: bool = True) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """KL-fine-tune ``sae`` in place at ``(layer, site)`` of ``model`` over ``texts``; returns ``(sae, stats)``.

    ``stats``: the settings, steps, tokens and the mean KL / FVU of the first and last tenth of
    the steps. With ``out`` the model is written there (compact file, or SAELens folder for a
    dense SAE), atomically, with the stats in its metadata; it is checked before training starts.
    ``origin`` is the source ``sae`` was loaded from: ``out`` keeps its user metadata (its
    ``held_out`` metrics renamed ``held_out_before_finetune``), provenance and storage dtype.
    """
    cfg = cfg or FinetuneConfig()
    cfg.check()
    if out is not None:
        check_outputs([out], kind="file" if isinstance(sae, ExpanderSAE) else "folder")
    module = site_module(model, layer, site)
    model.requires_grad_(False)
    sae.train().requires_grad_(True)
    params = [p for p in sae.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    splice = _Splice(sae, cfg)
    keeper = _LatentKeeper(sae, optimizer, cfg.dead_tokens or 32 * sae.n // sae.k)
    steps = max(1, cfg.tokens // (cfg.context * cfg.batch))
    history: list[tuple[float, float]] = []
    bar = tqdm(total=steps * cfg.batch * cfg.context, unit="tok", unit_scale=True, desc="finetune",
               disable=not progress, dynamic_ncols=True)
    with hooked(module, splice):
        for step, ids in enumerate(context_batches(tokenizer, texts, cfg.context, cfg.batch)):
            if step >= steps:
                break
            ids = ids.to(model.device)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, steps)
            splice.splicing = False
            with torch.no_grad():
                logits, _, prefix = clean_pass(model, module, ids, prefix_layer=layer)
                clean_logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
                del logits
            splice.splicing = True
            with skipping(model, prefix):  # the frozen blocks before the site's give what they gave above
                kl = next_token_kl(clean_logp, model(input_ids=ids, use_cache=False).logits).mean()
            loss = kl + cfg.recon_coef * splice.fvu
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            if step == 0 and cfg.dead_tokens is None and sae.activation in VARIABLE_COUNT:
                keeper.dead.dead_tokens = max(1, round(32 * sae.n / max(1.0, splice.l0)))  # k is only a cap
            keeper.update(splice.fired, int(splice.keep.sum()))
            history.append((float(kl.detach()), float(splice.fvu.detach())))
            bar.update(ids.numel())
            bar.set_postfix(kl=f"{history[-1][0]:.4f}", fvu=f"{history[-1][1]:.4f}", refresh=False)
    bar.close()
    sae.eval().requires_grad_(False)
    tenth = max(1, len(history) // 10)
    first, last = torch.tensor(history[:tenth]).mean(0), torch.tensor(history[-tenth:]).mean(0)
    stats = {"finetune": {**asdict(cfg), "hookpoint": hookpoint(layer, site), "steps": len(history),
                          "tokens_seen": len(history) * cfg.batch * cfg.context,
                          "latents_restored": keeper.restored,
                          "kl_first": float(first[0]), "kl_last": float(last[0]),
                          "fvu_first": float(first[1]), "fvu_last": float(last[1])}}
    if out is not None:
        previous = dict(origin.user) if origin is not None else {}
        if "held_out" in previous:  # activation-space metrics of the model before this run
            previous["held_out_before_finetune"] = previous.pop("held_out")
        save(sae, out, with_metrics({**previous, **stats}, None), origin)
    return sae, stats
