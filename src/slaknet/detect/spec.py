"""The ``detection`` task's declaration: its options (the ``task`` section of its configuration), recipes and
``--recipe auto``. Torch-free (``slaknet detect train --help`` is built from it).

Defaults are torchvision's Mask R-CNN defaults where torchvision has one; docs/detection.md lists every option.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Mapping, Optional

from slaknet.errors import ConfigError
from slaknet.settings import setting
from slaknet.train.tasks import Recipe, TaskSpec, register_spec

__all__ = ["DetectionOptions", "DETECTORS", "SPEC", "BUILTIN_DETECTION", "resolve_options"]

DETECTORS = ("mask_rcnn", "faster_rcnn", "retinanet", "fcos")
BUILTIN_DETECTION = "builtin:contours"


@dataclasses.dataclass(frozen=True)
class DetectionOptions:
    """The detector, its sizes and its sampling."""

    detector: str = setting("mask_rcnn", "torchvision detector: mask_rcnn (boxes + masks), faster_rcnn, retinanet, "
                                         "fcos", choices=DETECTORS)
    backbone_checkpoint: Optional[str] = setting(None, "SLaK classification checkpoint (official or slaknet) for the "
                                                       "backbone", metavar="CKPT")
    train_sizes: Optional[List[int]] = setting(None, "shorter image sides sampled per training batch (multi-scale; "
                                                     "default --input-size)", low=1, metavar="SIDE")
    test_size: Optional[int] = setting(None, "shorter image side at evaluation / prediction (default --input-size)",
                                       low=1)
    max_size: int = setting(1333, "cap on the longer image side", low=1)
    fpn_channels: int = setting(256, "FPN channels", low=1)
    anchor_sizes: List[int] = setting([32, 64, 128, 256, 512], "anchor side per FPN level (5 values: strides 4, 8, "
                                                               "16, 32, 64)", low=1)
    aspect_ratios: List[float] = setting([0.5, 1.0, 2.0], "anchor aspect ratios", low=0.0, low_open=True)
    rpn_batch: int = setting(256, "anchors sampled per image for the RPN loss", low=1)
    roi_batch: int = setting(512, "proposals sampled per image for the box / mask heads", low=1)
    rpn_pre_nms_train: int = setting(2000, "RPN proposals kept before NMS (training)", low=1)
    rpn_post_nms_train: int = setting(2000, "RPN proposals kept after NMS (training)", low=1)
    rpn_pre_nms_test: int = setting(1000, "RPN proposals kept before NMS (evaluation)", low=1)
    rpn_post_nms_test: int = setting(1000, "RPN proposals kept after NMS (evaluation)", low=1)
    box_head_size: int = setting(1024, "width of the box head's two-layer MLP", low=1)
    mask_channels: int = setting(256, "channels of the mask head's convs", low=1)
    mask_layers: int = setting(4, "convs in the mask head", low=1)
    score_thresh: float = setting(0.05, "minimum score of a returned detection", low=0.0, high=1.0)
    detections: int = setting(100, "detections kept per image", low=1)
    hflip: bool = setting(True, "random horizontal flips in training")
    eval_batch: int = setting(8, "images per evaluation batch", low=1)

    def check(self) -> None:
        if len(self.anchor_sizes) != 5:
            raise ConfigError(f"--anchor-sizes needs 5 values (FPN levels at strides 4-64), got {self.anchor_sizes}")
        if not self.aspect_ratios or (self.train_sizes is not None and not self.train_sizes):
            raise ConfigError("--aspect-ratios and --train-sizes need at least one value")
        if self.detector == "fcos" and self.fpn_channels % 32:
            raise ConfigError(f"fcos needs --fpn-channels divisible by 32 (its head uses GroupNorm(32)), "
                              f"got {self.fpn_channels}")

    def check_config(self, cfg: Any) -> None:
        if cfg.model.finetune:
            raise ConfigError("detection: give the backbone's classification checkpoint as --backbone-checkpoint, "
                              "not --finetune")


def resolve_options(options: Any, input_size: int) -> dict:
    """The detector's options as a plain dict, with the sizes that default to the input size filled in.
    ``options``: a :class:`DetectionOptions` or the mapping a checkpoint stored (validated here)."""
    from slaknet.settings import build_settings

    if not isinstance(options, DetectionOptions):
        options = build_settings(DetectionOptions, dict(options or {}), "detection options: ")
    opts = dataclasses.asdict(options)
    if opts["train_sizes"] is None:
        opts["train_sizes"] = [int(input_size)]
    if opts["test_size"] is None:
        opts["test_size"] = int(input_size)
    return opts


def choose_recipe(data: Optional[str], given: Mapping[str, Any] = {}) -> str:
    """``--recipe auto``: det_demo for the built-in data, else the paper's coco."""
    return "det_demo" if data in (None, BUILTIN_DETECTION, "contours") else "coco"


RECIPES = (
    # the CPU demo's settings (measured on 2 cores)
    Recipe("det_demo", "the CPU demo on the built-in contours set", dict(
        data=dict(data=BUILTIN_DETECTION, input_size=96, num_workers=0, train_samples=320, val_samples=100),
        model=dict(drop_path=0.0, fit_kernels=True),
        optim=dict(epochs=5, batch_size=8, lr=1e-3, warmup_epochs=0.5, clip_grad=5.0),
        run=dict(threads="auto"),
        task=dict(fpn_channels=64, anchor_sizes=[8, 16, 32, 64, 128], rpn_batch=64, roi_batch=64,
                  rpn_pre_nms_train=300, rpn_post_nms_train=100, rpn_pre_nms_test=300, rpn_post_nms_test=100,
                  box_head_size=128, mask_channels=64, mask_layers=2, detections=20, max_size=96))),
    # ConvNeXt's mask_rcnn_convnext_tiny_patch4_window7_mstrain_480-800_adamw_3x_coco_in1k.py (which SLaK's
    # detection code follows): AdamW lr 1e-4, wd 0.05, 36 epochs (3x), batch 16 = 8 GPUs x 2, 500 warm-up
    # iterations, drop path 0.4 (SLaK-T), multi-scale shorter side 480-800 (step 32), longer side <= 1333
    Recipe("coco", "the paper's COCO Mask R-CNN fine-tuning", dict(
        data=dict(input_size=800, num_workers=4),
        model=dict(model="slak_tiny", drop_path=0.4, layer_scale_init_value=1.0),
        optim=dict(epochs=36, batch_size=2, lr=1e-4, weight_decay=0.05, warmup_steps=500),
        task=dict(train_sizes=list(range(480, 801, 32)), test_size=800, max_size=1333))),
)

SPEC = register_spec(TaskSpec(
    name="detection", options=DetectionOptions, recipes=RECIPES, choose_recipe=choose_recipe,
    task_class="slaknet.detect.task:DetectionTask", command="slaknet detect train",
    eval_command="slaknet detect eval", predict_command="slaknet detect predict",
    default_data=BUILTIN_DETECTION, sections=("data", "model", "optim", "run", "sparse"),
    description="object detection / instance masks: torchvision detectors on SLaK + FPN"))
