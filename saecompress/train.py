"""Train an ``ExpanderSAE`` (truly sparse step) or a ``TopKSAE`` baseline on activation files.

One loop for both models and for distillation::

    loss = FVU(x, x̂)                                   # batch-normalised reconstruction error
         + auxk_coef · FVU(e, ê_aux)                    # AuxK: dead latents reconstruct e = x − x̂
         + distill_coef · latent term                   # distillation only (see distill.py)

Decoder rows are kept at unit norm (gradient component along each row removed before the step,
rows renormalised after it). Adam with ``lr ≈ 3e-3/√(n/2¹⁴)`` (expander; dense ``2e-4/√(n/2¹⁴)``),
linear warm-up then cosine (or linear) decay, gradient clipping. ``b_dec`` starts at the data
mean. A latent is dead once it has not fired for ``dead_tokens`` tokens (default 32× the mean
firing interval ``n/k``); every ``reaim_every`` steps a native expander run revives its dead
latents (see ``Trainer._reaim_dead``). AuxK alone cannot: under Adam its gradient on a dead
latent is scale-free, so it only nudges the direction while the top-k threshold, set by the
growing encoders of the alive latents, runs away (63% dead on SmolLM2 residuals at d=7).

Checkpoints: ``OUT.ckpt`` (model + optimizer + counters, for ``resume``), written atomically
every ``checkpoint_every`` steps, on Ctrl-C and at the end; ``OUT`` itself is written only by a
run that completes, so an interrupted run never leaves a partly trained model there. Runs are
deterministic on CPU for a given seed, and a resumed run continues bit-exactly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ._io import atomic_path, check_outputs, output_errors
from ._json import dumps
from .activations import ActivationSource, open_activations
from .compact import save_compact, with_metrics
from .errors import SaeCompressError
from .metrics import evaluate
from .models import ExpanderSAE, TopKSAE, layer_norm, select_topk
from .provenance import shareable
from .sparse_ops import MaskLayout, SparseForward, sparse_forward

CHECKPOINT_SUFFIX = ".ckpt"


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
    reaim_every: int = 5  # steps between re-aiming dead expander latents (0: never)
    seed: int = 0

    def check(self) -> None:
        if self.n is not None and self.expansion is not None:
            raise SaeCompressError("give the number of latents as --n or --expansion, not both")
        for name in ("k", "tokens", "batch_size", "checkpoint_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SaeCompressError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.decay not in ("cosine", "linear", "constant"):
            raise SaeCompressError(f"decay must be cosine, linear or constant, got {self.decay!r}")
        if self.d is not None and self.d < 1:
            raise SaeCompressError(f"d must be at least 1, got {self.d}")
        if self.reaim_every < 0:
            raise SaeCompressError(f"reaim_every must be 0 (never) or more, got {self.reaim_every}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise SaeCompressError(f"--lr must be a positive number, got {self.lr}")
        for name in ("auxk_coef", "distill_coef", "grad_clip", "warmup_frac", "final_lr_frac"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
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
        warmup = max(1, round(self.warmup_frac * total))
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        if self.decay == "cosine":
            return self.final_lr_frac + (1 - self.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))
        if self.decay == "linear":
            return 1 - (1 - self.final_lr_frac) * t
        return 1.0


def fvu_loss(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Batch FVU: squared error over the batch's total variance (the training objective)."""
    var = (target - target.mean(0)).pow(2).sum().clamp_min(1e-12)
    return (recon - target).pow(2).sum() / var


