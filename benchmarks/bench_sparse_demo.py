"""The demo (``slaknet train``) under several layer-wise density rules, seeds in turn, one run at a time.

Each run is ``python -m slaknet train --seed S --threads 1 -o DIR ARM_FLAGS`` (recipe ``demo``); afterwards
the densities are read from the run's ``model.safetensors`` by counting exact zeros per tensor (not from
the engine's own report):

* ``large_kernel``: the large-kernel strips (``LoRA1``, ``LoRA2``, ``lkb_origin`` weights);
* ``small_conv``: the NxN kernels next to them;
* ``model``: every parameter (buffers such as BN running statistics excluded);
* ``conv_linear``: every conv / linear weight (the ``--sparse-layers all`` candidates).

One JSON line per run (arm, seed, final / best held-out top-1, train and CPU seconds, the densities and
the 1-minute load average before and after) goes to stdout and ``--out``; a table of the arms at the end.

Example: ``python benchmarks/bench_sparse_demo.py --arms erk snip uniform --seeds 0 1 2 --out runs.jsonl``
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, List

# every arm names its whole rule (also --sparse-layers, so that no recipe default leaks in and ERK is not refused)
_ALL = ["--sparse-layers", "all"]
ARMS: Dict[str, List[str]] = {
    "erk": ["--sparse-init", "ERK", "--erk-power-scale", "1"] + _ALL,       # the demo recipe before 2026-12
    "snip": ["--sparse-init", "snip"] + _ALL,                               # the paper's
    "erk_p03": ["--sparse-init", "ERK", "--erk-power-scale", "0.3"] + _ALL,  # ERK flattened until strips are sparse
    "uniform": ["--sparse-init", "uniform"] + _ALL,                         # every conv / linear at 1 - sparsity
}
_STRIPS = (".LoRA1.", ".LoRA2.", ".lkb_origin.")
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def file_densities(path: str) -> Dict[str, float]:
    """Non-zero fractions of tensor groups of a ``model.safetensors``, from exact zero counts."""
    from safetensors.torch import load_file

    sd = load_file(path)
    groups: Dict[str, List[int]] = {"large_kernel": [0, 0], "small_conv": [0, 0], "model": [0, 0],
                                    "conv_linear": [0, 0]}

    def add(group: str, t) -> None:
        groups[group][0] += int((t != 0).sum())
        groups[group][1] += t.numel()

    for name, t in sd.items():
        if name.endswith(_BUFFERS):
            continue
        add("model", t)
        if name.endswith(".weight") and t.dim() >= 2:
            add("conv_linear", t)
            if any(s in name for s in _STRIPS):
                add("large_kernel", t)
            elif ".small_conv." in name:
                add("small_conv", t)
    return {k: nz / n for k, (nz, n) in groups.items() if n}


def _load() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def run_one(arm: str, seed: int, root: str, extra: List[str], keep: bool = False) -> Dict[str, object]:
    """Train the demo once (1 thread; ``keep``: reuse a finished run in its folder) and read its summary and
    saved weights."""
    out = os.path.join(root, f"{arm}_s{seed}")
    cmd = [sys.executable, "-m", "slaknet", "train", "--seed", str(seed), "--threads", "1", "--progress", "false",
           "-o", out, "--overwrite"] + ARMS[arm] + extra
    load0 = _load()
    ran = not (keep and os.path.isfile(os.path.join(out, "summary.json")))
    if ran:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    rec: Dict[str, object] = dict(arm=arm, seed=seed, final_top1=s["final_top1"], best_top1=s["best_top1"],
                                  train_seconds=s["train_seconds"], cpu_seconds=s["cpu_seconds_this_session"],
                                  load_before=load0 if ran else None, load_after=_load() if ran else None, command=" ".join(cmd[1:]))
    rec.update({f"density_{k}": round(v, 4) for k, v in
                file_densities(os.path.join(out, "model.safetensors")).items()})
    return rec


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--root", default="runs/sparse-demo-bench", help="folder of the runs")
    ap.add_argument("--out", default=None, help="append the JSON lines here too")
    ap.add_argument("--keep", action="store_true", help="reuse finished runs found in --root (their load figures are left empty)")
    ap.add_argument("extra", nargs="*", help="more `slaknet train` flags for every arm (after --)")
    a = ap.parse_args(argv)
    recs = []
    for seed in a.seeds:  # seed-major: load drift hits every arm alike
        for arm in a.arms:
            rec = run_one(arm, seed, a.root, a.extra, a.keep)
            recs.append(rec)
            line = json.dumps(rec)
            print(line, flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(line + "\n")
    print(f"{'arm':<10} {'final top-1 (mean)':>20} {'best':>8} {'train s':>8} {'CPU s':>7} {'LK dens':>8} "
          f"{'model':>7} {'conv/lin':>8}")
    for arm in a.arms:
        rs = [r for r in recs if r["arm"] == arm]
        mean = lambda k: statistics.mean(float(r[k]) for r in rs)  # noqa: E731
        print(f"{arm:<10} {mean('final_top1'):>20.1f} {mean('best_top1'):>8.1f} {mean('train_seconds'):>8.0f} "
              f"{mean('cpu_seconds'):>7.0f} {mean('density_large_kernel'):>8.3f} {mean('density_model'):>7.3f} "
              f"{mean('density_conv_linear'):>8.3f}")


if __name__ == "__main__":
    main()
