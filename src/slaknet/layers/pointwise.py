"""Pointwise (1x1) layers on the fastest CPU GEMM PyTorch ships: SLaK's MLP at the speed of the hardware.

86% of SLaK-T's multiply-adds are in the two ``Linear`` layers of every block. On CPU, ``nn.Linear`` runs
MKL's sgemm, which on AMD processors takes a code path that reaches about half of what the hardware does
(on this project's 2-core AMD Zen 5 machine: ~105 vs ~220 G multiply-adds/s). oneDNN, which PyTorch also
ships (``torch.ops.mkldnn._linear_pointwise``, the op ``torch.compile`` uses for CPU linears), runs the same
fp32 GEMM at full speed. :class:`Linear` is an ``nn.Linear`` (same parameters and checkpoint keys, seen as
``nn.Linear`` by the sparse engine, counters and timm) whose forward *and* backward use oneDNN's GEMM when
that is faster on this machine, and which can fuse the bias and GELU into the GEMM for inference.

Choice (``SLAKNET_LINEAR=auto|plain|onednn``, default ``auto``, or ``backend=`` per call of :func:`linear`): ``auto`` times both GEMMs once per process
on a SLaK-sized problem and keeps oneDNN only if it is clearly faster (>= 1.15x); the choice is logged once
on the ``slaknet.linear`` logger. ``plain`` is exactly ``F.linear``. Off CPU, for dtypes other than fp32
and bf16, under fp16 autocast, while tracing / exporting / compiling, or if the op is missing,
``F.linear`` runs. Results equal ``F.linear`` up to fp32 summation order (tested against float64).

bf16: under CPU bf16 autocast (and for bf16 tensors) on a CPU with native bf16 (AVX512-BF16 / AMX),
``auto`` runs oneDNN's bf16 GEMM for all three products: the input, weight and bias are cast to bf16 once
(as autocast casts them for ``F.linear``), the result is bf16, and the weight / bias gradients flow back
through the cast into the fp32 parameters, exactly as autocast's ``F.linear`` does (tested against it).
On a CPU without native bf16, where PyTorch's bf16 GEMMs are emulated and several times slower than fp32,
``auto`` casts the same way but runs the three GEMMs in fp32 on the bf16 values and rounds the results to
bf16 (:func:`slaknet.layers.dispatch.bf16_via_fp32`): the same math up to summation order, at fp32 speed.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from slaknet.layers import dispatch
from slaknet.layers.dispatch import autocast_dtype, backend_name, exporting

__all__ = ["Linear", "linear", "linear_backend", "auto_choice", "pin_auto_choice", "ENV_VAR", "BACKENDS"]

ENV_VAR = "SLAKNET_LINEAR"
BACKENDS = ("auto", "plain", "onednn")
logger = logging.getLogger("slaknet.linear")
_auto_choice: Optional[str] = None  # measured once per process


def _op() -> Optional[Callable]:
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def _gemm(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None, act: str = "none") -> torch.Tensor:
    """``a @ b.T (+ bias)``, then ``act`` ('none' or exact 'gelu'), in one oneDNN call (a, b: 2-D)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, act, [], "none" if act == "gelu" else "")


def _measure_auto() -> str:
    """Time F.linear (MKL) against oneDNN on one SLaK-T-sized MLP GEMM; keep oneDNN if >= 1.15x faster."""
    if _op() is None:
        return "plain"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1568, 499, generator=g)
    w = torch.randn(1996, 499, generator=g)
    b = torch.zeros(1996)

    def best(fn: Callable[[], torch.Tensor]) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    try:
        with torch.no_grad():
            t_plain = best(lambda: F.linear(x, w, b))
            t_onednn = best(lambda: _gemm(x, w, b))
    except RuntimeError:
        return "plain"
    choice = "onednn" if t_plain >= 1.15 * t_onednn else "plain"
    logger.info("linear on cpu: %s (MKL %.2f ms vs oneDNN %.2f ms per SLaK-T MLP GEMM; set %s to override)",
                choice, 1e3 * t_plain, 1e3 * t_onednn, ENV_VAR)
    return choice


def auto_choice() -> str:
    """What ``auto`` means on CPU in this process: 'onednn' or 'plain' (timed once, on first use).

    The two GEMMs sum in different orders, so a run that must continue bitwise (a resumed training run)
    records this and pins it with :func:`pin_auto_choice` instead of timing again: on machines where both
    are about as fast, two processes can time differently.
    """
    global _auto_choice
    if _auto_choice is None:
        _auto_choice = _measure_auto()
    return _auto_choice


def pin_auto_choice(name: str) -> None:
    """Make ``auto`` mean ``name`` ('onednn' or 'plain') in this process (``SLAKNET_LINEAR`` still wins)."""
    global _auto_choice
    if name not in ("onednn", "plain"):
        raise ValueError(f"auto can mean 'onednn' or 'plain', not {name!r}")
    _auto_choice = "plain" if name == "onednn" and _op() is None else name


