"""Evaluation loop (top-1 / top-5 / loss / images per second), exact under torch.distributed."""
from __future__ import annotations

import time
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from slaknet.train.distributed import all_reduce_sum

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, autocast_dtype: Optional[torch.dtype] = None,
             channels_last: bool = False, progress: bool = False, desc: str = "eval") -> Dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 accuracy (%) over ``loader``, summed across ranks.

    Works with loaders whose sampler shards without padding (:class:`ShardSampler`), so every image is
    counted exactly once. Batches may be ``(x, y)`` or ``(x, y, bad_count)``.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64)  # loss sum, top1, top5, n, bad
    t0 = time.perf_counter()
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    for batch in it:
        x, y = batch[0], batch[1]
        if len(batch) > 2:
            totals[4] += float(batch[2].sum())
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(x)
        out = out.float()
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices
        hit = top.eq(y.view(-1, 1))
        totals[0] += float(F.cross_entropy(out, y, reduction="sum"))
        totals[1] += float(hit[:, :1].sum())
        totals[2] += float(hit.any(1).sum())
        totals[3] += y.numel()
    elapsed = time.perf_counter() - t0
    totals = all_reduce_sum(totals)
    model.train(was_training)
    n = max(float(totals[3]), 1.0)
    return {"loss": float(totals[0]) / n, "top1": 100.0 * float(totals[1]) / n, "top5": 100.0 * float(totals[2]) / n,
            "images": int(totals[3]), "bad_images": int(totals[4]), "seconds": elapsed,
            "images_per_s": float(totals[3]) / elapsed if elapsed > 0 else 0.0}
