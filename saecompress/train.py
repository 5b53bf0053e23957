"""Train an ``ExpanderSAE`` (truly sparse step) or a ``TopKSAE`` baseline on activation files: the run.

``train`` opens the activations, picks the starting model (fresh, ``convert(teacher)`` or
``init``), sets ``b_dec`` of a fresh model to the data mean and the input scale, then drives a
``Trainer`` (``trainer.py``: the step, its losses and dead-latent revival) over shuffled batches
and writes the result.

A threshold SAE (``jumprelu``, ``batchtopk``) trains towards a mean L0 of ``k`` (``--k``; from
``init`` without it: the starting SAE's mean L0 on the first training rows) on a cap of
``trainer.CAP_FACTOR·k`` candidates per row; the saved model's ``k`` is the cap
``models.l0_cap`` of its per-row L0 on the held-out rows (the training rows when none are held out).
A ``topafa`` SAE trains with ``--k`` (default 32) as the cap on its rule's count and is saved the same way.

Checkpoints: ``OUT.ckpt`` (model + optimizer + counters, for ``resume``), written atomically
every ``checkpoint_every`` steps, on Ctrl-C and at the end; ``OUT`` itself is written only by a
run that completes, so an interrupted run never leaves a partly trained model there. Runs are
deterministic on CPU for a given seed, and a resumed run continues bit-exactly.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ._io import atomic_path, check_outputs
from .activations import ActivationSource, open_activations, shuffled_batches
from .compact import with_metrics
from .convert import DEFAULT_MASK, convert
from .distill import latent_agreement
from .distributed import LOCAL, Group
from .errors import SaeCompressError
from .metrics import evaluate
from .models import (L0_CAP_QUANTILE, THRESHOLD_ACTIVATIONS, VARIABLE_COUNT, ExpanderSAE, TopKSAE, active_counts,
                     l0_cap, require_topk, require_trainable_encoder)
from .objective import normalize_decoder
from .sources import Loaded, load_source, save
from .sparse_ops import sparse_forward
from .trainer import DEFAULT_BALANCE, TrainConfig, Trainer, dim_scale_applies, training_cap

__all__ = ["CHECKPOINT_SUFFIX", "TrainConfig", "Trainer", "train"]

CHECKPOINT_SUFFIX = ".ckpt"


def initial_model(cfg: TrainConfig, m: int, teacher: TopKSAE | None, init: str | None,
                   hub=None) -> tuple[ExpanderSAE | TopKSAE, Loaded | None]:
    """The model training starts from (``init`` file, ``convert(teacher)``, or a fresh one) and the
    loaded ``init`` source, if any."""
    start = None
    if init is not None:
        start = load_source(init, hub=hub)
        sae = start.model
        require_trainable_encoder(getattr(sae, "encoder", ""), "train")
    elif teacher is not None:
        if cfg.d is None:
            raise SaeCompressError("distillation trains an expander student: give --d with --teacher")
        sae = convert(teacher, cfg.d, mask=cfg.mask or DEFAULT_MASK, seed=cfg.mask_seed, encoder=cfg.encoder)
    else:
        if cfg.mask not in (None, "expander"):
            raise SaeCompressError(f"--mask {cfg.mask} picks each latent's dims from a dense SAE: give it as "
                                   "--teacher (a fresh SAE uses the seeded expander mask)")
        n = cfg.num_latents(m)
        if n is None:
            raise SaeCompressError("say how many latents to train: --n N or --expansion E")
        k = cfg.k or 32
        if cfg.activation in THRESHOLD_ACTIVATIONS:  # k is the target mean L0; the model holds the cap
            k = training_cap(k, n)
        torch.manual_seed(cfg.seed)  # fresh weights are drawn from the global generator
        if cfg.d is None:
            return TopKSAE(m, n, k, activation=cfg.activation or "topk_relu"), None
        return ExpanderSAE(m, n, cfg.d, k, seed=cfg.mask_seed,
                           activation=cfg.activation or "signed_topk", encoder=cfg.encoder), None
    if cfg.activation is not None and cfg.activation != sae.activation:
        raise SaeCompressError(f"--activation {cfg.activation} sets up a fresh SAE; the starting SAE's activation "
                               f"is {sae.activation}: drop --activation (it is kept)")
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
        if sae.activation not in THRESHOLD_ACTIVATIONS:  # a threshold SAE's k is set in train()
            sae.k = cfg.k
    return sae, start


@torch.no_grad()
def _threshold_targets(cfg: TrainConfig, sae, fresh: bool, source: ActivationSource,
                       rows: int = 16384, l0_rows: int = 4096) -> tuple[float, torch.Tensor | None]:
    """``(target mean L0, per-latent firing-rate targets or None)`` of a threshold SAE's run.

    The mean L0 is ``--k`` (32 fresh), else the starting SAE's mean L0 on the first ``l0_rows`` of
    ``source``; under the JumpReLU "rates" rule (the default from a JumpReLU SAE) the rates are the
    starting SAE's on the first ``rows``. The starting SAE's counts are taken once, on those rows."""
    rates_rule = sae.activation == "jumprelu" and sparsity_target(cfg, fresh) == "rates"
    if not rates_rule and cfg.rate_step != TrainConfig.rate_step:
        raise SaeCompressError("--rate-step tunes the firing-rate rule of a jumprelu run started from a jumprelu "
                               "SAE (--sparsity-target rates); drop it")
    if rates_rule and fresh:
        raise SaeCompressError("--sparsity-target rates keeps each latent's firing rate of a starting SAE; "
                               "a fresh run has none: start from one with --init, or use --sparsity-target l0")
    if rates_rule:
        for name, flag in (("k", "--k"), ("l0_coef", "--l0-coef"), ("bandwidth", "--bandwidth"),
                           ("threshold_lr", "--threshold-lr")):
            if getattr(cfg, name) != getattr(TrainConfig, name):
                raise SaeCompressError(f"{flag} tunes the mean-L0 rule; with --sparsity-target rates each latent "
                                       f"keeps the starting SAE's firing rate: drop {flag}, or pass "
                                       "--sparsity-target l0")
    if cfg.k is not None or fresh:
        return float(cfg.k or 32), None
    x = source.read(0, min(rows if rates_rule else l0_rows, source.num_rows))
    per_row, per_latent = active_counts(sae, x)
    target = max(1.0, float(per_row[:l0_rows].double().mean()))
    return target, per_latent.double().div(x.shape[0]).float() if rates_rule else None


def sparsity_target(cfg: TrainConfig, fresh: bool) -> str:
    """The JumpReLU sparsity rule of a run: ``cfg.sparsity_target``, else "rates" from a starting SAE, "l0" fresh."""
    return cfg.sparsity_target or ("l0" if fresh else "rates")


def _balance(cfg: TrainConfig, fresh: bool, start: Loaded | None) -> float:
    """The dim-balancing power of the run (``TrainConfig.balance``): as asked, else 0.5 for a fresh SAE and the
    starting SAE's own (so that ``--init`` continues in the space it was trained in)."""
    if cfg.balance is not None:
        return cfg.balance
    if fresh:
        return DEFAULT_BALANCE
    recorded = (start.user.get("training") or {}).get("balance") if start is not None else None
    return float(recorded) if isinstance(recorded, (int, float)) else 0.0