def dense_forward(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor | None, k_aux: int) -> SparseForward:
    """The dense baseline's forward (ordinary autograd, m×n matmul) with the same outputs."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    top_vals, top_idx = select_topk(pre, sae.k, sae.activation)
    recon = sae._decode(top_vals, top_idx)
    aux = None
    if dead is not None and k_aux > 0 and bool(dead.any()):
        aux_pre = pre.masked_fill(~dead, float("-inf"))
        aux_vals, aux_idx = select_topk(aux_pre, min(k_aux, int(dead.sum())), sae.activation)
        aux_vals = torch.nan_to_num(aux_vals, neginf=0.0)
        aux = torch.zeros_like(pre).scatter(1, aux_idx, aux_vals) @ sae.W_dec
    return SparseForward(recon, top_vals, top_idx, aux)


def training_forward(sae, x: torch.Tensor, layout: MaskLayout | None, dead: torch.Tensor | None = None,
                     k_aux: int = 0) -> SparseForward:
    """Differentiable forward of either model on ``x`` in its input space (sparse ops for expanders)."""
    if layout is not None:
        return sparse_forward(sae, x, layout, dead, k_aux)
    return dense_forward(sae, x, dead, k_aux)


def _decoder_param(sae) -> torch.nn.Parameter:
    return sae.values if isinstance(sae, ExpanderSAE) else sae.W_dec


@torch.no_grad()
def _remove_parallel_grad(sae) -> None:
    """Project out each decoder row's gradient component along the (unit) row."""
    w = _decoder_param(sae)
    if w.grad is not None:
        unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        w.grad -= (w.grad * unit).sum(1, keepdim=True) * unit


@torch.no_grad()
def _normalize_decoder(sae) -> None:
    w = _decoder_param(sae)
    w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)


