"""Run logging: JSON lines, TensorBoard scalars, console lines, progress (bar or plain lines), curves PNG.

Only rank 0 writes; every method is a no-op elsewhere. Without a terminal (CI, ``nohup``, a pipe) a
plain line goes to stderr about every 10% of an epoch or 30 s, whichever comes first, instead of a bar.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

__all__ = ["RunLogger", "StepProgress", "plot_curves"]


class RunLogger:
    """JSON-lines log, TensorBoard scalars and console lines (no-ops unless ``enabled``)."""

    def __init__(self, out_dir: Optional[str], enabled: bool, tensorboard: bool, tb_dir: Optional[str]) -> None:
        self.enabled = enabled and out_dir is not None
        self.console = self.enabled  # a run without an output folder (the study's) prints nothing
        self.path = os.path.join(out_dir, "log.jsonl") if out_dir else None
        self.tb = None
        if self.enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=tb_dir or os.path.join(out_dir, "tb"))  # type: ignore[arg-type]
            except Exception as exc:  # tensorboard missing or broken: keep training
                print(f"TensorBoard disabled ({type(exc).__name__}: {exc})", file=sys.stderr)

    def record(self, rec: Dict[str, Any]) -> None:
        if self.enabled and self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def scalars(self, step: int, values: Dict[str, Any], prefix: str = "") -> None:
        if self.tb is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                self.tb.add_scalar(prefix + k, float(v), step)

    def print(self, msg: str) -> None:
        if self.console:
            print(msg, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None


class StepProgress:
    """A tqdm bar on a terminal; otherwise a line to stderr every ~10% of the epoch or ``every_s`` seconds."""

    def __init__(self, bar: bool, lines: bool, total: int, initial: int, desc: str, every_s: float = 30.0,
                 note: str = "") -> None:
        self.total, self.done, self.desc, self.every_s = total, initial, desc, every_s
        self.bar = None
        self.lines = lines and not bar
        self.t0 = self.t_last = time.perf_counter()
        self.next_at = initial + max(1, total // 10)
        self.postfix: Dict[str, str] = {}
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True, file=sys.stderr)
        if self.lines and note:
            print(f"{desc}: {note}", file=sys.stderr, flush=True)

    def set(self, **values: str) -> None:
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            return
        now = time.perf_counter()
        if self.lines and (self.done >= self.next_at or now - self.t_last >= self.every_s) and self.done < self.total:
            extra = ", ".join(f"{k} {v}" for k, v in self.postfix.items())
            print(f"{self.desc}: batch {self.done}/{self.total} ({now - self.t0:.0f}s)" + (f", {extra}" if extra else ""),
                  file=sys.stderr, flush=True)
            self.t_last = now
            self.next_at = self.done + max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def plot_curves(history: List[Dict[str, Any]], path: str) -> None:
    """Learning curves (train / val loss; val top-1, mIoU or AP, whichever the task reports) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] + 1 for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    if any("val_loss" in h for h in history):
        a.plot([h["epoch"] + 1 for h in history if "val_loss" in h],
               [h["val_loss"] for h in history if "val_loss" in h], "s-", label="val loss")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    a.grid(alpha=0.3)
    for key, lab in (("val_top1", "val top-1"), ("ema_top1", "EMA top-1"), ("val_miou", "val mIoU"),
                     ("val_map", "val box AP"), ("val_mask_map", "val mask AP")):
        pts = [(h["epoch"] + 1, h[key]) for h in history if key in h]
        if pts:
            b.plot(*zip(*pts), "o-", label=lab)
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy / mIoU / AP (%)")
    if b.get_legend_handles_labels()[0]:
        b.legend()
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
