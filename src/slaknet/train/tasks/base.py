"""The Task interface: what a kind of training supplies to :class:`slaknet.train.trainer.Trainer`.

The trainer owns the loop and every run guarantee; a task answers five questions: which data
(:meth:`build_data`), which model (:meth:`build_model`), which loss (:meth:`criterion`, optionally a
batch transform such as Mixup), which metrics (:meth:`evaluate`), and which metric is "best"
(:attr:`best_metric`). The default training batches come from a DataLoader over ``data.train`` in an
order that is a pure function of ``(seed, epoch)`` (exact resume); a task with its own batching
overrides :meth:`train_batches`.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from slaknet.data import BUILTIN_MEAN, BUILTIN_STD

if TYPE_CHECKING:  # pragma: no cover
    from slaknet.train.run import Run

__all__ = ["Task", "TaskData", "collate"]


@dataclasses.dataclass
class TaskData:
    """A task's datasets and what checkpoints should remember about them."""

    train: Any
    val: Any
    classes: List[str]
    mean: Sequence[float] = BUILTIN_MEAN
    std: Sequence[float] = BUILTIN_STD
    description: str = ""


def collate(batch: List[Tuple[Any, ...]]) -> Tuple[torch.Tensor, ...]:
    """Stack images, labels and any extra integer fields (e.g. unreadable-file counts)."""
    xs = torch.stack([b[0] for b in batch])
    rest = [torch.tensor([int(b[i]) for b in batch], dtype=torch.long) for i in range(1, len(batch[0]))]
    return (xs, *rest)


