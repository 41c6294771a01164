"""Package namespaces that import their heavy modules (torch, timm) on first use.

A package's ``__init__`` lists ``{public name: defining module}``; the names resolve on first access, so
importing the package (e.g. for a sub-command's argument parser) costs nothing until they are used.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Tuple


def lazy_exports(package: str, exports: Dict[str, str]) -> Tuple[Callable[[str], Any], Callable[[], List[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: each name in ``exports`` is loaded from its module."""

    def __getattr__(name: str) -> Any:
        try:
            module = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        return getattr(importlib.import_module(module), name)

    def __dir__() -> List[str]:
        return sorted(exports)

    return __getattr__, __dir__
