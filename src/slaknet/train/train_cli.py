"""``slaknet train``: train a SLaK model (no arguments: the built-in CPU demo with dynamic sparsity).

Examples::

    slaknet train                                   # ~10 min CPU demo on the built-in insideness task
    slaknet train --dump-samples samples/           # look at the built-in data (PNGs), then exit
    slaknet train --model slak_tiny --data /data/imagenet --epochs 300 -b 128 --update-freq 8 \\
        --sparse --sparsity 0.4 --sparse-init snip --prune-rate 0.3 --growth random -u 100 \\
        --width-factor 1.3 --kernel-size 51 49 47 13 5 --Decom True
    torchrun --nproc_per_node 8 -m slaknet train --config slak_tiny.yaml
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Callable

from slaknet.train.config import TrainConfig, add_train_arguments, load_yaml_defaults, resolve_config

__all__ = ["add_arguments", "run", "config_from_argv", "apply_yaml"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """All ``slaknet train`` flags (abbreviations off: ``--epoch`` is an error, not ``--epochs``)."""
    add_train_arguments(parser)
    parser.add_argument("--dump-samples", dest="dump_samples", default=None, metavar="DIR",
                        help="write built-in dataset samples as PNGs to DIR and exit")
    parser.add_argument("--dump-count", dest="dump_count", type=int, default=16,
                        help="images per split for --dump-samples (default 16)")
    parser.add_argument("--print-config", dest="print_config", action="store_true",
                        help="print the resolved configuration (recipe defaults filled in) as YAML and exit")


def apply_yaml(args: argparse.Namespace, add: Callable[[argparse.ArgumentParser], None] = add_arguments) -> None:
    """Fill options the command line left at their defaults from ``--config`` (YAML); ``add`` builds the
    command's parser (``slaknet distill`` passes its own, so its file may hold distillation options)."""
    if not getattr(args, "config", None):
        return
    fresh = argparse.ArgumentParser(add_help=False)
    add(fresh)
    defaults = vars(fresh.parse_args([]))
    for dest, value in load_yaml_defaults(args.config, fresh).items():
        if getattr(args, dest, None) == defaults.get(dest):
            if dest == "kernel_size" and isinstance(value, (int, str)):
                value = [int(v) for v in str(value).split()]
            setattr(args, dest, value)


def config_from_argv(argv: list) -> TrainConfig:
    """The resolved config for a ``slaknet train`` argument list (for tests and notebooks)."""
    p = argparse.ArgumentParser(prog="slaknet train", allow_abbrev=False)
    add_arguments(p)
    args = p.parse_args(argv)
    apply_yaml(args)
    return resolve_config(args)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    apply_yaml(args)
    cfg = resolve_config(args)
    if getattr(args, "dump_samples", None):
        from slaknet.data import InsidenessDataset, dump_pngs, parse_data_spec

        if parse_data_spec(cfg["data"])[0] != "builtin":
            from slaknet.errors import ConfigError

            raise ConfigError("--dump-samples works with the built-in dataset only")
        n = 0
        for split, count in (("train", cfg["train_samples"]), ("val", cfg["val_samples"])):
            ds = InsidenessDataset(split, count, cfg["input_size"], cfg["difficulty"], cfg["data_seed"], cache=False)
            n += len(dump_pngs(ds, args.dump_samples, args.dump_count))
        print(f"wrote {n} PNGs to {os.path.abspath(args.dump_samples)} (name: split_index_label.png)")
        return 0
    if getattr(args, "print_config", False):
        import yaml

        print(yaml.safe_dump(cfg.as_dict(), sort_keys=True), end="")
        return 0
    from slaknet.train.engine import train

    try:
        train(cfg)
    finally:
        from slaknet.train.distributed import cleanup

        cleanup()
    return 0
