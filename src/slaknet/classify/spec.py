"""The ``classification`` task's declaration: its recipes and how ``--recipe auto`` reads the data.

* ``demo``: the built-in CPU demo (small SLaK, dynamic sparsity of 40% with the large kernels sparse too:
  ERK with power scale 0.3; flips/rotations, no mixup, no EMA).
* ``small``: a small image folder (chosen by ``auto`` for anything that is not a big folder of big
  images): input near the images' own size, tens of epochs, light augmentation, sparse as in the demo,
  data workers within the machine's cores.
* ``imagenet``: the ConvNeXt / SLaK ImageNet recipe (AdamW lr 4e-3 at effective batch 4096, scaled
  linearly, 20 warm-up epochs, label smoothing 0.1, mixup 0.8 / cutmix 1.0, RandAugment, random erasing
  0.25, EMA 0.9999, drop path per model size).
* ``slak_t`` / ``slak_s`` / ``slak_b``: the paper's SLaK-T/S/B ImageNet-1K commands (official README),
  see docs/training.md for their sources and the effective-batch arithmetic.

Torch-free at import (the command's ``--help`` is built from it).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Mapping, Optional

from slaknet.train.tasks import NoOptions, Recipe, TaskSpec, register_spec

__all__ = ["SPEC", "RECIPES", "FolderInfo", "inspect_folder", "choose_recipe", "explain_recipe", "small_data_overrides",
           "merge"]

BUILTIN_DATA = "builtin:insideness"


def merge(base: Mapping[str, Mapping[str, Any]], **sections: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``base`` with the fields of ``sections`` laid over it, section by section (recipes built on recipes)."""
    out = {k: dict(v) for k, v in base.items()}
    for k, v in sections.items():
        out.setdefault(k, {}).update(v)
    return out


# values that differ from the fields' defaults (slaknet.settings.sections, slaknet.sparse.SparseConfig).
# Sparse as SLaK is: the large kernels too. Plain ERK leaves every depthwise kernel of slak_pico dense (the 40%
# then sits in the 1x1 layers and downsamplers); ERK with power scale 0.3 is the largest tried (1, 0.5, 0.4,
# 0.3) that makes every strip sparse at 32-128 px, and it cost the least accuracy of the rules that do
# (3 seeds each against SNIP and uniform, docs/training.md "Which weights the demo makes sparse").
_SPARSE = dict(enabled=True, sparsity=0.4, sparse_init="ERK", erk_power_scale=0.3, update_frequency=25)
_CPU_SMALL = dict(
    optim=dict(lr=2e-3), model=dict(drop_path=0.0, fit_kernels=True), sparse=_SPARSE,
    run=dict(threads="auto", bn_recalibrate=16))
_DEMO = merge(_CPU_SMALL, data=dict(data=BUILTIN_DATA, input_size=64, num_workers=0),
              optim=dict(epochs=6, batch_size=64, warmup_epochs=0.5))
_SMALL = merge(_CPU_SMALL, data=dict(input_size=64, num_workers=2),
               optim=dict(epochs=30, batch_size=64, warmup_epochs=1), augment=dict(smoothing=0.1, color_jitter=0.0))
_IMAGENET = dict(
    data=dict(input_size=224, num_workers=8),
    optim=dict(epochs=300, batch_size=128, warmup_epochs=20, model_ema=True),
    augment=dict(smoothing=0.1, mixup=0.8, cutmix=1.0, aa="rand-m9-mstd0.5-inc1", reprob=0.25))


def _paper(model: str, u: int, prune_rate: float, drop_path: float, batch: int) -> Dict[str, Dict[str, Any]]:
    """One of the paper's ImageNet commands (300 epochs, lr 4e-3, 51-49-47-13 with N=5, 1.3x width)."""
    return merge(_IMAGENET, model=dict(model=model, width_factor=1.3, drop_path=drop_path,
                                       kernel_size=[51, 49, 47, 13, 5], decompose=True),
                 optim=dict(batch_size=batch, update_freq=8, lr=4e-3, model_ema=True, model_ema_eval=True),
                 sparse=dict(enabled=True, sparsity=0.4, sparse_init="snip", prune_rate=prune_rate,
                             growth="random", update_frequency=u))


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


def choose_recipe(data: Optional[str], given: Mapping[str, Any] = {}) -> str:
    """``--recipe auto``: demo for the built-in data, imagenet for big folders of big images (and for data
    that cannot be looked at: torchvision sets, missing folders, ``--data-set IMNET``), else small."""
    if data is None:
        return "demo"
    from slaknet.data import parse_data_spec

    kind, what = parse_data_spec(data)
    if kind == "builtin":
        return "demo"
    if kind != "folder" or str(given.get("data_set") or "").upper() == "IMNET":
        return "imagenet"
    info = inspect_folder(what)
    if info is None:
        return "imagenet"
    big = info.images >= 100_000 and (info.side or 0) >= 160
    return "imagenet" if big else "small"


AUTO_RULE = "imagenet for >= 100,000 training images of >= 160 px, else small; demo for the built-in data"


def explain_recipe(data: Optional[str], recipe: str, given: Mapping[str, Any] = {}) -> str:
    """Why ``recipe`` for ``data`` (a run-header line): what ``--recipe auto`` saw and its rule; empty for
    data it cannot look at (the built-in set, torchvision sets)."""
    from slaknet.data import parse_data_spec

    if data is None:
        return ""
    kind, what = parse_data_spec(data)
    info = inspect_folder(what) if kind == "folder" else None
    if info is None:
        return ""
    auto = choose_recipe(data, given)
    if recipe == auto:
        return f"recipe {recipe} for {info.describe()} (--recipe auto: {AUTO_RULE})"
    return f"recipe {recipe} as asked, for {info.describe()} (--recipe auto would choose {auto}: {AUTO_RULE})"


def small_data_overrides(data: str) -> Dict[str, Any]:
    """Values of the small-data recipe that depend on the folder: input size, epochs, batch, workers."""
    from slaknet.data import parse_data_spec
    from slaknet.train.machine import cpu_cores

    kind, what = parse_data_spec(data)
    info = inspect_folder(what) if kind == "folder" else None
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


RECIPES = (
    Recipe("demo", "the built-in CPU demo", _DEMO),
    Recipe("small", "small image folders, sized from the data", _SMALL, adapt=small_data_overrides),
    Recipe("imagenet", "the ConvNeXt / SLaK ImageNet recipe", _IMAGENET),
    # official SLaK README: GPUs x batch x update_freq = 4 x 128 x 8, 8 x 64 x 8, 16 x 32 x 8 (all 4096)
    Recipe("slak_t", "the paper's SLaK-T command", _paper("slak_tiny", u=2000, prune_rate=0.5, drop_path=0.1,
                                                          batch=128), gpus=4),
    Recipe("slak_s", "the paper's SLaK-S command", _paper("slak_small", u=100, prune_rate=0.3, drop_path=0.4,
                                                          batch=64), gpus=8),
    Recipe("slak_b", "the paper's SLaK-B command", _paper("slak_base", u=100, prune_rate=0.3, drop_path=0.5,
                                                          batch=32), gpus=16),
)

SPEC = register_spec(TaskSpec(
    name="classification", options=NoOptions, recipes=RECIPES, choose_recipe=choose_recipe,
    task_class="slaknet.classify.task:ClassificationTask", command="slaknet train", eval_command="slaknet eval",
    predict_command="slaknet predict", default_data=BUILTIN_DATA,
    description="image classification: the built-in insideness data, image folders, torchvision sets"))
