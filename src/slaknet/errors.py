"""Exceptions that mean "the user asked for something that cannot work", reported as one line by the CLI."""
from __future__ import annotations


class SlaknetError(Exception):
    """Base class of slaknet's user-facing errors."""


class ConfigError(SlaknetError, ValueError):
    """An invalid argument or configuration value."""


class CheckpointError(SlaknetError, RuntimeError):
    """A checkpoint that cannot be read, or that does not fit the model it is loaded into."""
