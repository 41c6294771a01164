"""Loading a trained detector and running it: ``slaknet detect eval`` / ``predict`` and the demo's pictures.

Accepts the detection run's ``checkpoint-best.pth`` / ``checkpoint-last.pth`` (settings from the stored
config) and ``model.safetensors`` (settings from its metadata). The backbone architecture is read off
the weights (:func:`slaknet.detect.model.detector_from_state_dict`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from slaknet.detect.spec import resolve_options
from slaknet.errors import CheckpointError, ConfigError

__all__ = ["LoadedDetector", "load_detector", "predict_images", "draw_detections", "read_image", "save_png"]


@dataclass
class LoadedDetector:
    """A detector in eval mode with what its checkpoint says about it."""

    model: nn.Module
    classes: List[str]
    options: Dict[str, Any]
    config: Dict[str, Any] = field(default_factory=dict)

    @property
    def masks(self) -> bool:
        return self.options["detector"] == "mask_rcnn"


def _settings(path: str, obj: Any) -> Dict[str, Any]:
    if path.endswith(".safetensors"):
        from slaknet.checkpoints.sparse_format import read_safetensors_metadata

        meta = read_safetensors_metadata(path)
        if "detection_options" not in meta:
            raise CheckpointError(f"{path} is not a slaknet detector (no detection_options in its metadata)")
        cfg: Dict[str, Any] = {k: meta[k] for k in ("data", "model") if k in meta}
        cfg.update(task_options=json.loads(meta["detection_options"]), classes=json.loads(meta.get("classes", "[]")),
                   input_size=int(meta.get("input_size", 0)) or None,
                   mean=json.loads(meta["mean"]) if "mean" in meta else None,
                   std=json.loads(meta["std"]) if "std" in meta else None,
                   val_samples=int(meta["val_samples"]) if "val_samples" in meta else None,
                   data_seed=int(meta["data_seed"]) if "data_seed" in meta else 0)
        return cfg
    config = dict(obj.get("config") or {}) if isinstance(obj, dict) else {}
    if config.get("task") != "detection":
        raise CheckpointError(f"{path} is not a detection checkpoint (task {config.get('task')!r}); "
                              "train one with `slaknet detect train`")
    config["classes"] = list(obj.get("classes") or [])
    return config


def load_detector(path: str, use_ema: Optional[bool] = None, device: Any = "cpu") -> LoadedDetector:
    """Read ``path`` (checkpoint reader of :mod:`slaknet.checkpoints`), rebuild the detector, load strictly."""
    from slaknet.checkpoints.reader import extract_state_dict, read_checkpoint
    from slaknet.detect.model import detector_from_state_dict, set_test_size
    from slaknet.models.slak import IMAGENET_MEAN, IMAGENET_STD

    obj = read_checkpoint(path)
    cfg = _settings(os.fspath(path), obj)
    # the options as the run resolved them (detector auto settled from the data); the configured ones else
    opts = resolve_options(cfg.get("detection_options") or cfg.get("task_options"), int(cfg.get("input_size") or 800))
    if opts["detector"] == "auto":
        raise CheckpointError(f"{path} does not record which detector --detector auto chose")
    classes = list(cfg.get("classes") or [])
    if not classes:
        raise CheckpointError(f"{path} does not record its class names")
    sd = extract_state_dict(obj, use_ema=use_ema)
    model = detector_from_state_dict(sd, len(classes), opts, cfg.get("mean") or IMAGENET_MEAN,
                                     cfg.get("std") or IMAGENET_STD)
    set_test_size(model, int(opts["test_size"]))
    return LoadedDetector(model.to(device).eval(), classes, opts, cfg)


def read_image(path: str) -> torch.Tensor:
    """An RGB image file as a float tensor [3, H, W] in [0, 1] (one-line ConfigError when unreadable)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise ConfigError(f"image {path!r} does not exist") from None
    except Exception as exc:
        raise ConfigError(f"cannot read image {path!r}: {type(exc).__name__}: {exc}") from exc
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@torch.no_grad()
def predict_images(det: LoadedDetector, images: Sequence[torch.Tensor], score_thresh: float = 0.5,
                   device: Any = "cpu") -> List[Dict[str, Any]]:
    """Detections per image as plain JSON-able dicts (boxes xyxy in pixels, scores, labels, class names)."""
    outs = det.model([im.to(device) for im in images])
    result = []
    for o in outs:
        keep = o["scores"] >= score_thresh
        boxes, scores, labels = o["boxes"][keep].cpu(), o["scores"][keep].cpu(), o["labels"][keep].cpu()
        rec: Dict[str, Any] = {
            "boxes": [[round(float(v), 2) for v in b] for b in boxes], "scores": [round(float(s), 4) for s in scores],
            "labels": [int(v) for v in labels],
            "names": [det.classes[int(v) - 1] if 0 < int(v) <= len(det.classes) else str(int(v)) for v in labels]}
        if "masks" in o:
            rec["_masks"] = (o["masks"][keep][:, 0] > 0.5).cpu()
        result.append(rec)
    return result


def draw_detections(image: torch.Tensor, rec: Dict[str, Any], colour: str = "red", labels: bool = True) -> torch.Tensor:
    """``image`` (float [3, H, W] in [0, 1]) with the boxes (and masks, half-transparent) drawn, uint8; ``labels``:
    each box's class name and score written inside its top-left corner (PIL's default font, white on ``colour``)."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    im = (image.clamp(0, 1) * 255).to(torch.uint8)
    masks = rec.get("_masks")
    if masks is not None and len(masks):
        im = draw_segmentation_masks(im, masks, alpha=0.35, colors=colour)
    if rec["boxes"]:
        im = draw_bounding_boxes(im, torch.tensor(rec["boxes"]), colors=colour, width=1)
        if labels:
            im = _draw_labels(im, rec["boxes"], [f"{n} {s:.2f}" for n, s in zip(rec["names"], rec["scores"])], colour)
    return im


def _draw_labels(image: torch.Tensor, boxes: Sequence[Sequence[float]], texts: Sequence[str], colour: str) -> torch.Tensor:
    """``texts`` on filled ``colour`` tags at the boxes' top-left corners (lowest-scoring first, so the best is on top)."""
    from PIL import Image, ImageDraw, ImageFont

    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    draw, font = ImageDraw.Draw(pil), ImageFont.load_default()
    for box, text in reversed(list(zip(boxes, texts))):
        at = (int(box[0]) + 2, int(box[1]) + 1)
        left, top, right, bottom = draw.textbbox(at, text, font=font)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colour)
        draw.text(at, text, fill="white", font=font)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).contiguous()


def save_png(image: torch.Tensor, path: str) -> None:
    """Write a uint8 [3, H, W] tensor as PNG atomically (PIL; torchvision's image encoders are deprecated)."""
    from PIL import Image

    from slaknet.io import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(tmp, format="PNG")
