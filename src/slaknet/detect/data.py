"""Detection data: the built-in "closed contours among open decoys" set and the batching of target dicts.

Every built-in image holds a few thin, wobbly closed curves (the objects: a box and a filled mask each)
and as many decoys drawn by the same rule but with one or two gaps cut into the line (not objects).
Any short piece of a decoy looks exactly like a piece of an object; whether a curve is an object is a
property of the whole curve, so a detector has to integrate evidence along it (long-range context).
An image is a pure function of ``(seed, split, index)``.

Samples are ``(image [3, H, W] float in [0, 1], target, bad, bad_index)`` with ``target`` the torchvision
detection dict (``boxes`` xyxy float, ``labels`` int64 >= 1, ``masks`` uint8 [K, H, W]); ``bad`` /
``bad_index`` count unreadable files (always 0 / -1 here) for the trainer's counting.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from slaknet.errors import ConfigError

__all__ = ["ContourDetection", "render_contours", "detection_collate", "BUILTIN_DETECTION", "CONTOUR_CLASSES"]

BUILTIN_DETECTION = "builtin:contours"
CONTOUR_CLASSES = ["closed contour"]  # label 1 (0 is torchvision's background)
_SPLITS = {"train": 0, "val": 1, "test": 2}


def _curve(rng: np.random.Generator, size: int) -> Tuple[float, float, float, np.ndarray]:
    """A wobbly closed curve: centre, mean radius and Fourier coefficients (a_k, phi_k) of r(theta)."""
    r = rng.uniform(0.09, 0.2) * size
    coef = np.stack([rng.uniform(0, 0.18 / np.arange(1, 4)), rng.uniform(0, 2 * math.pi, 3)], 1)  # k = 1, 2, 3
    return 0.0, 0.0, r, coef


def _radius(theta: np.ndarray, r: float, coef: np.ndarray) -> np.ndarray:
    out = np.ones_like(theta)
    for k, (a, phi) in enumerate(coef, start=1):
        out += a * np.cos(k * theta + phi)
    return r * out


def _place(rng: np.random.Generator, size: int, n: int, tries: int = 200) -> List[Tuple[float, float, float, np.ndarray]]:
    """Up to ``n`` curves inside the image whose bounding discs do not overlap."""
    placed: List[Tuple[float, float, float, np.ndarray]] = []
    reach: List[float] = []
    for _ in range(tries):
        if len(placed) == n:
            break
        _, _, r, coef = _curve(rng, size)
        rmax = r * (1 + float(coef[:, 0].sum())) + 2
        cx, cy = rng.uniform(rmax + 1, size - rmax - 1), rng.uniform(rmax + 1, size - rmax - 1)
        if all(math.hypot(cx - p[0], cy - p[1]) > rmax + rm + 2 for p, rm in zip(placed, reach)):
            placed.append((cx, cy, r, coef))
            reach.append(rmax)
    return placed


def render_contours(seed: int, split: str, index: int, size: int = 96, max_objects: int = 3,
                    max_decoys: int = 3) -> Tuple[np.ndarray, List[np.ndarray]]:
    """``(image [H, W, 3] float32 in [0, 1], masks of the closed curves [H, W] bool)``.

    Objects and decoys share colour, thickness and shape distributions; a decoy has one or two gaps of
    8-20% of its length each. Pixel noise is added to the whole image.
    """
    if split not in _SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(_SPLITS)}")
    rng = np.random.default_rng([int(seed), _SPLITS[split], int(index), 0xC0DE])
    n_obj = int(rng.integers(1, max_objects + 1))
    n_dec = int(rng.integers(1, max_decoys + 1))
    curves = _place(rng, size, n_obj + n_dec)
    kinds = [True] * n_obj + [False] * n_dec
    rng.shuffle(kinds)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    img = np.full((size, size, 3), 0.1, np.float32) + rng.normal(0, 0.04, (size, size, 3)).astype(np.float32)
    masks = []
    for (cx, cy, r, coef), closed in zip(curves, kinds[:len(curves)]):
        dx, dy = xx - cx, yy - cy
        dist, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
        rad = _radius(theta, r, coef)
        half = rng.uniform(0.7, 1.3)
        line = np.abs(dist - rad) <= half
        if not closed:
            for _ in range(int(rng.integers(1, 3))):
                start, width = rng.uniform(-math.pi, math.pi), rng.uniform(0.08, 0.2) * 2 * math.pi
                rel = np.mod(theta - start, 2 * math.pi)
                line &= rel > width
        colour = rng.uniform(0.55, 1.0, 3).astype(np.float32)
        img[line] = colour
        if closed:
            masks.append(dist <= rad + half)
    return np.clip(img, 0, 1), masks


def _target(masks: Sequence[np.ndarray], size: int) -> Dict[str, torch.Tensor]:
    if not masks:
        return {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64),
                "masks": torch.zeros((0, size, size), dtype=torch.uint8)}
    m = torch.from_numpy(np.stack(masks)).to(torch.uint8)
    from torchvision.ops import masks_to_boxes

    boxes = masks_to_boxes(m)
    boxes[:, 2:] += 1  # pixel-edge convention: a box covers the pixels it contains
    return {"boxes": boxes, "labels": torch.ones(len(masks), dtype=torch.int64), "masks": m}


class ContourDetection(Dataset):
    """``count`` built-in images of side ``size`` for ``split``, rendered once on first access (cached)."""

    classes = CONTOUR_CLASSES
    has_masks = True  # every object has a filled mask (--detector auto: mask_rcnn)

    def __init__(self, split: str, count: int, size: int = 96, seed: int = 0, flip: bool = False) -> None:
        if count < 1 or size < 32:
            raise ConfigError(f"the built-in detection set needs count >= 1 and size >= 32, got {count}, {size}")
        self.split, self.count, self.size, self.seed, self.flip = split, int(count), int(size), int(seed), flip
        self._cache: Dict[int, Tuple[torch.Tensor, Dict[str, torch.Tensor]]] = {}

    def __len__(self) -> int:
        return self.count

    def item(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The un-augmented ``(image, target)`` of ``index``."""
        if index not in self._cache:
            img, masks = render_contours(self.seed, self.split, index, self.size)
            self._cache[index] = (torch.from_numpy(img).permute(2, 0, 1).contiguous(), _target(masks, self.size))
        return self._cache[index]

    def __getitem__(self, index: int) -> Tuple[Any, ...]:
        x, t = self.item(int(index))
        if self.flip and bool(torch.rand(()) < 0.5):  # the trainer seeds torch's RNG per epoch
            x, t = hflip(x, t)
        return x, dict(t), 0, -1

    def describe(self) -> str:
        return (f"built-in closed contours among open decoys: {self.count} {self.split} images of "
                f"{self.size} px (seed {self.seed})")


def hflip(x: torch.Tensor, t: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Mirror an image and its target left-right."""
    w = x.shape[-1]
    out = dict(t)
    b = t["boxes"].clone()
    b[:, [0, 2]] = w - t["boxes"][:, [2, 0]]
    out["boxes"] = b
    if "masks" in t:
        out["masks"] = t["masks"].flip(-1)
    return x.flip(-1), out


def detection_collate(batch: List[Tuple[Any, ...]]) -> Tuple[Any, ...]:
    """``(list of images, list of target dicts, unreadable counts, first unreadable index)``: images keep
    their own sizes (torchvision's detection transform resizes and pads them)."""
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    bad = torch.tensor([int(b[2]) if len(b) > 2 else 0 for b in batch], dtype=torch.long)
    idx = torch.tensor([int(b[3]) if len(b) > 3 else -1 for b in batch], dtype=torch.long)
    return images, targets, bad, idx
