"""PEP 562 lazy exports for the packages whose modules are costly to import (torch, Triton)."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[list[str], Callable, Callable]:
    """(__all__, __getattr__, __dir__) for `package`, resolving `name` from `package.<exports[name]>`
    on first access, so that importing one module never imports the others."""
    names = sorted(exports)

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return names

    return names, __getattr__, __dir__
