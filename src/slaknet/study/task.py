"""The study's training task: one arm of the ablation on the centre-insideness data, for the shared Trainer.

The study's batches come from :meth:`CentreInsideness.batch` (whole-tensor indexing, one random
flip/transpose per batch from the run's own generator), its model is :class:`StudyNet`, and its sparse
arms use the budget's sparsity with the stem and head dense. Everything else (optimizer, warm-up +
cosine schedule, sparse engine hooks, NaN stop, time budget) is the trainer's.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from slaknet.study.arms import Arm, Budget
from slaknet.study.data import CentreInsideness
from slaknet.train.tasks import register_task
from slaknet.train.tasks.base import Task, TaskData

if TYPE_CHECKING:  # pragma: no cover
    from slaknet.train.run import Run

__all__ = ["StudyTask", "study_config"]


def study_config(budget: Budget, seed: int, n_train: int, device: str, progress: bool,
                 time_limit: Optional[float]) -> Any:
    """The configuration of one study run (no files, no per-epoch evaluation, dense in the config: the task
    builds the sparse engine's config itself)."""
    from slaknet.train.config import make_config

    steps = n_train // budget.batch_size
    warmup = max(1, int(budget.warmup_frac * steps * budget.epochs))
    return make_config("study", "study", data="study:centre-insideness", epochs=budget.epochs if
                       time_limit is None else 10 ** 6, batch_size=budget.batch_size, lr=budget.lr,
                       weight_decay=budget.weight_decay, warmup_steps=warmup, min_lr=1e-6, seed=seed,
                       device=device, progress=progress, tensorboard=False, output_dir="", input_size=budget.image_size,
                       model="study")


@register_task("study")
class StudyTask(Task):
    """Train ``arm`` on the budget's data (``data()`` returns the cached train / val splits)."""

    init_seed_key = 0x57D1
    best_metric = "val_top1"

    def __init__(self, cfg: Any, arm: Arm, budget: Budget,
                 data: Callable[[], Tuple[CentreInsideness, CentreInsideness]]) -> None:
        super().__init__(cfg)
        self.arm, self.budget, self._data = arm, budget, data
        self.aug = torch.Generator().manual_seed(int(cfg.seed) * 7919 + 1)

    def build_data(self, run: "Run") -> TaskData:
        train, val = self._data()
        return TaskData(train, val, ["outside", "inside"], (0.5,), (0.5,), f"study data: {len(train)} images")

    def build_model(self, run: "Run", num_classes: int) -> Tuple[nn.Module, Dict[str, Any]]:
        from slaknet.study.runner import build_model

        return build_model(self.arm, self.budget), {"kernels": [self.arm.kernel_size]}

    def sparse_config(self, run: "Run", total_steps: int) -> Any:
        if not self.arm.sparse:
            return None
        from slaknet.sparse import SparseConfig

        b = self.budget
        return SparseConfig(sparsity=b.sparsity, total_steps=total_steps, growth=self.arm.growth, fix=self.arm.fix,
                            update_frequency=b.update_frequency, exclude=["stem.*", "head.*"], seed=int(self.cfg.seed))

    def train_batches(self, run: "Run", epoch: int, skip_batches: int) -> Iterator[Tuple[torch.Tensor, ...]]:
        ds, bs = run.data.train, run.batch_size
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(int(self.cfg.seed) * 1_000_003 + epoch))
        for b in range(skip_batches, len(ds) // bs):
            yield ds.batch(order[b * bs:(b + 1) * bs], augment=self.aug)

    @torch.no_grad()
    def evaluate(self, run: "Run", model: nn.Module, desc: str = "val", bs: int = 256,
                 per_image: bool = False) -> Dict[str, Any]:
        """Held-out top-1 (%) and loss; with ``per_image``, also ``correct``: each image's hit (bool tensor),
        for the accuracy per distance band."""
        ds, dev = run.data.val, run.device
        was = model.training
        model.eval()
        hits, loss_sum = [], 0.0
        for i in range(0, len(ds), bs):
            x, y = ds.batch(torch.arange(i, min(i + bs, len(ds))))
            out = model(x.to(dev))
            loss_sum += float(F.cross_entropy(out, y.to(dev), reduction="sum"))
            hits.append(out.argmax(1).cpu() == y)
        model.train(was)
        correct = torch.cat(hits)
        out: Dict[str, Any] = {"top1": 100.0 * float(correct.float().mean()), "loss": loss_sum / len(ds)}
        if per_image:
            out["correct"] = correct
        return out

    def describe(self) -> str:
        return f"arm {self.arm.name}"