@torch.no_grad()
def _set_l0_cap(sae, source: ActivationSource, rows: int = 8192) -> list[int]:
    """Set a trained threshold SAE's ``k`` to ``models.l0_cap`` of its per-row L0 on the first
    ``rows`` of ``source``; returns ``[cap, rows counted]``."""
    per_row = torch.cat([active_counts(sae, source.read(start, min(start + 1024, rows, source.num_rows)))[0]
                         for start in range(0, min(rows, source.num_rows), 1024)])
    sae.k = l0_cap(per_row, sae.n)
    return [sae.k, int(per_row.numel())]


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
    xin = trainer.inputs(x)
    out = sparse_forward(sae, xin, trainer.layout)
    r, target = out.recon - sae.b_dec, xin - sae.b_dec
    c = float((target * r).sum() / (r * r).sum().clamp_min(1e-12))
    if c > 0:
        sae.enc_values *= c


@torch.no_grad()
def _data_stats(source: ActivationSource, sae, rows: int = 65536) -> tuple[torch.Tensor, float, torch.Tensor]:
    """``(mean, scale, dim_std)`` of the SAE's inputs: scale makes ``E‖x − mean‖² = m`` (1 with layer norm);
    ``dim_std [m]``: each dim's standard deviation after that scale."""
    x = sae.normalise(source.read(0, min(rows, source.num_rows)).double())[0]
    mean = x.mean(0)
    spread = float((x - mean).pow(2).sum(1).mean())
    if not spread > 0:
        raise SaeCompressError(f"{source.path}: every activation row is the same (zero variance); "
                               "train on real activations")
    scale = 1.0 if sae.normalize_input or spread <= 0 else math.sqrt(sae.m / spread)
    return mean.to(sae.b_dec.dtype), scale, (x - mean).pow(2).mean(0).sqrt() * scale


