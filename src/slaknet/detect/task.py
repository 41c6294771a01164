"""The ``detection`` training task: a torchvision detector on a SLaK backbone, for the shared Trainer.

Batches are ``(list of images, list of target dicts, ...)`` (:func:`slaknet.detect.data.detection_collate`);
the model computes its own losses in train mode (torchvision's loss dict, summed); evaluation is COCO
box / mask AP (:mod:`slaknet.detect.metrics`); ``val_map`` decides ``checkpoint-best.pth`` (``best_box_ap`` in
summary.json). ``--detector auto`` is settled when the data are read: mask_rcnn where they have masks. Settings
beyond the general sections live in ``cfg.task`` (:class:`slaknet.detect.spec.DetectionOptions`).
"""
from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from slaknet.detect.data import BUILTIN_DETECTION, ContourDetection, detection_collate
from slaknet.detect.spec import recipe_reason, resolve_detector, resolve_options
from slaknet.errors import ConfigError
from slaknet.models.slak import IMAGENET_MEAN, IMAGENET_STD
from slaknet.train.tasks import register_task
from slaknet.train.tasks.base import Task, TaskData

if TYPE_CHECKING:  # pragma: no cover
    from slaknet.train.run import Run

__all__ = ["DetectionTask", "build_detection_data", "held_out_data"]


def build_detection_data(data: str, eval_data: Optional[str], options: Mapping[str, Any], input_size: int,
                         train_samples: int, val_samples: int, data_seed: int, hflip: bool) -> TaskData:
    """Train / val sets for ``data``: ``builtin:contours``, a COCO folder or the COCO files named in ``options``
    (see :mod:`slaknet.detect.coco`)."""
    if data in (BUILTIN_DETECTION, "contours"):
        size = int(input_size)
        tr = ContourDetection("train", int(train_samples), size, int(data_seed), flip=bool(hflip))
        va = ContourDetection("val", int(val_samples), size, int(data_seed))
        return TaskData(tr, va, list(tr.classes), IMAGENET_MEAN, IMAGENET_STD, tr.describe())
    if str(data).startswith("builtin:"):
        raise ConfigError(f"unknown built-in detection data {data!r}; available: {BUILTIN_DETECTION}")
    from slaknet.detect.coco import coco_files, coco_splits

    tr, va = coco_splits(coco_files(data, eval_data, options), flip=bool(hflip))
    fixes = [f"{name}: {ds.fixes()}" for name, ds in (("train", tr), ("val", va)) if ds.fixes()]
    return TaskData(tr, va, list(tr.classes), IMAGENET_MEAN, IMAGENET_STD, "; ".join([tr.describe()] + fixes))


def held_out_data(data: str, eval_data: Optional[str], options: Mapping[str, Any], classes: Sequence[str],
                  input_size: int, val_samples: int, data_seed: int) -> Any:
    """The held-out set alone (``slaknet detect eval``), its labels following ``classes`` (the checkpoint's)."""
    if data in (BUILTIN_DETECTION, "contours"):
        return ContourDetection("val", int(val_samples), int(input_size), int(data_seed))
    if str(data).startswith("builtin:"):
        raise ConfigError(f"unknown built-in detection data {data!r}; available: {BUILTIN_DETECTION}")
    from slaknet.detect.coco import CocoDetection, coco_files

    files = coco_files(data, eval_data, options, train=False)
    return CocoDetection(files.val_annotations, files.val_images, classes=list(classes))


