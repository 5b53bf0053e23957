"""Train one SAE per hookpoint from a live LM, with no activation files: ``train --model M --text T --layers 6,12``.

The LM reads the text in windows of ``StreamConfig.window`` contexts, ``lm_batch`` contexts per forward
pass, one pass for every hookpoint (it stops after the deepest). The last window reads only the contexts the
remaining steps need (``window_contexts``). Each hookpoint's rows of a window
(position 0 and massive-activation tokens dropped per pass, exactly as ``acts`` drops them) go to that
hookpoint's own ``Trainer`` in the order file-based training takes a file holding those rows
(``activations.shuffled_batches``, seed ``seed·100003 + window``): a run whose rows fit in one window
trains the model ``train --acts`` trains on the same rows, bit for bit. The first window sets each
trainer up (``train.make_trainer``). After training, the next ``held_out`` rows of the text measure
each SAE, written to ``OUT/<hookpoint>/expander.safetensors`` (a dense SAE: the SAELens folder
``OUT/<hookpoint>/``), the layout ``push`` uploads.

Checkpoint ``OUT/train.ckpt``: every trainer's state, the window, the contexts read before it and each
trainer's step at its start. ``--resume`` tokenises the text up to that window without running the LM, runs
that window again and skips the batches already trained.
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
from .distributed import LOCAL, Group
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
    rows: list[list[torch.Tensor]] = [[torch.empty(0, model.config.hidden_size)] for _ in sites]
    for i in range(0, len(contexts), stream.lm_batch):
        acts = capture_sites(model, torch.stack(contexts[i:i + stream.lm_batch]), sites)
        for kept, a in zip(rows, acts):
            keep = keep_mask(a, drop_first=stream.drop_first, outlier_factor=stream.outlier_factor)[0]
            kept.append(a[keep])
    return [torch.cat(kept) for kept in rows]


def train_streaming(model: nn.Module, tokenizer: Any, texts: Iterable[str], out: str | Path, cfg: TrainConfig,
                    stream: StreamConfig, *, resume: bool = False, progress: bool = True,
                    inputs: Iterable[Any] = (), stop_after: int | None = None, group: Group = LOCAL,
                    distribute: bool = False) -> dict[str, dict]:
    """Train one SAE per hookpoint of ``stream`` on ``cfg.tokens`` rows each from ``model`` over ``texts``; write
    them under ``out`` (see the module docstring); returns the metrics of the hookpoints this rank wrote.
    ``inputs``: the run's input paths (text files, model), which no output may be or hold. ``stop_after``: end
    the run (checkpoint only, no SAEs, ``{}`` returned) once a trainer has taken that many steps, as Ctrl-C would.

    With several ranks (``group``) each runs the LM on its share of every window's contexts, and the window's
    rows are gathered. Data parallel (default): every rank trains every hookpoint on its part of each batch
    (``train.train``'s rule: the one-process run's steps, within float rounding); rank 0 writes.
    ``distribute``: each hookpoint belongs to one rank (``i % world``), which gathers that hookpoint's rows and
    trains on them alone, exactly as one process would, and writes it. Checkpoints are then taken at window
    ends."""
    cfg.check()
    stream.check()
    world = group.world
    if cfg.mask not in (None, "expander"):
        raise SaeCompressError("training from a live model starts fresh SAEs on the seeded expander mask: drop --mask")
    if world > 1 and distribute and len(stream.layers) < world:
        raise SaeCompressError(f"--distribute-hookpoints gives each of the {world} processes its own hookpoints; "
                               f"there are {len(stream.layers)}: give as many --layers as processes, or drop it")
    if world > 1 and not distribute and cfg.batch_size % world:
        raise SaeCompressError(f"--batch-size {cfg.batch_size} does not split into {world} equal parts (one per "
                               f"process): use a multiple of {world}")
    out = Path(out)
    names = stream.hookpoints
    owner = {name: i % world if distribute else 0 for i, name in enumerate(names)}
    mine = [name for name in names if not distribute or owner[name] == group.rank]
    files = outputs(out, stream, cfg)
    ckpt = out / (CHECKPOINT_NAME if not distribute or group.main else f"train.rank{group.rank}.ckpt")
    check_stream_outputs(out, stream, cfg, inputs, ckpt)
    if resume and not ckpt.is_file():
        raise SaeCompressError(f"{ckpt}: no checkpoint to resume from; run without --resume")
    for layer in stream.layers:  # a bad layer or site fails before any text is read
        site_module(model, layer, stream.site)
    state = torch.load(ckpt, weights_only=True) if resume else None
    if state is not None and state["stream"] != _settings(stream, world, distribute):
        raise SaeCompressError(f"{ckpt}: checkpoint was made with different --layers/--site/--context/--lm-batch/"
                               "--window/--held-out settings or processes; resume with the same options or start "
                               "afresh")
    window = state["window"] if state is not None else 0
    if world > 1 and group.smallest(window) != -group.smallest(-window):
        raise SaeCompressError(f"{out}: the processes' checkpoints are at different windows (one stopped while "
                               "writing); start afresh without --resume")
    total_steps = cfg.tokens // cfg.batch_size
    contexts = token_contexts(tokenizer, texts, stream.context)
    consumed = state["contexts"] if state is not None else 0  # contexts before the current window
    if sum(1 for _ in islice(contexts, consumed)) < consumed:
        raise SaeCompressError(f"{ckpt}: the text has fewer contexts than the checkpoint's position; resume with "
                               "the same --text")
    trainers: dict[str, Trainer] = {}
    start_steps = dict(state["start_steps"]) if state is not None else {}
    writes = group.main or distribute

    def checkpoint(at: int) -> None:
        if writes:
            with atomic_path(ckpt) as tmp:
                torch.save({"window": at, "contexts": consumed, "start_steps": start_steps,
                            "stream": _settings(stream, world, distribute),
                            "trainers": {name: t.state_dict() for name, t in trainers.items()}}, tmp)

    def going() -> bool:
        need = not trainers or any(t.step < total_steps for t in trainers.values())
        return need if world == 1 else bool(group.any(torch.tensor([need])))

    bar = tqdm(total=total_steps * cfg.batch_size * len(mine), unit="tok", unit_scale=True, dynamic_ncols=True,
               desc=f"train {len(mine)} hookpoint{'s' * (len(mine) > 1)}", disable=not (progress and writes))
    ran_out = stopped = False
    last: dict[str, ActivationSource] = {}
    with deferred_sigint() as interrupted:
        while going():
            size = window_contexts(stream, (total_steps - min(start_steps.get(name, 0) for name in mine)) * cfg.batch_size)
            if world > 1:
                size = -group.smallest(-size)
            batch = list(islice(contexts, size))
            if not batch:
                ran_out = True
                break
            passes, extra = divmod(-(-len(batch) // stream.lm_batch), world)  # whole LM batches per rank
            first = group.rank * passes + min(group.rank, extra)
            own = batch[first * stream.lm_batch:(first + passes + (group.rank < extra)) * stream.lm_batch]
            for name, rows in zip(names, window_rows(model, own, stream)):
                rows = group.gather(rows, owner[name] if distribute else None)  # the whole window's rows
                if rows is None:
                    continue
                source = last[name] = ActivationSource.of_rows(rows, f"<{name}: window {window}>")
                if name not in trainers:
                    trainers[name] = _start(cfg, source, total_steps, state and state["trainers"][name], ckpt,
                                            LOCAL if distribute else group)
                    bar.update(trainers[name].step * cfg.batch_size)
                trainer = trainers[name]
                start_steps.setdefault(name, trainer.step)
                order = shuffled_batches(source.num_rows, source.m, cfg.batch_size, seed=cfg.seed * 100_003 + window,
                                         drop_last=True)
                for rows_at in islice(order, trainer.step - start_steps[name], None):
                    if trainer.step >= total_steps:
                        break
                    stats = trainer.train_step(source.read_rows(trainer.group.part(rows_at)))
                    bar.update(cfg.batch_size)
                    if trainer.step % 10 == 0:
                        bar.set_postfix(fvu=f"{stats['fvu']:.4f}", dead=f"{stats['dead']:.3f}", window=window,
                                        refresh=False)
                    if world == 1 and (interrupted or trainer.step == stop_after):
                        stopped = True
                        break
                    if world == 1 and trainer.step % cfg.checkpoint_every == 0:
                        checkpoint(window)
                if stopped:
                    break
            if stopped:
                checkpoint(window)
                break
            window += 1
            consumed += len(batch)
            start_steps = {name: t.step for name, t in trainers.items()}
            if world > 1:  # the ranks stop, and write their checkpoints, at window ends
                checkpoint(window)
                reached = any(t.step >= (stop_after or total_steps + 1) for t in trainers.values())
                if bool(group.any(torch.tensor([bool(interrupted) or reached]))):
                    stopped = True
                    break
    bar.close()
    if stopped:
        if interrupted and writes:
            tqdm.write(f"interrupted: checkpoint written to {ckpt} (the SAEs are written only when the run "
                       "completes); rerun with --resume to continue", file=sys.stderr)
        if interrupted:
            raise KeyboardInterrupt
        return {}
    if not trainers and not distribute:
        raise SaeCompressError("the text yields no rows to train on; give more text")
    checkpoint(window)
    if not (group.main or distribute) or not trainers:
        return {}
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


def check_stream_outputs(out: Path, stream: StreamConfig, cfg: TrainConfig, inputs: Iterable[Any],
                         ckpt: Path | None = None) -> None:
    """What ``train_streaming`` refuses to write (see ``_io.check_outputs``): ``out``, its SAE files and the
    checkpoint ``ckpt`` (default ``out/train.ckpt``) may not be, hold or lie inside an input."""
    inputs = list(inputs)
    check_outputs([out], inputs, kind="folder")
    check_outputs(list(outputs(out, stream, cfg).values()), inputs, kind="file" if cfg.d is not None else "folder")
    check_outputs([ckpt or out / CHECKPOINT_NAME], inputs, kind="file")


def window_contexts(stream: StreamConfig, rows: int) -> int:
    """Contexts of the next window: ``stream.window``, or fewer (whole LM batches) when ``rows`` more rows finish
    training (the last window reads only the text it needs)."""
    needed = -(-rows // max(1, stream.context - stream.drop_first))
    return max(stream.lm_batch, min(stream.window, -(-needed // stream.lm_batch) * stream.lm_batch))


def train_from_files(model_path: str, gguf_file: str | None, text_files: list[Path], out: str | Path, cfg: TrainConfig,
                     stream: StreamConfig, **kwargs: Any) -> dict[str, dict]:
    """``train_streaming`` with the model loaded and the text files read here (what each rank of ``train --model
    --nproc N`` runs); ``kwargs`` go to ``train_streaming``."""
    from .lm import load_model
    from .texts import read_texts

    inputs = [model_path, gguf_file, *text_files]
    check_stream_outputs(Path(out), stream, cfg, inputs)  # before the model loads
    model, tokenizer = load_model(model_path, gguf_file)
    return train_streaming(model, tokenizer, read_texts(text_files), out, cfg, stream, inputs=inputs, **kwargs)


def _start(cfg: TrainConfig, rows: ActivationSource, total_steps: int, state: dict | None, where: Path,
           group: Group) -> Trainer:
    sae = initial_model(cfg, rows.m, None, None)[0]
    if rows.num_rows < cfg.batch_size:
        raise SaeCompressError(f"a window gives {rows.num_rows} rows, less than one batch of {cfg.batch_size}; "
                               "raise --window or lower --batch-size")
    return make_trainer(sae, cfg, rows, total_steps, fresh=True, state=state, where=where, group=group)


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


def _settings(stream: StreamConfig, world: int, distribute: bool) -> str:
    return repr(sorted(asdict(stream).items()) + [("world", world), ("distribute", distribute)])
