"""The compact file: one ``.safetensors`` file per Expander SAE (spec: ``docs/FORMAT.md``).

Tensors: ``values [n, d]`` (float32 / float16 / bfloat16, or int8 with ``values_scale [n]``),
optional ``enc_values`` (untied encoders, same scheme), ``b_enc [n]`` and ``b_dec [m]`` (float32),
``threshold [n]`` (float32) for the threshold activations, and ``indices [n, d]`` only when the mask
is not seed-generated. The header's ``__metadata__``
holds the configuration, the mask seed and the sha256 of the index array, checked on load.

Files are written canonically (sorted header keys, tensors in a fixed order), so saving the same
model twice gives the same bytes, and written atomically (temp file + rename).
"""

from __future__ import annotations

import copy
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ._io import atomic_path
from ._json import dumps
from .errors import SaeCompressError, check_choice, first_line
from .mask import MASK_ALGORITHM, expander_mask, indices_sha256
from .models import ALL_ACTIVATIONS, ENCODERS, THRESHOLD_ACTIVATIONS, ExpanderSAE, TopKSAE
from .provenance import shareable

FORMAT_NAME = "saecompress.expander"
FORMAT_VERSION = 1
STORAGE_DTYPES = ("float32", "float16", "bfloat16", "int8")

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int8: "I8", torch.int16: "I16", torch.int32: "I32"}
_REQUIRED_KEYS = ("format", "format_version", "m", "n", "d", "k", "activation", "encoder",
                  "normalize_input", "mask", "indices_sha256", "dtype")


# --------------------------------------------------------------------------- writing

