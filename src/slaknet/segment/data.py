"""Segmentation data: the built-in "closed contours among open decoys" set and real image / mask folders.

Built-in (``--data builtin:contours``): every image is drawn from ``(seed, split, index)`` and shows a few
wiggly contours of the same stroke. Some are closed, the others are *decoys*: the same kind of curve with a
short gap somewhere along it. A pixel is ``inside`` (1) when it lies inside a closed contour and
``outside`` (0) otherwise -- also inside a decoy. Near any piece of stroke the two look the same; whether a
region is enclosed is decided by a gap that can be half an image away, so the label of a pixel depends on
context far from it. The stroke of the closed contours is ignored (255) in the loss and the metric.

Folders (``--data ROOT``): the layouts, the scan of the masks before training and what labels mean
(255 ignored; 0 a class unless ``reduce_zero_label``, the ADE20K layout's default; classes from
``classes.txt`` or the masks) are :mod:`slaknet.segment.folders`'. :class:`SegmentationFolder` serves the
pairs the scan kept. A pair that turns out bad only when it is loaded (a file that cannot be decoded, or a
mask outside the scanned sample with another size or a label beyond the classes) is warned about once; in
training the next pair stands in for it and the trainer counts it; in evaluation (``substitute=False``) it
is skipped and counted, never replaced.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from slaknet.data import dihedral
from slaknet.errors import ConfigError
from slaknet.segment.folders import (ADE20K_NUM_CLASSES, IGNORE_INDEX, LabelScheme, SplitScan, check_labels,
                                     find_pairs, label_scheme, read_mask, scan_split)

__all__ = ["IGNORE_INDEX", "CONTOUR_CLASSES", "render_contours", "ContourSegmentation", "SegmentationFolder",
           "PairedTransform", "parse_seg_data", "find_pairs", "ADE20K_NUM_CLASSES"]

CONTOUR_CLASSES = ["outside", "inside"]
_SPLITS = {"train": 0, "val": 1, "test": 2}


# ------------------------------------------------------------------------------------- built-in set ----
def _star_curve(rng: np.random.Generator, size: int) -> Dict[str, Any]:
    """A random star-shaped closed curve r(t) = r0 (1 + sum_k a_k cos(k t + phi_k)) inside the frame."""
    ks = np.arange(2, 6, dtype=np.float64)
    a = rng.uniform(0.2, 1.0, ks.size) / (ks - 1)
    a *= 0.35 / a.sum()
    phi = rng.uniform(0, 2 * math.pi, ks.size)
    r0 = rng.uniform(0.13, 0.24) * size
    reach = r0 * 1.35 + 2
    cx, cy = (rng.uniform(reach, max(reach, size - reach)) for _ in range(2))
    return dict(ks=ks, a=a, phi=phi, r0=r0, cx=cx, cy=cy)


def _radial(c: Dict[str, Any], xx: np.ndarray, yy: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Angle of each pixel around the curve's centre, its distance to the curve (approx.) and signed offset."""
    dx, dy = xx - c["cx"], yy - c["cy"]
    rho, t = np.hypot(dx, dy), np.arctan2(dy, dx)
    arg = c["ks"][:, None, None] * t[None] + c["phi"][:, None, None]
    r = c["r0"] * (1 + (c["a"][:, None, None] * np.cos(arg)).sum(0))
    dr = -c["r0"] * ((c["a"] * c["ks"])[:, None, None] * np.sin(arg)).sum(0)
    off = rho - r
    return t, np.abs(off) / np.sqrt(1 + (dr / np.maximum(r, 1e-6)) ** 2), off