@register_task("detection")
class DetectionTask(Task):
    """Mask R-CNN (default), Faster R-CNN, RetinaNet or FCOS with a SLaK + FPN backbone; box AP decides best."""

    best_metric = "val_map"

    @classmethod
    def default_callbacks(cls) -> List[Any]:
        from slaknet.detect.report import APLines

        return [APLines()]

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.opts = resolve_options(cfg.task, int(cfg.data.input_size))

    def build_data(self, run: "Run") -> TaskData:
        from slaknet.errors import import_optional

        for module in ("pycocotools", "torchmetrics.detection"):  # needed by the first evaluation: fail now
            import_optional(module, "dense", "slaknet detect (COCO AP)")
        d = self.cfg.data
        data = build_detection_data(d.source, d.eval_data, self.opts, d.input_size, d.train_samples, d.val_samples,
                                    d.data_seed, bool(self.opts["hflip"]))
        self.opts["detector"] = resolve_detector(self.cfg.task.detector, bool(data.train.has_masks),
                                                 getattr(data.train, "ann_file", d.source))
        return data

    def build_model(self, run: "Run", num_classes: int) -> Tuple[nn.Module, Dict[str, Any]]:
        from slaknet.detect.model import backbone_from_config, build_detector

        if self.cfg.finetune:
            raise ConfigError("detection: give the backbone's classification checkpoint as --backbone-checkpoint "
                              "(task option backbone_checkpoint), not --finetune")
        body = backbone_from_config(self.cfg, self.opts["backbone_checkpoint"])
        model = build_detector(body, num_classes, self.opts, run.data.mean, run.data.std)
        self._masks = self.opts["detector"] == "mask_rcnn"
        ks = [int(k) for k in (body.kernel_sizes or [])]
        return model, {"kernels": ks, "small_kernel": body.small_kernel, "resolved_kernel_size": ks,
                       "detector": self.opts["detector"], "detection_options": dict(self.opts)}

    def check(self, run: "Run") -> None:
        c = self.cfg
        if c.mixup or c.cutmix:
            raise ConfigError("detection has no mixup / cutmix; leave --mixup / --cutmix at 0")
        if c.bn_recalibrate:
            raise ConfigError("--bn-recalibrate needs classification batches; detection runs with it off (0)")
        if c.channels_last:
            raise ConfigError("--channels-last is not supported by the detection task (image lists)")

    def criterion(self) -> nn.Module:
        return nn.Identity()  # unused: torchvision detectors compute their own losses

    def sparse_config(self, run: "Run", total_steps: int) -> Any:
        sc = super().sparse_config(run, total_steps)
        if sc is None:
            return None
        from slaknet.sparse import init_rule

        if init_rule(sc.sparse_init).needs_batch:
            raise ConfigError(f"--sparse-init {sc.sparse_init} needs a classification batch; detection supports "
                              "ERK and uniform initial masks (e.g. --sparse-init ERK)")
        if self.cfg.sparse.exclude is None and self.cfg.sparse.include is None:
            from slaknet.detect.model import HEAD_PATTERNS

            sc = dataclasses.replace(sc, exclude=list(HEAD_PATTERNS))  # the backbone is sparse, FPN and heads dense
        return sc

    def snip_batch(self, run: "Run") -> Tuple[torch.Tensor, torch.Tensor]:
        raise ConfigError("--sparse-init snip needs a classification batch; use --sparse-init ERK for detection")

    def collate(self, batch: List[Tuple[Any, ...]]) -> Tuple[Any, ...]:
        return detection_collate(batch)

    def move_batch(self, run: "Run", batch: Sequence[Any]) -> Tuple[Any, Any]:
        dev = run.device
        images = [im.to(dev, non_blocking=True) for im in batch[0]]
        targets = [{k: v.to(dev, non_blocking=True) for k, v in t.items()} for t in batch[1]]
        return images, targets

    def training_loss(self, run: "Run", model: nn.Module, x: Any, y: Any) -> torch.Tensor:
        losses = model(x, y)
        self.last_losses = {k: float(v.detach()) for k, v in losses.items()}
        return sum(losses.values())

    def evaluate(self, run: "Run", model: nn.Module, desc: str = "val") -> Dict[str, float]:
        from slaknet.detect.metrics import evaluate_detector
        from slaknet.detect.model import set_test_size

        train_sizes, max_size = model.transform.min_size, model.transform.max_size
        set_test_size(model, int(self.opts["test_size"]))
        try:
            return evaluate_detector(model, run.data.val, run.device, int(self.opts["eval_batch"]),
                                     masks=self.opts["detector"] == "mask_rcnn" and bool(run.data.val.has_masks))
        finally:
            model.transform.min_size, model.transform.max_size = train_sizes, max_size

    def describe(self) -> str:
        """Detector (and why, when auto), the effective sizes, flips, and why the recipe fits the data."""
        o = self.opts
        sizes = o["train_sizes"]
        scale = f"shorter side {sizes[0]}" if len(sizes) == 1 else f"multi-scale shorter side {min(sizes)}-{max(sizes)}"
        why = ""
        if self.cfg.task.detector == "auto" and o["detector"] != "auto":
            why = " (auto: the data have masks)" if o["detector"] == "mask_rcnn" else " (auto: boxes only)"
        text = (f"{o['detector']} + FPN{why}, {scale}, test {o['test_size']}, max {o['max_size']} px"
                + (", flips" if o["hflip"] else ""))
        reason = recipe_reason(self.cfg.recipe, self.cfg.data.source)
        return text + (f"; {reason}" if reason else "")

    def summary_fields(self, run: "Run") -> Dict[str, Any]:
        """summary.json: the deciding metric by name (``best_box_ap``, percent), the detector and the classes;
        for COCO data the boxes clipped / dropped per split."""
        st, data = run.state, run.data
        final = run.history[-1] if run.history else {}
        out: Dict[str, Any] = {"best_box_ap": st.best_metric if st.best_epoch >= 0 else None,
                               "final_box_ap": final.get("val_map"), "detector": self.opts["detector"],
                               "num_classes": len(data.classes), "classes": list(data.classes)}
        if "val_mask_map" in final:
            out["final_mask_ap"] = final["val_mask_map"]
        if hasattr(data.train, "clipped"):
            out["clipped_boxes"] = {"train": data.train.clipped, "val": data.val.clipped}
            out["degenerate_boxes"] = {"train": data.train.degenerate, "val": data.val.degenerate}
        return out

    def metadata(self, run: "Run") -> Dict[str, str]:
        return {"task": "detection", "detector": str(self.opts["detector"]),
                "detection_options": json.dumps(self.opts)}

