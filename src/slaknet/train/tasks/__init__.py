"""The task registry: ``name -> Task class``. A task supplies data, model, loss and metrics to the Trainer.

Add a task by subclassing :class:`slaknet.train.tasks.base.Task` in a small file and decorating it with
:func:`register_task`; ``slaknet train --task NAME`` then trains it with every guarantee of the trainer
(atomic checkpoints, exact resume, NaN stop, sparse engine, EMA, AMP, DDP, logs).
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Type

from slaknet.errors import ConfigError

__all__ = ["register_task", "get_task_class", "available_tasks", "TASKS"]

TASKS: Dict[str, Type] = {}
# built-in tasks, imported on first use (keeps `slaknet --help` and config validation light)
_LAZY = {"classification": "slaknet.train.tasks.classification", "study": "slaknet.study.task",
         "distillation": "slaknet.distill.task", "segmentation": "slaknet.segment.task",
         "detection": "slaknet.detect.task"}


def register_task(name: str) -> Callable[[Type], Type]:
    """Class decorator: make a :class:`~slaknet.train.tasks.base.Task` subclass available as ``name``."""
    def deco(cls: Type) -> Type:
        TASKS[name] = cls
        cls.name = name
        return cls
    return deco


def available_tasks() -> List[str]:
    return sorted(set(TASKS) | set(_LAZY))


def get_task_class(name: str) -> Type:
    """The registered task class ``name``; one-line ConfigError naming the known tasks otherwise."""
    if name not in TASKS and name in _LAZY:
        importlib.import_module(_LAZY[name])
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; registered tasks: {', '.join(available_tasks())}")
    return TASKS[name]