def render_contours(seed: int, split: str, index: int, size: int = 64) -> Tuple[np.ndarray, np.ndarray]:
    """One built-in sample: ``(HxWx3 uint8 image, HxW uint8 label in {0, 1, 255})``, deterministic."""
    if split not in _SPLITS:
        raise ConfigError(f"split must be one of {list(_SPLITS)}, got {split!r}")
    rng = np.random.default_rng([int(seed), _SPLITS[split], int(index), 0x5E65])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    width = max(1.0, size / 64.0) * rng.uniform(1.0, 1.4)
    ink = np.zeros((size, size))
    label = np.zeros((size, size), np.uint8)
    stroke = np.zeros((size, size), bool)
    n = int(rng.integers(2, 4))
    closed = rng.random(n) < 0.5
    if not closed.any() and rng.random() < 0.7:  # most images have at least one enclosed region
        closed[int(rng.integers(n))] = True
    placed: List[Tuple[float, float, float]] = []  # (cx, cy, outer radius): curves never touch or cross
    for is_closed in closed:
        for _ in range(30):
            c = _star_curve(rng, size)
            reach = c["r0"] * (1 + c["a"].sum())
            if all(math.hypot(c["cx"] - x, c["cy"] - y) > reach + r + width + 2 for x, y, r in placed):
                break
        else:
            continue  # no room left for this curve
        placed.append((c["cx"], c["cy"], reach))
        t, d, off = _radial(c, xx, yy)
        line = np.clip(width / 2 + 0.5 - d, 0.0, 1.0)
        if is_closed:
            label[off < 0] = 1
            stroke |= d < width / 2 + 1.0
        else:  # a decoy: the same stroke with a gap of 0.35-0.8 rad somewhere along it
            start, gap = rng.uniform(-math.pi, math.pi), rng.uniform(0.35, 0.8)
            line = line * (np.mod(t - start, 2 * math.pi) >= gap)
        ink = np.maximum(ink, line)
    bg, fg = rng.uniform(0.0, 0.3), rng.uniform(0.7, 1.0)
    img = bg + (fg - bg) * ink
    img = np.repeat(img[..., None], 3, axis=2) + rng.normal(0.0, 0.04, (size, size, 3))
    label[stroke] = IGNORE_INDEX
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label


_RENDERED: Dict[Tuple[int, str, int, int], Tuple[np.ndarray, np.ndarray]] = {}


