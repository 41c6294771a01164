"""SLaK as a multi-scale backbone for detection and segmentation.

:class:`SLaKBackbone` returns the stage outputs (strides 4, 8, 16, 32). Its parameter names are those of
the official SLaK segmentation/detection backbones (``downsample_layers.*``, ``stages.*`` and, with
``norm_outputs=True``, one channels-first LayerNorm per stage named ``norm0`` .. ``norm3``), so the
``backbone.*`` part of their mmseg/mmdet checkpoints loads strictly with :meth:`SLaKBackbone.from_checkpoint`
(as do classification checkpoints, whose ``norm``/``head`` are ignored).

Input sizes that are not multiples of the deepest output stride (32) are zero-padded at the bottom/right by
default (``pad_input="pad"``), so a stride-s map has ``ceil(H / s)`` rows; ``"error"`` rejects such inputs
with a one-line error instead, ``"none"`` passes them as they are (the stride-2 convs then drop the last
row/column where a size is odd).

:class:`SimpleSegmentationHead` is a small plain-PyTorch head on the multi-scale features (a minimal
FPN-style sum), used in docs/deployment.md and the tests to show the backbone end to end.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from slaknet.errors import CheckpointError, ConfigError
from slaknet.layers import LayerNorm2d

__all__ = ["SLaKBackbone", "SimpleSegmentationHead", "PAD_MODES", "backbone_state_dict"]

PAD_MODES = ("pad", "error", "none")
_BACKBONE_PREFIXES = ("backbone.", "encoder.model.", "encoder.")


class SLaKBackbone(nn.Module):
    """Stage outputs of a SLaK model as a list of NCHW maps.

    Args:
        model: a registered variant name (``"slak_tiny"``) or a built SLaK model (its stem and stages are
            taken over; its ``norm``/``head`` are dropped).
        out_indices: which stages to return (0..3), in increasing order.
        norm_outputs: add a channels-first LayerNorm (eps 1e-6) per stage, ``norm0``.. ``norm3``, applied to
            the returned maps (as the official segmentation/detection backbones do).
        pad_input: ``"pad"`` (default), ``"error"`` or ``"none"`` for inputs whose height/width are not
            multiples of the deepest returned stride (module docstring).
        **model_kwargs: options for building ``model`` by name (``kernel_size``, ``drop_path_rate``, ...).
    """

    def __init__(self, model: Union[str, nn.Module] = "slak_tiny", out_indices: Sequence[int] = (0, 1, 2, 3),
                 norm_outputs: bool = False, pad_input: str = "pad", **model_kwargs: Any) -> None:
        super().__init__()
        if pad_input not in PAD_MODES:
            raise ConfigError(f"pad_input must be one of {', '.join(PAD_MODES)}, got {pad_input!r}")
        if isinstance(model, str):
            from slaknet.models.factory import create_model

            model_kwargs.setdefault("num_classes", 0)
            model = create_model(model, **model_kwargs)
        elif model_kwargs:
            raise ConfigError("model options are only accepted when the model is given by name")
        if not hasattr(model, "downsample_layers") or not hasattr(model, "stages"):
            raise ConfigError(f"expected a SLaK model (with downsample_layers and stages), got {type(model).__name__}")
        num_stages = len(model.stages)
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or list(out_indices) != sorted(set(out_indices)) or \
                out_indices[0] < 0 or out_indices[-1] >= num_stages:
            raise ConfigError(f"out_indices must be increasing stage indices in 0..{num_stages - 1}, "
                              f"got {list(out_indices)}")
        self.out_indices = out_indices
        self.pad_input = pad_input
        self.downsample_layers = model.downsample_layers[:out_indices[-1] + 1]
        self.stages = model.stages[:out_indices[-1] + 1]
        widths = [int(s[0].pwconv2.out_features) for s in model.stages]
        self.widths = widths
        self.norm_outputs = bool(norm_outputs)
        if self.norm_outputs:  # one per stage, as in the official backbones (keys norm0..norm3)
            for i in range(num_stages):
                self.add_module(f"norm{i}", LayerNorm2d(widths[i], eps=1e-6))
        self.pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        # the architecture record of the full model (for metadata of exported / saved backbones)
        self.depths = tuple(len(s) for s in model.stages)
        self.dims = tuple(widths)
        for attr in ("kernel_sizes", "small_kernel", "decompose", "width_factor"):
            setattr(self, attr, getattr(model, attr, None))
        self.num_classes = 0
        self.feature_info = [dict(num_chs=widths[i], reduction=4 * 2 ** i, module=f"stages.{i}")
                             for i in out_indices]

    @property
    def out_channels(self) -> List[int]:
        """Channels of each returned map."""
        return [f["num_chs"] for f in self.feature_info]

    @property
    def reductions(self) -> List[int]:
        """Stride of each returned map relative to the input."""
        return [f["reduction"] for f in self.feature_info]

    @property
    def size_divisor(self) -> int:
        """Input sizes that are multiples of this need no padding."""
        return 4 * 2 ** self.out_indices[-1]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the ``pad_input`` policy to an NCHW input."""
        h, w = x.shape[-2:]
        d = self.size_divisor
        ph, pw = (-h) % d, (-w) % d
        if ph == 0 and pw == 0 or self.pad_input == "none":
            return x
        if self.pad_input == "error":
            raise ConfigError(f"input size {h}x{w} is not a multiple of {d}; resize or pad it, or build the "
                              "backbone with pad_input='pad'")
        return F.pad(x, (0, pw, 0, ph))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.pad(x)
        outs = []
        for i, (down, stage) in enumerate(zip(self.downsample_layers, self.stages)):
            x = stage(down(x))
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(x) if self.norm_outputs else x)
        return outs

    @classmethod
    def from_checkpoint(cls, path_or_state: Union[str, os.PathLike, Mapping[str, Any]], model: str = "slak_tiny",
                        out_indices: Sequence[int] = (0, 1, 2, 3), norm_outputs: Optional[bool] = None,
                        pad_input: str = "pad", use_ema: Optional[bool] = None,
                        **model_kwargs: Any) -> "SLaKBackbone":
        """Build the backbone that fits a checkpoint and load it strictly.

        Accepts classification checkpoints (official or slaknet; ``norm``/``head`` ignored), official
        mmseg/mmdet checkpoints (the ``backbone.*`` tensors of ``state_dict``) and saved backbones.
        Kernel sizes, widths and depths are read from the tensors. ``norm_outputs=None`` adds
        ``norm0..norm3`` exactly when the file has them.
        """
        from slaknet.models.checkpoint import describe_state_dict, read_checkpoint
        from slaknet.models.factory import guess_variant, reparameterize_model
        from slaknet.models.slak import MODEL_SPECS

        obj = read_checkpoint(path_or_state) if isinstance(path_or_state, (str, os.PathLike)) else path_or_state
        sd = backbone_state_dict(obj, use_ema=use_ema)
        spec = describe_state_dict(sd)
        has_norms = any(k.startswith("norm0.") for k in sd)
        if norm_outputs is None:
            norm_outputs = has_norms
        variant, wf = guess_variant(spec)
        arch: Dict[str, Any] = dict(depths=spec.depths, kernel_size=spec.kernel_sizes, num_classes=0,
                                    in_chans=spec.in_chans,
                                    layer_scale_init_value=1e-6 if spec.layer_scale else 0.0)
        if variant is not None:
            arch.update(dims=MODEL_SPECS[variant]["dims"], width_factor=wf)
        else:
            arch.update(dims=spec.widths, width_factor=1.0)
        if spec.reparameterized != "dense":
            arch.update(small_kernel=spec.small_kernel, decompose=spec.decompose)
        arch.update(model_kwargs)
        from slaknet.models.factory import create_model

        net = create_model(variant or model, **arch)
        if spec.reparameterized:
            reparameterize_model(net, merge_dense=spec.reparameterized == "dense", inplace=True)
        backbone = cls(net, out_indices=range(len(spec.depths)), norm_outputs=norm_outputs, pad_input=pad_input)
        own = backbone.state_dict()
        wanted = {k: v for k, v in sd.items() if k in own or k.startswith(("downsample_layers.", "stages."))
                  or (k.startswith("norm") and k[4:5].isdigit())}
        if not norm_outputs:
            wanted = {k: v for k, v in wanted.items() if not (k.startswith("norm") and k[4:5].isdigit())}
        missing = sorted(set(own) - set(wanted))
        unexpected = sorted(set(wanted) - set(own))
        if missing or unexpected:
            raise CheckpointError(f"checkpoint does not fit the backbone: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]} (file: {spec.summary()})")
        backbone.load_state_dict(wanted, strict=True)
        if tuple(out_indices) != backbone.out_indices:
            backbone.set_out_indices(out_indices)
        return backbone

    def set_out_indices(self, out_indices: Sequence[int]) -> None:
        """Return other stages (only stages that exist in this backbone)."""
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or list(out_indices) != sorted(set(out_indices)) or out_indices[0] < 0 or \
                out_indices[-1] >= len(self.stages):
            raise ConfigError(f"out_indices must be increasing stage indices in 0..{len(self.stages) - 1}, "
                              f"got {list(out_indices)}")
        self.out_indices = out_indices
        self.feature_info = [dict(num_chs=self.widths[i], reduction=4 * 2 ** i, module=f"stages.{i}")
                             for i in out_indices]


