"""The study's network: SLaK blocks at one resolution, answer read at the centre of the feature map.

``stem`` (s x s patchify conv, stride s, + LayerNorm) -> ``depth`` x :class:`slaknet.models.slak.Block`
(the SLaK block: large-kernel module with BatchNorm on every branch, LayerNorm, MLP, layer scale) ->
the 2 x 2 central feature vectors averaged -> LayerNorm -> Linear.

No downsampling and no global pooling: the receptive field around the centre is exactly
``s * (1 + depth * (M - 1) / 2)`` pixels (half-width of a square, see :func:`receptive_radius`), so
whether a net *can* see the contour is a property of its kernel size alone, and there is no global-pool
shortcut (a pooled head reads the contour's size from anywhere, which made a 3x3 net "solve" the task
in the issue's prototype).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from slaknet.errors import ConfigError
from slaknet.layers import LayerNorm2d
from slaknet.models.slak import Block

__all__ = ["StudyNet", "receptive_radius"]


def receptive_radius(kernel_size: int, depth: int, stem: int) -> int:
    """Half-width in pixels (Chebyshev, from the image centre) of the theoretical receptive field."""
    return int(stem * (1 + depth * (int(kernel_size) - 1) // 2))


class StudyNet(nn.Module):
    """Single-resolution SLaK-block classifier with a centre readout.

    Args:
        width: channels of every block (``int(width * width_factor)`` are used).
        depth: number of SLaK blocks.
        stem: patch size and stride of the stem conv.
        kernel_size: large kernel M of every block.
        small_kernel: small kernel N (``None`` or ``>= M``: a single M x M conv + BN).
        decompose: M x N + N x M + N x N (True) or M x M + N x N (False).
        width_factor: width multiplier (the paper's 1.3x for sparse nets).
        in_chans / num_classes: input channels and outputs.
        layer_scale_init_value: initial block layer scale (the short study budgets use 0.1, not
            ConvNeXt's 1e-6, so blocks contribute from the first steps).
    """

    def __init__(self, width: int = 32, depth: int = 2, stem: int = 2, kernel_size: int = 3,
                 small_kernel: Optional[int] = None, decompose: bool = True, width_factor: float = 1.0,
                 in_chans: int = 1, num_classes: int = 2, layer_scale_init_value: float = 0.1) -> None:
        super().__init__()
        if depth < 1 or stem < 1 or width < 1:
            raise ConfigError(f"depth, stem and width must be >= 1, got {depth}, {stem}, {width}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        dim = int(round(width * width_factor))
        self.dim, self.depth, self.stem_size = dim, depth, stem
        self.kernel_size, self.small_kernel, self.decompose = int(kernel_size), small_kernel, decompose
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dim, stem, stride=stem), LayerNorm2d(dim, eps=1e-6))
        self.blocks = nn.Sequential(*[Block(dim, kernel_size, small_kernel, decompose, drop_path=0.0,
                                            layer_scale_init_value=layer_scale_init_value)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final ``[N, C, h, w]`` map (before the readout)."""
        return self.blocks(self.stem(x))

    def centre_map(self, x: torch.Tensor) -> torch.Tensor:
        """The readout as a ``[N, C, 1, 1]`` map: the mean of the 2 x 2 (odd side: 1 x 1) central positions.

        This is what the classifier sees, so it is also what the ERF is measured on.
        """
        f = self.forward_features(x)
        h, w = f.shape[-2:]
        y0, x0 = (h - 1) // 2, (w - 1) // 2
        return f[:, :, y0:h // 2 + 1, x0:w // 2 + 1].mean(dim=(2, 3), keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.centre_map(x).flatten(1)))
