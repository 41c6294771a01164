"""LayerNorm over the channel axis of NCHW tensors (ConvNeXt's "channels_first" LayerNorm)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm of each pixel's channel vector for ``[N, C, H, W]`` input.

    Parameter names (``weight``, ``bias``) match ConvNeXt/SLaK checkpoints.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)
