"""auto vs plain, same process, arms interleaved run by run (medians): is ``auto`` ever slower than ``plain``?

Workloads: SLaK-T 224 px batch 8 forward, training step and reparameterized inference, and ``slak_pico``
64 px batch 64 training step (the CPU demo's model). ``plain`` = ``F.conv2d`` / ``F.linear`` in slaknet's
layout (``SLAKNET_DWCONV=plain SLAKNET_LINEAR=plain``); ``auto`` = the defaults, whose choices come from
this machine's cache or are timed during the first (unrecorded) run (docs/speed.md, "How auto decides").
Prints the CPU, threads, load, each median, the ratio plain time / auto time (> 1: auto faster), where
auto's choices came from and what timing them cost.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_auto.py [--threads 1] [--reps 3] [--retime]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from slaknet.bench import run_bench
from slaknet.layers import autotune

# (model, image size, batch, workloads, reps multiplier)
CASES = (("slak_tiny", 224, 8, ("forward", "train step", "reparam inference"), 1),
         ("slak_pico", 64, 64, ("train step",), 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3, help="timed runs per arm and workload (SLaK-T; pico: 3x)")
    ap.add_argument("--retime", action="store_true", help="forget this machine's cached choices first")
    ap.add_argument("--cases", default="slak_tiny,slak_pico")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.retime:
        print(f"forgot {autotune.forget()} cached choice(s)")
    print(f"CPU: {autotune.cpu_model()}; {os.cpu_count()} logical CPUs; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); cache {autotune.cache_path() or 'off'}")
    rows = []
    for model, size, batch, works, mult in CASES:
        if model not in args.cases.split(","):
            continue
        before, load0, t0 = autotune.stats(), os.getloadavg()[0], time.time()
        res = run_bench(model, batch, size, args.reps * mult, args.threads, ("plain", "auto"), workloads=works,
                        peak_gmacs=float("nan"), progress=False)
        after = autotune.stats()
        for work, per in res["times"].items():  # type: ignore[union-attr]
            tp, ta = statistics.median(per["plain"]), statistics.median(per["auto"])
            rows.append((f"{model} {size}px batch {batch}", work, tp, ta, len(per["plain"])))
        print(f"{model}: {time.time() - t0:.0f} s, load {load0:.2f} -> {os.getloadavg()[0]:.2f}; auto's choices "
              f"timed now {after.timed - before.timed} ({after.seconds - before.seconds:.1f} s), "
              f"from the cache {after.cached - before.cached}, rule (budget spent) {after.budget - before.budget}",
              flush=True)
    print("\n| workload | | plain s | auto s | plain / auto | runs per arm |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for case, work, tp, ta, n in rows:
        print(f"| {case} | {work} | {tp:.3f} | {ta:.3f} | {tp / ta:.3f}x | {n} |")
    print("\nauto's choices:")
    for key, d in sorted(autotune.decisions().items()):
        print(f"  {key}: {d.choice} ({d.source}; "
              + ", ".join(f"{n} {1e3 * t:.1f} ms" for n, t in d.medians.items()) + ")")


if __name__ == "__main__":
    main()
