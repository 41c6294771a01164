"""The demo's training step (``slaknet train`` with no arguments), before vs after this branch's changes.

One process, arms interleaved round by round (order alternating), medians. The model, optimizer, sparse
engine, data and ``auto`` backends are exactly the demo's (built by the trainer itself, no output folder).
Arms:

* ``before``: depthwise weight gradients of the tiny maps by the kw-fold-copy banded GEMM, downsampling
  convs as oneDNN convs, the batch's images fetched one by one (what the code did before);
* ``after``: the flat-row banded GEMM (long axis H) or the all-pairs GEMMs (long axis W) on maps of <= 64 pixels, the downsamplers as patch GEMMs and the batch fetched
  at once (``InsidenessDataset.__getitems__``).

Each timed step fetches its batch from the in-memory images (flip, float conversion, normalisation,
collation: the demo's ``num_workers 0``), then runs forward, backward and the optimizer step.

The allocator setting (:func:`slaknet.train.machine.keep_freed_memory`) is per process and cannot be undone,
so in-process both arms run with it. ``--processes K`` instead alternates 2K child processes: ``before`` with
``SLAKNET_MALLOC=default`` and the old code paths, ``after`` with everything on; it prints each process's
median step and the ratio of the medians over processes.

The steps run in both arms advance the same model (both arms see the same mixture of states). ``--epoch``
also times one whole training epoch per arm (93 steps, data in memory). ``--data`` times the built-in data
of the first epoch: rendering every image (a cold cache) vs loading the persisted images (a warm one).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_demo_train.py --rounds 7 --steps 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from slaknet.layers.autotune import cpu_model


def set_arm(arm: str) -> None:
    global BATCHED_FETCH
    from slaknet.layers import conv, dwconv_impl

    on = arm == "after"
    BATCHED_FETCH = on
    conv.PATCH_GEMM = on
    dwconv_impl._GEMM_FLAT_MAX_PIXELS = 64 if on else 0


def _faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def alternate(args: argparse.Namespace) -> None:
    import subprocess

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs), torch {torch.__version__}, {args.threads} thread(s), "
          f"{args.processes} process pairs alternated, load average before {os.getloadavg()}", flush=True)
    res = {"before": [], "after": []}
    for p in range(args.processes):
        for arm in (("before", "after") if p % 2 == 0 else ("after", "before")):
            env = dict(os.environ, SLAKNET_MALLOC="default" if arm == "before" else "")
            out = subprocess.run([sys.executable, __file__, "--only", arm, "--rounds", str(args.rounds), "--steps",
                                  str(args.steps), "--threads", str(args.threads)], env=env, capture_output=True,
                                 text=True, check=True).stdout
            line = [ln for ln in out.splitlines() if ln.startswith("RESULT")][-1].split()
            res[arm].append(float(line[2]))
            print(f"  process {p + 1} {arm:7s} {float(line[2]) * 1e3:7.1f} ms/step (minor page faults in the "
                  f"process: {line[3]})", flush=True)
    med = {a: statistics.median(v) for a, v in res.items()}
    print(f"training step, median over processes: before {med['before'] * 1e3:.1f} ms, after "
          f"{med['after'] * 1e3:.1f} ms, ratio {med['before'] / med['after']:.3f}x")
    print(f"load average after {os.getloadavg()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5, help="training steps per arm and round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epoch", action="store_true", help="also one whole epoch per arm and round (slow)")
    ap.add_argument("--epoch-rounds", type=int, default=2)
    ap.add_argument("--data", action="store_true", help="also: render the demo's images vs load them")
    ap.add_argument("--processes", type=int, default=0, help="alternate this many before/after process pairs")
    ap.add_argument("--only", choices=("before", "after"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.processes:
        return alternate(args)
    torch.set_num_threads(args.threads)
    import slaknet
    from slaknet.train.trainer import Trainer

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), load average before {os.getloadavg()}", flush=True)
    cfg = slaknet.config("classification", recipe="demo", threads=args.threads)
    tr = Trainer(cfg, out_dir=None)
    tr._setup()
    torch.set_num_threads(args.threads)
    tr._begin_epoch(0)
    batches = []
    for b in tr.task.train_batches(tr.run, 0, 0):  # renders (or loads) every training image once
        batches.append(b)
    from slaknet.train.tasks.base import collate

    ds, bs = tr.data.train, tr.batch_size
    print(f"demo: {type(tr.model).__name__} {cfg.model.name}, batch {tr.batch_size}, "
          f"{len(batches)} batches an epoch, sparse engine {'on' if tr.engine is not None else 'off'}, "
          f"optimizer {type(tr.optimizer).__name__} (fused {tr.optimizer.param_groups[0].get('fused')})", flush=True)
    k = 0

    def step() -> None:
        nonlocal k
        idx = list(range((k % len(batches)) * bs, (k % len(batches) + 1) * bs))
        items = ds.__getitems__(idx) if BATCHED_FETCH else [ds[i] for i in idx]
        tr._forward_backward(collate(items), True, 0, 0)
        tr._optimizer_step()
        k += 1

    arms = (args.only,) if args.only else ("before", "after")
    for arm in arms:  # warm-up (oneDNN primitives, autotune answers)
        set_arm(arm)
        for _ in range(3):
            step()
    times = {a: [] for a in arms}
    for r in range(args.rounds):
        for arm in (arms if r % 2 == 0 else arms[::-1]):
            set_arm(arm)
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[arm].append((time.perf_counter() - t) / args.steps)
    med = {a: statistics.median(v) for a, v in times.items()}
    print(f"training step, median of {args.rounds} rounds x {args.steps} steps:")
    for a in arms:
        print(f"  {a:7s} {med[a] * 1e3:8.1f} ms  ({tr.batch_size / med[a]:.0f} img/s)   rounds: "
              + " ".join(f"{t * 1e3:.0f}" for t in times[a]))
    if args.only:
        print(f"RESULT {args.only} {med[args.only]:.6f} {_faults()}", flush=True)
        return
    print(f"  ratio before / after: {med['before'] / med['after']:.3f}x", flush=True)
    if args.epoch:
        ep = {a: [] for a in arms}
        for r in range(args.epoch_rounds):
            for arm in (arms if r % 2 == 0 else arms[::-1]):
                set_arm(arm)
                t = time.perf_counter()
                for _ in range(len(batches)):
                    step()
                ep[arm].append(time.perf_counter() - t)
        em = {a: statistics.median(v) for a, v in ep.items()}
        print(f"training epoch ({len(batches)} steps, images in memory), median of {args.epoch_rounds} rounds:")
        for a in arms:
            print(f"  {a:7s} {em[a]:7.1f} s   rounds: " + " ".join(f"{t:.1f}" for t in ep[a]))
        print(f"  ratio before / after: {em['before'] / em['after']:.3f}x", flush=True)
    if args.data:
        from slaknet.data import InsidenessDataset

        with tempfile.TemporaryDirectory() as d:
            os.environ["SLAKNET_CACHE_DIR"] = d
            kw = dict(image_size=int(cfg.input_size), difficulty=cfg.difficulty, seed=cfg.data_seed, persist=True)
            t = time.perf_counter()
            for split, n in (("train", cfg.train_samples), ("val", cfg.val_samples)):
                ds = InsidenessDataset(split, n, **kw)
                for i in range(n):
                    ds.raw(i)
            cold = time.perf_counter() - t
            t = time.perf_counter()
            for split, n in (("train", cfg.train_samples), ("val", cfg.val_samples)):
                ds = InsidenessDataset(split, n, **kw)
                assert ds.loaded
                for i in range(n):
                    ds.raw(i)
            warm = time.perf_counter() - t
        print(f"built-in data ({cfg.train_samples} + {cfg.val_samples} images): rendered (cold cache) {cold:.1f} s, "
              f"loaded (warm cache) {warm:.2f} s")
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    sys.exit(main())
