"""COCO-style box / mask AP through torchmetrics' ``MeanAveragePrecision`` (pycocotools backend).

Values are percentages (COCO's ``AP@[.50:.95]`` x 100, ``AP50``, ``AP75``); a set without any
ground-truth object gives -1 (pycocotools' "undefined"), never a made-up 0.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["DetectionMeter", "evaluate_detector", "predictions_to_cpu"]


class DetectionMeter:
    """Accumulates predictions and targets; :meth:`compute` returns ``map``, ``map50``, ``map75`` and,
    with masks, ``mask_map``, ``mask_map50`` (percent)."""

    def __init__(self, masks: bool) -> None:
        from slaknet.errors import import_optional

        import_optional("pycocotools", "dense", "COCO AP")
        MeanAveragePrecision = import_optional("torchmetrics.detection", "dense", "COCO AP").MeanAveragePrecision

        self.masks = bool(masks)
        iou = ("bbox", "segm") if self.masks else "bbox"
        self.metric = MeanAveragePrecision(box_format="xyxy", iou_type=iou, backend="pycocotools")

    def update(self, preds: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping[str, torch.Tensor]]) -> None:
        p_list, t_list = [], []
        for p, t in zip(preds, targets):
            pd = {"boxes": p["boxes"].float().cpu(), "scores": p["scores"].float().cpu(),
                  "labels": p["labels"].long().cpu()}
            td = {"boxes": t["boxes"].float().cpu(), "labels": t["labels"].long().cpu()}
            if "iscrowd" in t:
                td["iscrowd"] = t["iscrowd"].long().cpu()
            if self.masks:
                pm = p["masks"]
                pd["masks"] = (pm[:, 0] > 0.5 if pm.dim() == 4 else pm.bool()).cpu()
                td["masks"] = t["masks"].bool().cpu()
            p_list.append(pd)
            t_list.append(td)
        self.metric.update(p_list, t_list)

    def compute(self) -> Dict[str, float]:
        r = self.metric.compute()
        pre = ("bbox_", "segm_") if self.masks else ("", None)

        def pct(key: str) -> float:
            v = float(r[key])
            return v * 100.0 if v >= 0 else -1.0

        out = {"map": pct(pre[0] + "map"), "map50": pct(pre[0] + "map_50"), "map75": pct(pre[0] + "map_75")}
        if self.masks:
            out.update(mask_map=pct("segm_map"), mask_map50=pct("segm_map_50"))
        return out


def predictions_to_cpu(outputs: List[Dict[str, torch.Tensor]]) -> List[Dict[str, torch.Tensor]]:
    return [{k: v.detach().cpu() for k, v in o.items()} for o in outputs]


@torch.no_grad()
def evaluate_detector(model: nn.Module, dataset: Any, device: torch.device, batch_size: int = 8,
                      masks: Optional[bool] = None, progress: Any = None, limit: Optional[int] = None) -> Dict[str, float]:
    """Box (and mask) AP of ``model`` on ``dataset`` (items ``(image, target, ...)``), in eval mode."""
    was = model.training
    model.eval()
    if masks is None:
        masks = getattr(model, "roi_heads", None) is not None and getattr(model.roi_heads, "has_mask", lambda: False)()
    meter = DetectionMeter(bool(masks))
    n = len(dataset) if limit is None else min(limit, len(dataset))
    try:
        for i in range(0, n, batch_size):
            items = [dataset[j] for j in range(i, min(i + batch_size, n))]
            images = [it[0].to(device) for it in items]
            outs = predictions_to_cpu(model(images))
            meter.update(outs, [it[1] for it in items])
            if progress is not None:
                progress(len(items))
    finally:
        model.train(was)
    return meter.compute()
