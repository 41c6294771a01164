"""The ``slaknet`` command: a thin dispatcher to the sub-commands that live beside the code they drive.

Each sub-command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported
only when their command runs, so ``slaknet --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

from slaknet.errors import SlaknetError

# name -> (module, one-line help). Add a command by adding a line here.
COMMANDS = {
    "info": ("slaknet.analysis.counting_cli", "build a model and print dense / non-zero parameters and MACs"),
    "erf": ("slaknet.analysis.erf_cli", "effective receptive field: area ratios, .npy matrices and heatmaps"),
    "kernels": ("slaknet.analysis.kernels_cli", "pictures of learned large kernels and per-layer density bars"),
    "bench": ("slaknet.bench", "time the fast large-kernel conv vs plain PyTorch (per branch, whole model)"),
    "train": ("slaknet.train.train_cli", "train a SLaK model (no arguments: built-in CPU demo with dynamic sparsity)"),
    "eval": ("slaknet.train.eval_cli", "top-1/top-5/loss/images-per-s of a checkpoint (official or slaknet) on a dataset"),
    "predict": ("slaknet.train.predict_cli", "top-k labels with probabilities for image files"),
    "export": ("slaknet.deploy.export_cli", "reparameterize and export to onnx / torchscript / exported-program / safetensors, then verify"),
    "convert": ("slaknet.deploy.convert_cli", "convert an official release checkpoint to slaknet safetensors (dense or compact sparse)"),
    "study": ("slaknet.study.cli", "miniature SLaK ablations (kernel size, sparsity, masks, growth, ERF): table + plots"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slaknet", description="Sparse Large Kernel Networks (SLaK)")
    from slaknet import __version__

    parser.add_argument("--version", action="version", version=f"slaknet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module_name)
        # argument definitions are cheap; only ``run`` pulls in heavy code
        importlib.import_module(module_name).add_arguments(sp)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 1
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except (SlaknetError, FileNotFoundError, ValueError) as exc:
        # user mistakes are one line; SLAKNET_DEBUG=1 shows the traceback
        if os.environ.get("SLAKNET_DEBUG"):
            raise
        print(f"slaknet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slaknet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
