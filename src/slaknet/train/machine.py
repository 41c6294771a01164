"""Machine-level settings of a run: seeding, CPU threads, data workers, autocast precision."""
from __future__ import annotations

import os
import random
from typing import Any, Optional

import numpy as np
import torch

from slaknet.errors import ConfigError

__all__ = ["seed_everything", "resolve_threads", "autocast_dtype", "cap_workers", "cpu_cores",
           "cpu_has_bf16_matrix_units"]


def cpu_cores() -> int:
    """Cores this process may use (the affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def seed_everything(*key: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from a tuple of integers."""
    s = int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def resolve_threads(value: Any) -> Optional[int]:
    """``None`` (leave torch's default), a positive int, or ``"auto"``: the CPU cores not already busy
    according to the 1-minute load average (at least 1), so a shared machine is not oversubscribed."""
    if value in (None, ""):
        return None
    if str(value).lower() == "auto":
        n = os.cpu_count() or 1
        try:
            busy = os.getloadavg()[0]
        except (OSError, AttributeError):
            busy = 0.0
        per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun processes on this node
        return max(1, min(n, int(n - busy + 0.5)) // per_node)
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"--threads must be a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise ConfigError(f"--threads must be a positive integer or 'auto', got {value!r}")
    return n


def cpu_has_bf16_matrix_units() -> bool:
    """True when the CPU has AMX tiles (Intel Sapphire Rapids and later), where bf16 GEMMs run on matrix
    units at several times the fp32 rate. AVX512-BF16 alone gives about 2x on GEMMs only (docs/speed.md)."""
    fn = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:
        return False


def autocast_dtype(precision: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """``fp32`` -> None; ``amp`` -> fp16 on CUDA, bf16 elsewhere; ``bf16`` / ``fp16`` as named; ``auto`` ->
    bf16 on CPUs with bf16 matrix units (AMX), else fp32 (CPUs without them: bf16 training measured at
    1.5-1.7x with AVX512-BF16 and many times slower without it; GPUs: no parity measurement yet)."""
    if precision in (None, "fp32"):
        return None
    if precision == "auto":
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16_matrix_units() else None
    if precision == "amp":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def cap_workers(requested: int) -> int:
    """Data-loader workers never above the cores this process may use (torch warns, and they compete)."""
    return max(0, min(int(requested), cpu_cores()))
