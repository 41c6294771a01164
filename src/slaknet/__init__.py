"""slaknet: Sparse Large Kernel Networks (SLaK, ICLR 2023) as a library.

``import slaknet`` registers the SLaK family with timm, so ``timm.create_model("slak_tiny")`` works.
The one exception is the ``slaknet`` command itself: it skips that eager import (torch and timm take
seconds to load), so ``slaknet --help`` and argument errors are instant; each sub-command imports what
it runs. The public names below are then loaded on first access.
"""
from __future__ import annotations

import os
import sys
from typing import Any, List

__version__ = "0.1.0"

from slaknet.errors import CheckpointError, ConfigError, SlaknetError  # noqa: E402

_MODEL_NAMES = ("SLaK", "create_model", "list_models", "load_checkpoint", "reparameterize_model")
_TRAIN_NAMES = ("config", "fit")   # slaknet.config(task, recipe=..., **options) -> Config; slaknet.fit(cfg)

__all__ = ["__version__", *_MODEL_NAMES, *_TRAIN_NAMES, "SlaknetError", "ConfigError", "CheckpointError"]


def _started_as_command() -> bool:
    """True when this process is the ``slaknet`` console script or ``python -m slaknet``."""
    if os.path.basename(sys.argv[0] if sys.argv else "") == "slaknet":
        return True
    argv: List[str] = list(getattr(sys, "orig_argv", []))
    return any(a == "-m" and argv[i + 1:i + 2] == ["slaknet"] for i, a in enumerate(argv))


def __getattr__(name: str) -> Any:
    if name in _MODEL_NAMES:
        import slaknet.models as models

        return getattr(models, name)
    if name in _TRAIN_NAMES:
        import slaknet.train.api as api

        return getattr(api, name)
    raise AttributeError(f"module 'slaknet' has no attribute {name!r}")


if not _started_as_command():
    from slaknet.models import (SLaK, create_model, list_models, load_checkpoint,  # noqa: E402,F401
                                reparameterize_model)
