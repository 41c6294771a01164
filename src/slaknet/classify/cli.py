"""``slaknet train``: train a SLaK classifier (no arguments: the built-in CPU demo with dynamic sparsity).

Examples::

    slaknet train                                   # CPU demo on the built-in insideness task
    slaknet train --dump-samples samples/           # look at the built-in data (PNGs), then exit
    slaknet train --model slak_tiny --data /data/imagenet --epochs 300 -b 128 --update-freq 8 \\
        --sparse --sparsity 0.4 --sparse-init snip --prune-rate 0.3 --growth random -u 100 \\
        --width-factor 1.3 --kernel-size 51 49 47 13 5 --Decom True
    torchrun --nproc_per_node 8 -m slaknet train --config slak_tiny.yaml

The flags are generated from the configuration's fields (:mod:`slaknet.train.config`); the same run from
Python is ``slaknet.fit(slaknet.config("classification", ...))``.
"""
from __future__ import annotations

import argparse
import os

from slaknet.classify.spec import SPEC

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """All ``slaknet train`` flags (abbreviations off: ``--epoch`` is an error, not ``--epochs``)."""
    from slaknet.train.config import add_config_arguments

    add_config_arguments(parser, SPEC)
    parser.add_argument("--dump-samples", dest="dump_samples", default=None, metavar="DIR",
                        help="write built-in dataset samples as PNGs to DIR and exit")
    parser.add_argument("--dump-count", dest="dump_count", type=int, default=16,
                        help="images per split for --dump-samples (default 16)")


def run(args: argparse.Namespace) -> int:
    from slaknet.errors import ConfigError
    from slaknet.train.api import fit, print_config
    from slaknet.train.config import config_from_args

    cfg = config_from_args(args, SPEC)
    if getattr(args, "dump_samples", None):
        from slaknet.data import InsidenessDataset, dump_pngs, parse_data_spec

        if parse_data_spec(cfg.data.data)[0] != "builtin":
            raise ConfigError("--dump-samples works with the built-in dataset only")
        n = 0
        for split, count in (("train", cfg.data.train_samples), ("val", cfg.data.val_samples)):
            ds = InsidenessDataset(split, count, cfg.data.input_size, cfg.data.difficulty, cfg.data.data_seed,
                                   cache=False)
            n += len(dump_pngs(ds, args.dump_samples, args.dump_count))
        print(f"wrote {n} PNGs to {os.path.abspath(args.dump_samples)} (name: split_index_label.png)")
        return 0
    if args.print_config:
        return print_config(cfg)
    fit(cfg)
    return 0
