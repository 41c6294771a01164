"""``slaknet convert``: an official release checkpoint (or any readable one) to slaknet's safetensors formats."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="checkpoint to convert (.pth/.pt official release file, state dict, safetensors)")
    parser.add_argument("output", help="output file, ending in .safetensors")
    parser.add_argument("--format", dest="fmt", default="auto", choices=["auto", "dense", "sparse"],
                        help="dense safetensors, compact sparse, or auto: sparse when >= 10%% of weights are zero")
    parser.add_argument("--model", default=None, help="variant name (default: inferred from the tensor shapes)")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="use_ema", action="store_const", const=True, default=None,
                     help="take the EMA weights")
    ema.add_argument("--no-ema", dest="use_ema", action="store_const", const=False, help="take the raw weights")
    parser.add_argument("--reparameterize", default="none", choices=["none", "strips", "dense"],
                        help="store the inference form instead of the training form (default none)")
    parser.add_argument("--class-names", default=None,
                        help="text file with one class name per line, stored in the metadata")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from slaknet.deploy.convert import convert_checkpoint

    names = None
    if args.class_names:
        with open(args.class_names, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    result = convert_checkpoint(args.source, args.output, fmt=args.fmt, model=args.model, use_ema=args.use_ema,
                                reparameterize=args.reparameterize, class_names=names)
    if args.json:
        print(json.dumps(result.__dict__, indent=2))
    else:
        print(result.describe())
    return 0