def _batches(source: ActivationSource, cfg: TrainConfig, start_step: int, group: Group):
    """This rank's part of each shuffled training batch from step ``start_step`` on (epochs reshuffle with new
    seeds; every rank draws the same global order and reads only its own rows)."""
    per_epoch = source.num_rows // cfg.batch_size
    if per_epoch < 1:
        raise SaeCompressError(f"{source.path}: {source.num_rows} training rows is less than one batch "
                               f"of {cfg.batch_size}; lower --batch or harvest more activations")
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        order = shuffled_batches(source.num_rows, source.m, cfg.batch_size, seed=cfg.seed * 100_003 + epoch,
                                 drop_last=True)
        for i, rows in enumerate(order):
            if i >= skip:
                yield source.read_rows(group.part(rows))
        epoch, skip = epoch + 1, 0


@contextlib.contextmanager
def deferred_sigint() -> Iterator[list]:
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


def make_trainer(sae, cfg: TrainConfig, rows: ActivationSource, total_steps: int, *, fresh: bool,
                 start: Loaded | None = None, teacher: TopKSAE | None = None, group: Group = LOCAL,
                 state: dict | None = None, where: Path | None = None) -> Trainer:
    """The ``Trainer`` of a run on ``sae``, set up on the first training ``rows`` (the data mean, scale and dim
    spread; a threshold SAE's targets), or from a checkpoint ``state`` (read from ``where``); refuses options
    that do not apply to the model."""
    jumprelu_only = [f"--{name.replace('_', '-')}" for name in ("l0_coef", "bandwidth", "threshold_lr", "rate_step")
                     if getattr(cfg, name) != getattr(TrainConfig, name)]
    if jumprelu_only and sae.activation != "jumprelu":
        raise SaeCompressError(f"{jumprelu_only[0]} tunes the jumprelu training rule; this run trains "
                               f"{sae.activation}: drop it, or train --activation jumprelu")
    if cfg.balance and teacher is not None:
        raise SaeCompressError("--balance is for training without a teacher (the distillation term is measured in "
                               "the unscaled space): drop --balance or --teacher")
    if cfg.balance and not dim_scale_applies(sae):
        raise SaeCompressError(f"--balance {cfg.balance} evens out the dims of an untied top-k Expander SAE's "
                               "inputs; this run's model is not one (dense, tied, layer-normed or threshold): "
                               "drop --balance")
    if cfg.afa_coef and sae.activation != "topafa":
        raise SaeCompressError(f"--afa-coef weighs top-AFA's norm-matching term; this run trains {sae.activation}: "
                               "drop it, or train --activation topafa")
    target = rates = None
    if sae.activation in THRESHOLD_ACTIVATIONS:
        target, rates = _threshold_targets(cfg, sae, fresh, rows)
        sae.k = training_cap(target, sae.n)
    trainer = Trainer(sae, cfg, total_steps, teacher, target_l0=target, target_rates=rates, group=group)
    if state is not None:
        trainer.load_state_dict(state, where)
    else:
        mean, scale, dim_std = _data_stats(rows, sae)
        if fresh:
            with torch.no_grad():
                sae.b_dec.copy_(mean)
        trainer.set_input_scale(scale)
        balance = _balance(cfg, fresh, start)
        if balance and dim_scale_applies(sae):
            trainer.set_dim_scale(dim_std, balance)
        normalize_decoder(sae)
        if fresh and getattr(sae, "enc_values", None) is not None:
            _fit_encoder_scale(trainer, rows.read(0, min(4096, rows.num_rows)))
        if fresh:
            trainer.start_threshold(rows.read(0, min(1024, rows.num_rows)))
    trainer.synchronise()
    return trainer