class Trainer:
    """Training state (model, optimizer, counters) and one step; see the module docstring."""

    def __init__(self, sae: ExpanderSAE | TopKSAE, cfg: TrainConfig, total_steps: int,
                 teacher: TopKSAE | None = None):
        self.sae, self.cfg, self.total_steps = sae, cfg, total_steps
        self.teacher = teacher
        self.base_lr = cfg.learning_rate(sae.n, isinstance(sae, ExpanderSAE))
        self.k_aux = cfg.k_aux if cfg.k_aux is not None else sae.m // 2
        self.dead_tokens = cfg.dead_tokens or max(cfg.batch_size, min(32 * sae.n // sae.k, cfg.tokens // 10))
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=self.base_lr)
        self.layout = MaskLayout.from_indices(sae.indices, sae.m) if isinstance(sae, ExpanderSAE) else None
        self.step = 0
        self.since_fired = torch.zeros(sae.n, dtype=torch.int64)
        self.input_scale = 1.0  # training sees x * input_scale (see set_input_scale)
        if teacher is not None:
            from .distill import DistillTerm
            self.distill = DistillTerm(teacher)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x)[0] if self.sae.normalize_input else x * self.input_scale

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        """One optimizer step on the raw batch ``x [B, m]``; returns the step's statistics."""
        sae, cfg = self.sae, self.cfg
        xin = self._input(x)
        dead = self.since_fired >= self.dead_tokens
        out = training_forward(sae, xin, self.layout, dead, self.k_aux)
        recon_loss = fvu_loss(xin, out.recon)
        loss = recon_loss
        stats: dict[str, float] = {}
        if out.aux_recon is not None:
            residual = (xin - out.recon).detach()
            scale = min(1.0, int(dead.sum()) / max(1, self.k_aux))
            aux_loss = fvu_loss(residual, out.aux_recon)
            loss = loss + cfg.auxk_coef * scale * aux_loss
            stats["auxk"] = float(aux_loss.detach())
        if self.teacher is not None:
            d_loss = self.distill.loss(sae, x, xin, out, self.input_scale)
            loss = loss + cfg.distill_coef * d_loss
            stats["distill"] = float(d_loss.detach())
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * cfg.lr_factor(self.step, self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _remove_parallel_grad(sae)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        self.optimizer.step()
        _normalize_decoder(sae)

        fired = torch.zeros(sae.n, dtype=torch.bool)
        fired[out.top_idx[out.top_vals != 0]] = True
        self.since_fired += x.shape[0]
        self.since_fired[fired] = 0
        self.step += 1
        if (self.layout is not None and self.teacher is None and cfg.reaim_every
                and self.step % cfg.reaim_every == 0 and self.step < self.total_steps):
            stats["reaimed"] = self._reaim_dead(xin, out)
        stats.update(loss=float(loss.detach()), fvu=float(recon_loss.detach()),
                     l0=float((out.top_vals != 0).sum(1).double().mean()),
                     dead=float((self.since_fired >= self.dead_tokens).double().mean()))
        return stats

    @torch.no_grad()
    def _reaim_dead(self, xin: torch.Tensor, out: SparseForward) -> int:
        """Revive each dead latent on the batch rows where it came closest to the top-k.

        Dead latent ``i`` keeps its encoder direction, rescaled (untied) to the median alive
        encoder norm, since alive encoders grow and a revived latent left at its old scale fires
        once and dies again. Its margin on row r is ``pre_i(r) − τ_r`` (``τ_r``: row r's k-th
        largest pre-activation); on its ``j = B·k/n`` best rows (an alive latent's share) its
        unit decoder row is pointed at their summed residual on its support, and ``b_enc[i]`` is
        set so that it just fires on all ``j``. Costs O(B·n_dead·d); Adam moments of the revived
        latents are reset.
        """
        sae = self.sae
        dead = (self.since_fired >= self.dead_tokens).nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        xc = xin - sae.b_dec
        support = sae.indices[dead]  # [D, d]
        xs = xc[:, support]  # [B, D, d]: each dead latent's inputs
        thr = out.top_vals.detach().min(1).values.unsqueeze(1)
        j = max(1, min(xin.shape[0], round(xin.shape[0] * sae.k / sae.n)))  # an alive latent's share

        def margins() -> torch.Tensor:  # [B, D]: pre-activation (without b_enc) minus the row's τ
            return torch.einsum("bjd,jd->bj", xs, sae.encoder_values[dead]) - thr

        if sae.enc_values is not None:  # alive encoders grow during training: match their norm
            norms = sae.enc_values.norm(dim=1)
            alive = torch.ones_like(norms, dtype=torch.bool)
            alive[dead] = False
            if alive.any():
                sae.enc_values[dead] *= (norms[alive].median() / norms[dead].clamp_min(1e-12)).unsqueeze(1)
        rows = margins().topk(j, dim=0).indices  # [j, D]
        residual = (xin - out.recon.detach())[rows.unsqueeze(2), support.unsqueeze(0)].sum(0)
        sae.values[dead] = residual / residual.norm(dim=1, keepdim=True).clamp_min(1e-12)
        best = margins().topk(j, dim=0).values[-1]  # tied: the encoder just changed
        sae.b_enc[dead] = -best + 1e-3 * thr.abs().mean()
        for param in (sae.values, sae.enc_values, sae.b_enc):
            state = self.optimizer.state.get(param, {}) if param is not None else {}
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][dead] = 0
        self.since_fired[dead] = 0
        return int(dead.numel())

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
        self.input_scale = scale

    def export(self):
        """A copy of the model in the activations' own units."""
        sae = copy.deepcopy(self.sae)
        with torch.no_grad():
            sae.b_dec /= self.input_scale
            sae.b_enc /= self.input_scale
        return sae.requires_grad_(False)

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.sae.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "since_fired": self.since_fired, "total_steps": self.total_steps,
                "input_scale": self.input_scale,
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
        self.since_fired = state["since_fired"].clone()


