"""Train one SAE per hookpoint from a live LM, with no activation files: ``train --model M --text T --layers 6,12``.

The LM reads the text in windows of ``StreamConfig.window`` contexts, ``lm_batch`` contexts per forward
pass, one pass for every hookpoint (it stops after the deepest). Each hookpoint's rows of a window
(position 0 and massive-activation tokens dropped per pass, exactly as ``acts`` drops them) go to that
hookpoint's own ``Trainer`` in the order file-based training takes a file holding those rows
(``activations.shuffled_batches``, seed ``seed·100003 + window``): a run whose rows fit in one window
trains the model ``train --acts`` trains on the same rows, bit for bit. The first window sets each
trainer up (``train.make_trainer``). After training, the next ``held_out`` rows of the text measure
each SAE, written to ``OUT/<hookpoint>/expander.safetensors`` (a dense SAE: the SAELens folder
``OUT/<hookpoint>/``), the layout ``push`` uploads.

Checkpoint ``OUT/train.ckpt``: every trainer's state, the window and each trainer's step at its start.
``--resume`` tokenises the text up to that window without running the LM, runs that window again and
skips the batches already trained.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ._io import atomic_path, check_outputs
from .activations import ActivationSource, shuffled_batches
from .compact import with_metrics
from .errors import SaeCompressError
from .lm import SITES, capture_sites, hookpoint, keep_mask, site_module, token_contexts
from .sources import save
from .train import deferred_sigint, initial_model, finish, make_trainer
from .trainer import TrainConfig, Trainer

CHECKPOINT_NAME = "train.ckpt"
COMPACT_NAME = "expander.safetensors"


@dataclass(frozen=True)
class StreamConfig:
    """Where and how the LM's rows are taken (``None`` fields get the documented defaults)."""

    layers: tuple[int, ...]
    site: str = "resid"
    context: int = 256  # tokens per context (BOS included)
    lm_batch: int = 8  # contexts per forward pass (the massive-token median is per pass, as in `acts`)
    window: int = 256  # contexts per shuffle window (a multiple of lm_batch)
    drop_first: bool = True
    outlier_factor: float | None = 10.0
    held_out: int = 8192  # rows per hookpoint after training, for the final metrics (0: none)

    def check(self) -> None:
        if not self.layers:
            raise SaeCompressError("give the layers to train on: --layers 6,12")
        if len(set(self.layers)) < len(self.layers):
            raise SaeCompressError(f"--layers {','.join(map(str, self.layers))} names a layer twice")
        if self.site not in SITES:
            raise SaeCompressError(f"unknown site {self.site!r}; use one of {', '.join(SITES)}")
        if min(self.context, self.lm_batch, self.window) < 1 or self.window % self.lm_batch:
            raise SaeCompressError(f"--window {self.window} must be a positive multiple of --lm-batch {self.lm_batch}")
        if self.held_out < 0:
            raise SaeCompressError(f"--held-out must be 0 (none) or more, got {self.held_out}")

    @property
    def hookpoints(self) -> list[str]:
        return [hookpoint(layer, self.site) for layer in self.layers]


def outputs(out: Path, stream: StreamConfig, cfg: TrainConfig) -> dict[str, Path]:
    """Where each hookpoint's SAE goes: ``OUT/<hookpoint>/expander.safetensors`` (dense: the folder)."""
    return {name: out / name / COMPACT_NAME if cfg.d is not None else out / name for name in stream.hookpoints}


def window_rows(model: nn.Module, contexts: list[torch.Tensor], stream: StreamConfig) -> list[torch.Tensor]:
    """Each hookpoint's kept rows ``[N_h, m]`` of ``contexts``, in text order."""
    sites = [(layer, stream.site) for layer in stream.layers]
    rows: list[list[torch.Tensor]] = [[] for _ in sites]
    for i in range(0, len(contexts), stream.lm_batch):
        acts = capture_sites(model, torch.stack(contexts[i:i + stream.lm_batch]), sites)
        for kept, a in zip(rows, acts):
            keep = keep_mask(a, drop_first=stream.drop_first, outlier_factor=stream.outlier_factor)[0]
            kept.append(a[keep])
    return [torch.cat(kept) for kept in rows]


