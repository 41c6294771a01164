"""One small registry of strategy classes per engine choice (growth, prune, redistribution, initialisation).

Each :class:`SparseConfig` option that picks a strategy (``growth``, ``prune``, ``redistribution``,
``sparse_init``) is backed by a :class:`Registry`: its names are the option's valid values, and the engine
builds a fresh instance of the named class, so neither the engine nor the trainer tests a strategy by name.
"""
from __future__ import annotations

from typing import Callable, Dict, Generic, List, Type, TypeVar

from slaknet.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> strategy class for one :class:`SparseConfig` option (``option``), in registration order.

    Args:
        option: the config field the names are valid values of (used in error messages).
        kind: what one entry is, for messages (e.g. ``"growth criterion"``).
    """

    def __init__(self, option: str, kind: str) -> None:
        self.option = option
        self.kind = kind
        self.entries: Dict[str, Type[T]] = {}

    def register(self, name: str, *, replace: bool = False) -> Callable[[Type[T]], Type[T]]:
        """Class decorator adding ``name`` (``ConfigError`` if taken, unless ``replace``)."""
        def add(cls: Type[T]) -> Type[T]:
            if name in self.entries and not replace:
                raise ConfigError(f"{self.kind} {name!r} is already registered (pass replace=True)")
            self.entries[name] = cls
            return cls
        return add

    def names(self) -> List[str]:
        """The registered names, built-ins first."""
        return list(self.entries)

    def create(self, name: str) -> T:
        """A fresh instance of the class registered as ``name`` (``ConfigError`` naming the valid ones)."""
        if name not in self.entries:
            raise ConfigError(f"{self.option} must be one of {tuple(self.entries)}, got {name!r}")
        return self.entries[name]()
