"""Optimizer and learning-rate schedule of the trainer (timm's, configured as in the SLaK recipe)."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn as nn

from slaknet.errors import ConfigError

__all__ = ["build_optimizer", "build_scheduler"]

log = logging.getLogger("slaknet.train")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, Mapping) or hasattr(cfg, "get") else getattr(cfg, key, default)


def build_optimizer(model: nn.Module, cfg: Any, lr: Any = None,
                    param_groups: Optional[List[Dict[str, Any]]] = None) -> torch.optim.Optimizer:
    """timm optimizer; weight decay skips 1-D parameters (norm weights, biases, layer scale ``gamma``).

    ``cfg``: a mapping or a :class:`~slaknet.train.config.Config`; ``lr`` overrides ``cfg``'s (the
    trainer passes the scaled one). ``param_groups``: explicit groups (e.g. layer-wise lr decay) instead of
    ``model``'s weight-decay groups. Adam / AdamW use torch's fused kernel unless ``fused_opt`` is false
    (or the kernel is missing): on CPU it is ~3x faster than the default for-loop implementation, and it
    lets the sparse engine hold pruned weights at zero through the optimizer state instead of a pass.
    """
    from timm.optim import create_optimizer_v2

    name = str(_get(cfg, "opt")).lower()
    lr = _get(cfg, "lr") if lr is None else lr
    kw: dict = dict(opt=_get(cfg, "opt"), lr=lr, weight_decay=_get(cfg, "weight_decay"))
    if name in ("sgd", "momentum", "nesterov", "rmsprop"):
        kw["momentum"] = _get(cfg, "momentum")
    elif _get(cfg, "opt_eps") is not None:
        kw["eps"] = _get(cfg, "opt_eps")
    fused = name in ("adam", "adamw") and bool(_get(cfg, "fused_opt", True))
    target: Any = model if param_groups is None else param_groups
    try:
        if fused:
            try:
                return create_optimizer_v2(target, fused=True, **kw)
            except (RuntimeError, ValueError, TypeError) as exc:  # no fused kernel in this torch / on this device
                log.info("fused %s not available (%s); using the default implementation", name, exc)
        return create_optimizer_v2(target, **kw)
    except (AssertionError, KeyError, ValueError) as exc:
        raise ConfigError(f"--opt {_get(cfg, 'opt')!r}: {exc}") from exc


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int, warmup: int) -> Any:
    """Per-step schedule: linear warm-up from ~0 to ``lr`` over ``warmup`` steps, then cosine to ``min_lr``."""
    from timm.scheduler import CosineLRScheduler

    lr, min_lr = _get(cfg, "lr"), _get(cfg, "min_lr")
    return CosineLRScheduler(optimizer, t_initial=max(total_steps - warmup, 1), lr_min=min_lr,
                             warmup_t=warmup, warmup_lr_init=min(1e-6, lr), warmup_prefix=True,
                             t_in_epochs=False)
