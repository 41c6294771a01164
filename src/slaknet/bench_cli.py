"""Flags of ``slaknet bench`` (torch-free, so ``slaknet bench --help`` is instant); the work is in
:mod:`slaknet.bench`."""
from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slaknet.settings import CommonOptions, DataSettings, ModelSettings, RunSettings, add_setting

    add_setting(parser, ModelSettings, "model", default="slak_tiny",
                help="model name (slak_tiny, slak_pico, ...) or 'branches' (SLaK-T large-kernel layers only)")
    parser.add_argument("--batch", type=int, default=8)
    add_setting(parser, DataSettings, "input_size", default=224, dest="size", help="input resolution (default 224)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per backend (median reported)")
    add_setting(parser, RunSettings, "threads", default=str(os.cpu_count() or 1),
                help="torch CPU threads: N or auto (default: all cores)")
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
    add_setting(parser, RunSettings, "device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                        help="run every arm under autocast to this dtype (%% of peak stays relative to fp32)")
    add_setting(parser, CommonOptions, "output_file", default=None, dest="json", aliases=("--json",),
                help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    from slaknet.bench import run as run_bench_command
    from slaknet.train.machine import resolve_threads

    args.threads = resolve_threads(args.threads) or os.cpu_count() or 1
    return run_bench_command(args)
