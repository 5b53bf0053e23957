"""The installed version of saecompress."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("saecompress")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