class Task:
    """Base class of training tasks (register subclasses with :func:`slaknet.train.tasks.register_task`)."""

    name = "task"
    best_metric = "val_top1"   # key of the evaluation record that decides checkpoint-best.pth (higher wins)
    init_seed_key = 0x5EED     # seed_everything(seed, key) before data and model are built
    bad_file_word = "unreadable file"  # what the final message calls the training files it skipped

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def _spec_text(self, attr: str, default: str) -> str:
        from slaknet.train.tasks import task_specs

        spec = task_specs().get(self.name)
        return getattr(spec, attr) if spec else default

    @property
    def command(self) -> str:
        """The command that trains this task (run header); eval / predict: the "next:" lines (from its spec)."""
        return self._spec_text("command", "slaknet train")

    @property
    def eval_command(self) -> str:
        return self._spec_text("eval_command", "")

    @property
    def predict_command(self) -> str:
        return self._spec_text("predict_command", "")

    # ---- to implement
    def build_data(self, run: "Run") -> TaskData:
        raise NotImplementedError

    def build_model(self, run: "Run", num_classes: int) -> Tuple[nn.Module, Dict[str, Any]]:
        """The model and a dict of what was resolved for it (stored in the plan / checkpoint)."""
        raise NotImplementedError

    def criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    def evaluate(self, run: "Run", model: nn.Module, desc: str = "val") -> Dict[str, float]:
        """Metrics on the held-out data, keyed without prefix (``loss``, ``top1``...)."""
        raise NotImplementedError

    # ---- optional
    def check(self, run: "Run") -> None:
        """Task-specific one-line ConfigErrors once the data and batch size are known."""

    def batch_transform(self) -> Optional[Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]]:
        """E.g. Mixup / CutMix on the device batch (None: none)."""
        return None

    def sparse_config(self, run: "Run", total_steps: int) -> Any:
        """The :class:`slaknet.sparse.SparseConfig` of the run (None: dense): the config's ``sparse`` section
        with the planned step count, and the run's seed where no mask seed is given."""
        import dataclasses

        from slaknet.sparse.selection import parse_filter

        sc = self.cfg.sparse
        if not sc.enabled:
            return None
        seed = sc.seed if sc.seed is not None else int(self.cfg.run.seed)
        def filt(v: Any) -> Any:
            return v if callable(v) else parse_filter(v)

        return dataclasses.replace(sc, total_steps=int(total_steps), seed=int(seed), include=filt(sc.include),
                                   exclude=filt(sc.exclude))

    def snip_batch(self, run: "Run") -> Tuple[torch.Tensor, torch.Tensor]:
        """The first training batch (fixed order) for SNIP's saliency at initialisation."""
        ds = run.data.train
        xb, yb = collate([ds[i] for i in range(min(run.batch_size, len(ds)))])[:2]
        return xb, yb

    def collate(self, batch: List[Tuple[Any, ...]]) -> Tuple[Any, ...]:
        """How the default :meth:`train_batches` stacks samples (detection keeps per-image target lists)."""
        return collate(batch)

    def move_batch(self, run: "Run", batch: Sequence[Any]) -> Tuple[Any, Any]:
        """``(inputs, targets)`` of a training batch on the trainer's device."""
        dev = run.device
        return batch[0].to(dev, non_blocking=True), batch[1].to(dev, non_blocking=True)

    def training_loss(self, run: "Run", model: nn.Module, x: Any, y: Any) -> torch.Tensor:
        """The scalar loss of one (already mixed) batch, inside autocast. ``model`` is the DDP-wrapped model.

        Override when the loss needs more than ``criterion(model(x), y)``: a teacher (distillation), a
        model that computes its own losses (torchvision detection), auxiliary heads (segmentation).
        """
        return run.criterion(model(x), y)

    def extra_modules(self, run: "Run") -> Dict[str, nn.Module]:
        """Trainable modules outside the model (e.g. a feature-distillation projection).

        The trainer moves them to the device, optimizes their parameters with the model's (optimizer
        group ``extra``: same lr, same weight-decay rule), stores their state in ``checkpoint-last.pth``
        (``task_modules``) and restores it on resume. They are not part of the exported model.
        """
        return {}

    def param_groups(self, run: "Run", model: nn.Module) -> Optional[List[Dict[str, Any]]]:
        """Optimizer parameter groups of ``model`` (None: the trainer's weight-decay groups). A group may carry
        ``lr_scale`` (timm's schedulers multiply the scheduled lr by it), e.g. layer-wise lr decay."""
        return None

    def build_scheduler(self, run: "Run", optimizer: torch.optim.Optimizer, total_steps: int,
                        warmup: int) -> Any:
        """The per-step lr schedule (None: the trainer's warm-up + cosine). Must have ``step_update(step)``
        and ``state_dict()``, like timm's schedulers."""
        return None

    def check_resume(self, run: "Run", checkpoint: Dict[str, Any]) -> None:
        """Refuse (one-line CheckpointError) a training checkpoint this task cannot continue, e.g. one made
        with another teacher. Called before any state is loaded."""

    def num_train_samples(self, run: "Run") -> int:
        return len(run.data.train)

    def train_batches(self, run: "Run", epoch: int, skip_batches: int) -> Iterable[Tuple[torch.Tensor, ...]]:
        """Training batches of ``epoch`` from batch ``skip_batches`` on (resume in the middle of an epoch)."""
        from slaknet.train.samplers import SeededItems, SkipSampler

        sampler = run.sampler
        sampler.set_epoch(epoch)
        gen = torch.Generator()
        gen.manual_seed(int(self.cfg.seed) * 7919 + epoch)
        items = run.data.train
        if run.workers > 0:  # augmentation in workers: a function of (seed, epoch, index), for exact resume
            items = SeededItems(items, int(self.cfg.seed), epoch)
        return DataLoader(items, batch_size=run.batch_size,
                          sampler=SkipSampler(sampler, skip_batches * run.batch_size),
                          num_workers=run.workers, pin_memory=run.pin_memory, drop_last=True,
                          collate_fn=self.collate, generator=gen, persistent_workers=False)

    @classmethod
    def default_callbacks(cls) -> List[Any]:
        """Callbacks every run of this task gets (e.g. detection's AP lines)."""
        return []

    def describe(self) -> str:
        """Extra header words (e.g. the augmentation used)."""
        return ""

    def input_side(self) -> int:
        """The image side the model trains on (run header, MAC counts): ``--input-size`` unless the task
        trains on something else (segmentation folders: the crop)."""
        return int(self.cfg.input_size)

    def header_lines(self, run: "Run") -> List[str]:
        """Further run-header lines (after the general ones), e.g. what the data holds and what was chosen."""
        return []

    def summary_fields(self, run: "Run") -> Dict[str, Any]:
        """Task-specific entries of ``summary.json`` (laid over the trainer's), e.g. the deciding metric by
        its name or what was dropped from the data."""
        return {}

    def metadata(self, run: "Run") -> Dict[str, str]:
        """String metadata for ``model.safetensors`` (beside the trainer's own keys)."""
        return {}
