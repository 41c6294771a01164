"""The ``segmentation`` training task: a SLaK encoder + UperNet (smp) on the shared Trainer.

Everything a run guarantees (progress, JSON lines, TensorBoard, atomic checkpoints, exact resume, NaN stop,
unreadable-file counting, ``--sparse``, EMA, AMP, DDP) is the trainer's; this task supplies the data,
the network, the loss (cross-entropy with ignore index 255, plus ``aux_weight`` x the auxiliary head's),
the metrics (mIoU, pixel accuracy, loss), the layer-wise lr decay groups and the poly schedule.

Settings of the task live in ``cfg.task_options`` (missing keys take the values of :data:`DEFAULT_OPTIONS`,
the paper's ADE20K settings); see docs/segmentation.md for the table.
"""
from __future__ import annotations

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
    from slaknet.train.trainer import Trainer

__all__ = ["SegmentationTask", "DEFAULT_OPTIONS", "resolve_options", "collate_segmentation"]

# the paper's ADE20K head and schedule (official SLaK / ConvNeXt mmseg configs); the recipes override
DEFAULT_OPTIONS: Dict[str, Any] = dict(
    arch="upernet",          # smp architecture around the SLaK encoder
    decoder_channels=512,    # UperNet channels
    aux_weight=0.4,          # FCN auxiliary head on stage 3 (0: no auxiliary head)
    aux_channels=256,
    crop=512,                # training crop of folder data (and the sliding window at evaluation)
    scale=[0.5, 2.0],        # random rescale range of folder data (relative to a shorter side of `crop`)
    slide_stride=341,        # sliding-window stride at evaluation (images larger than `crop`)
    layer_decay=None,        # stage-wise layer-wise lr decay rate (paper: 0.9); None: off
    num_layers=6,            # layer groups of the decay rule (paper: 6)
    schedule="cosine",       # "poly" (paper) or "cosine" (the trainer's)
    poly_power=1.0,
    warmup_ratio=1e-6,       # poly: the warm-up starts at lr x this
    pretrained=None,         # SLaK classification checkpoint for the encoder (official or slaknet)
)
_CHECKS = {"decoder_channels": (int, 1), "aux_weight": (float, 0.0), "aux_channels": (int, 1), "num_layers": (int, 1),
           "slide_stride": (int, 1), "poly_power": (float, 0.0), "warmup_ratio": (float, 0.0)}


