"""Ready-made :class:`~slaknet.train.trainer.Callback` s."""
from __future__ import annotations

import time
from typing import Any, List, Optional

from slaknet.train.trainer import Callback

__all__ = ["LossCurve", "TimeBudget"]


class LossCurve(Callback):
    """Keeps every optimizer step's training loss (``losses``)."""

    def __init__(self) -> None:
        self.losses: List[float] = []

    def on_step_end(self, trainer: Any, loss: float) -> None:
        self.losses.append(float(loss))


class TimeBudget(Callback):
    """Train for ``seconds`` of wall-clock time instead of the configured epochs.

    After ``plan_after`` steps the schedule is re-planned for the number of steps that fit in the budget
    (at the step time measured so far); training stops when the budget is used or the plan is done.
    """

    def __init__(self, seconds: float, plan_after: int = 10) -> None:
        self.seconds, self.plan_after = float(seconds), int(plan_after)
        self.t0: Optional[float] = None
        self.planned = False
        self.train_s = 0.0

    def on_train_start(self, trainer: Any) -> None:
        self.t0 = time.perf_counter()

    def on_step_end(self, trainer: Any, loss: float) -> None:
        step = trainer.state.step
        self.train_s = time.perf_counter() - (self.t0 or 0.0)
        if not self.planned and step == min(self.plan_after, trainer.plan.steps_per_epoch):
            total = max(step + 1, int(self.seconds / (self.train_s / step)))
            trainer.replan(total, min(trainer.plan.warmup, total // 10 + 1))
            self.planned = True
        if step >= trainer.plan.total_steps or self.train_s >= self.seconds:
            trainer.stop, trainer.stop_reason = True, f"time budget {self.seconds:.0f}s"