class ContourSegmentation(Dataset):
    """The built-in segmentation set (module docstring); items ``(x [3,H,W] normalised, y [H,W] long)``.

    ``augment``: a random flip / transpose of image and mask together (the labels are invariant to them).
    Rendered samples are cached (uint8) so that later epochs cost nothing.
    """

    classes = CONTOUR_CLASSES

    def __init__(self, split: str = "train", num_samples: int = 1000, image_size: int = 64, seed: int = 0,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 augment: bool = False) -> None:
        if not 16 <= int(image_size) <= 1024:
            raise ConfigError(f"built-in segmentation image size must be in [16, 1024], got {image_size}")
        if int(num_samples) < 1:
            raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
        if split not in _SPLITS:
            raise ConfigError(f"split must be one of {list(_SPLITS)}, got {split!r}")
        self.split, self.num_samples, self.image_size, self.seed = split, int(num_samples), int(image_size), int(seed)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.augment = augment
        self._cache = _RENDERED  # shared by all instances: the demo's two runs render each image once

    def __len__(self) -> int:
        return self.num_samples

    @property
    def cache(self) -> bool:
        """True while images remain to be rendered (the trainer then says the first epoch renders them)."""
        return any((self.seed, self.split, self.image_size, i) not in self._cache for i in (0, self.num_samples - 1))

    def raw(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        key = (self.seed, self.split, self.image_size, index)
        if key not in self._cache:
            self._cache[key] = render_contours(self.seed, self.split, index, self.image_size)
        return self._cache[key]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        img, lab = self.raw(index)
        x = (torch.from_numpy(img).permute(2, 0, 1).float() / 255.0 - self.mean) / self.std
        y = torch.from_numpy(lab.astype(np.int64))
        if self.augment:
            r = int(torch.randint(0, 8, (1,)).item())
            x, y = dihedral(x, r), dihedral(y, r)
        return x.contiguous(), y.contiguous()

    def describe(self) -> str:
        return (f"built-in contours segmentation, split {self.split}: {self.num_samples} images "
                f"{self.image_size}x{self.image_size}, seed {self.seed}")


# ------------------------------------------------------------------------------------------ folders ----
def parse_seg_data(spec: str) -> Tuple[str, str]:
    """``builtin:contours`` -> ("builtin", "contours"); anything else is a folder ("folder", path)."""
    if spec.startswith("builtin:") or spec == "contours":
        what = spec.split(":", 1)[-1]
        if what != "contours":
            raise ConfigError(f"unknown built-in segmentation dataset {what!r}; available: contours")
        return "builtin", what
    return "folder", spec


class PairedTransform:
    """Image + mask together: random rescale (``scale`` range, relative to a shorter side of ``crop``), random
    crop to ``crop`` (padding with 0 / 255 where the image is smaller), horizontal flip; then normalise.

    ``crop`` None (evaluation): the image is only normalised, at its own size.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], crop: Optional[int] = None,
                 scale: Tuple[float, float] = (0.5, 2.0), flip: bool = True) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.crop, self.scale, self.flip = crop, (float(scale[0]), float(scale[1])), flip

    def __call__(self, img: np.ndarray, mask: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
        y = torch.from_numpy(np.array(mask, dtype=np.int64))
        if self.crop:
            x, y = self._augment(x, y, int(self.crop))
        return ((x - self.mean) / self.std).contiguous(), y.contiguous()

    def _augment(self, x: torch.Tensor, y: torch.Tensor, crop: int) -> Tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2:]
        lo, hi = self.scale
        s = (lo + (hi - lo) * float(torch.rand(()))) * crop / min(h, w)
        nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        y = F.interpolate(y[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
        ph, pw = max(crop - nh, 0), max(crop - nw, 0)
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), value=0.0)
            y = F.pad(y, (0, pw, 0, ph), value=IGNORE_INDEX)
        top = int(torch.randint(0, x.shape[-2] - crop + 1, ()))
        left = int(torch.randint(0, x.shape[-1] - crop + 1, ()))
        x, y = x[:, top:top + crop, left:left + crop], y[top:top + crop, left:left + crop]
        if self.flip and float(torch.rand(())) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x, y


class SegmentationFolder(Dataset):
    """The usable image / mask pairs of a folder split (module docstring). Items ``(x, y, bad pairs met,
    first bad index)`` with ``report_bad``, else ``(x, y)``; ``samples`` and ``known_bad`` are what the
    trainer counts with, ``left_out`` the pairs the scan set aside (:class:`~slaknet.segment.folders.LeftOut`).

    ``classes`` (e.g. a checkpoint's) are checked against the masks; without them the classes come from
    :func:`~slaknet.segment.folders.label_scheme`, or are ``labels`` (checked against this split too).
    ``scan``: a scan of this split made already.
    ``substitute`` False (evaluation): a pair found bad while loading yields an empty item (``x`` 3x0x0)
    counted in the third field, never its neighbour.
    """

    def __init__(self, root: str, split: str, transform: PairedTransform, classes: Optional[List[str]] = None,
                 num_classes: Optional[int] = None, report_bad: bool = False,
                 reduce_zero_label: Optional[bool] = None, scan: Optional[SplitScan] = None,
                 substitute: bool = True, labels: Optional[LabelScheme] = None) -> None:
        self.root, self.split = root, split
        self.scan = scan if scan is not None else scan_split(root, split)
        self.layout = self.scan.layout
        self.samples = list(self.scan.pairs)
        self.left_out = list(self.scan.left_out)
        if labels is not None:
            check_labels(labels, [self.scan])
            self.labels = labels
        else:
            self.labels = label_scheme(root, self.layout, [self.scan], num_classes, reduce_zero_label, classes)
        self.classes = self.labels.classes
        self.reduce_zero_label = self.labels.reduce_zero_label
        self.transform, self.report_bad, self.substitute = transform, report_bad, substitute
        self.bad_files: List[str] = []
        self.known_bad: set = set()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """The RGB uint8 image and the class-index mask of pair ``index``; raises for a pair that is bad."""
        from PIL import Image

        img_path, mask_path = self.samples[index]
        with Image.open(img_path) as im:
            img = np.asarray(im.convert("RGB"))
        mask = read_mask(mask_path)
        if mask.shape != img.shape[:2]:
            raise ValueError(f"mask {mask.shape[0]}x{mask.shape[1]} and image {img.shape[0]}x{img.shape[1]} "
                             "differ in size")
        self.labels.check(mask, mask_path)
        return img, self.labels.to_labels(mask)

    def _bad(self, i: int, exc: Exception) -> None:
        if self.samples[i][0] not in self.bad_files:
            self.bad_files.append(self.samples[i][0])
            warnings.warn(f"skipping bad pair {self.samples[i][0]}: {type(exc).__name__}: {exc}")

    def __getitem__(self, index: int) -> Tuple[Any, ...]:
        n = len(self.samples)
        bad, first = 0, -1
        for k in range(min(n, 50) if self.substitute else 1):
            i = (index + k) % n
            if i in self.known_bad and self.substitute:
                continue
            try:
                img, mask = self.load(i)
            except ConfigError:
                raise
            except Exception as exc:  # PIL raises many types for damaged files
                bad += 1
                first = i if first < 0 else first
                self._bad(i, exc)
                continue
            x, y = self.transform(img, mask)
            return (x, y, bad, first) if self.report_bad else (x, y)
        if not self.substitute:  # evaluation: the bad pair is skipped and counted, no other stands in
            x, y = torch.zeros(3, 0, 0), torch.zeros(0, 0, dtype=torch.long)
            return (x, y, bad, first) if self.report_bad else (x, y)
        raise RuntimeError(f"50 consecutive bad image/mask pairs in {self.root!r} around index {index}")

    def describe(self) -> str:
        return (f"{self.layout} segmentation folder {self.root} ({self.split}): {len(self.samples)} pairs, "
                f"{len(self.classes)} classes")
