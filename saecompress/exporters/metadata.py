"""The ``saecompress.*`` metadata of an exported ONNX model: written by ``onnx.py``, read by the runtime (no torch)."""

from __future__ import annotations

from typing import Any

METADATA_PREFIX = "saecompress."


def read_onnx_metadata(model: Any) -> dict[str, str]:
    """The ``saecompress.*`` metadata of an exported model (an ``onnx.ModelProto``, or onnxruntime's
    ``custom_metadata_map``), without the prefix."""
    props = model if isinstance(model, dict) else {p.key: p.value for p in model.metadata_props}
    return {key[len(METADATA_PREFIX):]: value for key, value in props.items()
            if key.startswith(METADATA_PREFIX)}
