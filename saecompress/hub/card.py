"""The model card (``README.md``) of a repo of compact Expander SAEs.

Rendered only from the files' metadata (no dates, no local state), so the same files always give
the same card and re-pushing unchanged files changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..compact_format import compression_ratio
from ..kinds import VARIABLE_COUNT
from ..provenance import shareable, source_label
from ..units import human_bytes

TAGS = ("sparse-autoencoder", "expander-sae", "mechanistic-interpretability", "saecompress")


@dataclass(frozen=True)
class CardEntry:
    """One compact file in the repo: its hookpoint ('' for the root), path in repo, size and metadata."""

    hookpoint: str
    path_in_repo: str
    size: int
    meta: dict[str, Any]


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def metrics(meta: dict[str, Any]) -> dict[str, float]:
    """The fidelity numbers of a file's ``user["metrics"]`` record (docs/FORMAT.md)."""
    found = (meta.get("user") or {}).get("metrics")
    return {k: v for k, v in sorted(found.items()) if isinstance(v, (int, float)) and not isinstance(v, bool)} \
        if isinstance(found, dict) else {}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _mask(meta: dict[str, Any]) -> str:
    return f"{meta.get('mask_algorithm', '')} seed {meta['mask_seed']}" if meta["mask"] == "seed" else "explicit"


def render_card(repo_id: str, entries: list[CardEntry], onnx_paths: list[str] = ()) -> str:
    """The full ``README.md`` text for ``repo_id`` holding ``entries`` (and ONNX exports at ``onnx_paths``)."""
    entries = sorted(entries, key=lambda e: (e.hookpoint, e.path_in_repo))
    front = ["---", "library_name: saecompress", "tags:"] + [f"- {t}" for t in TAGS] + ["---", ""]
    body = [
        f"# {repo_id.split('/')[-1]}",
        "",
        "Expander sparse autoencoders in the [saecompress](https://pypi.org/project/saecompress/) compact "
        "format: each latent's decoder row and encoder column keep only `d` of the `m` model dimensions, on a "
        "sparse expander mask that is regenerated from its seed at load time (or stored, for explicit masks).",
        "",
        "## Hookpoints",
        "",
    ]
    metric_names = sorted({name for e in entries for name in metrics(e.meta)})
    header = ["hookpoint", "file", "m", "n", "d", "k", "activation", "encoder", "mask", "dtype", "size",
              "compression"] + metric_names
    rows = []
    for e in entries:
        m = e.meta
        ratio = compression_ratio(m["m"], m["n"], e.size)
        found = metrics(m)
        rows.append([f"`{e.hookpoint or '.'}`", f"`{e.path_in_repo}`", _fmt(m["m"]), _fmt(m["n"]), _fmt(m["d"]),
                     _fmt(m["k"]), m["activation"], m["encoder"], _mask(m), m["dtype"], human_bytes(e.size),
                     f"{ratio:,.1f}x"]
                    + [_fmt(found[name]) if name in found else "" for name in metric_names])
    body += _table(header, rows)
    body += ["", "Compression is against the equivalent dense TopK SAE in float32 (2·m·n + m + n values)."]
    if any(e.meta["activation"] in VARIABLE_COUNT for e in entries):
        body += [f"For {', '.join(VARIABLE_COUNT)} SAEs the number of active latents varies per token and `k` is "
                 "its cap (`max_l0` of the ONNX graphs: the 99.9th percentile of per-token L0 on the data it was "
                 "set on); thresholds are stored in float32."]
    if metric_names:
        body += ["Fidelity metrics are the ones recorded in each file's metadata."]
    if onnx_paths:
        body += ["ONNX exports of the encoders (for onnxruntime): "
                 + ", ".join(f"`{p}`" for p in sorted(onnx_paths)) + "."]
    sources = [e for e in entries if e.meta.get("source")]
    if sources:
        body += ["", "## Source SAEs", ""]
        srows = []
        for e in sources:
            src = shareable(e.meta["source"])
            location = source_label(src)
            skip = ({"library", "model_name", "repo_id", "revision", "file"}
                    | ({"hookpoint"} if src.get("hookpoint") == e.hookpoint else set()))
            details = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(src.items())
                                if k not in skip and not isinstance(v, (dict, list)))
            srows.append([f"`{e.hookpoint or '.'}`", _fmt(src.get("library", "")), _fmt(src.get("model_name", "")),
                          f"`{location}`" if location else "", details])
        body += _table(["hookpoint", "library", "model", "converted from", "details"], srows)
    first = entries[0].hookpoint if entries else ""
    ref = f"{repo_id}/{first}" if first else repo_id
    m = entries[0].meta["m"] if entries else 512
    body += [
        "",
        "## Usage",
        "",
        "```python",
        "import saecompress",
        "import torch",
        "",
        f'sae = saecompress.load("hf://{ref}")  # ExpanderSAE (torch); verified on download',
        f"x = torch.randn(8, {m})  # activations at the hookpoint: [..., m]",
        "top_values, top_indices = sae.encode(x)  # the k active latents per row",
        "x_hat = sae.decode(top_values, top_indices)",
        "```",
        "",
        "```bash",
        "pip install saecompress",
        f"saecompress pull {ref}                 # into the Hugging Face cache; prints local paths",
        f"saecompress info hf://{ref}",
        f"saecompress export hf://{ref} sae.onnx  # onnxruntime graph",
        "```",
        "",
    ]
    return "\n".join(front + body)
