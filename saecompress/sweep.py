"""The storage–fidelity frontier as one run: every recipe × d × dtype made, measured and cached.

Recipes (``RECIPES``) make an Expander SAE of ``n`` latents at each ``d``: a base, then optional steps,
named in order (``native-pursuit-finetune``):

* ``native``: ``train`` a fresh SAE on the seeded expander mask (the file stores only the seed);
* ``topd-retrain``: ``convert_path`` the dense SAE with ``--mask topd``, then ``train --init`` it;
* ``-pursuit``: keep that decoder, encoded by matching pursuit (``ExpanderSAE.with_pursuit``, the rule
  ``DEFAULT_PURSUIT_RULE``; no encoder stored);
* ``-finetune``: then ``finetune`` it through the LM.

Each is stored at every dtype and measured on the held-out rows (FVU, L0, dead fraction) and, with
an LM, for CE-loss recovered; with ``ood_acts`` / ``ood_texts`` (held-out rows and text of another domain
than the training text) the same again, as ``ood_*`` fields. The clean and ablated LM passes of each
CE text are made once per sweep (``lm.CEReference``, holding the clean log-probs: ``ce_tokens`` ×
vocabulary × 4 bytes per text), so each point costs one spliced pass. Baselines (``BASELINES``): ``dense``, the dense SAE itself (``dense``
given, else one trained at ``n`` on the same tokens), and ``dense-matched``, one dense TopK SAE per
expander point with as many bytes (``n'`` latents: the most whose ``compact.dense_bytes`` fit in the
expander file's bytes; skipped with a note when ``n' < k``), trained on the same tokens.

Cache: each point is ``OUT/points/<key>.json`` (+ its compact file), and each model a point is made
from is ``OUT/work/<key>`` (+ ``.json``), all written atomically; ``key`` names the recipe, d and
dtype and hashes every setting and the identity of every input (path, size, mtime) that the result
depends on. A rerun computes only the points it does not find; an interrupted training resumes from
its checkpoint (its ``seconds`` then count the resumed part only). ``OUT/frontier.json``,
``frontier.csv`` and (with matplotlib: the ``plot`` extra) ``frontier.png`` hold the points of this grid.

Dense bytes are those of the weights alone (no header): a few KiB in the dense SAE's favour.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ._io import atomic_path, check_outputs
from ._json import dumps
from .activations import ActivationSource, open_activations
from .compact import STORAGE_DTYPES, dense_bytes, save_compact, stored_copy, with_metrics
from .convert import DEFAULT_PURSUIT_RULE, convert_path
from .errors import SaeCompressError, check_choice
from .metrics import evaluate
from .models import ExpanderSAE, TopKSAE, require_topk
from .sources import HubAccess, load_source, save
from .texts import read_texts, text_files
from .train import CHECKPOINT_SUFFIX, TrainConfig, train

BASES = ("native", "topd-retrain")
RECIPES = tuple(f"{base}{pursuit}{tune}" for base in BASES for pursuit in ("", "-pursuit") for tune in ("", "-finetune"))
BASELINES = ("dense", "dense-matched")
CSV_COLUMNS = ("key", "recipe", "d", "n", "k", "dtype", "file_bytes", "fvu", "explained_variance", "l0",
               "dead_fraction", "ce_recovered", "kl_recovered", "ood_fvu", "ood_dead_fraction", "ood_ce_recovered",
               "ood_kl_recovered", "seconds", "matches")
OOD = "ood_"  # prefix of the measurements on the other domain's rows and text


@dataclass
class SweepConfig:
    """The grid and the settings every point shares (``None`` fields: see ``sweep``)."""

    d: tuple[int, ...] = (4, 7, 16)
    recipes: tuple[str, ...] | None = None  # default: every recipe the inputs allow
    dtypes: tuple[str, ...] = ("float32",)
    k: int | None = None  # default: the dense SAE's k, else 32
    n: int | None = None  # default: the dense SAE's n (required without one)
    tokens: int = TrainConfig.tokens  # training tokens of every trained model
    batch_size: int = TrainConfig.batch_size
    held_out_rows: int | None = None  # default as train's: min(8192, a tenth of the rows); with eval_acts: 0
    seed: int = TrainConfig.seed
    finetune_tokens: int | None = None  # default: FinetuneConfig's
    ce_tokens: int = 8192
    context: int = 256
    drop_first: bool = True
    outlier_factor: float | None = 10.0

    def check(self) -> None:
        if not self.d:
            raise SaeCompressError("the grid is empty: give at least one --d")
        if any(d < 1 for d in self.d):
            raise SaeCompressError(f"every --d must be at least 1, got {', '.join(map(str, self.d))}")
        if not self.dtypes:
            raise SaeCompressError("the grid is empty: give at least one --dtype")
        for dtype in self.dtypes:
            check_choice("--dtype", dtype, STORAGE_DTYPES)
        for recipe in self.recipes or ():
            check_choice("recipe", recipe, RECIPES)
        if self.recipes is not None and not self.recipes:
            raise SaeCompressError(f"the grid is empty: give at least one recipe of {', '.join(RECIPES)}")
        for name in ("k", "n", "finetune_tokens", "ce_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SaeCompressError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class _Point:
    """One point of the grid: ``recipe`` (a recipe or a baseline), ``d`` (None: dense), ``n``, ``dtype``."""

    recipe: str
    d: int | None
    n: int
    dtype: str

    def label(self) -> str:
        return f"{self.recipe}" + (f" d={self.d}" if self.d else f" n={self.n}") + f" {self.dtype}"


@dataclass
class _LM:
    """The LM side (CE-loss recovered, fine-tuning): loaded on first use."""

    path: str
    gguf_file: str | None
    layer: int
    site: str
    texts: list[Path]
    eval_texts: list[Path]
    ood_texts: list[Path]
    loaded: tuple[Any, Any] | None = field(default=None, repr=False)
    references: dict[str, Any] = field(default_factory=dict, repr=False)

    def get(self) -> tuple[Any, Any]:
        if self.loaded is None:
            from .lm import load_model

            self.loaded = load_model(self.path, self.gguf_file)
        return self.loaded

    def reference(self, which: str, cfg: SweepConfig, sae: Any) -> Any:
        """The ``lm.CEReference`` of the ``eval`` or ``ood`` texts (made on first use)."""
        if which not in self.references:
            from .lm import CEReference

            model, tokenizer = self.get()
            texts = self.eval_texts if which == "eval" else self.ood_texts
            self.references[which] = CEReference(
                model, tokenizer, read_texts(texts), self.layer, self.site, tokens=cfg.ce_tokens, context=cfg.context,
                drop_first=cfg.drop_first, outlier_factor=cfg.outlier_factor, keep_logp=True, progress=False,
                check={"sae": sae})
        return self.references[which]


def _identity(item: str | os.PathLike | None) -> Any:
    """What a cache key knows of an input: a local path's files (name, size, mtime), else the string."""
    if item is None:
        return None
    path = Path(item).expanduser()
    if not path.exists():
        return str(item)  # hf:// sources, hub model ids
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return [str(path.resolve()), [(str(f.relative_to(path)) if f != path else f.name, f.stat().st_size,
                                   f.stat().st_mtime_ns) for f in files]]


