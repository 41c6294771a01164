"""Per-branch benchmark of slaknet's depthwise operator vs plain F.conv2d (same process, interleaved runs).

For each SLaK-T strip / small-kernel shape (224 input, width 1.3) it times the forward and the
forward+backward (input and weight gradients) for each backend and prints medians and speedups vs
``plain``. Works on CPU and CUDA (``--device cuda``).

    python benchmarks/bench_dwconv.py [--batch 8] [--reps 5] [--device cpu] [--backends plain,fast,fft,gemm,...]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, List

import torch

from slaknet.bench import SLAK_T_STAGES
from slaknet.layers.dwconv import backend_names, depthwise_conv2d


def _timer(device: torch.device, fn: Callable[[], object], reps: int) -> List[float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--backends", default=",".join(backend_names()[1:]),
                    help="comma-separated registered backends (default: all of them)")
    ap.add_argument("--scale", type=float, default=1.0, help="scale of spatial sizes (e.g. 2 for 448 input)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    backends = args.backends.split(",")
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), "
          f"{args.dtype}, batch {args.batch}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    print("| C | map | kernel | pass | " + " | ".join(f"{b} ms" for b in backends) + " | best vs plain |")
    print("| --- | --- | --- | --- | " + " | ".join("---:" for _ in backends) + " | ---: |")
    totals = {(p, b): 0.0 for p in ("fwd", "fwd+bwd") for b in backends}
    for c, s, k, blocks in SLAK_T_STAGES:
        s = int(round(s * args.scale))
        for kh, kw in ((k, 5), (5, k), (5, 5)):
            x = torch.randn(args.batch, c, s, s, device=dev, dtype=dtype)
            w = torch.randn(c, 1, kh, kw, device=dev, dtype=dtype)
            pad = (kh // 2, kw // 2)
            gy = torch.randn_like(x)
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
            res = {}
            for pass_name in ("fwd", "fwd+bwd"):
                samples = {b: [] for b in backends}
                for r in range(args.reps):
                    for b in (backends if r % 2 == 0 else backends[::-1]):
                        if pass_name == "fwd":
                            def fn(b=b):
                                with torch.no_grad():
                                    depthwise_conv2d(x, w, None, pad, backend=b)
                        else:
                            def fn(b=b):
                                y = depthwise_conv2d(xg, wg, None, pad, backend=b)
                                torch.autograd.grad(y, (xg, wg), gy)
                        samples[b].append(statistics.median(_timer(dev, fn, 1)))
                med = {b: statistics.median(v) for b, v in samples.items()}
                for b in backends:
                    totals[(pass_name, b)] += med[b] * blocks
                best = min(med, key=med.get)
                res[pass_name] = med
                print(f"| {c} | {s} | {kh}x{kw} | {pass_name} | "
                      + " | ".join(f"{med[b] * 1e3:.2f}" for b in backends)
                      + f" | {best} {med['plain'] / med[best]:.2f}x |" if "plain" in med else "|", flush=True)
    print()
    for p in ("fwd", "fwd+bwd"):
        line = ", ".join(f"{b} {totals[(p, b)] * 1e3:.1f} ms" for b in backends)
        print(f"SLaK-T all strips+5x5 ({p}, x blocks): {line}")


if __name__ == "__main__":
    main()
