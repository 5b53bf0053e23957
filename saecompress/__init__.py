"""saecompress: compress sparse autoencoders to Expander SAEs and ship them to production."""

from importlib.metadata import PackageNotFoundError, version

from .compact import load_compact, read_compact_metadata, save_compact
from .errors import SaeCompressError
from .mask import MASK_ALGORITHM, expander_mask
from .models import ExpanderSAE, TopKSAE
from .sources import load

try:
    __version__ = version("saecompress")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "MASK_ALGORITHM", "ExpanderSAE", "SaeCompressError", "TopKSAE", "expander_mask", "load",
    "load_compact", "read_compact_metadata", "save_compact", "__version__",
]
