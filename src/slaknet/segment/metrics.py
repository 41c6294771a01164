"""Segmentation metrics from a confusion matrix: mIoU, pixel accuracy, per-class IoU (mmseg's definitions).

Pixels whose ground truth is the ignore index (255) are left out. A class that appears neither in the
ground truth nor in the prediction (union 0) has no IoU and is left out of the mean, as mmseg's
``nanmean``.
"""
from __future__ import annotations

from typing import Dict, List

import torch

__all__ = ["confusion_matrix", "scores"]


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """``[num_classes, num_classes]`` int64 counts; row = ground truth, column = prediction."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    idx = target[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def scores(cm: torch.Tensor) -> Dict[str, object]:
    """``miou`` and ``pixel_acc`` in percent, and ``iou`` per class (NaN where the class is absent)."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    valid = ~torch.isnan(iou)
    miou = float(iou[valid].mean()) * 100 if bool(valid.any()) else float("nan")
    total = float(cm.sum())
    acc = float(tp.sum()) / total * 100 if total > 0 else float("nan")
    per_class: List[float] = [float(v) * 100 for v in iou]
    return {"miou": miou, "pixel_acc": acc, "iou": per_class}
