"""Flags of ``slaknet bench`` (torch-free, so ``slaknet bench --help`` is instant); the work is in
:mod:`slaknet.bench`."""
from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="slak_tiny",
                        help="model name (slak_tiny, slak_pico, ...) or 'branches' (SLaK-T large-kernel layers only)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="input resolution")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per backend (median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--backends", default="official,plain,auto",
                        help="comma-separated arms: 'official' (plain convs, official NCHW layout), 'auto' or a "
                             "registered depthwise-conv backend (SLAKNET_DWCONV values: plain, fast, fft, gemm, "
                             "...); the first is the baseline")
    parser.add_argument("--retime", action="store_true",
                        help="forget this machine's cached auto choices first, so this run times and rewrites "
                             "them (docs/speed.md, 'How auto decides')")
    parser.add_argument("--workloads", default="forward,train step,reparam inference")
    parser.add_argument("--channels-last", action="store_true", help="run the models in channels_last")
    parser.add_argument("--memory", action="store_true", help="also measure peak training memory (subprocesses)")
    parser.add_argument("--peak-gmacs", type=float, default=None,
                        help="machine peak in G multiply-adds/s (default: best of a large MKL / oneDNN fp32 GEMM)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                        help="run every arm under autocast to this dtype (%% of peak stays relative to fp32)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    from slaknet.bench import run as run_bench_command

    return run_bench_command(args)
