"""Recipes: defaults for every ``slaknet train`` option the user leaves unset, and ``--recipe auto``.

* ``demo``: the built-in CPU demo (small SLaK, dynamic sparsity, flips/rotations, no mixup, no EMA).
* ``small``: a small image folder (chosen by ``auto`` for anything that is not a big folder of big
  images): input near the images' own size, tens of epochs, light augmentation, sparsity on as in the
  demo, data workers within the machine's cores.
* ``imagenet``: the ConvNeXt / SLaK ImageNet recipe (AdamW lr 4e-3 at effective batch 4096, scaled
  linearly, 20 warm-up epochs, label smoothing 0.1, mixup 0.8 / cutmix 1.0, RandAugment, random erasing
  0.25, EMA 0.9999, drop path per model size).
* ``slak_t`` / ``slak_s`` / ``slak_b``: the paper's SLaK-T/S/B ImageNet-1K commands (official README),
  see docs/training.md for their sources and the effective-batch arithmetic.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional

__all__ = ["RECIPES", "FolderInfo", "inspect_folder", "choose_recipe", "small_data_overrides", "cpu_cores"]

_COMMON: Dict[str, Any] = dict(
    model="slak_pico", task="classification", opt="adamw", fused_opt=True, opt_eps=1e-8, momentum=0.9,
    min_lr=1e-6, weight_decay=0.05, seed=0, update_freq=1, clip_grad=None, layer_scale_init_value=1e-6,
    head_init_scale=1.0, precision="fp32", channels_last=False, save_ckpt_freq=0, ckpt_every_steps=0,
    eval_every=1, sync_bn=False, auto_resume=False, overwrite=False, tensorboard=True, model_ema_decay=0.9999,
    model_ema_eval=False, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch", remode="pixel",
    recount=1, color_jitter=0.4, train_interpolation="bicubic", crop_pct=None, pin_mem=True, sparsity=0.4,
    update_frequency=100, data_seed=0, difficulty=0.5, train_samples=6000, val_samples=1000,
    sparse_init="ERK", erk_power_scale=1.0, prune_rate=0.3, prune_rate_final=0.005, growth="random",
    redistribution="none", fix=False, sparse_layers="all", sparse_optimizer_state="zero",
    sparse_masking="auto", decompose=None, threads=None,
)
_IMAGENET: Dict[str, Any] = dict(
    _COMMON, input_size=224, epochs=300, batch_size=128, lr=None, warmup_epochs=20, smoothing=0.1, mixup=0.8,
    cutmix=1.0, aa="rand-m9-mstd0.5-inc1", reprob=0.25, model_ema=True, drop_path=None, num_workers=8,
    sparse=False, fit_kernels=False, bn_recalibrate=0,
)


def _paper(model: str, u: int, prune_rate: float, drop_path: float, batch: int) -> Dict[str, Any]:
    """One of the paper's ImageNet commands (300 epochs, lr 4e-3, 51-49-47-13 with N=5, 1.3x width)."""
    return dict(_IMAGENET, model=model, sparse=True, width_factor=1.3, update_frequency=u, sparsity=0.4,
                sparse_init="snip", prune_rate=prune_rate, growth="random", drop_path=drop_path,
                batch_size=batch, update_freq=8, lr=4e-3, model_ema=True, model_ema_eval=True,
                kernel_size=[51, 49, 47, 13, 5], decompose=True, epochs=300)


