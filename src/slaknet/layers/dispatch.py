"""What the kernel-choosing layers (depthwise conv, pointwise Linear) share: reading a requested backend
from an argument or an environment variable, and knowing when a tracer is watching (then only plain
PyTorch ops may run, so exported graphs contain standard operators), which autocast dtype is active, and
whether this CPU does bf16 math in hardware."""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import torch

from slaknet.errors import ConfigError

__all__ = ["backend_name", "exporting", "autocast_dtype", "cpu_bf16_native", "bf16_via_fp32"]


def backend_name(value: Optional[str], env_var: str, choices: Sequence[str], kind: str) -> str:
    """``value`` if given, else ``$env_var``, else 'auto'; normalised, and a one-line ConfigError
    naming where a bad name came from."""
    name = value if value is not None else os.environ.get(env_var, "auto")
    name = (name or "auto").strip().lower()
    if name not in choices:
        source = "backend argument" if value is not None else env_var
        raise ConfigError(f"unknown {kind} backend {name!r} ({source}); choose from {', '.join(choices)}")
    return name


def exporting() -> bool:
    """True while TorchScript / ONNX / torch.export / torch.compile / torch.fx trace the model."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    fx = getattr(torch.fx, "_symbolic_trace", None)
    fx_tracing = getattr(fx, "is_fx_symbolic_tracing", None) or getattr(fx, "is_fx_tracing", None)
    if fx_tracing is not None and fx_tracing():
        return True
    onnx = getattr(torch, "onnx", None)
    if onnx is not None and getattr(onnx, "is_in_onnx_export", lambda: False)():
        return True
    compiler = getattr(torch, "compiler", None)
    for name in ("is_exporting", "is_compiling"):
        fn = getattr(compiler, name, None)
        if fn is not None and fn():
            return True
    return False


def autocast_dtype(dev: str) -> Optional[torch.dtype]:
    """The autocast dtype active for this device type, or None (works on torch < 2.4 too)."""
    if dev not in ("cpu", "cuda", "xpu", "mps"):  # e.g. "meta" (shape-only runs): autocast has no such device
        return None
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return None
    except TypeError:  # older torch: no device argument
        if dev == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        if dev == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return None

@functools.lru_cache(maxsize=None)
def cpu_bf16_native() -> bool:
    """True when oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX), so its bf16 GEMMs and convs
    are fast. Without it oneDNN and PyTorch emulate bf16 kernels (depthwise bf16 convs fall back to a
    per-channel im2col loop): 25-30x slower than fp32 on an AVX2-only CPU, measured (docs/speed.md)."""
    fn = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:
        return False


def bf16_via_fp32(t: torch.Tensor) -> bool:
    """True for a bf16 CPU tensor on a CPU without native bf16: the fast layers then compute in fp32 on its
    (exactly representable) bf16 values and round the result to bf16. A product of two bf16 numbers is exact
    in fp32 and native bf16 kernels accumulate in fp32 too, so this is the same math up to summation order,
    at fp32 speed instead of the emulated kernels' (see :func:`cpu_bf16_native`)."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu" and not cpu_bf16_native()