def save_dense(sae: TopKSAE, folder: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write a dense baseline as a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with output_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    cfg = {"architecture": "topk", "k": sae.k, "d_in": sae.m, "d_sae": sae.n,
           "normalize_activations": "layer_norm" if sae.normalize_input else "none",
           "apply_b_dec_to_input": True, "dtype": "float32",
           "metadata": {"saecompress": metadata or {}, **{k: v for k, v in shareable(sae.provenance).items()
                                                          if isinstance(v, (str, int, float))}}}
    tensors = {name: getattr(sae, name).detach().float().contiguous()
               for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    with atomic_path(folder / "sae_weights.safetensors") as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(folder / "cfg.json") as tmp:
        tmp.write_text(dumps(cfg, indent=2))
    return folder


def save_model(sae, out: Path, user: dict) -> None:
    """Write ``sae``: a compact file for an ``ExpanderSAE``, a SAELens folder for a dense one."""
    if isinstance(sae, ExpanderSAE):
        save_compact(sae, out, metadata=user)
    else:
        save_dense(sae, out, user)


def _initial_model(cfg: TrainConfig, m: int, teacher: TopKSAE | None, init: str | None, hub=None):
    """The model training starts from: ``init`` file, ``convert(teacher)``, or a fresh one."""
    if init is not None:
        from .sources import load
        sae = load(init, hub=hub)
    elif teacher is not None:
        if cfg.d is None:
            raise SaeCompressError("distillation trains an expander student: give --d with --teacher")
        from .convert import DEFAULT_MASK, convert
        sae = convert(teacher, cfg.d, mask=cfg.mask or DEFAULT_MASK, seed=cfg.mask_seed, encoder=cfg.encoder)
    else:
        if cfg.mask not in (None, "expander"):
            raise SaeCompressError(f"--mask {cfg.mask} picks each latent's dims from a dense SAE: give it as "
                                   "--teacher (a fresh SAE uses the seeded expander mask)")
        n = cfg.num_latents(m)
        if n is None:
            raise SaeCompressError("say how many latents to train: --n N or --expansion E")
        k = cfg.k or 32
        torch.manual_seed(cfg.seed)  # fresh weights are drawn from the global generator
        if cfg.d is None:
            return TopKSAE(m, n, k, activation=cfg.activation or "topk_relu")
        return ExpanderSAE(m, n, cfg.d, k, seed=cfg.mask_seed,
                           activation=cfg.activation or "signed_topk", encoder=cfg.encoder)
    if sae.m != m:
        raise SaeCompressError(f"the starting SAE has m={sae.m} but the activations have m={m}; "
                               "use activations from the SAE's model and hookpoint")
    if cfg.d is not None and not isinstance(sae, ExpanderSAE):
        raise SaeCompressError(f"{init}: is a dense SAE; pass it as --teacher to convert and distil it")
    if teacher is not None and sae.n != teacher.n:
        raise SaeCompressError(f"{init}: has {sae.n} latents but the teacher has {teacher.n}; distillation matches "
                               "latent i to the teacher's latent i, so start from a conversion of that teacher")
    if cfg.k is not None:
        if not 1 <= cfg.k <= sae.n:
            raise SaeCompressError(f"--k {cfg.k} must be between 1 and the number of latents {sae.n}")
        sae.k = cfg.k
    return sae


@torch.no_grad()
def _fit_encoder_scale(trainer: Trainer, x: torch.Tensor) -> None:
    """Scale a fresh untied encoder so the first reconstructions do not overshoot.

    Top-k picks the same latents at any encoder scale, so codes (and ``x̂ − b_dec``) scale
    linearly with it; the least-squares scale is ``<x − b_dec, r> / <r, r>`` with ``r`` the
    decode at scale 1. Without this, residual streams with a few high-variance dims make the
    k selected latents (sharing those dims) overshoot them several-fold (FVU > 1) for
    thousands of steps.
    """
    sae = trainer.sae
    xin = trainer._input(x)
    out = sparse_forward(sae, xin, trainer.layout)
    r, target = out.recon - sae.b_dec, xin - sae.b_dec
    c = float((target * r).sum() / (r * r).sum().clamp_min(1e-12))
    if c > 0:
        sae.enc_values *= c


@torch.no_grad()
def _data_stats(source: ActivationSource, sae, rows: int = 65536) -> tuple[torch.Tensor, float]:
    """``(mean, scale)`` of the SAE's inputs: scale makes ``E‖x − mean‖² = m`` (1 with layer norm)."""
    x = source.read(0, min(rows, source.num_rows)).double()
    if sae.normalize_input:
        x = layer_norm(x)[0]
    mean = x.mean(0)
    spread = float((x - mean).pow(2).sum(1).mean())
    if not spread > 0:
        raise SaeCompressError(f"{source.path}: every activation row is the same (zero variance); "
                               "train on real activations")
    scale = 1.0 if sae.normalize_input or spread <= 0 else math.sqrt(sae.m / spread)
    return mean.to(sae.b_dec.dtype), scale


def _batches(source: ActivationSource, cfg: TrainConfig, start_step: int):
    """Shuffled training batches from step ``start_step`` on (epochs reshuffle with new seeds)."""
    per_epoch = source.num_rows // cfg.batch_size
    if per_epoch < 1:
        raise SaeCompressError(f"{source.path}: {source.num_rows} training rows is less than one batch "
                               f"of {cfg.batch_size}; lower --batch or harvest more activations")
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        it = source.iter_batches(cfg.batch_size, shuffle=True, seed=cfg.seed * 100_003 + epoch,
                                 drop_last=True)
        for i, x in enumerate(it):
            if i >= skip:
                yield x
        epoch, skip = epoch + 1, 0


@contextlib.contextmanager
def _deferred_sigint() -> Iterator[list]:
    """Turn Ctrl-C into a flag (a non-empty list) checked between steps, so the checkpoint
    written on interruption is a consistent step boundary (and resumes bit-exactly)."""
    flag: list = []
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, lambda *_: flag.append(True))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def train(acts: str | os.PathLike | ActivationSource, out: str | os.PathLike, cfg: TrainConfig, *,
          teacher: str | TopKSAE | None = None, init: str | None = None, resume: bool = False,
          progress: bool = True, stop_after: int | None = None, hub=None) -> tuple[ExpanderSAE | TopKSAE, dict]:
    """Train on the activations ``acts`` and write the model to ``out``; returns ``(sae, metrics)``.

    ``out`` is a compact ``.safetensors`` file for expander SAEs and a SAELens folder for dense
    ones (``cfg.d is None``). With ``teacher`` (a dense source or ``TopKSAE``) the run is a
    distillation: the student starts from ``convert(teacher, d)`` (or ``init``) and is pulled
    towards the teacher's latents. ``stop_after`` ends the run early after that many steps
    (only the checkpoint is written, as on Ctrl-C). The returned metrics are measured on the last
    held-out rows of ``acts`` (``cfg.held_out``), which training never sees; training runs whole
    batches, ``tokens // batch_size`` of them. ``hub`` (a ``sources.HubAccess``) says where ``hf://``
    teacher / init sources come from. ``out`` and its checkpoint
    are checked before anything else (see ``_io.check_outputs``); ``out`` is replaced when the run completes.
    """
    cfg.check()
    out = Path(out)
    ckpt = out.with_name(out.name + CHECKPOINT_SUFFIX)
    inputs = [acts.path if isinstance(acts, ActivationSource) else acts, init,
              teacher if isinstance(teacher, (str, os.PathLike)) else None]
    check_outputs([out], inputs, kind="file" if cfg.d is not None else "folder")
    check_outputs([ckpt], inputs, kind="file")
    if resume and not ckpt.is_file():
        raise SaeCompressError(f"{ckpt}: no checkpoint to resume from; run without --resume")
    source = acts if isinstance(acts, ActivationSource) else open_activations(acts)
    if source.num_rows == 0:
        raise SaeCompressError(f"{source.path}: holds no activation rows; harvest some with `saecompress acts`")
    held_rows = cfg.held_out(source.num_rows)
    train_src, held_src = source.split(held_rows) if held_rows > 0 else (source, None)
    if isinstance(teacher, (str, os.PathLike)):
        from .sources import load
        teacher = load(teacher, hub=hub)
    if teacher is not None and not isinstance(teacher, TopKSAE):
        raise SaeCompressError("the distillation teacher must be a dense TopK SAE")
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    sae = _initial_model(cfg, source.m, teacher, init, hub)
    total_steps = cfg.tokens // cfg.batch_size
    trainer = Trainer(sae, cfg, total_steps, teacher)
    if resume:
        trainer.load_state_dict(torch.load(ckpt, weights_only=True), ckpt)
    else:
        mean, scale = _data_stats(train_src, sae)
        if init is None and teacher is None:
            with torch.no_grad():
                sae.b_dec.copy_(mean)
        _normalize_decoder(sae)
        trainer.set_input_scale(scale)
        if init is None and teacher is None and getattr(sae, "enc_values", None) is not None:
            _fit_encoder_scale(trainer, train_src.read(0, min(4096, train_src.num_rows)))

    def checkpoint() -> None:
        with atomic_path(ckpt) as tmp:
            torch.save(trainer.state_dict(), tmp)

    if progress and cfg.tokens % cfg.batch_size:
        tqdm.write(f"note: training {total_steps * cfg.batch_size:,} of the {cfg.tokens:,} tokens asked: whole "
                   f"batches of {cfg.batch_size:,}", file=sys.stderr)
    if progress and total_steps * cfg.batch_size > train_src.num_rows:
        tqdm.write(f"note: {total_steps * cfg.batch_size:,} training tokens repeat the {train_src.num_rows:,} "
                   f"training rows {total_steps * cfg.batch_size / train_src.num_rows:.1f}x; revived latents "
                   "tend to fit repeated rows and die on new data (dead latents grow): harvest more "
                   "activations with `saecompress acts` if you can", file=sys.stderr)
    bar = tqdm(total=total_steps * cfg.batch_size, initial=trainer.step * cfg.batch_size,
               unit="tok", unit_scale=True, desc="train", disable=not progress, dynamic_ncols=True)
    last = stop_after if stop_after is not None else total_steps
    batches = _batches(train_src, cfg, trainer.step)
    stats: dict[str, float] = {}
    with _deferred_sigint() as interrupted:
        while trainer.step < min(total_steps, last):
            stats = trainer.train_step(next(batches))
            bar.update(cfg.batch_size)
            if trainer.step % 10 == 0 or trainer.step == total_steps:
                bar.set_postfix(loss=f"{stats['loss']:.4f}", fvu=f"{stats['fvu']:.4f}",
                                l0=f"{stats['l0']:.1f}", dead=f"{stats['dead']:.3f}", refresh=False)
            if interrupted:
                checkpoint()
                bar.close()
                tqdm.write(f"interrupted: checkpoint at step {trainer.step} written to {ckpt} ({out} is written "
                           "only when a run completes); rerun with --resume to continue", file=sys.stderr)
                raise KeyboardInterrupt
            if trainer.step % cfg.checkpoint_every == 0 and trainer.step < total_steps:
                checkpoint()
    bar.close()
    checkpoint()  # the last state: --resume continues a stopped run and only rewrites OUT after a complete one
    sae = trainer.export()
    metrics = final_metrics(sae, held_src, teacher, cfg, trainer)
    if trainer.step < total_steps:
        metrics["training"]["stopped_early"] = True
    else:
        save_model(sae, out, with_metrics(metrics, metrics.get("held_out")))
    return sae, metrics


@torch.no_grad()
def final_metrics(sae, held: ActivationSource | None, teacher: TopKSAE | None, cfg: TrainConfig,
                  trainer: Trainer) -> dict[str, Any]:
    """Held-out fidelity (+ latent agreement when distilling) and the run's settings."""
    metrics: dict[str, Any] = {"training": {
        "tokens": trainer.step * cfg.batch_size, "steps": trainer.step, "batch_size": cfg.batch_size,
        "lr": trainer.base_lr, "input_scale": trainer.input_scale, "k_aux": trainer.k_aux, "auxk_coef": cfg.auxk_coef, "seed": cfg.seed,
        "dead_tokens": trainer.dead_tokens,
        "train_dead_fraction": float((trainer.since_fired >= trainer.dead_tokens).double().mean())}}
    if teacher is not None:
        metrics["training"]["distill_coef"] = cfg.distill_coef
    if held is None:
        return metrics
    sae.eval()
    metrics["held_out"] = evaluate(sae, held)
    if teacher is not None:
        from .distill import latent_agreement
        metrics["held_out"]["latent_agreement"] = latent_agreement(teacher, sae, held)["agreement"]
        metrics["teacher_held_out"] = evaluate(teacher, held)
    sae.train()
    return metrics