RECIPES: Dict[str, Dict[str, Any]] = {
    "demo": dict(_COMMON, data="builtin:insideness", input_size=64, epochs=6, batch_size=64, lr=2e-3,
                 warmup_epochs=0.5, smoothing=0.0, mixup=0.0, cutmix=0.0, aa="none", reprob=0.0,
                 model_ema=False, drop_path=0.0, num_workers=0, sparse=True, update_frequency=25,
                 fit_kernels=True, threads="auto", bn_recalibrate=16),
    "small": dict(_COMMON, input_size=64, epochs=30, batch_size=64, lr=2e-3, warmup_epochs=1, smoothing=0.1,
                  mixup=0.0, cutmix=0.0, aa="none", reprob=0.0, color_jitter=0.0, model_ema=False, drop_path=0.0,
                  num_workers=2, sparse=True, update_frequency=25, fit_kernels=True, threads="auto",
                  bn_recalibrate=16),
    "imagenet": _IMAGENET,
    # official SLaK README: GPUs x batch x update_freq = 4 x 128 x 8, 8 x 64 x 8, 16 x 32 x 8 (all 4096)
    "slak_t": _paper("slak_tiny", u=2000, prune_rate=0.5, drop_path=0.1, batch=128),
    "slak_s": _paper("slak_small", u=100, prune_rate=0.3, drop_path=0.4, batch=64),
    "slak_b": _paper("slak_base", u=100, prune_rate=0.3, drop_path=0.5, batch=32),
    # segmentation (slaknet segment; docs/segmentation.md): the CPU demo on the built-in contours set, and
    # the paper's ADE20K UperNet recipe (official SLaK mmseg config; batch 16 = 4 per GPU x 4 GPUs there)
    "seg_demo": dict(_COMMON, task="segmentation", data="builtin:contours", input_size=64, epochs=6, batch_size=16,
                     lr=2e-3, warmup_epochs=0.5, smoothing=0.0, mixup=0.0, cutmix=0.0, aa="none", reprob=0.0,
                     model_ema=False, drop_path=0.0, num_workers=0, sparse=False, fit_kernels=True, threads="auto",
                     bn_recalibrate=0, train_samples=1200, val_samples=200,
                     task_options=dict(arch="upernet", decoder_channels=64, aux_weight=0.4, aux_channels=32,
                                       crop=None, schedule="cosine")),
    "ade20k": dict(_COMMON, task="segmentation", model="slak_tiny", input_size=512, epochs=127, batch_size=4,
                   update_freq=4, lr=1e-4, weight_decay=0.05, warmup_steps=1500, warmup_epochs=0, min_lr=0.0,
                   smoothing=0.0, mixup=0.0, cutmix=0.0, aa="none", reprob=0.0, model_ema=False, drop_path=0.4,
                   layer_scale_init_value=1.0, width_factor=1.3, kernel_size=[51, 49, 47, 13, 5], decompose=True,
                   num_workers=4, sparse=False, fit_kernels=False, sync_bn=True, bn_recalibrate=0,
                   task_options=dict(arch="upernet", decoder_channels=512, aux_weight=0.4, aux_channels=256,
                                     crop=512, scale=[0.5, 2.0], slide_stride=341, layer_decay=0.9, num_layers=6,
                                     schedule="poly", poly_power=1.0, warmup_ratio=1e-6)),
    # detection (slaknet.detect, `slaknet detect train`; docs/detection.md). det_demo: the CPU demo's settings
    # (measured on 2 cores); coco: the paper's COCO fine-tuning (Mask R-CNN instead of Cascade Mask R-CNN)
    "det_demo": dict(_COMMON, task="detection", data="builtin:contours", input_size=96, epochs=5, batch_size=8,
                     lr=1e-3, warmup_epochs=0.5, smoothing=0.0, mixup=0.0, cutmix=0.0, aa="none", reprob=0.0,
                     model_ema=False, drop_path=0.0, num_workers=0, sparse=False, fit_kernels=True, threads="auto",
                     bn_recalibrate=0, train_samples=320, val_samples=100, clip_grad=5.0,
                     task_options=dict(fpn_channels=64, anchor_sizes=[8, 16, 32, 64, 128], rpn_batch=64, roi_batch=64,
                                       rpn_pre_nms_train=300, rpn_post_nms_train=100, rpn_pre_nms_test=300,
                                       rpn_post_nms_test=100, box_head_size=128, mask_channels=64, mask_layers=2,
                                       detections=20, max_size=96)),
    # ConvNeXt's mask_rcnn_convnext_tiny_patch4_window7_mstrain_480-800_adamw_3x_coco_in1k.py (which SLaK's
    # detection code follows): AdamW lr 1e-4, wd 0.05, 36 epochs (3x), batch 16 = 8 GPUs x 2, 500 warm-up
    # iterations, drop path 0.4 (SLaK-T), multi-scale shorter side 480-800 (step 32), longer side <= 1333
    "coco": dict(_COMMON, task="detection", model="slak_tiny", input_size=800, epochs=36, batch_size=2, lr=1e-4,
                 weight_decay=0.05, warmup_steps=500, smoothing=0.0, mixup=0.0, cutmix=0.0, aa="none", reprob=0.0,
                 model_ema=False, drop_path=0.4, layer_scale_init_value=1.0, num_workers=4, sparse=False,
                 fit_kernels=False, bn_recalibrate=0,
                 task_options=dict(train_sizes=list(range(480, 801, 32)), test_size=800, max_size=1333)),
}
# GPUs the paper's commands ran on (for the header's effective-batch note and docs/training.md)
PAPER_GPUS = {"slak_t": 4, "slak_s": 8, "slak_b": 16}