def backbone_state_dict(obj: Any, use_ema: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """The backbone tensors of a classification, mmseg/mmdet (``backbone.*``) or backbone checkpoint object."""
    from slaknet.models.checkpoint import extract_state_dict

    sd = extract_state_dict(obj, use_ema=use_ema)
    for prefix in _BACKBONE_PREFIXES:
        if any(k.startswith(prefix + "stages.") for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not any(k.startswith("stages.") for k in sd):
        raise CheckpointError("no SLaK backbone tensors found (expected 'stages.*' or 'backbone.stages.*' keys)")
    return {k: v for k, v in sd.items() if not (k.startswith("head.") or k.startswith("norm."))}


class SimpleSegmentationHead(nn.Module):
    """A small segmentation head: 1x1 projections of each level, upsampled and summed, 3x3 conv, classifier.

    ``forward(features, output_size)`` returns logits ``[N, num_classes, *output_size]``: the logits at the
    first level's stride (``first_stride``, 4 for SLaK) are upsampled to that level's padded extent and
    cropped to ``output_size``, which drops any padding the backbone added.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 64,
                 first_stride: int = 4) -> None:
        super().__init__()
        if num_classes < 1 or channels < 1 or not in_channels:
            raise ConfigError("in_channels must be non-empty; num_classes and channels must be positive")
        self.first_stride = int(first_stride)
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fuse = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor], output_size: Sequence[int]) -> torch.Tensor:
        if len(features) != len(self.lateral):
            raise ConfigError(f"expected {len(self.lateral)} feature maps, got {len(features)}")
        size = features[0].shape[-2:]
        x = self.lateral[0](features[0])
        for lat, f in zip(self.lateral[1:], features[1:]):
            x = x + F.interpolate(lat(f), size=size, mode="bilinear", align_corners=False)
        logits = self.classifier(self.fuse(x))
        padded = (int(size[0]) * self.first_stride, int(size[1]) * self.first_stride)
        logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
        return logits[..., :int(output_size[0]), :int(output_size[1])]
