"""Exceptions that mean "the user asked for something that cannot work", reported as one line by the CLI."""
from __future__ import annotations

from typing import Any


class SlaknetError(Exception):
    """Base class of slaknet's user-facing errors."""


class ConfigError(SlaknetError, ValueError):
    """An invalid argument or configuration value."""


class CheckpointError(SlaknetError, RuntimeError):
    """A checkpoint that cannot be read, or that does not fit the model it is loaded into."""


class MissingDependencyError(SlaknetError, ImportError):
    """An optional package a feature needs is not installed."""


def import_optional(module: str, extra: str, feature: str) -> Any:
    """``import module``, or a one-line :class:`MissingDependencyError` naming the pip extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(f"{feature} needs {module.split('.')[0]} ({exc}); install it with "
                                     f"pip install '.[{extra}]' in the slaknet clone") from None
