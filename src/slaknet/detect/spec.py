"""The ``detection`` task's declaration: its options (the ``task`` section of its configuration), recipes and
``--recipe auto``. Torch-free (``slaknet detect train --help`` is built from it).

Defaults are torchvision's Mask R-CNN defaults where torchvision has one; docs/detection.md lists every option.
The data are the built-in set, a COCO folder (``--data ROOT``) or COCO files named one by one
(``--train-annotations FILE --train-images DIR --val-annotations FILE --val-images DIR``); ``--recipe auto``
and ``--detector auto`` read the training annotations (:func:`inspect_annotations`).
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
from typing import Any, Dict, List, Mapping, Optional

from slaknet.errors import ConfigError
from slaknet.settings import setting
from slaknet.train.tasks import Recipe, TaskSpec, register_spec

__all__ = ["DetectionOptions", "DETECTORS", "SPEC", "BUILTIN_DETECTION", "resolve_options", "resolve_detector",
           "AnnotationInfo", "inspect_annotations", "train_annotation_file", "choose_recipe", "has_segmentation"]

DETECTORS = ("mask_rcnn", "faster_rcnn", "retinanet", "fcos")
BUILTIN_DETECTION = "builtin:contours"
# the longer-side cap follows the shorter side as in torchvision's (and MMDetection's) COCO default, 800 -> 1333
MAX_SIZE_RATIO = 1333 / 800
# --recipe auto: det_small for at most this many training images of at most this median shorter side
SMALL_IMAGES, SMALL_SIDE = 5000, 320
_INSPECT_BYTES = 64 << 20  # annotation files above this size are big data sets without reading them


@dataclasses.dataclass(frozen=True)
class DetectionOptions:
    """The detector, its sizes and its sampling."""

    detector: str = setting("auto", "torchvision detector: mask_rcnn (boxes + masks), faster_rcnn, retinanet, fcos; "
                                    "auto: mask_rcnn when the training annotations have masks, else faster_rcnn",
                            choices=("auto",) + DETECTORS)
    train_annotations: Optional[str] = setting(None, "COCO JSON of the training split (instead of --data ROOT's "
                                                     "annotations/instances_train*.json)", metavar="FILE")
    train_images: Optional[str] = setting(None, "folder of the training images (file_name in the JSON is relative to "
                                                "it)", metavar="DIR")
    val_annotations: Optional[str] = setting(None, "COCO JSON of the held-out split", metavar="FILE")
    val_images: Optional[str] = setting(None, "folder of the held-out images", metavar="DIR")
    backbone_checkpoint: Optional[str] = setting(None, "SLaK classification checkpoint (official or slaknet) for the "
                                                       "backbone", metavar="CKPT")
    train_sizes: Optional[List[int]] = setting(None, "shorter image sides sampled per training batch (default: from "
                                                     "--input-size and --multi-scale)", low=1, metavar="SIDE")
    multi_scale: float = setting(1.0, "lowest training shorter side as a fraction of --input-size (sides step 32 up "
                                      "to it; 1: one scale; coco 0.6 = 480-800 px)", low=0.0, high=1.0, low_open=True)
    test_size: Optional[int] = setting(None, "shorter image side at evaluation / prediction (default --input-size)",
                                       low=1)
    max_size: Optional[int] = setting(None, "cap on the longer image side (default: 1333/800 of the largest shorter "
                                            "side, 1333 at 800)", low=1)
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
        for ann, images in (("train_annotations", "train_images"), ("val_annotations", "val_images")):
            if (getattr(self, ann) is None) != (getattr(self, images) is None):
                raise ConfigError(f"--{ann.replace('_', '-')} FILE and --{images.replace('_', '-')} DIR go together")
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
        data, files = cfg.data.source, self.train_annotations or self.val_annotations
        if files and is_builtin(data):
            raise ConfigError(f"--train-annotations / --val-annotations name COCO files, but the data is {data} "
                              f"(recipe {cfg.recipe} or --data): name the training files (--train-annotations FILE "
                              "--train-images DIR) or a COCO folder (--data ROOT), without --recipe det_demo")
        if self.train_annotations:
            if data != self.train_annotations:
                raise ConfigError(f"--data {data} and --train-annotations {self.train_annotations} both name the "
                                  "training data; give one")
            if not self.val_annotations:
                raise ConfigError("--train-annotations needs the held-out split too: --val-annotations FILE "
                                  "--val-images DIR")
        if self.val_annotations and cfg.data.eval_data:
            raise ConfigError("--eval-data-path and --val-annotations both name the held-out data; give one")


def resolve_options(options: Any, input_size: int) -> Dict[str, Any]:
    """The detector's options as a plain dict, with the sizes that follow the input size filled in: training
    sides from ``multi_scale`` x input size up to it (step 32), the test side, and the longer-side cap
    (1333/800 of the largest side). ``options``: a :class:`DetectionOptions` or the mapping a checkpoint stored
    (validated here). ``detector`` may still be ``auto`` (:func:`resolve_detector` settles it from the data)."""
    from slaknet.settings import build_settings

    if not isinstance(options, DetectionOptions):
        options = build_settings(DetectionOptions, dict(options or {}), "detection options: ")
    opts = dataclasses.asdict(options)
    size = int(input_size)
    if opts["train_sizes"] is None:
        low = max(1, int(round(float(opts["multi_scale"]) * size)))
        opts["train_sizes"] = list(range(size, low - 1, -32))[::-1]
    if opts["test_size"] is None:
        opts["test_size"] = size
    if opts["max_size"] is None:
        opts["max_size"] = int(round(max(opts["train_sizes"] + [opts["test_size"]]) * MAX_SIZE_RATIO))
    return opts


def resolve_detector(detector: str, masks: bool, where: str) -> str:
    """The detector to build: ``auto`` is mask_rcnn when the training data ``where`` has masks, else faster_rcnn;
    mask_rcnn without masks is a one-line ConfigError (it would learn empty masks)."""
    if detector == "auto":
        return "mask_rcnn" if masks else "faster_rcnn"
    if detector == "mask_rcnn" and not masks:
        raise ConfigError(f"--detector mask_rcnn needs instance masks, but {where} has boxes only (annotations "
                          "without a segmentation); use --detector faster_rcnn (or auto)")
    return detector


def is_builtin(data: Optional[str]) -> bool:
    return data is None or data == "contours" or str(data).startswith("builtin:")


def has_segmentation(ann: Mapping[str, Any]) -> bool:
    """Whether a COCO annotation carries a mask: a non-empty polygon list or an RLE."""
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        return "counts" in seg
    return isinstance(seg, list) and any(len(p) >= 6 for p in seg if isinstance(p, list))


def train_annotation_file(data: Optional[str]) -> Optional[str]:
    """The training annotation JSON that ``data`` names: the file itself (``--train-annotations``) or a COCO
    folder's ``annotations/instances_train*.json``; None for built-in data or nothing found."""
    if is_builtin(data):
        return None
    if os.path.isfile(str(data)):
        return str(data)
    found = sorted(glob.glob(os.path.join(str(data), "annotations", "instances_train*.json")))
    return found[0] if found else None


