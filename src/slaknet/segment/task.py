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
import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from slaknet.data import BUILTIN_MEAN, BUILTIN_STD
from slaknet.models.slak import IMAGENET_MEAN, IMAGENET_STD
from slaknet.segment.data import (CONTOUR_CLASSES, IGNORE_INDEX, ContourSegmentation, PairedTransform,
                                  SegmentationFolder, parse_seg_data)
from slaknet.segment.folders import LabelScheme, SplitScan, label_scheme, scan_split
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
    bad_file_word = "bad pair"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.opts = dataclasses.asdict(cfg.task)
        self.spec: Dict[str, Any] = {}
        self.crop: Optional[int] = None                # folders: the training crop = evaluation window
        self.stride: Optional[int] = None              # folders: the evaluation window's stride
        self.labels: Optional[LabelScheme] = None     # folders: what the mask values mean
        self.scans: Tuple[SplitScan, ...] = ()          # folders: the train / val scans
        self.val_bad: set = set()                       # validation pairs found bad while loading

    # ---- data
    def _folder(self) -> bool:
        return parse_seg_data(self.cfg.data.source)[0] == "folder"

    def input_side(self) -> int:
        """Folders train on the crop (``--input-size`` where ``--crop`` is null); the built-in set on
        ``--input-size``. The kernels are fitted to this side (``--fit-kernels``)."""
        if self._folder():
            return int(self.opts["crop"] or self.cfg.input_size)
        return int(self.cfg.input_size)

    def build_data(self, run: "Run") -> TaskData:
        cfg, o = self.cfg, self.opts
        kind, root = parse_seg_data(cfg.data.source)
        if kind == "builtin":
            common = dict(image_size=int(cfg.input_size), seed=int(cfg.data_seed))
            train = ContourSegmentation("train", int(cfg.train_samples), augment=True, **common)
            val = ContourSegmentation("val", int(cfg.val_samples), **common)
            self.crop = None
            return TaskData(train, val, list(CONTOUR_CLASSES), BUILTIN_MEAN, BUILTIN_STD, train.describe())
        self.crop = self.input_side()
        self.stride = int(o["slide_stride"] or max(1, math.ceil(self.crop * 2 / 3)))
        # every mask read once before the first step: labels beyond the classes stop here, in one line
        scans = (scan_split(root, "train"), scan_split(cfg.eval_data or root, "val"))
        self.labels = label_scheme(root, scans[0].layout, scans, cfg.num_classes, o["reduce_zero_label"])
        self.scans = scans
        train_tf = PairedTransform(IMAGENET_MEAN, IMAGENET_STD, self.crop, tuple(o["scale"]))
        train = SegmentationFolder(root, "train", train_tf, labels=self.labels, scan=scans[0], report_bad=True)
        val = SegmentationFolder(cfg.eval_data or root, "val", PairedTransform(IMAGENET_MEAN, IMAGENET_STD),
                                 labels=self.labels, scan=scans[1], report_bad=True, substitute=False)
        for bad in scans[0].left_out:  # counted once, with the files the trainer meets later
            if bad.path not in run.state.bad_files:
                run.state.bad_files.append(bad.path)
        return TaskData(train, val, list(self.labels.classes), IMAGENET_MEAN, IMAGENET_STD, train.describe())

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
        enc, resolved = encoder_kwargs(cfg.model, self.input_side())
        net = build_segmentation_model(cfg.model.name, num_classes, o["arch"], o["decoder_channels"], o["aux_weight"],
                                       o["aux_channels"], enc)
        if o["backbone_checkpoint"]:
            resolved["pretrained_arch"] = load_backbone(net, str(o["backbone_checkpoint"]))
        enc_rec = {k: (list(v) if isinstance(v, tuple) else v) for k, v in enc.items() if k != "drop_path_rate"}
        self.spec = dict(model=cfg.model.name, num_classes=int(num_classes), arch=o["arch"],
                         decoder_channels=o["decoder_channels"], aux_weight=o["aux_weight"],
                         aux_channels=o["aux_channels"], encoder=enc_rec, classes=list(run.data.classes),
                         mean=list(run.data.mean), std=list(run.data.std), crop=self.crop,
                         stride=self.stride, input_size=self.input_side(), data=cfg.data.source,
                         data_seed=int(cfg.data_seed), val_samples=int(cfg.val_samples))
        if self.labels is not None:
            self.spec.update(reduce_zero_label=self.labels.reduce_zero_label, ignore_index=IGNORE_INDEX,
                             classes_from=self.labels.source)
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
        skipped: set = set()
        cm, loss_sum, n_pix, _ = confusion_over(model, self.val_loader(run), k, run.device, self.crop,
                                                self.stride, run.autocast, skipped)
        sums = all_reduce_sum(torch.cat([cm.double().reshape(-1),
                                         torch.tensor([loss_sum, n_pix, len(skipped)], dtype=torch.float64)]))
        s = scores(sums[:k * k].reshape(k, k))
        out = {"miou": s["miou"], "pixel_acc": s["pixel_acc"], "loss": float(sums[-3] / max(float(sums[-2]), 1.0))}
        if skipped:  # bad pairs met while loading: left out of the metrics, never replaced
            self.val_bad.update(run.data.val.samples[i][0] for i in skipped)
        if float(sums[-1]):
            out["skipped"] = int(sums[-1])
        return out

    def metadata(self, run: "Run") -> Dict[str, str]:
        return {"task": "segmentation", "seg_model": json.dumps(self.spec), "input_size": str(self.input_side())}

    # ---- what the run tells its user
    def header_lines(self, run: "Run") -> List[str]:
        """For folders: why this recipe, the classes and where they came from, what is ignored (with a warning
        when it is most pixels), the training / evaluation sizes and the pairs left out."""
        if self.labels is None:
            return []
        from slaknet.segment.spec import explain_recipe

        cfg, o, lab = self.cfg, self.opts, self.labels
        train, val = self.scans
        why = explain_recipe(cfg.data.source, cfg.recipe)
        lines = [why] if why else []
        names = ", ".join(lab.classes[:6]) + (", ..." if lab.num_classes > 6 else "")
        if not lab.reduce_zero_label:
            zero = "label 0 is a class (background; --reduce-zero-label ignores it)"
        elif o["reduce_zero_label"] is None:
            zero = "label 0 ignored (--reduce-zero-label: on for the ADE20K layout)"
        else:
            zero = "label 0 ignored (--reduce-zero-label)"
        lines.append(f"classes: {lab.num_classes} from {lab.source} ({lab.values_text()}): {names}; {zero}")
        share = lab.ignored_share(train)
        lines.append(f"ignored: {IGNORE_INDEX}" + (" and 0" if lab.reduce_zero_label else "")
                     + f" = {share:.1%} of the training pixels (read from {train.describe_scan()})")
        if share > 0.5:
            zero_share = train.counts.get(0, 0) / max(train.pixels, 1)
            hint = ("if label 0 is background, pass --reduce-zero-label false" if lab.reduce_zero_label
                    and zero_share > 0.25 else f"{IGNORE_INDEX} marks ignored pixels: masks hold class indices 0, 1, 2...")
            lines.append(f"warning: most training pixels ({share:.0%}) are ignored and never learnt; {hint}")
        side = f"~{val.side} px" if val.side else "their own size"
        size = (f"sizes: training crop {self.crop} px (" + ("--crop" if o["crop"] else "--input-size; --crop null")
                + (", kernels fitted to it" if cfg.fit_kernels else "") + f"); evaluation: each image whole at its "
                f"own size ({side}), sliding window {self.crop} / stride {self.stride} where larger")
        if o["crop"] and int(cfg.input_size) != self.crop:
            size += f"; --input-size {cfg.input_size} unused (folders train on the crop)"
        lines.append(size)
        n_left = {s.split: len(s.left_out) for s in self.scans if s.left_out}
        if n_left:
            total = sum(n_left.values())
            mism = sum(b.kind == "size" for s in self.scans for b in s.left_out)
            per = ", ".join(f"{split} {n}" for split, n in n_left.items())
            lines.append(f"left out before training: {total} pair{'s' if total > 1 else ''} ({mism} with mask and "
                         f"image sizes differing, {total - mism} unreadable; {per}), listed in summary.json")
        return lines

    def summary_fields(self, run: "Run") -> Dict[str, Any]:
        """Folders: the label scheme, the ignored share and every pair left out (counted once, with why)."""
        if self.labels is None:
            return {}
        left = [b for s in self.scans for b in s.left_out]
        val_bad = sorted({b.path for b in self.scans[1].left_out} | self.val_bad)
        return {"reduce_zero_label": self.labels.reduce_zero_label, "ignore_index": IGNORE_INDEX,
                "classes_from": self.labels.source, "ignored_share": self.labels.ignored_share(self.scans[0]),
                "size_mismatch": sum(b.kind == "size" for b in left), "left_out": {b.path: b.reason for b in left},
                "val_bad_images": len(val_bad), "val_bad_files": val_bad}

    def describe(self) -> str:
        o = self.opts
        head = f"{o['arch']} {o['decoder_channels']} ch" + (f" + FCN aux x{o['aux_weight']:g}" if o["aux_weight"] else "")
        if parse_seg_data(self.cfg.data.source)[0] == "builtin":
            return f"{head}, augmentation flips/transposes"
        lo, hi = o["scale"]
        return f"{head}, augmentation rescale {lo:g}-{hi:g}, crop {self.crop}, flip"
