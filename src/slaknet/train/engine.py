"""``train(cfg)``: the entry point behind ``slaknet train`` (single process, or DDP under torchrun).

The loop and every run guarantee live in :class:`slaknet.train.trainer.Trainer`; what is trained comes
from a task of :mod:`slaknet.train.tasks` (``cfg.task``, classification by default). This module keeps
the names earlier code imported from here.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

from slaknet.models.training import fit_kernel_sizes
from slaknet.train.bn import recalibrate_bn
from slaknet.train.callbacks import LossCurve
from slaknet.train.machine import resolve_threads, seed_everything
from slaknet.train.optim import build_optimizer, build_scheduler
from slaknet.train.tasks.classification import build_datasets, eval_transform
from slaknet.train.trainer import Callback, NonFiniteLossError, Trainer

__all__ = ["train", "NonFiniteLossError", "build_datasets", "fit_kernel_sizes", "build_optimizer", "build_scheduler",
           "seed_everything", "recalibrate_bn", "eval_transform", "resolve_threads", "Trainer", "Callback",
           "LossCurve"]


def train(cfg: Any, callbacks: Sequence[Callback] = ()) -> Dict[str, Any]:
    """Run training as configured (a :class:`~slaknet.train.config.TrainConfig`); returns the summary.

    Writes checkpoints, logs, the final ``model.safetensors``, ``curves.png`` and ``summary.json`` to
    ``cfg.output_dir``. Raises :class:`NonFiniteLossError` on a NaN/inf loss and ``ConfigError`` /
    ``CheckpointError`` for bad settings.
    """
    if isinstance(cfg, Mapping):
        from slaknet.train.config import TrainConfig

        known = set(TrainConfig.field_names())
        cfg = TrainConfig(**{k: v for k, v in cfg.items() if k in known and v is not None})
    return Trainer(cfg, callbacks=callbacks).fit()
