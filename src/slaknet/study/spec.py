"""The ``study`` task's declaration: runs of the miniature ablation study are configured by the study runner
(:mod:`slaknet.study.arms` budgets), so the task has no options and one recipe. Torch-free."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from slaknet.train.tasks import NoOptions, Recipe, TaskSpec, register_spec

__all__ = ["SPEC"]


def _choose(data: Optional[str], given: Mapping[str, Any] = {}) -> str:
    return "study"


SPEC = register_spec(TaskSpec(
    name="study", options=NoOptions, recipes=(Recipe("study", "set by the study runner", {}),), choose_recipe=_choose,
    task_class="slaknet.study.task:StudyTask", command="slaknet study", default_data="study:centre-insideness",
    description="the miniature SLaK ablation study (one run per arm and seed)"))
