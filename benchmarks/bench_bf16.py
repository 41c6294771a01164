"""bf16 autocast vs fp32 on CPU for SLaK-T: training step and reparameterized inference, in one process.

Usage: PYTHONPATH=src python benchmarks/bench_bf16.py [--batch 8] [--size 224] [--reps 1] [--profile]
Prints the median time of each workload in fp32 and bf16 autocast, their ratio, and with ``--profile``
the top CPU ops of one bf16 training step (torch.profiler). Speed is measured here, never in the tests.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from slaknet.bench import model_workloads
from slaknet.models import create_model


def _time(fn, reps: int) -> float:
    fn()  # warm-up (oneDNN primitive creation, weight caches)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="slak_tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--workloads", default="train step,reparam inference")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--channels-last", action="store_true", help="models and input in channels_last")
    p.add_argument("--arms", default="fp32,bf16 F.linear,bf16")
    args = p.parse_args()
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=1000)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    loads = os.getloadavg()
    res = {}
    # arm name -> (autocast dtype, SLAKNET_LINEAR); 'bf16 F.linear' is the bf16 path before oneDNN bf16 Linear
    arms = {"fp32": (None, "auto"), "bf16 F.linear": (torch.bfloat16, "plain"), "bf16": (torch.bfloat16, "auto")}
    arms = {a: arms[a] for a in args.arms.split(",")}
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for name, (amp, linear_backend) in arms.items():
        os.environ["SLAKNET_LINEAR"] = linear_backend
        fns, _ = model_workloads(model, x, lambda: x, lambda out: F.cross_entropy(out.float(), y), amp=amp,
                                 channels_last=args.channels_last)
        for work in args.workloads.split(","):
            res[(work, name)] = _time(fns[work], args.reps)
        if args.profile and name == "bf16":
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fns["train step"]()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    print(f"{args.model} {args.size}px batch {args.batch}, threads {torch.get_num_threads()}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, "
          f"load avg before {loads[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print("| workload | " + " | ".join(f"{a} s" for a in arms) + " | bf16 speedup vs fp32 |")
    print("| --- |" + " ---: |" * (len(arms) + 1))
    for work in args.workloads.split(","):
        ts = [res[(work, a)] for a in arms]
        print(f"| {work} | " + " | ".join(f"{t:.3f}" for t in ts) + f" | {ts[0] / ts[-1]:.2f}x |")


if __name__ == "__main__":
    main()
