"""A dense ``nn.Conv2d`` (SLaK's patchify stem and its downsampling convs) that keeps bf16 fast on CPUs
without native bf16.

Under CPU bf16 autocast PyTorch runs these convs as bf16 kernels; where the CPU has no bf16 hardware
(e.g. AVX2-only machines) those are emulated and were measured to take ~40% of a bf16 training step of the
demo model once the depthwise convs and 1x1 layers were fixed. :class:`Conv2d` then computes in fp32 on the
bf16-rounded input, weight and bias and rounds the output to bf16: what the native kernel computes, up to
summation order (:func:`slaknet.layers.dispatch.bf16_via_fp32`). Everywhere else it is ``nn.Conv2d``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from slaknet.layers import dispatch

__all__ = ["Conv2d"]

_BF16 = torch.bfloat16


def _bf16_without_hardware(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """bf16 math requested (CPU bf16 autocast, or bf16 input and weight) on a CPU that lacks bf16 units."""
    if dispatch.exporting() or x.device.type != "cpu" or dispatch.cpu_bf16_native():  # tracers: plain op
        return False
    amp = dispatch.autocast_dtype("cpu")
    if amp is not None:
        return amp == _BF16 and x.is_floating_point()
    return x.dtype == weight.dtype == _BF16


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, keys and results) with fp32-computed bf16 on CPUs without bf16 units."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _bf16_without_hardware(x, self.weight):
            return super().forward(x)
        # round exactly where autocast (or bf16 tensors) would, compute the products exactly in fp32;
        # the casts are differentiable, so gradients are rounded to bf16 at the same points as well
        w = self.weight.to(_BF16).float()
        b = self.bias.to(_BF16).float() if self.bias is not None else None
        with torch.autocast("cpu", enabled=False):
            return self._conv_forward(x.to(_BF16).float(), w, b).to(_BF16)
