"""Hugging Face Hub support: ``push`` compact SAEs with a model card, ``pull`` them, and ``hf://`` sources.

Uses ``huggingface_hub`` (endpoint, token, cache and offline mode as it reads them:
``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``; ``endpoint=``/``token=``
override). Uploads use Xet when the Hub offers it and plain Git LFS otherwise
(or with ``HF_HUB_DISABLE_XET=1``). Failures raise ``SaeCompressError`` with one line.
"""

from .._lazy import lazy_package
from .layout import COMPACT_NAME, ONNX_NAME
from .pull import pull, resolve_hf_source
from .uri import HfUri, parse_hf_uri

# push exports ONNX graphs (torch); pull and hf:// sources do not. push is named like its submodule.
lazy_package(__name__, {"push": "saecompress.hub.push", "PushResult": "saecompress.hub.push"}, shadowed=("push",))


__all__ = ["COMPACT_NAME", "ONNX_NAME", "HfUri", "PushResult", "parse_hf_uri", "pull", "push", "resolve_hf_source"]
