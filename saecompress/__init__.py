"""saecompress: compress sparse autoencoders to Expander SAEs and ship them to production.

Every CLI command has a library function: ``convert`` / ``convert_path``, ``train``, ``sweep``, ``finetune``,
``evaluate``, ``harvest``, ``export_onnx``, ``push``, ``pull``, ``Monitor``; ``load`` resolves any
source (compact file, dense SAE folder in a known layout, ``hf://owner/repo[/hookpoint][@rev]``).
"""

import sys
import types
from importlib import import_module

from ._version import __version__
from .errors import SaeCompressError

# Imported on first use: most need torch (the runtime path, ``Monitor`` on an .onnx file, ``pull``, does not),
# the others onnx, onnxruntime, huggingface_hub or transformers.
_LAZY = {
    "load_compact": "saecompress.compact",
    "read_compact_metadata": "saecompress.compact_format",
    "save_compact": "saecompress.compact",
    "convert": "saecompress.convert",
    "convert_path": "saecompress.convert",
    "MASK_ALGORITHM": "saecompress.mask",
    "expander_mask": "saecompress.mask",
    "ExpanderSAE": "saecompress.models",
    "TopKSAE": "saecompress.models",
    "load": "saecompress.sources",
    "SweepConfig": "saecompress.sweep",
    "sweep": "saecompress.sweep",
    "TrainConfig": "saecompress.train",
    "train": "saecompress.train",
    "export_onnx": "saecompress.exporters.onnx",
    "Monitor": "saecompress.runtime",
    "push": "saecompress.hub",
    "pull": "saecompress.hub",
    "evaluate": "saecompress.metrics",
    "harvest": "saecompress.lm",
    "ce_eval": "saecompress.lm",
    "finetune": "saecompress.finetune",
}


# Functions that share their name with the submodule holding them: importing the submodule binds its name on
# the package, so these are answered before the package's own attributes.
_SHADOWED = ("convert", "sweep", "train")


class _Package(types.ModuleType):
    def __getattribute__(self, name: str):
        if name in _SHADOWED:
            return getattr(import_module(_LAZY[name]), name)
        return super().__getattribute__(name)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'saecompress' has no attribute {name!r}")


sys.modules[__name__].__class__ = _Package


__all__ = ["SaeCompressError", "__version__", *_LAZY]
