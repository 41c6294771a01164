"""The SLaK model family: ConvNeXt macro design with sparse-trainable large decomposed kernels.

Layout and parameter names follow the official SLaK release exactly (``downsample_layers``, ``stages``,
``norm``, ``head``), so released checkpoints load with strict key checking and no renaming.

* stem ``downsample_layers.0``: 4x4 stride-4 conv + channels-first LayerNorm (eps 1e-6);
* downsamplers ``downsample_layers.1..``: LayerNorm + 2x2 stride-2 conv;
* ``stages.i``: a sequence of :class:`Block`;
* head: global average pool -> LayerNorm (``norm``) -> Linear (``head``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from slaknet.errors import ConfigError
from slaknet.layers import Conv2d, LargeKernelConv, LayerNorm2d, Linear
from slaknet.layers.block_mlp import mlp_branch, residual_mlp

__all__ = ["SLaK", "Block", "MODEL_SPECS", "RECIPE_DEFAULTS", "BUILDER_KEYS", "recipe_defaults",
           "resolve_kernel_sizes"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Block(nn.Module):
    """large-kernel depthwise conv -> LayerNorm -> Linear(4x) -> GELU -> Linear -> layer scale -> drop path."""

    def __init__(self, dim: int, kernel_size: int, small_kernel: Optional[int], decompose: bool = True,
                 drop_path: float = 0.0, layer_scale_init_value: float = 1e-6, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.large_kernel = LargeKernelConv(dim, kernel_size, small_kernel, decompose)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.pwconv2 = Linear(mlp_ratio * dim, dim)
        self.gamma = (nn.Parameter(layer_scale_init_value * torch.ones(dim))
                      if layer_scale_init_value > 0 else None)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.large_kernel(x)
        if not self.training:  # no drop path: the MLP may run fused, in cache-sized chunks (layers.block_mlp)
            return residual_mlp(x, y, self.norm, self.pwconv1, self.act, self.pwconv2, self.gamma)
        # per pixel (NHWC) LayerNorm and MLP, then layer scale
        return x + self.drop_path(mlp_branch(y, self.norm, self.pwconv1, self.act, self.pwconv2, self.gamma))


def resolve_kernel_sizes(kernel_size: Sequence[int], small_kernel: Optional[int],
                         num_stages: int) -> Tuple[Tuple[int, ...], Optional[int]]:
    """Accept ``kernel_size`` as one large kernel per stage, or the official ``[*per_stage, N]`` form."""
    ks = [int(k) for k in kernel_size]
    if small_kernel == 0:  # 0 = no small kernel (timm.create_model drops None-valued keywords)
        small_kernel = None
    if len(ks) == num_stages + 1:
        ks, small_kernel = ks[:-1], ks[-1]
    if len(ks) != num_stages:
        raise ConfigError(f"kernel_size needs {num_stages} values (one per stage) or {num_stages + 1} "
                          f"(per stage + small kernel N), got {list(kernel_size)}")
    for k in ks + ([small_kernel] if small_kernel is not None else []):
        if k < 1 or k % 2 == 0:
            raise ConfigError(f"kernel sizes must be positive odd integers, got {list(kernel_size)} "
                              f"with small kernel {small_kernel}")
    return tuple(ks), small_kernel


class SLaK(nn.Module):
    """Sparse Large Kernel Network (dense container; sparsity is applied by :mod:`slaknet.sparse`).

    Args:
        in_chans: input channels.
        num_classes: classifier outputs (0 for no classifier).
        depths: blocks per stage.
        dims: base stage widths; actual widths are ``int(d * width_factor)``.
        width_factor: width multiplier (1.3 in the paper: sparsity pays for the extra width).
        kernel_size: large kernel M per stage (or the official ``[*M, N]`` list).
        small_kernel: small kernel N (strip width); ``None`` (or 0) or ``>= M`` gives a single M x M kernel.
        decompose: decomposed strips (M x N + N x M + N x N) instead of an M x M kernel.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        layer_scale_init_value: initial layer scale (``gamma``); 0 disables it.
        head_init_scale: multiplies the classifier's initial weights and bias.
        drop_rate: dropout before the classifier.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (96, 192, 384, 768), width_factor: float = 1.3,
                 kernel_size: Sequence[int] = (51, 49, 47, 13), small_kernel: Optional[int] = 5,
                 decompose: bool = True, drop_path_rate: float = 0.0, layer_scale_init_value: float = 1e-6,
                 head_init_scale: float = 1.0, drop_rate: float = 0.0, global_pool: str = "avg") -> None:
        super().__init__()
        if len(depths) != len(dims) or not depths:
            raise ConfigError(f"depths {list(depths)} and dims {list(dims)} must be non-empty and equally long")
        if width_factor <= 0:
            raise ConfigError(f"width_factor must be positive, got {width_factor}")
        if not 0.0 <= drop_path_rate < 1.0 or not 0.0 <= drop_rate < 1.0:
            raise ConfigError("drop_path_rate and drop_rate must be in [0, 1)")
        if global_pool not in ("avg", ""):
            raise ConfigError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")
        kernel_sizes, small_kernel = resolve_kernel_sizes(kernel_size, small_kernel, len(depths))
        widths = [int(d * width_factor) for d in dims]

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.depths = tuple(depths)
        self.dims = tuple(widths)
        self.kernel_sizes = kernel_sizes
        self.small_kernel = small_kernel
        self.decompose = decompose
        self.width_factor = width_factor
        self.grad_checkpointing = False

        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(
            Conv2d(in_chans, widths[0], kernel_size=4, stride=4), LayerNorm2d(widths[0], eps=1e-6)))
        for i in range(1, len(depths)):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm2d(widths[i - 1], eps=1e-6), Conv2d(widths[i - 1], widths[i], kernel_size=2, stride=2)))

        total = sum(depths)  # stochastic depth rate grows linearly from 0 to drop_path_rate
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.ModuleList()
        self.feature_info: List[Dict[str, Any]] = []
        block_idx = 0
        for i, depth in enumerate(depths):
            self.stages.append(nn.Sequential(*[
                Block(widths[i], kernel_sizes[i], small_kernel, decompose, rates[block_idx + j], layer_scale_init_value)
                for j in range(depth)]))
            block_idx += depth
            self.feature_info.append(dict(num_chs=widths[i], reduction=4 * 2 ** i, module=f"stages.{i}"))

        self.num_features = self.head_hidden_size = widths[-1]
        self.norm = nn.LayerNorm(widths[-1], eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = Linear(widths[-1], num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # --- timm model interface -------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for timm's layer-wise lr decay (as ConvNeXt's): stem; then per stage its
        downsampler (grouped with the stage's first block) and each block; the final norm; the head last
        (unmatched names get timm's largest ordinal)."""
        return dict(
            stem=r"^downsample_layers\.0\.",
            blocks=r"^(?:downsample_layers|stages)\.(\d+)" if coarse else [
                (r"^downsample_layers\.(\d+)\.", (0,)),
                (r"^stages\.(\d+)\.(\d+)\.", None),
                (r"^norm\.", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (training only): less memory, more time.

        Uses timm's ``checkpoint_seq`` over each stage's blocks. BatchNorm running statistics inside the
        large-kernel branches are updated twice per step while it is on (forward and recomputation).
        """
        self.grad_checkpointing = enable

    def _run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample_layers[i](x)
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages[i], x)
        return self.stages[i](x)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (``num_classes=0`` removes it, leaving pooled features)."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ConfigError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            self._init_weights(self.head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, stages and downsamplers: the final NCHW feature map (stride 32 for 4 stages)."""
        for i in range(len(self.stages)):
            x = self._run_stage(i, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = self.norm(x.mean(dim=(-2, -1)))
        else:  # no pooling: normalise each position's channel vector
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs for dense prediction (strides 4, 8, 16, 32).

        ``indices``: last n stages if int, all if None, else the listed stage indices. SLaK has no per-stage
        norms (:class:`slaknet.deploy.SLaKBackbone` adds them), so ``norm=True`` applies the final norm to
        each pixel of the last stage's output only. ``stop_early`` skips stages after the last one taken.
        Returns the list of intermediates, or ``(final_features, intermediates)`` unless
        ``intermediates_only``; the final features are never normalised (they feed :meth:`forward_head`).
        """
        if output_fmt != "NCHW":
            raise ConfigError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        intermediates = []
        for i in range(max_index + 1 if stop_early else len(self.stages)):
            x = self._run_stage(i, x)
            if i in take_indices:
                normed = norm and i == last_idx
                intermediates.append(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if normed else x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop stages after the last requested one, and the head (``prune_head``) or final norm
        (``prune_norm``; always when the last stage goes, as the norm is sized for it); ``feature_info``
        then lists the kept stages only."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        self.downsample_layers = self.downsample_layers[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices


# --- registered variants ------------------------------------------------------------------------------
# Architecture only: every key is a :class:`SLaK` argument. Paper variants (ImageNet): depths / base
# widths; width_factor 1.3 and kernels 51/49/47/13 with N=5.
MODEL_SPECS: Dict[str, Dict[str, Any]] = {
    "slak_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "slak_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    "slak_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    "slak_large": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
    # Small CPU variants for small images (64-128 px). Kernels are scaled to the feature maps of a
    # 128 px input (stage maps 32/16/8/4), as 51/49/47/13 are to 56/28/14/7 at 224 px. Their ``_k7``
    # twins have identical depth, width and BatchNorm after the depthwise conv, but a single 7x7 kernel.
    "slak_nano": dict(depths=(2, 2, 4, 2), dims=(48, 96, 192, 384), width_factor=1.0, kernel_size=(31, 29, 27, 13)),
    "slak_pico": dict(depths=(1, 1, 2, 1), dims=(32, 64, 128, 256), width_factor=1.0, kernel_size=(31, 29, 27, 13)),
}
MODEL_SPECS["slak_nano_k7"] = dict(MODEL_SPECS["slak_nano"], kernel_size=(7, 7, 7, 7), small_kernel=None)
MODEL_SPECS["slak_pico_k7"] = dict(MODEL_SPECS["slak_pico"], kernel_size=(7, 7, 7, 7), small_kernel=None)

# Recipe defaults, kept apart from the architecture: ``input_size`` (the variant's nominal resolution, in
# its pretrained_cfg) and ``drop_path`` (stochastic depth of the paper's ImageNet recipe; the model's own
# default stays 0 as in ConvNeXt, the training recipe applies it).
RECIPE_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "slak_tiny": dict(input_size=224, drop_path=0.1),
    "slak_small": dict(input_size=224, drop_path=0.4),
    "slak_base": dict(input_size=224, drop_path=0.5),
    "slak_large": dict(input_size=224, drop_path=0.5),
    **{name: dict(input_size=128, drop_path=0.0)
       for name in ("slak_nano", "slak_nano_k7", "slak_pico", "slak_pico_k7")},
}

# Keywords the builders accept: SLaK's arguments plus the timm factory's own.
BUILDER_KEYS = frozenset({
    "in_chans", "num_classes", "depths", "dims", "width_factor", "kernel_size", "small_kernel", "decompose",
    "drop_path_rate", "layer_scale_init_value", "head_init_scale", "drop_rate", "global_pool"})
_TIMM_KEYS = frozenset({
    "features_only", "out_indices", "feature_cfg", "pretrained_cfg", "pretrained_cfg_overlay",
    "pretrained_strict", "cache_dir", "output_stride", "feature_cls", "flatten_sequential"})


def recipe_defaults(name: str) -> Dict[str, Any]:
    """A copy of variant ``name``'s recipe defaults (``input_size``, ``drop_path``); empty if unknown."""
    return dict(RECIPE_DEFAULTS.get(name, {}))


def _cfg(input_size: int = 224, **kwargs: Any) -> Dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, input_size, input_size),
        "pool_size": (input_size // 32, input_size // 32), "crop_pct": 0.875, "interpolation": "bicubic",
        "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "first_conv": "downsample_layers.0.0",
        "classifier": "head", "license": "mit", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    name: _cfg(recipe_defaults(name).get("input_size", 224)) for name in MODEL_SPECS})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> SLaK:
    unknown = set(kwargs) - BUILDER_KEYS - _TIMM_KEYS
    if unknown:
        raise ConfigError(f"unknown argument(s) for {variant}: {', '.join(sorted(unknown))}; "
                          f"valid: {', '.join(sorted(BUILDER_KEYS))}")
    if pretrained:
        raise ConfigError("slaknet ships no weights to download; pass checkpoint=PATH to "
                          "slaknet.create_model to load a local (official or slaknet) checkpoint")
    if kwargs.get("output_stride", 32) != 32:
        raise ConfigError("SLaK supports output_stride=32 only")
    kwargs.pop("output_stride", None)
    kwargs.pop("cache_dir", None)
    spec = dict(MODEL_SPECS[variant], **kwargs)
    return build_model_with_cfg(
        SLaK, variant, pretrained=False,
        feature_cfg=dict(out_indices=tuple(range(len(spec["depths"]))), feature_cls="getter"),
        **spec)


@register_model
def slak_tiny(pretrained: bool = False, **kwargs: Any) -> SLaK:
    """SLaK-T: depths 3/3/9/3, widths 124/249/499/998 (96.. x 1.3), kernels 51/49/47/13, N=5."""
    return _create("slak_tiny", pretrained, **kwargs)


@register_model
def slak_small(pretrained: bool = False, **kwargs: Any) -> SLaK:
    """SLaK-S: depths 3/3/27/3, widths 124/249/499/998, kernels 51/49/47/13, N=5."""
    return _create("slak_small", pretrained, **kwargs)


@register_model
def slak_base(pretrained: bool = False, **kwargs: Any) -> SLaK:
    """SLaK-B: depths 3/3/27/3, widths 166/332/665/1331 (128.. x 1.3), kernels 51/49/47/13, N=5."""
    return _create("slak_base", pretrained, **kwargs)


@register_model
def slak_large(pretrained: bool = False, **kwargs: Any) -> SLaK:
    """SLaK-L: depths 3/3/27/3, widths 249/499/998/1996 (192.. x 1.3), kernels 51/49/47/13, N=5."""
    return _create("slak_large", pretrained, **kwargs)


@register_model
def slak_nano(pretrained: bool = False, **kwargs: Any) -> SLaK:
    """Small CPU variant for 64-128 px images: depths 2/2/4/2, widths 48/96/192/384, kernels 31/29/27/13."""
    return _create("slak_nano", pretrained, **kwargs)


@register_model
def slak_nano_k7(pretrained: bool = False, **kwargs: Any) -> SLaK:
    """``slak_nano``'s small-kernel twin: the same net with one 7x7 depthwise conv + BN per block."""
    return _create("slak_nano_k7", pretrained, **kwargs)


@register_model
def slak_pico(pretrained: bool = False, **kwargs: Any) -> SLaK:
    """Tiny CPU variant: depths 1/1/2/1, widths 32/64/128/256, kernels 31/29/27/13 (demo and tests)."""
    return _create("slak_pico", pretrained, **kwargs)


@register_model
def slak_pico_k7(pretrained: bool = False, **kwargs: Any) -> SLaK:
    """``slak_pico``'s small-kernel twin: one 7x7 depthwise conv + BN per block."""
    return _create("slak_pico_k7", pretrained, **kwargs)
