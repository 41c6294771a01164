"""The ``segmentation`` training task: a SLaK encoder + UperNet (smp) on the shared Trainer.

Everything a run guarantees (progress, JSON lines, TensorBoard, atomic checkpoints, exact resume, NaN stop,
unreadable-file counting, ``--sparse``, EMA, AMP, DDP) is the trainer's; this task supplies the data,
the network, the loss (cross-entropy with ignore index 255, plus ``aux_weight`` x the auxiliary head's),
the metrics (mIoU, pixel accuracy, loss), the layer-wise lr decay groups and the poly schedule.

Settings of the task live in ``cfg.task`` (:class:`slaknet.segment.spec.SegmentationOptions`, defaults the
paper's ADE20K settings); see docs/segmentation.md for the table.
"""
from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from slaknet.data import BUILTIN_MEAN, BUILTIN_STD
from slaknet.errors import ConfigError
from slaknet.models.slak import IMAGENET_MEAN, IMAGENET_STD
from slaknet.segment.data import (CONTOUR_CLASSES, IGNORE_INDEX, ContourSegmentation, PairedTransform,
                                  SegmentationFolder, parse_seg_data)
from slaknet.train.tasks import register_task
from slaknet.train.tasks.base import Task, TaskData

if TYPE_CHECKING:  # pragma: no cover
    from slaknet.train.run import Run

__all__ = ["SegmentationTask", "collate_segmentation"]

def collate_segmentation(batch: List[Tuple[Any, ...]]) -> Tuple[torch.Tensor, ...]:
    """Stack images and masks; further integer fields (unreadable-file counts) become long tensors."""
    xs = torch.stack([b[0] for b in batch])
    ys = torch.stack([b[1] for b in batch])
    rest = [torch.tensor([int(b[i]) for b in batch], dtype=torch.long) for i in range(2, len(batch[0]))]
    return (xs, ys, *rest)


