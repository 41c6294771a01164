"""``slaknet convert``: an official release checkpoint (or any readable one) to slaknet's safetensors formats."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slaknet.settings import CommonOptions, ModelSettings, add_setting

    parser.add_argument("source", help="checkpoint to convert (.pth/.pt official release file, state dict, safetensors)")
    parser.add_argument("output", help="output file, ending in .safetensors")
    parser.add_argument("--format", dest="fmt", default="auto", choices=["auto", "dense", "sparse"],
                        help="dense safetensors, compact sparse, or auto: sparse when >= 10%% of weights are zero")
    add_setting(parser, ModelSettings, "model", default=None,
                help="variant name (default: inferred from the tensor shapes)")
    add_setting(parser, CommonOptions, "ema", default=None, nargs=0)
    add_setting(parser, CommonOptions, "reparam", default="none",
                help="store the inference form instead of the training form: strips, dense or none (default)")
    parser.add_argument("--class-names", default=None,
                        help="text file with one class name per line, stored in the metadata")
    add_setting(parser, CommonOptions, "json", default=False, nargs=0)


def run(args: argparse.Namespace) -> int:
    from slaknet.deploy.convert import convert_checkpoint

    names = None
    if args.class_names:
        with open(args.class_names, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    result = convert_checkpoint(args.source, args.output, fmt=args.fmt, model=args.model, use_ema=args.ema,
                                reparameterize=args.reparam, class_names=names)
    if args.json:
        print(json.dumps(result.__dict__, indent=2))
    else:
        print(result.describe())
    return 0