def train_streaming(model: nn.Module, tokenizer: Any, texts: Iterable[str], out: str | Path, cfg: TrainConfig,
                    stream: StreamConfig, *, resume: bool = False, progress: bool = True,
                    inputs: Iterable[Any] = (), stop_after: int | None = None) -> dict[str, dict]:
    """Train one SAE per hookpoint of ``stream`` on ``cfg.tokens`` rows each from ``model`` over ``texts``; write
    them under ``out`` (see the module docstring); returns each hookpoint's metrics. ``inputs``: the run's input
    paths (text files, model), which no output may be or hold. ``stop_after``: end the run (checkpoint only, no
    SAEs, ``{}`` returned) once a trainer has taken that many steps, as Ctrl-C would."""
    cfg.check()
    stream.check()
    if cfg.mask not in (None, "expander"):
        raise SaeCompressError("training from a live model starts fresh SAEs on the seeded expander mask: drop --mask")
    out = Path(out)
    files = outputs(out, stream, cfg)
    ckpt = out / CHECKPOINT_NAME
    inputs = list(inputs)
    check_outputs([out], inputs, kind="folder")
    check_outputs(list(files.values()), inputs, kind="file" if cfg.d is not None else "folder")
    check_outputs([ckpt], inputs, kind="file")
    if resume and not ckpt.is_file():
        raise SaeCompressError(f"{ckpt}: no checkpoint to resume from; run without --resume")
    for layer in stream.layers:  # a bad layer or site fails before any text is read
        site_module(model, layer, stream.site)
    state = torch.load(ckpt, weights_only=True) if resume else None
    if state is not None and state["stream"] != _settings(stream):
        raise SaeCompressError(f"{ckpt}: checkpoint was made with different --layers/--site/--context/--lm-batch/"
                               "--window/--held-out settings; resume with the same options or start afresh")
    total_steps = cfg.tokens // cfg.batch_size
    contexts = token_contexts(tokenizer, texts, stream.context)
    window = state["window"] if state is not None else 0
    skipped = sum(1 for _ in islice(contexts, window * stream.window))
    if skipped < window * stream.window:
        raise SaeCompressError(f"{ckpt}: the text has fewer contexts than the checkpoint's position; resume with "
                               "the same --text")
    trainers: dict[str, Trainer] = {}
    start_steps = dict(state["start_steps"]) if state is not None else {}

    def checkpoint(at: int) -> None:
        with atomic_path(ckpt) as tmp:
            torch.save({"window": at, "start_steps": start_steps, "stream": _settings(stream),
                        "trainers": {name: t.state_dict() for name, t in trainers.items()}}, tmp)

    names = stream.hookpoints
    bar = tqdm(total=total_steps * cfg.batch_size * len(names), unit="tok", unit_scale=True, dynamic_ncols=True,
               desc=f"train {len(names)} hookpoint{'s' * (len(names) > 1)}", disable=not progress)
    ran_out = False
    last: dict[str, ActivationSource] = {}
    with deferred_sigint() as interrupted:
        while not trainers or any(t.step < total_steps for t in trainers.values()):
            batch = list(islice(contexts, stream.window))
            if not batch:
                ran_out = True
                break
            for name, rows in zip(names, window_rows(model, batch, stream)):
                source = last[name] = ActivationSource.of_rows(rows, f"<{name}: window {window}>")
                if name not in trainers:
                    trainers[name] = _start(cfg, source, total_steps, state and state["trainers"][name], ckpt)
                    bar.update(trainers[name].step * cfg.batch_size)
                trainer = trainers[name]
                start_steps.setdefault(name, trainer.step)
                order = shuffled_batches(source.num_rows, source.m, cfg.batch_size,
                                         seed=cfg.seed * 100_003 + window, drop_last=True)
                for rows_at in islice(order, trainer.step - start_steps[name], None):
                    if trainer.step >= total_steps:
                        break
                    stats = trainer.train_step(source.read_rows(rows_at))
                    bar.update(cfg.batch_size)
                    if trainer.step % 10 == 0:
                        bar.set_postfix(fvu=f"{stats['fvu']:.4f}", dead=f"{stats['dead']:.3f}", window=window,
                                        refresh=False)
                    if interrupted:
                        checkpoint(window)
                        bar.close()
                        tqdm.write(f"interrupted: checkpoint written to {ckpt} (the SAEs are written only when the "
                                   "run completes); rerun with --resume to continue", file=sys.stderr)
                        raise KeyboardInterrupt
                    if trainer.step == stop_after:
                        checkpoint(window)
                        bar.close()
                        return {}
                    if trainer.step % cfg.checkpoint_every == 0:
                        checkpoint(window)
            window += 1
            start_steps = {name: t.step for name, t in trainers.items()}
    bar.close()
    if not trainers:
        raise SaeCompressError("the text yields no rows to train on; give more text")
    checkpoint(window)
    held = _held_out(model, contexts, stream) if stream.held_out else {}
    results = {}
    for name, trainer in trainers.items():
        sae, metrics = finish(trainer, held.get(name), last[name])
        metrics["training"]["hookpoint"] = name
        if ran_out and trainer.step < total_steps:
            metrics["training"]["text_ran_out"] = True
        save(sae, files[name], with_metrics(metrics, metrics.get("held_out")))
        results[name] = metrics
    return results


def _start(cfg: TrainConfig, rows: ActivationSource, total_steps: int, state: dict | None, where: Path) -> Trainer:
    sae = initial_model(cfg, rows.m, None, None)[0]
    if rows.num_rows < cfg.batch_size:
        raise SaeCompressError(f"a window gives {rows.num_rows} rows, less than one batch of {cfg.batch_size}; "
                               "raise --window or lower --batch-size")
    return make_trainer(sae, cfg, rows, total_steps, fresh=True, state=state, where=where)


def _held_out(model: nn.Module, contexts: Iterator[torch.Tensor], stream: StreamConfig) -> dict[str, ActivationSource]:
    """The next ``stream.held_out`` rows of each hookpoint (fewer if the text runs out)."""
    parts: list[list[torch.Tensor]] = [[] for _ in stream.layers]
    while min(sum(len(p) for p in kept) for kept in parts) < stream.held_out:
        batch = list(islice(contexts, stream.lm_batch))
        if not batch:
            break
        for kept, rows in zip(parts, window_rows(model, batch, stream)):
            kept.append(rows)
    return {name: ActivationSource.of_rows(torch.cat(kept)[:stream.held_out], f"<{name}: held-out rows>")
            for name, kept in zip(stream.hookpoints, parts) if kept and sum(len(p) for p in kept)}


def _settings(stream: StreamConfig) -> str:
    return repr(sorted(asdict(stream).items()))
