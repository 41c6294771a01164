"""``slaknet distill``: train a student with a frozen teacher (no teacher given: the built-in CPU demo).

Examples::

    slaknet distill                                  # demo: teacher -> 7x7 twin vs the twin alone, 3 seeds (~16 min)
    slaknet distill --teacher-checkpoint runs/teacher/model.safetensors --model slak_pico_k7 \\
        --distill-type NKD -o runs/student
    slaknet distill --teacher slak_tiny --teacher-checkpoint SLaK_tiny_checkpoint.pth \\
        --model convnext_tiny --data /data/imagenet --recipe imagenet --distill_type NKD --T 3.0

Every ``slaknet train`` flag works; the research code's distillation flag names are accepted
(``--distill_type``, ``--alpha``, ``--T``, ``--hard``, ``--lr_fd``, ``--FDLoss_type``, ``--target_Lnorm``).
The same run from Python: ``slaknet.fit(slaknet.config("distillation", teacher_checkpoint=..., ...))``.
"""
from __future__ import annotations

import argparse

from slaknet.distill.spec import SPEC

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slaknet.train.config import add_config_arguments

    add_config_arguments(parser, SPEC)
    g = parser.add_argument_group("demo (used when no --teacher-checkpoint is given)")
    g.add_argument("--budget", default="default", choices=["tiny", "short", "default", "large"],
                   help="demo size: tiny (seconds, a smoke test), short (2 seeds), default (3 seeds, about 16 "
                        "minutes on one idle CPU core), large (5 seeds, 2000 held-out images)")
    g.add_argument("--seeds", type=int, default=None, help="demo: seeds per arm (default: the budget's)")


def run(args: argparse.Namespace) -> int:
    from slaknet.train.api import fit, print_config
    from slaknet.train.config import config_from_args

    if getattr(args, "teacher_checkpoint", None) is None and not getattr(args, "resume", None) \
            and not getattr(args, "config", None) and not args.print_config:
        from slaknet.distill.demo import run_demo

        run_demo(args)
        return 0
    cfg = config_from_args(args, SPEC)
    if args.print_config:
        return print_config(cfg)
    fit(cfg)
    return 0
