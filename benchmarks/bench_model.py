"""Whole-model benchmark: SLaK forward, training step and reparameterized inference, fast vs plain path.

Thin wrapper over ``slaknet bench`` (src/slaknet/bench.py) so the same code serves the CLI and this script:

    python benchmarks/bench_model.py --model slak_tiny --batch 8 --size 224 --reps 3 --memory
    python benchmarks/bench_model.py --model slak_pico --size 128
    python benchmarks/bench_model.py --model branches          # SLaK-T large-kernel layers only
    python benchmarks/bench_model.py --device cuda --batch 64 --backends plain,fft,gemm
"""
from __future__ import annotations

import argparse
import sys

from slaknet import bench


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
