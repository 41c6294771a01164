"""How close to the fp32 GEMM peak can SLaK's forward get on this CPU? The 1x1 layers' GEMMs alone, at the
model's own shapes, against the whole model -- one process, arms interleaved run by run, medians.

`slaknet bench` reports a model's "% of peak": in-bounds multiply-adds per second over the best rate of a
1536^3 fp32 GEMM. 86% of SLaK-T's multiply-adds are in the two 1x1 layers of each block, and in the first
stages their matrices are narrow (124 or 249 channels), where a GEMM runs below its square-matrix rate.
This script times, per stage, only the two GEMMs of one block's MLP (``pixels x C @ C x 4C`` then
``pixels x 4C @ 4C x C``) in three ways -- MKL (``F.linear``), oneDNN, oneDNN on cache-sized row chunks --
and prints, besides the model's forward and the reparameterized inference (``auto``):

* each stage's best GEMM rate as % of peak (how fast the shapes themselves can go), and
* the **ceiling**: the model's multiply-adds over the time of its MLP GEMMs alone (best way per stage,
  times blocks), as % of peak -- what the forward would reach if every other op (depthwise convs, norms,
  GELU, adds, layout changes) took no time at all.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_ceiling.py [--model slak_tiny] [--batch 8] [--reps 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List

import timm
import torch
import torch.nn.functional as F

import slaknet  # noqa: F401  (registers the models)
from slaknet.bench import count_inbounds_macs, measure_peak_gmacs
from slaknet.layers import autotune, block_mlp, pointwise
from slaknet.models.factory import reparameterize_model
from slaknet.train.machine import keep_freed_memory


def _interleaved(fns: Dict[str, Callable[[], object]], reps: int) -> Dict[str, float]:
    """Median seconds per arm, arms alternating run by run after one warm-up each."""
    for f in fns.values():
        f()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _stage_gemms(pixels: int, c: int, reps: int) -> Dict[str, float]:
    g = torch.Generator().manual_seed(c)
    x = torch.randn(pixels, c, generator=g)
    w1, b1 = torch.randn(4 * c, c, generator=g) * c ** -0.5, torch.zeros(4 * c)
    w2, b2 = torch.randn(c, 4 * c, generator=g) * (4 * c) ** -0.5, torch.zeros(c)
    rows = block_mlp.chunk_rows(4 * c)

    def mkl() -> None:
        F.linear(F.linear(x, w1, b1), w2, b2)

    def onednn() -> None:
        pointwise.onednn_nt(pointwise.onednn_nt(x, w1, b1), w2, b2)

    def chunked() -> None:
        for s in range(0, pixels, rows):
            pointwise.onednn_nt(pointwise.onednn_nt(x[s:s + rows], w1, b1), w2, b2)
    arms = {"MKL": mkl}
    if pointwise.onednn_op() is not None:
        arms.update(oneDNN=onednn, chunked=chunked)
    with torch.no_grad():
        return _interleaved(arms, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="slak_tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tuned = keep_freed_memory()  # as `slaknet bench` and training: freed activations are reused, not re-faulted
    print(f"CPU: {autotune.cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"load {os.getloadavg()[0]:.2f}; glibc allocator {'tuned' if tuned else 'untouched'}")
    peak = measure_peak_gmacs(args.threads)
    model = timm.create_model(args.model, num_classes=1000).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    macs = count_inbounds_macs(model, x[:1]) * args.batch
    print(f"peak {peak:.1f} GMAC/s (best 1536^3 fp32 GEMM); {args.model} {args.size} px batch {args.batch}: "
          f"{macs / 1e9:.2f} in-bounds GMAC per forward")

    print("\n| stage | C | pixels | blocks | MKL ms | oneDNN ms | chunked ms | best GMAC/s | best % of peak |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    gemm_s, gemm_macs = 0.0, 0
    size = args.size // 4
    for i, (c, depth) in enumerate(zip(model.dims, model.depths)):
        pixels = args.batch * size * size
        t = _stage_gemms(pixels, c, args.reps)
        best = min(t.values())
        m = 2 * pixels * c * 4 * c
        gemm_s += best * depth
        gemm_macs += m * depth
        cells = " | ".join(f"{1e3 * t[k]:.1f}" if k in t else "-" for k in ("MKL", "oneDNN", "chunked"))
        print(f"| {i + 1} | {c} | {pixels} | {depth} | {cells} | {m / best / 1e9:.1f} | "
              f"{100 * m / best / 1e9 / peak:.0f}% |", flush=True)
        size //= 2

    reparam = reparameterize_model(model)
    with torch.no_grad():
        model(x)  # auto's questions for these shapes answered before timing (cached per machine)
        reparam(x)
        t = _interleaved({"forward": lambda: model(x), "reparam": lambda: reparam(x)}, max(2, args.reps // 2))
    pct = lambda s: 100 * macs / s / 1e9 / peak  # noqa: E731
    print(f"\nMLP GEMMs alone: {gemm_macs / 1e9:.2f} GMAC ({100 * gemm_macs / macs:.0f}% of the model's) in "
          f"{gemm_s:.3f} s = {gemm_macs / gemm_s / 1e9:.1f} GMAC/s ({100 * gemm_macs / gemm_s / 1e9 / peak:.0f}% "
          f"of peak)")
    print(f"ceiling (every other op free): {macs / 1e9:.2f} GMAC in {gemm_s:.3f} s = {pct(gemm_s):.0f}% of peak")
    for k, s in t.items():
        print(f"{args.model} {k} (auto): {s:.3f} s = {pct(s):.0f}% of peak; the GEMMs' share of it "
              f"{100 * gemm_s / s:.0f}%; other ops {s - gemm_s:.3f} s")


if __name__ == "__main__":
    main()
