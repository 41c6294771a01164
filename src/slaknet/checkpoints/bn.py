"""BatchNorm folding: the one formula, for modules' tensors and for state dicts alike.

An eval-mode BatchNorm after a bias-free conv is the conv with weight ``w * gamma / sqrt(var + eps)`` and
bias ``beta - mean * gamma / sqrt(var + eps)``.
"""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch

__all__ = ["BN_EPS", "fold_batchnorm", "fold_state_bn"]

BN_EPS = 1e-5  # nn.BatchNorm2d's default, which the official SLaK code uses too


def fold_batchnorm(weight: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                   gamma: Optional[torch.Tensor] = None, beta: Optional[torch.Tensor] = None,
                   eps: float = BN_EPS) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(weight, bias)`` of one conv equal to a bias-free conv ``weight [C, ...]`` followed by the BN."""
    std = (running_var + eps).sqrt()
    gamma = gamma if gamma is not None else torch.ones_like(std)
    beta = beta if beta is not None else torch.zeros_like(std)
    scale = gamma / std
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1))), beta - running_mean * scale


def fold_state_bn(state_dict: Mapping[str, torch.Tensor], weight: torch.Tensor, bn_prefix: str,
                  eps: float = BN_EPS) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Fold the BatchNorm stored under ``bn_prefix`` (``.running_mean``, ``.running_var``, ``.weight``,
    ``.bias``) of a state dict into ``weight``; None when the state dict has no such BN for its channels."""
    channels = weight.shape[0]
    var = state_dict.get(bn_prefix + ".running_var")
    mean = state_dict.get(bn_prefix + ".running_mean")
    if var is None or mean is None or var.numel() != channels:
        return None

    def opt(name: str) -> Optional[torch.Tensor]:
        t = state_dict.get(f"{bn_prefix}.{name}")
        return t.float() if t is not None and t.numel() == channels else None

    return fold_batchnorm(weight.float(), mean.float(), var.float(), opt("weight"), opt("bias"), eps)
