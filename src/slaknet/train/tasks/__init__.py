"""The task registry: what a kind of training declares about itself (:class:`TaskSpec`) and the classes that
train it (:func:`register_task`).

A task package (``slaknet/segment/``, ``slaknet/detect/``...) holds a light ``spec.py`` that registers a
:class:`TaskSpec`: its options dataclass (the ``task`` section of its configuration), its recipes and how
``--recipe auto`` chooses among them, the command that trains it and the class that implements it. The
``slaknet`` command and :func:`slaknet.config` are built from these specs; nothing in ``train/`` names a
task package: specs are found by looking for ``slaknet/*/spec.py`` (and the ``slaknet.tasks`` entry-point
group, for tasks from other distributions). Adding a task is one package.

Torch-free: the specs build command-line parsers, so importing them must stay light.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type

from slaknet.errors import ConfigError

__all__ = ["register_task", "get_task_class", "available_tasks", "TASKS", "TaskSpec", "Recipe", "register_spec",
           "get_spec", "task_specs", "NoOptions"]

TASKS: Dict[str, Type] = {}
_SPECS: Dict[str, "TaskSpec"] = {}
_DISCOVERED = False


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options section of a task that has none of its own."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named partial configuration: ``values`` maps section names (``data``, ``optim``, ``sparse``, ``task``...)
    to the fields it sets. ``adapt(data)``: values that depend on the data (e.g. the input size of a small
    folder), applied after ``values``; ``gpus``: the GPUs a published recipe ran on (for the run header)."""

    name: str
    help: str
    values: Mapping[str, Mapping[str, Any]]
    adapt: Optional[Callable[[str], Dict[str, Any]]] = None
    gpus: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Everything the command line and :func:`slaknet.config` need to know about a task, without importing it.

    ``choose_recipe(data, given)`` answers ``--recipe auto``; ``given_data(given)``: the data that options other
    than ``--data`` name (detection's ``--train-annotations FILE``), used as ``data`` when it is not given; ``task_class`` is ``"module:Class"`` (imported when a run
    starts); ``command`` is the command that trains it (``slaknet segment train``); ``sections``: the general
    configuration sections its command shows (all by default).
    """

    name: str
    options: type
    recipes: Tuple[Recipe, ...]
    choose_recipe: Callable[[Optional[str]], str]
    task_class: str
    command: str
    eval_command: str = ""
    predict_command: str = ""
    description: str = ""
    default_data: Optional[str] = None
    given_data: Optional[Callable[[Mapping[str, Any]], Optional[str]]] = None
    sections: Tuple[str, ...] = ("data", "model", "optim", "augment", "run", "sparse")

    def recipe(self, name: str) -> Recipe:
        for r in self.recipes:
            if r.name == name:
                return r
        raise ConfigError(f"{self.command}: unknown recipe {name!r}; choose auto, "
                          f"{', '.join(r.name for r in self.recipes)}")

    @property
    def recipe_names(self) -> List[str]:
        return [r.name for r in self.recipes]


def register_spec(spec: TaskSpec) -> TaskSpec:
    """Make a task known to the command line and :func:`slaknet.config` (called by a package's ``spec.py``)."""
    _SPECS[spec.name] = spec
    return spec


def _discover() -> None:
    """Import every ``slaknet/<package>/spec.py`` and the specs of the ``slaknet.tasks`` entry points, once."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import slaknet

    root = os.path.dirname(slaknet.__file__)
    for name in sorted(os.listdir(root)):
        if os.path.isfile(os.path.join(root, name, "spec.py")):
            importlib.import_module(f"slaknet.{name}.spec")
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="slaknet.tasks"):
            ep.load()
    except Exception:  # a broken third-party entry point must not break slaknet's own commands
        pass


def task_specs() -> Dict[str, TaskSpec]:
    """All registered task specs by name."""
    _discover()
    return dict(_SPECS)


def get_spec(name: str) -> TaskSpec:
    """The spec of task ``name``; one-line ConfigError naming the known tasks otherwise."""
    _discover()
    spec = _SPECS.get(name)  # (no copy: Config looks its spec up on every read by key)
    if spec is None:
        raise ConfigError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(_SPECS))}")
    return spec


def register_task(name: str) -> Callable[[Type], Type]:
    """Class decorator: make a :class:`~slaknet.train.tasks.base.Task` subclass the implementation of ``name``."""
    def deco(cls: Type) -> Type:
        TASKS[name] = cls
        cls.name = name
        return cls
    return deco


def available_tasks() -> List[str]:
    return sorted(set(TASKS) | set(task_specs()))


def get_task_class(name: str) -> Type:
    """The class implementing task ``name`` (imported from its spec on first use)."""
    if name not in TASKS:
        spec = task_specs().get(name)
        if spec is not None:
            module, _, cls = spec.task_class.partition(":")
            importlib.import_module(module)
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; registered tasks: {', '.join(available_tasks())}")
    return TASKS[name]
