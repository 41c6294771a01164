"""Machine-level settings of a run: seeding, CPU threads, data workers, autocast precision."""
from __future__ import annotations

import os
import random
from typing import Any, Optional

import numpy as np
import torch

from slaknet.errors import ConfigError

__all__ = ["seed_everything", "resolve_threads", "autocast_dtype", "cap_workers", "cpu_cores",
           "cpu_has_bf16_matrix_units", "keep_freed_memory", "ENV_MALLOC"]


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


ENV_MALLOC = "SLAKNET_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_allocator_tuned: Optional[bool] = None


def keep_freed_memory() -> bool:
    """Let glibc's allocator keep freed tensor memory for reuse instead of returning it to the OS (once per
    process; Linux with glibc only; ``SLAKNET_MALLOC=default`` leaves the allocator as it is).

    A CPU training step allocates and frees the same large activations (MBs each) every step. With glibc's
    defaults some of them are new mappings each time (or the heap top is trimmed and grown again), and every
    4 KiB page of such memory is a page fault on first touch: 3,400-6,200 faults per step of the demo, at
    ~2.8 us each on the project's VM (docs/speed.md, "The demo's training step"). Raising the mmap threshold
    to 64 MiB and the trim threshold to 512 MiB keeps that memory in the heap: the process's resident memory
    then stays near its peak instead of shrinking between steps. Only speed changes, never a result.
    Returns whether the allocator was tuned.
    """
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if os.environ.get(ENV_MALLOC, "").strip().lower() in ("default", "off", "0", "no", "false"):
        return False
    import platform
    import sys

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        _allocator_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 512 << 20))
    except (OSError, AttributeError):
        pass
    return _allocator_tuned
