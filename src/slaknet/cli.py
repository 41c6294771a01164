"""The ``slaknet`` command: a thin dispatcher to the sub-commands that live beside the code they drive.

Each sub-command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Only the module of
the command being run is imported, and only its ``run`` pulls in torch, so ``slaknet --help`` and
argument errors answer at once. Options are never abbreviated (``--epoch`` is not ``--epochs``).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import List, Optional, Tuple

from slaknet.errors import SlaknetError

# name -> (module, one-line help). Add a command by adding a line here.
COMMANDS = {
    "info": ("slaknet.analysis.counting_cli", "build a model and print dense / non-zero parameters and MACs"),
    "erf": ("slaknet.analysis.erf_cli", "effective receptive field: area ratios, .npy matrices and heatmaps"),
    "kernels": ("slaknet.analysis.kernels_cli", "pictures of learned large kernels and per-layer density bars"),
    "bench": ("slaknet.bench_cli", "time the fast large-kernel conv vs plain PyTorch (per branch, whole model)"),
    "train": ("slaknet.classify.cli", "train a SLaK model (no arguments: built-in CPU demo with dynamic sparsity)"),
    "eval": ("slaknet.classify.eval_cli", "top-1/top-5/loss/images-per-s of a checkpoint (official or slaknet) on a dataset"),
    "predict": ("slaknet.classify.predict_cli", "top-k labels with probabilities for image files"),
    "export": ("slaknet.deploy.export_cli", "reparameterize and export to onnx / torchscript / exported-program / safetensors, then verify"),
    "convert": ("slaknet.deploy.convert_cli", "convert an official release checkpoint to slaknet safetensors (dense or compact sparse)"),
    "distill": ("slaknet.distill.cli", "distil a frozen teacher into a student (no arguments: CPU demo, teacher -> 7x7 twin vs alone)"),
    "study": ("slaknet.study.cli", "miniature SLaK ablations (kernel size, sparsity, masks, growth, ERF): table + plots"),
    "segment": ("slaknet.segment.cli", "semantic segmentation: SLaK + UperNet train / eval / predict / export (no arguments: CPU demo)"),
    "detect": ("slaknet.detect.cli", "object detection / instance masks with a SLaK backbone (no arguments: CPU demo)"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: the command list only (no sub-command module is imported)."""
    from slaknet import __version__

    parser = argparse.ArgumentParser(prog="slaknet", description="Sparse Large Kernel Networks (SLaK)",
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"slaknet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def build_command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one sub-command (imports that command's module, which must not import torch)."""
    module_name, help_text = COMMANDS[name]
    from slaknet.settings import SettingsParser

    parser = SettingsParser(prog=f"slaknet {name}", description=help_text)
    importlib.import_module(module_name).add_arguments(parser)
    return parser


def _split_command(argv: List[str]) -> Tuple[Optional[str], List[str]]:
    """``(command, its arguments)``; ``command`` is None when argv names none (top-level options only)."""
    for i, a in enumerate(argv):
        if not a.startswith("-"):
            return a, argv[i + 1:]
    return None, argv


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = _split_command(argv)
    if command not in COMMANDS:
        parser = build_parser()
        parser.parse_args(argv)  # --help / --version / an unknown command exit here with argparse's message
        parser.print_help()
        return 1
    args = build_command_parser(command).parse_args(rest)
    args.command = command
    importlib.import_module("slaknet.models")  # what `import slaknet` does outside the command: timm registration
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.run(args) or 0)
    except (SlaknetError, FileNotFoundError, ValueError) as exc:
        # user mistakes are one line (exit 2); SLAKNET_DEBUG=1 adds the traceback, same exit code
        if os.environ.get("SLAKNET_DEBUG"):
            traceback.print_exc()
        print(f"slaknet {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slaknet {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