def _key(name: str, parts: dict[str, Any]) -> str:
    digest = hashlib.sha256(dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
    return f"{name}-{digest}"


def parse_list(text: str) -> tuple[str, ...]:
    """``"a, b,"`` → ``("a", "b")``: the CLI's comma-separated grid options."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_d(text: str) -> tuple[int, ...]:
    """``"4,7,16"`` → ``(4, 7, 16)``."""
    try:
        return tuple(int(part) for part in parse_list(text))
    except ValueError:
        raise SaeCompressError(f"--d takes comma-separated whole numbers like 4,7,16, got {text!r}") from None


def matched_latents(m: int, file_bytes: int, dtype: str) -> int:
    """The most latents ``n'`` of a dense TopK SAE whose weights at ``dtype`` fit in ``file_bytes``."""
    per_latent = dense_bytes(m, 1, dtype) - dense_bytes(m, 0, dtype)
    return max(0, (file_bytes - dense_bytes(m, 0, dtype)) // per_latent)


class _Sweep:
    """The state of one sweep: inputs, cache folders, and how each point's models are made."""

    def __init__(self, out: Path, cfg: SweepConfig, k: int, train_src: ActivationSource, held_src: ActivationSource,
                 ood_src: ActivationSource | None, identity: dict[str, Any], dense: str | None,
                 dense_model: TopKSAE | None, lm: _LM | None, hub: HubAccess | None):
        self.out, self.cfg, self.k, self.train_src, self.held_src = out, cfg, k, train_src, held_src
        self.ood_src = ood_src
        self.has_ood = ood_src is not None or bool(lm and lm.ood_texts)
        self.identity, self.dense, self.dense_model, self.lm, self.hub = identity, dense, dense_model, lm, hub
        self.points_dir, self.work_dir = out / "points", out / "work"

    def _train_config(self, d: int | None, n: int | None) -> TrainConfig:
        cfg = self.cfg
        return TrainConfig(d=d, n=n, k=self.k, tokens=cfg.tokens, batch_size=cfg.batch_size, held_out_rows=0,
                           seed=cfg.seed)

    def _lm_parts(self) -> dict[str, Any]:
        lm = self.lm
        return {} if lm is None else {"model": self.identity["model"], "layer": lm.layer, "site": lm.site}

    def steps(self, recipe: str, d: int | None, n: int) -> list[tuple[str, str, dict[str, Any]]]:
        """The models a point of ``recipe`` is made from, in order: ``(action, name, settings)`` with action
        ``train`` / ``convert`` / ``finetune``; none for the given dense SAE."""
        data = {"acts": self.identity["acts"], "train_rows": self.train_src.num_rows}
        if recipe in BASELINES:
            if recipe == "dense" and self.dense is not None:
                return []
            return [("train", f"dense-n{n}", {"train": asdict(self._train_config(None, n)), **data})]
        base = _base(recipe)
        if base == "native":
            made = {"train": asdict(self._train_config(d, n)), **data}
            steps = [("train", f"native-d{d}", made)]
        else:
            converted = {"convert": {"d": d, "mask": "topd"}, "dense": self.identity["dense"]}
            made = {**converted, "train": asdict(self._train_config(d, None)), **data}
            steps = [("convert", f"topd-d{d}", converted), ("train", f"topd-retrain-d{d}", made)]
        if "-pursuit" in recipe:
            made = {**made, "pursuit": DEFAULT_PURSUIT_RULE}
            steps.append(("pursuit", f"{base}-pursuit-d{d}", made))
        if recipe.endswith("-finetune"):
            from .finetune import FinetuneConfig  # loads the LM side on first use

            cfg = self.cfg
            finetune = FinetuneConfig(tokens=cfg.finetune_tokens or FinetuneConfig.tokens, context=cfg.context,
                                      drop_first=cfg.drop_first, outlier_factor=cfg.outlier_factor)
            steps.append(("finetune", f"{recipe}-d{d}", {**made, "finetune": asdict(finetune),
                                                         **self._lm_parts(), "texts": self.identity["texts"]}))
        return steps

    def model(self, recipe: str, d: int | None, n: int) -> tuple[Path | None, float | None]:
        """The float32 model a point of ``recipe`` is made from (each step made once: ``OUT/work/<key>`` with
        ``<key>.json`` beside it when complete) and the seconds its steps took; ``(None, None)`` for the given
        dense SAE."""
        path, total = None, None
        for action, name, parts in self.steps(recipe, d, n):
            key = _key(name, parts)
            target = self.work_dir / (key if action == "train" and parts["train"]["d"] is None
                                      else f"{key}.safetensors")
            done = self.work_dir / f"{key}.json"
            if done.is_file() and target.exists():
                seconds = float(json.loads(done.read_text())["seconds"])
            else:
                start = time.perf_counter()
                self._make(action, parts, path, target)
                seconds = time.perf_counter() - start
                with atomic_path(done) as tmp:
                    tmp.write_text(dumps({"seconds": seconds, "settings": parts}, sort_keys=True))
                target.with_name(target.name + CHECKPOINT_SUFFIX).unlink(missing_ok=True)  # complete: not needed
            path, total = target, (total or 0.0) + seconds
        return path, total

    def _make(self, action: str, parts: dict[str, Any], previous: Path | None, target: Path) -> None:
        """One step: ``previous`` (the last step's model, if any) → ``target``."""
        if action == "convert":
            convert_path(self.dense, target, d=parts["convert"]["d"], mask="topd", hub=self.hub, progress=False)
        elif action == "pursuit":
            origin = load_source(previous)
            save(origin.model.with_pursuit(parts["pursuit"]), target, origin.user, origin)
        elif action == "train":
            resume = target.with_name(target.name + CHECKPOINT_SUFFIX).is_file()  # an interrupted sweep
            train(self.train_src, target, TrainConfig(**parts["train"]), init=previous and str(previous),
                  resume=resume, progress=False)
        else:
            from .finetune import FinetuneConfig, finetune

            origin = load_source(previous)
            model, tokenizer = self.lm.get()
            finetune(origin.model, model, tokenizer, read_texts(self.lm.texts), self.lm.layer, self.lm.site,
                     FinetuneConfig(**parts["finetune"]), out=target, origin=origin, progress=False)

    def point_key(self, p: _Point) -> str:
        """``<recipe>-<d or n>-<dtype>-<hash of the steps' settings and the measurement's inputs>``."""
        parts = {"steps": [[name, settings] for _, name, settings in self.steps(p.recipe, p.d, p.n)],
                 "dense": self.identity["dense"] if p.recipe == "dense" else None, "dtype": p.dtype,
                 "eval_acts": self.identity["eval_acts"], "held_out_rows": self.held_src.num_rows,
                 **self._lm_parts(), "eval_texts": self.identity["eval_texts"],
                 **({"ood": [self.identity["ood_acts"], self.identity["ood_texts"]]} if self.has_ood else {}),
                 "ce": [self.cfg.ce_tokens, self.cfg.context, self.cfg.drop_first, self.cfg.outlier_factor]}
        return _key(f"{p.recipe}-" + (f"d{p.d}" if p.d else f"n{p.n}") + f"-{p.dtype}", parts)

    # -- points ----------------------------------------------------------------------------
    def done(self, p: _Point) -> dict[str, Any] | None:
        """The cached record of ``p``, if it was made."""
        path = self.points_dir / f"{self.point_key(p)}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def make(self, p: _Point) -> dict[str, Any]:
        """Make, measure and cache point ``p``; returns its record."""
        key = self.point_key(p)
        work, seconds = self.model(p.recipe, p.d, p.n)
        start = time.perf_counter()
        loaded = load_source(work) if work is not None else None
        sae = loaded.model if loaded is not None else self.dense_model
        stored = stored_copy(sae, p.dtype)
        metrics = evaluate(stored, self.held_src)
        if self.ood_src is not None:
            metrics.update({OOD + name: value for name, value in evaluate(stored, self.ood_src).items()})
        if self.lm is not None:
            for which, prefix in (("eval", ""), *((("ood", OOD),) if self.lm.ood_texts else ())):
                ce = self.lm.reference(which, self.cfg, stored).score({"sae": stored})["sae"]
                metrics.update({prefix + name: value for name, value in ce.items() if name != "hookpoint"})
        record: dict[str, Any] = {"key": key, "recipe": p.recipe, "d": p.d, "n": sae.n, "k": sae.k, "dtype": p.dtype,
                                  "mask": ("expander" if _base(p.recipe) == "native" else "topd") if p.d else None,
                                  **metrics, "seconds": seconds, "eval_seconds": None}
        if isinstance(sae, ExpanderSAE):
            sae_path = self.points_dir / f"{key}.safetensors"
            save_compact(sae, sae_path, dtype=p.dtype, source=loaded.provenance,
                         metadata=with_metrics({**loaded.user, "sweep": {"recipe": p.recipe}}, metrics))
            record["file_bytes"] = sae_path.stat().st_size
            record["sae"] = str(sae_path.relative_to(self.out))
        else:
            record["file_bytes"] = dense_bytes(sae.m, sae.n, p.dtype)
            record["sae"] = str(work.relative_to(self.out)) if work is not None else None
        record["eval_seconds"] = time.perf_counter() - start
        with atomic_path(self.points_dir / f"{key}.json") as tmp:
            tmp.write_text(dumps(record, sort_keys=True, indent=1))
        return record


def _held_out(cfg: SweepConfig, source: ActivationSource, eval_acts: str | os.PathLike | None
              ) -> tuple[ActivationSource, ActivationSource]:
    """``(training rows, held-out rows)``: the last ``held_out_rows`` of ``source``, or all of ``eval_acts``."""
    if eval_acts is not None:
        held = open_activations(eval_acts)
        if held.m != source.m:
            raise SaeCompressError(f"{eval_acts} holds m={held.m} activations but --acts holds m={source.m}; "
                                   "give held-out rows of the same model and hookpoint")
        if cfg.held_out_rows:
            raise SaeCompressError("give the held-out rows as --eval-acts or as --held-out, not both")
        return source, held
    rows = TrainConfig(held_out_rows=cfg.held_out_rows).held_out(source.num_rows)
    if rows < 1:
        raise SaeCompressError("the sweep measures every point on held-out rows: give --held-out 1 or more, "
                               "or --eval-acts")
    return source.split(rows)


def _plan(cfg: SweepConfig, recipes: Sequence[str], n: int) -> list[_Point]:
    """The expander points, then the dense SAE at each dtype (matched-bytes points come once bytes are known)."""
    points = [_Point(recipe, d, n, dtype) for recipe in recipes for d in cfg.d for dtype in cfg.dtypes]
    return points + [_Point("dense", None, n, dtype) for dtype in cfg.dtypes]


def _shape(cfg: SweepConfig, m: int, dense: str | None, hub: HubAccess | None) -> tuple[TopKSAE | None, int, int]:
    """``(dense model, n, k)``: the dense SAE (checked) and the latents and k of every SAE; refuses bad numbers."""
    dense_model = None
    if dense is not None:
        dense_model = load_source(dense, hub=hub).model
        if not isinstance(dense_model, TopKSAE):
            raise SaeCompressError(f"--dense {dense}: is an Expander SAE; give the dense TopK SAE it came from")
        require_topk(dense_model.activation, "sweep --dense", "its recipes convert and retrain top-k SAEs")
        if dense_model.m != m:
            raise SaeCompressError(f"--dense {dense} has m={dense_model.m} but --acts holds m={m} activations; "
                                   "use activations of the dense SAE's model and hookpoint")
        if cfg.n is not None and cfg.n != dense_model.n:
            raise SaeCompressError(f"--n {cfg.n} differs from the dense SAE's {dense_model.n} latents, which the "
                                   "topd recipes keep: drop --n")
    n = cfg.n or (dense_model.n if dense_model is not None else None)
    if n is None:
        raise SaeCompressError("say how many latents each SAE has: --n N (or give a --dense SAE)")
    k = cfg.k or (dense_model.k if dense_model is not None else 32)
    if k > n:
        raise SaeCompressError(f"--k {k} is more than the {n} latents: give --k at most {n}")
    too_wide = [d for d in cfg.d if d >= m]
    if too_wide:
        raise SaeCompressError(f"--d {too_wide[0]} is not below the activations' width m={m}: an expander "
                               f"latent keeps d < m dims; give d values below {m}")
    return dense_model, n, k


def _base(recipe: str) -> str:
    """The recipe's first step: ``native`` or ``topd-retrain``."""
    return next(base for base in BASES if recipe.startswith(base))


def _recipes(cfg: SweepConfig, dense: str | None, model: str | None) -> list[str]:
    """The recipes to run: as asked (refusing those the inputs do not allow), else every one they allow."""

    def needs(recipe: str) -> list[str]:
        return ([] if _base(recipe) == "native" or dense is not None else ["--dense SRC"]) + (
            ["--model and --text"] if recipe.endswith("-finetune") and not model else [])

    for recipe in cfg.recipes or ():
        if needs(recipe):
            need = " and ".join(needs(recipe))
            raise SaeCompressError(f"recipe {recipe} needs {need}; drop it from --recipes or give {need}")
    return list(cfg.recipes) if cfg.recipes is not None else [r for r in RECIPES if not needs(r)]


def sweep(acts: str | os.PathLike, out: str | os.PathLike, cfg: SweepConfig, *,
          eval_acts: str | os.PathLike | None = None, dense: str | None = None, model: str | None = None,
          gguf_file: str | None = None, texts: Sequence[str] = (), eval_texts: Sequence[str] = (),
          ood_acts: str | os.PathLike | None = None, ood_texts: Sequence[str] = (),
          layer: int | None = None, site: str | None = None, hub: HubAccess | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Make and measure every point of the grid ``cfg`` into the folder ``out``; returns the frontier.

    ``acts``: training activations (held out: the last ``cfg.held_out_rows`` rows, or ``eval_acts``).
    ``dense``: a dense TopK SAE source; enables the ``topd`` recipes and is the dense point. ``model``
    (with ``texts``; ``layer``/``site`` default to the ``acts`` manifest's): CE-loss recovered on
    ``eval_texts`` (default ``texts``) and the fine-tune recipe on ``texts``. ``ood_acts`` / ``ood_texts``:
    held-out rows / text of another domain, measured again into ``ood_*`` fields. ``recipes`` default to
    every one the inputs allow. Checks every output and number before any work; refuses an empty grid.
    """
    cfg.check()
    out = Path(out)
    text_paths = text_files(texts) if texts else []
    eval_paths = text_files(eval_texts) if eval_texts else text_paths
    ood_paths = text_files(ood_texts) if ood_texts else []
    check_outputs([out], [acts, eval_acts, ood_acts, dense, model, gguf_file, *text_paths, *eval_paths, *ood_paths],
                  kind="folder")
    if bool(model) != bool(text_paths):
        raise SaeCompressError("CE-loss recovered and fine-tuning need both --model and --text FILE")
    if ood_paths and not model:
        raise SaeCompressError("--ood-text is for CE-loss recovered on another domain: give --model and --text too")
    source = open_activations(acts)
    m = source.m
    ood_src = open_activations(ood_acts) if ood_acts is not None else None
    if ood_src is not None and ood_src.m != m:
        raise SaeCompressError(f"--ood-acts {ood_acts} holds m={ood_src.m} activations but --acts holds m={m}; "
                               "give rows of the same model and hookpoint")
    dense_model, n, k = _shape(cfg, m, dense, hub)
    recipes = _recipes(cfg, dense, model)
    TrainConfig(d=None, n=n, k=k, tokens=cfg.tokens, batch_size=cfg.batch_size).check()
    train_src, held_src = _held_out(cfg, source, eval_acts)
    for measured in (held_src, ood_src):  # the rows every point is measured on: a NaN row stops the run now
        if measured is not None:
            measured.check()
    if train_src.num_rows < cfg.batch_size:
        raise SaeCompressError(f"{acts}: {train_src.num_rows} training rows is less than one batch of "
                               f"{cfg.batch_size}; lower --batch-size or give more rows")
    lm = None
    if model:
        layer = source.manifest.get("layer") if layer is None else layer
        if layer is None:
            raise SaeCompressError("--layer is needed (the --acts folder has no manifest saying which layer)")
        lm = _LM(model, gguf_file, layer, site or source.manifest.get("site", "resid"), text_paths, eval_paths,
                 ood_paths)
    identity = {"acts": _identity(acts), "eval_acts": _identity(eval_acts), "dense": _identity(dense),
                "model": [_identity(model), _identity(gguf_file)], "texts": [_identity(t) for t in text_paths],
                "eval_texts": [_identity(t) for t in eval_paths] if lm else None,
                "ood_acts": _identity(ood_acts), "ood_texts": [_identity(t) for t in ood_paths]}
    state = _Sweep(out, cfg, k, train_src, held_src, ood_src, identity, dense, dense_model, lm, hub)
    notes = []
    if lm is not None and not eval_texts:
        notes.append("CE-loss recovered is measured on the --text the fine-tune recipe trains on; give "
                     "--eval-text for held-out text")
    planned = _plan(cfg, recipes, n)
    expander = [p for p in planned if p.d is not None]
    records: dict[_Point, dict[str, Any]] = {}

    def cached(points: Sequence[_Point]) -> list[_Point]:  # records the cached points; returns the others
        for p in points:
            if (record := state.done(p)) is not None:
                records[p] = record
        return [p for p in points if p not in records]

    todo = cached(planned)  # the bar counts points still to make: at most one matched point per expander point
    bar = tqdm(total=len(todo) + len(expander), unit="point", desc="sweep", disable=not progress, dynamic_ncols=True)

    def make(points: Sequence[_Point]) -> None:
        for p in points:
            bar.set_postfix_str(p.label())
            try:
                records[p] = state.make(p)
            except KeyboardInterrupt:
                bar.close()
                tqdm.write(f"interrupted at {p.label()}: the {len(list(state.points_dir.glob('*.json')))} points "
                           f"made are kept in {state.points_dir}; run the same sweep again to continue",
                           file=sys.stderr)
                raise
            bar.update(1)

    make(todo)
    matched: dict[_Point, list[str]] = {}
    for p in expander:
        n_matched = matched_latents(m, records[p]["file_bytes"], p.dtype)
        if n_matched < k:
            notes.append(f"{p.label()}: no dense-matched point: its {records[p]['file_bytes']:,} bytes hold a "
                         f"dense SAE of {n_matched} latents, fewer than k={k}")
            continue
        matched.setdefault(_Point("dense-matched", None, n_matched, p.dtype), []).append(records[p]["key"])
    todo = cached(list(matched))
    bar.total = bar.n + len(todo)
    bar.refresh()
    make(todo)
    bar.close()
    points = [records[p] for p in planned] + [{**records[p], "matches": keys} for p, keys in matched.items()]
    y = "ce_recovered" if lm is not None else "explained_variance"
    frontier = {"x": "file_bytes", "y": y, "m": m, "n": n, "k": k, "settings": {**asdict(cfg), "recipes": recipes},
                "held_out_rows": held_src.num_rows, "notes": notes, "points": points,
                "versus_matched": _versus_matched(points, y)}
    _write_outputs(out, frontier)
    return frontier


def _versus_matched(points: list[dict[str, Any]], y: str) -> list[dict[str, Any]]:
    """Each expander point beside the dense SAE with as many bytes: its ``y`` minus the dense one's."""
    by_key = {p["key"]: p for p in points}
    rows = []
    for dense in (p for p in points if p["recipe"] == "dense-matched"):
        for key in dense["matches"]:
            p = by_key[key]
            if p.get(y) is not None and dense.get(y) is not None:
                ood = OOD + y
                rows.append({"key": key, "recipe": p["recipe"], "d": p["d"], "dtype": p["dtype"], "n": p["n"],
                             "file_bytes": p["file_bytes"], "dense_n": dense["n"], y: p[y],
                             f"dense_{y}": dense[y], "difference": p[y] - dense[y],
                             **({f"{OOD}difference": p[ood] - dense[ood]}
                                if p.get(ood) is not None and dense.get(ood) is not None else {})})
    return rows


Y_LABELS = {"ce_recovered": "CE-loss recovered (held-out text)",
            "explained_variance": "1 − FVU on held-out rows (no --model: CE-loss recovered not measured)",
            OOD + "ce_recovered": "CE-loss recovered (held-out text of another domain, --ood-text)",
            OOD + "explained_variance": "1 − FVU on rows of another domain (--ood-acts)"}


def _write_outputs(out: Path, frontier: dict[str, Any]) -> None:
    """``frontier.json``, ``frontier.csv`` and, when matplotlib is importable, ``frontier.png`` (else a note)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for point in frontier["points"]:
        row = [point.get(column) for column in CSV_COLUMNS]
        writer.writerow(["" if v is None else ";".join(v) if isinstance(v, list) else v for v in row])
    try:
        import matplotlib
    except ImportError:
        frontier["notes"].append("frontier.png needs matplotlib: pip install 'saecompress[plot]' and rerun "
                                 "(the points are cached)")
    else:
        matplotlib.use("Agg")
        with atomic_path(out / "frontier.png") as tmp:
            _plot(frontier, tmp)
    with atomic_path(out / "frontier.csv") as tmp:
        tmp.write_text(text.getvalue())
    with atomic_path(out / "frontier.json") as tmp:
        tmp.write_text(dumps(frontier, indent=1))


def _plot(frontier: dict[str, Any], path: Path) -> None:
    """Bytes (log) against the frontier's y, one panel per domain measured: a line per recipe and dtype,
    dense points, latent counts."""
    import matplotlib.pyplot as plt

    ys = [y for y in (frontier["y"], OOD + frontier["y"]) if any(p.get(y) is not None for p in frontier["points"])]
    fig, axes = plt.subplots(1, len(ys), figsize=(8 * len(ys), 5.5), squeeze=False)
    dtypes = sorted({p["dtype"] for p in frontier["points"]})
    styles = dict(zip(dtypes, ("-", "--", ":", "-.")))
    colours = dict(zip((*RECIPES, *BASELINES), plt.get_cmap("tab10").colors))
    for ax, y in zip(axes[0], ys):
        for recipe in (*RECIPES, *BASELINES):
            for dtype in dtypes:
                pts = sorted((p for p in frontier["points"] if p["recipe"] == recipe and p["dtype"] == dtype
                              and p.get(y) is not None), key=lambda p: p["file_bytes"])
                if not pts:
                    continue
                xs, values = [p["file_bytes"] for p in pts], [p[y] for p in pts]
                label = f"{recipe} ({dtype})" if len(dtypes) > 1 else recipe
                if recipe == "dense":
                    ax.plot(xs, values, "k*", markersize=12, label=label,
                            fillstyle="full" if dtype == dtypes[0] else "none")
                else:
                    ax.plot(xs, values, styles[dtype], marker="o", label=label, color=colours[recipe])
                for p in pts:
                    text = f"n={p['n']:,}" + (f" d={p['d']}" if p["d"] else "")
                    ax.annotate(text, (p["file_bytes"], p[y]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("file bytes (log scale)")
        ax.set_ylabel(Y_LABELS[y])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"storage–fidelity frontier (m={frontier['m']}, k={frontier['k']}, "
                 f"{frontier['settings']['tokens']:,} training tokens per SAE)")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
