"""Exporters of SAEs to other runtimes (ONNX) and back to other libraries' layouts."""

from .._lazy import lazy_package

_LAZY = {"build_onnx": "saecompress.exporters.onnx", "export_onnx": "saecompress.exporters.onnx"}
lazy_package(__name__, _LAZY)  # the graph builders need torch; the ONNX metadata reader (the runtime's) does not

__all__ = list(_LAZY)