def cpu_cores() -> int:
    """Cores this process may use (the affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class FolderInfo:
    """What ``--recipe auto`` looked at: training images, classes and the median image side sampled."""

    images: int
    classes: int
    side: Optional[int]

    def describe(self) -> str:
        side = f"~{self.side} px" if self.side else "unknown size"
        return f"{self.images} training images, {self.classes} classes, {side}"


def inspect_folder(root: str, sample: int = 8) -> Optional[FolderInfo]:
    """Count ``ROOT/train`` images and classes and read the size of a few files (headers only)."""
    from slaknet.data import IMG_EXTENSIONS

    train = os.path.join(root, "train")
    if not os.path.isdir(train):
        return None
    classes = [e.name for e in os.scandir(train) if e.is_dir() and not e.name.startswith(".")]
    files = []
    for c in sorted(classes):
        for dirpath, _, names in os.walk(os.path.join(train, c), followlinks=True):
            files += [os.path.join(dirpath, n) for n in names if n.lower().endswith(IMG_EXTENSIONS)]
    return FolderInfo(len(files), len(classes), _median_side(files, sample))


def _median_side(files: list, sample: int) -> Optional[int]:
    from PIL import Image

    sides = []
    step = max(1, len(files) // max(sample, 1))
    for path in sorted(files)[::step][:sample]:
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except Exception:  # corrupt files are the trainer's business, not the recipe's
            continue
    return sorted(sides)[len(sides) // 2] if sides else None


def choose_recipe(data: str, data_set: Optional[str] = None) -> str:
    """``--recipe auto``: demo for the built-in data, imagenet for big folders of big images (and for data
    that cannot be looked at: torchvision sets, missing folders, ``--data-set IMNET``), else small."""
    from slaknet.data import parse_data_spec

    kind, what = parse_data_spec(data)
    if kind == "builtin":
        return "demo"
    if kind != "folder" or (data_set or "").upper() == "IMNET":
        return "imagenet"
    info = inspect_folder(what)
    if info is None:
        return "imagenet"
    big = info.images >= 100_000 and (info.side or 0) >= 160
    return "imagenet" if big else "small"


def small_data_overrides(data: str) -> Dict[str, Any]:
    """Values of the small-data recipe that depend on the folder: input size, epochs, batch, workers."""
    from slaknet.data import parse_data_spec

    info = inspect_folder(parse_data_spec(data)[1])
    if info is None:
        return {}
    out: Dict[str, Any] = {}
    if info.side:
        # native size rounded to a multiple of 32 (at least 32) for small images; 224 for big ones
        out["input_size"] = max(32, int(round(info.side / 32)) * 32) if info.side <= 256 else 224
    n = max(info.images, 1)
    out["epochs"] = int(min(100, max(10, round(60_000 / n))))  # ~60k images seen
    batch = 8
    while batch * 2 <= min(64, n // 20):  # >= 20 batches an epoch, powers of two up to 64
        batch *= 2
    out["batch_size"] = batch
    out["num_workers"] = min(4, max(cpu_cores() - 1, 0))
    return out
