"""Pictures of learned large kernels and of per-layer weight density, read straight from a state dict.

Works on slaknet checkpoints and on the official SLaK files alike, because both use the same names:
``stages.{i}.{j}.large_kernel.LoRA1.conv.weight`` (``[C, 1, M, N]``), ``LoRA2`` (``[C, 1, N, M]``),
``small_conv`` (``[C, 1, N, N]``) or ``lkb_origin`` (``[C, 1, M, M]``), each followed by a BatchNorm
(``.bn.*``); inference forms (``lkb_reparam.weight``, ``lkb_strip1/2.weight``) are understood too.

For each large-kernel layer the *effective kernel* is the sum of its branches, each scaled by its
BatchNorm (``gamma / sqrt(running_var + eps)``, when present) and zero-padded to the M x M footprint:
exactly the kernel the layer applies, up to a constant bias. Sparse training leaves zeros in the stored
weights, so the density of a layer is simply its fraction of non-zero weights.

Nothing here needs the model class: only tensors are read (``torch.load(weights_only=True)`` or
safetensors), so any checkpoint can be inspected without building the network.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from slaknet.checkpoints.bn import fold_state_bn
from slaknet.checkpoints.reader import extract_state_dict, read_checkpoint
from slaknet.checkpoints.schema import INFER_BRANCHES, LARGE_BRANCHES, TRAIN_BRANCHES, split_branch_key
from slaknet.errors import CheckpointError, ConfigError
from slaknet.io import atomic_path

__all__ = [
    "KernelLayer",
    "WeightDensity",
    "load_state_dict",
    "find_kernel_layers",
    "weight_densities",
    "plot_kernel_magnitude",
    "plot_kernel_channels",
    "plot_sparsity_pattern",
    "plot_density_bars",
    "kernel_report",
]

_STAGE_BLOCK = re.compile(r"(?:^|\.)(?:stages|layers)\.(\d+)\.(?:blocks\.)?(\d+)(?:\.|$)")
_STAGE_ONLY = re.compile(r"(?:^|\.)(?:stages|layers|downsample_layers)\.(\d+)(?:\.|$)")


# --------------------------------------------------------------------------------------------------
# reading checkpoints: the one reader of slaknet.checkpoints
# --------------------------------------------------------------------------------------------------

def unwrap_state_dict(obj: Any, prefer_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint object (:func:`slaknet.checkpoints.extract_state_dict`); with
    ``prefer_ema`` the EMA weights when the object has them, else the raw ones."""
    if prefer_ema:
        try:
            return dict(extract_state_dict(obj, use_ema=True))
        except CheckpointError:
            pass
    return dict(extract_state_dict(obj))


