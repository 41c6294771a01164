"""A dense ``nn.Conv2d`` (SLaK's patchify stem and its downsampling convs) that keeps bf16 fast on CPUs
without native bf16.

Under CPU bf16 autocast PyTorch runs these convs as bf16 kernels; where the CPU has no bf16 hardware
(e.g. AVX2-only machines) those are emulated and were measured to take ~40% of a bf16 training step of the
demo model once the depthwise convs and 1x1 layers were fixed. :class:`Conv2d` then computes in fp32 on the
bf16-rounded input, weight and bias and rounds the output to bf16: what the native kernel computes, up to
summation order (:func:`slaknet.layers.dispatch.bf16_via_fp32`).

Training on the CPU, a patchify conv (stride = kernel, no padding: SLaK's downsamplers) on a channels_last
input runs as one GEMM over the non-overlapping patches (:func:`patch_linear`): on the demo model's small
maps oneDNN's conv and its backward were measured 1.3-2.6x slower than the GEMMs (docs/speed.md, "The
demo's training step"). Same function up to summation order. Everywhere else it is ``nn.Conv2d``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from slaknet.layers import dispatch

__all__ = ["Conv2d", "patch_linear"]

# the patch-GEMM route for training calls (False: always nn.Conv2d's; benchmarks toggle it)
PATCH_GEMM = True

_BF16 = torch.bfloat16


def _bf16_without_hardware(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """bf16 math requested (CPU bf16 autocast, or bf16 input and weight) on a CPU that lacks bf16 units."""
    if dispatch.exporting() or x.device.type != "cpu" or dispatch.cpu_bf16_native():  # tracers: plain op
        return False
    amp = dispatch.autocast_dtype("cpu")
    if amp is not None:
        return amp == _BF16 and x.is_floating_point()
    return x.dtype == weight.dtype == _BF16


def patch_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=k)`` for a ``k x k`` kernel tiling the input (no padding, no
    groups), as one GEMM: each output pixel is the dot product of its patch (read from the NHWC memory of a
    channels_last ``x`` in ``(i, j, channel)`` order) with the weight in the same order. The result is
    channels_last, as the conv's would be."""
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho, wo = h // kh, w // kw
    xh = x.permute(0, 2, 3, 1)[:, :ho * kh, :wo * kw]  # NHWC view (rows / columns past the last patch dropped)
    patches = xh.reshape(n, ho, kh, wo, kw, c).permute(0, 1, 3, 2, 4, 5).reshape(n * ho * wo, kh * kw * c)
    y = F.linear(patches, weight.permute(0, 2, 3, 1).reshape(o, kh * kw * c), bias)
    return y.view(n, ho, wo, o).permute(0, 3, 1, 2)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, keys and results) with fp32-computed bf16 on CPUs without bf16 units
    and patchify convs trained on the CPU as one GEMM."""

    def _patch_gemm_applies(self, x: torch.Tensor) -> bool:
        if not PATCH_GEMM or dispatch.exporting():  # first: a tracer's proxies cannot answer the tests below
            return False
        return (x.device.type == "cpu" and x.dim() == 4 and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and tuple(self.stride) == tuple(self.kernel_size)
                and tuple(self.padding) == (0, 0) and tuple(self.dilation) == (1, 1) and self.groups == 1
                and self.padding_mode == "zeros" and torch.is_grad_enabled()
                and (x.requires_grad or self.weight.requires_grad)
                and x.is_contiguous(memory_format=torch.channels_last) and dispatch.autocast_dtype("cpu") is None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _bf16_without_hardware(x, self.weight):
            if self._patch_gemm_applies(x):
                return patch_linear(x, self.weight, self.bias)
            return super().forward(x)
        # round exactly where autocast (or bf16 tensors) would, compute the products exactly in fp32;
        # the casts are differentiable, so gradients are rounded to bf16 at the same points as well
        w = self.weight.to(_BF16).float()
        b = self.bias.to(_BF16).float() if self.bias is not None else None
        with torch.autocast("cpu", enabled=False):
            return self._conv_forward(x.to(_BF16).float(), w, b).to(_BF16)
