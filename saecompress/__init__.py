"""saecompress: compress sparse autoencoders to Expander SAEs and ship them to production.

Every CLI command has a library function: ``convert`` / ``convert_path``, ``train``, ``sweep``, ``finetune``,
``evaluate``, ``harvest``, ``export_onnx``, ``push``, ``pull``, ``Monitor``; ``load`` resolves any
source (compact file, dense SAE folder in a known layout, ``hf://owner/repo[/hookpoint][@rev]``).
"""

from ._lazy import lazy_package
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


lazy_package(__name__, _LAZY, shadowed=("convert", "sweep", "train"))  # functions named like their submodules

__all__ = ["SaeCompressError", "__version__", *_LAZY]
