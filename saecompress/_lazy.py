"""Package attributes loaded on first use, so that importing a package imports none of its heavy parts (torch)."""

from __future__ import annotations

import sys
import types
from importlib import import_module


def lazy_package(name: str, attributes: dict[str, str], shadowed: tuple[str, ...] = ()) -> None:
    """Make the package ``name`` answer each of ``attributes`` (attribute -> module holding it) by importing that
    module on first use. ``shadowed``: attributes named like the submodule holding them (importing a submodule
    binds its name on the package), answered before the package's own attributes."""
    package = sys.modules[name]

    class Package(types.ModuleType):
        def __getattribute__(self, attr: str):
            if attr in shadowed:
                return getattr(import_module(attributes[attr]), attr)
            return super().__getattribute__(attr)

        def __getattr__(self, attr: str):
            if attr in attributes:
                return getattr(import_module(attributes[attr]), attr)
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")

    package.__class__ = Package
