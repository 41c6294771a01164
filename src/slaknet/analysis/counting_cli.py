"""``slaknet info MODEL``: build a model (optionally from a checkpoint) and print its counts."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slaknet.settings import CommonOptions, DataSettings, add_setting

    parser.add_argument("model", nargs="?", default=None,
                        help="registered model name (default slak_tiny, or the checkpoint's architecture; "
                             "with --checkpoint, the file must be this variant)")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="also report counts at this sparsity over all conv+linear weights (e.g. 0.4)")
    add_setting(parser, DataSettings, "input_size", default=None,
                help="square input size (default: the checkpoint's training size, else the model's)")
    add_setting(parser, CommonOptions, "checkpoint", default=None, help="count a checkpoint's weights (zeros honoured)")
    add_setting(parser, CommonOptions, "json", default=False, nargs=0, help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    from slaknet.analysis.counting import count_model
    from slaknet.errors import ConfigError
    from slaknet.models import create_model, describe_model
    from slaknet.models.factory import model_from_checkpoint

    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        raise ConfigError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.input_size is not None and args.input_size < 32:
        raise ConfigError(f"--input-size must be at least 32, got {args.input_size}")
    if args.checkpoint:
        model, info, name = model_from_checkpoint(args.checkpoint, args.model)
        default_size = info.input_size
    else:
        model, name, default_size = create_model(args.model or "slak_tiny"), args.model or "slak_tiny", None
    size = args.input_size or default_size or model.pretrained_cfg["input_size"][-1]
    counts = count_model(model, size)
    sparse = count_model(model, size, sparsity=args.sparsity) if args.sparsity is not None else None
    spec = describe_model(model)
    if args.json:
        out = {"model": name, "input_size": size, "architecture": spec.summary(), "counts": counts.as_dict()}
        if sparse is not None:
            out["at_sparsity"] = sparse.as_dict()
        print(json.dumps(out, indent=2))
        return 0
    print(f"{name} at {size} px: {spec.summary()}")
    print(counts.table())
    if sparse is not None:
        print(f"\nif trained at {args.sparsity:.0%} sparsity over all conv and linear weights:")
        print("\n".join(line for line in sparse.table().splitlines() if "sparsity" in line))
    return 0
