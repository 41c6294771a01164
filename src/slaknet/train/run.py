"""The parts of a training run, in one typed object.

:func:`slaknet.train.setup.build_run` fills a :class:`Run` before the first step, in the order the random
draws require (machine, resume source, data and plan, model, optimizer, schedule, sparse engine, EMA,
logging). The :class:`~slaknet.train.trainer.Trainer` drives the loop over it; tasks receive the run, not
the trainer: the narrow view of what they need (configuration, device, data, batch, plan, autocast,
criterion, progress), without the loop, the callbacks or checkpoint writing.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Dict, List, Optional

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import torch.nn as nn

    from slaknet.train.config import Config
    from slaknet.train.tasks.base import Task, TaskData

__all__ = ["Run", "TrainState", "RunPlan", "ResumePoint", "RunFinished"]


class RunFinished(Exception):
    """Resuming a run that has done all its epochs: nothing to train, nothing rewritten."""


@dataclasses.dataclass
class TrainState:
    """Progress of a run; everything here is stored in checkpoints."""

    epoch: int = 0              # next epoch to run (0-based; the one in progress)
    batch_in_epoch: int = 0     # batches of `epoch` already consumed (mid-epoch checkpoints)
    step: int = 0               # optimizer steps done
    best_metric: float = -1.0
    best_epoch: int = -1
    elapsed: float = 0.0        # training seconds over all sessions
    bad_files: List[str] = dataclasses.field(default_factory=list)  # distinct unreadable training files
    loss_sum: float = 0.0       # this epoch's partial sums (so a mid-epoch resume reports the whole epoch)
    loss_n: int = 0
    seen: int = 0


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Values derived from the config, the data and the machine (never written back into the config)."""

    world_size: int
    effective_batch: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup: int
    lr: float
    num_classes: int
    linear_auto: Optional[str] = None
    resolved_threads: int = 1
    workers: int = 0
    model: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(d.pop("model"))
        d["resolved_warmup_steps"] = d.pop("warmup")
        d["resolved_lr"] = d.pop("lr")
        return d


@dataclasses.dataclass
class ResumePoint:
    """The training checkpoint a run continues from (read once, by the builder)."""

    path: str
    checkpoint: Dict[str, Any]


@dataclasses.dataclass
class Run:
    """Everything a run is made of (see the module docstring). Fields are filled in this order by the builder;
    a task hook sees the ones filled before it (``build_data`` sees the machine; ``build_model`` the data and
    the plan)."""

    cfg: "Config"
    task: "Task"
    out_dir: Optional[str]
    state: TrainState
    # machine
    dist: Any = None                              # slaknet.train.distributed.DistInfo
    device: Optional["torch.device"] = None
    autocast: Optional["torch.dtype"] = None      # autocast dtype, None for fp32
    resume: Optional[ResumePoint] = None
    # data and plan
    data: Optional["TaskData"] = None
    batch_size: int = 0
    sampler: Any = None
    workers: int = 0
    pin_memory: bool = False
    plan: Optional[RunPlan] = None
    # model and optimisation
    model: Optional["nn.Module"] = None
    model_ddp: Optional["nn.Module"] = None        # the model, DDP-wrapped under torch.distributed
    extra_modules: Dict[str, "nn.Module"] = dataclasses.field(default_factory=dict)
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None                            # GradScaler for fp16
    sparse_config: Any = None                     # slaknet.sparse.SparseConfig, None when dense
    engine: Any = None                            # slaknet.sparse.SparseEngine
    ema: Any = None                               # timm ModelEmaV3
    mix: Any = None                               # batch transform (Mixup)
    criterion: Any = None
    # reporting
    logger: Any = None                            # slaknet.train.logs.RunLogger
    progress: bool = False                        # progress bars
    progress_lines: bool = False                  # plain progress lines (no terminal)
    history: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
