"""The teacher of a distillation run, and the last-stage feature tap shared by teacher and student.

A teacher is any model slaknet can load: a SLaK checkpoint (official release or slaknet's own, any
layout the checkpoint layer reads; the architecture is read from the file) or a timm model by name plus a
checkpoint. It is frozen (no gradients, eval mode: BatchNorm uses its running statistics and dropout /
drop-path are off) and optionally reparameterized (branches and BatchNorm folded into one conv), which
gives the same outputs faster.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from slaknet.errors import CheckpointError, ConfigError

__all__ = ["load_teacher", "last_stage_module", "FeatureTap", "is_slak_name", "build_student"]


def is_slak_name(name: Optional[str]) -> bool:
    from slaknet.models.slak import MODEL_SPECS

    return name is None or str(name).lower() in MODEL_SPECS


def _load_timm_teacher(name: str, checkpoint: str, num_classes: int) -> nn.Module:
    import timm

    from slaknet.checkpoints import extract_state_dict, read_checkpoint

    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ConfigError(f"--teacher {name!r}: {exc}") from None
    sd = extract_state_dict(read_checkpoint(checkpoint))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln or "Missing" in ln),
                     str(exc).splitlines()[0])
        raise CheckpointError(f"--teacher-checkpoint {checkpoint}: weights do not fit {name} ({first})") from None
    return model


def load_teacher(name: Optional[str], checkpoint: Optional[str], num_classes: int, reparameterize: bool = False,
                 device: Any = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """The frozen teacher and what to record about it (architecture, file, reparameterization).

    Raises a one-line error when there is no checkpoint, the file does not fit the named model, or the
    teacher's classes differ from the student's.
    """
    if not checkpoint:
        raise ConfigError("distillation needs a trained teacher: pass --teacher-checkpoint FILE "
                          "(and --teacher NAME for a timm model)")
    if not os.path.isfile(checkpoint):
        raise ConfigError(f"--teacher-checkpoint {checkpoint!r} does not exist")
    if is_slak_name(name):
        from slaknet.models.factory import model_from_checkpoint

        model, _, arch = model_from_checkpoint(checkpoint, name.lower() if name else None)
    else:
        model, arch = _load_timm_teacher(str(name), checkpoint, num_classes), str(name)
    out = int(getattr(model, "num_classes", num_classes))
    if out != num_classes:
        raise CheckpointError(f"the teacher {arch} ({checkpoint}) has {out} classes, the student's data {num_classes}")
    model.eval()
    if reparameterize:
        if is_slak_name(name):
            from slaknet.models.factory import reparameterize_model

            model = reparameterize_model(model, inplace=True)
        else:
            from timm.utils import reparameterize_model as timm_reparameterize

            model = timm_reparameterize(model)
    model.requires_grad_(False)
    model.to(device)
    return model.eval(), {"teacher": arch, "teacher_checkpoint": os.path.abspath(checkpoint),
                          "teacher_reparam": bool(reparameterize)}


def build_student(cfg: Any, num_classes: int) -> Tuple[nn.Module, Dict[str, Any]]:
    """The student: a SLaK variant with the run's kernel / width overrides, or any timm model by name."""
    if is_slak_name(cfg.model.name):
        from slaknet.models.training import build_training_model

        model, res = build_training_model(cfg.model, num_classes, int(cfg.data.input_size))
        return model, {"resolved_kernel_size": res.kernel_list(), "kernels": list(res.kernel_size),
                       "small_kernel": res.small_kernel, "resolved_drop_path": res.drop_path}
    import timm

    try:
        model = timm.create_model(cfg.model.name, pretrained=False, num_classes=num_classes,
                                  drop_path_rate=float(cfg.model.drop_path or 0.0))
    except RuntimeError as exc:
        raise ConfigError(f"--model {cfg.model.name!r}: {exc}") from None
    return model, {}


def last_stage_module(model: nn.Module) -> Tuple[nn.Module, int]:
    """The module whose output is the model's last-stage feature map, and its channels (timm feature_info)."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise ConfigError(f"{type(model).__name__} has no feature_info: feature distillation needs a timm-style "
                          "model (use a logit loss only: --distill-type KD or NKD)")
    last = info[-1]
    return model.get_submodule(last["module"]), int(last["num_chs"])


class FeatureTap:
    """Keeps the output of a model's last stage on each forward (a forward hook, so it also works under DDP)."""

    def __init__(self, model: nn.Module) -> None:
        module, self.channels = last_stage_module(model)
        self.value: Optional[torch.Tensor] = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.value = output

    def pop(self) -> torch.Tensor:
        """The last captured map (NCHW or NHWC as the stage emits it), forgotten afterwards."""
        v, self.value = self.value, None
        if v is None:
            raise RuntimeError("the feature tap saw no forward pass")
        return v

    def remove(self) -> None:
        self._handle.remove()
