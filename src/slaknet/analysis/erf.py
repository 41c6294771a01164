"""Effective receptive field (ERF): how much each input pixel moves the central output of a feature map.

This follows the large-kernel literature (RepLKNet, SLaK) so that numbers are comparable with the
papers, but works for any model that yields a final *spatial* feature map, on CPU or GPU:

1. each image is resized to a large square (default 1024 x 1024) and normalized;
2. the feature extractor maps it to an ``[1, C, h, w]`` map; the score is
   ``sum_c ReLU(features[0, c, h // 2, w // 2])`` (the central output position);
3. the gradient of that score w.r.t. the input is ReLU'd and summed over the input channels, giving an
   ``[H, W]`` contribution map; maps with a NaN/inf are skipped and counted;
4. the maps are averaged over the images.

Analysis (:func:`area_ratios`): the matrix is scaled as ``log10(x + 1) / max`` (the contributions
differ by orders of magnitude), then for each threshold ``t`` the smallest centred square holding at
least ``t`` of the total is found; its side and its share of the image area are reported (the
"high-contribution area ratio"). A larger ratio at a given ``t`` means contributions spread further.

Images come from an image folder, the built-in benchmark dataset, or (when nothing is given) views of a
photo that ships with matplotlib; nothing is ever downloaded.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from slaknet.errors import ConfigError
from slaknet.analysis.erf_images import (IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD,  # noqa: F401
                                         benchmark_images, image_folder_images, resolve_images,
                                         sample_photo_images, sample_photo_path)
from slaknet.io import atomic_path

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ERFResult",
    "feature_extractor",
    "erf_contribution",
    "compute_erf",
    "scale_erf",
    "centred_square",
    "area_ratios",
    "format_ratio_table",
    "image_folder_images",
    "sample_photo_images",
    "benchmark_images",
    "resolve_images",
    "plot_erf",
    "plot_erf_comparison",
]

DEFAULT_THRESHOLDS: Tuple[float, ...] = (0.2, 0.3, 0.5, 0.99)

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------
# feature extraction and the per-image contribution map
# --------------------------------------------------------------------------------------------------

def _last_map(out) -> torch.Tensor:
    """The last element of list/tuple/dict outputs (timm ``features_only`` returns a list)."""
    if isinstance(out, dict):
        if not out:
            raise ConfigError("the feature extractor returned an empty dict")
        out = list(out.values())[-1]
    if isinstance(out, (list, tuple)):
        if not out:
            raise ConfigError("the feature extractor returned an empty list")
        out = out[-1]
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"the feature extractor returned {type(out).__name__}, expected a tensor")
    return out


def feature_extractor(model: Union[nn.Module, FeatureFn]) -> FeatureFn:
    """A function ``x -> [N, C, h, w]`` final feature map for a model or a user callable.

    * timm ``features_only`` models (and any module returning a list/tuple/dict): the last map;
    * modules with ``forward_features`` (every slaknet model, most timm models): that method;
    * any other module or callable: its output as is.

    The result must be a 4-d NCHW map: a pooled or flattened output has no "central position", and
    indexing it as if it had one (as one-off scripts did) silently measures something else, so it is
    rejected when the ERF is computed.
    """
    if isinstance(model, nn.Module):
        is_feature_net = hasattr(model, "feature_info") and not hasattr(model, "forward_features")
        if not is_feature_net and hasattr(model, "forward_features"):
            fn = model.forward_features
            return lambda x: _last_map(fn(x))
        return lambda x: _last_map(model(x))
    if callable(model):
        return lambda x: _last_map(model(x))
    raise ConfigError(f"expected an nn.Module or a callable, got {type(model).__name__}")


def _check_map(feats: torch.Tensor) -> None:
    if feats.ndim != 4:
        raise ConfigError(
            f"the model's output has shape {tuple(feats.shape)}, not a [N, C, h, w] feature map: "
            "give a feature extractor (forward_features / features_only) instead of a pooled output")


def erf_contribution(feature_fn: FeatureFn, image: torch.Tensor) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Contribution map ``[H, W]`` of one image ``[C, H, W]`` or ``[1, C, H, W]`` and the feature size.

    The map is ``sum_c ReLU(d score / d image)`` with ``score = sum_c ReLU(features[0, c, h//2, w//2])``.
    Only the input gradient is computed (``torch.autograd.grad``), and the graph is freed on return.
    """
    x = image.unsqueeze(0) if image.ndim == 3 else image
    if x.ndim != 4 or x.shape[0] != 1:
        raise ConfigError(f"expected one image [C, H, W], got shape {tuple(image.shape)}")
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        feats = feature_fn(x)
        _check_map(feats)
        h, w = feats.shape[-2:]
        score = F.relu(feats[:, :, h // 2, w // 2]).sum()
        if not score.requires_grad:  # the centre does not depend on the input at all
            grad = torch.zeros_like(x)
        else:
            (grad,) = torch.autograd.grad(score, x, allow_unused=True)
            if grad is None:
                grad = torch.zeros_like(x)
    contribution = F.relu(grad).sum(dim=(0, 1))
    return contribution.detach().to(torch.float64).cpu().numpy(), (int(h), int(w))


class _FrozenParams:
    """Context: parameters do not require grad (we only need the input gradient), restored after."""

    def __init__(self, module: Optional[nn.Module]) -> None:
        self.module = module
        self.saved: List[Tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> "_FrozenParams":
        if self.module is not None:
            self.was_training = self.module.training
            self.module.eval()
            for p in self.module.parameters():
                self.saved.append((p, p.requires_grad))
                p.requires_grad_(False)
        return self

    def __exit__(self, *exc) -> None:
        for p, flag in self.saved:
            p.requires_grad_(flag)
        if self.module is not None:
            self.module.train(self.was_training)


def _default_device(model) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


@dataclass
class ERFResult:
    """An averaged ERF matrix and how it was obtained."""

    matrix: np.ndarray
    name: str = "model"
    num_images: int = 0
    num_skipped: int = 0
    input_size: Tuple[int, int] = (0, 0)
    feature_size: Tuple[int, int] = (0, 0)
    extra: Dict[str, object] = field(default_factory=dict)

    def ratios(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> Dict[float, Tuple[int, float]]:
        """High-contribution area ratios of this matrix (see :func:`area_ratios`)."""
        return area_ratios(self.matrix, thresholds)

    def summary(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> Dict[str, object]:
        """JSON-ready description: metadata and, per threshold, the square side and the area ratio."""
        return {
            "name": self.name,
            "num_images": self.num_images,
            "num_skipped": self.num_skipped,
            "input_size": list(self.input_size),
            "feature_size": list(self.feature_size),
            "raw_max": float(np.max(self.matrix)) if self.matrix.size else 0.0,
            "raw_min": float(np.min(self.matrix)) if self.matrix.size else 0.0,
            "area_ratios": [{"threshold": t, "side": s, "area_ratio": r}
                            for t, (s, r) in area_ratios(self.matrix, thresholds).items()],
            **self.extra,
        }

    def save(self, directory: str, stem: Optional[str] = None,
             thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> Dict[str, str]:
        """Write ``<stem>.npy`` (the raw matrix) and ``<stem>.json`` (summary); return their paths."""
        stem = stem or _safe_stem(self.name)
        os.makedirs(directory, exist_ok=True)
        npy = os.path.join(directory, stem + ".npy")
        js = os.path.join(directory, stem + ".json")
        _atomic_write(npy, lambda f: np.save(f, self.matrix), binary=True)
        _atomic_write(js, lambda f: f.write(json.dumps(self.summary(thresholds), indent=2) + "\n"))
        return {"npy": npy, "json": js}


def _safe_stem(name: str) -> str:
    keep = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in name)
    while "__" in keep:
        keep = keep.replace("__", "_")
    return keep.strip("._") or "erf"


def _atomic_write(path: str, writer: Callable, binary: bool = False) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb" if binary else "w") as f:
        writer(f)


def compute_erf(
    model: Union[nn.Module, FeatureFn],
    images: Iterable[torch.Tensor],
    num_images: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    name: str = "model",
    progress: bool = True,
) -> ERFResult:
    """Average the ERF contribution maps of ``model`` over ``images`` (one at a time, batch of 1).

    Args:
        model: an ``nn.Module`` (see :func:`feature_extractor` for how its feature map is found) or a
            callable ``x -> [N, C, h, w]``. Modules are switched to eval mode (restored afterwards) and
            moved to ``device``; their parameters are temporarily excluded from autograd.
        images: an iterable of ``[C, H, W]`` tensors, already resized and normalized, all the same size
            (see :func:`resolve_images`).
        num_images: use at most this many valid images (skipped NaN images do not count); ``None``
            consumes the whole iterable.
        device: where to run; ``None`` means the model's own device (CPU for callables).
        name: label stored in the result (file names, captions).
        progress: show a tqdm bar over images.

    Images whose contribution map contains NaN/inf are skipped and counted in ``num_skipped``.
    """
    if num_images is not None and num_images < 1:
        raise ConfigError(f"num_images must be at least 1, got {num_images}")
    dev = torch.device(device) if device is not None else _default_device(model)
    module = model if isinstance(model, nn.Module) else None
    if module is not None:
        module.to(dev)
    fn = feature_extractor(model)
    total: Optional[np.ndarray] = None
    used = skipped = 0
    input_size = feature_size = (0, 0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_images, desc=f"ERF {name}", unit="img")
    try:
        with _FrozenParams(module):
            for image in images:
                if num_images is not None and used >= num_images:
                    break
                image = image.to(dev, dtype=torch.float32)
                contribution, feature_size = erf_contribution(fn, image)
                if total is not None and contribution.shape != total.shape:
                    raise ConfigError(f"images differ in size: {contribution.shape} vs {total.shape}")
                if not np.isfinite(contribution).all():
                    skipped += 1
                    if bar is not None:
                        bar.set_postfix(skipped=skipped)
                    continue
                total = contribution if total is None else total + contribution
                input_size = tuple(contribution.shape)  # type: ignore[assignment]
                used += 1
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if total is None:
        raise ConfigError(f"no usable image for the ERF of {name} ({skipped} skipped with NaN/inf)")
    return ERFResult(matrix=total / used, name=name, num_images=used, num_skipped=skipped,
                     input_size=input_size, feature_size=feature_size)


# --------------------------------------------------------------------------------------------------
# analysis
# --------------------------------------------------------------------------------------------------

def scale_erf(matrix: np.ndarray) -> np.ndarray:
    """``log10(x + 1)`` scaled to ``[0, 1]`` by its maximum (all zeros stay zeros)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ConfigError(f"an ERF matrix must be 2-d, got shape {m.shape}")
    if not np.isfinite(m).all() or (m < 0).any():
        raise ConfigError("an ERF matrix must be finite and non-negative")
    data = np.log10(m + 1.0)
    top = data.max() if data.size else 0.0
    return data / top if top > 0 else data


def centred_square(data: np.ndarray, threshold: float) -> Tuple[int, float]:
    """Smallest centred square holding at least ``threshold`` of ``data``'s total: ``(side, area_ratio)``.

    Squares have odd sides 1, 3, 5, ... centred on ``(H // 2, W // 2)``, clipped to the image; the area
    ratio is the clipped square's share of ``H * W``. No scaling is applied here (see :func:`area_ratios`).
    An all-zero matrix gives ``(0, 0.0)``.
    """
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"thresholds must be in (0, 1], got {threshold}")
    d = np.asarray(data, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ConfigError(f"expected a non-empty 2-d matrix, got shape {d.shape}")
    h, w = d.shape
    total = d.sum()
    if total <= 0:
        return 0, 0.0
    cy, cx = h // 2, w // 2
    # integral image makes each square sum O(1)
    integral = np.zeros((h + 1, w + 1))
    integral[1:, 1:] = d.cumsum(0).cumsum(1)
    goal = threshold * total * (1 - 1e-12)  # tolerate rounding when the goal is the whole total
    for i in range(0, max(h, w)):
        y0, y1 = max(cy - i, 0), min(cy + i + 1, h)
        x0, x1 = max(cx - i, 0), min(cx + i + 1, w)
        s = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        if s >= goal:
            return 2 * i + 1, (y1 - y0) * (x1 - x0) / (h * w)
    return 2 * max(h, w) - 1, 1.0  # unreachable: the last square covers the whole image


def area_ratios(matrix: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                scale: bool = True) -> Dict[float, Tuple[int, float]]:
    """``{t: (side, area_ratio)}`` of the smallest centred squares; ``scale`` applies :func:`scale_erf`."""
    data = scale_erf(matrix) if scale else np.asarray(matrix, dtype=np.float64)
    return {float(t): centred_square(data, float(t)) for t in thresholds}


def format_ratio_table(results: Sequence[ERFResult], thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> str:
    """A plain-text table: one row per model, per threshold ``side (area %)``."""
    heads = ["model", "images"] + [f"t={t:.0%}" for t in thresholds]
    rows = []
    for r in results:
        ratios = r.ratios(thresholds)
        images = f"{r.num_images}" + (f" (+{r.num_skipped} NaN)" if r.num_skipped else "")
        rows.append([r.name, images] + [f"{s} ({a:.2%})" for s, a in ratios.values()])
    widths = [max(len(str(x)) for x in col) for col in zip(heads, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(wd) for c, wd in zip(cells, widths)).rstrip()
    out = [line(heads), line(["-" * wd for wd in widths])] + [line(row) for row in rows]
    return "\n".join(out) + "\n(side of the smallest centred square holding t of the log-scaled ERF, " \
                            "and its share of the image area)"


# --------------------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------------------

_SQUARE_STYLES = ("#00e5ff", "#7CFC00", "#ffffff", "#ff4081", "#ffd740")


def _as_named(item, default: str) -> Tuple[str, np.ndarray, Optional[ERFResult]]:
    if isinstance(item, ERFResult):
        return item.name, item.matrix, item
    if isinstance(item, tuple) and len(item) == 2:
        return str(item[0]), np.asarray(item[1]), None
    return default, np.asarray(item), None


def _zoom_side(matrices: Sequence[np.ndarray], thresholds: Sequence[float]) -> Optional[int]:
    """Side of a centred zoom window when the largest square is small next to the image, else None."""
    sides = [max((s for s, _ in area_ratios(m, thresholds).values()), default=0) for m in matrices]
    small = min(min(m.shape) for m in matrices)
    zoom = max(2 * max(sides) + 1, 15)
    return zoom if zoom <= small // 3 else None


def _draw_squares(ax, ratios, h: int, w: int, label: bool) -> None:
    from matplotlib.patches import Rectangle

    for k, (t, (side, _)) in enumerate(ratios.items()):
        if side == 0:
            continue
        half = side // 2
        ax.add_patch(Rectangle((w // 2 - half - 0.5, h // 2 - half - 0.5), side, side, fill=False,
                               lw=1.2, ls="-" if k % 2 == 0 else "--",
                               color=_SQUARE_STYLES[k % len(_SQUARE_STYLES)],
                               label=f"{t:.0%} of total" if label else None))


def _colour_norm(gamma: float):
    from matplotlib.colors import Normalize, PowerNorm

    if gamma <= 0:
        raise ConfigError(f"gamma must be positive, got {gamma}")
    return Normalize(0.0, 1.0) if gamma == 1 else PowerNorm(gamma, vmin=0.0, vmax=1.0)


def _colour_label(gamma: float) -> str:
    label = "log10(contribution + 1), scaled to [0, 1]"
    return label if gamma == 1 else label + f"\n(colour gamma {gamma:g}: faint spread made visible)"


def _draw_panel(ax, name: str, matrix: np.ndarray, thresholds: Sequence[float], cmap: str,
                result: Optional[ERFResult], zoom: Optional[int] = None, gamma: float = 0.5):
    data = scale_erf(matrix)
    h, w = data.shape
    # antialiased: a 1024 px matrix drawn in ~400 px must be averaged, not subsampled
    im = ax.imshow(data, cmap=cmap, norm=_colour_norm(gamma), interpolation="antialiased")
    ratios = area_ratios(matrix, thresholds)
    _draw_squares(ax, ratios, h, w, label=True)
    if zoom:  # the ERF is small next to the image: magnify the centre in an inset (same colours)
        inset = ax.inset_axes([0.02, 0.02, 0.42, 0.42])
        inset.imshow(data, cmap=cmap, norm=_colour_norm(gamma), interpolation="nearest")
        _draw_squares(inset, ratios, h, w, label=False)
        half = zoom // 2
        inset.set_xlim(w // 2 - half - 0.5, w // 2 + half + 0.5)
        inset.set_ylim(h // 2 + half + 0.5, h // 2 - half - 0.5)
        inset.set_xticks([])
        inset.set_yticks([])
        inset.set_title(f"centre {zoom}x{zoom} px", fontsize=7, color="w", pad=2)
        for spine in inset.spines.values():
            spine.set_edgecolor("w")
        ax.indicate_inset_zoom(inset, edgecolor="w")
    ax.set_xticks([])
    ax.set_yticks([])
    title = name
    if result is not None and result.num_images:
        title += f"\n{h}x{w}, {result.num_images} images"
    ax.set_title(title, fontsize=10)
    parts = [f"{t:.0%} in {r:.2%}" for t, (_, r) in ratios.items()]
    lines = ["  ".join(parts[k:k + 2]) for k in range(0, len(parts), 2)]
    ax.set_xlabel("share of image area holding t of the total:\n" + "\n".join(lines), fontsize=8)
    return im


def plot_erf(item: Union[ERFResult, np.ndarray, Tuple[str, np.ndarray]], path: str,
             thresholds: Sequence[float] = DEFAULT_THRESHOLDS, cmap: str = "magma",
             title: Optional[str] = None, gamma: float = 0.5) -> str:
    """Heatmap PNG of one ERF (log-scaled to [0, 1]) with the centred threshold squares outlined.

    ``gamma`` < 1 brightens low values for display only (``PowerNorm``; 1 = linear colours, as in
    the papers' figures); the analysis numbers never depend on it. Small ERFs get a magnified inset.
    """
    from matplotlib.figure import Figure  # no pyplot: works headless, leaves global state alone

    name, matrix, result = _as_named(item, title or "ERF")
    fig = Figure(figsize=(5.2, 6.0), layout="constrained")
    ax = fig.subplots()
    im = _draw_panel(ax, title or name, matrix, thresholds, cmap, result, _zoom_side([matrix], thresholds),
                     gamma)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label=_colour_label(gamma))
    ax.legend(loc="upper right", fontsize=7, framealpha=0.6, title="centred square holding",
              title_fontsize=7)
    _save_figure(fig, path)
    return path


def plot_erf_comparison(items: Sequence[Union[ERFResult, Tuple[str, np.ndarray]]], path: str,
                        thresholds: Sequence[float] = DEFAULT_THRESHOLDS, cmap: str = "magma",
                        gamma: float = 0.5) -> str:
    """Side-by-side heatmaps on one colour scale, plus grouped bars of the area ratios per threshold.

    The outlined squares and the bars let a reader see which model spreads further without reading any
    number; the exact ratios are in each panel's caption.
    """
    from matplotlib.figure import Figure

    named = [_as_named(it, f"model {k}") for k, it in enumerate(items)]
    if not named:
        raise ConfigError("nothing to compare")
    n = len(named)
    fig = Figure(figsize=(4.0 * n + 5.0, 5.4), layout="constrained")
    axes = fig.subplots(1, n + 1, gridspec_kw={"width_ratios": [1] * n + [1.1]})
    im = None
    zoom = _zoom_side([m for _, m, _ in named], thresholds)  # one window for all, so sizes compare
    for ax, (name, matrix, result) in zip(axes[:n], named):
        im = _draw_panel(ax, name, matrix, thresholds, cmap, result, zoom, gamma)
    axes[0].legend(loc="upper right", fontsize=7, framealpha=0.6, title="centred square holding",
                   title_fontsize=7)
    fig.colorbar(im, ax=list(axes[:n]), shrink=0.8, label=_colour_label(gamma))
    bar_ax = axes[n]
    width = 0.8 / n
    xs = np.arange(len(thresholds))
    for k, (name, matrix, _) in enumerate(named):
        ratios = [r for _, r in area_ratios(matrix, thresholds).values()]
        bar_ax.bar(xs + (k - (n - 1) / 2) * width, ratios, width, label=name)
    bar_ax.set_xticks(xs)
    bar_ax.set_xticklabels([f"t={t:.0%}" for t in thresholds])
    bar_ax.set_ylabel("share of image area (higher = wider ERF)")
    bar_ax.set_title("high-contribution area ratio", fontsize=10)
    bar_ax.legend(fontsize=7)
    _save_figure(fig, path)
    return path


def _save_figure(fig, path: str) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=os.path.splitext(path)[1][1:] or "png")