def load_state_dict(path: str, prefer_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Read a checkpoint's tensors safely (any layout :func:`slaknet.checkpoints.read_checkpoint` reads,
    the compact sparse format included), unwrapped and with old key names renamed."""
    return unwrap_state_dict(read_checkpoint(path), prefer_ema=prefer_ema)


# --------------------------------------------------------------------------------------------------
# large-kernel layers and densities
# --------------------------------------------------------------------------------------------------

@dataclass
class KernelLayer:
    """One large-kernel layer found in a state dict."""

    name: str
    stage: int
    block: int
    branches: Dict[str, torch.Tensor]  # branch -> stored weight [C, 1, kh, kw]
    effective: torch.Tensor  # [C, M, M'] sum of BN-scaled branches, centre-aligned
    support: torch.Tensor  # [C, M, M'] bool: some branch has a non-zero weight there
    bn_folded: bool

    @property
    def channels(self) -> int:
        return int(self.effective.shape[0])

    @property
    def kernel_size(self) -> Tuple[int, int]:
        return int(self.effective.shape[-2]), int(self.effective.shape[-1])

    @property
    def numel(self) -> int:
        return int(sum(w.numel() for w in self.branches.values()))

    @property
    def nonzero(self) -> int:
        return int(sum(int(torch.count_nonzero(w)) for w in self.branches.values()))

    @property
    def density(self) -> float:
        """Non-zero fraction of all stored weights of the layer (every branch)."""
        return self.nonzero / max(self.numel, 1)

    def branch_density(self) -> Dict[str, float]:
        return {b: int(torch.count_nonzero(w)) / max(w.numel(), 1) for b, w in self.branches.items()}


@dataclass
class WeightDensity:
    """Density of one weight tensor (conv or linear), or of a whole large-kernel layer."""

    name: str
    kind: str  # "large_kernel", "conv", "linear"
    stage: Optional[int]
    numel: int
    nonzero: int
    shape: Tuple[int, ...] = field(default_factory=tuple)

    @property
    def density(self) -> float:
        return self.nonzero / max(self.numel, 1)


def _stage_block(name: str) -> Tuple[Optional[int], Optional[int]]:
    m = _STAGE_BLOCK.search(name)
    if m:
        return int(m.group(1)), int(m.group(2))
    m = _STAGE_ONLY.search(name)
    return (int(m.group(1)), None) if m else (None, None)


def _centre_pad(k: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    h, w = k.shape[-2:]
    ph, pw = (size[0] - h) // 2, (size[1] - w) // 2
    return torch.nn.functional.pad(k, (pw, size[1] - w - pw, ph, size[0] - h - ph))


def find_kernel_layers(state_dict: Mapping[str, torch.Tensor], fold_bn: bool = True) -> List[KernelLayer]:
    """All large-kernel layers (SLaK naming), in stage/block order, with their effective kernels."""
    groups: Dict[str, Dict[str, str]] = {}
    for key in state_dict:
        found = split_branch_key(key)
        if found:
            groups.setdefault(found[0], {})[found[1]] = key
    layers: List[KernelLayer] = []
    for prefix, branch_keys in groups.items():
        if not set(LARGE_BRANCHES + INFER_BRANCHES) & set(branch_keys):
            continue  # a lone small_conv is not a large-kernel layer
        weights = {b: state_dict[k].detach().float().cpu() for b, k in sorted(branch_keys.items())}
        for b, w in weights.items():
            if w.ndim != 4 or w.shape[1] != 1:
                raise CheckpointError(f"{prefix}.{b}: expected a depthwise weight [C, 1, kh, kw], "
                                      f"got {tuple(w.shape)}")
        channels = {w.shape[0] for w in weights.values()}
        if len(channels) != 1:
            raise CheckpointError(f"{prefix}: branches disagree on the channel count {sorted(channels)}")
        c = channels.pop()
        size = (max(w.shape[-2] for w in weights.values()), max(w.shape[-1] for w in weights.values()))
        effective = torch.zeros(c, *size)
        support = torch.zeros(c, *size, dtype=torch.bool)
        folded = False
        for b, w in weights.items():
            w2 = w[:, 0]
            if fold_bn and b in TRAIN_BRANCHES:
                fused = fold_state_bn(state_dict, w2, f"{prefix}.{b}.bn")
                if fused is not None:
                    w2, folded = fused[0], True
            effective += _centre_pad(w2, size)
            support |= _centre_pad(w[:, 0] != 0, size)
        stage, block = _stage_block(prefix)
        layers.append(KernelLayer(prefix, -1 if stage is None else stage, -1 if block is None else block,
                                  weights, effective, support, folded))
    layers.sort(key=lambda layer: (layer.stage, layer.block, layer.name))
    if layers and all(layer.stage == -1 for layer in layers):
        for k, layer in enumerate(layers):  # unknown naming: one "stage", blocks in key order
            layer.stage, layer.block = 0, k
    return layers


def weight_densities(state_dict: Mapping[str, torch.Tensor],
                     layers: Optional[Sequence[KernelLayer]] = None) -> List[WeightDensity]:
    """Density of every large-kernel layer (all branches together) and of every other conv/linear weight.

    Norm and BN parameters, biases and 1-d tensors are left out; so are non-float buffers.
    """
    layers = find_kernel_layers(state_dict, fold_bn=False) if layers is None else layers
    out = [WeightDensity(layer.name, "large_kernel", layer.stage, layer.numel, layer.nonzero,
                         layer.kernel_size) for layer in layers]
    prefixes = tuple(layer.name + "." for layer in layers)
    for key, t in state_dict.items():
        if not key.endswith("weight") or not t.is_floating_point() or t.ndim not in (2, 3, 4, 5):
            continue
        if prefixes and key.startswith(prefixes):
            continue
        stage, _ = _stage_block(key)
        out.append(WeightDensity(key[: -len(".weight")] if key.endswith(".weight") else key,
                                 "linear" if t.ndim == 2 else "conv", stage, t.numel(),
                                 int(torch.count_nonzero(t)), tuple(t.shape)))
    return out


# --------------------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------------------

def _by_stage(layers: Sequence[KernelLayer]) -> Dict[int, List[KernelLayer]]:
    stages: Dict[int, List[KernelLayer]] = {}
    for layer in layers:
        stages.setdefault(layer.stage, []).append(layer)
    return dict(sorted(stages.items()))


def _need_layers(layers: Sequence[KernelLayer]) -> None:
    if not layers:
        raise CheckpointError("no large-kernel layers (LoRA1/LoRA2/lkb_origin/lkb_reparam weights) found")


def _mean_abs(stage_layers: Sequence[KernelLayer]) -> np.ndarray:
    """Mean |effective kernel| over the stage's blocks and channels (layers of one size only)."""
    size = stage_layers[0].kernel_size
    same = [layer for layer in stage_layers if layer.kernel_size == size]
    return torch.stack([layer.effective.abs().mean(0) for layer in same]).mean(0).numpy()


