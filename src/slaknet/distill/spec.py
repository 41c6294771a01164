"""The ``distillation`` task's declaration: the teacher and loss options (the ``task`` section of its
configuration; defaults are the research code's, VITA-Group/SLaK ``main_KD.py`` / ``engine_kd.py`` at e06ad3e)
and its recipes (the classification ones: the student is trained like a classifier). Torch-free.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from slaknet.classify.spec import RECIPES, choose_recipe
from slaknet.settings import setting
from slaknet.train.tasks import TaskSpec, register_spec

__all__ = ["DistillationOptions", "SPEC", "TEACHER_KEYS"]

TEACHER_KEYS = ("teacher", "teacher_checkpoint", "teacher_reparam")


@dataclasses.dataclass(frozen=True)
class DistillationOptions:
    """The frozen teacher, the distillation losses and the teacher-output cache."""

    teacher: Optional[str] = setting(None, "teacher architecture (slaknet or timm model name; default: read from "
                                           "--teacher-checkpoint)", metavar="NAME")
    teacher_checkpoint: Optional[str] = setting(None, "teacher weights (official .pth or slaknet checkpoint / "
                                                      "safetensors); without it `slaknet distill` runs its demo",
                                                metavar="CKPT")
    teacher_reparam: bool = setting(False, "reparameterize the teacher (fuse branches and BN) before distilling")
    distill_type: str = setting("KD", "KD | NKD | FD | KD+FD | NKD+FD | None (research spellings such as NKDFD "
                                      "accepted)", metavar="TYPE")
    distill_alpha: float = setting(0.1, "KD: weight of the T^2-scaled KL term, (1-alpha) goes to CE", low=0.0,
                                   high=1.0)
    distill_T: float = setting(1.0, "KD temperature (the research NKD ignores it, see --nkd-T)", low=0.0,
                               low_open=True)
    distill_hard: bool = setting(False, "KD: 0.5*CE(student, label) + 0.5*CE(student, teacher argmax) instead of KL")
    nkd_T: float = setting(1.0, "NKD temperature of the non-target term (what the research runs used)", low=0.0,
                           low_open=True)
    nkd_alpha: float = setting(1.0, "NKD weight of the non-target term", low=0.0)
    lr_fd: float = setting(1.0, "weight of the feature-distillation term", low=0.0)
    fd_loss: str = setting("smoothL1", "feature loss: smoothL1 (beta --fd-beta) or MSE", metavar="{smoothL1,MSE}")
    fd_beta: float = setting(2.0, "smooth-L1 beta of the feature loss", low=0.0, low_open=True)
    target_lnorm: bool = setting(False, "LayerNorm (no affine, over C,H,W) of the teacher features before the "
                                        "feature loss")
    feature_n: int = setting(1, "number of distilled stages (only 1, the last stage, as in the research FD)",
                             choices=(1,))
    teacher_cache: Optional[str] = setting(None, "cache teacher outputs per image in DIR (only for fixed "
                                                 "augmentation, no mixup)", metavar="DIR")
    teacher_cache_dtype: str = setting("float32", "storage dtype of cached outputs",
                                       choices=("float32", "float16"))

    def check(self) -> None:
        from slaknet.distill.args import resolve_distill_config

        resolve_distill_config(dataclasses.asdict(self))  # the cross-option rules, one line each


SPEC = register_spec(TaskSpec(
    name="distillation", options=DistillationOptions, recipes=RECIPES, choose_recipe=choose_recipe,
    task_class="slaknet.distill.task:DistillTask", command="slaknet distill", eval_command="slaknet eval",
    predict_command="slaknet predict", default_data="builtin:insideness",
    description="knowledge distillation from a frozen teacher into a student"))
