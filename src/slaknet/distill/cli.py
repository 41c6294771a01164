"""``slaknet distill``: train a student with a frozen teacher (no teacher given: the built-in CPU demo).

Examples::

    slaknet distill                                  # demo: teacher -> 7x7 twin vs the twin alone, 3 seeds (~16 min)
    slaknet distill --teacher-checkpoint runs/teacher/model.safetensors --model slak_pico_k7 \\
        --distill-type NKD -o runs/student
    slaknet distill --teacher slak_tiny --teacher-checkpoint SLaK_tiny_checkpoint.pth \\
        --model convnext_tiny --data /data/imagenet --recipe imagenet --distill_type NKD --T 3.0

Every ``slaknet train`` flag works; the research code's distillation flag names are accepted
(``--distill_type``, ``--alpha``, ``--T``, ``--hard``, ``--lr_fd``, ``--FDLoss_type``, ``--target_Lnorm``).
"""
from __future__ import annotations

import argparse
import logging

from slaknet.distill.args import DISTILL_DEFAULTS, add_distill_arguments, add_teacher_arguments
from slaknet.train.config import add_train_arguments

__all__ = ["add_arguments", "run", "distill_config"]

_TEACHER_KEYS = ("teacher", "teacher_checkpoint", "teacher_reparam")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser)
    add_teacher_arguments(parser)
    add_distill_arguments(parser)
    g = parser.add_argument_group("demo (used when no --teacher-checkpoint is given)")
    g.add_argument("--budget", default="default", choices=["tiny", "short", "default", "large"],
                   help="demo size: tiny (seconds, a smoke test), short (2 seeds), default (3 seeds, about 16 "
                        "minutes on one idle CPU core), large (5 seeds, 2000 held-out images)")
    g.add_argument("--seeds", type=int, default=None, help="demo: seeds per arm (default: the budget's)")


def distill_config(args: argparse.Namespace) -> "object":
    """The resolved :class:`~slaknet.train.config.TrainConfig` of a distillation run (task ``distillation``)."""
    from slaknet.train.config import resolve_config
    from slaknet.train.train_cli import apply_yaml

    apply_yaml(args, add_arguments)
    cfg = resolve_config(args)
    opts = dict(cfg.task_options or {}) if cfg.task == "distillation" else {}
    for key in (*DISTILL_DEFAULTS, *_TEACHER_KEYS):
        value = getattr(args, key, None)
        if value is not None:
            opts[key] = value
    from slaknet.distill.args import resolve_distill_config

    resolve_distill_config(opts)  # bad values fail here, in one line, before anything is built
    return cfg.replace(task="distillation", task_options=opts)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.teacher_checkpoint is None and not args.resume:
        from slaknet.distill.demo import run_demo

        run_demo(args)
        return 0
    from slaknet.train.engine import train

    cfg = distill_config(args)
    try:
        train(cfg)
    finally:
        from slaknet.train.distributed import cleanup

        cleanup()
    return 0
