"""Readers for dense TopK SAEs as the common libraries save them, with layout auto-detection.

Supported layouts (``detect_format`` names):

- ``saelens``: a folder with ``cfg.json`` + ``sae_weights.safetensors``;
- ``sparsify``: a folder with ``cfg.json`` + ``sae.safetensors``;
- ``dictionary_learning``: a folder with ``ae.pt`` + ``config.json`` (``AutoEncoderTopK``,
  ``BatchTopKSAE``, ``MatryoshkaBatchTopKSAE``, ``JumpReluAutoEncoder``);
- ``gemma_scope``: a folder with Gemma Scope's ``params.npz`` (JumpReLU);
- ``openai``: a ``.pt`` state dict of openai/sparse_autoencoder;
- ``paper``: a ``.pt`` state dict of the Expander-SAE paper's code (dense mask + values, or one
  of their dense baselines).

A path may also be a folder holding many of these (a sparsify repo with ``layers.0/``,
``layers.1/`` …, a SAELens repo with one folder per SAE id, a dictionary_learning sweep with
``trainer_0/`` …), searched up to four levels deep. Its *hookpoints* are the members' paths
relative to it (``"layers.10"``, ``"resid_post_layer_3/trainer_0"``, ``"layer_6.pt"``).
``list_hookpoints`` on a single SAE returns ``[""]``.

``read_sae`` returns each source in its own form — a ``TopKSAE`` for dense SAEs (TopK, or a
threshold activation ``jumprelu`` / ``batchtopk`` with ``k = n``), and for paper
checkpoints the exact ``ExpanderSAE`` (their mask as explicit indices) — and, beside it, its
provenance (``library``, local ``path``, ``hookpoint`` …). Readers fold constant scalings and
non-subtracted ``b_dec`` into the weights, so ``TopKSAE.forward`` reproduces the source library's
forward pass; other sources (ReLU/L1, gated, transcoders) are refused with a ``SaeCompressError``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..compact import is_compact_file
from ..errors import SaeCompressError
from ..models import ExpanderSAE, TopKSAE
from . import dictionary_learning, gemma_scope, openai, paper, saelens, sparsify
from ._common import read_torch

FORMATS = ("saelens", "sparsify", "openai", "dictionary_learning", "gemma_scope", "paper")
_FOLDER_FORMATS = {"saelens": saelens, "sparsify": sparsify, "dictionary_learning": dictionary_learning,
                   "gemma_scope": gemma_scope}
_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")
_DL_FILES = (dictionary_learning.CONFIG, dictionary_learning.WEIGHTS)
_MAX_DEPTH = 4
SUPPORTED = (
    "SAELens (cfg.json + sae_weights.safetensors), sparsify (cfg.json + sae.safetensors, or a repo of "
    "hookpoint folders), dictionary_learning (ae.pt + config.json), Gemma Scope (params.npz), "
    "openai/sparse_autoencoder (.pt state "
    "dict), Expander-SAE paper (.pt with mask/decoder_vals, or a dense W_dec_param baseline)"
)


@dataclass
class _Source:
    """One located SAE: its format, the path its reader takes, and a state dict already loaded."""

    format: str
    path: Path
    state: dict[str, Any] | None = None


def _folder_format(folder: Path) -> str | None:
    for name, module in _FOLDER_FORMATS.items():
        if module.matches(folder):
            return name
    return None


def _torch_format(file: Path) -> _Source:
    state = read_torch(file)
    if openai.matches_state(state):
        return _Source("openai", file, state)
    if paper.matches_state(state):
        return _Source("paper", file, state)
    if "encoder.weight" in state and "decoder.weight" in state and "b_dec" in state:
        raise SaeCompressError(
            f"{file}: looks like a dictionary_learning ae.pt but its config.json is missing; put the "
            "trainer's config.json beside it (it says which dictionary class it is)"
        )
    keys = ", ".join(sorted(str(key) for key in state)[:12])
    raise SaeCompressError(f"{file}: unrecognised state dict (keys: {keys}); supported layouts: {SUPPORTED}")


def _single(path: Path) -> _Source | None:
    """The SAE at ``path`` itself (a file or a one-SAE folder), or None if it is neither."""
    if path.is_dir():
        name = _folder_format(path)
        return _Source(name, path) if name else None
    if not path.is_file():
        raise SaeCompressError(f"{path}: no such file or folder")
    if path.name in (saelens.WEIGHTS, sparsify.WEIGHTS, saelens.CFG, gemma_scope.WEIGHTS, *_DL_FILES):
        name = _folder_format(path.parent)
        if name:
            return _Source(name, path.parent)
    if path.suffix in _TORCH_SUFFIXES:
        return _torch_format(path)
    return None


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _members(root: Path, problems: list[SaeCompressError] | None = None) -> dict[str, _Source]:
    """SAE folders/files under ``root`` (not ``root`` itself), keyed by relative posix path.

    ``.pt`` files that are not SAEs are skipped; their errors are appended to ``problems``.
    """
    found: dict[str, _Source] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if depth > 0:
            name = _folder_format(here)
            if name:
                found[here.relative_to(root).as_posix()] = _Source(name, here)
                dirnames[:] = []
                continue
        if depth >= _MAX_DEPTH:
            dirnames[:] = []
        for file in filenames:
            if file.endswith(_TORCH_SUFFIXES) and not file.startswith("."):
                try:
                    source = _torch_format(here / file)
                except SaeCompressError as e:
                    if problems is not None:
                        problems.append(e)
                    continue
                found[(here / file).relative_to(root).as_posix()] = source
    return dict(sorted(found.items(), key=lambda item: _natural_key(item[0])))


def _nothing_found(path: Path, problems: list[SaeCompressError] = ()) -> SaeCompressError:
    if problems:
        return problems[0]
    if path.is_file():
        if is_compact_file(path):
            return SaeCompressError(f"{path}: already a compact Expander SAE file; use it directly")
        return SaeCompressError(f"{path}: not a dense SAE file in a known layout; supported layouts: {SUPPORTED}")
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(entries[:15]) + (f", … ({len(entries)} entries)" if len(entries) > 15 else "")
    return SaeCompressError(
        f"{path}: no SAE found (contains: {shown or 'nothing'}); supported layouts: {SUPPORTED}"
    )


def _locate(path: str | os.PathLike, hookpoint: str | None) -> tuple[_Source, str | None]:
    root = Path(path)
    if hookpoint:
        target = root / hookpoint
        if not target.exists():
            available = list(_members(root)) if root.is_dir() else []
            hint = f"; available: {', '.join(available[:20])}" if available else ""
            raise SaeCompressError(f"{root}: hookpoint {hookpoint!r} not found{hint}")
        source = _single(target)
        if source is None:
            raise _nothing_found(target)
        return source, hookpoint
    source = _single(root)
    if source is not None:
        return source, None
    problems: list[SaeCompressError] = []
    members = _members(root, problems)
    if len(members) == 1:
        (name, source), = members.items()
        return source, name
    if not members:
        raise _nothing_found(root, problems)
    shown = ", ".join(list(members)[:20]) + (", …" if len(members) > 20 else "")
    raise SaeCompressError(f"{root}: holds {len(members)} SAEs ({shown}); choose one with --hookpoint")


def list_hookpoints(path: str | os.PathLike) -> list[str]:
    """The hookpoints under ``path`` (relative paths, natural order); ``[""]`` for a single SAE."""
    root = Path(path)
    if _single(root) is not None:
        return [""]
    problems: list[SaeCompressError] = []
    members = _members(root, problems)
    if not members:
        raise _nothing_found(root, problems)
    return list(members)


def detect_format(path: str | os.PathLike) -> str:
    """The layout of the SAE (or SAEs) at ``path``: one of ``FORMATS``."""
    root = Path(path)
    source = _single(root)
    if source is not None:
        return source.format
    problems: list[SaeCompressError] = []
    members = _members(root, problems)
    formats = sorted({member.format for member in members.values()})
    if not formats:
        raise _nothing_found(root, problems)
    if len(formats) > 1:
        raise SaeCompressError(f"{root}: mixes layouts ({', '.join(formats)}); pass one hookpoint at a time")
    return formats[0]


def read_sae(path: str | os.PathLike, hookpoint: str | None = None, *,
             k: int | None = None) -> tuple[TopKSAE | ExpanderSAE, dict[str, Any]]:
    """``(model, provenance)`` of the SAE at ``path`` (``/hookpoint``): the model in its own form
    (``TopKSAE``, or ``ExpanderSAE`` for paper checkpoints) and where it came from.

    ``k`` is used only for paper checkpoints, whose state dict does not store it.
    """
    source, hookpoint = _locate(path, hookpoint)
    if source.format == "paper":
        reader = paper.read_paper_checkpoint if "mask" in source.state else paper.read_paper_dense
        sae, provenance = reader(source.path, k=k, sd=source.state)
        return sae, provenance | ({"hookpoint": hookpoint} if hookpoint else {})
    if source.format == "openai":
        return openai.read(source.path, hookpoint, sd=source.state)
    return _FOLDER_FORMATS[source.format].read(source.path, hookpoint)
