"""Depthwise convolution operator used by every large-kernel branch.

This module is the single entry point through which slaknet runs a depthwise ("groups == channels")
convolution with 'same' padding. Backends (plain PyTorch, layout tricks, FFT/Toeplitz, Triton) plug in
here, so the layers never care which implementation runs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def depthwise_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    padding: Tuple[int, int] = (0, 0),
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Depthwise conv, stride 1: ``weight`` is ``[C, 1, kh, kw]``, ``x`` is ``[N, C, H, W]``.

    Numerically equal to ``F.conv2d(x, weight, bias, padding=padding, groups=C)``.
    """
    return F.conv2d(x, weight, bias, stride=1, padding=padding, groups=weight.shape[0])
