"""Whole-model benchmark: SLaK forward, training step and reparameterized inference, fast vs plain path.

Thin wrapper over ``slaknet bench`` (flags in src/slaknet/bench_cli.py, work in src/slaknet/bench.py), so the
same code serves the CLI and this script (``--help`` lists the flags):

    python benchmarks/bench_model.py --model slak_tiny --batch 8 --size 224 --reps 3 --memory
    python benchmarks/bench_model.py --model slak_pico --size 128
    python benchmarks/bench_model.py --model branches          # SLaK-T large-kernel layers only
    python benchmarks/bench_model.py --device cuda --batch 64 --backends plain,fft,gemm
"""
from __future__ import annotations

import sys
from typing import List, Optional

from slaknet.cli import main as slaknet_main


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``slaknet bench`` with these arguments (the flags, checks and output are the command's own)."""
    return slaknet_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
