"""LayerNorm over the channel axis of NCHW tensors (ConvNeXt's "channels_first" LayerNorm), from timm."""
from __future__ import annotations

from timm.layers import LayerNorm2d as _TimmLayerNorm2d

__all__ = ["LayerNorm2d"]


class LayerNorm2d(_TimmLayerNorm2d):
    """timm's ``LayerNorm2d`` (permute to NHWC, ``F.layer_norm``, permute back; parameters ``weight`` and
    ``bias`` as in ConvNeXt/SLaK checkpoints), unchanged in numbers and keys.

    Why a subclass rather than timm's class itself: its output is the channels-last view of the NHWC
    result (no copy back to NCHW-contiguous), which is the layout slaknet relies on for speed, and
    ``slaknet bench``'s "official layout" arm swaps this class's ``forward`` for the channels-first
    formula while it runs -- patching a slaknet class leaves timm's own ``LayerNorm2d`` (used by other
    timm models in the same process) untouched.
    """
