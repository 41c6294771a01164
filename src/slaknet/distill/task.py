"""Distillation as a task of the shared trainer: the classification task plus a frozen teacher.

Everything ``slaknet train`` does (data, recipes, mixup / cutmix, EMA, AMP, DDP, sparse engine, exact
resume, NaN stop, logs) comes from :class:`~slaknet.train.tasks.classification.ClassificationTask` and the
Trainer; this task adds the teacher and the distillation loss. The teacher sees exactly the student's
(possibly mixed) batch, under the same autocast, without gradients. Its identity (a hash of its weights
and settings) is stored with the run and checked on resume.

Settings live in ``cfg.task`` (:class:`slaknet.distill.spec.DistillationOptions`; the keys below plus
``teacher``, ``teacher_checkpoint``, ``teacher_reparam``).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from slaknet.distill.args import resolve_distill_config
from slaknet.distill.spec import TEACHER_KEYS
from slaknet.distill.losses import build_distill_loss
from slaknet.distill.teacher import FeatureTap, build_student, last_stage_module, load_teacher
from slaknet.errors import CheckpointError
from slaknet.train.tasks import register_task
from slaknet.train.tasks.base import TaskData, collate
from slaknet.classify.task import ClassificationTask

if TYPE_CHECKING:  # pragma: no cover
    from slaknet.train.run import Run

__all__ = ["DistillTask", "TEACHER_KEYS", "open_or_build_cache"]



@register_task("distillation")
class DistillTask(ClassificationTask):
    """Train the student on ``loss(student, target, teacher)``; the student is evaluated and saved as usual."""

    best_metric = "val_top1"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        opts = dataclasses.asdict(cfg.task)
        self.options = resolve_distill_config(opts)
        self.teacher_options = {k: opts.get(k) for k in TEACHER_KEYS}
        self.teacher: Optional[nn.Module] = None
        self._taps: Optional[Tuple[FeatureTap, FeatureTap]] = None
        self.cache: Any = None
        self._batch_index: Optional[torch.Tensor] = None
        # a teacher cache is valid only when an image index always gives the same input tensor
        self.fixed_train_transform = bool(self.options["teacher_cache"])

    def build_data(self, run: "Run") -> TaskData:
        data = super().build_data(run)
        if self.options["teacher_cache"]:
            from slaknet.distill.cache import WithIndex, check_cache_allowed

            check_cache_allowed(random_augmentation=False, mixup=self._mixing())
            data.train = WithIndex(data.train)  # batches end with the image indices
        return data

    def build_model(self, run: "Run", num_classes: int) -> Tuple[nn.Module, Dict[str, Any]]:
        from slaknet.distill.cache import teacher_identity

        student, resolved = build_student(self.cfg, num_classes)
        t = self.teacher_options
        self.teacher, info = load_teacher(t["teacher"], t["teacher_checkpoint"], num_classes,
                                          bool(t["teacher_reparam"]), device=run.device)
        info["teacher_id"] = teacher_identity(self.teacher, reparameterized=bool(t["teacher_reparam"]))
        s_ch = t_ch = 0
        if self.options["feature_loss"] is not None:
            s_ch, t_ch = last_stage_module(student)[1], last_stage_module(self.teacher)[1]
        base = super().criterion()
        self._criterion = build_distill_loss(self.options, base_criterion=base, student_channels=s_ch,
                                             teacher_channels=t_ch)
        if self._criterion.needs_features:
            self._taps = (FeatureTap(student), FeatureTap(self.teacher))
        self.teacher_info = info
        if self.options["teacher_cache"]:
            self.cache = open_or_build_cache(run, self.teacher, info["teacher_id"], self.options,
                                             self._taps[1] if self._taps else None)
            if self._taps:
                self._taps[1].remove()
            self.teacher = None  # its outputs are on disk: free its memory
        return student, {**resolved, **info, "distill_type": self.options["distill_type"]}

    def extra_modules(self, run: "Run") -> Dict[str, nn.Module]:
        fd = self._criterion.feature_loss
        return {"feature_projection": fd} if fd is not None and any(True for _ in fd.parameters()) else {}

    def criterion(self) -> nn.Module:
        return self._criterion

    def move_batch(self, run: "Run", batch: Any) -> Tuple[Any, Any]:
        if self.cache is not None:
            self._batch_index = batch[-1]
        return super().move_batch(run, batch)

    def training_loss(self, run: "Run", model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            t_logits, t_feat = self.cache.get(self._batch_index, device=x.device)
        else:
            with torch.no_grad():
                t_logits = self.teacher(x)
                t_feat = self._taps[1].pop() if self._taps else None
        s_logits = model(x)
        s_feat = self._taps[0].pop() if self._taps else None
        return self._criterion(s_logits, y, t_logits.float(), s_feat, t_feat)

    def check_resume(self, run: "Run", checkpoint: Dict[str, Any]) -> None:
        old = checkpoint.get("config") or {}  # the plan (with the teacher record) is stored flat in it
        if old.get("teacher_id") and old["teacher_id"] != self.teacher_info["teacher_id"]:
            raise CheckpointError(f"resume: the run was distilled from another teacher ({old.get('teacher')} "
                                  f"{old.get('teacher_checkpoint')}); this teacher's weights or settings differ "
                                  f"({self.teacher_info['teacher']} {self.teacher_info['teacher_checkpoint']})")

    def describe(self) -> str:
        t = self.teacher_info if hasattr(self, "teacher_info") else {}
        o = self.options
        loss = o["distill_type"]
        if o["logit_loss"] == "KD":
            loss += f" (alpha {o['distill_alpha']:g}, T {o['distill_T']:g}{', hard' if o['distill_hard'] else ''})"
        elif o["logit_loss"] == "NKD":
            loss += f" (T {o['nkd_T']:g}, alpha {o['nkd_alpha']:g})"
        if o["feature_loss"]:
            loss += f" + {o['lr_fd']:g} x {o['fd_loss']} features"
        teacher = f"teacher {t.get('teacher', '?')}" + (" (reparameterized)" if t.get("teacher_reparam") else "")
        return f"{super().describe()}; distilling from {teacher}, loss {loss}"

    def metadata(self, run: "Run") -> Dict[str, str]:
        t = getattr(self, "teacher_info", {})
        return {"distilled_from": str(t.get("teacher", "")), "distill_type": str(self.options["distill_type"])}


def open_or_build_cache(run: "Run", teacher: nn.Module, teacher_id: str, options: Dict[str, Any],
                        feature_tap: Optional[FeatureTap]) -> Any:
    """The run's teacher cache: opened when ``--teacher-cache DIR`` holds one for this teacher and data, else
    built once (rank 0, in index order, under the run's autocast) while the other ranks wait."""
    import sys

    from torch.utils.data import DataLoader

    from slaknet.distill.cache import TeacherCache, TeacherCacheWriter, dataset_identity
    from slaknet.train.distributed import barrier

    cfg, ds, path = run.cfg, run.data.train, options["teacher_cache"]
    data_id = dataset_identity(ds.dataset, data=cfg.data, input_size=cfg.input_size, data_seed=cfg.data_seed,
                               train_samples=cfg.train_samples, difficulty=cfg.difficulty)
    teacher_id = f"{teacher_id}:{run.autocast}"
    keys = dict(dataset_id=data_id, teacher_id=teacher_id, random_augmentation=False)
    cache = TeacherCache.open(path, **keys)
    if cache is None and run.dist.is_main:
        n, dev = len(ds), run.device
        print(f"teacher cache: running the teacher once over {n} training images -> {path}", file=sys.stderr,
              flush=True)
        loader = DataLoader(ds, batch_size=max(run.batch_size, 64), shuffle=False, collate_fn=collate,
                            num_workers=run.workers)
        writer = None
        try:
            with torch.no_grad():
                for batch in loader:
                    x = batch[0].to(dev)
                    with torch.autocast(dev.type, dtype=run.autocast, enabled=run.autocast is not None):
                        logits = teacher(x).float()
                    feats = feature_tap.pop().float() if feature_tap is not None else None
                    if writer is None:
                        writer = TeacherCacheWriter(path, num_items=n, num_classes=logits.shape[1],
                                                    feature_shape=tuple(feats.shape[1:]) if feats is not None else None,
                                                    dtype=options["teacher_cache_dtype"], **keys)
                    writer.write(batch[-1], logits, feats)
            writer.commit()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
    barrier()
    cache = cache or TeacherCache.open(path, **keys)
    if feature_tap is not None and not cache.has_features:
        raise CheckpointError(f"teacher cache {path} holds logits only, but feature distillation needs features; "
                              "use another --teacher-cache folder")
    return cache
