"""The built-in depthwise-conv backends, one record each (see :class:`slaknet.layers.backends.DWConvBackend`).

* ``plain``: ``F.conv2d`` exactly as PyTorch runs it (cuDNN on CUDA, oneDNN on CPU), differentiated by
  autograd. Always applies; every other backend falls back to it; ``auto`` keeps it unless another is
  measurably faster.
* ``fast``: slaknet's autograd node (:class:`slaknet.layers.dwconv_impl.DepthwiseConvFunction`): forward and
  input gradient in the memory layout where PyTorch's kernel is fast, weight gradient by FFT, banded GEMMs
  or PyTorch's kernel as :func:`~slaknet.layers.dwconv_impl.choose_weight_grad`'s rules say for the shape.
* ``fft`` / ``gemm``: the same node with that weight-gradient method.

``fast``, ``fft`` and ``gemm`` share one forward, so ``auto`` times ``fast`` for no-grad calls and ``fft``
and ``gemm`` (each a fixed method) for calls that need gradients.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from slaknet.layers.backends import DWConvBackend, register_dwconv_backend
from slaknet.layers.dwconv_impl import conv_forward, forward_reroutes, input_grad, weight_grad, weight_grad_by_rule

__all__ = ["PLAIN", "FAST", "FFT", "GEMM", "fast_applies", "plain_conv"]


def plain_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               padding: Tuple[int, int]) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=padding, groups=C)``: the reference every backend must match."""
    return F.conv2d(x, weight, bias, 1, padding, 1, weight.shape[0])


def fast_applies(x: torch.Tensor, weight: torch.Tensor, padding: Tuple[int, int]) -> bool:
    """slaknet's node handles depthwise, odd-kernel, 'same'-padded, floating-point 4-D convs."""
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != 1 or x.shape[1] != weight.shape[0]:
        return False
    kh, kw = weight.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0 or tuple(padding) != (kh // 2, kw // 2):
        return False
    return x.is_floating_point() and x.device == weight.device


# --- plain --------------------------------------------------------------------------------------------
PLAIN = register_dwconv_backend(DWConvBackend(
    name="plain", applies=lambda x, weight, padding: True, forward=plain_conv, autograd=True,
    description="F.conv2d as PyTorch runs it (cuDNN / oneDNN), autograd's gradients"))

# --- fast: layout-aware forward, weight gradient by rule -------------------------------------------------
FAST = register_dwconv_backend(DWConvBackend(
    name="fast", applies=fast_applies, forward=conv_forward, input_grad=input_grad,
    weight_grad=weight_grad_by_rule, auto_kinds=frozenset({"forward"}),
    forward_is_plain=lambda x, weight, padding: not forward_reroutes(x, padding),
    description="layout-aware forward / input gradient; weight gradient by FFT, banded GEMM or PyTorch per shape rules"))

# --- fft: FFT cross-correlation weight gradient ------------------------------------------------------------
FFT = register_dwconv_backend(DWConvBackend(
    name="fft", applies=fast_applies, forward=conv_forward, input_grad=input_grad,
    weight_grad=functools.partial(weight_grad, "fft"), auto_kinds=frozenset({"train"}),
    description="fast's forward; weight gradient by real 2-D FFTs (cost independent of the kernel size)"))

# --- gemm: banded (Toeplitz) GEMM weight gradient ----------------------------------------------------------
GEMM = register_dwconv_backend(DWConvBackend(
    name="gemm", applies=fast_applies, forward=conv_forward, input_grad=input_grad,
    weight_grad=functools.partial(weight_grad, "gemm"), auto_kinds=frozenset({"train"}),
    description="fast's forward; weight gradient by batched banded GEMMs along the long kernel axis"))
