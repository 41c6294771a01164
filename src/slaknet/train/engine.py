"""``train(cfg)``: run a resolved configuration (single process, or DDP under torchrun).

The loop and every run guarantee live in :class:`slaknet.train.trainer.Trainer`; what is trained comes
from the task named by the configuration. The Python API is :func:`slaknet.config` + :func:`slaknet.fit`;
this module keeps the names earlier code imported from here.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

from slaknet.models.training import fit_kernel_sizes
from slaknet.train.bn import recalibrate_bn
from slaknet.train.callbacks import LossCurve
from slaknet.train.machine import resolve_threads, seed_everything
from slaknet.train.optim import build_optimizer, build_scheduler
from slaknet.train.trainer import Callback, NonFiniteLossError, Trainer

__all__ = ["train", "NonFiniteLossError", "fit_kernel_sizes", "build_optimizer", "build_scheduler",
           "seed_everything", "recalibrate_bn", "resolve_threads", "Trainer", "Callback", "LossCurve"]


def train(cfg: Any, callbacks: Sequence[Callback] = ()) -> Dict[str, Any]:
    """Run training as configured (a :class:`~slaknet.train.config.Config`); returns the summary.

    Writes checkpoints, logs, the final ``model.safetensors``, ``curves.png`` and ``summary.json`` to the
    run's output folder. Raises :class:`NonFiniteLossError` on a NaN/inf loss and ``ConfigError`` /
    ``CheckpointError`` for bad settings.
    """
    from slaknet.train.api import fit

    return fit(cfg, callbacks)
