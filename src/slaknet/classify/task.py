"""Image classification: the built-in insideness data, image folders and torchvision datasets."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch.nn as nn
from torch.utils.data import DataLoader

from slaknet.data import (BUILTIN_MEAN, BUILTIN_STD, Compose, FlipRot, InsidenessDataset, Normalize, SafeImageFolder,
                          parse_data_spec)
from slaknet.errors import ConfigError
from slaknet.models.slak import IMAGENET_MEAN, IMAGENET_STD
from slaknet.train.tasks import register_task
from slaknet.train.tasks.base import Task, TaskData, collate

if TYPE_CHECKING:  # pragma: no cover
    from slaknet.train.run import Run

__all__ = ["ClassificationTask", "build_datasets", "eval_transform"]



def eval_transform(size: int, crop_pct: Optional[float], mean: Sequence[float], std: Sequence[float]) -> Any:
    """Resize + centre crop as in ConvNeXt's evaluation (crop_pct 0.875 below 384 px, else none)."""
    from timm.data import create_transform

    if crop_pct is None:
        crop_pct = 0.875 if size < 384 else 1.0
    return create_transform(size, is_training=False, interpolation="bicubic", crop_pct=crop_pct,
                            mean=mean, std=std)


def _train_transform(cfg: Any) -> Any:
    from timm.data import create_transform

    return create_transform(int(cfg.input_size), is_training=True, color_jitter=cfg.color_jitter,
                            auto_augment=cfg.aa, interpolation=cfg.train_interpolation, re_prob=cfg.reprob,
                            re_mode=cfg.remode, re_count=cfg.recount, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _torchvision(cfg: Any, what: str, train_tf: Any, eval_tf: Any) -> Tuple[Any, Any, list]:
    import torchvision

    cls = getattr(torchvision.datasets, what, None)
    if cls is None:
        raise ConfigError(f"torchvision has no dataset {what!r}")
    root = os.environ.get("SLAKNET_DATA_ROOT", "data")
    try:
        train_ds = cls(root, train=True, download=True, transform=train_tf)
        val_ds = cls(root, train=False, download=True, transform=eval_tf)
    except TypeError as exc:
        raise ConfigError(f"torchvision:{what} has no train/val split argument; use an image folder") from exc
    except Exception as exc:
        raise ConfigError(f"could not load torchvision:{what} into {root!r} (needs network on first use): "
                          f"{type(exc).__name__}: {exc}") from exc
    classes = list(getattr(train_ds, "classes", [str(i) for i in range(cfg.num_classes or 0)]))
    return train_ds, val_ds, classes


def _folder(cfg: Any, root: str, train_tf: Any, eval_tf: Any) -> Tuple[Any, Any, list]:
    train_root = os.path.join(root, "train")
    if not os.path.exists(root):
        raise ConfigError(f"data folder {root!r} does not exist")
    if not os.path.isdir(train_root):
        raise ConfigError(f"{root!r} has no train/ folder (expected ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg)")
    val_root = cfg.eval_data or os.path.join(root, "val")
    if not os.path.isdir(val_root):
        raise ConfigError(f"validation folder {val_root!r} does not exist (expected ROOT/val/CLASS/*.jpg, "
                          "or pass --eval-data-path)")
    train_ds = SafeImageFolder(train_root, train_tf, report_bad=True, with_index=True)
    val_ds = SafeImageFolder(val_root, eval_tf, classes=train_ds.classes, report_bad=True)
    return train_ds, val_ds, list(train_ds.classes)


def build_datasets(cfg: Any, fixed_train_transform: bool = False) -> TaskData:
    """Train / val datasets, class names and normalisation for the configured data source.

    ``fixed_train_transform``: training images go through the deterministic evaluation transform (no random
    augmentation), e.g. for a teacher-output cache.
    """
    kind, what = parse_data_spec(cfg.data.source)
    size = int(cfg.input_size)
    if kind == "builtin":
        mean, std = BUILTIN_MEAN, BUILTIN_STD
        norm = Normalize(mean, std)
        # persist: the rendered images are kept on disk, so a later run with the same data does not render them
        common = dict(image_size=size, difficulty=cfg.difficulty, seed=cfg.data_seed, persist=True)
        train_tf = norm if fixed_train_transform else Compose([FlipRot(), norm])
        train_ds = InsidenessDataset("train", cfg.train_samples, transform=train_tf, **common)
        val_ds = InsidenessDataset("val", cfg.val_samples, transform=norm, **common)
        return TaskData(train_ds, val_ds, list(train_ds.classes), mean, std, train_ds.describe())
    eval_tf = eval_transform(size, cfg.crop_pct, IMAGENET_MEAN, IMAGENET_STD)
    train_tf = eval_tf if fixed_train_transform else _train_transform(cfg)
    if kind == "torchvision":
        tr, va, classes = _torchvision(cfg, what, train_tf, eval_tf)
        desc = f"torchvision:{what}: {len(tr)} training images, {len(classes)} classes"
    else:
        tr, va, classes = _folder(cfg, what, train_tf, eval_tf)
        desc = tr.describe()
    return TaskData(tr, va, classes, IMAGENET_MEAN, IMAGENET_STD, desc)


@register_task("classification")
class ClassificationTask(Task):
    """Cross-entropy (label smoothing / Mixup-CutMix soft targets) on a SLaK classifier; top-1 decides best."""

    best_metric = "val_top1"

    fixed_train_transform = False  # subclasses (a teacher cache) may need deterministic training inputs

    def build_data(self, run: "Run") -> TaskData:
        data = build_datasets(self.cfg, self.fixed_train_transform)
        self._val_loader: Optional[DataLoader] = None
        return data

    def build_model(self, run: "Run", num_classes: int) -> Tuple[nn.Module, Dict[str, Any]]:
        from slaknet.models.training import build_training_model

        model, res = build_training_model(self.cfg.model, num_classes, int(self.cfg.data.input_size))
        return model, {"resolved_kernel_size": res.kernel_list(), "kernels": list(res.kernel_size),
                       "small_kernel": res.small_kernel, "resolved_drop_path": res.drop_path}

    def _mixing(self) -> bool:
        return self.cfg.mixup > 0 or self.cfg.cutmix > 0

    def batch_transform(self) -> Any:
        if not self._mixing():
            return None
        from timm.data import Mixup

        c = self.cfg
        return Mixup(mixup_alpha=c.mixup, cutmix_alpha=c.cutmix, prob=c.mixup_prob, switch_prob=c.mixup_switch_prob,
                     mode=c.mixup_mode, label_smoothing=c.smoothing, num_classes=self.num_classes)

    def criterion(self) -> nn.Module:
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        if self._mixing():
            return SoftTargetCrossEntropy()
        if self.cfg.smoothing > 0:
            return LabelSmoothingCrossEntropy(self.cfg.smoothing)
        return nn.CrossEntropyLoss()

    def check(self, run: "Run") -> None:
        classes = list(run.data.classes)
        if len(classes) < 2:
            where = self.cfg.data.source
            raise ConfigError(f"{where} has {len(classes)} class{'' if len(classes) == 1 else 'es'} "
                              f"({', '.join(map(repr, classes)) or 'none'}): classification needs at least 2 "
                              "(one sub-folder per class under train/ and val/)")
        if self._mixing() and run.batch_size % 2:
            raise ConfigError(f"mixup/cutmix need an even --batch-size, got {run.batch_size}")

    def val_loader(self, run: "Run") -> DataLoader:
        if getattr(self, "_val_loader", None) is None:
            from slaknet.train.distributed import ShardSampler

            d = run.dist
            self._val_loader = DataLoader(run.data.val, batch_size=max(run.batch_size, 64),
                                          sampler=ShardSampler(len(run.data.val), d.rank, d.world_size),
                                          num_workers=run.workers, pin_memory=run.pin_memory,
                                          collate_fn=collate)
        return self._val_loader

    def evaluate(self, run: "Run", model: nn.Module, desc: str = "val") -> Dict[str, float]:
        from slaknet.classify.evaluate import evaluate

        ev = evaluate(model, self.val_loader(run), run.device, run.autocast, self.cfg.channels_last,
                      run.progress, desc)
        out = {"loss": ev["loss"], "top1": ev["top1"]}
        if len(run.data.classes) >= 6:  # top-5 of 5 classes or fewer is always 100%: not reported
            out["top5"] = ev["top5"]
        return out

    def header_lines(self, run: "Run") -> List[str]:
        """For folders: which recipe and why (what ``--recipe auto`` saw and its rule)."""
        from slaknet.classify.spec import explain_recipe

        why = explain_recipe(self.cfg.data.source, self.cfg.recipe, {"data_set": self.cfg.data.data_set})
        return [why] if why else []

    def describe(self) -> str:
        c = self.cfg
        if parse_data_spec(c.data.source)[0] == "builtin":
            return "augmentation flips/rotations"
        parts = [f"RandAugment {c.aa}" if c.aa else "random-resized crop + flip"]
        if c.mixup or c.cutmix:
            parts.append(f"mixup {c.mixup:g} / cutmix {c.cutmix:g}")
        if c.reprob:
            parts.append(f"random erasing {c.reprob:g}")
        if c.smoothing:
            parts.append(f"label smoothing {c.smoothing:g}")
        return "augmentation " + ", ".join(parts)
