"""saecompress: compress sparse autoencoders to Expander SAEs and ship them to production.

Every CLI command has a library function: ``convert`` / ``convert_path``, ``train``, ``sweep``, ``finetune``,
``evaluate``, ``harvest``, ``export_onnx``, ``push``, ``pull``, ``Monitor``; ``load`` resolves any
source (compact file, dense SAE folder in a known layout, ``hf://owner/repo[/hookpoint][@rev]``).
"""

from importlib import import_module

from ._version import __version__
from .compact import load_compact, read_compact_metadata, save_compact
from .convert import convert, convert_path
from .errors import SaeCompressError
from .mask import MASK_ALGORITHM, expander_mask
from .models import ExpanderSAE, TopKSAE
from .sources import load
from .sweep import SweepConfig, sweep
from .train import TrainConfig, train

# Imported on first use: they pull in onnx, onnxruntime, huggingface_hub or transformers.
_LAZY = {
    "export_onnx": "saecompress.exporters.onnx",
    "Monitor": "saecompress.runtime",
    "push": "saecompress.hub",
    "pull": "saecompress.hub",
    "evaluate": "saecompress.metrics",
    "harvest": "saecompress.lm",
    "ce_eval": "saecompress.lm",
    "finetune": "saecompress.finetune",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'saecompress' has no attribute {name!r}")


__all__ = [
    "MASK_ALGORITHM", "ExpanderSAE", "SaeCompressError", "SweepConfig", "TopKSAE", "TrainConfig", "convert",
    "convert_path", "expander_mask", "load", "load_compact", "read_compact_metadata", "save_compact",
    "sweep", "train", "__version__", *_LAZY,
]
