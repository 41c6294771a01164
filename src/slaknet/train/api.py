"""The Python entry points behind every training command: :func:`config` and :func:`fit`.

``slaknet.config(task, recipe=..., **options)`` resolves exactly what the task's command resolves for the
same options (``options`` are the flag names with underscores); ``slaknet.fit(cfg)`` runs it and returns
the summary. The commands are thin skins over these two.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Sequence

from slaknet.train.config import Config, make_config

__all__ = ["config", "fit", "print_config"]


def config(task: str = "classification", recipe: str = "auto", config: Optional[str] = None,
           **options: Any) -> Config:
    """The validated configuration of a run of ``task`` (see :func:`slaknet.train.config.make_config`)."""
    return make_config(task, recipe, config, **options)


def fit(cfg: Config, callbacks: Sequence[Any] = ()) -> Dict[str, Any]:
    """Train as configured; returns the summary (also written to ``OUTPUT/summary.json``).

    Raises :class:`~slaknet.train.trainer.NonFiniteLossError` on a NaN/inf loss and ``ConfigError`` /
    ``CheckpointError`` (one line) for settings or files that cannot work.
    """
    from slaknet.train.distributed import cleanup
    from slaknet.train.tasks import get_task_class
    from slaknet.train.trainer import Trainer

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    task_cls = get_task_class(cfg.task_name)
    callbacks = list(callbacks) + list(getattr(task_cls, "default_callbacks", lambda: [])())
    try:
        return Trainer(cfg, callbacks=callbacks).fit()
    finally:
        cleanup()


def print_config(cfg: Config) -> int:
    """``--print-config``: the resolved configuration as YAML (what ``--config`` reads back)."""
    import yaml

    print(yaml.safe_dump(cfg.as_dict(), sort_keys=False), end="")
    return 0