def linear_backend(x: torch.Tensor, weight: torch.Tensor, backend: Optional[str] = None) -> str:
    """What :func:`linear` runs for these tensors (``backend`` beats the environment): 'onednn', 'plain', or
    'fp32' (bf16 in and out, fp32 GEMMs inside: bf16 on a CPU without native bf16, module docstring).

    Under CPU bf16 autocast the answer is for the bf16 GEMM that :func:`linear` then runs."""
    name = backend_name(backend, ENV_VAR, BACKENDS, "linear")
    if name == "plain" or exporting():  # tracers (incl. torch.fx proxies) must not see the checks below
        return "plain"
    if x.device.type != "cpu" or weight.device.type != "cpu" or _op() is None:
        return "plain"
    amp = autocast_dtype("cpu")
    dtypes = {amp} if amp is not None else {x.dtype, weight.dtype}
    if dtypes == {torch.bfloat16}:
        # bf16 GEMMs: oneDNN if the CPU has native bf16 (measured 1.3x F.linear's bf16 path, docs/speed.md)
        return "onednn" if dispatch.cpu_bf16_native() else "fp32"
    if dtypes != {torch.float32}:
        return "plain"
    return auto_choice() if name == "auto" else "onednn"


def _fp32_gemm(backend: Optional[str]) -> str:
    """The fp32 GEMM ('onednn' or 'plain') that the 'fp32' route of :func:`linear` runs."""
    return "onednn" if backend_name(backend, ENV_VAR, BACKENDS, "linear") == "onednn" else auto_choice()


def _nt(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], act: str, gemm: str) -> torch.Tensor:
    """``act(a @ b.T + bias)`` on oneDNN (``gemm='onednn'``, one fused call) or ``F.linear`` ('plain')."""
    if gemm == "onednn":
        return _gemm(a, b, bias, act)
    y = F.linear(a, b, bias)
    return F.gelu(y) if act == "gelu" else y


class _GemmLinear(torch.autograd.Function):
    """y = x W^T + b with all three GEMMs (forward, input and weight gradient) on ``gemm``, computed in the
    dtype ``work`` and returned in the inputs' dtype (``work`` = fp32 for bf16 inputs on the 'fp32' route)."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gemm: str,
                work: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(x2d, weight)  # in their own dtype: bf16 activations stay bf16 in memory
        ctx.has_bias, ctx.gemm, ctx.work = bias is not None, gemm, work
        b = bias.to(work) if bias is not None else None
        return _nt(x2d.to(work), weight.to(work), b, "none", gemm).to(x2d.dtype)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x2d, weight = ctx.saved_tensors
        work, gemm = ctx.work, ctx.gemm
        gy = gy.contiguous().to(work)
        x, w = x2d.to(work), weight.to(work)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _nt(gy, w.t(), None, "none", gemm).to(x2d.dtype)  # gy @ W (oneDNN reads the transposed view)
        if ctx.needs_input_grad[1]:
            out_f, in_f = weight.shape
            # gy^T @ x; oneDNN is fastest with the wider matrix as the first operand
            gw = _nt(x.t(), gy.t(), None, "none", gemm).t().contiguous() if out_f >= in_f \
                else _nt(gy.t(), x.t(), None, "none", gemm)
            gw = gw.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum(0).to(weight.dtype)
        return gx, gw, gb, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           gelu: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (then exact GELU if ``gelu``) on the fastest GEMM; any leading dims.

    ``backend``: 'auto', 'plain' or 'onednn' for this call (default: ``SLAKNET_LINEAR``, else 'auto').
    """
    route = linear_backend(x, weight, backend)
    if route != "plain" and x.is_contiguous():
        if torch.is_autocast_enabled("cpu"):  # bf16 autocast (linear_backend checked): cast once, as autocast
            x, weight = x.to(torch.bfloat16), weight.to(torch.bfloat16)
            bias = bias.to(torch.bfloat16) if bias is not None else None
            with torch.autocast("cpu", enabled=False):
                return linear(x, weight, bias, gelu, backend)
        gemm = "onednn" if route == "onednn" else _fp32_gemm(backend)
        work = torch.float32 if route == "fp32" else x.dtype
        x2d = x.reshape(-1, x.shape[-1])
        if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad)):
            b = bias.to(work) if bias is not None else None
            y = _nt(x2d.to(work), weight.to(work), b, "gelu" if gelu else "none", gemm).to(x.dtype)
            return y.view(*x.shape[:-1], weight.shape[0])
        y = _GemmLinear.apply(x2d, weight, bias, gemm, work).view(*x.shape[:-1], weight.shape[0])
        return F.gelu(y) if gelu else y
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


class Linear(nn.Linear):
    """``nn.Linear`` whose GEMMs run on oneDNN where that is faster (see module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def forward_act(self, x: torch.Tensor, act: nn.Module) -> torch.Tensor:
        """``act(self(x))``; with exact GELU the activation is fused into the GEMM when possible."""
        if type(act) is nn.GELU and act.approximate == "none" and not _has_hooks(self) and not _has_hooks(act):
            return linear(x, self.weight, self.bias, gelu=True)
        return act(self(x))


def _has_hooks(m: nn.Module) -> bool:
    """Fusing skips ``__call__``: only do it when no (module or global) forward hook would be bypassed."""
    g = nn.modules.module
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(g, "_global_forward_hooks", None)
                or getattr(g, "_global_forward_pre_hooks", None))
