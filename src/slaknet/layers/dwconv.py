"""Depthwise convolution operator used by every large-kernel branch.

This module is the single entry point through which slaknet runs a depthwise ("groups == channels")
convolution with 'same' padding. It picks a backend automatically per device, shape and dtype:

* ``plain``: ``F.conv2d`` exactly as PyTorch runs it (cuDNN on CUDA, oneDNN on CPU); always available.
* ``fast``: a custom autograd operator (:class:`slaknet.layers.dwconv_impl.DepthwiseConvFunction`) whose
  forward and input gradient run PyTorch's depthwise kernel in the memory layout where it is fast, and
  whose weight gradient is formed by FFT or banded GEMMs where PyTorch's kernel is slow (CPU).
* ``fft`` / ``gemm``: ``fast`` with that weight-gradient method forced (benchmarks, tests).

Default (``auto``): ``fast`` on CPU and CUDA for floating dtypes (on CUDA it keeps cuDNN for the forward,
the input gradient and small square kernels, and replaces only cuDNN's slow strip weight gradient, see
docs/speed.md), ``plain`` on other devices. Override with the ``backend`` argument, or for the whole process
with the environment variable ``SLAKNET_DWCONV=plain|fast|fft|gemm|auto``, or for a block of code in the
current thread with ``with use_backend("plain"):``. The choice is logged once per (device, backend) on the
``slaknet.dwconv`` logger.
"""
from __future__ import annotations

import contextvars
import logging
from contextlib import contextmanager
from typing import Iterator, Optional, Set, Tuple

import torch
import torch.nn.functional as F

from slaknet.layers.dispatch import autocast_dtype, backend_name, exporting

__all__ = ["depthwise_conv2d", "autocast_input", "resolve_backend", "use_backend", "BACKENDS", "ENV_VAR"]

ENV_VAR = "SLAKNET_DWCONV"
BACKENDS = ("auto", "plain", "fast", "fft", "gemm")
logger = logging.getLogger("slaknet.dwconv")
_logged: Set[Tuple[str, str, str]] = set()
# a backend forced for the current thread / task (use_backend); beats the environment variable
_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("slaknet_dwconv_backend", default=None)


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run depthwise convs with backend ``name`` inside the block, in this thread only (unlike
    ``SLAKNET_DWCONV``, which is process-wide). An explicit ``backend=`` argument still wins."""
    _requested(name)  # validate now, with a clear error
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def _requested(backend: Optional[str]) -> str:
    return backend_name(backend if backend is not None else _forced.get(), ENV_VAR, BACKENDS, "depthwise conv")


def _fast_applies(x: torch.Tensor, weight: torch.Tensor, padding: Tuple[int, int]) -> bool:
    """The custom operator handles depthwise, odd-kernel, 'same'-padded, floating-point 4-D convs."""
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != 1 or x.shape[1] != weight.shape[0]:
        return False
    kh, kw = weight.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0 or tuple(padding) != (kh // 2, kw // 2):
        return False
    return x.is_floating_point() and x.device == weight.device


def resolve_backend(x: torch.Tensor, weight: torch.Tensor, padding: Tuple[int, int] = (0, 0),
                    backend: Optional[str] = None) -> str:
    """The backend that :func:`depthwise_conv2d` runs for these inputs: 'plain', 'fast', 'fft' or 'gemm'."""
    return _choose(_requested(backend), x, weight, padding)


def _choose(name: str, x: torch.Tensor, weight: torch.Tensor, padding: Tuple[int, int]) -> str:
    if name == "plain" or not _fast_applies(x, weight, padding):
        return "plain"
    if name == "auto":
        return "fast" if x.device.type in ("cpu", "cuda") else "plain"
    return name


def _log_once(device: str, requested: str, chosen: str) -> None:
    key = (device, requested, chosen)
    if key not in _logged:
        _logged.add(key)
        logger.info("depthwise conv on %s: backend %r (requested %r; set %s or backend= to override)",
                    device, chosen, requested, ENV_VAR)


def depthwise_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    padding: Tuple[int, int] = (0, 0),
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Depthwise conv, stride 1: ``weight`` is ``[C, 1, kh, kw]``, ``x`` is ``[N, C, H, W]``.

    Numerically equal (up to summation order) to ``F.conv2d(x, weight, bias, padding=padding, groups=C)``
    in outputs and gradients, whichever backend runs. ``backend``: see the module docstring.
    """
    padding = (int(padding[0]), int(padding[1]))
    if exporting():
        # tracers / exporters (TorchScript, ONNX, torch.export, torch.compile) see the plain conv op
        return F.conv2d(x, weight, bias, stride=1, padding=padding, groups=weight.shape[0])
    requested = _requested(backend)
    chosen = _choose(requested, x, weight, padding)
    _log_once(x.device.type, requested, chosen)
    if chosen == "plain":
        return F.conv2d(x, weight, bias, stride=1, padding=padding, groups=weight.shape[0])

    dev = x.device.type
    dtype = autocast_dtype(dev)
    if dtype is not None:
        # autocast would run conv2d in its low-precision dtype; do the same cast, then run unautocast
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(dev, enabled=False):
            return _apply(x, weight, bias, padding, chosen)
    return _apply(x, weight, bias, padding, chosen)


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` cast to the active autocast dtype of its device (else unchanged): a layer that feeds one input
    to several depthwise convs casts it once instead of once per conv."""
    if exporting() or not x.is_floating_point():  # tracers: no data-dependent checks, plain graph
        return x
    dtype = autocast_dtype(x.device.type)
    return x.to(dtype) if dtype is not None else x


def _apply(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: Tuple[int, int],
           chosen: str) -> torch.Tensor:
    from slaknet.layers.dwconv_impl import DepthwiseConvFunction, choose_weight_grad, conv_forward

    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if not needs_grad:  # inference: only the layout-aware forward matters, no autograd node
        return conv_forward(x, weight, bias, padding)

    if chosen == "fast":
        n, c, h, w = x.shape
        wgrad = choose_weight_grad(x.device.type, n, c, h, w, weight.shape[2], weight.shape[3])
    else:
        wgrad = chosen
    return DepthwiseConvFunction.apply(x, weight, bias, padding, wgrad)