def train(acts: str | os.PathLike | ActivationSource, out: str | os.PathLike, cfg: TrainConfig, *,
          teacher: str | TopKSAE | None = None, init: str | None = None, resume: bool = False,
          progress: bool = True, stop_after: int | None = None, hub=None,
          group: Group = LOCAL) -> tuple[ExpanderSAE | TopKSAE, dict]:
    """Train on the activations ``acts`` and write the model to ``out``; returns ``(sae, metrics)``.

    ``out`` is a compact ``.safetensors`` file for expander SAEs and a SAELens folder for dense
    ones (``cfg.d is None``). With ``teacher`` (a dense source or ``TopKSAE``) the run is a
    distillation: the student starts from ``convert(teacher, d)`` (or ``init``) and is pulled
    towards the teacher's latents. ``out`` records the source of ``init`` (keeping its storage
    dtype), else of a ``teacher`` source. ``stop_after`` ends the run early after that many steps
    (only the checkpoint is written, as on Ctrl-C). The returned metrics are measured on the last
    held-out rows of ``acts`` (``cfg.held_out``), which training never sees; training runs whole
    batches, ``tokens // batch_size`` of them. ``hub`` (a ``sources.HubAccess``) says where ``hf://``
    teacher / init sources come from. ``out`` and its checkpoint
    are checked before anything else (see ``_io.check_outputs``); ``out`` is replaced when the run completes.
    ``group``: this process's rank of a data-parallel run (``launch.py``): every rank trains on its part of
    each global batch of ``cfg.batch_size`` rows, and only rank 0 reports progress and writes files (the
    other ranks return empty metrics).
    """
    cfg.check()
    if cfg.batch_size % group.world:
        raise SaeCompressError(f"--batch-size {cfg.batch_size} does not split into {group.world} equal parts "
                               f"(one per process): use a multiple of {group.world}")
    progress = progress and group.main
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
    origin = None  # the source the model is made from: its provenance (and storage dtype) go into OUT
    if isinstance(teacher, (str, os.PathLike)):
        origin = load_source(teacher, hub=hub)
        teacher = origin.model
    if teacher is not None and not isinstance(teacher, TopKSAE):
        raise SaeCompressError("the distillation teacher must be a dense TopK SAE")
    if teacher is not None:
        require_topk(teacher.activation, "train --teacher", "distilling from a threshold teacher comes later; "
                     "train a threshold SAE natively with --activation")
        teacher.eval().requires_grad_(False)
    sae, start = initial_model(cfg, source.m, teacher, init, hub)
    origin = start or origin
    fresh = init is None and teacher is None
    total_steps = cfg.tokens // cfg.batch_size
    trainer = make_trainer(sae, cfg, train_src, total_steps, fresh=fresh, start=start, teacher=teacher, group=group,
                           state=torch.load(ckpt, weights_only=True) if resume else None, where=ckpt)

    def checkpoint() -> None:
        if group.main:
            with atomic_path(ckpt) as tmp:
                torch.save(trainer.state_dict(), tmp)

    if group.world > 1 and progress:
        tqdm.write(f"training on {group.world} processes: {cfg.batch_size // group.world:,} rows of each batch of "
                   f"{cfg.batch_size:,} per process", file=sys.stderr)
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
    batches = _batches(train_src, cfg, trainer.step, group)
    stats: dict[str, float] = {}
    with deferred_sigint() as interrupted:
        while trainer.step < min(total_steps, last):
            stats = trainer.train_step(next(batches))
            bar.update(cfg.batch_size)
            if trainer.step % 10 == 0 or trainer.step == total_steps:
                bar.set_postfix(loss=f"{stats['loss']:.4f}", fvu=f"{stats['fvu']:.4f}",
                                l0=f"{stats['l0']:.1f}", dead=f"{stats['dead']:.3f}", refresh=False)
            stop = bool(interrupted)
            if group.world > 1:  # Ctrl-C reaches the ranks at different steps: they stop together, every 10 steps
                stop = trainer.step % 10 == 0 and bool(group.any(torch.tensor([stop])))
            if stop:
                checkpoint()
                bar.close()
                if group.main:
                    tqdm.write(f"interrupted: checkpoint at step {trainer.step} written to {ckpt} ({out} is written "
                               "only when a run completes); rerun with --resume to continue", file=sys.stderr)
                raise KeyboardInterrupt
            if trainer.step % cfg.checkpoint_every == 0 and trainer.step < total_steps:
                checkpoint()
    bar.close()
    checkpoint()  # the last state: --resume continues a stopped run and only rewrites OUT after a complete one
    if not group.main:
        return trainer.export(), {}
    sae, metrics = finish(trainer, held_src, train_src, teacher)
    if trainer.step < total_steps:
        metrics["training"]["stopped_early"] = True
    else:
        save(sae, out, with_metrics(metrics, metrics.get("held_out")), origin)
    return sae, metrics