def _save(fig, path: str) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=os.path.splitext(path)[1][1:] or "png")
    return path


def plot_kernel_magnitude(layers: Sequence[KernelLayer], path: str, cmap: str = "viridis") -> str:
    """One panel per stage: mean |effective kernel| over its blocks and channels, scaled to its maximum.

    Shows where each stage puts its weight: a bright centre with a faint cross means mostly local
    mixing; weight spread along the strips means the large footprint is used.
    """
    from matplotlib.figure import Figure

    _need_layers(layers)
    stages = _by_stage(layers)
    fig = Figure(figsize=(3.2 * len(stages) + 0.8, 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(stages)))
    im = None
    for ax, (stage, group) in zip(axes, stages.items()):
        mag = _mean_abs(group)
        top = mag.max()
        im = ax.imshow(mag / top if top > 0 else mag, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        kh, kw = group[0].kernel_size
        ax.set_title(f"stage {stage}: {kh}x{kw}\n{len(group)} blocks x {group[0].channels} ch", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="mean |weight| / max")
    fig.suptitle("large-kernel magnitude per stage (BN-folded effective kernels)", fontsize=10)
    return _save(fig, path)


def _pick_channels(layer: KernelLayer, count: int) -> List[int]:
    """The ``count`` channels with the largest L1 norm (the ones doing the most), in channel order."""
    norms = layer.effective.abs().flatten(1).sum(1)
    count = min(count, layer.channels)
    return sorted(torch.topk(norms, count).indices.tolist())


def _representative(group: Sequence[KernelLayer]) -> KernelLayer:
    return group[len(group) // 2]  # the middle block of the stage


def plot_kernel_channels(layers: Sequence[KernelLayer], path: str, channels: int = 6) -> str:
    """Rows = stages (their middle block), columns = the strongest channels: signed effective kernels."""
    from matplotlib.figure import Figure

    _need_layers(layers)
    if channels < 1:
        raise ConfigError(f"channels must be at least 1, got {channels}")
    stages = _by_stage(layers)
    ncols = min(channels, max(layer.channels for layer in layers))
    fig = Figure(figsize=(1.9 * ncols + 1.0, 2.0 * len(stages) + 0.6), layout="constrained")
    axes = np.array(fig.subplots(len(stages), ncols, squeeze=False))
    for row, (stage, group) in zip(axes, stages.items()):
        layer = _representative(group)
        picks = _pick_channels(layer, ncols)
        for k, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if k >= len(picks):
                ax.axis("off")
                continue
            ker = layer.effective[picks[k]].numpy()
            lim = float(np.abs(ker).max()) or 1.0
            ax.imshow(ker, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ax.set_title(f"ch {picks[k]}", fontsize=8)
            if k == 0:
                ax.set_ylabel(f"{layer.name}", fontsize=7)
    fig.suptitle("effective kernels of the strongest channels (red +, blue -, white 0)", fontsize=10)
    return _save(fig, path)


def plot_sparsity_pattern(layers: Sequence[KernelLayer], path: str, channels: int = 6) -> str:
    """Where the non-zero weights are. Rows = stages; first column: the fraction of (block, channel)
    kernels with a non-zero weight at each position; then non-zero masks of a few channels (black)."""
    from matplotlib.figure import Figure

    _need_layers(layers)
    stages = _by_stage(layers)
    ncols = 1 + min(channels, max(layer.channels for layer in layers))
    fig = Figure(figsize=(1.9 * ncols + 1.2, 2.0 * len(stages) + 0.6), layout="constrained")
    axes = np.array(fig.subplots(len(stages), ncols, squeeze=False))
    im = None
    for row, (stage, group) in zip(axes, stages.items()):
        size = group[0].kernel_size
        same = [layer for layer in group if layer.kernel_size == size]
        frac = torch.cat([layer.support.float() for layer in same]).mean(0).numpy()
        dens = sum(layer.nonzero for layer in group) / max(sum(layer.numel for layer in group), 1)
        im = row[0].imshow(frac, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        row[0].set_title(f"stage {stage}: density {dens:.0%}", fontsize=8)
        layer = _representative(group)
        picks = _pick_channels(layer, ncols - 1)
        for k, ax in enumerate(row[1:]):
            if k >= len(picks):
                ax.axis("off")
                continue
            ax.imshow(layer.support[picks[k]].numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{layer.name.split('.large_kernel')[0]} ch {picks[k]}", fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im, ax=list(axes[:, 0]), shrink=0.8, location="left",
                 label="share of kernels non-zero here")
    fig.suptitle("sparse pattern of the large kernels (black = kept weight)", fontsize=10)
    return _save(fig, path)


def plot_density_bars(densities: Sequence[WeightDensity], path: str) -> str:
    """Per-layer density bars: top, the large-kernel layers; bottom, every other conv/linear weight.

    Bars are coloured by stage and the overall density is drawn as a dashed line, so a dense model
    reads as a flat wall at 100 % and a sparse-trained one shows which layers gave up weights.
    """
    from matplotlib.figure import Figure

    if not densities:
        raise CheckpointError("no conv or linear weights found in the checkpoint")
    groups = [("large-kernel layers (all branches)", [d for d in densities if d.kind == "large_kernel"]),
              ("other conv / linear weights", [d for d in densities if d.kind != "large_kernel"])]
    groups = [g for g in groups if g[1]]
    width = max(6.0, 0.16 * max(len(g) for _, g in groups) + 2.0)
    fig = Figure(figsize=(min(width, 30.0), 3.0 * len(groups) + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(groups), 1))
    palette = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1"]
    for ax, (title, items) in zip(axes, groups):
        xs = np.arange(len(items))
        colors = [palette[(d.stage if d.stage is not None else 6) % len(palette)] for d in items]
        ax.bar(xs, [d.density for d in items], color=colors, width=0.85)
        overall = sum(d.nonzero for d in items) / max(sum(d.numel for d in items), 1)
        ax.axhline(overall, ls="--", color="k", lw=1, label=f"overall {overall:.1%}")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("non-zero fraction")
        ax.set_title(title, fontsize=10)
        if len(items) <= 40:
            ax.set_xticks(xs)
            ax.set_xticklabels([_short(d.name) for d in items], rotation=90, fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_xlabel(f"{len(items)} weights in model order (colour = stage)")
        from matplotlib.patches import Patch

        seen = sorted({d.stage for d in items if d.stage is not None})
        handles = [Patch(color=palette[s % len(palette)], label=f"stage {s}") for s in seen]
        ax.legend(handles=handles + ax.get_legend_handles_labels()[0], fontsize=7, loc="lower right")
    return _save(fig, path)


def _short(name: str) -> str:
    return name.replace(".large_kernel", "").replace("stages.", "s").replace("downsample_layers.", "ds")


# --------------------------------------------------------------------------------------------------
# everything at once
# --------------------------------------------------------------------------------------------------

def kernel_report(source, out_dir: str, channels: int = 6, prefer_ema: bool = False,
                  fold_bn: bool = True) -> Dict[str, object]:
    """Write the kernel and density pictures plus ``kernels.json`` for a checkpoint path or state dict.

    Returns the JSON summary (per-layer density and kernel size, overall densities, written files).
    """
    if isinstance(source, (str, os.PathLike)):
        sd = load_state_dict(os.fspath(source), prefer_ema=prefer_ema)
    elif isinstance(source, torch.nn.Module):
        sd = source.state_dict()
    else:
        sd = unwrap_state_dict(source, prefer_ema=prefer_ema)
    layers = find_kernel_layers(sd, fold_bn=fold_bn)
    densities = weight_densities(sd, layers)
    os.makedirs(out_dir, exist_ok=True)
    files = {"density": plot_density_bars(densities, os.path.join(out_dir, "density.png"))}
    if layers:
        files["magnitude"] = plot_kernel_magnitude(layers, os.path.join(out_dir, "kernels_magnitude.png"))
        files["channels"] = plot_kernel_channels(layers, os.path.join(out_dir, "kernels_channels.png"), channels)
        files["sparsity"] = plot_sparsity_pattern(layers, os.path.join(out_dir, "kernels_sparsity.png"), channels)
    lk = [d for d in densities if d.kind == "large_kernel"]
    total_nz = sum(d.nonzero for d in densities)
    total = sum(d.numel for d in densities)
    summary: Dict[str, object] = {
        "num_large_kernel_layers": len(layers),
        "large_kernel_density": sum(d.nonzero for d in lk) / max(sum(d.numel for d in lk), 1) if lk else None,
        "overall_density": total_nz / max(total, 1),
        "bn_folded": any(layer.bn_folded for layer in layers),
        "layers": [{"name": layer.name, "stage": layer.stage, "block": layer.block,
                    "channels": layer.channels, "kernel_size": list(layer.kernel_size),
                    "branches": {b: list(w.shape) for b, w in layer.branches.items()},
                    "density": layer.density, "branch_density": layer.branch_density()}
                   for layer in layers],
        "weights": [{"name": d.name, "kind": d.kind, "stage": d.stage, "shape": list(d.shape),
                     "numel": d.numel, "nonzero": d.nonzero, "density": d.density}
                    for d in densities if d.kind != "large_kernel"],
        "files": files,
    }
    path = os.path.join(out_dir, "kernels.json")
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    files["json"] = path
    return summary
