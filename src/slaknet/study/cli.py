"""``slaknet study``: run the miniature SLaK ablation study (resumable) and write table and plots."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import List

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slaknet.settings import CommonOptions, DataSettings, OptimSettings, RunSettings, add_setting

    add_setting(parser, CommonOptions, "budget", default="default",
                help="study size: tiny (smoke test, seconds), short (a quick look, 2 seeds), "
                     "default (~26 min on 2 CPU cores, 4 seeds), large (GPU)")
    add_setting(parser, RunSettings, "output_dir", default=None, help="output folder (default runs/study-<budget>)")
    parser.add_argument("--arms", default=None,
                        help="comma-separated subset of arms (default all; see --list)")
    add_setting(parser, CommonOptions, "seeds", default=None)
    add_setting(parser, OptimSettings, "epochs", default=None, help="override the budget's epochs")
    add_setting(parser, DataSettings, "train_samples", default=None, help="override the budget's training images")
    add_setting(parser, DataSettings, "val_samples", default=None, help="override the budget's held-out images")
    add_setting(parser, DataSettings, "difficulty", default=None, help="contour wiggle / clutter / noise in [0, 1]")
    parser.add_argument("--d-min", dest="d_min", type=float, default=None,
                        help="nearest ink at least this fraction of the image side from the centre")
    parser.add_argument("--d-max", dest="d_max", type=float, default=None,
                        help="nearest contour point at most this fraction of the side from the centre")
    parser.add_argument("--band", type=float, default=None,
                        help="width of each image's distance window as a fraction of the side (graded task: the "
                             "windows spread over d-min..d-max; a band as wide as the range: one shared window)")
    parser.add_argument("--decoy", type=float, default=None,
                        help="probability of a decoy (open ring / extra closed contour) per image, in [0, 1]")
    parser.add_argument("--no-equal-time", dest="equal_time", action="store_false", default=None,
                        help="skip the equal-training-time controls")
    add_setting(parser, RunSettings, "threads", default="1",
                help="torch CPU threads: N or auto (default 1: small nets gain little from more, and a shared CPU "
                     "makes multi-threaded runs far slower)")
    add_setting(parser, RunSettings, "device", default=None, help="cpu, cuda or auto (the default: cuda when available)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs at a time, each in its own process (default: 2 on a CPU with 2+ cores, 1 on a GPU)")
    parser.add_argument("--report-only", dest="report_only", action="store_true",
                        help="only rewrite results.md and the plots from results.jsonl")
    parser.add_argument("--list", dest="list_arms", action="store_true", help="print the arms and budgets, then exit")
    add_setting(parser, RunSettings, "progress", default=False, nargs=0, help="progress bars per run")


def run(args: argparse.Namespace) -> int:
    import torch

    from slaknet.study.arms import BUDGETS, build_arms, get_budget
    from slaknet.study.model import receptive_radius
    from slaknet.study.report import write_report
    from slaknet.study.runner import run_study
    from slaknet.train.machine import resolve_threads

    budget = get_budget(args.budget, seeds=args.seeds, epochs=args.epochs, train_samples=args.train_samples,
                        val_samples=args.val_samples, difficulty=args.difficulty, d_min=args.d_min,
                        d_max=args.d_max, decoy=args.decoy, band=args.band)
    if args.list_arms:
        edges = ", ".join(f"{e:.0f}" for e in budget.band_edges())
        print(f"budget {budget.name}: {budget.image_size} px, stride-{budget.stem} stem, {budget.depth} block(s), "
              f"width {budget.width}, {budget.feature_map}x{budget.feature_map} map, nearest contour "
              f"{budget.d_min * budget.image_size:.0f}-{budget.d_max * budget.image_size:.0f} px from the centre"
              + (f" (each image its own {budget.band * budget.image_size:.1f} px window; bands {edges} px)"
                 if budget.graded else ""))
        for a in build_arms(budget):
            print(f"  {a.name:<20} {a.module:<16} RF {receptive_radius(a.kernel_size, budget.depth, budget.stem):>3} px"
                  f"  {a.description}")
        print("budgets: " + ", ".join(BUDGETS))
        return 0
    out = args.output_dir or os.path.join("runs", f"study-{budget.name}")
    if args.report_only:
        paths = write_report(out)
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
        return 0
    threads = resolve_threads(args.threads)
    if threads is not None:
        torch.set_num_threads(threads)
    device = args.device
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    arms: List[str] = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else []
    command = "slaknet " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "slaknet study"
    jobs = args.jobs if args.jobs is not None else (min(2, os.cpu_count() or 1) if device == "cpu" else 1)
    records = run_study(budget, out, arms or None, equal_time=args.equal_time, command=command, device=device,
                        progress=args.progress, jobs=jobs)
    paths = write_report(out, records)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0