def finish(trainer: Trainer, held_src: ActivationSource | None, train_src: ActivationSource,
           teacher: TopKSAE | None = None) -> tuple[ExpanderSAE | TopKSAE, dict[str, Any]]:
    """The trained model in the activations' units and its metrics (held-out fidelity, the run's settings); a
    variable-count SAE's cap ``k`` set on ``held_src`` (else on ``train_src``)."""
    cfg = trainer.cfg
    target, rates = trainer.target_l0 if trainer.threshold_rule else None, trainer.target_rates
    sae = trainer.export()
    cap = _set_l0_cap(sae, held_src or train_src) if sae.activation in VARIABLE_COUNT else None
    metrics = final_metrics(sae, held_src, teacher, cfg, trainer)
    if cap is not None:
        metrics["training"].update(
            rule=sae.activation, **({"target_l0": target} if target is not None else {}), max_l0=cap[0],
            **({"afa_coef": cfg.afa_coef} if sae.activation == "topafa" else {}),
            max_l0_rule=f"quantile {L0_CAP_QUANTILE} of per-row L0 on {cap[1]} "
                        f"{'held-out' if held_src is not None else 'training'} rows",
            **({"sparsity_target": "rates", "rate_step": cfg.rate_step} if rates is not None
               else {"sparsity_target": "l0", "l0_coef": cfg.l0_coef, "bandwidth": cfg.bandwidth,
                     "threshold_lr": cfg.threshold_lr}
               if trainer.threshold_rule == "jumprelu"
               else {"threshold": float(sae.threshold[0])} if trainer.threshold_rule == "batchtopk" else {}))
    return sae, metrics


@torch.no_grad()
def final_metrics(sae, held: ActivationSource | None, teacher: TopKSAE | None, cfg: TrainConfig,
                  trainer: Trainer) -> dict[str, Any]:
    """Held-out fidelity (+ latent agreement when distilling) and the run's settings."""
    metrics: dict[str, Any] = {"training": {
        "tokens": trainer.step * cfg.batch_size, "steps": trainer.step, "batch_size": cfg.batch_size,
        "lr": trainer.base_lr, "input_scale": trainer.input_scale, "k_aux": trainer.k_aux, "auxk_coef": cfg.auxk_coef, "seed": cfg.seed,
        "dead_tokens": trainer.dead_tokens, "train_dead_fraction": trainer.dead.fraction()}}
    if teacher is not None:
        metrics["training"]["distill_coef"] = cfg.distill_coef
    if trainer.dim_scale is not None:
        metrics["training"]["balance"] = trainer.balance
    if held is None:
        return metrics
    sae.eval()
    metrics["held_out"] = evaluate(sae, held)
    if teacher is not None:
        metrics["held_out"]["latent_agreement"] = latent_agreement(teacher, sae, held)["agreement"]
        metrics["teacher_held_out"] = evaluate(teacher, held)
    sae.train()
    return metrics