def quantize_int8(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-latent int8: ``values ≈ q * scale[:, None]``, ``|q| ≤ 127``.

    The scale is rounded up to 17 significant bits, so ``q * scale`` is exact in float32 and
    re-quantising dequantised values gives back the same ``q`` and ``scale`` (a bit-exact round trip).
    """
    absmax = values.detach().abs().amax(dim=1).double()
    mantissa, exponent = torch.frexp(absmax / 127)
    scale = torch.ldexp(torch.ceil(mantissa * 2**17) / 2**17, exponent).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(values.detach().float() / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _stored_values(name: str, values: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    if dtype == "int8":
        q, scale = quantize_int8(values)
        return {name: q, f"{name}_scale": scale}
    return {name: values.detach().to(_TORCH_DTYPES[dtype]).contiguous()}


def index_dtype(m: int) -> torch.dtype:
    """The integer type of stored mask indices for model dim ``m``: int16 while it fits, else int32."""
    return torch.int16 if m <= torch.iinfo(torch.int16).max else torch.int32


def compact_tensors(sae: ExpanderSAE, dtype: str) -> dict[str, torch.Tensor]:
    """The tensors a compact file holds for ``sae`` stored as ``dtype``."""
    tensors = _stored_values("values", sae.values, dtype)
    if sae.enc_values is not None:
        tensors |= _stored_values("enc_values", sae.enc_values, dtype)
    tensors["b_enc"] = sae.b_enc.detach().float().contiguous()
    tensors["b_dec"] = sae.b_dec.detach().float().contiguous()
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold.detach().float().contiguous()
    if sae.mask_seed is None:
        tensors["indices"] = sae.indices.to(index_dtype(sae.m)).contiguous()
    return tensors


def _json(value: Any) -> str:
    return dumps(value, sort_keys=True, separators=(",", ":"))


def compact_metadata(sae: ExpanderSAE, dtype: str, user: dict | None = None,
                     source: dict | None = None) -> dict[str, str]:
    """The ``__metadata__`` strings of a compact file (see docs/FORMAT.md); ``source`` is written
    through ``provenance.shareable``."""
    meta = {
        "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
        "m": str(sae.m), "n": str(sae.n), "d": str(sae.d), "k": str(sae.k),
        "activation": sae.activation, "encoder": sae.encoder,
        "normalize_input": "true" if sae.normalize_input else "false",
        "mask": "explicit" if sae.mask_seed is None else "seed",
        "indices_sha256": indices_sha256(sae.indices.cpu().numpy()),
        "dtype": dtype, "source": _json(shareable(source or {})), "user": _json(user or {}),
    }
    if sae.mask_seed is not None:
        meta["mask_algorithm"] = sae.mask_algorithm or MASK_ALGORITHM
        meta["mask_seed"] = str(sae.mask_seed)
    return meta


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str]) -> None:
    """Write a safetensors file canonically and atomically.

    The header is JSON with sorted keys and no spaces, padded with spaces to a multiple of 8
    bytes; tensors are laid out by element size (largest first), then name, so every tensor is
    aligned to its element size.
    """
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in order:
        tensor = tensors[name].detach().cpu().contiguous()
        blob = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def save_compact(sae: ExpanderSAE, path: str | os.PathLike, dtype: str = "float32",
                 metadata: dict | None = None, source: dict | None = None) -> Path:
    """Write ``sae`` as a compact file storing its values as ``dtype``.

    ``metadata`` is free JSON-serialisable user metadata (e.g. fidelity metrics); ``source`` the
    provenance of the SAE it was made from (written without local paths: ``provenance.shareable``).
    """
    check_choice("storage dtype", dtype, STORAGE_DTYPES)
    _check_finite(Path(path), {n: t for n, t in sae.state_dict().items() if t.is_floating_point()})
    write_safetensors(path, compact_tensors(sae, dtype), compact_metadata(sae, dtype, metadata, source))
    return Path(path)


def with_metrics(user: dict, metrics: dict | None) -> dict:
    """``user`` metadata whose ``metrics`` record (docs/FORMAT.md) is the numbers in ``metrics``:
    fidelity of the model as stored, on held-out activations. ``None`` drops the record (the model
    changed and was not measured again)."""
    out = {key: value for key, value in user.items() if key != "metrics"}
    if metrics:
        out["metrics"] = {key: value for key, value in metrics.items()
                          if isinstance(value, (int, float)) and not isinstance(value, bool)}
    return out


def shareable_copy(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Copy the compact file ``path`` to ``out`` with a shareable ``source`` (files written before
    sources were recorded without local paths); tensors and other metadata are copied unchanged."""
    path = Path(path)
    raw = _read_header(path)
    meta = parse_compact_metadata(path, raw)
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    write_safetensors(out, tensors, {**raw, "source": _json(shareable(meta["source"]))})
    return Path(out)


# --------------------------------------------------------------------------- reading

def _fail(path: Path, problem: str, hint: str = "") -> SaeCompressError:
    return SaeCompressError(f"{path}: {problem}" + (f"; {hint}" if hint else ""))


def read_compact_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed metadata of a compact file (ints as int, ``source``/``user`` as dicts).

    Raises ``SaeCompressError`` for a file that is not a compact saecompress file.
    """
    path = Path(path)
    raw = _read_header(path)
    return parse_compact_metadata(path, raw)


def _read_header(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise _fail(path, "no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise _fail(path, f"not a readable safetensors file ({first_line(err)})",
                    "the file may be truncated or corrupt: re-download or re-create it") from None


def is_compact_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a safetensors file whose metadata names the compact format.

    Raises ``SaeCompressError`` when ``path`` is a ``.safetensors`` file that cannot be read
    (truncated, corrupt), so the caller reports that rather than "unknown format".
    """
    path = Path(path)
    try:
        return _read_header(path).get("format") == FORMAT_NAME
    except SaeCompressError:
        if path.suffix == ".safetensors":
            raise
        return False


def parse_compact_metadata(path: Path, raw: dict[str, str]) -> dict[str, Any]:
    """Validate and parse a compact file's raw ``__metadata__`` strings; ``path`` names it in errors."""
    if raw.get("format") != FORMAT_NAME:
        raise _fail(path, f"not a compact saecompress file (format={raw.get('format')!r})",
                    "convert a dense SAE with `saecompress convert`")
    missing = [key for key in _REQUIRED_KEYS if key not in raw]
    if missing:
        raise _fail(path, f"metadata lacks {', '.join(missing)}", "the file is damaged; re-create it")
    if raw["format_version"] != str(FORMAT_VERSION):
        raise _fail(path, f"unknown format version {raw['format_version']!r} (this saecompress reads "
                          f"version {FORMAT_VERSION})", "upgrade saecompress")
    meta: dict[str, Any] = dict(raw)
    try:
        for key in ("m", "n", "d", "k") + (("mask_seed",) if raw["mask"] == "seed" else ()):
            meta[key] = int(raw[key])
        meta["source"] = json.loads(raw.get("source", "{}"))
        meta["user"] = json.loads(raw.get("user", "{}"))
    except (KeyError, ValueError) as err:
        raise _fail(path, f"malformed metadata ({first_line(err)})", "the file is damaged; re-create it") from None
    meta["normalize_input"] = raw["normalize_input"] == "true"
    checks = [
        (meta["activation"] in ALL_ACTIVATIONS, f"unknown activation {meta['activation']!r}"),
        (meta["encoder"] in ENCODERS, f"unknown encoder {meta['encoder']!r}"),
        (meta["dtype"] in STORAGE_DTYPES, f"unknown dtype {meta['dtype']!r}"),
        (meta["mask"] in ("seed", "explicit"), f"unknown mask kind {meta['mask']!r}"),
        (meta["mask"] != "seed" or raw.get("mask_algorithm") == MASK_ALGORITHM,
         f"unknown mask algorithm {raw.get('mask_algorithm')!r}"),
        (min(meta["m"], meta["n"], meta["k"], meta["d"]) >= 1 and meta["d"] <= meta["m"]
         and meta["k"] <= meta["n"], "impossible sizes m/n/d/k"),
    ]
    for ok, problem in checks:
        if not ok:
            raise _fail(path, problem, "upgrade saecompress, or re-create the file")
    return meta


def _expected_shapes(meta: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    n, d, m = meta["n"], meta["d"], meta["m"]
    int8 = meta["dtype"] == "int8"
    value_dtypes = ("I8",) if int8 else ({"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[meta["dtype"]],)
    names = ["values"] + (["enc_values"] if meta["encoder"] == "untied" else [])
    shapes = {}
    for name in names:
        shapes[name] = ((n, d), value_dtypes)
        if int8:
            shapes[f"{name}_scale"] = ((n,), ("F32",))
    shapes["b_enc"] = ((n,), ("F32",))
    shapes["b_dec"] = ((m,), ("F32",))
    if meta["activation"] in THRESHOLD_ACTIVATIONS:
        shapes["threshold"] = ((n,), ("F32",))
    if meta["mask"] == "explicit":
        shapes["indices"] = ((n, d), ("I16", "I32"))
    return shapes


def _read_tensors(path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    expected = _expected_shapes(meta)
    try:
        with safe_open(str(path), framework="pt") as f:
            found = set(f.keys())
            if found != set(expected):
                extra, lacking = sorted(found - set(expected)), sorted(set(expected) - found)
                raise _fail(path, "tensors do not match the metadata"
                            + (f" (missing {', '.join(lacking)})" if lacking else "")
                            + (f" (unexpected {', '.join(extra)})" if extra else ""),
                            "the file is damaged; re-create it")
            tensors = {}
            for name, (shape, dtypes) in expected.items():
                info = f.get_slice(name)
                if tuple(info.get_shape()) != shape or info.get_dtype() not in dtypes:
                    raise _fail(path, f"tensor {name} is {info.get_dtype()}{list(info.get_shape())}, "
                                      f"metadata says {'/'.join(dtypes)}{list(shape)}",
                                "the file is damaged; re-create it")
                tensors[name] = f.get_tensor(name)
            return tensors
    except (SafetensorError, OSError, ValueError) as err:
        raise _fail(path, f"could not read tensors ({first_line(err)})",
                    "the file may be truncated or corrupt: re-download or re-create it") from None


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise _fail(path, f"tensor {name} contains NaN or Inf", "re-train or re-convert the SAE")


def _dequantized(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    stored = tensors[name]
    if stored.dtype == torch.int8:
        return stored.float() * tensors[f"{name}_scale"][:, None]
    return stored.float()


def load_compact(path: str | os.PathLike) -> ExpanderSAE:
    """Load a compact file as an ``ExpanderSAE`` (float32 values); the file's facts (storage dtype,
    source, user metadata) are :func:`read_compact_metadata`'s.

    Checks the format, every tensor's shape and dtype against the metadata, that values are finite,
    and that the index array's sha256 matches (so a drift in the mask algorithm is caught).
    """
    path = Path(path)
    meta = read_compact_metadata(path)
    tensors = _read_tensors(path, meta)
    _check_finite(path, tensors)
    m, n, d = meta["m"], meta["n"], meta["d"]
    if meta["mask"] == "seed":
        indices = torch.from_numpy(expander_mask(m, n, d, meta["mask_seed"]))
    else:
        indices = tensors["indices"].long()
        if int(indices.min()) < 0 or int(indices.max()) >= m:
            raise _fail(path, f"mask indices outside [0, {m})", "the file is damaged; re-create it")
    if indices_sha256(indices.numpy()) != meta["indices_sha256"]:
        raise _fail(path, "mask index hash mismatch (the mask differs from the one the file was saved with)",
                    "the file is corrupt or was written by an incompatible saecompress; re-create it")
    sae = ExpanderSAE(m, n, d, meta["k"], seed=meta.get("mask_seed", 0), activation=meta["activation"],
                      encoder=meta["encoder"], normalize_input=meta["normalize_input"],
                      indices=None if meta["mask"] == "seed" else indices,
                      threshold=tensors.get("threshold"))
    with torch.no_grad():
        sae.values.copy_(_dequantized(tensors, "values"))
        if sae.enc_values is not None:
            sae.enc_values.copy_(_dequantized(tensors, "enc_values"))
        sae.b_enc.copy_(tensors["b_enc"])
        sae.b_dec.copy_(tensors["b_dec"])
    return sae


@torch.no_grad()
def stored_copy(sae: ExpanderSAE | TopKSAE, dtype: str) -> ExpanderSAE | TopKSAE:
    """A copy of ``sae`` holding the values a compact file of ``dtype`` stores (what ``load_compact`` gives back).

    A dense ``TopKSAE`` gets the same scheme per latent (``W_dec`` rows, ``W_enc`` columns; biases
    float32): the dense SAE stored at ``dtype``, with ``dense_bytes`` bytes of weights.
    """
    check_choice("storage dtype", dtype, STORAGE_DTYPES)
    stored = copy.deepcopy(sae)

    def kept(name: str, rows: torch.Tensor) -> torch.Tensor:  # [n, ·] rows as the file stores them
        return _dequantized(_stored_values(name, rows, dtype), name)

    if isinstance(sae, TopKSAE):
        stored.W_dec.copy_(kept("values", sae.W_dec))
        stored.W_enc.copy_(kept("enc_values", sae.W_enc.T).T)
        return stored
    for name in ("values", "enc_values"):
        if getattr(sae, name) is not None:
            getattr(stored, name).copy_(kept(name, getattr(sae, name)))
    return stored


def compression_ratio(m: int, n: int, file_bytes: int) -> float:
    """How many times smaller ``file_bytes`` is than the equivalent dense TopK SAE in float32."""
    return 4 * dense_values(m, n) / max(file_bytes, 1)


def compact_size_bound(n: int, m: int, d: int, dtype: str) -> int:
    """Upper bound on a seed-mask compact file's size: ``n·d·bytes(dtype) + 4·(n + m) + 64 KiB``."""
    itemsize = 1 if dtype == "int8" else torch.finfo(_TORCH_DTYPES[dtype]).bits // 8
    extra = 4 * n if dtype == "int8" else 0  # per-latent int8 scales
    return n * d * itemsize + 4 * (n + m) + extra + 64 * 1024


def dense_bytes(m: int, n: int, dtype: str) -> int:
    """Bytes of a dense TopK SAE's weights stored as ``dtype`` in the compact file's scheme (``stored_copy``):
    ``2·m·n`` values (int8: plus a float32 scale per latent and matrix) and float32 biases; no header."""
    check_choice("storage dtype", dtype, STORAGE_DTYPES)
    itemsize = 1 if dtype == "int8" else torch.finfo(_TORCH_DTYPES[dtype]).bits // 8
    scales = 2 * 4 * n if dtype == "int8" else 0
    return 2 * m * n * itemsize + scales + 4 * (n + m)


def dense_values(m: int, n: int) -> int:
    """Values in an equivalent dense TopK SAE: ``2·m·n + m + n``."""
    return 2 * m * n + m + n


def learned_values(m: int, n: int, d: int, encoder: str) -> int:
    """Learned values of an Expander SAE: ``n·d`` (twice if untied) ``+ n + m``."""
    return (2 if encoder == "untied" else 1) * n * d + n + m


__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "STORAGE_DTYPES", "save_compact", "load_compact",
           "read_compact_metadata", "parse_compact_metadata", "is_compact_file", "write_safetensors", "quantize_int8",
           "compact_size_bound", "dense_bytes", "dense_values", "learned_values", "compression_ratio", "stored_copy",
           "with_metrics"]