@dataclasses.dataclass(frozen=True)
class AnnotationInfo:
    """What ``--recipe auto`` and ``--detector auto`` read off a training annotation file."""

    images: int
    annotations: int
    classes: int
    side: Optional[int]   # median shorter side of the images (their width / height entries)
    masks: bool           # every non-crowd annotation has a segmentation (and there is one)

    @property
    def small(self) -> bool:
        """A small data set of small images (det_small)."""
        return self.images <= SMALL_IMAGES and self.side is not None and self.side <= SMALL_SIDE

    def describe(self) -> str:
        side = f"~{self.side} px" if self.side else "unknown size"
        return f"{self.images} training images of {side}"


def inspect_annotations(path: Optional[str]) -> Optional[AnnotationInfo]:
    """Images, their median shorter side and whether there are masks, from a COCO JSON's ``images`` and
    ``annotations`` (the images are not opened). None for a missing, unreadable or very large file."""
    try:
        st = os.stat(str(path))
    except (OSError, TypeError):
        return None
    if st.st_size > _INSPECT_BYTES:
        return None
    return _inspect(os.path.abspath(str(path)), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _inspect(path: str, size: int, mtime: int) -> Optional[AnnotationInfo]:
    try:
        with open(path) as f:
            doc = json.load(f)
        images = [im for im in doc.get("images", []) if isinstance(im, dict)]
        anns = [a for a in doc.get("annotations", []) if isinstance(a, dict)]
    except (OSError, ValueError, AttributeError):
        return None
    sides = sorted(min(int(im["width"]), int(im["height"])) for im in images
                   if isinstance(im.get("width"), (int, float)) and isinstance(im.get("height"), (int, float)))
    solid = [a for a in anns if not a.get("iscrowd", 0)]
    masks = bool(solid) and all(has_segmentation(a) for a in solid)
    return AnnotationInfo(len(images), len(anns), len(doc.get("categories") or []),
                          sides[len(sides) // 2] if sides else None, masks)


def _given_data(given: Mapping[str, Any]) -> Optional[str]:
    """The data named by the options when ``--data`` is not: the training annotation file."""
    return given.get("train_annotations")


def choose_recipe(data: Optional[str], given: Mapping[str, Any] = {}) -> str:
    """``--recipe auto``: det_demo for the built-in data, det_small for a small data set of small images
    (:attr:`AnnotationInfo.small`, read off the training annotations), else the paper's coco."""
    if is_builtin(data):
        return "det_demo"
    info = inspect_annotations(train_annotation_file(data))
    return "det_small" if info is not None and info.small else "coco"


def recipe_reason(recipe: str, data: Optional[str]) -> str:
    """Why ``recipe`` fits ``data`` (the run header): the training images it was sized from or chosen for."""
    info = inspect_annotations(train_annotation_file(data))
    if info is None or is_builtin(data):
        return ""
    if recipe == "det_small":
        return f"det_small sized from {info.describe()} (a small data set of small images)"
    if recipe == "coco":
        return (f"coco for {info.describe()} (det_small is for <= {SMALL_IMAGES} images of <= {SMALL_SIDE} px)")
    return ""


def small_data_overrides(data: str) -> Dict[str, Any]:
    """Values of det_small that depend on the training annotations: input size near the images' own shorter
    side (multiple of 32, at least 64), batch and epochs from the number of images (~4000 images seen)."""
    info = inspect_annotations(train_annotation_file(data))
    if info is None:
        return {}
    out: Dict[str, Any] = {}
    if info.side:
        out["input_size"] = max(64, int(round(info.side / 32)) * 32)
    n = max(info.images, 1)
    out["batch_size"] = 8 if n >= 80 else 4 if n >= 40 else 2
    out["epochs"] = int(min(100, max(5, round(4000 / n))))
    return out


# FPN and heads of the CPU recipes (det_demo, det_small)
_SMALL_HEADS = dict(fpn_channels=64, anchor_sizes=[8, 16, 32, 64, 128], rpn_batch=64, roi_batch=64,
                    rpn_pre_nms_train=300, rpn_post_nms_train=100, rpn_pre_nms_test=300, rpn_post_nms_test=100,
                    box_head_size=128, mask_channels=64, mask_layers=2)

RECIPES = (
    # the CPU demo's settings (measured on 2 cores)
    Recipe("det_demo", "the CPU demo on the built-in contours set", dict(
        data=dict(data=BUILTIN_DETECTION, input_size=96, num_workers=0, train_samples=320, val_samples=100),
        model=dict(drop_path=0.0, fit_kernels=True),
        optim=dict(epochs=5, batch_size=8, lr=1e-3, warmup_epochs=0.5, clip_grad=5.0),
        run=dict(threads="auto"),
        task=dict(_SMALL_HEADS, detections=20))),
    # det_demo's model and heads for a small COCO data set of small images; sizes, batch, epochs from the data
    Recipe("det_small", "small COCO data sets of small images on a CPU, sized from the annotations", dict(
        data=dict(input_size=64, num_workers=0),
        model=dict(drop_path=0.0, fit_kernels=True),
        optim=dict(epochs=30, batch_size=4, lr=1e-3, warmup_epochs=0.5, clip_grad=5.0),
        run=dict(threads="auto"),
        task=dict(_SMALL_HEADS)), adapt=small_data_overrides),
    # ConvNeXt's mask_rcnn_convnext_tiny_patch4_window7_mstrain_480-800_adamw_3x_coco_in1k.py (which SLaK's
    # detection code follows): AdamW lr 1e-4, wd 0.05, 36 epochs (3x), batch 16 = 8 GPUs x 2, 500 warm-up
    # iterations, drop path 0.4 (SLaK-T), multi-scale shorter side 480-800 (step 32), longer side <= 1333
    Recipe("coco", "the paper's COCO Mask R-CNN fine-tuning", dict(
        data=dict(input_size=800, num_workers=4),
        model=dict(model="slak_tiny", drop_path=0.4, layer_scale_init_value=1.0),
        optim=dict(epochs=36, batch_size=2, lr=1e-4, weight_decay=0.05, warmup_steps=500),
        task=dict(multi_scale=0.6))),  # 480-800 step 32; test 800; longer side <= 1333
)

SPEC = register_spec(TaskSpec(
    name="detection", options=DetectionOptions, recipes=RECIPES, choose_recipe=choose_recipe,
    task_class="slaknet.detect.task:DetectionTask", command="slaknet detect train",
    eval_command="slaknet detect eval", predict_command="slaknet detect predict",
    default_data=BUILTIN_DETECTION, given_data=_given_data, sections=("data", "model", "optim", "run", "sparse"),
    description="object detection / instance masks: torchvision detectors on SLaK + FPN"))
