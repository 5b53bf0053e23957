"""Exporters of SAEs to other runtimes (ONNX)."""

from .onnx import build_onnx, export_onnx

__all__ = ["build_onnx", "export_onnx"]