def resolve_options(task_options: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """:data:`DEFAULT_OPTIONS` completed by ``task_options``; one-line ConfigErrors for unknown keys / bad values."""
    given = dict(task_options or {})
    unknown = sorted(set(given) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown segmentation task option(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(DEFAULT_OPTIONS))}")
    opts = dict(DEFAULT_OPTIONS, **given)
    for key, (kind, lo) in _CHECKS.items():
        try:
            opts[key] = kind(opts[key])
        except (TypeError, ValueError):
            raise ConfigError(f"task option {key} must be a number, got {opts[key]!r}") from None
        if opts[key] < lo:
            raise ConfigError(f"task option {key} must be >= {lo}, got {opts[key]}")
    if opts["crop"] is not None and int(opts["crop"]) < 32:
        raise ConfigError(f"task option crop must be >= 32 (or null), got {opts['crop']}")
    if opts["schedule"] not in ("poly", "cosine"):
        raise ConfigError(f"task option schedule must be 'poly' or 'cosine', got {opts['schedule']!r}")
    if opts["layer_decay"] is not None and not 0 < float(opts["layer_decay"]) <= 1:
        raise ConfigError(f"task option layer_decay must be in (0, 1] (or null), got {opts['layer_decay']}")
    lo, hi = (float(v) for v in opts["scale"])
    if not 0 < lo <= hi:
        raise ConfigError(f"task option scale must be [low, high] with 0 < low <= high, got {opts['scale']}")
    return opts


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
    command, eval_command, predict_command = "slaknet segment train", "slaknet segment eval", "slaknet segment predict"
    init_seed_key = 0x5E6

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.opts = resolve_options(cfg.task_options)
        self.spec: Dict[str, Any] = {}

    # ---- data
    def build_data(self, trainer: "Trainer") -> TaskData:
        cfg, o = self.cfg, self.opts
        kind, root = parse_seg_data(cfg.data)
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

    def snip_batch(self, trainer: "Trainer") -> Tuple[torch.Tensor, torch.Tensor]:
        ds = trainer.data.train
        xb, yb = collate_segmentation([ds[i] for i in range(min(trainer.batch_size, len(ds)))])[:2]
        # SNIP scores with F.cross_entropy's default ignore index (-100): the ignored pixels stay ignored
        return xb, yb.masked_fill(yb == IGNORE_INDEX, -100)

    # ---- model
    def build_model(self, trainer: "Trainer", num_classes: int) -> Tuple[nn.Module, Dict[str, Any]]:
        from slaknet.segment.model import build_segmentation_model, encoder_kwargs, load_backbone

        cfg, o = self.cfg, self.opts
        if cfg.finetune:
            raise ConfigError("segmentation: give the backbone checkpoint as --pretrained (task option "
                              "'pretrained'), not --finetune")
        enc, resolved = encoder_kwargs(cfg, int(cfg.input_size))
        net = build_segmentation_model(cfg.model, num_classes, o["arch"], o["decoder_channels"], o["aux_weight"],
                                       o["aux_channels"], enc)
        if o["pretrained"]:
            resolved["pretrained_arch"] = load_backbone(net, str(o["pretrained"]))
        enc_rec = {k: (list(v) if isinstance(v, tuple) else v) for k, v in enc.items() if k != "drop_path_rate"}
        self.spec = dict(model=cfg.model, num_classes=int(num_classes), arch=o["arch"],
                         decoder_channels=o["decoder_channels"], aux_weight=o["aux_weight"],
                         aux_channels=o["aux_channels"], encoder=enc_rec, classes=list(trainer.data.classes),
                         mean=list(trainer.data.mean), std=list(trainer.data.std), crop=self.crop,
                         stride=o["slide_stride"], input_size=int(cfg.input_size), data=cfg.data,
                         data_seed=int(cfg.data_seed), val_samples=int(cfg.val_samples))
        resolved["seg_model"] = self.spec
        return net, resolved

    def criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)

    def training_loss(self, trainer: "Trainer", model: nn.Module, x: Any, y: Any) -> torch.Tensor:
        logits, aux = model(x, with_aux=True)
        loss = trainer.criterion(logits, y)
        if aux is not None and self.opts["aux_weight"] > 0:
            loss = loss + self.opts["aux_weight"] * trainer.criterion(aux, y)
        return loss

    def param_groups(self, trainer: "Trainer", model: nn.Module) -> Optional[List[Dict[str, Any]]]:
        if self.opts["layer_decay"] is None:
            return None
        from slaknet.segment.model import layer_decay_groups

        return layer_decay_groups(model, float(self.cfg.weight_decay), float(self.opts["layer_decay"]),
                                  int(self.opts["num_layers"]))

    def build_scheduler(self, trainer: "Trainer", optimizer: torch.optim.Optimizer, total_steps: int,
                        warmup: int) -> Any:
        if self.opts["schedule"] != "poly":
            return None
        from timm.scheduler import PolyLRScheduler

        return PolyLRScheduler(optimizer, t_initial=max(int(total_steps), 1), power=self.opts["poly_power"],
                               lr_min=0.0, warmup_t=int(warmup), warmup_lr_init=trainer.plan.lr * self.opts["warmup_ratio"],
                               warmup_prefix=False, t_in_epochs=False, cycle_limit=1)

    # ---- evaluation
    def val_loader(self, trainer: "Trainer") -> DataLoader:
        from slaknet.train.distributed import ShardSampler

        d, val = trainer.dist, trainer.data.val
        bs = max(trainer.batch_size, 16) if isinstance(val, ContourSegmentation) else 1  # folders: sizes vary
        return DataLoader(val, batch_size=bs, sampler=ShardSampler(len(val), d.rank, d.world_size),
                          num_workers=trainer.workers, collate_fn=collate_segmentation)

    @torch.no_grad()
    def evaluate(self, trainer: "Trainer", model: nn.Module, desc: str = "val") -> Dict[str, float]:
        from slaknet.segment.infer import confusion_over
        from slaknet.segment.metrics import scores
        from slaknet.train.distributed import all_reduce_sum

        k = trainer.plan.num_classes
        cm, loss_sum, n_pix, _ = confusion_over(model, self.val_loader(trainer), k, trainer.device, self.crop,
                                                self.opts["slide_stride"], trainer.autocast)
        sums = all_reduce_sum(torch.cat([cm.double().reshape(-1), torch.tensor([loss_sum, n_pix], dtype=torch.float64)]))
        s = scores(sums[:k * k].reshape(k, k))
        return {"miou": s["miou"], "pixel_acc": s["pixel_acc"], "loss": float(sums[-2] / max(float(sums[-1]), 1.0))}

    def metadata(self, trainer: "Trainer") -> Dict[str, str]:
        return {"task": "segmentation", "seg_model": json.dumps(self.spec)}

    def describe(self) -> str:
        o = self.opts
        head = f"{o['arch']} {o['decoder_channels']} ch" + (f" + FCN aux x{o['aux_weight']:g}" if o["aux_weight"] else "")
        if parse_seg_data(self.cfg.data)[0] == "builtin":
            return f"{head}, augmentation flips/transposes"
        lo, hi = o["scale"]
        return f"{head}, augmentation rescale {lo:g}-{hi:g}, crop {self.crop}, flip"
