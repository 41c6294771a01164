"""``slaknet kernels CHECKPOINT``: pictures of the learned large kernels and per-layer density bars.

Reads only tensors (no model is built), so official SLaK checkpoints work as well as slaknet ones.
"""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slaknet.settings import CommonOptions, RunSettings, add_setting

    parser.add_argument("checkpoint", help="checkpoint file (.pth/.pt/.safetensors; official SLaK or slaknet)")
    add_setting(parser, RunSettings, "output_dir", default="kernels_out", help="output folder (default kernels_out)")
    parser.add_argument("--channels", type=int, default=6, help="channels shown per stage (default 6)")
    add_setting(parser, CommonOptions, "ema", default=None, nargs=0,
                help="use the EMA weights when the file has them (--no-ema, the default: the raw weights)")
    parser.add_argument("--no-bn-fold", action="store_true",
                        help="show raw branch weights summed, without scaling by their BatchNorms")
    add_setting(parser, CommonOptions, "json", default=False, nargs=0,
                help="print the JSON summary instead of a table")


def run(args: argparse.Namespace) -> int:
    from slaknet.analysis.kernels import kernel_report
    from slaknet.errors import ConfigError

    if args.channels < 1:
        raise ConfigError(f"--channels must be at least 1, got {args.channels}")
    summary = kernel_report(args.checkpoint, args.output_dir, channels=args.channels, prefer_ema=bool(args.ema),
                            fold_bn=not args.no_bn_fold)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    layers = summary["layers"]
    if not layers:
        print("no large-kernel layers found (LoRA1/LoRA2/lkb_origin/lkb_reparam weights); "
              "wrote density bars only")
    else:
        width = max(len(layer["name"]) for layer in layers)
        print(f"{'layer'.ljust(width)}  kernel   channels  density")
        for layer in layers:
            k = "x".join(str(s) for s in layer["kernel_size"])
            print(f"{layer['name'].ljust(width)}  {k.ljust(7)}  {str(layer['channels']).rjust(8)}  "
                  f"{layer['density']:7.2%}")
        print(f"large-kernel density: {summary['large_kernel_density']:.2%}")
    print(f"all conv/linear weights density: {summary['overall_density']:.2%}")
    print("wrote " + ", ".join(summary["files"].values()))
    return 0
