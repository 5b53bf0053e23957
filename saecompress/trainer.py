"""The training state of one run (``TrainConfig``, ``Trainer``): model, Adam, counters, one step.

One step for both models and for distillation::

    loss = FVU(x, x̂)                                   # batch-normalised reconstruction error
         + auxk_coef · FVU(e, ê_aux)                    # AuxK: dead latents reconstruct e = x − x̂
         + distill_coef · latent term                   # distillation only (see distill.py)
         + l0_coef · (L0 / k − 1)²                      # JumpReLU only: mean L0 pulled to the target k
         + afa_coef · E(‖z‖ − ‖x − b_dec‖)² / E‖x − b_dec‖²  # topafa only: the paper's AFA term

Decoder rows are kept at unit norm (gradient component along each row removed before the step,
rows renormalised after it: ``objective.py``). Adam with ``lr ≈ 3e-3/√(n/2¹⁴)`` (expander; dense
``2e-4/√(n/2¹⁴)``), linear warm-up then cosine (or linear) decay, gradient clipping. A latent is
dead once it has not fired for ``dead_tokens`` tokens (default 32× the mean firing interval
``n/k``; ``latents.py``); every ``reaim_every`` steps a native top-k expander run revives its dead
latents (see ``Trainer._reaim_dead``). AuxK alone cannot: under Adam its gradient on a dead
latent is scale-free, so it only nudges the direction while the top-k threshold, set by the
growing encoders of the alive latents, runs away.

A fresh untied top-k expander trains **balanced** (``balance`` β, default 0.5): on inputs whose dim ``j``
is scaled by ``σ_j^-β`` (``Trainer.set_dim_scale``), with the loss still measured unscaled. On a seeded
mask a latent's ``d`` dims are random; where they all have low variance its codes stay small, top-k
never picks it, and re-aiming can only revive it with a bias that the input no longer moves. The scale
evens that competition out and folds exactly into the saved values (docs/FIDELITY.md measures it).

Threshold SAEs (``activation`` in ``models.THRESHOLD_ACTIVATIONS``) train with their papers' rules,
truly sparse for expanders (``sparse_ops.py``), with ``k`` the target mean L0 and the model's own
``k`` a training cap of ``CAP_FACTOR·k`` candidates per row:

* ``jumprelu`` (Rajamanoharan et al. 2024, as dictionary_learning's JumpReLU trainer): the
  per-latent θ is learned as ``log θ`` (θ = exp(log θ) > 0), with straight-through rectangle-kernel
  pseudo-derivatives of bandwidth ``ε`` (``bandwidth``, given as the papers do in the scale of unit
  mean squared input norm: ``ε·√m`` in the trainer's unit-variance-per-dim scale); the
  sparsity term is the target-L0 form above (``l0_coef`` λ, default 1); log θ has its own learning
  rate (``threshold_lr``: it is dimensionless, and at the SAE's rate θ trails the encoders). θ starts where the first
  batch fires ``k`` latents per row on average (one value for all latents).
  With ``sparsity_target="rates"`` (the default when a run starts from a JumpReLU SAE, e.g. a
  converted one) there is no L0 term: each latent's θ follows a firing-rate target instead (the
  starting SAE's rate on the first training rows), ``log θ_i += η·clip((f_i − r_i)/r_i, ±1)`` after
  every step (``f_i`` the batch's rate, η = ``rate_step`` on the LR schedule), so no latent's
  threshold drifts above everything it sees while the others take over its rows.
* ``batchtopk`` (Bussmann et al. 2024, as dictionary_learning's BatchTopK trainer): each step keeps
  the ``B·k`` largest ``ReLU(pre)`` of the batch; the global θ the saved model thresholds at is an
  EMA (``THRESHOLD_EMA``) of the smallest kept activation.

``topafa`` (top-AFA, ``models.select_afa``) has no θ: ``k`` is its training cap, the step keeps what the
norm-matching rule picks among the ``k`` largest ``ReLU(pre)·‖decoder row‖`` (``sparse_ops.gated_code``),
AuxK as for top-k, no re-aiming by default.

The run loop around it (data, checkpoints, files, the saved cap) is ``train.py``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .distill import DistillTerm
from .distributed import LOCAL, Group
from .errors import SaeCompressError, check_choice
from .latents import DeadLatents, fired, reset_moments
from .models import (THRESHOLD_ACTIVATIONS, VARIABLE_COUNT, ExpanderSAE, TopKSAE, require_topk,
                     require_trainable_encoder, unit_rows)
from .objective import DECAYS, fvu_loss, lr_factor, normalize_decoder, remove_parallel_grad, training_forward
from .sparse_ops import BANDWIDTH, MaskLayout, SparseForward

SPARSITY_TARGETS = ("l0", "rates")
DEFAULT_BALANCE = 0.5  # a fresh untied expander's TrainConfig.balance
CAP_FACTOR = 4  # a threshold SAE trains on at most CAP_FACTOR·k candidate latents per row
THRESHOLD_EMA = 0.99  # BatchTopK: weight of the running θ against the batch's smallest kept value


def training_cap(k: float, n: int) -> int:
    """Candidate latents per row a threshold SAE with target mean L0 ``k`` trains on."""
    return max(1, min(n, math.ceil(CAP_FACTOR * k)))


def dim_scale_applies(sae: ExpanderSAE | TopKSAE) -> bool:
    """Whether ``Trainer.set_dim_scale`` is for ``sae``: an untied top-k Expander SAE without layer norm (its
    selection depends on pre-activations only, so the scale folds into its values exactly; threshold SAEs
    have a θ per latent and no competition for the k places to even out)."""
    return (isinstance(sae, ExpanderSAE) and sae.enc_values is not None and not sae.normalize_input
            and sae.activation not in (*THRESHOLD_ACTIVATIONS, "topafa"))


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (``None`` fields get the documented defaults)."""

    k: int | None = None  # default 32 for a fresh SAE, the starting SAE's k otherwise
    d: int | None = 7  # None: a dense TopKSAE baseline
    n: int | None = None  # number of latents; or use expansion
    expansion: int | None = None  # n = expansion * m
    activation: str | None = None  # default: signed_topk (expander), topk_relu (dense)
    encoder: str = "untied"
    mask_seed: int = 0
    mask: str | None = None  # convert's mask strategy with a teacher (default topd); fresh SAEs: expander
    tokens: int = 2_000_000
    batch_size: int = 1024
    lr: float | None = None  # default 3e-3 / sqrt(n / 2**14) (expander), 2e-4 / sqrt(n / 2**14) (dense)
    warmup_frac: float = 0.02
    decay: str = "cosine"  # cosine | linear | constant
    final_lr_frac: float = 0.1
    grad_clip: float = 1.0
    k_aux: int | None = None  # default m // 2
    auxk_coef: float = 1 / 32
    dead_tokens: int | None = None  # default min(32 * n / k, tokens // 10): 32x a latent's mean firing interval
    distill_coef: float = 1.0
    held_out_rows: int | None = None  # default min(8192, a tenth of the rows); 0: none
    checkpoint_every: int = 500  # steps
    reaim_every: int | None = None  # steps between re-aiming dead expander latents (0: never); default 5,
    # 0 for threshold SAEs (a revived latent jumps in at its threshold θ on top of the others: FVU suffers)
    l0_coef: float = 1.0  # jumprelu: λ of the target-L0 term λ·(L0/k − 1)²
    bandwidth: float = BANDWIDTH  # jumprelu: the rectangle window ε of the θ pseudo-gradients (unit-norm scale)
    threshold_lr: float = 1e-2  # jumprelu "l0": Adam learning rate of log θ (same warm-up and decay)
    rate_step: float = 0.05  # jumprelu "rates": η of the per-latent log θ update (same warm-up and decay)
    sparsity_target: str | None = None  # jumprelu: "l0" (mean L0 → k) or "rates" (each latent's firing rate
    # → the starting SAE's); default "rates" when starting from a jumprelu SAE, else "l0"
    afa_coef: float = 0.0  # topafa: weight of the AFA term (code norm pulled to the centred input norm)
    balance: float | None = None  # untied expanders: train with input dim j scaled by σ_j^-balance (0: off);
    # default 0.5 for a fresh SAE, the starting SAE's (0 if none recorded) with --init, 0 with --teacher
    seed: int = 0

    def check(self) -> None:
        require_trainable_encoder(self.encoder, "train")
        if self.n is not None and self.expansion is not None:
            raise SaeCompressError("give the number of latents as --n or --expansion, not both")
        for name in ("k", "tokens", "batch_size", "checkpoint_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SaeCompressError(f"{name} must be at least 1, got {getattr(self, name)}")
        check_choice("decay", self.decay, DECAYS)
        if self.sparsity_target is not None:
            check_choice("sparsity target", self.sparsity_target, SPARSITY_TARGETS)
        if self.d is not None and self.d < 1:
            raise SaeCompressError(f"d must be at least 1, got {self.d}")
        if self.reaim_every is not None and self.reaim_every < 0:
            raise SaeCompressError(f"reaim_every must be 0 (never) or more, got {self.reaim_every}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise SaeCompressError(f"--lr must be a positive number, got {self.lr}")
        for name in ("bandwidth", "threshold_lr", "rate_step"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise SaeCompressError(f"{name} must be a positive number, got {getattr(self, name)}")
        for name in ("auxk_coef", "distill_coef", "grad_clip", "warmup_frac", "final_lr_frac", "l0_coef", "afa_coef",
                     "balance"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise SaeCompressError(f"{name} must be a number of at least 0, got {value}")
        if self.held_out_rows is not None and self.held_out_rows < 0:
            raise SaeCompressError(f"held-out rows must be 0 (none) or more, got {self.held_out_rows}")
        if self.tokens < self.batch_size:
            raise SaeCompressError(f"--tokens {self.tokens} is less than one batch of {self.batch_size}; train at "
                                   "least one batch, or lower --batch")

    def held_out(self, rows: int) -> int:
        """Rows kept out of training out of ``rows``: as asked, or by default min(8192, rows / 10)."""
        if self.held_out_rows is None:
            return min(8192, rows // 10)
        if self.held_out_rows >= rows:
            raise SaeCompressError(f"--held-out {self.held_out_rows} leaves no training rows of the {rows} in "
                                   f"--acts; hold out fewer (e.g. {rows // 10})")
        return self.held_out_rows

    def num_latents(self, m: int) -> int | None:
        return self.n if self.n is not None else (self.expansion * m if self.expansion else None)

    def learning_rate(self, n: int, expander: bool = True) -> float:
        if self.lr is not None:
            return self.lr
        return (3e-3 if expander else 2e-4) / math.sqrt(n / 2**14)

    def lr_factor(self, step: int, total: int) -> float:
        """Warm-up then decay multiplier of the base learning rate at ``step`` of ``total``."""
        return lr_factor(step, total, warmup=max(1, round(self.warmup_frac * total)), decay=self.decay,
                         final=self.final_lr_frac)


class Trainer:
    """Training state (model, optimizer, counters) and one step; see the module docstring."""

    def __init__(self, sae: ExpanderSAE | TopKSAE, cfg: TrainConfig, total_steps: int,
                 teacher: TopKSAE | None = None, target_l0: float | None = None,
                 target_rates: torch.Tensor | None = None, group: Group = LOCAL):
        """``target_l0``: a threshold SAE's target mean L0 (required for one; ``sae.k`` is its cap);
        ``target_rates [n]``: a JumpReLU SAE's per-latent firing-rate targets (the "rates" rule);
        ``group``: the ranks of a data-parallel run (each step's batch is this rank's part of the global one)."""
        if group.world > 1 and (teacher is not None or sae.activation in VARIABLE_COUNT):
            raise SaeCompressError(f"training on {group.world} processes is for top-k SAEs without a teacher; "
                                   f"{'--teacher' if teacher is not None else sae.activation} runs in one process "
                                   "for now: drop --nproc")
        self.group = group
        if teacher is not None:
            require_topk(sae.activation, "train --teacher", "distilling a threshold student comes later")
        self.threshold_rule = sae.activation if sae.activation in THRESHOLD_ACTIVATIONS else None
        if self.threshold_rule is not None and target_l0 is None:
            raise ValueError("a threshold SAE trains towards a target mean L0: pass target_l0")
        self.target_l0 = float(target_l0) if self.threshold_rule else float(sae.k)
        self.sae, self.cfg, self.total_steps = sae, cfg, total_steps
        self.teacher = teacher
        self.base_lr = cfg.learning_rate(sae.n, isinstance(sae, ExpanderSAE))
        self.k_aux = cfg.k_aux if cfg.k_aux is not None else sae.m // 2
        self.bandwidth = cfg.bandwidth * math.sqrt(sae.m)  # ε in the training scale (E‖x − mean‖² = m)
        self.reaim_every = (cfg.reaim_every if cfg.reaim_every is not None
                            else 0 if sae.activation in VARIABLE_COUNT else 5)
        self.dead = DeadLatents(sae.n, cfg.dead_tokens or max(cfg.batch_size, min(int(32 * sae.n / self.target_l0),
                                                                                   cfg.tokens // 10)))
        if target_rates is not None and self.threshold_rule != "jumprelu":
            raise ValueError("firing-rate targets are for a jumprelu SAE")
        self.target_rates = None if target_rates is None else target_rates.to(torch.float32).clone()
        # JumpReLU learns log θ (float32 whatever the model's dtype); sae.threshold follows it
        self.log_threshold = (torch.nn.Parameter(sae.threshold.clamp_min(1e-12).log())
                              if self.threshold_rule == "jumprelu" and target_rates is None else None)
        groups = [{"params": list(sae.parameters()), "base_lr": self.base_lr}]
        if self.log_threshold is not None:  # log θ is dimensionless: one rate for every model size
            groups.append({"params": [self.log_threshold], "base_lr": cfg.threshold_lr})
        self.optimizer = torch.optim.Adam(groups, lr=self.base_lr)
        self.layout = MaskLayout.from_indices(sae.indices, sae.m) if isinstance(sae, ExpanderSAE) else None
        self.step = 0
        self.input_scale = 1.0  # training sees x * input_scale (see set_input_scale)
        self.dim_scale: torch.Tensor | None = None  # [m]: then x * input_scale * dim_scale (see set_dim_scale)
        self.balance = 0.0  # the power dim_scale was made with
        if teacher is not None:
            self.distill = DistillTerm(teacher)

    @property
    def dead_tokens(self) -> int:
        """Tokens without firing after which a latent counts as dead."""
        return self.dead.dead_tokens

    @property
    def since_fired(self) -> torch.Tensor:
        """``[n]`` tokens since each latent last fired."""
        return self.dead.since_fired

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The raw batch ``x`` in the space training sees: the SAE's input, times ``input_scale`` (and
        ``dim_scale``)."""
        x = self.sae.normalise(x)[0] * self.input_scale
        return x if self.dim_scale is None else x * self.dim_scale

    def _objective_space(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` from the training space back to the space the loss is measured in (``dim_scale`` undone)."""
        return x if self.dim_scale is None else x / self.dim_scale

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        """One optimizer step on the raw batch ``x [B, m]``; returns the step's statistics."""
        sae, cfg = self.sae, self.cfg
        xin = self.inputs(x)
        dead = self.dead.mask()
        out = training_forward(sae, xin, self.layout, dead, self.k_aux,
                               threshold=None if self.log_threshold is None else self.log_threshold.exp(),
                               batch_k=round(self.target_l0) if self.threshold_rule == "batchtopk" else None,
                               bandwidth=self.bandwidth)
        target = self._objective_space(xin)
        residual = None if out.aux_recon is None else self._objective_space((xin - out.recon).detach())
        variances = self._variances(target, *([] if residual is None else [residual]))
        recon_loss = fvu_loss(target, self._objective_space(out.recon), variances[0])
        loss = recon_loss
        stats: dict[str, float] = {}
        if out.l0 is not None and self.target_rates is None:
            l0_loss = (out.l0 / self.target_l0 - 1).pow(2)
            loss = loss + cfg.l0_coef * l0_loss
            stats["l0_loss"] = float(l0_loss.detach())
        if cfg.afa_coef > 0:
            target = (xin - sae.b_dec).detach().norm(dim=1)
            afa_loss = (out.top_vals.norm(dim=1) - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)
            loss = loss + cfg.afa_coef * afa_loss
            stats["afa"] = float(afa_loss.detach())
        if residual is not None:
            scale = min(1.0, int(dead.sum()) / max(1, self.k_aux))
            aux_loss = fvu_loss(residual, self._objective_space(out.aux_recon), variances[1])
            loss = loss + cfg.auxk_coef * scale * aux_loss
            stats["auxk"] = float(aux_loss.detach())
        if self.teacher is not None:
            d_loss = self.distill.loss(sae, x, xin, out, self.input_scale)
            loss = loss + cfg.distill_coef * d_loss
            stats["distill"] = float(d_loss.detach())
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * cfg.lr_factor(self.step, self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.group.sum_grads(list(sae.parameters()))
        remove_parallel_grad(sae)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        self.optimizer.step()
        normalize_decoder(sae)
        self._update_threshold(out)
        group = self.group
        fired_now = fired(out.top_vals, out.top_idx, sae.n)
        l0 = out.l0.detach() if out.l0 is not None else (out.top_vals != 0).sum(1).double().mean()
        stats.update(loss=float(loss.detach()), fvu=float(recon_loss.detach()), l0=float(l0))
        if group.world > 1:  # one collective: where latents fired, and the ranks' partial losses (they add up)
            names = list(stats)
            total = group.sum(torch.cat([fired_now.double(), torch.tensor([stats[k] for k in names]).double()]))
            fired_now = total[:sae.n] > 0
            stats = {k: float(v) / (group.world if k == "l0" else 1) for k, v in zip(names, total[sae.n:])}
        self.dead.update(fired_now, x.shape[0] * group.world)
        self.step += 1
        if (self.layout is not None and self.teacher is None and self.reaim_every
                and self.step % self.reaim_every == 0 and self.step < self.total_steps):
            stats["reaimed"] = self._reaim_dead(xin, out.recon.detach(), out.top_vals.detach().min(1).values)
        stats["dead"] = self.dead.fraction()
        return stats

    def _variances(self, *targets: torch.Tensor) -> list[torch.Tensor | None]:
        """The total variance of each global batch that a ``target`` is this rank's part of (no gradient; one
        collective for all of them); ``None`` in one process, where the batch is the whole of it."""
        group = self.group
        if group.world == 1:  # fvu_loss measures the batch itself
            return [None] * len(targets)
        targets = tuple(t.detach() for t in targets)
        sums = group.sum(torch.cat([torch.cat([t.sum(0), t.pow(2).sum().reshape(1)]).double() for t in targets]))
        count = targets[0].shape[0] * group.world
        out = []
        for t, part in zip(targets, sums.split([t.shape[1] + 1 for t in targets])):
            out.append((part[-1] - part[:-1].pow(2).sum() / count).to(t.dtype))
        return out

    @torch.no_grad()
    def _update_threshold(self, out: SparseForward) -> None:
        """After a step: ``sae.threshold`` = exp(log θ) (JumpReLU), moved towards each latent's firing-rate
        target (JumpReLU, "rates"), or the EMA of the smallest kept activation (BatchTopK)."""
        if self.target_rates is not None:
            rows = out.top_vals.shape[0]
            kept = out.top_idx[out.top_vals != 0]
            rate = torch.zeros(self.sae.n).index_add_(0, kept.cpu(), torch.ones(kept.numel())) / rows
            floor = torch.full_like(self.target_rates, 1 / rows)
            error = ((rate - self.target_rates) / torch.maximum(self.target_rates, floor)).clamp(-1, 1)
            eta = self.cfg.rate_step * self.cfg.lr_factor(self.step, self.total_steps)
            self.sae.threshold.mul_(torch.exp(eta * error).to(self.sae.threshold.device))
        elif self.log_threshold is not None:
            self.sae.threshold.copy_(self.log_threshold.exp())
        elif self.threshold_rule == "batchtopk":
            kept = out.top_vals.detach()
            kept = kept[kept > 0]
            if kept.numel():
                theta = THRESHOLD_EMA * self.sae.threshold[0] + (1 - THRESHOLD_EMA) * kept.min().float()
                self.sae.threshold.fill_(float(theta))

    @torch.no_grad()
    def start_threshold(self, x: torch.Tensor) -> None:
        """Start θ (one value for every latent) where the raw batch ``x`` fires ``target_l0`` latents
        per row on average: the batch's ``B·k``-th largest ``ReLU(pre)``."""
        if self.threshold_rule is None:
            return
        code = self.sae.pre_activations(self.inputs(x)).relu().flatten()
        keep = min(code.numel(), max(1, round(x.shape[0] * self.target_l0)))
        theta = max(float(code.topk(keep).values[-1]), self.bandwidth)
        self.sae.threshold.fill_(theta)
        if self.log_threshold is not None:
            self.log_threshold.fill_(math.log(theta))

    @torch.no_grad()
    def _reaim_dead(self, xin: torch.Tensor, recon: torch.Tensor, kth: torch.Tensor) -> int:
        """Revive each dead latent on the batch rows where it came closest to the top-k (``xin``, ``recon``:
        this rank's rows of the batch and their reconstructions; ``kth [b]``: each row's smallest kept code value).

        Dead latent ``i`` keeps its encoder direction, rescaled (untied) to the median alive
        encoder norm, since alive encoders grow and a revived latent left at its old scale fires
        once and dies again. Its margin on row r is ``pre_i(r) − τ_r`` (``τ_r``: row r's k-th
        largest pre-activation); on its ``j = B·k/n`` best rows (an alive latent's share) its
        unit decoder row is pointed at their summed residual on its support, and ``b_enc[i]`` is
        set so that it just fires on all ``j``. Costs O(B·n_dead·d); Adam moments of the revived
        latents are reset.
        """
        sae = self.sae
        dead = self.dead.indices()
        if dead.numel() == 0:
            return 0
        group = self.group
        xc = xin - sae.b_dec
        support = sae.indices[dead]  # [D, d]
        xs = xc[:, support]  # [b, D, d]: each dead latent's inputs on this rank's rows
        if self.threshold_rule is not None:  # where a threshold latent fires: above its θ
            thr = sae.threshold[dead].to(xin.dtype).unsqueeze(0)
        else:  # the row's k-th largest pre-activation
            thr = kth.unsqueeze(1)
        rows = xin.shape[0] * group.world  # the global batch
        j = max(1, min(rows, round(rows * self.target_l0 / sae.n)))  # an alive latent's share

        def best_rows() -> tuple[torch.Tensor, torch.Tensor]:  # [j, D]: the largest margins of the global batch
            margins = torch.einsum("bjd,jd->bj", xs, sae.encoder_values[dead]) - thr  # pre-act (no b_enc) − τ
            top = margins.topk(min(j, xin.shape[0]), dim=0)
            values, where = group.gather(top.values), group.gather(top.indices + group.rank * xin.shape[0])
            values, pick = values.topk(j, dim=0)
            return values, where.gather(0, pick)

        if sae.enc_values is not None:  # alive encoders grow during training: match their norm
            norms = sae.enc_values.norm(dim=1)
            alive = torch.ones_like(norms, dtype=torch.bool)
            alive[dead] = False
            if alive.any():
                sae.enc_values[dead] *= (norms[alive].median() / norms[dead].clamp_min(1e-12)).unsqueeze(1)
        chosen = best_rows()[1] - group.rank * xin.shape[0]  # [j, D] rows of this rank where in range
        mine = (chosen >= 0) & (chosen < xin.shape[0])
        picked = (xin - recon)[chosen.clamp(0, xin.shape[0] - 1).unsqueeze(2), support.unsqueeze(0)]
        residual = group.sum((picked * mine.unsqueeze(2)).sum(0))
        sae.values[dead] = unit_rows(residual)
        best = best_rows()[0][-1]  # tied: the encoder just changed
        sae.b_enc[dead] = -best + 1e-3 * group.sum(thr.abs().sum()) / (thr.numel() * group.world)
        for param in (sae.values, sae.enc_values, sae.b_enc):
            if param is not None:
                reset_moments(self.optimizer, param, dead)
        self.dead.revived(dead)
        return int(dead.numel())

    @torch.no_grad()
    def synchronise(self) -> None:
        """Every rank of a data-parallel run takes rank 0's model and scales (after set-up, before the first step)."""
        group = self.group
        if group.world == 1:
            return
        for t in self.sae.state_dict().values():  # the parameters' and buffers' own storage
            group.broadcast(t)
        self.input_scale = float(group.broadcast(torch.tensor([self.input_scale], dtype=torch.float64)))
        if self.dim_scale is not None:
            group.broadcast(self.dim_scale)

    @torch.no_grad()
    def set_input_scale(self, scale: float) -> None:
        """Train on ``x * scale`` (the model's biases are rescaled to match).

        Residual streams have norms in the hundreds; at that scale Adam's steps on ``b_enc`` are
        negligible and tied top-k codes overshoot. The model is exactly equivalent in either
        space (top-k is scale-invariant): biases scale, values do not; :meth:`export` undoes it.
        """
        factor = scale / self.input_scale
        self.sae.b_dec *= factor
        self.sae.b_enc *= factor
        if self.sae.threshold is not None:  # pre-activations scale with the input
            self.sae.threshold *= factor
        if self.log_threshold is not None:
            self.log_threshold += math.log(factor)
        self.input_scale = scale

    @torch.no_grad()
    def set_dim_scale(self, spread: torch.Tensor, power: float) -> None:
        """Train an untied expander on inputs whose dim ``j`` is scaled by ``spread_j^-power``.

        ``spread [m]``: each dim's standard deviation in the training space. A residual stream's dims differ
        in variance by two orders of magnitude; with unit decoder rows, a latent whose ``d`` dims all have
        low variance can only make small codes, so top-k never picks it and it dies (or is revived into a
        bias-driven latent). Scaling the dims evens that competition. The loss is still measured in the
        unscaled space, and :meth:`export` folds the scale into the encoder and decoder values and
        ``b_dec``, so the saved model is an ordinary Expander SAE computing the same function (its
        decoder rows are unit norm in the scaled space, not in the raw one).
        """
        sae = self.sae
        if not dim_scale_applies(sae):
            raise ValueError("the dim scale is for untied top-k Expander SAEs without layer norm")
        spread = spread.double().clamp_min(1e-6)
        scale = spread.pow(-power)
        scale *= math.sqrt(sae.m / (spread * scale).pow(2).sum())  # the scaled inputs keep E‖x − mean‖² = m
        scale = scale.to(sae.b_dec.dtype)
        change = scale / (self.dim_scale if self.dim_scale is not None else 1)  # the same model in the new space
        sae.enc_values /= change[sae.indices]
        sae.values *= change[sae.indices]
        sae.b_dec *= change
        self.dim_scale, self.balance = scale, power

    def export(self):
        """A copy of the model in the activations' own units."""
        sae = copy.deepcopy(self.sae)
        with torch.no_grad():
            if self.dim_scale is not None:  # see set_dim_scale
                per_value = self.dim_scale[sae.indices]
                sae.enc_values *= per_value
                sae.values /= per_value
                sae.b_dec /= self.dim_scale
            sae.b_dec /= self.input_scale
            sae.b_enc /= self.input_scale
            if sae.threshold is not None:
                sae.threshold /= self.input_scale
        return sae.requires_grad_(False)

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.sae.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "since_fired": self.since_fired, "total_steps": self.total_steps,
                "input_scale": self.input_scale,
                **({"dim_scale": self.dim_scale, "balance": self.balance} if self.dim_scale is not None else {}),
                **({"log_threshold": self.log_threshold.detach()} if self.log_threshold is not None else {}),
                **({"target_rates": self.target_rates} if self.target_rates is not None else {}),
                "config": json.dumps(asdict(self.cfg), sort_keys=True)}

    def load_state_dict(self, state: dict[str, Any], where: Path) -> None:
        saved = json.loads(state["config"])
        ours = asdict(self.cfg)
        differ = [f.name for f in fields(TrainConfig)
                  if f.name not in ("checkpoint_every",) and saved.get(f.name) != ours[f.name]]
        if differ:
            raise SaeCompressError(
                f"{where}: checkpoint was made with different settings ({', '.join(differ)}); "
                "resume with the same options or start afresh without --resume")
        self.sae.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.input_scale = float(state["input_scale"])
        self.dim_scale = state["dim_scale"].clone() if "dim_scale" in state else None
        self.balance = float(state.get("balance", 0.0))
        if self.log_threshold is not None:
            with torch.no_grad():
                self.log_threshold.copy_(state["log_threshold"])
        if self.target_rates is not None:
            self.target_rates = state["target_rates"].clone()
        self.dead.since_fired = state["since_fired"].clone()


