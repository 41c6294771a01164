"""Knowledge distillation from a (large-kernel) teacher: losses, option parsing, teacher-output cache.

``slaknet.distill.spec`` (torch-free) declares the options and registers the task; ``slaknet.distill.args``
checks how they combine; ``slaknet.distill.losses`` the KD /
NKD / FD losses and their registry; ``slaknet.distill.cache`` the on-disk teacher-output cache. The names
below are imported lazily, so ``import slaknet.distill.args`` does not pull in the loss code.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "KDLoss": "losses", "NKDLoss": "losses", "FeatureDistillLoss": "losses", "DistillCriterion": "losses",
    "LogitDistillLoss": "losses", "LOGIT_LOSSES": "losses", "FEATURE_LOSSES": "losses",
    "register_loss": "losses", "build_distill_loss": "losses", "as_nchw": "losses",
    "TeacherCache": "cache", "TeacherCacheWriter": "cache", "teacher_identity": "cache",
    "dataset_identity": "cache", "check_cache_allowed": "cache", "TeacherCacheError": "cache",
    "WithIndex": "cache", "hard_labels": "losses",
    "resolve_distill_config": "args", "parse_distill_type": "args", "DistillationOptions": "spec",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"slaknet.distill.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'slaknet.distill' has no attribute {name!r}")
