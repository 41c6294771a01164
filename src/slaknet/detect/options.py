"""The detection task's settings (``TrainConfig.task_options``): defaults, validation, documentation.

Torch-free (the command's ``--help`` and the recipes read it). Defaults are torchvision's Mask R-CNN
defaults where torchvision has one; docs/detection.md lists every key.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from slaknet.errors import ConfigError

__all__ = ["DETECTORS", "DEFAULT_OPTIONS", "OPTION_HELP", "resolve_options", "parse_option"]

DETECTORS = ("mask_rcnn", "faster_rcnn", "retinanet", "fcos")

DEFAULT_OPTIONS: Dict[str, Any] = {
    "detector": "mask_rcnn",          # mask_rcnn | faster_rcnn | retinanet | fcos
    "train_sizes": None,              # shorter sides sampled per batch in training (None: [input_size])
    "test_size": None,                # shorter side at evaluation (None: input_size)
    "max_size": 1333,                 # longer side cap (torchvision / MMDetection default)
    "fpn_channels": 256,
    "anchor_sizes": [32, 64, 128, 256, 512],  # one per FPN level (torchvision's default)
    "aspect_ratios": [0.5, 1.0, 2.0],
    "rpn_batch": 256, "roi_batch": 512,
    "rpn_pre_nms_train": 2000, "rpn_post_nms_train": 2000, "rpn_pre_nms_test": 1000, "rpn_post_nms_test": 1000,
    "box_head_size": 1024, "mask_channels": 256, "mask_layers": 4,
    "score_thresh": 0.05, "detections": 100,
    "hflip": True,                    # random horizontal flips in training
    "backbone_checkpoint": None,      # SLaK classification checkpoint to start the backbone from
    "eval_batch": 8,
}

OPTION_HELP: Dict[str, str] = {
    "detector": "torchvision detector: mask_rcnn (boxes + masks), faster_rcnn, retinanet, fcos",
    "train_sizes": "shorter image sides sampled per training batch (multi-scale), e.g. 480,512,...,800",
    "test_size": "shorter image side at evaluation / prediction (default --input-size)",
    "max_size": "cap on the longer image side",
    "fpn_channels": "FPN channels",
    "anchor_sizes": "anchor side per FPN level (5 values: strides 4, 8, 16, 32, 64)",
    "aspect_ratios": "anchor aspect ratios",
    "rpn_batch": "anchors sampled per image for the RPN loss",
    "roi_batch": "proposals sampled per image for the box / mask heads",
    "rpn_pre_nms_train": "RPN proposals kept before NMS (training)",
    "rpn_post_nms_train": "RPN proposals kept after NMS (training)",
    "rpn_pre_nms_test": "RPN proposals kept before NMS (evaluation)",
    "rpn_post_nms_test": "RPN proposals kept after NMS (evaluation)",
    "box_head_size": "width of the box head's two-layer MLP",
    "mask_channels": "channels of the mask head's convs",
    "mask_layers": "convs in the mask head",
    "score_thresh": "minimum score of a returned detection",
    "detections": "detections kept per image",
    "hflip": "random horizontal flips in training",
    "backbone_checkpoint": "SLaK classification checkpoint (official or slaknet) for the backbone",
    "eval_batch": "images per evaluation batch",
}

_INTS = ("max_size", "fpn_channels", "rpn_batch", "roi_batch", "rpn_pre_nms_train", "rpn_post_nms_train",
         "rpn_pre_nms_test", "rpn_post_nms_test", "box_head_size", "mask_channels", "mask_layers", "detections",
         "eval_batch")
_LISTS = {"train_sizes": int, "anchor_sizes": int, "aspect_ratios": float}


def parse_option(text: str) -> Dict[str, Any]:
    """``KEY=VALUE`` from the command line (lists comma-separated; ``none`` = None) as a one-key dict."""
    if "=" not in text:
        raise ConfigError(f"--task-option expects KEY=VALUE, got {text!r}")
    key, value = (s.strip() for s in text.split("=", 1))
    if key not in DEFAULT_OPTIONS:
        raise ConfigError(f"unknown detection option {key!r}; known: {', '.join(DEFAULT_OPTIONS)}")
    v: Any = value
    if value.lower() in ("none", "null", ""):
        v = None
    elif key in _LISTS:
        v = [_LISTS[key](s) for s in value.replace(" ", "").split(",") if s]
    elif key in _INTS or key == "test_size":
        v = int(value)
    elif key == "score_thresh":
        v = float(value)
    elif key == "hflip":
        v = value.lower() in ("1", "true", "yes", "on")
    return {key: v}


def resolve_options(given: Optional[Mapping[str, Any]], input_size: int) -> Dict[str, Any]:
    """Defaults completed by ``given``, sizes filled from ``input_size``, validated (one-line ConfigErrors)."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown detection option(s) {', '.join(unknown)}; known: {', '.join(DEFAULT_OPTIONS)}")
    opts = dict(DEFAULT_OPTIONS)
    opts.update({k: v for k, v in given.items() if v is not None or k in ("backbone_checkpoint",)})
    if opts["train_sizes"] is None:
        opts["train_sizes"] = [int(input_size)]
    if opts["test_size"] is None:
        opts["test_size"] = int(input_size)
    if opts["detector"] not in DETECTORS:
        raise ConfigError(f"unknown detector {opts['detector']!r}; available: {', '.join(DETECTORS)}")
    for k in _INTS:
        if int(opts[k]) < 1:
            raise ConfigError(f"detection option {k} must be >= 1, got {opts[k]}")
    for k in _LISTS:
        if not opts[k] or any(float(v) <= 0 for v in opts[k]):
            raise ConfigError(f"detection option {k} must be a non-empty list of positive numbers, got {opts[k]}")
    if opts["detector"] == "fcos" and int(opts["fpn_channels"]) % 32:
        raise ConfigError(f"fcos needs fpn_channels divisible by 32 (its head uses GroupNorm(32)), "
                          f"got {opts['fpn_channels']}")
    if len(opts["anchor_sizes"]) != 5:
        raise ConfigError(f"detection option anchor_sizes needs 5 values (FPN levels at strides 4-64), "
                          f"got {opts['anchor_sizes']}")
    return opts
