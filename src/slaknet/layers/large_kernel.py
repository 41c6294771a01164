"""SLaK's large-kernel depthwise convolution and its inference (reparameterized) forms.

Training form (what the paper trains and the official checkpoints store):

* decomposed (``decompose=True`` and ``N < M``): ``BN(conv_MxN(x)) + BN(conv_NxM(x)) + BN(conv_NxN(x))``,
  stored as ``LoRA1`` (M x N), ``LoRA2`` (N x M) and ``small_conv`` (N x N);
* undecomposed (``decompose=False`` and ``N < M``): ``BN(conv_MxM(x)) + BN(conv_NxN(x))``,
  stored as ``lkb_origin`` and ``small_conv``;
* single kernel (``N >= M``, e.g. a ConvNeXt-style 7x7 written as M=7, N=100): ``BN(conv_MxM(x))``,
  stored as ``lkb_origin``.

Every conv is depthwise, bias-free, stride 1, with 'same' padding ``(kh // 2, kw // 2)``; kernel sizes
must be odd so that 'same' is exact and small kernels can be centred inside large ones.

Inference form (:meth:`LargeKernelConv.reparameterize`): every BN is folded into its conv. The decomposed
form becomes two strips with one shared bias (the N x N kernel is added into the centre of the M x N
strip, whose width matches), which keeps the cost of the strips; ``merge_dense=True`` instead folds all
branches into a single M x M kernel, as the other two forms always do.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from slaknet.errors import ConfigError
from slaknet.layers.dwconv import autocast_input, depthwise_conv2d

__all__ = ["DepthwiseConv2d", "ConvBN", "LargeKernelConv", "fuse_conv_bn"]


def _pair(k) -> Tuple[int, int]:
    return (k, k) if isinstance(k, int) else (int(k[0]), int(k[1]))


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise, stride-1, 'same'-padded conv that runs through slaknet's fast operator.

    It *is* an ``nn.Conv2d`` (same parameters, same state-dict keys), so generic tools such as the sparse
    engine, timm utilities and FLOP counters treat it as one.
    """

    def __init__(self, channels: int, kernel_size, bias: bool = False) -> None:
        kh, kw = _pair(kernel_size)
        if kh % 2 == 0 or kw % 2 == 0:
            raise ConfigError(f"kernel sizes must be odd for 'same' padding, got {kh}x{kw}")
        super().__init__(channels, channels, (kh, kw), stride=1, padding=(kh // 2, kw // 2),
                         groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight, self.bias, self.padding)


class ConvBN(nn.Module):
    """Depthwise conv followed by BatchNorm (keys ``conv.weight``, ``bn.*`` as in SLaK checkpoints)."""

    def __init__(self, channels: int, kernel_size) -> None:
        super().__init__()
        self.conv = DepthwiseConv2d(channels, kernel_size)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def fused_weight_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The ``(weight, bias)`` of one conv equal to this conv + BN in eval mode."""
        return fuse_conv_bn(self.conv.weight, self.bn)


def fuse_conv_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding bias-free conv weight ``[C, 1, kh, kw]``."""
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    return weight * scale.reshape(-1, 1, 1, 1), beta - bn.running_mean * scale


def _embed_centre(kernel: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Zero-pad a ``[C, 1, h, w]`` kernel symmetrically to ``[C, 1, *size]`` (both odd-sized)."""
    h, w = kernel.shape[-2:]
    ph, pw = (size[0] - h) // 2, (size[1] - w) // 2
    return F.pad(kernel, (pw, pw, ph, ph))


class LargeKernelConv(nn.Module):
    """SLaK's large-kernel depthwise convolution (see module docstring for the three forms).

    Args:
        channels: number of channels (input = output, depthwise).
        kernel_size: the large kernel size M.
        small_kernel: the small kernel size N (strip width and parallel small kernel); ``None`` means
            no small kernel (single M x M branch).
        decompose: use the two-strip decomposition (M x N + N x M) instead of an M x M kernel.
    """

    def __init__(self, channels: int, kernel_size: int, small_kernel: Optional[int] = 5,
                 decompose: bool = True) -> None:
        super().__init__()
        if channels < 1:
            raise ConfigError(f"channels must be positive, got {channels}")
        for name, k in (("kernel_size", kernel_size), ("small_kernel", small_kernel)):
            if k is not None and (not isinstance(k, int) or k < 1 or k % 2 == 0):
                raise ConfigError(f"{name} must be a positive odd integer, got {k!r}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        has_small = small_kernel is not None and small_kernel < kernel_size
        self.decompose = bool(decompose and has_small)
        if self.decompose:
            self.LoRA1 = ConvBN(channels, (kernel_size, small_kernel))
            self.LoRA2 = ConvBN(channels, (small_kernel, kernel_size))
        else:
            self.lkb_origin = ConvBN(channels, kernel_size)
        if has_small:
            self.small_conv = ConvBN(channels, small_kernel)
        self.reparameterized: Optional[str] = None  # None | "strips" | "dense"

    @property
    def form(self) -> str:
        """'decomposed', 'undecomposed' or 'single' (the training form this layer was built as)."""
        if self.decompose:
            return "decomposed"
        return "undecomposed" if self.small_kernel is not None and self.small_kernel < self.kernel_size \
            else "single"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)  # one cast for all branches (bf16 autocast), not one per conv
        if self.reparameterized == "strips":
            # module calls (not the functional op) so forward hooks, e.g. MAC counters, see both strips
            return self.lkb_strip1(x) + self.lkb_strip2(x)
        if self.reparameterized == "dense":
            return self.lkb_reparam(x)
        if self.decompose:
            out = self.LoRA1(x) + self.LoRA2(x)
        else:
            out = self.lkb_origin(x)
        if hasattr(self, "small_conv"):
            out = out + self.small_conv(x)
        return out

    @torch.no_grad()
    def reparameterize(self, merge_dense: bool = False) -> None:
        """Fold BatchNorms (eval statistics) and the small kernel into an inference form, in place.

        Decomposed layers become two strip convs (``lkb_strip1`` M x N with the summed bias, ``lkb_strip2``
        N x M) unless ``merge_dense``; all other forms (and ``merge_dense``) become one M x M conv with
        bias (``lkb_reparam``). Zero kernel entries (sparse masks) stay zero, except where the small
        kernel is added in. Calling it twice is a no-op.
        """
        if self.reparameterized is not None:
            return
        m, n = self.kernel_size, self.small_kernel
        small = self.small_conv.fused_weight_bias() if hasattr(self, "small_conv") else None
        if self.decompose and not merge_dense:
            w1, b1 = self.LoRA1.fused_weight_bias()
            w2, b2 = self.LoRA2.fused_weight_bias()
            if small is not None:
                w1 = w1 + _embed_centre(small[0], (m, n))
                b1 = b1 + small[1]
            self.lkb_strip1 = self._make_conv(w1, b1 + b2)
            self.lkb_strip2 = self._make_conv(w2, None)
            self.reparameterized = "strips"
            del self.LoRA1, self.LoRA2
        else:
            if self.decompose:
                w1, b1 = self.LoRA1.fused_weight_bias()
                w2, b2 = self.LoRA2.fused_weight_bias()
                weight = _embed_centre(w1, (m, m)) + _embed_centre(w2, (m, m))
                bias = b1 + b2
                del self.LoRA1, self.LoRA2
            else:
                weight, bias = self.lkb_origin.fused_weight_bias()
                del self.lkb_origin
            if small is not None:
                weight = weight + _embed_centre(small[0], (m, m))
                bias = bias + small[1]
            self.lkb_reparam = self._make_conv(weight, bias)
            self.reparameterized = "dense"
        if hasattr(self, "small_conv"):
            del self.small_conv

    def _make_conv(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> DepthwiseConv2d:
        conv = DepthwiseConv2d(self.channels, tuple(weight.shape[-2:]), bias=bias is not None)
        conv = conv.to(device=weight.device, dtype=weight.dtype)
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
        return conv

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, kernel_size={self.kernel_size}, small_kernel={self.small_kernel}, "
                f"form={self.form}, reparameterized={self.reparameterized}")
