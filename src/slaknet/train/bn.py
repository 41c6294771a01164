"""Precise BatchNorm: running statistics recomputed over training batches before evaluation."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

__all__ = ["recalibrate_bn"]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, dataset: Any, batches: int, batch_size: int, device: torch.device,
                   autocast_dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> int:
    """Recompute BatchNorm running statistics as the plain average over ``batches`` training batches.

    BatchNorm's running averages (momentum 0.1) lag behind weights that still change quickly, which on
    short runs can put evaluation near chance while the same weights with batch statistics are right
    ("precise BN"). Uses the first ``batches * batch_size`` training images in a fixed order (identical on
    every rank; whole batches only); training itself never reads running statistics, so the training
    trajectory is unchanged.
    Returns the number of images used.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    n = min(len(dataset), int(batches) * int(batch_size)) if batches > 0 else 0
    if n > batch_size:
        n -= n % batch_size  # whole batches only: a last batch of one image has no batch statistics
    if not bns or n < 2:
        return 0
    momenta = [b.momentum for b in bns]
    for b in bns:
        b.reset_running_stats()
        b.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    try:
        for start in range(0, n, batch_size):
            idx = list(range(start, min(start + batch_size, n)))
            items = dataset.__getitems__(idx) if callable(getattr(dataset, "__getitems__", None)) \
                else [dataset[i] for i in idx]  # a batch at once where the dataset can (same values)
            xb = torch.stack([it[0] for it in items]).to(device)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                model(xb)
    finally:
        for b, mom in zip(bns, momenta):
            b.momentum = mom
        model.train(was_training)
    return n
