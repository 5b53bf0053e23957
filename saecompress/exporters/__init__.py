"""Exporters of SAEs to other runtimes (ONNX) and back to other libraries' layouts."""

from importlib import import_module

_LAZY = {"build_onnx": "saecompress.exporters.onnx", "export_onnx": "saecompress.exporters.onnx"}


def __getattr__(name: str):
    if name in _LAZY:  # the graph builders need torch; the ONNX metadata reader (the runtime's) does not
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'saecompress.exporters' has no attribute {name!r}")


__all__ = list(_LAZY)
