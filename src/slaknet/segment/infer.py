"""Inference with a trained segmentation model: reading its checkpoint, whole / sliding-window prediction,
colourised masks and image | ground truth | prediction pictures.

A segmentation checkpoint (``checkpoint-best.pth``, ``checkpoint-last.pth`` or ``model.safetensors`` of a
``slaknet segment train`` run) records how to rebuild its network (``seg_model``: encoder variant and
kernels, smp architecture, decoder width, auxiliary head, classes) beside the weights.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from slaknet.errors import CheckpointError

__all__ = ["build_from_spec", "load_segmentation_checkpoint", "slide_logits", "predict_logits", "colorize",
           "side_by_side", "palette", "confusion_over", "image_tensor", "save_png", "export_segmentation"]


def build_from_spec(spec: Dict[str, Any]) -> nn.Module:
    """The :class:`~slaknet.segment.model.SegmentationNet` a ``seg_model`` record describes (random weights)."""
    from slaknet.segment.model import build_segmentation_model

    enc = dict(spec.get("encoder", {}))
    if "kernel_size" in enc:
        enc["kernel_size"] = tuple(enc["kernel_size"])
    enc["drop_path_rate"] = 0.0
    return build_segmentation_model(spec["model"], int(spec["num_classes"]), spec.get("arch", "upernet"),
                                    int(spec.get("decoder_channels", 512)), float(spec.get("aux_weight", 0.4)),
                                    int(spec.get("aux_channels", 256)), enc)


def load_segmentation_checkpoint(path: str, use_ema: Optional[bool] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """``(network in eval mode, spec)``; the spec has ``classes``, ``mean``, ``std``, ``crop``, ``stride``,
    ``data``. One-line CheckpointErrors for other files and for weights that do not fit."""
    from slaknet.checkpoints import extract_state_dict, read_checkpoint, read_safetensors_metadata

    obj = read_checkpoint(path)
    if path.endswith(".safetensors"):
        meta = read_safetensors_metadata(path)
        if "seg_model" not in meta:
            raise CheckpointError(f"{path} is not a slaknet segmentation model (no seg_model metadata); "
                                  "train one with `slaknet segment train`")
        spec, sd = json.loads(meta["seg_model"]), obj
    else:
        cfg = obj.get("config", {}) if isinstance(obj, dict) else {}
        if "seg_model" not in cfg:
            raise CheckpointError(f"{path} is not a slaknet segmentation checkpoint (no seg_model record); "
                                  "train one with `slaknet segment train`")
        spec = dict(cfg["seg_model"])
        spec.setdefault("data", cfg.get("data"))
        spec.setdefault("val_samples", cfg.get("val_samples"))
        spec.setdefault("data_seed", cfg.get("data_seed"))
        sd = extract_state_dict(obj, use_ema=use_ema)  # raw weights unless EMA is asked for (or the only ones)
    net = build_from_spec(spec)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not fit this model: {str(exc).splitlines()[0]}") from exc
    return net.eval(), spec


def _starts(size: int, crop: int, stride: int) -> List[int]:
    """Window origins along one axis (mmseg's slide_inference grid: the last window ends at the border)."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride, size - crop), 0) for i in range(n)})


@torch.no_grad()
def slide_logits(net: nn.Module, x: torch.Tensor, num_classes: int, crop: int, stride: int) -> torch.Tensor:
    """Logits of ``x`` [N, 3, H, W] from ``crop`` x ``crop`` windows ``stride`` apart, averaged where they
    overlap (windows at the border are shifted inside; smaller images run whole)."""
    n, _, h, w = x.shape
    out = torch.zeros(n, num_classes, h, w, dtype=torch.float32, device=x.device)
    count = torch.zeros(1, 1, h, w, dtype=torch.float32, device=x.device)
    for top in _starts(h, crop, stride):
        for left in _starts(w, crop, stride):
            win = x[..., top:top + crop, left:left + crop]
            out[..., top:top + crop, left:left + crop] += net(win).float()
            count[..., top:top + crop, left:left + crop] += 1
    return out / count


@torch.no_grad()
def predict_logits(net: nn.Module, x: torch.Tensor, num_classes: int, crop: Optional[int] = None,
                   stride: Optional[int] = None) -> torch.Tensor:
    """Whole-image logits, or sliding-window ones when ``crop`` is set and the image is larger than it."""
    if crop and (x.shape[-2] > crop or x.shape[-1] > crop):
        return slide_logits(net, x, num_classes, int(crop), int(stride or max(1, math.ceil(crop * 2 / 3))))
    return net(x).float()


@torch.no_grad()
def confusion_over(net: nn.Module, batches: Iterable[Sequence[torch.Tensor]], num_classes: int, device: torch.device,
                   crop: Optional[int] = None, stride: Optional[int] = None,
                   autocast: Optional[torch.dtype] = None,
                   skipped: Optional[set] = None) -> Tuple[torch.Tensor, float, float, int]:
    """``(confusion matrix, summed pixel cross-entropy, valid pixels, bad pairs met)`` of ``net`` (eval mode for
    the call) over ``(x, y[, bad count, first bad index])`` batches. Empty items (a bad pair of a folder that
    substitutes none) are skipped; their indices go to ``skipped``."""
    from slaknet.segment.data import IGNORE_INDEX
    from slaknet.segment.metrics import confusion_matrix

    was = net.training
    net.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, n_pix, bad = 0.0, 0.0, 0
    try:
        for batch in batches:
            if len(batch) > 2:
                bad += int(batch[2].sum())
                if skipped is not None and len(batch) > 3:
                    skipped.update(int(i) for i in batch[3].tolist() if int(i) >= 0)
            if batch[0].numel() == 0:
                continue
            x, y = batch[0].to(device), batch[1].to(device)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                logits = predict_logits(net, x, num_classes, crop, stride).float()
            loss_sum += float(F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum"))
            n_pix += float((y != IGNORE_INDEX).sum())
            cm += confusion_matrix(logits.argmax(1), y, num_classes)
    finally:
        net.train(was)
    return cm, loss_sum, n_pix, bad


def palette(num_classes: int) -> np.ndarray:
    """``[num_classes + 1, 3]`` uint8 colours (the last one, black, for ignored pixels); fixed for a count."""
    base = np.array([[30, 60, 140], [250, 200, 40], [200, 50, 50], [60, 170, 90], [150, 80, 200],
                     [240, 120, 30], [40, 190, 200], [230, 110, 180]], np.uint8)
    if num_classes > len(base):
        extra = np.random.default_rng(1234).integers(40, 256, (num_classes - len(base), 3)).astype(np.uint8)
        base = np.concatenate([base, extra])
    return np.concatenate([base[:num_classes], np.zeros((1, 3), np.uint8)])


def colorize(mask: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """HxW class indices -> HxWx3 uint8 colours (ignored / out-of-range pixels black)."""
    pal = palette(num_classes)
    m = np.asarray(mask).astype(np.int64)
    m = np.where((m < 0) | (m >= num_classes) | (m == ignore_index), num_classes, m)
    return pal[m]


def side_by_side(image: np.ndarray, pred_rgb: np.ndarray, gt_rgb: Optional[np.ndarray] = None,
                 gap: int = 4) -> np.ndarray:
    """``image | ground truth | prediction`` (or ``image | prediction``) with white gaps, HxWx3 uint8."""
    parts: Sequence[np.ndarray] = [image] + ([gt_rgb] if gt_rgb is not None else []) + [pred_rgb]
    h = max(p.shape[0] for p in parts)
    sep = np.full((h, gap, 3), 255, np.uint8)
    row: List[np.ndarray] = []
    for i, p in enumerate(parts):
        if p.shape[0] < h:
            p = np.concatenate([p, np.full((h - p.shape[0], p.shape[1], 3), 255, np.uint8)])
        row += ([sep] if i else []) + [p]
    return np.concatenate(row, axis=1)


def image_tensor(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """HxWx3 uint8 -> normalised [1, 3, H, W] float tensor."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((x - m) / s)[None]


def save_png(array: np.ndarray, path: str) -> None:
    """Write an HxW or HxWx3 uint8 array as PNG (parent folders created)."""
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(array).save(path)


def export_segmentation(checkpoint: str, path: str, fmt: str = "onnx", input_size: Optional[Sequence[int]] = None,
                        reparameterize: str = "strips", tolerance: float = 1e-4) -> Any:
    """Export a segmentation checkpoint with :func:`slaknet.deploy.export_model` (reparameterized, verified
    against eager). The spatial size is fixed (default: the training crop / input size; the batch stays
    dynamic): the PSP module's adaptive pooling to 1/2/3/6 cells is not shape-generic in ONNX."""
    from slaknet.deploy.export import export_model

    net, spec = load_segmentation_checkpoint(checkpoint)
    side = int(spec.get("crop") or spec.get("input_size") or 512)
    h, w = (int(v) for v in input_size) if input_size else (side, side)
    meta = {"task": "segmentation", "classes": list(spec.get("classes") or []), "mean": list(spec["mean"]),
            "std": list(spec["std"])}
    return export_model(net, path, fmt, reparameterize=reparameterize, input_size=(3, h, w), dynamic_spatial=False,
                        tolerance=tolerance, metadata=meta)