@register_task("segmentation")
class SegmentationTask(Task):
    """Semantic segmentation (module docstring); ``val_miou`` decides checkpoint-best.pth."""

    best_metric = "val_miou"
    init_seed_key = 0x5E6

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.opts = dataclasses.asdict(cfg.task)
        self.spec: Dict[str, Any] = {}

    # ---- data
    def build_data(self, run: "Run") -> TaskData:
        cfg, o = self.cfg, self.opts
        kind, root = parse_seg_data(cfg.data.source)
        if kind == "builtin":
            common = dict(image_size=int(cfg.input_size), seed=int(cfg.data_seed))
            train = ContourSegmentation("train", int(cfg.train_samples), augment=True, **common)
            val = ContourSegmentation("val", int(cfg.val_samples), **common)
            self.crop = None
            return TaskData(train, val, list(CONTOUR_CLASSES), BUILTIN_MEAN, BUILTIN_STD, train.describe())
        self.crop = int(o["crop"] or cfg.input_size)
        train_tf = PairedTransform(IMAGENET_MEAN, IMAGENET_STD, self.crop, tuple(o["scale"]))
        train = SegmentationFolder(root, "train", train_tf, num_classes=cfg.num_classes, report_bad=True)
        val = SegmentationFolder(cfg.eval_data or root, "val", PairedTransform(IMAGENET_MEAN, IMAGENET_STD),
                                 classes=train.classes)
        return TaskData(train, val, list(train.classes), IMAGENET_MEAN, IMAGENET_STD, train.describe())

    def collate(self, batch: List[Tuple[Any, ...]]) -> Tuple[Any, ...]:
        return collate_segmentation(batch)

    def snip_batch(self, run: "Run") -> Tuple[torch.Tensor, torch.Tensor]:
        ds = run.data.train
        xb, yb = collate_segmentation([ds[i] for i in range(min(run.batch_size, len(ds)))])[:2]
        # SNIP scores with F.cross_entropy's default ignore index (-100): the ignored pixels stay ignored
        return xb, yb.masked_fill(yb == IGNORE_INDEX, -100)

    # ---- model
    def build_model(self, run: "Run", num_classes: int) -> Tuple[nn.Module, Dict[str, Any]]:
        from slaknet.segment.model import build_segmentation_model, encoder_kwargs, load_backbone

        cfg, o = self.cfg, self.opts
        enc, resolved = encoder_kwargs(cfg.model, int(cfg.input_size))
        net = build_segmentation_model(cfg.model.name, num_classes, o["arch"], o["decoder_channels"], o["aux_weight"],
                                       o["aux_channels"], enc)
        if o["backbone_checkpoint"]:
            resolved["pretrained_arch"] = load_backbone(net, str(o["backbone_checkpoint"]))
        enc_rec = {k: (list(v) if isinstance(v, tuple) else v) for k, v in enc.items() if k != "drop_path_rate"}
        self.spec = dict(model=cfg.model.name, num_classes=int(num_classes), arch=o["arch"],
                         decoder_channels=o["decoder_channels"], aux_weight=o["aux_weight"],
                         aux_channels=o["aux_channels"], encoder=enc_rec, classes=list(run.data.classes),
                         mean=list(run.data.mean), std=list(run.data.std), crop=self.crop,
                         stride=o["slide_stride"], input_size=int(cfg.input_size), data=cfg.data.source,
                         data_seed=int(cfg.data_seed), val_samples=int(cfg.val_samples))
        resolved["seg_model"] = self.spec
        return net, resolved

    def criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)

    def training_loss(self, run: "Run", model: nn.Module, x: Any, y: Any) -> torch.Tensor:
        logits, aux = model(x, with_aux=True)
        loss = run.criterion(logits, y)
        if aux is not None and self.opts["aux_weight"] > 0:
            loss = loss + self.opts["aux_weight"] * run.criterion(aux, y)
        return loss

    def param_groups(self, run: "Run", model: nn.Module) -> Optional[List[Dict[str, Any]]]:
        if self.opts["layer_decay"] is None:
            return None
        from slaknet.segment.model import layer_decay_groups

        return layer_decay_groups(model, float(self.cfg.weight_decay), float(self.opts["layer_decay"]),
                                  int(self.opts["num_layers"]))

    def build_scheduler(self, run: "Run", optimizer: torch.optim.Optimizer, total_steps: int,
                        warmup: int) -> Any:
        if self.opts["schedule"] != "poly":
            return None
        from timm.scheduler import PolyLRScheduler

        return PolyLRScheduler(optimizer, t_initial=max(int(total_steps), 1), power=self.opts["poly_power"],
                               lr_min=0.0, warmup_t=int(warmup), warmup_lr_init=run.plan.lr * self.opts["warmup_ratio"],
                               warmup_prefix=False, t_in_epochs=False, cycle_limit=1)

    # ---- evaluation
    def val_loader(self, run: "Run") -> DataLoader:
        from slaknet.train.distributed import ShardSampler

        d, val = run.dist, run.data.val
        bs = max(run.batch_size, 16) if isinstance(val, ContourSegmentation) else 1  # folders: sizes vary
        return DataLoader(val, batch_size=bs, sampler=ShardSampler(len(val), d.rank, d.world_size),
                          num_workers=run.workers, collate_fn=collate_segmentation)

    @torch.no_grad()
    def evaluate(self, run: "Run", model: nn.Module, desc: str = "val") -> Dict[str, float]:
        from slaknet.segment.infer import confusion_over
        from slaknet.segment.metrics import scores
        from slaknet.train.distributed import all_reduce_sum

        k = run.plan.num_classes
        cm, loss_sum, n_pix, _ = confusion_over(model, self.val_loader(run), k, run.device, self.crop,
                                                self.opts["slide_stride"], run.autocast)
        sums = all_reduce_sum(torch.cat([cm.double().reshape(-1), torch.tensor([loss_sum, n_pix], dtype=torch.float64)]))
        s = scores(sums[:k * k].reshape(k, k))
        return {"miou": s["miou"], "pixel_acc": s["pixel_acc"], "loss": float(sums[-2] / max(float(sums[-1]), 1.0))}

    def metadata(self, run: "Run") -> Dict[str, str]:
        return {"task": "segmentation", "seg_model": json.dumps(self.spec)}

    def describe(self) -> str:
        o = self.opts
        head = f"{o['arch']} {o['decoder_channels']} ch" + (f" + FCN aux x{o['aux_weight']:g}" if o["aux_weight"] else "")
        if parse_seg_data(self.cfg.data.source)[0] == "builtin":
            return f"{head}, augmentation flips/transposes"
        lo, hi = o["scale"]
        return f"{head}, augmentation rescale {lo:g}-{hi:g}, crop {self.crop}, flip"
