"""The segmentation model: a SLaK encoder in a segmentation_models_pytorch decoder, plus the paper's FCN
auxiliary head, input padding, backbone initialisation and stage-wise layer-wise lr decay.

The encoder is smp's timm-universal encoder on the timm-registered SLaK variant (``tu-slak_tiny``...), so
every smp architecture works (``upernet`` by default, ``fpn``, ``deeplabv3plus``...). What the paper's
UperNet (mmseg ``UPerHead`` + ``FCNHead``) has and smp's ``UPerNet`` (0.6) does not, added around it here:

* the FCN auxiliary head on the stage-3 features (stride 16): one 3x3 conv + BN + ReLU (256 channels),
  dropout 0.1, 1x1 classifier, loss weight 0.4 (:class:`FCNAuxHead`);
* ``decoder_channels`` 512 (smp's default is 256) -- a setting, passed through.

Kept as smp has it: PSP pool scales 1/2/3/6 (as the paper), a LayerNorm on each encoder feature (as the
official ``norm0..norm3``), no dropout before the classifier (mmseg: 0.1), the classifier at stride 4
upsampled bilinearly by 4.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from slaknet.errors import CheckpointError, ConfigError, import_optional

__all__ = ["SegmentationNet", "FCNAuxHead", "build_segmentation_model", "encoder_kwargs", "load_backbone",
           "layer_decay_groups", "stage_wise_layer_id", "SMP_ARCHS"]

log = logging.getLogger("slaknet.train")
SMP_ARCHS = ("upernet", "fpn", "deeplabv3plus", "unet", "pspnet", "linknet", "pan", "manet")


class FCNAuxHead(nn.Module):
    """mmseg's ``FCNHead`` as the paper configures it: ``num_convs`` 3x3 conv-BN-ReLU, dropout, 1x1 conv."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 1,
                 dropout: float = 0.1) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        c = in_channels
        for _ in range(num_convs):
            layers += [nn.Conv2d(c, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
            c = channels
        self.convs = nn.Sequential(*layers)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(c, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(x)))


class SegmentationNet(nn.Module):
    """``smp_model`` (encoder + decoder + segmentation head) with an optional auxiliary head.

    ``forward(x)`` returns logits ``[N, classes, H, W]`` for any ``H, W``: the input is zero-padded at the
    bottom / right to a multiple of 32 and the logits are cropped back. ``forward(x, with_aux=True)``
    returns ``(logits, aux_logits)`` (both at input size; aux ``None`` without an aux head).
    """

    def __init__(self, smp_model: nn.Module, aux_head: Optional[nn.Module] = None, aux_index: int = 4,
                 size_divisor: int = 32) -> None:
        super().__init__()
        self.encoder = smp_model.encoder
        self.decoder = smp_model.decoder
        self.segmentation_head = smp_model.segmentation_head
        self.aux_head = aux_head
        self.aux_index = int(aux_index)
        self.size_divisor = int(size_divisor)

    @property
    def backbone(self) -> nn.Module:
        """The SLaK model inside the encoder (``downsample_layers``, ``stages``)."""
        return self.encoder.model.model

    def forward(self, x: torch.Tensor, with_aux: bool = False) -> Any:
        h, w = x.shape[-2:]
        d = self.size_divisor
        ph, pw = (-h) % d, (-w) % d
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        features = self.encoder(x)
        logits = self.segmentation_head(self.decoder(features))[..., :h, :w]
        if not with_aux:
            return logits
        aux = None
        if self.aux_head is not None:
            aux = self.aux_head(features[self.aux_index])
            aux = F.interpolate(aux, size=(h + ph, w + pw), mode="bilinear", align_corners=False)[..., :h, :w]
        return logits, aux


def encoder_kwargs(cfg: Any, input_size: int) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Keyword arguments for the SLaK encoder from the training config (kernels, N, width, drop path...),
    and what was resolved (for the run header and checkpoint)."""
    from slaknet.models.slak import MODEL_SPECS, resolve_kernel_sizes
    from slaknet.models.training import fit_kernel_sizes, recommended_drop_path

    name = cfg.name
    if name not in MODEL_SPECS:
        from slaknet.models.factory import create_model

        create_model(name)  # the one-line "unknown model" error with suggestions
    spec = MODEL_SPECS[name]
    small = spec.get("small_kernel", 5)
    kernels = tuple(spec.get("kernel_size", (51, 49, 47, 13)))
    if cfg.kernel_size:
        kernels, small = resolve_kernel_sizes(cfg.kernel_size, small, len(spec["depths"]))
    if cfg.fit_kernels:
        kernels = fit_kernel_sizes(kernels, small, int(input_size))
    drop_path = float(cfg.drop_path) if cfg.drop_path is not None else recommended_drop_path(name)
    kw: Dict[str, Any] = dict(kernel_size=tuple(kernels), small_kernel=small if small is not None else 0,
                              drop_path_rate=drop_path)
    for key in ("width_factor", "decompose", "layer_scale_init_value"):
        if getattr(cfg, key, None) is not None:
            kw[key] = getattr(cfg, key)
    resolved = {"resolved_kernel_size": list(kernels) + ([small] if small is not None else []),
                "kernels": list(kernels), "small_kernel": small, "resolved_drop_path": drop_path}
    return kw, resolved


def build_segmentation_model(model_name: str, num_classes: int, arch: str = "upernet", decoder_channels: int = 512,
                             aux_weight: float = 0.4, aux_channels: int = 256,
                             encoder_options: Optional[Dict[str, Any]] = None) -> SegmentationNet:
    """A SLaK ``model_name`` encoder (options ``encoder_options``) in smp's ``arch`` with ``num_classes`` outputs,
    plus the FCN auxiliary head on stage 3 when ``aux_weight > 0``."""
    import importlib

    smp = import_optional("segmentation_models_pytorch", "dense", "slaknet segment")
    importlib.import_module("slaknet.models")  # registers the SLaK variants with timm (tu-slak_*)

    if arch.lower() not in SMP_ARCHS:
        raise ConfigError(f"unknown segmentation architecture {arch!r}; choose from {', '.join(SMP_ARCHS)}")
    kw: Dict[str, Any] = dict(encoder_name=f"tu-{model_name}", encoder_weights=None, classes=int(num_classes))
    if arch.lower() in ("upernet", "fpn", "deeplabv3plus", "pan", "pspnet"):
        key = {"fpn": "decoder_segmentation_channels", "pspnet": "psp_out_channels"}.get(arch.lower(), "decoder_channels")
        if arch.lower() == "fpn":
            kw["decoder_pyramid_channels"] = int(decoder_channels)
        kw[key] = int(decoder_channels)
    if arch.lower() in ("pspnet",):
        kw["encoder_depth"] = 3
    try:
        net = smp.create_model(arch, **kw, **dict(encoder_options or {}))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"could not build {arch} with encoder {model_name}: {exc}") from exc
    aux = None
    if aux_weight > 0:
        chans = net.encoder.out_channels  # [input, 0 (no stride 2), stage 1..4]
        aux = FCNAuxHead(int(chans[4]), int(num_classes), int(aux_channels))
    return SegmentationNet(net, aux)


def load_backbone(net: SegmentationNet, path: str, use_ema: Optional[bool] = None) -> str:
    """Initialise the encoder from a SLaK classification checkpoint (official release or slaknet's, read by
    :func:`slaknet.models.factory.model_from_checkpoint`); its ``norm`` / ``head`` are not used. Returns the
    checkpoint's architecture name. A file of another architecture gives a one-line CheckpointError."""
    from slaknet.models.factory import model_from_checkpoint

    if not os.path.isfile(path):
        raise CheckpointError(f"backbone checkpoint {path!r} does not exist")
    model, _, arch = model_from_checkpoint(path, use_ema=use_ema)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(("head.", "norm."))}
    own = net.backbone.state_dict()
    bad = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if bad or missing or unexpected:
        detail = (f"shape of {bad[0]}: {tuple(sd[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}" if bad
                  else f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        raise CheckpointError(f"backbone checkpoint {path} ({arch}) does not fit the encoder ({detail}); "
                              "pass the --model and --kernel-size it was trained with")
    net.backbone.load_state_dict(sd, strict=True)
    return arch


def stage_wise_layer_id(name: str, num_layers: int) -> int:
    """Layer id of parameter ``name`` (named relative to the SLaK backbone, e.g. ``stages.2.0.pwconv1.weight``;
    anything else, e.g. ``head:decoder.x``, is not backbone) under mmseg's ``stage_wise`` rule with
    ``num_layers + 2`` ids: stem and downsamplers 0, stage i -> i + 1, everything else the last id."""
    top = num_layers + 2
    if name.startswith("downsample_layers."):
        return 0
    if name.startswith("stages."):
        return int(name.split(".")[1]) + 1
    return top - 1


def layer_decay_groups(net: SegmentationNet, weight_decay: float, decay_rate: float = 0.9,
                       num_layers: int = 6) -> List[Dict[str, Any]]:
    """Optimizer groups of the paper's ADE20K recipe (``LearningRateDecayOptimizerConstructor``, stage_wise):
    ``lr_scale = decay_rate ** (num_layers + 1 - layer_id)``; no weight decay on 1-D parameters and biases."""
    prefix = "encoder.model.model."
    groups: Dict[str, Dict[str, Any]] = {}
    top = num_layers + 2
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        local = name[len(prefix):] if name.startswith(prefix) else "head:" + name
        lid = stage_wise_layer_id(local, num_layers)
        no_decay = p.ndim == 1 or name.endswith(".bias")
        key = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else float(weight_decay),
                           "lr_scale": float(decay_rate) ** (top - lid - 1), "group_name": key}
        groups[key]["params"].append(p)
    return list(groups.values())

