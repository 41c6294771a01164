"""The ``slaknet distill`` demo: does a large-kernel teacher make its 7x7 twin better on the built-in task?

Three arms on the built-in insideness data (offline, CPU): the teacher (``slak_pico``, large kernels,
sparse, the ``slaknet train`` demo recipe), the student ``slak_pico_k7`` trained alone, and the same
student distilled from the teacher; the two student arms share data, epochs, schedule and seeds and differ
only in the loss. Each run is an ordinary Trainer run in its own folder with ``--auto-resume``, so an
interrupted demo continues where it stopped and a finished run is not repeated.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["DemoBudget", "BUDGETS", "run_demo", "summarise"]


@dataclasses.dataclass(frozen=True)
class DemoBudget:
    """Sizes of one demo: the teacher's run and each student's run."""

    name: str
    seeds: int
    teacher_samples: int
    teacher_epochs: int
    student_samples: int
    student_epochs: int
    val_samples: int
    input_size: int = 64
    # the task has two classes: NKD's non-target term is then empty (one non-target class), so the demo uses
    # KD plus feature distillation (the teacher's last-stage map carries where the contour is)
    distill_type: str = "KD+FD"
    alpha: float = 0.5
    T: float = 2.0
    lr_fd: float = 1.0


BUDGETS: Dict[str, DemoBudget] = {
    "tiny": DemoBudget("tiny", 1, 128, 1, 128, 1, 64, input_size=32),
    "short": DemoBudget("short", 2, 6000, 6, 3000, 6, 1000),
    "default": DemoBudget("default", 3, 6000, 6, 3000, 6, 1000),
    "large": DemoBudget("large", 5, 6000, 6, 3000, 6, 2000),
}


def _common(b: DemoBudget, args: argparse.Namespace, seed: int) -> Dict[str, Any]:
    """Options every demo run shares (the machine options the user gave the demo pass through)."""
    opts: Dict[str, Any] = dict(data="builtin:insideness", val_samples=b.val_samples, input_size=b.input_size,
                                seed=seed, auto_resume=True, tensorboard=False)
    for key in ("threads", "progress", "precision"):
        if getattr(args, key, None) is not None:
            opts[key] = getattr(args, key)
    return opts


def _result(run_dir: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _run(name: str, run_dir: str, options: Dict[str, Any], distill: bool, log: List[str]) -> Dict[str, Any]:
    """One demo run (skipped when its folder holds a finished run's summary)."""
    import slaknet

    done = _result(run_dir)
    if done is None:
        print(f"\n== distill demo: {name} -> {run_dir}", flush=True)
        t0 = time.perf_counter()
        slaknet.fit(slaknet.config("distillation" if distill else "classification", output_dir=run_dir, **options))
        done = _result(run_dir) or {}
        done["demo_wall_s"] = time.perf_counter() - t0
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(done, f, indent=2)
    log.append(name)
    return done


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "-"
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{m:.1f} ± {sd:.1f}"


def summarise(records: Dict[str, Any], b: DemoBudget, out: str) -> str:
    """The results table (markdown), also written to ``OUT/results.md`` and ``results.json``."""
    t = records["teacher"]
    lines = [f"# slaknet distill demo ({b.name} budget)", "",
             f"Built-in insideness data at {b.input_size} px. Teacher: slak_pico (large kernels, sparse), "
             f"{b.teacher_samples} images x {b.teacher_epochs} epochs. Students: slak_pico_k7 (7x7), dense, "
             f"{b.student_samples} images x {b.student_epochs} epochs, {b.seeds} seed(s); distilled with "
             f"{b.distill_type} (alpha {b.alpha:g}, T {b.T:g}, feature weight {b.lr_fd:g}). Held-out: {b.val_samples} images.", "",
             "| arm | final top-1 (%) mean ± std | per seed | wall (s) per run |", "|---|---|---|---|",
             f"| teacher slak_pico | {t.get('final_top1', float('nan')):.1f} | - | {t.get('demo_wall_s', 0):.0f} |"]
    for arm in ("alone", "distilled"):
        rs = records[arm]
        accs = [r.get("final_top1") for r in rs if r.get("final_top1") is not None]
        walls = [r.get("demo_wall_s", 0.0) for r in rs]
        lines.append(f"| student 7x7, {arm} | {_mean_std(accs)} | {' / '.join(f'{a:.1f}' for a in accs)} | "
                     f"{sum(walls) / max(len(walls), 1):.0f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"budget": dataclasses.asdict(b), **records}, f, indent=2)
    return text


def run_demo(args: argparse.Namespace) -> Dict[str, Any]:
    """Teacher, then per seed the student alone and distilled; prints and writes the table."""
    b = BUDGETS[args.budget]
    if args.seeds is not None:
        b = dataclasses.replace(b, seeds=int(args.seeds))
    out = getattr(args, "output_dir", None) or os.path.join("runs", f"distill-demo-{b.name}")
    os.makedirs(out, exist_ok=True)
    seen: List[str] = []
    teacher_dir = os.path.join(out, "teacher")
    records: Dict[str, Any] = {"teacher": _run("teacher (slak_pico)", teacher_dir, dict(
        _common(b, args, 0), model="slak_pico", train_samples=b.teacher_samples, epochs=b.teacher_epochs),
        False, seen), "alone": [], "distilled": []}
    ckpt = os.path.join(teacher_dir, "model.safetensors")
    for seed in range(b.seeds):
        student = dict(_common(b, args, seed), model="slak_pico_k7", sparse=False, train_samples=b.student_samples,
                       epochs=b.student_epochs)
        records["alone"].append(_run(f"student alone, seed {seed}", os.path.join(out, f"alone-s{seed}"),
                                     student, False, seen))
        records["distilled"].append(_run(
            f"student distilled, seed {seed}", os.path.join(out, f"distilled-s{seed}"),
            dict(student, teacher_checkpoint=ckpt, teacher_reparam=True, distill_type=b.distill_type,
                 distill_alpha=b.alpha, distill_T=b.T, lr_fd=b.lr_fd), True, seen))
    text = summarise(records, b, out)
    print("\n" + text + f"\n(table: {os.path.join(out, 'results.md')})")
    return records
