"""Where an SAE came from, as files may record it: never a path of the machine that wrote them.

Readers return a source's provenance beside its model, with the local ``path`` (for messages and sizes);
everything written to a file (compact metadata, ONNX metadata, SAELens ``cfg.json``, model
cards) goes through :func:`shareable`, which replaces it by what identifies the source anywhere:
``repo_id`` + ``revision`` (commit sha) + ``file`` (path in the repo) for a Hugging Face cache
path, else the ``file`` name alone.
"""

from __future__ import annotations

import re
from typing import Any

_CACHE_PATH = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/([0-9a-f]{40})(?:/(.*))?$")


def shareable(provenance: dict[str, Any]) -> dict[str, Any]:
    """``provenance`` with its local ``path`` replaced by ``repo_id``/``revision``/``file`` or ``file``."""
    if "path" not in provenance:
        return dict(provenance)
    out = {key: value for key, value in provenance.items() if key != "path"}
    path = str(provenance["path"]).replace("\\", "/").rstrip("/")
    match = _CACHE_PATH.search(path)
    if match:
        owner, name, sha, rest = match.groups()
        out |= {"repo_id": f"{owner}/{name}", "revision": sha}
        if rest:
            out["file"] = rest
    elif path:
        out["file"] = path.rsplit("/", 1)[-1]
    return out


def source_label(provenance: dict[str, Any]) -> str:
    """A short name for the source: ``hf://owner/repo/file@sha12`` for hub sources, else the file name."""
    source = shareable(provenance)
    if "repo_id" in source:
        file = f"/{source['file']}" if source.get("file") else ""
        return f"hf://{source['repo_id']}{file}@{str(source.get('revision', ''))[:12]}".rstrip("@")
    return str(source.get("file", ""))
